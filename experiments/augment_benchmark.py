r"""Host augmentation throughput: the public CIFAR train transform, images/s per CPU core.

The public recipe's transform (double-padded crop + flip, AutoAugment CIFAR-10
policy, Cutout 16; ``dnet_jax.data.public_cifar``) runs on the host, one batch
at a time, single-threaded. This times it in one process on one core, so the
number is images/s per core; a loader with ``W`` worker processes gets about
``W`` times that. It prints how many cores keep up with a target step rate
(default 10,000 images/s, about ResNet-32 on one accelerator).

  python -m experiments.augment_benchmark                      # ~10 s
  python -m experiments.augment_benchmark --batch_size=128 --batches=50 \
      --target_images_per_second=20000 --output=/tmp/augment.json

The images are random bytes; the per-image cost depends little on content
(the spline ops and PIL enhancers do the same work on any 32x32 image).
"""

from __future__ import annotations

import json
import time
from typing import Callable

import numpy as np
from absl import app, flags

from dnet_jax.data import autoaugment, public_cifar

_BATCH = flags.DEFINE_integer("batch_size", 128, "Images per batch.")
_BATCHES = flags.DEFINE_integer("batches", 20, "Timed batches per stage.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 32, "Square image side.")
_TARGET = flags.DEFINE_float("target_images_per_second", 10_000.0,
                             "Step rate the loader must feed (prints the cores it needs).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the images and of the augmentation.")
_OUTPUT = flags.DEFINE_string("output", "", "Write the results as JSON here.")

Stage = Callable[[np.ndarray, np.random.Generator], np.ndarray]
STAGES: dict[str, Stage] = {
    "crop_flip": public_cifar.crop_flip_batch,
    "autoaugment": autoaugment.augment_batch,
    "cutout": public_cifar.cutout_batch,
    "public_train_transform": public_cifar.public_train_transform,
}


def images_per_second(stage: Stage, images: np.ndarray, batches: int, seed: int) -> float:
  """``batches x B`` images over the wall time of ``batches`` calls (after one warm-up call)."""
  stage(images, public_cifar.transform_rng(seed, 0, 0))
  start = time.perf_counter()
  for index in range(batches):
    stage(images, public_cifar.transform_rng(seed, 1, index))
  return batches * len(images) / (time.perf_counter() - start)


def augment_throughput(batch_size: int = 128, batches: int = 20, image_size: int = 32,
                       seed: int = 0) -> dict[str, float]:
  """Images/s on this core of each stage and of the whole public transform."""
  if batch_size < 1 or batches < 1:
    raise ValueError(f"batch_size and batches must be >= 1, got {batch_size}, {batches}.")
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8)
  return {name: images_per_second(stage, images, batches, seed) for name, stage in STAGES.items()}


def main(argv):
  del argv
  results = augment_throughput(_BATCH.value, _BATCHES.value, _IMAGE_SIZE.value, _SEED.value)
  print(f"host augmentation, {_IMAGE_SIZE.value}x{_IMAGE_SIZE.value}, batch {_BATCH.value}, "
        "one process on one CPU core:")
  for name, rate in results.items():
    print(f"  {name:<24} {rate:10.0f} images/s per core")
  total = results["public_train_transform"]
  cores = _TARGET.value / total
  print(f"  {_TARGET.value:.0f} images/s needs {cores:.1f} cores "
        f"(loader worker processes) for the public transform.")
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump({"images_per_second_per_core": results,
                 "cores_for_target": cores, "target_images_per_second": _TARGET.value}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
