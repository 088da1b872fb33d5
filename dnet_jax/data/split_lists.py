"""Streaming input pipeline for "split list + image root" data (Places-LT, ImageNet-LT).

A split list (OLTR, Liu et al. CVPR 2019: `Places_LT_train.txt`,
`ImageNet_LT_val.txt`, ...) has one example per line,

    relative/path/to/image.jpg <label>

with labels in [0, C) and paths relative to an image root. `read_split_list`
parses such a file (a malformed line, a label out of range or a missing image
is an error naming the file and line number) and `class_counts` gives the
per-class training counts (for `long_tail.shot_groups` and Balanced Softmax).
`make_dataset` streams decoded, augmented, normalised batches.

Why tf.data. The pipeline decodes and resizes ~100k JPEGs per epoch, so the
work must run in parallel native threads, outside the Python GIL and the
accelerator's host loop. tf.data (installed with TFDS) does that in C++ with
bounded buffers: `map(num_parallel_calls=...)` over files, `batch`, and a
fixed-depth `prefetch`; memory is at most a few batches in flight plus the
file-name list, whatever the data set size. Its decoders handle the JPEG/PNG
oddities of ImageNet (CMYK, PNG files named .JPEG) via `decode_image`. Grain
was the alternative: it gives checkpointable iterators, but its image ops are
Python (PIL/numpy) in worker processes, and it is not installed. We get the
property Grain would give, exact resumability, differently: the example order
comes from `dnet_jax.data.batching.epoch_permutation(seed, epoch, n)` (numpy,
the same in every process) and every random crop and flip is a *stateless*
TF op seeded by (seed, epoch, example index) (crops, flips, ColorJitter and
RandAugment draws alike), so an epoch is a pure function
of (seed, epoch) -- independent of thread scheduling, of the number of
processes, and of where a resumed run restarts. TensorFlow is imported
lazily (the list parsing needs only numpy) and never sees a GPU.

Per-process sharding (multi-host). All processes draw the same permutation
of the whole list; process p of P takes a contiguous block of it
(`dnet_jax.distributed.process_shard`). For training every process takes
exactly `n // P` examples, so all processes run the same number of steps
(the `n % P` left over differ every epoch). For evaluation the blocks cover
the list once, each padded to the same number of full batches with examples
whose `mask` is 0 (`dnet_jax.steps.eval_step` ignores them).

Transforms (torchvision's ImageNet recipe, as used by OLTR / Decoupling /
Difficulty-Net):
  train: by name (`train_transform`): "crop_flip" = random-resized crop (area
         8%..100% of the image, aspect ratio 3/4..4/3, as `RandomResizedCrop`),
         resize to `image_size`, random horizontal flip; "public_imagenet" /
         "public_places" = the public Difficulty-Net chains (reflect padding,
         ColorJitter, RandAugment for ImageNet-LT; `color_randaugment`);
  eval:  resize the shorter side to `resize_size` (256), centre crop
         `image_size` (224);
  both:  scale to [0, 1], subtract `mean` and divide by `std` (ImageNet's).
A dataset maps the decode and transform per example and, after `batch()`, the
normalisation per batch; with "public_imagenet" the RandAugment stage runs there too,
per batch, on each example's own draws (`examples_dataset`).
Batches are dicts of numpy arrays: "image" float32 [B, H, W, 3], "label"
int32 [B], and for evaluation "mask" float32 [B].
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator, Sequence

import numpy as np

from dnet_jax.data.batching import epoch_permutation
from dnet_jax.data.tf_images import decode_image, random_resized_crop, resize_center_crop
from dnet_jax.data.tf_images import tf_module

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Stream tag for the augmentation seeds (the order uses batching's own streams).
_AUGMENT_STREAM = 11
# Stream tag of the per-class subset draw (`per_class_subset`).
_SUBSET_STREAM = 13


@dataclasses.dataclass(frozen=True, eq=False)
class SplitList:
  """A parsed split list: `paths[i]` (relative to the image root) has label `labels[i]`."""
  paths: np.ndarray  # object array of str
  labels: np.ndarray  # int32
  num_classes: int
  list_path: str

  def __len__(self) -> int:
    return len(self.labels)

  def class_counts(self) -> np.ndarray:
    """Examples per class, int64 [C]."""
    return class_counts(self.labels, self.num_classes)


def class_counts(labels: Any, num_classes: int) -> np.ndarray:
  """Examples per class, int64 [C], from labels (or a `SplitList`)."""
  if isinstance(labels, SplitList):
    labels = labels.labels
  return np.bincount(np.asarray(labels, np.int64), minlength=num_classes)


def per_class_subset(split: SplitList, per_class: int, seed: int) -> SplitList:
  """`per_class` examples of every class of `split`, drawn without replacement, in list order.

  The public Difficulty-Net code keeps 10 random images per class of the
  ImageNet-LT / Places-LT validation list as its meta and validation set
  (ImageNet_Places-LT/datasets/imagenet.py:173-180, `np.random.choice(idx, 10,
  replace=False)`, unseeded); here the draw is a pure function of `seed`
  (numpy `default_rng([seed, 13])`, one `choice` per class in class order).

  Raises:
    ValueError: `per_class` < 1, or a class has fewer than `per_class` examples.
  """
  if per_class < 1:
    raise ValueError(f"per_class must be >= 1, got {per_class}.")
  counts = split.class_counts()
  short = np.flatnonzero(counts < per_class)
  if short.size:
    raise ValueError(f"{split.list_path}: class {int(short[0])} has {int(counts[short[0]])} "
                     f"example(s), fewer than the {per_class} per class asked for "
                     f"({short.size} such class(es)); lower the number per class.")
  rng = np.random.default_rng([int(seed), _SUBSET_STREAM])
  chosen = np.concatenate([
      rng.choice(np.flatnonzero(split.labels == c), per_class, replace=False)
      for c in range(split.num_classes)])
  chosen.sort()
  return dataclasses.replace(split, paths=split.paths[chosen], labels=split.labels[chosen])


def read_split_list(list_path: str | os.PathLike, num_classes: int | None = None,
                    image_root: str | os.PathLike | None = None) -> SplitList:
  """Parses a split list; with `image_root`, also checks that every image exists.

  Blank lines are ignored. A leading "/" on a path is dropped (some Places-LT
  list versions have one) so that the path stays relative to `image_root`.
  Paths may contain spaces: the label is the last field.

  Args:
    list_path: the list file.
    num_classes: C; labels must lie in [0, C). None: C = max label + 1.
    image_root: directory the paths are relative to; None skips the file check.

  Raises:
    FileNotFoundError: the list file, or an image named in it, does not exist
      (the message gives the list and the line number of the first missing image).
    ValueError: a line is not "path label" with an integer label, or a label is
      outside [0, C) (the message gives the list and the line number).
  """
  list_path = os.fspath(list_path)
  if not os.path.isfile(list_path):
    raise FileNotFoundError(f"Split list {list_path!r} does not exist.")
  paths, labels, line_numbers = [], [], []
  with open(list_path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, start=1):
      text = line.strip()
      if not text:
        continue
      fields = text.rsplit(None, 1)
      label = None
      if len(fields) == 2:
        try:
          label = int(fields[1])
        except ValueError:
          pass
      if label is None:
        raise ValueError(f"{list_path}, line {line_number}: expected 'relative/path.jpg label' "
                         f"with an integer label, got {text!r}.")
      if label < 0 or (num_classes is not None and label >= num_classes):
        bound = f"[0, {num_classes})" if num_classes is not None else ">= 0"
        raise ValueError(f"{list_path}, line {line_number}: label {label} is outside {bound}.")
      paths.append(fields[0].lstrip("/"))
      labels.append(label)
      line_numbers.append(line_number)
  if not labels:
    raise ValueError(f"Split list {list_path!r} has no examples.")
  if num_classes is None:
    num_classes = max(labels) + 1
  split = SplitList(np.asarray(paths, dtype=object), np.asarray(labels, np.int32),
                    int(num_classes), list_path)
  if image_root is not None:
    check_images_exist(split, image_root, line_numbers)
  return split


def check_images_exist(split: SplitList, image_root: str | os.PathLike,
                       line_numbers: Sequence[int] | None = None) -> None:
  """Raises FileNotFoundError naming the first image of `split` missing under `image_root`.

  Cheap even for 100k files on a network file system: it lists each distinct
  directory once (`os.scandir`) instead of one `stat` per file.
  """
  image_root = os.fspath(image_root)
  if not os.path.isdir(image_root):
    raise FileNotFoundError(f"Image root {image_root!r} (for {split.list_path}) is not a "
                            "directory.")
  listings: dict[str, set[str] | None] = {}
  missing = []
  for i, rel in enumerate(split.paths):
    directory, name = os.path.split(os.path.join(image_root, rel))
    if directory not in listings:
      try:
        with os.scandir(directory) as entries:
          listings[directory] = {e.name for e in entries}
      except (FileNotFoundError, NotADirectoryError):
        listings[directory] = None
    names = listings[directory]
    if names is None or name not in names:
      missing.append(i)
  if missing:
    i = missing[0]
    line = line_numbers[i] if line_numbers is not None else i + 1
    raise FileNotFoundError(
        f"{split.list_path}, line {line}: image {split.paths[i]!r} does not exist under "
        f"{image_root!r}" + (f" ({len(missing)} images missing in all)." if len(missing) > 1
                             else "."))


# --- which examples each process reads -----------------------------------------------------


def num_batches(num_examples: int, batch_size: int, *, train: bool,
                process_count: int = 1) -> int:
  """Batches per epoch in each process (the same in every process)."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  if train:
    return (num_examples // process_count) // batch_size
  per_process = -(-num_examples // process_count)
  return -(-per_process // batch_size)


def shard_indices(num_examples: int, batch_size: int, *, train: bool, seed: int = 0,
                  epoch: int = 0, process_index: int = 0,
                  process_count: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """List indices this process reads in one epoch, in order, and their mask.

  Train: global batch g (of `batch_size * process_count` examples) is rows
  [g*G, (g+1)*G) of `epoch_permutation(seed, epoch, n)` (the same permutation in
  every process), and this process reads its `batch_size` rows [p*B, (p+1)*B) of
  each, so the global batches do not depend on the number of processes (the
  rule of the runner, experiments/streaming.py); the mask is all ones. Eval: this process's contiguous block of
  `range(n)`, padded (mask 0, repeating the block's first index) to
  `num_batches(...) * batch_size`. Blocks of different processes are disjoint;
  for eval their real examples cover the list exactly once.
  """
  from dnet_jax.distributed import process_shard  # pylint: disable=g-import-not-at-top

  if num_examples < 1:
    raise ValueError("the split list is empty.")
  steps = num_batches(num_examples, batch_size, train=train, process_count=process_count)
  if train:
    if steps == 0:
      raise ValueError(
          f"{num_examples} examples over {process_count} process(es) give no full batch of "
          f"{batch_size}; lower the batch size.")
    global_size = batch_size * process_count
    order = epoch_permutation(seed, epoch, num_examples)[:steps * global_size]
    rows = order.reshape(steps, global_size)
    block = rows[:, process_index * batch_size:(process_index + 1) * batch_size].reshape(-1)
    return block.astype(np.int64), np.ones(len(block), np.float32)
  block = np.asarray(process_shard(num_examples, process_index, process_count), np.int64)
  size = steps * batch_size
  mask = np.zeros(size, np.float32)
  mask[:len(block)] = 1.0
  filler = block[0] if len(block) else 0
  indices = np.concatenate([block, np.full(size - len(block), filler, np.int64)])
  return indices, mask


# --- TensorFlow transforms --------------------------------------------------------------------


# Training transforms by name (`preprocess(augment=...)`, `data.train_augment` in the runner).
TRAIN_AUGMENTS = ("crop_flip", "public_imagenet", "public_places")


def check_augment(augment: str) -> None:
  """Raises ValueError naming the choices if `augment` is not in TRAIN_AUGMENTS."""
  if augment not in TRAIN_AUGMENTS:
    raise ValueError(f"Unknown training augmentation {augment!r}; choose one of: "
                     f"{', '.join(TRAIN_AUGMENTS)}.")


def train_transform(image, seed, *, augment: str, image_size: int, flip: bool = True,
                    rand_augment: bool = True):
  """Decoded uint8 image -> augmented [image_size, image_size, 3] in [0, 255] (not normalised).

  "crop_flip": `random_resized_crop` + horizontal flip (torchvision's ImageNet
  recipe). "public_imagenet": the public Difficulty-Net ImageNet-LT chain
  (ImageNet_Places-LT/datasets/imagenet.py:201-217): reflect-pad 4 ->
  RandomResizedCrop -> flip -> ColorJitter(0.4, 0.4, 0.4) -> RandAugment
  rand-n2-m10-mstd0.5 (`color_randaugment.train_augment`); with `rand_augment=False`
  it stops before RandAugment, which `examples_dataset` then applies to whole batches.
  "public_places": the same without RandAugment (its Places-LT chain).
  """
  tf = tf_module()
  check_augment(augment)
  if augment == "crop_flip":
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    image = random_resized_crop(image, crop_seed, image_size)
    if flip:
      image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    return image
  from dnet_jax.data import color_randaugment  # pylint: disable=g-import-not-at-top

  return color_randaugment.train_augment(
      image, seed, image_size=image_size,
      use_rand_augment=augment == "public_imagenet" and rand_augment)


def decode_transform(image_bytes, seed, *, train: bool, image_size: int, resize_size: int,
                     flip: bool = True, augment: str = "crop_flip", rand_augment: bool = True):
  """Encoded image -> [image_size, image_size, 3] in [0, 255], before normalisation.

  Training: `train_transform(augment=..., rand_augment=...)`, driven by `seed`
  (int32/int64 [2]); evaluation: resize the shorter side to `resize_size`, centre crop
  (seed ignored).
  """
  image = decode_image(image_bytes)
  if train:
    image = train_transform(image, seed, augment=augment, image_size=image_size, flip=flip,
                            rand_augment=rand_augment)
  else:
    image = resize_center_crop(image, image_size, resize_size)
  image.set_shape([image_size, image_size, 3])
  return image


def normalise(images, mean: Sequence[float], std: Sequence[float]):
  """(images / 255 - mean) / std per channel, float32 (an image or a batch)."""
  tf = tf_module()
  images = tf.cast(images, tf.float32) / 255.0
  return (images - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def preprocess(image_bytes, seed, *, train: bool, image_size: int, resize_size: int,
               mean: Sequence[float], std: Sequence[float], flip: bool = True,
               augment: str = "crop_flip"):
  """Encoded image -> normalised float32 [image_size, image_size, 3]: `decode_transform`
  (the whole training chain, RandAugment included), then `normalise`."""
  return normalise(decode_transform(image_bytes, seed, train=train, image_size=image_size,
                                    resize_size=resize_size, flip=flip, augment=augment),
                   mean, std)


def augmentation_seed(seed: int, epoch: int) -> int:
  """The per-epoch base of the stateless augmentation seeds (same in every process)."""
  return int(np.random.default_rng([int(seed), _AUGMENT_STREAM, int(epoch)]).integers(2**31 - 1))


def make_dataset(split: SplitList, image_root: str | os.PathLike, *, batch_size: int,
                 train: bool, seed: int = 0, epoch: int = 0, process_index: int | None = None,
                 process_count: int | None = None, image_size: int = 224,
                 resize_size: int = 256, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, flip: bool = True,
                 augment: str = "crop_flip", num_parallel_calls: int | None = None,
                 prefetch: int = 2):
  """One epoch of this process's batches as a `tf.data.Dataset` (see the module docstring).

  Args:
    split: from `read_split_list`.
    image_root: the directory the list's paths are relative to.
    batch_size: examples per batch *in this process* (the global batch divided by
      the number of processes); it should be divisible by the local device count.
    train: random crop + flip and drop the remainder; otherwise resize + centre
      crop, every example once, padded with mask-0 examples to full batches.
    seed, epoch: the order and the augmentation are pure functions of these.
    process_index, process_count: this process and how many read the list;
      default `jax.process_index()`, `jax.process_count()`.
    image_size, resize_size: output side, and the eval resize of the shorter side.
    mean, std: per-channel normalisation of [0, 1] images.
    flip: random horizontal flip in training ("crop_flip" only; the public chains flip).
    augment: the training transform, one of TRAIN_AUGMENTS (`train_transform`).
    num_parallel_calls: decoding threads (default: tf.data's autotuning).
    prefetch: batches prepared ahead (bounds memory with the decode threads).

  Returns:
    A dataset of dicts {"image": float32 [B, S, S, 3], "label": int32 [B]} plus
    "mask" float32 [B] in evaluation. Use `.as_numpy_iterator()` or `batches`.
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  indices, mask = shard_indices(len(split), batch_size, train=train, seed=seed, epoch=epoch,
                                process_index=process_index, process_count=process_count)
  return examples_dataset(split, image_root, indices, augmentation_seeds(seed, epoch, indices),
                          batch_size=batch_size, train=train, mask=None if train else mask,
                          image_size=image_size, resize_size=resize_size, mean=mean, std=std,
                          flip=flip, augment=augment, num_parallel_calls=num_parallel_calls,
                          prefetch=prefetch)


def augmentation_seeds(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
  """Stateless seeds int64 [n, 2] = [base(seed, epoch), list index] of examples `indices`.

  The augmentation of an example then depends only on (seed, epoch, example),
  not on which process or thread handles it.
  """
  indices = np.asarray(indices, np.int64)
  return np.stack([np.full(len(indices), augmentation_seed(seed, epoch), np.int64), indices],
                  axis=1)


def examples_dataset(split: SplitList, image_root: str | os.PathLike, indices: np.ndarray,
                     seeds: np.ndarray, *, batch_size: int, train: bool,
                     mask: np.ndarray | None = None, image_size: int = 224,
                     resize_size: int = 256, mean: Sequence[float] = IMAGENET_MEAN,
                     std: Sequence[float] = IMAGENET_STD, flip: bool = True,
                     augment: str = "crop_flip", num_parallel_calls: int | None = None,
                     prefetch: int = 2, batch_rand_augment: bool = False):
  """Batches of the list's examples `indices`, in that order, as a `tf.data.Dataset`.

  The building block of `make_dataset`, for callers that choose the examples
  themselves (e.g. slices of global batches, or sampled meta batches).

  Each example is read, decoded and transformed by one parallel map
  (`decode_transform`); after `batch()` a second map normalises the batch. With the
  "public_imagenet" training transform and `batch_rand_augment`, the first map stops
  before RandAugment and also yields the example's RandAugment draws
  (`color_randaugment.train_rand_augment_params` of its seed), and the second applies
  RandAugment to the whole batch before normalising
  (`color_randaugment.apply_rand_augment_batch`: each op kind runs once per batch on
  the images that drew it). The images are those of `preprocess`, example by example,
  whatever the batching or threading. Per example is the default: on 2 cores the two
  ran at the same rate within noise (`experiments/stream_augment_benchmark.py`,
  ~63-69 images per CPU second each, batches of 16 to 128: the batched ops stream the
  whole batch's float32 levels through memory once per op, where one image stays in
  cache), and per-example work spreads over a many-core host with one batch in flight
  instead of one per core.

  Args:
    split, image_root: the list and the directory its paths are relative to.
    indices: int [n] list indices, n a multiple of `batch_size` (the rest is dropped).
    seeds: int64 [n, 2] stateless augmentation seeds, one per example (see
      `augmentation_seeds`); ignored by the evaluation transform.
    batch_size: examples per batch.
    train: the training transform `augment` (`train_transform`); otherwise resize +
      centre crop.
    mask: float32 [n]: adds "mask" to every batch (evaluation padding); None: no mask.
    batch_rand_augment: True applies RandAugment after `batch()` (see above); False
      (default) per example, in the first map.
    Others: as `make_dataset`.
  """
  tf = tf_module()
  check_augment(augment)
  deferred = batch_rand_augment and train and augment == "public_imagenet"
  indices = np.asarray(indices, np.int64)
  root = os.fspath(image_root)
  files = np.asarray([os.path.join(root, p) for p in split.paths[indices]], dtype=object)
  columns = {"file": files.astype(str), "label": split.labels[indices],
             "seed": np.asarray(seeds, np.int64).reshape(len(indices), 2)}
  if mask is not None:
    columns["mask"] = np.asarray(mask, np.float32)
  ds = tf.data.Dataset.from_tensor_slices(columns)

  from dnet_jax.data import color_randaugment  # pylint: disable=g-import-not-at-top

  def load(example):
    out = {"image": decode_transform(tf.io.read_file(example["file"]), example["seed"],
                                     train=train, image_size=image_size,
                                     resize_size=resize_size, flip=flip, augment=augment,
                                     rand_augment=not deferred),
           "label": tf.cast(example["label"], tf.int32)}
    if deferred:
      out["rand_augment"] = color_randaugment.train_rand_augment_params(example["seed"])
    if mask is not None:
      out["mask"] = example["mask"]
    return out

  def finish(batch):
    batch = dict(batch)
    image = batch.pop("image")
    if deferred:
      image = color_randaugment.apply_rand_augment_batch(image, batch.pop("rand_augment"))
    batch["image"] = normalise(image, mean, std)
    return batch

  parallel = tf.data.AUTOTUNE if num_parallel_calls is None else num_parallel_calls
  ds = ds.map(load, num_parallel_calls=parallel, deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=True)
  ds = ds.map(finish, num_parallel_calls=parallel, deterministic=True)
  ds = ds.prefetch(prefetch)
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


def batches(split: SplitList, image_root: str | os.PathLike, **kwargs) -> Iterator[dict]:
  """`make_dataset(...)` as an iterator of numpy batches."""
  return make_dataset(split, image_root, **kwargs).as_numpy_iterator()
