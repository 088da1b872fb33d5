"""Host-side input pipeline: data set, normalisation statistics, deterministic batches.

Images stay uint8 on the host and travel to the devices as uint8; the
normalisation and augmentation run on the device inside the compiled step
(`dnet_jax.data.augment.make_preprocess`).

Every batch is a pure function of integers, never of a generator carried
along, so a run resumed at any step sees exactly the batches it would have
seen:
  * train batch b of epoch e: `epoch_permutation(seed, e, n)[b*B:(b+1)*B]`
    (the last incomplete batch is dropped);
  * the meta batch of global step s: `meta_batch_indices(seed, s, n_meta, B_meta)`.
"""

from __future__ import annotations

import collections
import itertools
from typing import Iterable, Iterator

import numpy as np

from dnet_jax.data import augment
from dnet_jax.data import batching
from dnet_jax.data import long_tail
from dnet_jax.data import sources

# Published per-channel statistics (in [0, 1] units) by data set name.
_KNOWN_STATS = {
    "cifar10": (augment.CIFAR10_MEAN, augment.CIFAR10_STD),
    "cifar100": (augment.CIFAR100_MEAN, augment.CIFAR100_STD),
}


def load_data(config) -> long_tail.LongTailedData:
  """The long-tailed train, balanced meta and test sets that `config.data` describes."""
  return sources.load_long_tailed(config.data)


def normalization_stats(data: long_tail.LongTailedData) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel (mean, std): the published values for CIFAR, else from the train set."""
  if data.name in _KNOWN_STATS:
    mean, std = _KNOWN_STATS[data.name]
  else:
    mean, std = augment.channel_mean_std(data.x_train)
  return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def make_preprocessors(config, data):
  """(train_preprocess, eval_preprocess): `fn(rng, uint8 images) -> float32` on device."""
  mean, std = normalization_stats(data)
  train = augment.make_preprocess(mean, std, augment=bool(config.augment),
                                  cutout_size=int(config.cutout_size))
  meta = augment.make_preprocess(mean, std, augment=bool(config.augment and config.augment_meta),
                                 cutout_size=int(config.cutout_size) if config.augment_meta else 0)
  evaluate = augment.make_preprocess(mean, std, augment=False)
  return train, meta, evaluate


def steps_per_epoch(num_train: int, batch_size: int) -> int:
  """Full batches per epoch (the last incomplete one is dropped)."""
  if batch_size > num_train:
    raise ValueError(
        f"batch_size {batch_size} is larger than the {num_train} training images, so an "
        "epoch would have no full batch; lower batch_size.")
  return num_train // batch_size


def train_batch(data: long_tail.LongTailedData, *, seed: int, epoch: int, index: int,
                batch_size: int, permutation: np.ndarray | None = None) -> dict:
  """Train batch `index` of `epoch`: {"image": uint8 [B, H, W, C], "label": int32 [B]}."""
  if permutation is None:
    permutation = batching.epoch_permutation(seed, epoch, len(data.y_train))
  idx = permutation[index * batch_size:(index + 1) * batch_size]
  return {"image": data.x_train[idx], "label": data.y_train[idx]}


def meta_batch(data: long_tail.LongTailedData, *, seed: int, step: int, batch_size: int) -> dict:
  """The meta batch of global step `step`, drawn from the meta set without replacement."""
  idx = batching.meta_batch_indices(seed, step, len(data.y_meta), batch_size)
  return {"image": data.x_meta[idx], "label": data.y_meta[idx]}


def train_stream(data: long_tail.LongTailedData, *, seed: int, start_step: int, end_step: int,
                 batch_size: int, meta_batch_size: int | None) -> Iterator[tuple[int, dict, dict | None]]:
  """Yields (step, train_batch, meta_batch or None) for steps start_step .. end_step - 1."""
  per_epoch = steps_per_epoch(len(data.y_train), batch_size)
  permutation, perm_epoch = None, None
  for step in range(start_step, end_step):
    epoch, index = divmod(step, per_epoch)
    if epoch != perm_epoch:
      permutation = batching.epoch_permutation(seed, epoch, len(data.y_train))
      perm_epoch = epoch
    batch = train_batch(data, seed=seed, epoch=epoch, index=index, batch_size=batch_size,
                        permutation=permutation)
    meta = (meta_batch(data, seed=seed, step=step, batch_size=meta_batch_size)
            if meta_batch_size else None)
    yield step, batch, meta


def eval_batches(x: np.ndarray, y: np.ndarray, batch_size: int) -> Iterator[dict]:
  """Padded batches covering every example once: {"image", "label", "mask"}."""
  for xb, yb, mask in batching.padded_batches(x, y, batch_size):
    yield {"image": xb, "label": yb.astype(np.int32), "mask": mask}


def prefetch_to_device(iterator: Iterable, size: int, put_fn) -> Iterator:
  """Applies `put_fn` (which places an element on the devices) `size` elements ahead.

  `jax.device_put` is asynchronous, so the next batches are copied while the
  current step runs. Order and content are unchanged (no threads).
  """
  queue = collections.deque()

  def enqueue(n):
    for item in itertools.islice(iterator, n):
      queue.append(put_fn(item))

  enqueue(size)
  while queue:
    yield queue.popleft()
    enqueue(1)
