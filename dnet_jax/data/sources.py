"""Where the images come from: digits, TFDS, CIFAR python pickles, ``.npz``.

Each loader returns a ``SourceData`` (full train split in file order, test
split, optionally a given meta split); ``load_long_tailed(source, ...)`` then builds
the long-tailed train / balanced meta / test sets with
``long_tail.build_long_tailed``.

Sources (``source``):

* ``"digits"``: scikit-learn's bundled 8x8 digits (no download; the default
  for a quick run). Split per class into test / meta / train pool here.
* ``"tfds"``: a TFDS dataset already prepared in ``data_dir``.
* ``"cifar_pickle"``: the original CIFAR-10/100 python pickles.
* ``"npz"``: your own arrays in a ``.npz`` file.

TensorFlow (Datasets) is imported only by the ``"tfds"`` loader.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from typing import Any

import numpy as np

from dnet_jax.data import long_tail
from dnet_jax.data import safe_pickle

SOURCES = ("digits", "tfds", "cifar_pickle", "npz")

# CIFAR python versions: sub-directory, train / test files, label key.
_CIFAR_LAYOUTS = {
    "cifar10": ("cifar-10-batches-py",
                tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
                b"labels", 10, "cifar-10-python.tar.gz"),
    "cifar100": ("cifar-100-python", ("train",), ("test",), b"fine_labels",
                 100, "cifar-100-python.tar.gz"),
}


@dataclasses.dataclass(frozen=True, eq=False)
class SourceData:
  """A dataset as loaded, before long-tailed subsampling.

  ``x_*`` are uint8 NHWC, ``y_*`` integer labels, the train split in file
  order. ``x_meta``/``y_meta`` are None unless the source defines its own
  meta split (then no meta set is split off the train split).
  """
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  x_meta: np.ndarray | None
  y_meta: np.ndarray | None
  num_classes: int
  name: str


# ----------------------------------------------------------------- digits


def load_digits_source(
    *, seed: int, meta_per_class: int = 10, test_per_class: int = 50
) -> SourceData:
  """scikit-learn's 8x8 digits as uint8 ``(N, 8, 8, 1)`` images, 10 classes.

  Pixels 0..16 become ``round(x * 255 / 16)``. One seeded permutation
  (``np.random.default_rng(seed)``) orders all 1,797 images; in that order
  the first ``test_per_class`` images of each class form the test set, the
  next ``meta_per_class`` the meta set, and the rest the train pool, whose
  order (the shuffled one) is its "file order". The automatic n_max of
  ``build_long_tailed`` is then the smallest pool class (114 with the
  defaults and seed 0: 174 - 50 - 10).
  """
  from sklearn import datasets  # Lazy: only this source needs scikit-learn.

  if test_per_class < 1 or meta_per_class < 1:
    raise ValueError(
        f"digits needs test_per_class >= 1 and meta_per_class >= 1, got "
        f"{test_per_class} and {meta_per_class}.")
  digits = datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  order = np.random.default_rng(seed).permutation(len(digits.target))
  images, labels = images[order], digits.target.astype(np.int64)[order]

  rank = np.zeros(len(labels), np.int64)  # position within its class
  for c in range(10):
    members = np.flatnonzero(labels == c)
    if members.size < test_per_class + meta_per_class + 1:
      raise ValueError(
          f"digits class {c} has {members.size} images, fewer than "
          f"test_per_class + meta_per_class + 1 = "
          f"{test_per_class + meta_per_class + 1}; lower digits_test_per_class "
          "or meta_per_class.")
    rank[members] = np.arange(members.size)
  test = rank < test_per_class
  meta = (rank >= test_per_class) & (rank < test_per_class + meta_per_class)
  pool = ~(test | meta)
  return SourceData(
      x_train=images[pool], y_train=labels[pool],
      x_test=images[test], y_test=labels[test],
      x_meta=images[meta], y_meta=labels[meta],
      num_classes=10, name="digits")


# ------------------------------------------------------------------- TFDS


def _prepare_hint(name: str, data_dir: str) -> str:
  return (
      f"Prepare it on a machine with internet access with `tfds build {name} "
      f"--data_dir={data_dir}` and copy that directory here, or use "
      "source='cifar_pickle' with the original CIFAR python files.")


def _original_order(ids: np.ndarray) -> np.ndarray | None:
  """Permutation restoring the original file order from TFDS ``id``s.

  TFDS shuffles examples when it writes a dataset, but its CIFAR builders
  keep the original position in ``id`` (``b"train_01234"``). Returns the
  ``argsort`` of those positions, or None if the ids are not all of the form
  ``<prefix>_<integer>`` forming a permutation of ``0..N-1``.
  """
  positions = []
  for raw in ids:
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    _, _, digits = text.rpartition("_")
    if not digits.isdigit():
      return None
    positions.append(int(digits))
  positions = np.asarray(positions, np.int64)
  if not np.array_equal(np.sort(positions), np.arange(len(positions))):
    return None
  return np.argsort(positions)


def load_tfds_source(name: str, data_dir: str | os.PathLike) -> SourceData:
  """Loads the ``train`` and ``test`` splits of a prepared TFDS dataset.

  Uses ``tfds.load(name, data_dir=..., split=..., download=False,
  shuffle_files=False)`` and reads each split as one numpy batch; images
  from the ``image`` feature, labels from ``label``. When the examples carry
  CIFAR-style ids (``train_00042``) the original file order is restored, so
  "the last images of each class in file order" means the same images as in
  the CIFAR python files (TFDS's own record order is shuffled).

  ``tfds.load(..., batch_size=-1)`` is not used: it sizes the batch from the
  dataset metadata, which ``tfds.testing.mock_data`` leaves empty (then TF
  tries to allocate ``sys.maxsize`` elements); the split's cardinality is
  known and used instead.

  Raises:
    FileNotFoundError: ``data_dir`` is missing or the dataset is not prepared
      there (this function never downloads).
  """
  if not data_dir:
    raise ValueError(
        "source='tfds' needs data_dir, the TFDS data directory that holds "
        f"the prepared dataset {name!r}. " + _prepare_hint(name, "<dir>"))
  data_dir = os.fspath(data_dir)
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(
        f"TFDS data_dir {data_dir!r} does not exist. "
        + _prepare_hint(name, data_dir))
  import tensorflow_datasets as tfds  # Lazy: pulls in TensorFlow.

  splits = {}
  info = None
  for split in ("train", "test"):
    try:
      ds, info = tfds.load(name, data_dir=data_dir, split=split,
                           download=False, shuffle_files=False, with_info=True)
    except AssertionError as e:  # TFDS's "could not find data in ..."
      raise FileNotFoundError(
          f"TFDS dataset {name!r} (split {split!r}) is not prepared in "
          f"{data_dir!r}. " + _prepare_hint(name, data_dir)) from e
    splits[split] = _tfds_split_to_numpy(tfds, ds, name, split)

  num_classes = int(info.features["label"].num_classes)
  (x_train, y_train), (x_test, y_test) = splits["train"], splits["test"]
  return SourceData(x_train, y_train, x_test, y_test, None, None,
                    num_classes=num_classes, name=name.split(":")[0])


def _tfds_split_to_numpy(tfds: Any, ds: Any, name: str, split: str):
  """One TFDS split -> (uint8 NHWC images, int64 labels) in file order."""
  n = int(ds.cardinality())
  if n <= 0:
    raise ValueError(
        f"TFDS {name!r} split {split!r} has unknown or zero size ({n}).")
  batch = next(iter(tfds.as_numpy(ds.batch(n))))
  missing = {"image", "label"} - set(batch)
  if missing:
    raise ValueError(
        f"TFDS {name!r} has no feature(s) {sorted(missing)}; found "
        f"{sorted(batch)}. Only image classification datasets with 'image' "
        "and 'label' features are supported.")
  images, labels = batch["image"], batch["label"].astype(np.int64)
  if "id" in batch:
    order = _original_order(batch["id"])
    if order is not None:
      images, labels = images[order], labels[order]
  return _to_uint8_nhwc(images, f"TFDS {name} {split} images"), labels


# ----------------------------------------------------- CIFAR python pickles


def _cifar_dir(name: str, data_dir: str | os.PathLike) -> str:
  """The directory holding the CIFAR files: ``data_dir`` or its sub-dir."""
  if name not in _CIFAR_LAYOUTS:
    raise ValueError(
        f"source='cifar_pickle' supports name in {sorted(_CIFAR_LAYOUTS)}, "
        f"got {name!r}.")
  sub, train_files, _, _, _, archive = _CIFAR_LAYOUTS[name]
  if not data_dir:
    raise ValueError(
        f"source='cifar_pickle' needs data_dir: the directory holding {sub}/ "
        f"(extracted from {archive}) or {sub} itself.")
  data_dir = os.fspath(data_dir)
  for candidate in (data_dir, os.path.join(data_dir, sub)):
    if os.path.isfile(os.path.join(candidate, train_files[0])):
      return candidate
  raise FileNotFoundError(
      f"no {name} python files found: expected {train_files[0]} in "
      f"{os.path.join(data_dir, sub)!r} or in {data_dir!r}. Download "
      f"{archive} from https://www.cs.toronto.edu/~kriz/cifar.html and "
      f"extract it into {data_dir!r}.")


def _read_cifar_batch(path: str, label_key: bytes, num_classes: int):
  """One CIFAR pickle -> (uint8 NHWC images, int64 labels in [0, num_classes)).

  The pickles store each image as 3,072 bytes: the 1,024 red, then green,
  then blue values of the 32x32 image, rows first (CHW); reshaped to HWC.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"missing CIFAR file {path!r}.")
  try:
    batch = safe_pickle.safe_load(path)
  except safe_pickle.RefusedPickleError:
    raise
  except Exception as e:  # Truncated or not a pickle at all.
    raise ValueError(f"{path!r} is not a readable CIFAR pickle: {e}") from e
  if not isinstance(batch, dict) or b"data" not in batch or label_key not in (
      batch):
    found = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
    raise ValueError(
        f"{path!r} is not a CIFAR batch: expected a dict with keys b'data' "
        f"and {label_key!r}, found {found}.")
  data = np.asarray(batch[b"data"])
  labels = _int64_labels(batch[label_key], f"{path!r}: {label_key!r}")
  outside = labels[(labels < 0) | (labels >= num_classes)]
  if outside.size:
    raise ValueError(
        f"{path!r}: {outside.size} label(s) in {label_key!r} outside [0, "
        f"{num_classes}): {', '.join(str(v) for v in np.unique(outside)[:5])}; "
        "the file is damaged or from another data set: download it again.")
  if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
    raise ValueError(
        f"{path!r}: b'data' must be a (N, 3072) uint8 array, got "
        f"{data.dtype} {data.shape}.")
  if labels.shape != (data.shape[0],):
    raise ValueError(
        f"{path!r}: {data.shape[0]} images but {labels.size} labels.")
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), labels


