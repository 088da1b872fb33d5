"""Host-side batch index samplers (numpy).

Every sampler is a pure function of integers (seed, epoch or step), never of
a generator carried across calls, so a run resumed from a checkpoint at any
step reproduces exactly the batches it would have seen. Independent streams
(epochs, meta batches, class-balanced draws) get distinct
``np.random.SeedSequence`` entropy, ``[seed, stream, counter]``, so they do
not share random numbers.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

# Stream tags mixed into the seed sequence of each sampler.
_EPOCH_STREAM = 0
_META_STREAM = 1
_BALANCED_STREAM = 2


def _generator(seed: int, stream: int, counter: int = 0) -> np.random.Generator:
  if seed < 0 or counter < 0:
    raise ValueError(
        f"seed and epoch/step must be >= 0, got seed={seed}, counter={counter}.")
  return np.random.default_rng([int(seed), stream, int(counter)])


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The example order of one epoch: a permutation of ``range(n)``.

  Deterministic in ``(seed, epoch)``: a resumed run calls it again with the
  epoch it restarts in.
  """
  return _generator(seed, _EPOCH_STREAM, epoch).permutation(n)


def num_batches(num_examples: int, batch_size: int,
                drop_remainder: bool = True) -> int:
  """Batches per epoch of ``epoch_batches``."""
  if drop_remainder:
    return num_examples // batch_size
  return -(-num_examples // batch_size)


def epoch_batches(
    num_examples: int,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    drop_remainder: bool = True,
) -> Iterator[np.ndarray]:
  """Yields the index arrays of one shuffled epoch.

  The order is ``epoch_permutation(seed, epoch, num_examples)`` cut into
  consecutive batches; with ``drop_remainder`` the last partial batch is
  dropped so every batch has ``batch_size`` indices (static shapes).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  if drop_remainder and batch_size > num_examples:
    raise ValueError(
        f"batch_size {batch_size} exceeds the {num_examples} examples, so "
        "with drop_remainder no batch would be produced; lower batch_size.")
  order = epoch_permutation(seed, epoch, num_examples)
  for i in range(num_batches(num_examples, batch_size, drop_remainder)):
    yield order[i * batch_size:(i + 1) * batch_size]


def meta_batch_indices(
    seed: int, step: int, num_meta: int, batch_size: int
) -> np.ndarray:
  """Indices of the meta batch used at training step ``step``.

  ``batch_size`` distinct indices drawn uniformly from ``range(num_meta)``
  (without replacement within the batch), from a generator seeded by
  ``(seed, step)``: any step's meta batch can be recomputed on its own.
  """
  if batch_size > num_meta:
    raise ValueError(
        f"meta batch size {batch_size} exceeds the meta set ({num_meta} "
        "examples); sampling is without replacement, so lower the meta batch "
        "size or enlarge meta_per_class.")
  rng = _generator(seed, _META_STREAM, step)
  return rng.choice(num_meta, size=batch_size, replace=False)


def meta_batches(
    seed: int, num_meta: int, batch_size: int, start_step: int = 0
) -> Iterator[np.ndarray]:
  """Infinite stream ``meta_batch_indices(seed, step, ...)``, step = start.."""
  step = start_step
  while True:
    yield meta_batch_indices(seed, step, num_meta, batch_size)
    step += 1


def padded_batches(
    x: np.ndarray, y: np.ndarray, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Yields ``(x_batch, y_batch, mask)`` covering every example once, in order.

  The last batch is padded with zeros up to ``batch_size`` and its ``mask``
  (float32, 1 = real example, 0 = padding) marks the padding, so evaluation
  keeps static shapes (one compilation) and drops nothing: weight every
  per-example quantity by ``mask``.
  """
  if len(x) != len(y):
    raise ValueError(f"x has {len(x)} examples but y has {len(y)}.")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  n = len(x)
  for start in range(0, n, batch_size):
    xb, yb = x[start:start + batch_size], y[start:start + batch_size]
    real = len(xb)
    mask = np.zeros(batch_size, np.float32)
    mask[:real] = 1.0
    if real < batch_size:
      pad = batch_size - real
      xb = np.concatenate([xb, np.zeros((pad,) + xb.shape[1:], xb.dtype)])
      yb = np.concatenate([yb, np.zeros((pad,) + yb.shape[1:], yb.dtype)])
    yield xb, yb, mask


def class_balanced_indices(
    labels: np.ndarray, num_samples: int, seed: int, epoch: int = 0
) -> np.ndarray:
  """Class-balanced sampling: a class uniformly, then one of its examples.

  Each index is drawn by picking a class uniformly among the classes present
  in ``labels``, then an example of that class uniformly (with replacement),
  so every class is seen equally often in expectation (the sampler of cRT,
  Kang et al., ICLR 2020). Deterministic in ``(seed, epoch)``.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or labels.size == 0:
    raise ValueError(f"labels must be a non-empty 1-D array, got shape "
                     f"{labels.shape}.")
  rng = _generator(seed, _BALANCED_STREAM, epoch)
  order = np.argsort(labels, kind="stable")
  classes, first, sizes = np.unique(labels[order], return_index=True,
                                    return_counts=True)
  picked_class = rng.integers(classes.size, size=num_samples)
  offset = np.floor(rng.random(num_samples) * sizes[picked_class]).astype(
      np.int64)
  return order[first[picked_class] + offset]
