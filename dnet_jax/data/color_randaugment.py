"""ImageNet-LT training augmentations of the public code, as seeded tf.data functions.

The public Difficulty-Net code trains ImageNet-LT with (RECIPES.md "ImageNet-LT";
ImageNet_Places-LT/datasets/imagenet.py lines 201-217)

    reflect-pad 4 -> RandomResizedCrop 224 -> flip -> ColorJitter(0.4, 0.4, 0.4, 0)
    -> RandAugment "rand-n2-m10-mstd0.5" -> normalise

and Places-LT with the same chain without RandAugment. This module provides the pieces
that `image_folder.preprocess` lacks, on uint8 [H, W, 3] images, each a pure function of
the image and a stateless seed (int32/int64 [2]), so a batch is a function of
(seed, step) whatever the tf.data threading. The random draws are separate
`*_params` functions, so tests (and users) can reproduce exactly what was applied.

ColorJitter (torchvision `transforms.ColorJitter` on PIL images): brightness,
contrast and saturation factors are drawn uniformly in [max(0, 1 - x), 1 + x] and the
three adjustments (`pil_ops.brightness`, `contrast`, `color`; hue 0 is skipped) are
applied in a uniformly random order, each rounding to uint8 as PIL does.

RandAugment, with the semantics of the timm copy in the public code
(ImageNet_Places-LT/datasets/randaugment.py: `_RAND_TRANSFORMS` lines 315-331,
`AutoAugmentOp.__call__` 304-312, `RandAugment.__call__` 399-403, level functions
169-256): 2 ops drawn uniformly with replacement from the 15 below; each is applied
with probability 0.5; its magnitude m ~ N(10, 0.5) clipped to [0, 10]; signed ops are
negated with probability 0.5. With l = m / 10:

    AutoContrast, Equalize, Invert   (no argument)
    Rotate        30 l degrees, signed
    PosterizeTpu  keep int(4 l) bits
    Solarize      threshold int(256 l)
    SolarizeAdd   add int(110 l) below 128
    Color, Contrast, Brightness, Sharpness   factor 1.8 l + 0.1 (unsigned)
    ShearX, ShearY                0.3 l, signed
    TranslateXRel, TranslateYRel  0.45 l x width (height) pixels, signed

Geometric ops fill with the ImageNet mean as uint8, (124, 116, 104)
(imagenet.py:203). Two facts differ from a plain reading of the config string:
the default op set uses the *relative* translations, so the public code's
`translate_const=100` is never read and the largest shift is 0.45 x 224 = 100.8 px;
and the posterize op is timm's "Tpu" variant (0 to 4 bits kept).

Each geometric op resamples with bilinear or bicubic interpolation, chosen with
probability 1/2 each time it is applied (randaugment.py:31-39 and 295,
`_RANDOM_INTERPOLATION`, as the public code passes no interpolation).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

from dnet_jax.data import image_folder
from dnet_jax.data import pil_ops

tf = pil_ops.tf

# These functions are written with explicit tf.cond, so AutoGraph
# (which tf.data applies to a mapped function and everything it calls) has nothing to
# convert; skipping it halves the time to build a pipeline.
_graph_code = tf.autograph.experimental.do_not_convert

# ImageNet mean (0.485, 0.456, 0.406) x 255, rounded: the public code's RandAugment fill.
IMAGENET_FILL = (124, 116, 104)
MAX_MAGNITUDE = 10.0

RAND_AUGMENT_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeTpu", "Solarize",
                    "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX",
                    "ShearY", "TranslateXRel", "TranslateYRel")
SIGNED_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def select_branch(index, branches):
  """`branches[index]()`, as a balanced tree of `tf.cond` (what `tf.switch_case` computes).

  Every branch point costs time inside tf.data even when its heavy side is not taken,
  so RandAugment groups its 15 ops into 3 kinds plus "not applied" (`apply_op`): two
  conds deep per layer.
  """
  if len(branches) == 1:
    return branches[0]()
  half = len(branches) // 2
  return tf.cond(index < half, lambda: select_branch(index, branches[:half]),
                 lambda: select_branch(index - half, branches[half:]))


def split_seed(seed, num: int):
  """`num` independent stateless seeds [num, 2] from one."""
  return tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num)


def reflect_pad(image, padding: int = 4):
  """Mirror-pad the borders without repeating the edge pixel (torch `F.pad(mode="reflect")`)."""
  return tf.pad(image, [[padding, padding], [padding, padding], [0, 0]], mode="REFLECT")


def round_to_uint8(image):
  """A float image in [0, 255] units (e.g. after a resize) -> uint8, rounded and clipped."""
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


# --- ColorJitter ------------------------------------------------------------------------------


class ColorJitterParams(NamedTuple):
  """The draws of one ColorJitter call."""
  factors: tf.Tensor  # float32 [3]: brightness, contrast, saturation factors
  order: tf.Tensor  # int32 [3]: a permutation of (0, 1, 2) = the order they are applied in


def color_jitter_params(seed, brightness: float = 0.4, contrast: float = 0.4,
                        saturation: float = 0.4) -> ColorJitterParams:
  """Factors uniform in [max(0, 1 - x), 1 + x] and a uniformly random order."""
  for name, value in (("brightness", brightness), ("contrast", contrast),
                      ("saturation", saturation)):
    if value < 0:
      raise ValueError(f"ColorJitter {name} must be >= 0, got {value}.")
  factor_seed, order_seed = tf.unstack(split_seed(seed, 2))
  strengths = tf.constant([brightness, contrast, saturation], tf.float32)
  low, high = tf.maximum(0.0, 1.0 - strengths), 1.0 + strengths
  factors = low + (high - low) * tf.random.stateless_uniform([3], factor_seed)
  order = tf.cast(tf.argsort(tf.random.stateless_uniform([3], order_seed)), tf.int32)
  return ColorJitterParams(factors, order)


@_graph_code
def apply_color_jitter(image, params: ColorJitterParams):
  """Brightness (0), contrast (1), saturation (2) adjustments in `params.order`."""
  for position in range(3):
    which = params.order[position]
    # Blend partners: black (brightness), mean grey (contrast), grey image (saturation).
    grey = pil_ops.grayscale(image)
    degenerate = tf.where(which == 0, tf.zeros_like(image), pil_ops.mean_grey_image(image, grey))
    degenerate = tf.where(which == 2, tf.repeat(grey[..., None], 3, axis=-1), degenerate)
    image = pil_ops.blend(degenerate, image, tf.gather(params.factors, which))
  return image


@_graph_code
def color_jitter(image, seed, brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.4):
  """torchvision's `ColorJitter(brightness, contrast, saturation, hue=0)` on a uint8 image."""
  return apply_color_jitter(image, color_jitter_params(seed, brightness, contrast, saturation))