def load_cifar_pickle_source(
    name: str, data_dir: str | os.PathLike
) -> SourceData:
  """CIFAR-10/100 from the original python pickles, in file order.

  ``data_dir`` is ``cifar-10-batches-py`` / ``cifar-100-python`` or its
  parent. CIFAR-10 reads ``data_batch_1..5`` (in that order) and
  ``test_batch`` with ``b"labels"``; CIFAR-100 reads ``train`` and ``test``
  with ``b"fine_labels"``. Loaded with the restricted unpickler.
  """
  root = _cifar_dir(name, data_dir)
  _, train_files, test_files, label_key, num_classes, _ = _CIFAR_LAYOUTS[name]

  def read(files):
    parts = [_read_cifar_batch(os.path.join(root, f), label_key, num_classes)
             for f in files]
    return (np.concatenate([p[0] for p in parts]),
            np.concatenate([p[1] for p in parts]))

  (x_train, y_train), (x_test, y_test) = read(train_files), read(test_files)
  return SourceData(x_train, y_train, x_test, y_test, None, None,
                    num_classes=num_classes, name=name)


# -------------------------------------------------------------------- npz

_NPZ_REQUIRED = ("x_train", "y_train", "x_test", "y_test")
_NPZ_OPTIONAL = ("x_meta", "y_meta", "num_classes")


