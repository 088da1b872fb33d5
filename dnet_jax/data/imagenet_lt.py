"""ImageNet-LT from TensorFlow Datasets (`imagenet_lt`), streamed like `split_lists`.

TFDS's `imagenet_lt` is built from ImageNet 2012 with the OLTR split lists
(Liu et al., CVPR 2019): "train" (115,846 images, 1,280..5 per class),
"validation" (20 per class, from the ImageNet train set: Difficulty-Net's
meta set) and "test" (the 50,000 ImageNet validation images). It needs a
manual download, so it is never fetched here:

  1. Register at https://image-net.org/download-images and download
     `ILSVRC2012_img_train.tar` and `ILSVRC2012_img_val.tar` into a directory,
     the "manual dir".
  2. Build the TFDS records once (this also downloads the two OLTR list files
     from Google Drive, so it needs internet access):
         from dnet_jax.data import imagenet_lt
         imagenet_lt.prepare(DATA_DIR, MANUAL_DIR)
     or `tfds build imagenet_lt --data_dir=DATA_DIR --manual_dir=MANUAL_DIR`.
  3. Read it with `make_dataset(split, DATA_DIR, ...)`.
Alternatively, extract the tars and use `dnet_jax.data.split_lists` with the
OLTR lists `ImageNet_LT_{train,val,test}.txt` directly (no TFDS build).

Batches have the same format and transforms as `split_lists.make_dataset`
(torchvision's random-resized crop + flip for training, resize 256 + centre
crop 224 for evaluation, ImageNet normalisation; "mask" in evaluation).
Multi-process: each process reads `tfds.split_for_jax_process` of the split
(equal sizes for training, the remainder dropped; padded to the same number of
batches, mask 0, for evaluation). Order: TFDS file shuffling and a bounded
shuffle buffer, both seeded from (seed, epoch), so an epoch is reproducible;
unlike `split_lists` this is not a global permutation (TFRecords are read
sequentially). The augmentation of an example is seeded by (seed, epoch, its
TFDS id).

TensorFlow and TFDS are imported only inside the functions: importing this
module (or `dnet_jax`) does not import TensorFlow.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Sequence

import numpy as np

from dnet_jax.data import split_lists
from dnet_jax.data import tf_images

NAME = "imagenet_lt"
NUM_CLASSES = 1000
SPLITS = ("train", "validation", "test")

_ORDER_STREAM = 12
_META_ORDER_STREAM = 13
_META_AUGMENT_STREAM = 14


def _not_prepared_message(data_dir: str) -> str:
  return (
      f"TFDS dataset {NAME!r} is not prepared in data_dir={data_dir!r}. It needs a manual "
      "download: register at https://image-net.org/download-images, put "
      "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in a directory MANUAL_DIR, then run "
      f"`dnet_jax.data.imagenet_lt.prepare({data_dir!r}, MANUAL_DIR)` (or `tfds build "
      f"{NAME} --data_dir={data_dir} --manual_dir=MANUAL_DIR`; see "
      "https://www.tensorflow.org/datasets/catalog/imagenet_lt). Alternatively use "
      "dnet_jax.data.split_lists with the OLTR lists ImageNet_LT_{train,val,test}.txt.")


def prepare(data_dir: str | os.PathLike, manual_dir: str | os.PathLike) -> None:
  """Builds the TFDS records from the ImageNet tars in `manual_dir` (one-off, hours)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  manual_dir = os.fspath(manual_dir)
  for tar in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"):
    if not os.path.exists(os.path.join(manual_dir, tar)):
      raise FileNotFoundError(
          f"{tar} is not in manual_dir={manual_dir!r}; download it from "
          "https://image-net.org/download-images (registration required).")
  builder = tfds.builder(NAME, data_dir=os.fspath(data_dir))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))


def _load_split(tfds, split, data_dir: str, *, shuffle_files: bool, shuffle_seed: int | None):
  """The split's dataset with undecoded images and TFDS ids; a clear error if not prepared."""
  builder = tfds.builder(NAME, data_dir=data_dir)
  read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, add_tfds_id=True)
  try:
    return builder.as_dataset(split=split, shuffle_files=shuffle_files, read_config=read_config,
                              decoders={"image": tfds.decode.SkipDecoding()})
  except AssertionError as e:  # TFDS's "could not find data in ..."
    raise FileNotFoundError(_not_prepared_message(data_dir)) from e


