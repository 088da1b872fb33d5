"""Streamed datasets: ImageNet-LT, Places-LT and any "split list + image root" set.

For `config.data.source` in `SOURCES`, `load` returns a `StreamedDataset`
(the `Dataset` interface of experiments/datasets.py) whose batches tf.data
decodes, crops, flips and normalises from disk (`dnet_jax.data.split_lists`,
`dnet_jax.data.imagenet_lt`): memory is a few batches in flight plus the lists.
Each process reads only its rows of every global batch.

Source "split_list" (ImageNet-LT and Places-LT with the OLTR lists of Liu et
al., CVPR 2019): batches are pure functions of the seed and the epoch or step,
the same in every process, so they do not depend on the number of processes:
  * train batch b of epoch e: rows [b*B, (b+1)*B) of `sampling.epoch_order`;
    process p of P reads rows [p*B/P, (p+1)*B/P) of it;
  * the meta batch of step s: `meta_batch_indices(seed, s, n_meta, B_meta)` of the
    validation list, process p reading its block;
  * crops and flips: stateless TF ops seeded per example by (seed, epoch, list index)
    for training and (seed, step, list index) for meta batches.
Source "imagenet_lt" (TFDS records) reads sequentially: each process takes its
`tfds.split_for_jax_process` part, shuffled per (seed, epoch).

Transforms: training by `data.train_augment` (`split_lists.train_transform`):
"crop_flip" (torchvision's ImageNet recipe: random-resized crop + horizontal
flip), "public_imagenet" (+ reflect padding first, ColorJitter(0.4, 0.4, 0.4)
and RandAugment rand-n2-m10-mstd0.5 after the flip: the public Difficulty-Net
ImageNet-LT chain) or "public_places" (the same without RandAugment), all
seeded per example as above; on when `config.augment`, and for meta batches
when also `config.augment_meta` (otherwise they get the test transform, as in
the public code). Evaluation: resize to `data.resize_size` and centre crop
`data.image_size`. ImageNet mean/std normalisation. `data.meta_per_class` > 0
keeps that many images per class of the meta (validation) list, drawn with
`data.seed` (`split_lists.per_class_subset`), for both meta batches and the
validation accuracy.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging as py_logging
import os
from typing import Any, Iterator

import jax
import numpy as np
from absl import logging

from dnet_jax.data import batching
from dnet_jax.data import split_lists
from dnet_jax.data import long_tail
from experiments import methods
from experiments import reporting
from experiments import sampling
from experiments import validation
from experiments.errors import InvalidInputError

SOURCES = ("split_list", "imagenet_lt")
EVAL_SPLITS = ("meta", "test")

# Stream tag of the meta batches' augmentation seeds (the training crops use split_lists's).
_META_AUGMENT_STREAM = 21


def is_streaming(config) -> bool:
  """True if `config.data.source` is streamed from disk rather than loaded into memory."""
  return config.data.source in SOURCES


def _identity(rng, images):
  del rng
  return images


def _get(cfg, key: str, default: Any) -> Any:
  value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
  return default if value is None else value


# ---------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class _ReadPlan:
  """How this process reads: its part of each global batch, the seed, the transforms."""
  process_index: int
  process_count: int
  batch_size: int  # global
  meta_batch_size: int  # global
  eval_batch_size: int  # global
  seed: int
  augment: bool
  augment_meta: bool
  train_augment: str  # the training transform (split_lists.TRAIN_AUGMENTS)
  image_size: int
  resize_size: int
  num_parallel_calls: int | None
  prefetch: int

  def local(self, global_size: int) -> int:
    return global_size // self.process_count

  def rows(self, global_size: int) -> slice:
    """This process's rows of a global batch."""
    size = self.local(global_size)
    return slice(self.process_index * size, (self.process_index + 1) * size)

  def transform(self) -> dict:
    return dict(image_size=self.image_size, resize_size=self.resize_size,
                num_parallel_calls=self.num_parallel_calls, prefetch=self.prefetch)