def _to_uint8_nhwc(x: np.ndarray, what: str) -> np.ndarray:
  """NHWC / NHW images, uint8 or float in [0, 1] -> uint8 NHWC.

  Floats become ``round(x * 255)``; integers must already be in 0..255.
  """
  x = np.asarray(x)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4:
    raise ValueError(
        f"{what} must be NHWC (or NHW for one channel), got shape {x.shape}.")
  if x.dtype == np.uint8:
    return x
  if x.size == 0:
    return x.astype(np.uint8)
  low, high = x.min(), x.max()
  if np.issubdtype(x.dtype, np.floating):
    if not (np.isfinite(low) and np.isfinite(high) and 0 <= low and
            high <= 1):
      raise ValueError(
          f"{what} are floats in [{low}, {high}], but float images must lie "
          "in [0, 1]; rescale them (x / 255 for 0..255 data) or store uint8.")
    return np.round(x * 255.0).astype(np.uint8)
  if np.issubdtype(x.dtype, np.integer) and 0 <= low and high <= 255:
    return x.astype(np.uint8)
  raise ValueError(
      f"{what} have dtype {x.dtype} and range [{low}, {high}]; expected uint8 "
      "0..255 or float in [0, 1].")


def _npz_path(data_dir: str | os.PathLike, name: str) -> str:
  if not data_dir:
    raise ValueError(
        "source='npz' needs data_dir: the path of the .npz file (or a "
        f"directory holding {name}.npz).")
  path = os.fspath(data_dir)
  if os.path.isdir(path):
    path = os.path.join(path, f"{name}.npz")
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"npz file {path!r} not found; expected a .npz with arrays "
        f"{', '.join(_NPZ_REQUIRED)} (optionally x_meta, y_meta).")
  return path