# --- RandAugment ------------------------------------------------------------------------------


class RandAugmentParams(NamedTuple):
  """The draws of one RandAugment call (one entry per layer)."""
  op: tf.Tensor  # int32 [n]: index into RAND_AUGMENT_OPS
  apply: tf.Tensor  # bool [n]: whether the op runs (probability `prob`)
  magnitude: tf.Tensor  # float32 [n]: in [0, MAX_MAGNITUDE]
  negate: tf.Tensor  # bool [n]: flip the sign of a signed op's argument
  bicubic: tf.Tensor  # bool [n]: geometric ops resample bicubic (else bilinear)


def rand_augment_params(seed, num_layers: int = 2, magnitude: float = 10.0,
                        magnitude_std: float = 0.5, prob: float = 0.5) -> RandAugmentParams:
  """Ops uniform with replacement, Bernoulli(prob) application, magnitude
  clip(N(magnitude, magnitude_std), 0, 10), Bernoulli(0.5) sign and Bernoulli(0.5)
  bicubic resampling."""
  if num_layers < 0 or not 0.0 <= prob <= 1.0 or magnitude_std < 0:
    raise ValueError(f"RandAugment needs num_layers >= 0, 0 <= prob <= 1 and magnitude_std "
                     f">= 0; got {num_layers}, {prob}, {magnitude_std}.")
  op_seed, apply_seed, magnitude_seed, sign_seed, resample_seed = tf.unstack(
      split_seed(seed, 5))
  op = tf.random.stateless_uniform([num_layers], op_seed, minval=0,
                                   maxval=len(RAND_AUGMENT_OPS), dtype=tf.int32)
  apply = tf.random.stateless_uniform([num_layers], apply_seed) < prob
  noise = tf.random.stateless_normal([num_layers], magnitude_seed)
  drawn = tf.clip_by_value(magnitude + magnitude_std * noise, 0.0, MAX_MAGNITUDE)
  negate = tf.random.stateless_uniform([num_layers], sign_seed) < 0.5
  bicubic = tf.random.stateless_uniform([num_layers], resample_seed) < 0.5
  return RandAugmentParams(op, apply, drawn, negate, bicubic)


# Each op is one of three kinds, computed by one branch each (see `select_branch`): a
# per-channel lookup table, a blend with a degenerate image, or an affine warp;
# `_POSITION` is the op's place among the candidates of its kind.
_LUT, _BLEND, _AFFINE, _IDENTITY = 0, 1, 2, 3
_KIND = (_LUT, _LUT, _LUT, _AFFINE, _LUT, _LUT, _LUT, _BLEND, _BLEND, _BLEND, _BLEND, _AFFINE,
         _AFFINE, _AFFINE, _AFFINE)
_POSITION = (0, 1, 2, 0, 3, 4, 5, 0, 1, 2, 3, 1, 2, 3, 4)


def _lut_op(image, position, level):
  """AutoContrast, Equalize, Invert, PosterizeTpu, Solarize, SolarizeAdd (positions 0-5)."""
  histogram = pil_ops.histograms(image)
  luts = tf.stack([pil_ops.auto_contrast_lut(histogram), pil_ops.equalize_lut(histogram),
                   pil_ops.invert_lut(), pil_ops.posterize_lut(tf.cast(level * 4.0, tf.int32)),
                   pil_ops.solarize_lut(tf.cast(level * 256.0, tf.int32)),
                   pil_ops.solarize_add_lut(tf.cast(level * 110.0, tf.int32))])
  return pil_ops.apply_lut(image, tf.gather(luts, position))


