"""Which training examples make up an epoch, for every kind of `Dataset`.

`Sampler` names how an epoch is drawn (instance, class-balanced, class-aware);
`epoch_order(sampler, labels, seed, epoch, size)` gives the epoch's training
indices as a pure function of (seed, epoch), so that batch b of epoch e is
rows [b*B, (b+1)*B) of it in every process and after every resume;
`sampler_steps_per_epoch` and `steps_per_epoch` count the full global batches.
Shared by `experiments/datasets.py` (arrays in memory) and
`experiments/streaming.py` (split lists and TFDS read by tf.data).
"""

from __future__ import annotations

import dataclasses
from typing import Union

import numpy as np

from dnet_jax.data import batching
from dnet_jax.data import class_aware
from experiments.errors import InvalidInputError

SAMPLERS = ("instance", "class_balanced", "class_aware")
EVAL_SPLITS = ("meta", "test")


@dataclasses.dataclass(frozen=True)
class Sampler:
  """How a training epoch is drawn.

  Attributes:
    name: "instance" (a permutation of the training set), "class_balanced" (a
      class uniformly, then one of its images; cRT's sampler) or "class_aware"
      (the public code's ClassAwareSampler, CIFAR-LT/data/ClassAwareSampler.py:31-71
      and ImageNet_Places-LT/datasets/sampler.py:110-149; `dnet_jax.data.class_aware`:
      `samples_per_class` consecutive images of a class, classes in reshuffled
      cycles, continued across epochs).
    samples_per_class: class_aware only (the public code: 4).
    iterations_per_epoch: global steps per epoch; 0 = the sampler's own length:
      floor(N / B) for instance and class_balanced, floor(max_c n_c x C / B) for
      class_aware (the public DataLoader keeps the last partial batch; here
      batches have a static shape, so it is dropped). A class-aware epoch is
      the next (steps x B) samples of the class-aware stream. The public
      ImageNet-LT / Places-LT stage 2 fixes it (907 / 246).
  """
  name: str = "instance"
  samples_per_class: int = 4
  iterations_per_epoch: int = 0

  def __post_init__(self):
    if self.name not in SAMPLERS:
      raise InvalidInputError(f"Unknown sampler {self.name!r}; choose one of: "
                              f"{', '.join(SAMPLERS)}.")
    if int(self.samples_per_class) < 1 or int(self.iterations_per_epoch) < 0:
      raise InvalidInputError(
          f"The {self.name} sampler needs samples_per_class >= 1 and iterations_per_epoch >= 0 "
          f"(0 = the sampler's own epoch length); got {self.samples_per_class} and "
          f"{self.iterations_per_epoch}.")


SamplerLike = Union[str, Sampler]


def as_sampler(sampler: SamplerLike) -> Sampler:
  """A `Sampler` from a name or a `Sampler`."""
  return sampler if isinstance(sampler, Sampler) else Sampler(str(sampler))


def sampler_steps_per_epoch(sampler: SamplerLike, labels: np.ndarray, batch_size: int,
                            num_classes: int | None = None) -> int:
  """Global steps per epoch of `sampler` over training `labels` (see `Sampler`)."""
  sampler = as_sampler(sampler)
  if sampler.iterations_per_epoch:
    return int(sampler.iterations_per_epoch)
  if sampler.name == "class_aware":
    length = class_aware.class_aware_epoch_length(np.asarray(labels), num_classes)
    return steps_per_epoch(length, batch_size)
  return steps_per_epoch(len(labels), batch_size)


def epoch_order(sampler: SamplerLike, labels: np.ndarray, seed: int, epoch: int,
                size: int) -> np.ndarray:
  """The first `size` training indices of `epoch`: a permutation ("instance"), a
  class-balanced draw (a class uniformly, then one of its images; cRT's sampler), or
  the class-aware stream (`size` samples per epoch, `class_aware.class_aware_epoch`)."""
  sampler = as_sampler(sampler)
  if sampler.name == "instance":
    return batching.epoch_permutation(seed, epoch, len(labels))[:size]
  if sampler.name == "class_balanced":
    return batching.class_balanced_indices(labels, size, seed, epoch)
  return class_aware.class_aware_epoch(np.asarray(labels), seed, epoch,
                                       int(sampler.samples_per_class), epoch_length=size)


def steps_per_epoch(num_train: int, batch_size: int) -> int:
  """Full batches per epoch (the last incomplete one is dropped)."""
  if batch_size > num_train:
    raise InvalidInputError(
        f"batch_size {batch_size} is larger than the {num_train} training images, so an "
        "epoch would have no full batch; lower batch_size.")
  return num_train // batch_size
