r"""Host input throughput: decoded-and-augmented images/s per CPU core, on generated JPEGs.

An accelerator step on ImageNet-LT consumes a batch of 224 x 224 images; this
measures how many the runner's host pipeline (read -> JPEG decode -> reflect-pad ->
RandomResizedCrop -> flip -> ColorJitter -> RandAugment -> normalise: the
per-example function `dnet_jax.data.split_lists.preprocess` that
experiments/streaming.py maps over the split lists, with data.train_augment
"public_imagenet", or "public_places" with --no_rand_augment) produces per core, so that the
cores needed to feed a device are (device images/s) / (this number).

  python -m experiments.stream_augment_benchmark                     # ImageNet-LT chain
  python -m experiments.stream_augment_benchmark --no_rand_augment   # Places-LT chain
  python -m experiments.stream_augment_benchmark --threads=4 --images=64 --repeats=4

It writes `--images` JPEGs of `--height` x `--width` (smooth random colour fields,
quality 90, about the size of an ImageNet photo) to a temporary directory, then
times `--repeats` passes over them through a tf.data pipeline restricted to
`--threads` threads (`threading.private_threadpool_size`, one op thread each), after
one untimed warm-up pass that builds the pipeline. It prints images/s in total and
per thread (= per host core when the cores are otherwise idle), for the full chain
and for decode + crop alone. About a minute on one free core with the defaults.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
from absl import app, flags

_IMAGES = flags.DEFINE_integer("images", 32, "Number of generated JPEG files.")
_HEIGHT = flags.DEFINE_integer("height", 375, "Generated image height (ImageNet median ~375).")
_WIDTH = flags.DEFINE_integer("width", 500, "Generated image width (ImageNet median ~500).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Crop side.")
_THREADS = flags.DEFINE_integer("threads", 1, "Pipeline threads (host cores used).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed passes over the files.")
_NO_RAND_AUGMENT = flags.DEFINE_bool("no_rand_augment", False,
                                     "Leave RandAugment out (the Places-LT chain).")


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


def measure_throughput(paths: list[str], *, threads: int, repeats: int, image_size: int,
                       augment: bool, rand_augment: bool) -> float:
  """Images/s of decode (+ augment) + normalise over `repeats` passes, `threads` threads.

  Each file goes through `split_lists.preprocess`, the function the runner's
  tf.data pipeline maps over its split lists (experiments/streaming.py), with
  `data.train_augment` "public_imagenet" (`rand_augment`), "public_places", or
  "crop_flip" when not `augment` (decode + crop + flip alone).
  """
  from dnet_jax.data import split_lists  # pylint: disable=import-outside-toplevel

  tf = split_lists._tf()  # pylint: disable=protected-access
  name = ("crop_flip" if not augment else
          "public_imagenet" if rand_augment else "public_places")

  def load(index, path):
    seed = tf.stack([tf.constant(0, tf.int64), index])
    return split_lists.preprocess(tf.io.read_file(path), seed, train=True,
                                  image_size=image_size, resize_size=image_size,
                                  mean=split_lists.IMAGENET_MEAN, std=split_lists.IMAGENET_STD,
                                  augment=name)

  files = tf.data.Dataset.from_tensor_slices(paths)
  ds = tf.data.Dataset.zip(tf.data.Dataset.range(len(paths)), files)
  ds = ds.map(load, num_parallel_calls=threads, deterministic=True)
  options = tf.data.Options()
  options.threading.private_threadpool_size = threads
  options.threading.max_intra_op_parallelism = 1
  ds = ds.with_options(options)
  for _ in ds:  # warm-up: builds the pipeline and fills the file cache
    pass
  start = time.perf_counter()
  for _ in range(repeats):
    for _ in ds:
      pass
  return repeats * len(paths) / (time.perf_counter() - start)


def main(argv):
  del argv
  threads = _THREADS.value
  with tempfile.TemporaryDirectory() as directory:
    paths = write_jpegs(directory, _IMAGES.value, _HEIGHT.value, _WIDTH.value)
    chain = "crop+flip+ColorJitter" + ("" if _NO_RAND_AUGMENT.value else "+RandAugment")
    print(f"{len(paths)} JPEGs {_WIDTH.value}x{_HEIGHT.value} -> {_IMAGE_SIZE.value}^2, "
          f"{threads} thread(s)")
    for name, augment in (("decode+crop+flip", False), (f"decode+{chain}", True)):
      rate = measure_throughput(paths, threads=threads, repeats=_REPEATS.value,
                                image_size=_IMAGE_SIZE.value, augment=augment,
                                rand_augment=not _NO_RAND_AUGMENT.value)
      print(f"{name:48s} {rate:8.1f} images/s  {rate / threads:8.1f} images/s per core")


if __name__ == "__main__":
  app.run(main)
