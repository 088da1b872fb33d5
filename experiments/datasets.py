"""The `Dataset` the training loop reads: in memory (`InMemoryDataset`) or streamed split lists.

Both implementations (this module and `experiments/streaming.py`) give:

  name, num_classes, class_counts [C], image_shape, num_train, num_meta, num_test
  steps_per_epoch                 full global batches per epoch
  shot_groups(many, few)          many/medium/few masks from the training counts
  summary()                       one line for the log
  info(many, few)                 the "data" block of results.json
  preprocessors                   (train, meta, eval) on-device `fn(rng, images) -> float32`
  steps_for(sampler)              global steps per epoch of a sampler (`Sampler`)
  train_batches(start, end, with_meta=, sampler=)
                                  yields (step, train batch, meta batch or None), this
                                  process's part of each global batch; `sampler` is a
                                  name ("instance", "class_balanced", "class_aware") or a
                                  `Sampler` (class-aware: samples per class, iterations
                                  per epoch)
  eval_batches(split)             "meta" (validation) or "test": this process's padded
                                  batches {"image", "label", "mask"}, covering the split once

Every batch is a pure function of (seed, epoch) or (seed, step), never of an
iterator carried along, so a run resumed at any step reads exactly what the
uninterrupted run read:
  * train batch b of epoch e: rows [b*B, (b+1)*B) of `sampling.epoch_order(sampler, ...)`
    (the last incomplete batch is dropped; `steps_for(sampler)` batches per epoch);
  * meta batch of step s: `batching.meta_batch_indices(seed, s, n_meta, B_meta)`.
`load(config, batch_size=...)` checks the config against the data and raises
`InvalidInputError` naming the setting to change.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import pickle
from typing import Callable, Iterator

import numpy as np

from dnet_jax import distributed
from dnet_jax.data import augment
from dnet_jax.data import batching
from dnet_jax.data import long_tail
from dnet_jax.data import public_cifar
from dnet_jax.data import sources
from experiments import reporting
from experiments import streaming
from experiments import validation
from experiments.errors import InvalidInputError
from experiments.sampling import (EVAL_SPLITS, SamplerLike, epoch_order, sampler_steps_per_epoch,
                                  steps_per_epoch)

# Published per-channel statistics (in [0, 1] units) by data set name.
_KNOWN_STATS = {
    "cifar10": (augment.CIFAR10_MEAN, augment.CIFAR10_STD),
    "cifar100": (augment.CIFAR100_MEAN, augment.CIFAR100_STD),
}


def normalization_stats(data: long_tail.LongTailedData, override: str = ""):
  """Per-channel (mean, std): `override`'s published values (e.g. "cifar100"), else the
  published values for CIFAR, else from the train set."""
  if override and override not in _KNOWN_STATS:
    raise InvalidInputError(f"Unknown normalize_stats {override!r}; choose '' or one of: "
                            f"{', '.join(_KNOWN_STATS)}.")
  if override or data.name in _KNOWN_STATS:
    mean, std = _KNOWN_STATS[override or data.name]
  else:
    mean, std = augment.channel_mean_std(data.x_train)
  return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def make_preprocessors(config, data: long_tail.LongTailedData):
  """(train, meta, eval) `fn(rng, uint8 images) -> float32`, run on the device."""
  mean, std = normalization_stats(data, str(config.get("normalize_stats", "") or ""))
  train = augment.make_preprocess(mean, std, augment=bool(config.augment),
                                  cutout_size=int(config.cutout_size))
  meta = augment.make_preprocess(mean, std, augment=bool(config.augment and config.augment_meta),
                                 cutout_size=int(config.cutout_size) if config.augment_meta else 0)
  return train, meta, augment.make_preprocess(mean, std, augment=False)


HOST_TRANSFORMS = ("", "public_cifar")


def make_host_transform(config) -> Callable[[np.ndarray, np.random.Generator], np.ndarray] | None:
  """The host (numpy) training transform `config.host_transform` names, or None.

  "public_cifar": the public CIFAR train transform (`public_cifar.public_train_transform`:
  double-padded crop + flip, AutoAugment CIFAR-10 policy, Cutout 16 with the image-mean
  fill; `cutout_public_typo` switches AA:266's `left = ... else top`), uint8 in and out;
  the device then only normalises (config.augment must be False).
  """
  name = str(config.get("host_transform", "") or "")
  if name not in HOST_TRANSFORMS:
    raise InvalidInputError(f"Unknown host_transform {name!r}; choose one of: "
                            f"{', '.join(repr(n) for n in HOST_TRANSFORMS)}.")
  if not name:
    return None
  if bool(config.augment):
    raise InvalidInputError(
        f"host_transform={name!r} already crops and flips on the host; set "
        "--config.augment=False (the device would augment a second time).")
  typo, size = bool(config.get("cutout_public_typo", True)), int(config.get("cutout_size", 16))
  if size < 1:
    raise InvalidInputError(f"host_transform={name!r} needs cutout_size >= 1 (the public "
                            f"recipe: 16), got {size}.")
  return functools.partial(public_cifar.public_train_transform, public_typo=typo,
                           cutout_size=size)


def _ordered_prefetch(fn: Callable, items, workers: int) -> Iterator:
  """`fn(item)` for each item, in order, computed by `workers` threads up to 2 x workers
  items ahead (0 workers: inline), overlapping the host transform with the device step.
  The public CIFAR transform spends its time in numpy, scipy.ndimage and PIL calls that
  run without the GIL, so threads add throughput up to the number of cores."""
  if workers <= 0:
    yield from (fn(item) for item in items)
    return
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    pending = collections.deque()
    for item in items:
      pending.append(pool.submit(fn, item))
      if len(pending) >= 2 * workers:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


class InMemoryDataset:
  """A `LongTailedData` (uint8 arrays on the host) read in global batches, cut per process.

  `host_transform(uint8 images, numpy Generator) -> uint8 images`, if given, is
  applied to every training batch (not to meta or evaluation batches) with the
  generator `public_cifar.transform_rng(seed, epoch, index in epoch)`, so a batch
  stays a pure function of (seed, epoch, index) and a resumed run reads the same
  pixels; `host_workers` threads compute batches ahead of the loop.
  """

  def __init__(self, data: long_tail.LongTailedData, *, batch_size: int, meta_batch_size: int,
               eval_batch_size: int, seed: int, preprocessors, host_transform=None,
               host_workers: int = 0):
    self.data = data
    self.name, self.num_classes = data.name, data.num_classes
    self.class_counts = np.asarray(data.class_counts)
    self.image_shape = tuple(data.x_train.shape[1:])
    self.num_train, self.num_meta, self.num_test = (len(data.y_train), len(data.y_meta),
                                                    len(data.y_test))
    self.batch_size, self.meta_batch_size = batch_size, meta_batch_size
    self.eval_batch_size, self.seed = eval_batch_size, seed
    self.steps_per_epoch = steps_per_epoch(self.num_train, batch_size)
    self.preprocessors = preprocessors
    self.host_transform, self.host_workers = host_transform, int(host_workers)

  def shot_groups(self, many_threshold: int = 100, few_threshold: int = 20):
    return long_tail.shot_groups(self.class_counts, many_threshold, few_threshold)

  def summary(self) -> str:
    return self.data.summary()

  def info(self, many_threshold: int, few_threshold: int) -> dict:
    return reporting.data_info(self, many_threshold, few_threshold)

  def steps_for(self, sampler: SamplerLike) -> int:
    """Global steps per epoch of `sampler` (`sampler_steps_per_epoch`)."""
    return sampler_steps_per_epoch(sampler, self.data.y_train, self.batch_size, self.num_classes)

  def train_batches(self, start_step: int, end_step: int, *, with_meta: bool,
                    sampler: SamplerLike = "instance") -> Iterator[tuple[int, dict, dict | None]]:
    per_epoch = self.steps_for(sampler)
    orders = {}

    def batch_at(step: int):
      d = self.data
      epoch, index = divmod(step, per_epoch)
      if epoch not in orders:  # at most two epochs in flight
        orders.pop(epoch - 2, None)
        orders[epoch] = epoch_order(sampler, d.y_train, self.seed, epoch,
                                    per_epoch * self.batch_size)
      idx = orders[epoch][index * self.batch_size:(index + 1) * self.batch_size]
      images = d.x_train[idx]
      if self.host_transform is not None:
        images = self.host_transform(images, public_cifar.transform_rng(self.seed, epoch, index))
      meta = None
      if with_meta:
        midx = batching.meta_batch_indices(self.seed, step, self.num_meta, self.meta_batch_size)
        meta = distributed.global_batch_to_local({"image": d.x_meta[midx],
                                                  "label": d.y_meta[midx]})
      return step, distributed.global_batch_to_local({"image": images, "label": d.y_train[idx]}), meta

    # The epoch orders are computed in order on this thread before a worker needs them.
    def ordered_steps():
      for step in range(start_step, end_step):
        epoch = step // per_epoch
        if epoch not in orders:
          orders.pop(epoch - 2, None)
          orders[epoch] = epoch_order(sampler, self.data.y_train, self.seed, epoch,
                                      per_epoch * self.batch_size)
        yield step

    workers = self.host_workers if self.host_transform is not None else 0
    yield from _ordered_prefetch(batch_at, ordered_steps(), workers)

  def eval_batches(self, split: str) -> Iterator[dict]:
    if split not in EVAL_SPLITS:
      raise ValueError(f"split must be one of {EVAL_SPLITS}, got {split!r}.")
    x, y = (self.data.x_meta, self.data.y_meta) if split == "meta" else (self.data.x_test,
                                                                         self.data.y_test)
    for xb, yb, mask in batching.padded_batches(x, y, self.eval_batch_size):
      yield distributed.global_batch_to_local(
          {"image": xb, "label": yb.astype(np.int32), "mask": mask})


def _load_arrays(config) -> long_tail.LongTailedData:
  """`sources.load_long_tailed` with the config's fields; errors name the data set."""
  d = config.data
  where = f" in {d.data_dir!r}" if d.get("data_dir") else ""
  try:
    return sources.load_long_tailed(
        d.source, name=d.get("name"), data_dir=d.get("data_dir") or None,
        imbalance_factor=d.get("imbalance_factor"), meta_per_class=d.get("meta_per_class"),
        seed=int(d.get("seed", 0)), n_max=int(d.get("n_max", 0) or 0) or None,
        protocol=d.get("protocol", "public"),
        digits_test_per_class=int(d.get("digits_test_per_class", 50)))
  except (ValueError, OSError, pickle.UnpicklingError) as e:
    raise InvalidInputError(f"Data set {d.name!r} (source {d.source!r}{where}): {e}") from e


def check_arrays(data: long_tail.LongTailedData, config, *, batch_size: int,
                 meta_batch_size: int | None) -> None:
  """What the loaded arrays must satisfy for this config; raises InvalidInputError."""
  for name in ("train", "meta", "test"):
    validation.check_images(getattr(data, f"x_{name}"), config.model, f"{name} images")
  if len(data.y_test) == 0:
    raise InvalidInputError("The test set is empty; the run would have nothing to report.")
  steps_per_epoch(len(data.y_train), batch_size)
  try:
    data.shot_groups(int(config.many_threshold), int(config.few_threshold))
  except ValueError as e:
    raise InvalidInputError(str(e)) from e
  if meta_batch_size and meta_batch_size > len(data.y_meta):
    raise InvalidInputError(
        f"meta_batch_size={meta_batch_size} exceeds the meta set ({len(data.y_meta)} "
        "images); lower it or raise data.meta_per_class.")


def load(config, *, batch_size: int | None = None, with_meta: bool | None = None):
  """The dataset `config.data` describes, read in global batches of `batch_size`
  (default `config.batch_size`); meta batches of `config.meta_batch_size` if `with_meta`
  (default: the config's method uses them)."""
  from experiments import methods  # pylint: disable=g-import-not-at-top

  batch_size = int(config.batch_size) if batch_size is None else int(batch_size)
  if with_meta is None:
    with_meta = config.method in methods.DNET_METHODS
  meta_batch_size = int(config.meta_batch_size) if with_meta else 0
  if streaming.is_streaming(config):
    return streaming.load(config, batch_size=batch_size, with_meta=with_meta)
  data = _load_arrays(config)
  check_arrays(data, config, batch_size=batch_size, meta_batch_size=meta_batch_size)
  host_transform = make_host_transform(config)
  if (int(config.get("stage", 1)) == 2
      and str(config.stage2.get("train_transform", "stage1")) == "test"):
    host_transform = None
  return InMemoryDataset(data, batch_size=batch_size, meta_batch_size=meta_batch_size,
                         eval_batch_size=int(config.eval_batch_size), seed=int(config.seed),
                         preprocessors=make_preprocessors(config, data),
                         host_transform=host_transform,
                         host_workers=int(config.get("host_workers", 0)))