class _SplitListSource:
  """Train / meta (validation) / test split lists under one image root."""

  def __init__(self, shape: _ReadPlan, image_root: str, train: split_lists.SplitList,
               meta: split_lists.SplitList, test: split_lists.SplitList):
    self.shape, self.image_root = shape, image_root
    self.splits = {"train": train, "meta": meta, "test": test}
    self.steps_per_epoch = len(train) // shape.batch_size

  def train_batches(self, epoch: int, first: int, last: int, sampler,
                    per_epoch: int | None = None) -> Iterator[dict]:
    """Local parts of train batches first..last-1 of `epoch` (`per_epoch` steps per epoch)."""
    s = self.shape
    per_epoch = self.steps_per_epoch if per_epoch is None else per_epoch
    order = sampling.epoch_order(sampler, self.splits["train"].labels, s.seed, epoch,
                                 per_epoch * s.batch_size)
    rows = order[first * s.batch_size:last * s.batch_size].reshape(last - first, s.batch_size)
    indices = rows[:, s.rows(s.batch_size)].reshape(-1)
    ds = split_lists.examples_dataset(
        self.splits["train"], self.image_root, indices,
        split_lists.augmentation_seeds(s.seed, epoch, indices),
        batch_size=s.local(s.batch_size), train=s.augment, augment=s.train_augment,
        **s.transform())
    return ds.as_numpy_iterator()

  def meta_batches(self, epoch: int, first_step: int, last_step: int) -> Iterator[dict]:
    """Local parts of the meta batches of global steps first_step..last_step-1."""
    del epoch  # meta batches are drawn per step
    s = self.shape
    num_meta = len(self.splits["meta"])
    steps = range(first_step, last_step)
    indices = np.concatenate([
        batching.meta_batch_indices(s.seed, step, num_meta, s.meta_batch_size)[
            s.rows(s.meta_batch_size)] for step in steps]).astype(np.int64)
    bases = np.repeat([meta_augmentation_seed(s.seed, step) for step in steps],
                      s.local(s.meta_batch_size))
    seeds = np.stack([bases.astype(np.int64), indices], axis=1)
    ds = split_lists.examples_dataset(
        self.splits["meta"], self.image_root, indices, seeds,
        batch_size=s.local(s.meta_batch_size), train=s.augment_meta, augment=s.train_augment,
        **s.transform())
    return ds.as_numpy_iterator()

  def eval_batches(self, split: str) -> Iterator[dict]:
    s = self.shape
    examples = self.splits[split]
    indices, mask = split_lists.shard_indices(
        len(examples), s.local(s.eval_batch_size), train=False, process_index=s.process_index,
        process_count=s.process_count)
    ds = split_lists.examples_dataset(
        examples, self.image_root, indices, np.zeros((len(indices), 2), np.int64),
        batch_size=s.local(s.eval_batch_size), train=False, mask=mask, **s.transform())
    return ds.as_numpy_iterator()


class _TfdsImageNetLTSource:
  """TFDS `imagenet_lt`: train, validation (the meta set) and test splits."""

  _SPLITS = {"train": "train", "meta": "validation", "test": "test"}

  def __init__(self, shape: _ReadPlan, data_dir: str, shuffle_buffer: int, num_train: int):
    self.shape, self.data_dir, self.shuffle_buffer = shape, data_dir, shuffle_buffer
    per_process = num_train // shape.process_count
    self.steps_per_epoch = per_process // shape.local(shape.batch_size)

  def _common(self) -> dict:
    s = self.shape
    return dict(process_index=s.process_index, process_count=s.process_count,
                train_augment=s.train_augment, **s.transform())

  def train_batches(self, epoch: int, first: int, last: int, sampler,
                    per_epoch: int | None = None) -> Iterator[dict]:
    from dnet_jax.data import imagenet_lt  # pylint: disable=g-import-not-at-top

    del per_epoch  # the TFDS stream has its own epoch
    sampler = sampling.as_sampler(sampler).name
    if sampler != "instance":
      raise InvalidInputError(f"data.source='imagenet_lt' (TFDS records, read in order) has no "
                              f"{sampler!r} sampler; use data.source='split_list' with the "
                              "ImageNet-LT lists.")
    s = self.shape
    ds = imagenet_lt.make_dataset(
        "train", self.data_dir, batch_size=s.local(s.batch_size), train=True, seed=s.seed,
        epoch=epoch, flip=s.augment, shuffle_buffer=self.shuffle_buffer, skip_batches=first,
        **self._common())
    return ds.take(last - first).as_numpy_iterator()

  def meta_batches(self, epoch: int, first_step: int, last_step: int) -> Iterator[dict]:
    from dnet_jax.data import imagenet_lt  # pylint: disable=g-import-not-at-top

    s = self.shape
    first = first_step - epoch * self.steps_per_epoch
    ds = imagenet_lt.meta_dataset(
        self.data_dir, batch_size=s.local(s.meta_batch_size), num_batches=self.steps_per_epoch,
        seed=s.seed, epoch=epoch, skip_batches=first, augment=s.augment_meta,
        shuffle_buffer=self.shuffle_buffer, **self._common())
    return ds.take(last_step - first_step).as_numpy_iterator()

  def eval_batches(self, split: str) -> Iterator[dict]:
    from dnet_jax.data import imagenet_lt  # pylint: disable=g-import-not-at-top

    s = self.shape
    return imagenet_lt.batches(self._SPLITS[split], self.data_dir,
                               batch_size=s.local(s.eval_batch_size), train=False,
                               **self._common())


