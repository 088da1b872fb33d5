"""The public CIFAR stage-2 class-aware sampler, as a pure function of (labels, seed, epoch).

hitachi-rd-cv/Difficulty_Net, ``CIFAR-LT/data/ClassAwareSampler.py`` ("S"),
used by ``CIFAR-LT/cifar_train_exaugment_stage2.py`` lines 306-340 with
``num_samples_cls=4``:

* S:10-29 ``RandomCycleIter``: a list visited in order and reshuffled each
  time it is exhausted (also before the first item), so the items form
  consecutive cycles, each a uniform permutation.
* S:53-62: one cycle iterator over the classes ``0..C-1``, one per class over
  that class's sample indices; an epoch has ``n = max_c n_c x C`` samples.
* S:31-49: the next class ``c`` is drawn from the class cycle, then
  ``k = num_samples_cls`` consecutive items from ``c``'s own cycle are
  yielded; repeat until ``n`` samples (the last group is cut short when
  ``k`` does not divide ``n``, but its ``k`` items are still consumed).
* The iterators live in the sampler object, so epoch ``e + 1`` continues the
  class and item cycles where epoch ``e`` stopped.

Here the cycles are an infinite, seeded stream: class cycle ``j`` is
``permutation(C)`` from ``default_rng([seed, 4, j])`` and cycle ``j`` of class
``c`` is ``permutation(n_c)`` from ``default_rng([seed, 5, c, j])``. Epoch ``e``
takes class draws ``[e G, (e + 1) G)``, ``G = ceil(n / k)``, and for each class
the items after the ``k x (draws of c before e G)`` it consumed earlier.
Nothing is carried between calls, so a resumed run recomputes any epoch, and
the order is that of the public sampler run from epoch 0 (with its own random
permutations). The DataLoader cuts the order into consecutive batches of 128,
the last one partial (``class_aware_batches``): 372 per epoch at CIFAR-100,
rho = 100.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

_CLASS_STREAM = 4  # dnet_jax.data.batching uses 0-2, public_cifar 3
_ITEM_STREAM = 5


def _class_indices(labels: np.ndarray, num_classes: int | None) -> list[np.ndarray]:
  labels = np.asarray(labels)
  if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be a non-empty 1-D integer array, got {labels.dtype} "
                     f"{labels.shape}.")
  if labels.min() < 0:
    raise ValueError(f"labels must be >= 0, got {labels.min()}.")
  num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
  if labels.max() >= num_classes:
    raise ValueError(f"label {labels.max()} is out of range for num_classes={num_classes}.")
  counts = np.bincount(labels, minlength=num_classes)
  if (counts == 0).any():
    raise ValueError(
        f"every class 0..{num_classes - 1} needs at least one image (counts {counts.tolist()}); "
        "the class-aware sampler cannot draw from an empty class. Relabel to drop it.")
  order = np.argsort(labels, kind="stable")
  return np.split(order, np.cumsum(counts)[:-1])


def class_aware_epoch_length(labels: np.ndarray, num_classes: int | None = None) -> int:
  """``max_c n_c x C`` samples (S:61)."""
  per_class = _class_indices(labels, num_classes)
  return max(len(x) for x in per_class) * len(per_class)


def _cycle_stream(size: int, start: int, stop: int, key: list[int]) -> np.ndarray:
  """Items ``[start, stop)`` of the stream of permutations of ``range(size)``."""
  first, last = start // size, (stop - 1) // size
  cycles = [np.random.default_rng(key + [j]).permutation(size) for j in range(first, last + 1)]
  stream = np.concatenate(cycles)
  return stream[start - first * size:stop - first * size]


def _draws_before(position: int, num_classes: int, seed: int) -> np.ndarray:
  """``(C,)`` how often each class was drawn at class-stream positions ``< position``."""
  full, rest = divmod(position, num_classes)
  counts = np.full(num_classes, full, np.int64)
  if rest:
    counts[_cycle_stream(num_classes, full * num_classes, position,
                         [seed, _CLASS_STREAM])] += 1
  return counts


def class_aware_epoch(labels: np.ndarray, seed: int, epoch: int, samples_per_class: int = 4,
                      num_classes: int | None = None,
                      epoch_length: int | None = None) -> np.ndarray:
  """Sample indices of epoch ``epoch``: ``max_c n_c x C`` of them (or ``epoch_length``), in order.

  Groups of ``samples_per_class`` consecutive indices share a class; classes
  come in reshuffled cycles and each class's images in reshuffled cycles,
  continued across epochs (module docstring, S:10-62). ``epoch_length`` sets
  another number of samples per epoch (every epoch the same), e.g. a fixed
  number of iterations x batch size (the public ImageNet-LT / Places-LT stage 2).
  """
  if seed < 0 or epoch < 0 or samples_per_class < 1:
    raise ValueError(f"need seed >= 0, epoch >= 0, samples_per_class >= 1; got {seed}, "
                     f"{epoch}, {samples_per_class}.")
  per_class = _class_indices(labels, num_classes)
  num_classes = len(per_class)
  length = max(len(x) for x in per_class) * num_classes
  if epoch_length is not None:
    if int(epoch_length) < 1:
      raise ValueError(f"epoch_length must be >= 1, got {epoch_length}.")
    length = int(epoch_length)
  groups = -(-length // samples_per_class)
  start = epoch * groups
  classes = _cycle_stream(num_classes, start, start + groups, [seed, _CLASS_STREAM])
  consumed = samples_per_class * _draws_before(start, num_classes, seed)
  order = np.empty((groups, samples_per_class), np.int64)
  for c, members in enumerate(per_class):
    slots = np.flatnonzero(classes == c)
    if not slots.size:
      continue
    first = int(consumed[c])
    positions = _cycle_stream(len(members), first, first + slots.size * samples_per_class,
                              [seed, _ITEM_STREAM, c])
    order[slots] = members[positions].reshape(slots.size, samples_per_class)
  return order.reshape(-1)[:length]


def class_aware_batches(labels: np.ndarray, batch_size: int, *, seed: int, epoch: int,
                        samples_per_class: int = 4, num_classes: int | None = None,
                        drop_remainder: bool = False) -> Iterator[np.ndarray]:
  """Yields the epoch's index batches: consecutive slices of ``class_aware_epoch``.

  The public DataLoader keeps the last partial batch (``drop_remainder=False``);
  ``drop_remainder=True`` drops it for static shapes.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  order = class_aware_epoch(labels, seed, epoch, samples_per_class, num_classes)
  stop = len(order) - len(order) % batch_size if drop_remainder else len(order)
  for begin in range(0, stop, batch_size):
    yield order[begin:begin + batch_size]
