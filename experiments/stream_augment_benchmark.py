r"""Host input throughput: decoded-and-augmented images/s per CPU core, on generated JPEGs.

An accelerator step on ImageNet-LT consumes a batch of 224 x 224 images; this
measures how many the runner's host pipeline produces per core (read -> JPEG decode ->
reflect-pad -> RandomResizedCrop -> flip -> ColorJitter -> RandAugment -> normalise),
so that the cores needed to feed a device are (device images/s) / (this number).

The "ImageNet-LT chain (batch B)" row times the runner's own pipeline,
`dnet_jax.data.split_lists.examples_dataset` with data.train_augment "public_imagenet"
(what experiments/streaming.py builds): the whole chain per example, normalisation
per batch of `--batch_size`. The row "ImageNet-LT, RA per batch" runs RandAugment
after `batch()` instead (`batch_rand_augment=True`,
`color_randaugment.apply_rand_augment_batch`), for comparison. The other rows map
per-example functions: `preprocess` with "crop_flip"
and "public_places" (the runner's per-example work for those; it normalises per batch
instead, the same arithmetic), and the reflect-padded crop alone, with the padded
image never built and with the crop window decoded directly
(`color_randaugment.decode_padded_random_resized_crop`).

  python -m experiments.stream_augment_benchmark
  python -m experiments.stream_augment_benchmark --threads=4 --images=64 --repeats=4 \
      --batch_size=32

It writes `--images` JPEGs of `--height` x `--width` (smooth random colour fields,
quality 90, about the size of an ImageNet photo) to a temporary directory, then
times `--repeats` passes over them through a tf.data pipeline (the traced `map`
with `num_parallel_calls=--threads`) restricted to `--threads` threads
(`threading.private_threadpool_size`, one op thread each), after one untimed
warm-up pass that builds the pipeline, all through one iterator. For each row
(decode + crop; the same with reflect padding, decoding the whole JPEG or only the
crop window; the Places-LT chain; the ImageNet-LT chain with RandAugment per image
and per batch) it prints images/s per core two ways: wall-clock rate / threads
(right when the cores are otherwise idle) and images per CPU second of this process
(right on a shared machine). About a minute with the defaults.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
from absl import app, flags

_FLAGS = {}


def define_flags() -> None:
  """Defines this command's flags (called under __main__ only: `--image_size` is also a flag of
  experiments.benchmark, so both modules can be imported in one process, e.g. by the tests)."""
  _FLAGS.update(
      images=flags.DEFINE_integer("images", 32, "Number of generated JPEG files."),
      height=flags.DEFINE_integer("height", 375, "Generated image height (ImageNet median ~375)."),
      width=flags.DEFINE_integer("width", 500, "Generated image width (ImageNet median ~500)."),
      image_size=flags.DEFINE_integer("image_size", 224, "Crop side."),
      threads=flags.DEFINE_integer("threads", 1, "Pipeline threads (host cores used)."),
      repeats=flags.DEFINE_integer("repeats", 3, "Timed passes over the files."),
      batch_size=flags.DEFINE_integer(
          "batch_size", 16, "Batch size of the runner's pipeline (batch-level RandAugment); "
          "--images is rounded down to a multiple of it."))


def write_jpegs(directory: str, count: int, height: int, width: int, seed: int = 0) -> list[str]:
  """`count` JPEGs of smooth random colour fields (upsampled noise), as photos compress."""
  from PIL import Image  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(seed)
  paths = []
  for i in range(count):
    coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.BILINEAR)
    path = os.path.join(directory, f"image_{i:04d}.jpg")
    image.save(path, quality=90)
    paths.append(path)
  return paths


# Rows timed as the runner's whole pipeline (`measure_pipeline_throughput`), by augment.
PIPELINES = {"ImageNet-LT chain": ("public_imagenet", False),
             "ImageNet-LT, RA per batch": ("public_imagenet", True)}
# Rows timed as a per-example function (`_load_fn`, `measure_throughput`).
CHAINS = ("decode+crop+flip", "decode+pad+crop", "crop-decode+pad+crop", "Places-LT chain")
_RUNNER_AUGMENT = {"decode+crop+flip": "crop_flip", "Places-LT chain": "public_places"}


def _load_fn(chain: str, image_size: int):
  """(index, path) -> normalised float32 image, for one of `CHAINS`.

  The chains in `_RUNNER_AUGMENT` are `split_lists.preprocess` with that `augment` (the
  whole chain on one image); the two pad+crop rows time the reflect-padded
  RandomResizedCrop alone.
  """
  from dnet_jax.data import color_randaugment  # pylint: disable=import-outside-toplevel
  from dnet_jax.data import split_lists  # pylint: disable=import-outside-toplevel

  tf = color_randaugment.tf
  mean = tf.constant(split_lists.IMAGENET_MEAN, tf.float32) * 255.0
  std = tf.constant(split_lists.IMAGENET_STD, tf.float32) * 255.0

  def load(index, path):
    data = tf.io.read_file(path)
    seed = tf.stack([tf.constant(0, tf.int64), index])
    if chain in _RUNNER_AUGMENT:
      return split_lists.preprocess(data, seed, train=True, image_size=image_size,
                                    resize_size=image_size, mean=split_lists.IMAGENET_MEAN,
                                    std=split_lists.IMAGENET_STD,
                                    augment=_RUNNER_AUGMENT[chain])
    image = color_randaugment.decode_padded_random_resized_crop(
        data, seed, image_size, crop_before_decode=chain.startswith("crop-"))
    return (tf.cast(image, tf.float32) - mean) / std

  return load


def measure_throughput(paths: list[str], load, *, threads: int, repeats: int):
  """(images per wall second / threads, images per process CPU second) of the traced
  `load` mapped with `num_parallel_calls=threads` over `repeats` passes.

  The pipeline runs on a private pool of `threads` threads with one op thread each
  (`threading.private_threadpool_size`, `max_intra_op_parallelism=1`), so the first
  number is the rate per core used when those cores are free; the second divides by
  the CPU time this process actually got, the per-core rate on a shared machine.
  """
  from dnet_jax.data import color_randaugment  # pylint: disable=import-outside-toplevel

  tf = color_randaugment.tf
  files = tf.data.Dataset.from_tensor_slices(paths)
  ds = tf.data.Dataset.zip(tf.data.Dataset.range(len(paths)), files)
  ds = ds.map(load, num_parallel_calls=threads, deterministic=True)
  return _time_passes(ds, len(paths), len(paths), threads=threads, repeats=repeats)


def measure_pipeline_throughput(paths: list[str], augment: str, *, image_size: int,
                                batch_size: int, threads: int, repeats: int,
                                batch_rand_augment: bool = False):
  """As `measure_throughput`, for the runner's pipeline: `split_lists.examples_dataset`
  over `paths` (training transform `augment`, batches of `batch_size`, the rest dropped;
  RandAugment after `batch()` with `batch_rand_augment`)."""
  from dnet_jax.data import split_lists  # pylint: disable=import-outside-toplevel

  count = len(paths) // batch_size * batch_size
  if count == 0:
    raise ValueError(f"{len(paths)} images give no batch of {batch_size}; lower --batch_size.")
  names = np.asarray([os.path.basename(p) for p in paths], dtype=object)
  split = split_lists.SplitList(names, np.zeros(len(paths), np.int32), 1, "<generated>")
  indices = np.arange(count)
  ds = split_lists.examples_dataset(
      split, os.path.dirname(paths[0]), indices, split_lists.augmentation_seeds(0, 0, indices),
      batch_size=batch_size, train=True, image_size=image_size, augment=augment,
      num_parallel_calls=threads, batch_rand_augment=batch_rand_augment)
  return _time_passes(ds, count // batch_size, count, threads=threads, repeats=repeats)


def _time_passes(ds, elements: int, images: int, *, threads: int, repeats: int):
  """(images per wall second / threads, images per process CPU second) over `repeats`
  passes of `ds` (`elements` elements holding `images` images each), after one untimed
  pass, all from one iterator: as in the runner, which reads many batches per
  iterator, the pipeline's functions are instantiated once (a new iterator
  instantiates them again, which for the ImageNet-LT chain's graph costs as much
  as a few batches)."""
  from dnet_jax.data import color_randaugment  # pylint: disable=import-outside-toplevel

  tf = color_randaugment.tf
  options = tf.data.Options()
  options.threading.private_threadpool_size = threads
  options.threading.max_intra_op_parallelism = 1
  iterator = iter(ds.with_options(options).repeat(repeats + 1))
  for _ in range(elements):  # warm-up: builds the pipeline and fills the file cache
    next(iterator)
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(repeats * elements):
    next(iterator)
  timed = repeats * images
  return (timed / (time.perf_counter() - wall) / threads, timed / (time.process_time() - cpu))


def main(argv):
  del argv
  f = {name: flag.value for name, flag in _FLAGS.items()}
  threads, size = f["threads"], f["image_size"]
  with tempfile.TemporaryDirectory() as directory:
    paths = write_jpegs(directory, f["images"], f["height"], f["width"])
    print(f"{len(paths)} JPEGs {f['width']}x{f['height']} -> {size}^2, "
          f"{threads} thread(s); images/s per core: by wall time / threads, by CPU time")
    for chain in CHAINS:
      _print_row(chain, measure_throughput(paths, _load_fn(chain, size), threads=threads,
                                           repeats=f["repeats"]))
    for name, (augment, per_batch) in PIPELINES.items():
      _print_row(f"{name} (batch {f['batch_size']})", measure_pipeline_throughput(
          paths, augment, image_size=size, batch_size=f["batch_size"], threads=threads,
          repeats=f["repeats"], batch_rand_augment=per_batch))


def _print_row(name: str, rates) -> None:
  print(f"{name:30s} {rates[0]:8.1f} (wall)  {rates[1]:8.1f} (CPU)", flush=True)

if __name__ == "__main__":
  define_flags()
  app.run(main)