def meta_augmentation_seed(seed: int, step: int) -> int:
  """Base of the stateless crop/flip seeds of the meta batch of `step` (same in every process)."""
  return int(np.random.default_rng([int(seed), _META_AUGMENT_STREAM, int(step)])
             .integers(2**31 - 1))


# ---------------------------------------------------------------------------- the data object


@dataclasses.dataclass(frozen=True, eq=False)
class StreamedDataset:
  """A `Dataset` (experiments/datasets.py) read from disk by tf.data.

  Attributes:
    name: data set name (results, logs).
    num_classes: C.
    class_counts: int64 [C] training images per class (shot groups, Balanced Softmax prior).
    image_shape: (S, S, 3) of the float32 images the model receives.
    num_train, num_meta, num_test: examples in the three splits.
    steps_per_epoch: global training steps per epoch (full global batches).
    source: the reader of the files (split lists or TFDS).
  """
  name: str
  num_classes: int
  class_counts: np.ndarray
  image_shape: tuple[int, int, int]
  num_train: int
  num_meta: int
  num_test: int
  steps_per_epoch: int
  source: Any
  # tf.data crops, flips and normalises: nothing is left to do on the device.
  preprocessors: tuple = (_identity, _identity, _identity)

  def shot_groups(self, many_threshold: int = 100,
                  few_threshold: int = 20) -> dict[str, np.ndarray]:
    """Many/medium/few-shot masks from the training counts (`long_tail.shot_groups`)."""
    return long_tail.shot_groups(self.class_counts, many_threshold, few_threshold)

  def summary(self) -> str:
    counts = self.class_counts
    return (f"{self.name} (streamed): {self.num_classes} classes, train {self.num_train} "
            f"(per class {counts.max()}..{counts.min()}, ratio "
            f"{counts.max() / max(counts.min(), 1):.1f}), meta {self.num_meta}, "
            f"test {self.num_test}, image {self.image_shape}, {self.steps_per_epoch} steps "
            "per epoch")

  def info(self, many_threshold: int, few_threshold: int) -> dict:
    return reporting.data_info(self, many_threshold, few_threshold)

  def steps_for(self, sampler) -> int:
    """Global steps per epoch of `sampler` (`sampling.sampler_steps_per_epoch`)."""
    sampler = sampling.as_sampler(sampler)
    if sampler.name == "instance" and not sampler.iterations_per_epoch:
      return self.steps_per_epoch
    labels = getattr(self.source, "splits", {}).get("train")
    if labels is None:
      raise InvalidInputError(
          f"The {sampler.name} sampler needs the training labels of a split list; this "
          f"{self.name} source reads a shuffled stream. Use data.source='split_list'.")
    return sampling.sampler_steps_per_epoch(sampler, labels.labels,
                                            self.source.shape.batch_size, self.num_classes)

  def train_batches(self, start_step: int, end_step: int, *, with_meta: bool,
                    sampler="instance") -> Iterator[tuple[int, dict, dict | None]]:
    """Yields (step, local train batch, local meta batch or None) for start_step..end_step-1.

    One tf.data pipeline per epoch (or the part of it the run covers), so a
    resumed run starts reading at its step without decoding what it skips.
    """
    per_epoch = self.steps_for(sampler)
    for epoch in range(start_step // per_epoch, -(-end_step // per_epoch)):
      lo, hi = max(start_step, epoch * per_epoch), min(end_step, (epoch + 1) * per_epoch)
      if lo >= hi:
        continue
      train = self.source.train_batches(epoch, lo - epoch * per_epoch, hi - epoch * per_epoch,
                                        sampler, per_epoch)
      meta = (self.source.meta_batches(epoch, lo, hi) if with_meta
              else itertools.repeat(None))
      count = 0
      for step, batch, meta_batch in zip(range(lo, hi), train, meta):
        count += 1
        yield step, batch, meta_batch
      if count != hi - lo:  # a reader that ran dry would otherwise end the run silently
        raise RuntimeError(f"The {self.name} stream of epoch {epoch} gave {count} batches "
                           f"instead of {hi - lo}.")

  def eval_batches(self, split: str) -> Iterator[dict]:
    """This process's padded batches of `split` ("meta" = validation, or "test")."""
    if split not in sampling.EVAL_SPLITS:
      raise ValueError(f"split must be one of {sampling.EVAL_SPLITS}, got {split!r}.")
    return self.source.eval_batches(split)


# ---------------------------------------------------------------------------- loading


def _read_plan(config, batch_size: int, process_index: int, process_count: int) -> _ReadPlan:
  data = config.data
  threads = int(_get(data, "decode_threads", 0))
  return _ReadPlan(
      process_index=process_index, process_count=process_count,
      batch_size=batch_size, meta_batch_size=int(config.meta_batch_size),
      eval_batch_size=int(config.eval_batch_size), seed=int(config.seed),
      augment=bool(config.augment), augment_meta=bool(config.augment and config.augment_meta),
      train_augment=str(_get(data, "train_augment", "crop_flip")),
      image_size=int(_get(data, "image_size", 224)),
      resize_size=int(_get(data, "resize_size", 256)),
      num_parallel_calls=threads if threads > 0 else None,
      prefetch=int(_get(data, "prefetch_batches", 2)))


def _resolve(path: str, image_root: str) -> str:
  """A list path as given, or relative to the image root if it is not found as given."""
  if not path or os.path.isabs(path) or os.path.exists(path):
    return path
  candidate = os.path.join(image_root, path)
  return candidate if os.path.exists(candidate) else path


def _read_lists(config) -> tuple[str, dict[str, split_lists.SplitList]]:
  data = config.data
  image_root = str(_get(data, "image_root", ""))
  fields = {"train": "train_list", "meta": "meta_list", "test": "test_list"}
  missing = [f"data.{f}" for f in (["image_root"] if not image_root else [])
             + [fields[k] for k in fields if not _get(data, fields[k], "")]]
  if missing:
    raise InvalidInputError(
        f"data.source='split_list' needs {', '.join(missing)}: the directory the images are "
        "in and the three split lists ('relative/path.jpg label' per line; ImageNet-LT and "
        "Places-LT: the OLTR lists, see experiments/configs/imagenet_lt.py).")
  num_classes = int(_get(data, "num_classes", 0)) or None
  check = bool(_get(data, "check_files", True))
  splits = {}
  for split, field in fields.items():
    path = _resolve(str(data[field]), image_root)
    splits[split] = split_lists.read_split_list(path, num_classes,
                                                 image_root=image_root if check else None)
  if num_classes is None:  # inferred: the largest label of any list
    num_classes = max(s.num_classes for s in splits.values())
    splits = {k: dataclasses.replace(s, num_classes=num_classes) for k, s in splits.items()}
  per_class = int(_get(data, "meta_per_class", 0))
  if per_class > 0:  # the public code's 10 random validation images per class
    # (ImageNet_Places-LT/datasets/imagenet.py:177)
    splits["meta"] = split_lists.per_class_subset(splits["meta"], per_class,
                                                  int(_get(data, "seed", 0)))
  return image_root, splits


def _check_every_class(counts: np.ndarray, what: str, path: str) -> None:
  empty = np.flatnonzero(counts == 0)
  if empty.size:
    listed = ", ".join(str(c) for c in empty[:10]) + (", ..." if empty.size > 10 else "")
    raise InvalidInputError(
        f"{path}: {empty.size} class(es) have no {what} example ({listed}); every class "
        f"needs at least one (set data.num_classes to the number of classes the lists use).")


def load(config, *, batch_size: int | None = None, with_meta: bool | None = None,
         process_index: int | None = None, process_count: int | None = None) -> StreamedDataset:
  """The streamed data set that `config.data` describes (this process's view).

  Reads the split lists (checking every line, label and, with
  `data.check_files`, that every image exists), or the TFDS metadata, and
  checks the batch sizes against the sets. Decodes no image.

  Raises:
    InvalidInputError: with the setting or the file and line to fix.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  data = config.data
  batch_size = int(config.batch_size) if batch_size is None else int(batch_size)
  uses_meta = _uses_meta(config) if with_meta is None else with_meta
  shape = _read_plan(config, batch_size, process_index, process_count)
  batch_sizes = {"batch_size": batch_size, "meta_batch_size": int(config.meta_batch_size),
                 "eval_batch_size": int(config.eval_batch_size)}
  for field, value in batch_sizes.items():
    if value % process_count:
      raise InvalidInputError(f"{field}={value} is not divisible by the "
                              f"{process_count} processes.")
  _check_image_size(config, shape)
  try:
    if data.source == "split_list":
      image_root, splits = _read_lists(config)
      counts = splits["train"].class_counts()
      _check_every_class(counts, "training", splits["train"].list_path)
      _check_every_class(splits["meta"].class_counts(), "meta (validation)",
                         splits["meta"].list_path)
      source = _SplitListSource(shape, image_root, splits["train"], splits["meta"],
                                splits["test"])
      sizes = {k: len(v) for k, v in splits.items()}
      num_classes = splits["train"].num_classes
    elif data.source == "imagenet_lt":
      counts, sizes, source = _load_tfds(config, shape)
      num_classes = len(counts)
    else:
      raise InvalidInputError(f"data.source {data.source!r} is not streamed; use one of "
                              f"{SOURCES}.")
  except (ValueError, OSError) as e:
    if isinstance(e, InvalidInputError):
      raise
    raise InvalidInputError(f"Data set {data.name!r} (source {data.source!r}): {e}") from e

  if source.steps_per_epoch < 1:
    raise InvalidInputError(
        f"batch_size={batch_size} is larger than the {sizes['train']} training images "
        f"(over {process_count} process(es)), so an epoch would have no full batch; lower it.")
  if uses_meta and int(config.meta_batch_size) > sizes["meta"]:
    raise InvalidInputError(
        f"meta_batch_size={config.meta_batch_size} exceeds the meta (validation) set "
        f"({sizes['meta']} images); lower it.")
  result = StreamedDataset(
      name=str(data.name), num_classes=int(num_classes), class_counts=np.asarray(counts, np.int64),
      image_shape=(shape.image_size, shape.image_size, 3), num_train=sizes["train"],
      num_meta=sizes["meta"], num_test=sizes["test"], steps_per_epoch=source.steps_per_epoch,
      source=source)
  try:
    result.shot_groups(int(config.many_threshold), int(config.few_threshold))
  except ValueError as e:
    raise InvalidInputError(str(e)) from e
  _quiet_tensorflow()
  return result


def _uses_meta(config) -> bool:
  return config.method in methods.DNET_METHODS


def _check_image_size(config, shape: _ReadPlan) -> None:
  spec = validation.MODEL_INPUTS.get(config.model)
  if shape.image_size < 1 or shape.resize_size < shape.image_size:
    raise InvalidInputError(
        f"data.image_size={shape.image_size} and data.resize_size={shape.resize_size}: the "
        "evaluation crop must fit in the resized image (ImageNet: 224 and 256).")
  if spec is not None and shape.image_size < spec.min_size:
    raise InvalidInputError(f"data.image_size={shape.image_size} is too small for "
                            f"model={config.model!r}: {spec.description}.")


def _load_tfds(config, shape: _ReadPlan):
  from dnet_jax.data import imagenet_lt  # pylint: disable=g-import-not-at-top

  data = config.data
  data_dir = str(_get(data, "data_dir", ""))
  if not data_dir:
    raise InvalidInputError("data.source='imagenet_lt' needs data.data_dir, the TFDS data "
                            "directory in which imagenet_lt was prepared.")
  sizes = {split: imagenet_lt.num_examples(tfds_split, data_dir)
           for split, tfds_split in _TfdsImageNetLTSource._SPLITS.items()}  # pylint: disable=protected-access
  train_list = str(_get(data, "train_list", ""))
  if train_list:
    counts = imagenet_lt.class_counts(split_list=train_list)
  else:
    logging.warning("Counting the labels of the imagenet_lt train split (a full pass over "
                    "its records; set data.train_list to ImageNet_LT_train.txt to skip it).")
    counts = imagenet_lt.class_counts(data_dir)
  if int(counts.sum()) != sizes["train"]:
    raise InvalidInputError(f"data.train_list {train_list!r} has {int(counts.sum())} examples "
                            f"but the TFDS train split has {sizes['train']}.")
  source = _TfdsImageNetLTSource(shape, data_dir, int(_get(data, "shuffle_buffer", 2048)),
                                 sizes["train"])
  return counts, sizes, source


def _quiet_tensorflow() -> None:
  """TensorFlow's C++ INFO lines would flood the log of every process."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  py_logging.getLogger("tensorflow").setLevel(py_logging.WARNING)
