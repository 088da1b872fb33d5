"""Checks of a run's config and data, made before anything is compiled.

`train_and_evaluate` calls, in this order:
  1. `validate_config(config, num_devices)`: names (method, meta-gradient
     mode, model, ...; `methods.validate_config`), numbers (imbalance factor,
     batch sizes divisible by the device count, checkpoint intervals);
  2. `load_data(config)`: the loaders of `dnet_jax.data` check what they read
     (missing data directory or file, labels outside [0, C), a class with no
     training or no meta examples, images that are not uint8 0..255 or float
     in [0, 1], pickles that would run code); their errors are re-raised as
     `InvalidInputError` with the data set named;
  3. `check_data(data, config, uses_meta)`: what the loaded data must satisfy
     for this config: the model's input (`MODEL_INPUTS`), batch sizes no
     larger than the sets, non-empty test set, shot-group thresholds.
Every failure is an `errors.InvalidInputError` (a ValueError) whose message
says what to change; the entry point exits with code 2. The checks reuse the
data layer's own (they are not repeated here), so the library and the runner
give the same messages.

What the runner feeds a model: uint8 NHWC images (0..255), normalised and
augmented on the device. Loaders convert float images in [0, 1] to uint8 and
refuse other floats, so a float array never reaches the model.
"""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np

from dnet_jax.data import long_tail
from experiments import input_pipeline
from experiments import methods
from experiments.errors import InvalidInputError


@dataclasses.dataclass(frozen=True)
class InputSpec:
  """The images a classifier of the registry is built for.

  Attributes:
    channels: required number of channels (None = any).
    min_size: smallest height and width it can take.
    description: what to tell a user whose images do not fit.
  """
  channels: int | None
  min_size: int
  description: str


_SMALL_CNN = InputSpec(None, 4, "small_cnn takes images of any number of channels, at least 4x4 "
                                "(it was written for the 8x8 grey digits)")
_IMAGENET_RESNET = InputSpec(3, 32, "the ImageNet ResNets take RGB images (3 channels) of at least "
                                    "32x32 (they downsample 32x; ImageNet uses 224x224)")
MODEL_INPUTS = {
    "small_cnn": _SMALL_CNN,
    "small_cnn_nobn": _SMALL_CNN,
    "resnet32": InputSpec(3, 32, "resnet32 is the CIFAR ResNet-32 for RGB images of 32x32 "
                                 "(3 channels, at least 32x32)"),
    "resnet10": _IMAGENET_RESNET,
    "resnet50": _IMAGENET_RESNET,
    "resnet152": _IMAGENET_RESNET,
}


def _invalid(error: Exception, context: str = "") -> InvalidInputError:
  return InvalidInputError(f"{context}{error}")


def validate_config(config, num_devices: int) -> None:
  """Checks the config alone (no data, no JAX work); raises InvalidInputError."""
  try:
    methods.validate_config(config)
  except ValueError as e:
    raise _invalid(e) from e
  # data.source is checked by the loader that dispatches on it (next, still before compiling):
  # in-memory sources (dnet_jax.data.sources) and streamed ones each know their own names.
  if "imbalance_factor" in config.data:
    try:
      long_tail.check_imbalance_factor(config.data.imbalance_factor)
    except ValueError as e:
      raise _invalid(e, "data.") from e
  if int(config.get("checkpoint_every_steps", 0)) < 0:
    raise InvalidInputError(f"checkpoint_every_steps must be >= 0 (0 = only at epoch ends), got "
                            f"{config.checkpoint_every_steps}.")
  uses_meta = config.method in methods.DNET_METHODS
  fields = ["batch_size", "eval_batch_size"] + (["meta_batch_size"] if uses_meta else [])
  for field in fields:
    value = int(config[field])
    if value % num_devices:
      lower, upper = (value // num_devices) * num_devices, (value // num_devices + 1) * num_devices
      raise InvalidInputError(
          f"{field}={value} is not divisible by the {num_devices} devices; the global batch is "
          f"split evenly across devices, so choose a multiple of {num_devices} (e.g. "
          f"{lower or upper} or {upper}).")


def load_data(config):
  """`input_pipeline.load_data(config)`, its errors as InvalidInputError naming the data set."""
  data_cfg = config.data
  where = f" in {data_cfg.data_dir!r}" if data_cfg.get("data_dir") else ""
  try:
    return input_pipeline.load_data(config)
  except (ValueError, OSError, pickle.UnpicklingError) as e:
    raise _invalid(e, f"Data set {data_cfg.name!r} (source {data_cfg.source!r}{where}): ") from e


def check_images(x: np.ndarray, model: str, what: str = "images") -> None:
  """Raises InvalidInputError unless `x` is uint8 NHWC that classifier `model` can take."""
  if not isinstance(x, np.ndarray) or x.ndim != 4:
    raise InvalidInputError(f"The {what} must be an NHWC array (N, height, width, channels), "
                            f"got shape {np.shape(x)}.")
  if x.dtype != np.uint8:
    raise InvalidInputError(
        f"The {what} are {x.dtype}, but the runner feeds uint8 images (0..255) and normalises "
        "them on the device; store uint8 pixels (float images in [0, 1] are converted when "
        "loaded from .npz or TFDS).")
  spec = MODEL_INPUTS.get(model)
  if spec is None:  # a user-registered classifier: its own business
    return
  height, width, channels = x.shape[1:]
  problems = []
  if spec.channels is not None and channels != spec.channels:
    problems.append(f"{channels} channel(s) instead of {spec.channels}")
  if min(height, width) < spec.min_size:
    problems.append(f"{height}x{width} pixels, smaller than {spec.min_size}x{spec.min_size}")
  if problems:
    raise InvalidInputError(
        f"model={model!r} cannot take the {what} ({height}x{width}x{channels}: "
        f"{' and '.join(problems)}): {spec.description}. Choose a model for these images "
        "(e.g. --config.model=small_cnn) or resize/convert the images.")


def check_data(data, config, uses_meta: bool) -> None:
  """Checks the loaded data against the config; raises InvalidInputError."""
  for name in ("train", "meta", "test"):
    check_images(getattr(data, f"x_{name}"), config.model, f"{name} images")
  if len(data.y_test) == 0:
    raise InvalidInputError("The test set is empty; the run would have nothing to report.")
  try:
    input_pipeline.steps_per_epoch(len(data.y_train), int(config.batch_size))
    data.shot_groups(int(config.many_threshold), int(config.few_threshold))
  except ValueError as e:
    raise _invalid(e) from e
  if uses_meta and int(config.meta_batch_size) > len(data.y_meta):
    raise InvalidInputError(
        f"meta_batch_size={config.meta_batch_size} exceeds the meta set ({len(data.y_meta)} "
        "images); lower it or raise data.meta_per_class.")