def _hwc(x: np.ndarray) -> str:
  return "x".join(str(d) for d in x.shape[1:3]) + f" with {x.shape[3]} channel(s)"


def _int64_labels(y, what: str) -> np.ndarray:
  """Integer labels as int64; ValueError for values int64 cannot hold (a uint64 near 2**64
  would wrap to a negative number)."""
  y = np.asarray(y)
  if not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"{what} must be integer class labels, got {y.dtype}.")
  if (y.size and np.issubdtype(y.dtype, np.unsignedinteger)
      and int(y.max()) > np.iinfo(np.int64).max):
    raise ValueError(f"{what} holds label {int(y.max())}, larger than any class index; "
                     "labels must be 0..num_classes-1.")
  return y.astype(np.int64)


def _check_npz_header(path: str) -> None:
  """ValueError naming what the file is when it is not a .npz (a zip archive) at all."""
  with open(path, "rb") as f:
    head = f.read(6)
  if head.startswith(b"PK"):
    return
  if not head:
    what = "it is empty (0 bytes; the write was probably interrupted)"
  elif head == b"\x93NUMPY":
    what = "it is a single .npy array saved under a .npz name (np.save instead of np.savez)"
  else:
    what = "it is not a zip archive as np.savez writes (a text or other file?)"
  raise ValueError(
      f"{path!r} is not a .npz file: {what}. Write it with np.savez(path, "
      f"{'=..., '.join(_NPZ_REQUIRED)}=...).")


def load_npz_source(data_dir: str | os.PathLike, name: str) -> SourceData:
  """Your own dataset from a ``.npz`` file.

  Required arrays ``x_train, y_train, x_test, y_test``; optional ``x_meta,
  y_meta`` (then no meta set is split off the train split) and a scalar
  ``num_classes`` (default: largest label + 1). Images NHWC or NHW, uint8 or
  float in [0, 1]. ``data_dir`` is the file, or a directory with
  ``<name>.npz``. Loaded with ``allow_pickle=False``.
  """
  path = _npz_path(data_dir, name)
  _check_npz_header(path)
  try:
    with np.load(path, allow_pickle=False) as npz:
      if not hasattr(npz, "files"):  # np.load read a single .npy array
        raise ValueError("it holds a single array (an .npy file), not named arrays")
      arrays = {k: npz[k] for k in npz.files}
  except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
    raise ValueError(
        f"{path!r} is not a readable .npz file: {e}. Write it with np.savez(path, "
        f"{'=..., '.join(_NPZ_REQUIRED)}=...).") from e
  missing = [k for k in _NPZ_REQUIRED if k not in arrays]
  if missing:
    raise ValueError(
        f"{path!r} lacks array(s) {', '.join(missing)}; expected "
        f"{', '.join(_NPZ_REQUIRED)} and optionally {', '.join(_NPZ_OPTIONAL)}"
        f" (found {', '.join(sorted(arrays)) or 'nothing'}).")
  if ("x_meta" in arrays) != ("y_meta" in arrays):
    raise ValueError(f"{path!r} has only one of x_meta / y_meta; give both "
                     "or neither.")
  has_meta = "x_meta" in arrays

  def labels(key):
    y = np.asarray(arrays[key])
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
      raise ValueError(
          f"{path!r}: {key} must be a 1-D integer array, got {y.dtype} "
          f"{y.shape}.")
    return _int64_labels(y, f"{path!r}: {key}")

  label_keys = ["y_train", "y_test"] + (["y_meta"] if has_meta else [])
  ys = {k: labels(k) for k in label_keys}
  if "num_classes" in arrays:
    value = np.asarray(arrays["num_classes"])
    if value.shape != () or not np.issubdtype(value.dtype, np.integer) or value < 1:
      raise ValueError(
          f"{path!r}: num_classes must be a positive integer scalar (np.savez(..., "
          f"num_classes=10)), got {value.dtype} of shape {value.shape}"
          f"{f' = {value}' if value.size <= 8 else ''}.")
    num_classes = int(value)
  else:
    num_classes = int(max(y.max(initial=-1) for y in ys.values())) + 1
  xs = {f"x{k[1:]}": _to_uint8_nhwc(arrays[f"x{k[1:]}"],
                                    f"{path}: x{k[1:]}") for k in label_keys}
  for key in xs:
    if key != "x_train" and xs[key].shape[1:] != xs["x_train"].shape[1:]:
      raise ValueError(
          f"{path!r}: {key} images are {_hwc(xs[key])} but x_train images "
          f"are {_hwc(xs['x_train'])}; every split must have the size and "
          "channels of the training images (resize or convert them).")
  return SourceData(
      xs["x_train"], ys["y_train"], xs["x_test"], ys["y_test"],
      xs.get("x_meta"), ys.get("y_meta"), num_classes=num_classes, name=name)