def _cardinality(ds, what: str) -> int:
  n = int(ds.cardinality())
  if n < 0:
    raise ValueError(f"{what}: unknown number of examples ({n}).")
  return n


def make_dataset(split: str, data_dir: str | os.PathLike, *, batch_size: int, train: bool,
                 seed: int = 0, epoch: int = 0, process_index: int | None = None,
                 process_count: int | None = None, image_size: int = 224,
                 resize_size: int = 256, mean: Sequence[float] = split_lists.IMAGENET_MEAN,
                 std: Sequence[float] = split_lists.IMAGENET_STD, flip: bool = True,
                 train_augment: str = "crop_flip", shuffle_buffer: int = 2048,
                 num_parallel_calls: int | None = None, prefetch: int = 2,
                 skip_batches: int = 0):
  """One epoch of this process's ImageNet-LT batches as a `tf.data.Dataset`.

  Arguments as `split_lists.make_dataset` (`train_augment` is its `augment`:
  the training transform by name), with `split` one of "train",
  "validation", "test" (or any TFDS split expression) and `data_dir` the TFDS
  data directory. `shuffle_buffer` bounds the memory of the example shuffle
  (encoded JPEGs, ~110 kB each on ImageNet). `skip_batches` (training only)
  starts the epoch at that batch, as a run resumed inside an epoch needs; the
  skipped examples are read but not decoded.

  Raises:
    FileNotFoundError: the dataset is not prepared in `data_dir`, with the steps
      to prepare it.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  tf = tf_images.tf_module()
  data_dir = os.fspath(data_dir)
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count

  total = _cardinality(_load_split(tfds, split, data_dir, shuffle_files=False,
                                   shuffle_seed=None), f"{NAME} split {split!r}")
  local_split = tfds.split_for_jax_process(split, process_index=process_index,
                                           process_count=process_count, drop_remainder=train)
  order_seed = int(np.random.default_rng([int(seed), _ORDER_STREAM, int(epoch)])
                   .integers(2**31 - 1))
  ds = _load_split(tfds, local_split, data_dir, shuffle_files=train,
                   shuffle_seed=order_seed if train else None)
  steps = split_lists.num_batches(total, batch_size, train=train, process_count=process_count)
  if train:
    if steps == 0:
      raise ValueError(f"{NAME} {split!r} has too few examples for a batch of {batch_size} in "
                       f"each of {process_count} process(es).")
    ds = ds.shuffle(shuffle_buffer, seed=order_seed, reshuffle_each_iteration=False)
    ds = ds.take(steps * batch_size).skip(int(skip_batches) * batch_size)
  elif skip_batches:
    raise ValueError("skip_batches is for training only; evaluation reads every example.")
  base_seed = split_lists.augmentation_seed(seed, epoch)

  def load(example):
    # A stable per-example seed from the example's TFDS id (file and record number).
    example_seed = tf.strings.to_hash_bucket_fast(example["tfds_id"], 2**31 - 1)
    seeds = tf.stack([tf.constant(base_seed, tf.int64), example_seed])
    out = {"image": split_lists.preprocess(
               example["image"], seeds, train=train, image_size=image_size,
               resize_size=resize_size, mean=mean, std=std, flip=flip,
               augment=train_augment),
           "label": tf.cast(example["label"], tf.int32)}
    if not train:
      out["mask"] = tf.constant(1.0, tf.float32)
    return out

  parallel = tf.data.AUTOTUNE if num_parallel_calls is None else num_parallel_calls
  ds = ds.map(load, num_parallel_calls=parallel, deterministic=True)
  if not train:
    local = _cardinality(ds, f"{NAME} split {split!r}, process {process_index}")
    padding = steps * batch_size - local
    if padding < 0:  # cannot happen with TFDS's even splits; guards repeat(-1) = forever
      raise ValueError(f"{NAME} split {split!r}: process {process_index} has {local} examples, "
                       f"more than its {steps} batches of {batch_size} from {total} in all.")
    pad = {"image": tf.zeros([image_size, image_size, 3], tf.float32),
           "label": tf.constant(0, tf.int32), "mask": tf.constant(0.0, tf.float32)}
    ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat(padding))
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(prefetch)
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


def meta_dataset(data_dir: str | os.PathLike, *, batch_size: int, num_batches: int,
                 seed: int = 0, epoch: int = 0, skip_batches: int = 0, split: str = "validation",
                 augment: bool = True, process_index: int | None = None,
                 process_count: int | None = None, image_size: int = 224,
                 resize_size: int = 256, mean: Sequence[float] = split_lists.IMAGENET_MEAN,
                 std: Sequence[float] = split_lists.IMAGENET_STD,
                 train_augment: str = "crop_flip", shuffle_buffer: int = 2048,
                 num_parallel_calls: int | None = None, prefetch: int = 2):
  """Difficulty-Net's meta batches of one epoch, drawn from the (balanced) validation split.

  This process's part of the split (`tfds.split_for_jax_process`) is shuffled
  (files and a `shuffle_buffer` of examples, seeded by (seed, epoch)) and
  repeated as often as needed for `num_batches` batches of `batch_size`;
  batches `skip_batches`.. are returned (a resumed run skips those it had used;
  they are read, not decoded). The TFRecords are read sequentially, so this is
  a shuffled stream rather than the independent per-step draws that
  `split_lists` lists allow. An example's augmentation (`augment`: the
  training transform `train_augment`, else the evaluation one) are seeded by (seed, epoch, its
  TFDS id, its position in the stream).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  tf = tf_images.tf_module()
  data_dir = os.fspath(data_dir)
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  local_split = tfds.split_for_jax_process(split, process_index=process_index,
                                           process_count=process_count, drop_remainder=True)
  order_seed = int(np.random.default_rng([int(seed), _META_ORDER_STREAM, int(epoch)])
                   .integers(2**31 - 1))
  ds = _load_split(tfds, local_split, data_dir, shuffle_files=True, shuffle_seed=order_seed)
  ds = ds.shuffle(shuffle_buffer, seed=order_seed, reshuffle_each_iteration=True).repeat()
  ds = ds.take(int(num_batches) * batch_size).enumerate()
  ds = ds.skip(int(skip_batches) * batch_size)
  base_seed = int(np.random.default_rng([int(seed), _META_AUGMENT_STREAM, int(epoch)])
                  .integers(2**31 - 1))

  def load(position, example):
    example_seed = tf.strings.to_hash_bucket_fast(example["tfds_id"], 2**31 - 1)
    seeds = tf.random.experimental.stateless_fold_in(
        tf.stack([tf.constant(base_seed, tf.int64), example_seed]), position)
    return {"image": split_lists.preprocess(
                example["image"], seeds, train=augment, image_size=image_size,
                resize_size=resize_size, mean=mean, std=std, augment=train_augment),
            "label": tf.cast(example["label"], tf.int32)}

  parallel = tf.data.AUTOTUNE if num_parallel_calls is None else num_parallel_calls
  ds = ds.map(load, num_parallel_calls=parallel, deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(prefetch)
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


def num_examples(split: str, data_dir: str | os.PathLike) -> int:
  """Examples in a split of the prepared dataset (from its metadata; reads no records)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  data_dir = os.fspath(data_dir)
  return _cardinality(_load_split(tfds, split, data_dir, shuffle_files=False, shuffle_seed=None),
                      f"{NAME} split {split!r}")


def batches(split: str, data_dir: str | os.PathLike, **kwargs) -> Iterator[dict]:
  """`make_dataset(...)` as an iterator of numpy batches."""
  return make_dataset(split, data_dir, **kwargs).as_numpy_iterator()


def class_counts(data_dir: str | os.PathLike | None = None, *, split: str = "train",
                 split_list: str | os.PathLike | None = None) -> np.ndarray:
  """Training examples per class, int64 [1000].

  From the OLTR list file (`split_list`, e.g. ImageNet_LT_train.txt: instant) if
  given, else by reading every label of the TFDS split (a full pass over the
  records, minutes for the train split: cache the result).
  """
  if split_list is not None:
    return split_lists.read_split_list(split_list, NUM_CLASSES).class_counts()
  if data_dir is None:
    raise ValueError("class_counts needs data_dir (TFDS) or split_list (an OLTR list file).")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  ds = _load_split(tfds, split, os.fspath(data_dir), shuffle_files=False, shuffle_seed=None)
  counts = np.zeros(NUM_CLASSES, np.int64)
  for labels in ds.map(lambda ex: ex["label"]).batch(4096).as_numpy_iterator():
    counts += np.bincount(labels, minlength=NUM_CLASSES)
  return counts


def dataset_info(data_dir: str | os.PathLike) -> Any:
  """The TFDS `DatasetInfo` (features, split sizes) of the prepared dataset."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  return tfds.builder(NAME, data_dir=os.fspath(data_dir)).info
