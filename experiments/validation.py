"""Checks of a run's config and images, made before anything is compiled.

`validate_config(config, num_devices)` checks names (method, meta-gradient
mode, model, ...; `methods.validate_config`) and numbers (imbalance factor,
batch sizes divisible by the device count, checkpoint intervals, and the
ranges of `VALUE_RANGES`: learning rates, momentum, loss parameters,
Difficulty-Net widths; NaN and Inf are refused everywhere);
`check_images` checks that a model of the registry can take the images. The
data checks live with the datasets (`experiments/datasets.py`,
`experiments/streaming.py`) and the loaders of `dnet_jax.data`. Every failure
is an `errors.InvalidInputError` (a ValueError) whose message says what to
change; the entry point exits with code 2.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from dnet_jax.data import long_tail
from dnet_jax.data import split_lists
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
    "resnet152_places": _IMAGENET_RESNET,
}

REFRESH_AT = ("epoch_end", "epoch_start")
LOSS_WEIGHTINGS = ("per_example", "batch_mean")
_RESNET_OPTIONS = ("head", "cosine_scale", "cosine_bias")
_IMAGENET_RESNET_OPTIONS = _RESNET_OPTIONS + ("drop_last_blocks", "extra_block", "width",
                                              "stride_in_1x1")
_MODEL_OPTIONS = {"resnet32": _RESNET_OPTIONS + ("widths",), "resnet10": _IMAGENET_RESNET_OPTIONS,
                  "resnet50": _IMAGENET_RESNET_OPTIONS, "resnet152": _IMAGENET_RESNET_OPTIONS,
                  "resnet152_places": _IMAGENET_RESNET_OPTIONS}


# field -> (lowest, highest, whether the lowest is allowed, what the field means). Every value
# must also be finite. Fields missing from a config are not checked.
VALUE_RANGES = {
    # 0 is allowed: it freezes the classifier (a probe of the loaded weights); < 0 ascends.
    "learning_rate": (0.0, math.inf, True, "the SGD learning rate (negative would ascend the "
                                           "loss)"),
    "momentum": (0.0, 1.0, True, "the SGD momentum, in [0, 1)"),
    "weight_decay": (0.0, math.inf, True, "the L2 weight decay"),
    "warmup_epochs": (0.0, math.inf, True, "the linear warm-up length in epochs"),
    "driver_weight": (0.0, math.inf, True, "lambda, the weight of the driver loss"),
    "focal_gamma": (0.0, math.inf, True, "the focal loss exponent (0 = cross-entropy)"),
    "cb_beta": (0.0, 1.0, True, "the class-balanced beta, in [0, 1) (0.9999 in the paper)"),
    "dnet.lr": (0.0, math.inf, False, "the Adam learning rate of Difficulty-Net"),
    "dnet.weight_decay": (0.0, math.inf, True, "the L2 weight decay of Difficulty-Net"),
}


def _get(config, name: str):
  node = config
  for part in name.split("."):
    if part not in node:
      return None
    node = node[part]
  return node


def check_values(config) -> None:
  """Ranges of the numeric fields (`VALUE_RANGES`), cdb_tau and dnet.hidden."""
  for name, (low, high, low_ok, meaning) in VALUE_RANGES.items():
    value = _get(config, name)
    if value is None:
      continue
    try:
      number = float(value)
    except (TypeError, ValueError):
      raise InvalidInputError(f"{name} must be a number ({meaning}), got {value!r}.") from None
    fits = math.isfinite(number) and (number > low or (low_ok and number == low)) and (
        number < high or high == math.inf)
    if not fits:
      bounds = f"{'>=' if low_ok else '>'} {low:g}" + (f" and < {high:g}" if high < math.inf
                                                       else "")
      raise InvalidInputError(
          f"{name}={value!r} is out of range: it is {meaning}, so it must be finite and "
          f"{bounds}. Set e.g. --config.{name}=<value> in that range.")
  tau = _get(config, "cdb_tau")
  if tau is not None:
    parsed = methods.parse_cdb_tau(tau)
    if parsed != "dynamic" and not (math.isfinite(parsed) and parsed >= 0):
      raise InvalidInputError(
          f"cdb_tau={tau!r} must be 'dynamic' or a finite number >= 0 (CDB's weights are "
          "difficulty ** tau; the paper uses 'dynamic' or 1.5).")
  hidden = _get(config, "dnet.hidden")
  if hidden is not None:
    widths = tuple(hidden) if isinstance(hidden, (tuple, list)) else (hidden,)
    if not widths or not all(isinstance(w, (int, np.integer)) and not isinstance(w, bool)
                             and w >= 1 for w in widths):
      raise InvalidInputError(
          f"dnet.hidden={hidden!r} must be a tuple of positive layer widths, e.g. "
          '--config.dnet.hidden="(128, 128)" (the paper\'s Difficulty-Net).')


def _invalid(error: Exception, context: str = "") -> InvalidInputError:
  return InvalidInputError(f"{context}{error}")


def validate_config(config, num_devices: int) -> None:
  """Checks the config alone (no data, no JAX work); raises InvalidInputError."""
  try:
    methods.validate_config(config)
  except ValueError as e:
    raise _invalid(e) from e
  check_values(config)
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
  validate_stage1_options(config)
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


def _as_dict(value) -> dict:
  return value.to_dict() if hasattr(value, "to_dict") else dict(value or {})


def validate_stage1_options(config) -> None:
  """Checks model_kwargs, param_groups, loss_weighting, refresh_at and the streamed
  data.train_augment / data.meta_per_class; raises InvalidInputError."""
  options = _as_dict(config.get("model_kwargs", None))
  allowed = _MODEL_OPTIONS.get(config.model)
  unknown = sorted(set(options) - set(allowed or ()))
  if allowed is not None and unknown:
    raise InvalidInputError(f"model_kwargs {unknown} are not options of model={config.model!r}; "
                            f"it takes: {', '.join(allowed)}.")
  if options.get("head", "linear") not in ("linear", "cosine"):
    raise InvalidInputError(f"model_kwargs.head must be 'linear' or 'cosine', got "
                            f"{options['head']!r}.")
  for name, group in _as_dict(config.get("param_groups", None)).items():
    ok = (isinstance(group, (tuple, list)) and len(group) == 2
          and isinstance(group[0], (tuple, list)) and all(isinstance(p, str) for p in group[0])
          and isinstance(group[1], (int, float)) and group[1] >= 0)
    if not ok:
      raise InvalidInputError(
          f"param_groups.{name} must be (patterns, lr multiplier): a tuple of regular "
          f"expressions and a number >= 0, e.g. (('^extra_block/', '^classifier/'), 10.0); "
          f"got {group!r}.")
  choices = {"refresh_at": REFRESH_AT, "loss_weighting": LOSS_WEIGHTINGS}
  for field, allowed_values in choices.items():
    value = config.get(field, allowed_values[0])
    if value not in allowed_values:
      raise InvalidInputError(f"{field}={value!r}; choose one of: {', '.join(allowed_values)}.")
  if config.get("loss_weighting", "per_example") == "batch_mean" and (
      config.method not in methods.DNET_METHODS or config.meta_grad != "driver_only"):
    raise InvalidInputError(
        "loss_weighting='batch_mean' (the public code's Balanced Softmax weighting) reweights "
        "the classifier update only, so it needs a Difficulty-Net method with "
        f"meta_grad='driver_only' (got method={config.method!r}, meta_grad={config.meta_grad!r}).")
  augment = config.data.get("train_augment", "crop_flip")
  if augment not in split_lists.TRAIN_AUGMENTS:
    raise InvalidInputError(f"data.train_augment={augment!r}; choose one of: "
                            f"{', '.join(split_lists.TRAIN_AUGMENTS)}.")
  if "train_augment" in config.data and int(config.data.get("meta_per_class", 0)) < 0:
    raise InvalidInputError(f"data.meta_per_class must be >= 0 (0 = the whole meta list), got "
                            f"{config.data.meta_per_class}.")
  if config.data.source == "imagenet_lt" and int(config.data.get("meta_per_class", 0)) > 0:
    raise InvalidInputError("data.meta_per_class picks images from the validation split list; "
                            "with data.source='imagenet_lt' (TFDS records) set it to 0, or use "
                            "data.source='split_list' with ImageNet_LT_val.txt.")


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
        f"{' and '.join(problems)}): {spec.description}. "
        + ("Resize or convert the images." if model.startswith("small_cnn") else
           "Choose a model for these images (e.g. --config.model=small_cnn) or resize/convert "
           "the images."))