# ---------------------------------------------------------------- dispatch


def load_source(
    source: str,
    *,
    name: str,
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    meta_per_class: int = 10,
    digits_test_per_class: int = 50,
) -> SourceData:
  """Loads a dataset by source kind (see the module docstring).

  ``seed``, ``meta_per_class`` and ``digits_test_per_class`` are used only
  by ``"digits"``, which splits its own test and meta sets.
  """
  if source == "digits":
    return load_digits_source(seed=seed, meta_per_class=meta_per_class,
                              test_per_class=digits_test_per_class)
  if source == "tfds":
    return load_tfds_source(name, data_dir)
  if source == "cifar_pickle":
    return load_cifar_pickle_source(name, data_dir)
  if source == "npz":
    return load_npz_source(data_dir, name)
  raise ValueError(f"unknown data source {source!r}; use one of {SOURCES}.")


def load_long_tailed(source: str, *, imbalance_factor: float, name: str | None = None,
                     data_dir: str | None = None, protocol: str = "public",
                     meta_per_class: int | None = None, n_max: int | None = None,
                     seed: int = 0, digits_test_per_class: int = 50
                     ) -> long_tail.LongTailedData:
  """Loads ``source`` and builds the long-tailed data set (``build_long_tailed``).

  Args:
    source: "digits" | "tfds" | "cifar_pickle" | "npz".
    imbalance_factor: rho >= 1.
    name: "digits", "cifar10", "cifar100", a TFDS name or free text for npz
      (default "digits" for the digits source; required otherwise).
    data_dir: where the files are (not used by digits).
    protocol: "public" (default) or "ldam".
    meta_per_class: meta images per class (default 10 for digits, 25
      otherwise as on CIFAR).
    n_max: head-class size; None or 0 = automatic, the smallest class
      (see ``build_long_tailed``): 475 on CIFAR ("public"), 500 ("ldam").
    seed: subsampling / digits split seed.
    digits_test_per_class: digits test images per class.
  """
  if source not in SOURCES:
    raise ValueError(f"unknown data source {source!r}; use one of {SOURCES}.")
  name = name or ("digits" if source == "digits" else None)
  if name is None:
    raise ValueError(f"source={source!r} needs a data set name.")
  if imbalance_factor is None:
    raise ValueError("load_long_tailed needs 'imbalance_factor' (rho >= 1).")
  meta_per_class = int(meta_per_class or (10 if source == "digits" else 25))
  data = load_source(
      source, name=name, data_dir=data_dir or None, seed=int(seed),
      meta_per_class=meta_per_class, digits_test_per_class=int(digits_test_per_class))
  return long_tail.build_long_tailed(
      data.x_train, data.y_train, data.x_test, data.y_test,
      num_classes=data.num_classes,
      imbalance_factor=float(imbalance_factor),
      meta_per_class=meta_per_class,
      n_max=int(n_max or 0) or None,
      protocol=protocol or "public",
      seed=int(seed),
      name=data.name,
      x_meta=data.x_meta,
      y_meta=data.y_meta)