def _degenerate(image, position):
  """The blend partner of Color (0), Contrast (1), Brightness (2), Sharpness (3)."""
  grey = pil_ops.grayscale(image)
  degenerate = tf.where(position == 0, tf.repeat(grey[..., None], 3, axis=-1),
                        pil_ops.mean_grey_image(image, grey))
  degenerate = tf.where(position == 2, tf.zeros_like(image), degenerate)
  return tf.cond(position == 3, lambda: pil_ops.smooth(image), lambda: degenerate)


def _affine_op(image, position, level, sign, fill, bicubic):
  """Rotate, ShearX, ShearY, TranslateXRel, TranslateYRel (positions 0-4)."""
  shape = tf.shape(image)
  height, width = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
  signed = sign * level
  matrices = tf.stack([pil_ops.rotation_matrix(signed * 30.0, shape[0], shape[1]),
                       pil_ops.shear_x_matrix(signed * 0.3), pil_ops.shear_y_matrix(signed * 0.3),
                       pil_ops.translate_x_matrix(signed * 0.45 * width),
                       pil_ops.translate_y_matrix(signed * 0.45 * height)])
  return pil_ops.affine(image, tf.gather(matrices, position), fill, bicubic)


@_graph_code
def apply_op(image, op, magnitude, negate=False, fill: Sequence[int] = IMAGENET_FILL,
             enabled=True, bicubic=False):
  """One RandAugment op (index into RAND_AUGMENT_OPS) at `magnitude` in [0, 10].

  With level l = magnitude / 10 in float64 (as timm computes it in Python) and the sign
  -1 where `negate`, the arguments are those of the module docstring. Where `enabled`
  is False the image is returned unchanged (one branch more, not a separate cond);
  geometric ops resample bicubic where `bicubic`, else bilinear.
  """
  op = tf.cast(op, tf.int32)
  level = tf.cast(magnitude, tf.float64) / MAX_MAGNITUDE
  sign = tf.where(tf.cast(negate, tf.bool), tf.constant(-1.0, tf.float64),
                  tf.constant(1.0, tf.float64))
  kind = tf.where(tf.cast(enabled, tf.bool), tf.gather(tf.constant(_KIND), op), _IDENTITY)
  position = tf.gather(tf.constant(_POSITION), op)
  return select_branch(kind, [
      lambda: _lut_op(image, position, level),
      lambda: pil_ops.blend(_degenerate(image, position), image, level * 1.8 + 0.1),
      lambda: _affine_op(image, position, level, sign, fill, tf.cast(bicubic, tf.bool)),
      lambda: tf.identity(image)])


@_graph_code
def apply_rand_augment(image, params: RandAugmentParams, fill: Sequence[int] = IMAGENET_FILL):
  """The layers of `params` in order, each only where `params.apply` is set."""
  for layer in range(params.op.shape[0]):
    image = apply_op(image, params.op[layer], params.magnitude[layer], params.negate[layer],
                     fill, enabled=params.apply[layer], bicubic=params.bicubic[layer])
  return image


@_graph_code
def rand_augment(image, seed, num_layers: int = 2, magnitude: float = 10.0,
                 magnitude_std: float = 0.5, fill: Sequence[int] = IMAGENET_FILL):
  """timm's `rand_augment_transform("rand-n2-m10-mstd0.5")` on a uint8 image (defaults)."""
  return apply_rand_augment(image, rand_augment_params(seed, num_layers, magnitude,
                                                       magnitude_std), fill)


# --- the whole training transform ------------------------------------------------------------


@_graph_code
def train_augment(image, seed, *, image_size: int = 224, padding: int = 4,
                  color_jitter_strength: float | None = 0.4, use_rand_augment: bool = True,
                  fill: Sequence[int] = IMAGENET_FILL):
  """uint8 [H, W, 3] -> augmented uint8 [image_size, image_size, 3], before normalisation.

  reflect-pad `padding` -> RandomResizedCrop (`image_folder.random_resized_crop`) ->
  horizontal flip -> ColorJitter(x, x, x) (skipped when None) -> RandAugment
  (when `use_rand_augment`): the public ImageNet-LT chain with the defaults, the
  Places-LT chain with `use_rand_augment=False`.
  """
  crop_seed, flip_seed, jitter_seed, augment_seed = tf.unstack(split_seed(seed, 4))
  if padding:
    image = reflect_pad(image, padding)
  image = round_to_uint8(image_folder.random_resized_crop(image, crop_seed, image_size))
  image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  if color_jitter_strength is not None:
    x = float(color_jitter_strength)
    image = color_jitter(image, jitter_seed, x, x, x)
  if use_rand_augment:
    image = rand_augment(image, augment_seed, fill=fill)
  image.set_shape([image_size, image_size, 3])
  return image
