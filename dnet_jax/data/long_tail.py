"""Long-tailed subsampling, the meta-set split and shot groups (pure numpy).

Everything here is deterministic given its arguments (and seed): the same
inputs always give the same indices, so a run can be reproduced or resumed.

Protocols (METHOD.md, "Data protocol"):

* ``"public"`` -- the protocol of the Difficulty-Net / Meta-Weight-Net code:
  the meta set (the last ``meta_per_class`` images of every class of the train
  split, in file order) is removed first; then the first
  ``n_c = int(n_max * rho ** (-c / (C - 1)))`` remaining images of class ``c``
  are kept, in file order, with ``n_max`` = 475 on CIFAR (500 - 25).
* ``"ldam"`` -- the protocol of LDAM-DRW (Cao et al., NeurIPS 2019): the same
  counts with ``n_max`` = 500, but each class keeps a seeded random subset.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

PROTOCOLS = ("public", "ldam")


def check_imbalance_factor(imbalance_factor: float) -> None:
  """Raises ValueError unless ``imbalance_factor`` (rho = n_max / n_min) is a finite number >= 1."""
  try:
    rho = float(imbalance_factor)
  except (TypeError, ValueError):
    rho = float("nan")
  if not np.isfinite(rho) or rho < 1:
    raise ValueError(
        f"imbalance_factor must be >= 1 (it is n_max / n_min), got "
        f"{imbalance_factor!r}; use e.g. 10, 50, 100 or 200, or 1 for a "
        "balanced split.")


def long_tailed_counts(
    num_classes: int, n_max: int, imbalance_factor: float
) -> np.ndarray:
  """Images per class of an exponentially long-tailed split.

  ``n_c = int(n_max * rho ** (-c / (C - 1)))`` for ``c = 0 .. C-1``, with
  ``rho`` the imbalance factor n_0 / n_{C-1} (Cui et al., CVPR 2019;
  LDAM-DRW, Cao et al. 2019; METHOD.md "Data protocol").

  Example: ``long_tailed_counts(100, 475, 100).sum() == 10302`` and its last
  entry is 4 (CIFAR-100-LT, public protocol); with ``n_max=500`` the sum is
  10,847 (LDAM-DRW).

  Args:
    num_classes: C >= 2.
    n_max: images of the head class (class 0), >= 1.
    imbalance_factor: rho >= 1 (1 gives a balanced split).

  Returns:
    int64 array of shape ``(C,)``, non-increasing.
  """
  if int(num_classes) != num_classes or num_classes < 2:
    raise ValueError(
        f"num_classes must be an integer >= 2, got {num_classes!r}; a "
        "long-tailed split needs at least a head and a tail class.")
  if int(n_max) != n_max or n_max < 1:
    raise ValueError(
        f"n_max (images of the head class) must be an integer >= 1, got "
        f"{n_max!r}; set n_max to the head-class size (e.g. 475 for CIFAR).")
  check_imbalance_factor(imbalance_factor)
  c = np.arange(num_classes, dtype=np.float64)
  fractions = np.power(float(imbalance_factor), -c / (num_classes - 1))
  return (int(n_max) * fractions).astype(np.int64)


class MetaSplit(NamedTuple):
  """Indices (into the label array that was split), both in file order."""
  remaining: np.ndarray
  meta: np.ndarray


def _class_members(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
  """Indices of each class, in file order."""
  order = np.argsort(labels, kind="stable")
  bounds = np.searchsorted(labels[order], np.arange(num_classes + 1))
  return [order[bounds[c]:bounds[c + 1]] for c in range(num_classes)]


def _as_labels(labels: np.ndarray, what: str = "labels") -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"{what} must be a 1-D array, got shape {labels.shape}.")
  if labels.size and not np.issubdtype(labels.dtype, np.integer):
    if not np.all(np.equal(np.mod(labels, 1), 0)):
      raise ValueError(f"{what} must be integers, got dtype {labels.dtype}.")
  return labels.astype(np.int64)


def split_meta(
    labels: np.ndarray, meta_per_class: int, num_classes: int | None = None
) -> MetaSplit:
  """Holds out the last ``meta_per_class`` images of every class.

  METHOD.md ("Notation"): the meta set M is the last 25 images of every class
  of the CIFAR train split *in file order*, removed before the long-tailed
  subsampling (as Meta-Weight-Net and Difficulty-Net do).

  Args:
    labels: ``(N,)`` integer class labels in file order.
    meta_per_class: images per class moved to the meta set (>= 0).
    num_classes: C; defaults to ``labels.max() + 1``.

  Returns:
    ``MetaSplit(remaining, meta)``: sorted index arrays into ``labels``.

  Raises:
    ValueError: if a class has fewer than ``meta_per_class + 1`` images.
  """
  labels = _as_labels(labels)
  if int(meta_per_class) != meta_per_class or meta_per_class < 0:
    raise ValueError(
        f"meta_per_class must be an integer >= 0, got {meta_per_class!r}.")
  if num_classes is None:
    num_classes = int(labels.max()) + 1 if labels.size else 0
  _check_label_range(labels, num_classes, "labels")
  meta_parts = []
  for c, members in enumerate(_class_members(labels, num_classes)):
    if members.size < meta_per_class + 1:
      raise ValueError(
          f"class {c} has {members.size} images but needs at least "
          f"meta_per_class + 1 = {meta_per_class + 1} (meta_per_class for the "
          "meta set and one to train on); lower meta_per_class.")
    meta_parts.append(members[members.size - meta_per_class:])
  meta = np.sort(np.concatenate(meta_parts)) if meta_parts else np.zeros(
      0, np.int64)
  is_meta = np.zeros(labels.size, bool)
  is_meta[meta] = True
  return MetaSplit(remaining=np.flatnonzero(~is_meta), meta=meta)


def make_long_tailed(
    labels: np.ndarray, counts: np.ndarray, protocol: str, seed: int
) -> np.ndarray:
  """Indices of a long-tailed subset with ``counts[c]`` images of class c.

  * ``"public"``: the first ``counts[c]`` images of class c in file order
    (Meta-Weight-Net / Difficulty-Net CIFAR code; METHOD.md). ``seed`` is
    unused.
  * ``"ldam"``: LDAM-DRW (Cao et al. 2019): one ``np.random.RandomState(seed)``
    shuffles the members of each class in turn (class 0 first) and keeps the
    first ``counts[c]``; this is the same draw as LDAM-DRW's
    ``np.random.seed(seed)`` followed by ``np.random.shuffle`` per class.

  Args:
    labels: ``(N,)`` labels in file order; classes are ``0 .. len(counts)-1``.
    counts: ``(C,)`` wanted images per class.
    protocol: ``"public"`` or ``"ldam"``.
    seed: seed of the ``"ldam"`` draw.

  Returns:
    Sorted int64 indices into ``labels``.
  """
  labels = _as_labels(labels)
  counts = np.asarray(counts)
  if protocol not in PROTOCOLS:
    raise ValueError(
        f"unknown protocol {protocol!r}; use one of {PROTOCOLS} ('public': "
        "first n_c images in file order, 'ldam': seeded random subset).")
  num_classes = counts.size
  _check_label_range(labels, num_classes, "labels")
  rng = np.random.RandomState(seed) if protocol == "ldam" else None
  chosen = []
  for c, members in enumerate(_class_members(labels, num_classes)):
    n_c = int(counts[c])
    if n_c < 0 or n_c > members.size:
      raise ValueError(
          f"class {c} should keep {n_c} images but only {members.size} are "
          "available; lower n_max (or the imbalance factor) so that every "
          "class has enough images.")
    if rng is not None:
      members = members.copy()
      rng.shuffle(members)
    chosen.append(members[:n_c])
  return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def shot_groups(
    class_counts: np.ndarray, many_threshold: int = 100, few_threshold: int = 20
) -> dict[str, np.ndarray]:
  """Many/medium/few-shot class masks from the actual training counts.

  METHOD.md / OLTR (Liu et al., CVPR 2019): many-shot ``n_c > 100``, few-shot
  ``n_c < 20``, medium-shot the rest (20..100). Small datasets scale the
  thresholds, hence the arguments.

  Returns:
    ``{"many": mask, "medium": mask, "few": mask}``, boolean ``(C,)`` masks
    that partition the classes.
  """
  if few_threshold > many_threshold + 1:
    raise ValueError(
        f"few_threshold ({few_threshold}) must be <= many_threshold + 1 "
        f"({many_threshold + 1}), otherwise a class could be both many- and "
        "few-shot.")
  counts = np.asarray(class_counts)
  many = counts > many_threshold
  few = counts < few_threshold
  return {"many": many, "medium": ~(many | few), "few": few}


@dataclasses.dataclass(frozen=True, eq=False)
class LongTailedData:
  """A long-tailed train set, a balanced meta set and a test set.

  Images are uint8 NHWC, labels int32. ``class_counts[c]`` is the number of
  train images of class c (``np.bincount(y_train, minlength=C)``).
  """
  x_train: np.ndarray
  y_train: np.ndarray
  x_meta: np.ndarray
  y_meta: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  class_counts: np.ndarray
  name: str

  def shot_groups(
      self, many_threshold: int = 100, few_threshold: int = 20
  ) -> dict[str, np.ndarray]:
    """See the module-level ``shot_groups``."""
    return shot_groups(self.class_counts, many_threshold, few_threshold)

  @property
  def imbalance_ratio(self) -> float:
    """Actual n_max / n_min of the train set."""
    return float(self.class_counts.max() / max(self.class_counts.min(), 1))

  def summary(self) -> str:
    """One line for logs."""
    return (
        f"{self.name}: {self.num_classes} classes, train {len(self.y_train)} "
        f"(per class {self.class_counts.max()}..{self.class_counts.min()}, "
        f"ratio {self.imbalance_ratio:.1f}), meta {len(self.y_meta)}, "
        f"test {len(self.y_test)}, image {self.x_train.shape[1:]}")


def _check_label_range(labels: np.ndarray, num_classes: int, what: str):
  bad = (labels < 0) | (labels >= num_classes)
  if bad.any():
    values, counts = np.unique(labels[bad], return_counts=True)
    listed = ", ".join(f"{v} (x{n})" for v, n in zip(values[:5], counts[:5]))
    raise ValueError(
        f"{what}: {int(bad.sum())} label(s) outside [0, {num_classes}): "
        f"{listed}{', ...' if values.size > 5 else ''}; labels must be class "
        f"indices 0..{num_classes - 1}.")


def _check_images(x: np.ndarray, y: np.ndarray, what: str) -> None:
  if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4:
    raise ValueError(
        f"x_{what} must be a uint8 NHWC array, got "
        f"{getattr(x, 'dtype', type(x))} with shape {np.shape(x)}.")
  if len(x) != len(y):
    raise ValueError(
        f"x_{what} has {len(x)} images but y_{what} has {len(y)} labels; "
        "they must agree.")


def _check_every_class(labels: np.ndarray, num_classes: int, what: str):
  counts = np.bincount(labels, minlength=num_classes)
  empty = np.flatnonzero(counts == 0)
  if empty.size:
    raise ValueError(
        f"the {what} set has no examples of class(es) "
        f"{', '.join(map(str, empty[:10]))}{', ...' if empty.size > 10 else ''}"
        f"; every class needs at least one {what} example.")


def build_long_tailed(
    x_full_train: np.ndarray,
    y_full_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    num_classes: int,
    imbalance_factor: float,
    meta_per_class: int = 25,
    n_max: int | None = None,
    protocol: str = "public",
    seed: int = 0,
    name: str = "dataset",
    x_meta: np.ndarray | None = None,
    y_meta: np.ndarray | None = None,
) -> LongTailedData:
  """Builds train (long-tailed), meta (balanced) and test sets.

  1. Meta set: if ``x_meta`` is None, the last ``meta_per_class`` images of
     every class of the full train split (file order) are held out first
     (``split_meta``), *before* subsampling (METHOD.md). Otherwise the given
     meta set is used and the whole train split is the pool.
  2. Counts ``n_c = int(n_max * rho ** (-c / (C - 1)))``
     (``long_tailed_counts``), then ``make_long_tailed`` on the pool.

  ``n_max`` (None or 0 = automatic): the *smallest* class size, so that
  every class c can supply its n_c <= n_max images whatever its size (on the
  balanced CIFAR splits smallest = largest):

  * ``"public"``: smallest class of the pool, i.e. after meta removal (CIFAR:
    500 - 25 = 475, giving 10,302 images on CIFAR-100 at rho=100). An
    explicit n_max above a class's pool size is an error.
  * ``"ldam"``: smallest class of the full train split *before* meta removal
    (CIFAR: 500, as LDAM-DRW). The meta set is still held out, so a head
    class can have fewer pool images than its n_c (CIFAR: 475 < 500); such
    n_c are capped at the pool size. On CIFAR-100 at rho=100 this caps
    classes 0 and 1 (n_c 500 and 477) at 475 and gives 10,820 train images
    instead of LDAM-DRW's 10,847; the other 98 classes match LDAM-DRW's
    counts. ``class_counts`` reports what was actually kept.

  Returns:
    ``LongTailedData`` with uint8 NHWC images and int32 labels.
  """
  y_full_train = _as_labels(y_full_train, "y_train")
  y_test = _as_labels(y_test, "y_test")
  _check_images(x_full_train, y_full_train, "train")
  _check_images(x_test, y_test, "test")
  if protocol not in PROTOCOLS:
    raise ValueError(
        f"unknown protocol {protocol!r}; use one of {PROTOCOLS}.")
  if int(num_classes) != num_classes or num_classes < 2:
    raise ValueError(f"num_classes must be an integer >= 2, got "
                     f"{num_classes!r}.")
  _check_label_range(y_full_train, num_classes, "y_train")
  _check_label_range(y_test, num_classes, "y_test")

  if x_meta is None:
    if y_meta is not None:
      raise ValueError("y_meta was given without x_meta; give both or neither.")
    _check_every_class(y_full_train, num_classes, "train")
    split = split_meta(y_full_train, meta_per_class, num_classes)
    pool, meta = split.remaining, split.meta
    x_pool, y_pool = x_full_train[pool], y_full_train[pool]
    x_meta, y_meta = x_full_train[meta], y_full_train[meta]
  else:
    if y_meta is None:
      raise ValueError("x_meta was given without y_meta; give both or neither.")
    y_meta = _as_labels(y_meta, "y_meta")
    _check_images(x_meta, y_meta, "meta")
    _check_label_range(y_meta, num_classes, "y_meta")
    x_pool, y_pool = x_full_train, y_full_train
  _check_every_class(y_meta, num_classes, "meta")
  _check_every_class(y_pool, num_classes, "train")

  pool_sizes = np.bincount(y_pool, minlength=num_classes)
  if protocol == "ldam":
    auto_n_max = int(np.bincount(y_full_train, minlength=num_classes).min())
    counts = long_tailed_counts(num_classes, n_max or auto_n_max,
                                imbalance_factor)
    counts = np.minimum(counts, pool_sizes)
  else:
    counts = long_tailed_counts(num_classes, n_max or int(pool_sizes.min()),
                                imbalance_factor)
  if (counts < 1).any():
    c = int(np.flatnonzero(counts < 1)[0])
    raise ValueError(
        f"class {c} would keep 0 train images (n_max={n_max or 'auto'}, "
        f"imbalance_factor={imbalance_factor}); raise n_max or lower the "
        "imbalance factor so every class keeps at least one image.")
  keep = make_long_tailed(y_pool, counts, protocol, seed)
  y_train = y_pool[keep]
  return LongTailedData(
      x_train=x_pool[keep],
      y_train=y_train.astype(np.int32),
      x_meta=x_meta,
      y_meta=y_meta.astype(np.int32),
      x_test=x_test,
      y_test=y_test.astype(np.int32),
      num_classes=int(num_classes),
      class_counts=np.bincount(y_train, minlength=num_classes),
      name=name,
  )
