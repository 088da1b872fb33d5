"""ImageNet-LT training augmentations of the public code, as seeded tf.data functions.

The public Difficulty-Net code trains ImageNet-LT with (RECIPES.md "ImageNet-LT";
ImageNet_Places-LT/datasets/imagenet.py lines 201-217)

    reflect-pad 4 -> RandomResizedCrop 224 -> flip -> ColorJitter(0.4, 0.4, 0.4, 0)
    -> RandAugment "rand-n2-m10-mstd0.5" -> normalise

and Places-LT with the same chain without RandAugment. This module provides the pieces
that `split_lists.preprocess` lacks, each a pure function of the image and a
stateless seed (int32/int64 [2]), so a batch is a function of (seed, step) whatever
the tf.data threading. The random draws are separate `*_params` functions, so tests
(and users) can reproduce exactly what was applied. `train_augment` (decoded uint8
image) and `train_augment_encoded` (file bytes) run the whole chain.

RandAugment has two forms with the same results. `apply_rand_augment` augments one
image, choosing each layer's kernel with `select_branch`; `apply_rand_augment_batch`
augments a batch with per-image draws (with `split_lists.examples_dataset(
batch_rand_augment=True)` a tf.data pipeline maps the rest of the chain and
`train_rand_augment_params` per example, then this after `batch()`; per example is
that function's default), splitting each layer's batch by op kind so that each kernel
runs once per batch. The kernels (`_lut_ops`, `_blend_ops`,
`_affine_ops`, on the batch-capable building blocks of `pil_ops`) compute every image
of a batch as alone, so the two forms agree bit for bit.

For speed the chain never builds the padded image: the crop box is drawn for the
padded shape and its rows and columns are mapped back through the reflection
(`padded_crop_window`); every colour and RandAugment op then runs on the
image_size x image_size crop, as float32 grey levels (`pil_ops.levels`), converting
to uint8 once at the end.

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

from dnet_jax.data import tf_images
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
  """Brightness (0), contrast (1), saturation (2) adjustments in `params.order`.

  One code path for all three: each blends with scale L + offset (`pil_ops.grey_blend_partner`),
  (0, 0) for brightness, (0, int(mean L + 0.5)) for contrast and (1, 0) for saturation,
  so no branch is taken per image. Works on float32 levels; returns `image`'s dtype.
  """
  x = pil_ops.levels(image)
  for position in range(3):
    which = params.order[position]
    grey = pil_ops.grayscale_levels(x)
    scale = tf.cast(tf.equal(which, 2), tf.float32)
    offset = tf.cast(tf.equal(which, 1), tf.float32) * pil_ops.mean_grey_level(grey)
    degenerate = pil_ops.grey_blend_partner(x, scale, offset, grey)
    x = pil_ops.blend_levels(degenerate, x, tf.gather(params.factors, which))
  return pil_ops._like(x, image)  # pylint: disable=protected-access


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


# Each op is one of three kinds, computed by one batched kernel each: a per-channel lookup
# table, a blend with a degenerate image, or an affine warp; `_POSITION` is the op's place
# among the candidates of its kind. The per-image path (`apply_op`) picks the kernel with
# `select_branch` and runs it on a batch of one; the batch path (`apply_rand_augment_batch`)
# splits the batch by kind with `pil_ops.partitioned` and runs each kernel once.
_LUT, _BLEND, _AFFINE, _IDENTITY = 0, 1, 2, 3
_KIND = (_LUT, _LUT, _LUT, _AFFINE, _LUT, _LUT, _LUT, _BLEND, _BLEND, _BLEND, _BLEND, _AFFINE,
         _AFFINE, _AFFINE, _AFFINE)
_POSITION = (0, 1, 2, 0, 3, 4, 5, 0, 1, 2, 3, 1, 2, 3, 4)


def _lut_ops(x, position, level):
  """AutoContrast, Equalize, Invert, PosterizeTpu, Solarize, SolarizeAdd (positions 0-5) on
  a batch of levels [N, H, W, 3] (position [N], level float64 [N]): every image's 6
  tables are built and its own gathered; histograms only for the first two ops."""
  histogram = pil_ops.partitioned(
      position < 2, [lambda x: tf.zeros(tf.stack([tf.shape(x)[0], 3, 256]), tf.int64),
                     pil_ops.histograms], x)
  count = tf.shape(x)[0]
  invert = tf.broadcast_to(pil_ops.invert_lut(), tf.stack([count, 3, 256]))
  luts = tf.stack([pil_ops.auto_contrast_lut(histogram), pil_ops.equalize_lut(histogram),
                   invert, pil_ops.posterize_lut(tf.cast(level * 4.0, tf.int32)),
                   pil_ops.solarize_lut(tf.cast(level * 256.0, tf.int32)),
                   pil_ops.solarize_add_lut(tf.cast(level * 110.0, tf.int32))], axis=1)
  return pil_ops.apply_lut(x, tf.gather(luts, position, batch_dims=1))


def _grey_partners(x, position):
  """The Color (0), Contrast (1) and Brightness (2) degenerate images: scale L + offset
  (`pil_ops.grey_blend_partner`), one formula for all three."""
  grey = pil_ops.grayscale_levels(x)
  scale = tf.cast(tf.equal(position, 0), tf.float32)
  offset = tf.cast(tf.equal(position, 1), tf.float32) * pil_ops.mean_grey_level(grey)
  return pil_ops.grey_blend_partner(x, pil_ops.per_image(scale), pil_ops.per_image(offset), grey)


def _blend_ops(x, position, level):
  """Color (0), Contrast (1), Brightness (2), Sharpness (3) on a batch of levels: a blend
  with factor 1.8 l + 0.1; the smoothed image (Sharpness) is computed only for the images
  that blend with it."""
  def with_grey(x, position, factor):
    return pil_ops.blend_levels(_grey_partners(x, position), x, pil_ops.per_image(factor))

  def with_smooth(x, position, factor):
    del position
    return pil_ops.blend_levels(pil_ops.smooth(x), x, pil_ops.per_image(factor))

  return pil_ops.partitioned(tf.equal(position, 3), [with_grey, with_smooth], x, position,
                             level * 1.8 + 0.1)


def _affine_ops(x, position, level, sign, fill, bicubic):
  """Rotate, ShearX, ShearY, TranslateXRel, TranslateYRel (positions 0-4) on a batch of
  levels: one warp (`pil_ops.affine_batch`) with each image's matrix and resampling."""
  shape = tf.shape(x)
  height, width = tf.cast(shape[1], tf.float64), tf.cast(shape[2], tf.float64)
  signed = sign * level
  matrices = tf.stack([pil_ops.rotation_matrix(signed * 30.0, shape[1], shape[2]),
                       pil_ops.shear_x_matrix(signed * 0.3), pil_ops.shear_y_matrix(signed * 0.3),
                       pil_ops.translate_x_matrix(signed * 0.45 * width),
                       pil_ops.translate_y_matrix(signed * 0.45 * height)], axis=1)
  return pil_ops.affine_batch(x, tf.gather(matrices, position, batch_dims=1), fill, bicubic)


def _op_arguments(op, magnitude, negate, enabled):
  """(kind, position, level, sign) of ops: level l = magnitude / 10 in float64 (as timm
  computes it in Python), sign -1 where `negate`, kind `_IDENTITY` where not `enabled`."""
  op = tf.cast(op, tf.int32)
  level = tf.cast(magnitude, tf.float64) / MAX_MAGNITUDE
  sign = tf.where(tf.cast(negate, tf.bool), tf.constant(-1.0, tf.float64),
                  tf.constant(1.0, tf.float64))
  kind = tf.where(tf.cast(enabled, tf.bool), tf.gather(tf.constant(_KIND), op), _IDENTITY)
  return kind, tf.gather(tf.constant(_POSITION), op), level, sign


def _kernels(fill):
  """The kernels by kind, each f(x, position, level, sign, bicubic) on a batch."""
  return [lambda x, position, level, sign, bicubic: _lut_ops(x, position, level),
          lambda x, position, level, sign, bicubic: _blend_ops(x, position, level),
          lambda x, position, level, sign, bicubic: _affine_ops(x, position, level, sign,
                                                                fill, bicubic),
          lambda x, *_: x]


@_graph_code
def apply_op(image, op, magnitude, negate=False, fill: Sequence[int] = IMAGENET_FILL,
             enabled=True, bicubic=False):
  """One RandAugment op (index into RAND_AUGMENT_OPS) at `magnitude` in [0, 10].

  With level l = magnitude / 10 in float64 (as timm computes it in Python) and the sign
  -1 where `negate`, the arguments are those of the module docstring. Where `enabled`
  is False the image is returned unchanged (one branch more, not a separate cond);
  geometric ops resample bicubic where `bicubic`, else bilinear. The op's kernel is
  chosen by `select_branch` and run on a batch of one.
  """
  x = pil_ops.levels(image)[None]
  kind, position, level, sign = _op_arguments(op, magnitude, negate, enabled)
  arguments = [tf.reshape(a, [1]) for a in (position, level, sign, tf.cast(bicubic, tf.bool))]
  out = select_branch(kind, [lambda kernel=kernel: kernel(x, *arguments)
                             for kernel in _kernels(fill)])
  return pil_ops._like(out[0], image)  # pylint: disable=protected-access


@_graph_code
def apply_rand_augment(image, params: RandAugmentParams, fill: Sequence[int] = IMAGENET_FILL):
  """The layers of `params` in order, each only where `params.apply` is set."""
  x = pil_ops.levels(image)
  for layer in range(params.op.shape[0]):
    x = apply_op(x, params.op[layer], params.magnitude[layer], params.negate[layer],
                 fill, enabled=params.apply[layer], bicubic=params.bicubic[layer])
  return pil_ops._like(x, image)  # pylint: disable=protected-access


@_graph_code
def apply_rand_augment_batch(images, params: RandAugmentParams,
                             fill: Sequence[int] = IMAGENET_FILL):
  """`apply_rand_augment` of every image of a batch [B, H, W, 3], with per-image draws
  (`params` fields [B, layers], e.g. `rand_augment_params` stacked by `ds.batch()`).

  For each layer the batch is split by op kind (LUT, blend, affine, not applied) with
  `pil_ops.partitioned`; each kind's kernel runs once on its images, with their own
  arguments, and the images are put back in order; images whose op is not applied
  cost nothing. Equal to `apply_rand_augment` image by image (the kernels are the same
  and compute each image of a batch as alone).
  """
  x = pil_ops.levels(images)
  kernels = _kernels(fill)
  for layer in range(params.op.shape[1]):
    kind, position, level, sign = _op_arguments(params.op[:, layer], params.magnitude[:, layer],
                                                 params.negate[:, layer], params.apply[:, layer])
    x = pil_ops.partitioned(kind, kernels, x, position, level, sign,
                            tf.cast(params.bicubic[:, layer], tf.bool))
  return pil_ops._like(x, images)  # pylint: disable=protected-access


@_graph_code
def rand_augment(image, seed, num_layers: int = 2, magnitude: float = 10.0,
                 magnitude_std: float = 0.5, fill: Sequence[int] = IMAGENET_FILL):
  """timm's `rand_augment_transform("rand-n2-m10-mstd0.5")` on a uint8 image (defaults)."""
  return apply_rand_augment(image, rand_augment_params(seed, num_layers, magnitude,
                                                       magnitude_std), fill)


# --- reflect padding + RandomResizedCrop without building the padded image -----------------


def _reflect(index, size):
  """Source index of padded position `index` (original coordinates, -size < index <
  2 size - 1) under torch's "reflect" padding: -i below 0, 2 (size - 1) - i above."""
  index = tf.abs(index)
  return (size - 1) - tf.abs((size - 1) - index)


@_graph_code
def padded_crop_window(height, width, seed, padding: int = 4, area_range=(0.08, 1.0),
                       aspect_ratio_range=(3 / 4, 4 / 3), max_attempts: int = 10):
  """The RandomResizedCrop box of the reflect-padded image, as source rows and columns.

  The box is `tf_images.random_resized_crop`'s, drawn for the padded shape
  (H + 2 padding, W + 2 padding); its rows r map to original rows reflect(r - padding)
  (`_reflect`), so the padded image is never built and only the part of the original
  under the box needs decoding. Returns int32 `rows`, `cols`.
  """
  height, width = tf.cast(height, tf.int32), tf.cast(width, tf.int32)
  check = tf.debugging.assert_greater(
      tf.minimum(height, width), padding,
      message=f"reflect padding {padding} needs images larger than {padding} pixels on each "
              "side; resize such images first or lower the padding.")
  with tf.control_dependencies([check]):
    padded = tf.stack([height + 2 * padding, width + 2 * padding, 3])
  whole = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, shape=[1, 1, 4])
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      padded, bounding_boxes=whole, seed=seed, min_object_covered=0.0,
      aspect_ratio_range=aspect_ratio_range, area_range=area_range,
      max_attempts=max_attempts, use_image_if_no_bounding_boxes=True)
  rows = _reflect(tf.range(begin[0], begin[0] + size[0]) - padding, height)
  cols = _reflect(tf.range(begin[1], begin[1] + size[1]) - padding, width)
  return rows, cols


def _take_axis(image, index, axis: int):
  """`tf.gather(image, index, axis)`, as a slice where `index` is a run of consecutive
  indices (a box clear of the padding): a gather of single pixels costs more."""
  size = tf.size(index)
  run = tf.equal(index[-1] - index[0], size - 1)
  begin = tf.one_hot(axis, 3, on_value=index[0], off_value=0)
  extent = tf.one_hot(axis, 3, on_value=size, off_value=-1)
  return tf.cond(run, lambda: tf.slice(image, begin, extent),
                 lambda: tf.gather(image, index, axis=axis))


def _take(image, rows, cols, top=0, left=0):
  """image[rows - top][:, cols - left]."""
  return _take_axis(_take_axis(image, rows - top, 0), cols - left, 1)


def _resize_levels(crop, image_size: int):
  """Bilinear antialiased resize (as `tf_images.random_resized_crop`), rounded to
  integer float32 levels."""
  resized = tf.image.resize(crop, [image_size, image_size], method="bilinear", antialias=True)
  return tf.clip_by_value(tf.round(resized), 0.0, 255.0)


@_graph_code
def padded_random_resized_crop(image, seed, image_size: int, padding: int = 4):
  """reflect-pad `padding` -> RandomResizedCrop `image_size` on a decoded image, as float32
  levels (equal to `reflect_pad` then `tf_images.random_resized_crop`, rounded)."""
  shape = tf.shape(image)
  rows, cols = padded_crop_window(shape[0], shape[1], seed, padding)
  return _resize_levels(_take(image, rows, cols), image_size)


# Reach of libjpeg's "fancy" chroma upsampling: one chroma sample, 2 pixels at 2x subsampling.
_JPEG_MARGIN = 2


@_graph_code
def decode_padded_random_resized_crop(image_bytes, seed, image_size: int, padding: int = 4,
                                      crop_before_decode: bool = False):
  """`padded_random_resized_crop` of encoded image bytes (JPEG, PNG, BMP, GIF).

  With `crop_before_decode`, a JPEG's size comes from its header
  (`tf.io.extract_jpeg_shape`) and `tf.image.decode_and_crop_jpeg` decodes only the
  rectangle of the original under the padded box, plus a 2-pixel margin so the box's
  pixels equal a full decode. It is off by default: with TensorFlow's libjpeg it was
  slower than a full decode on ImageNet-sized photos (see
  experiments/stream_augment_benchmark.py, which measures both).
  """
  def cropped_jpeg():
    shape = tf.io.extract_jpeg_shape(image_bytes)
    rows, cols = padded_crop_window(shape[0], shape[1], seed, padding)
    # libjpeg's chroma upsampling at the edge of a decoded window replicates the edge
    # instead of reading the neighbouring chroma sample; the margin keeps it off the box.
    top = tf.maximum(tf.reduce_min(rows) - _JPEG_MARGIN, 0)
    left = tf.maximum(tf.reduce_min(cols) - _JPEG_MARGIN, 0)
    bottom = tf.minimum(tf.reduce_max(rows) + _JPEG_MARGIN, shape[0] - 1)
    right = tf.minimum(tf.reduce_max(cols) + _JPEG_MARGIN, shape[1] - 1)
    window = tf.stack([top, left, bottom - top + 1, right - left + 1])
    crop = tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)
    return _take(crop, rows, cols, top, left)

  def decoded():
    image = tf_images.decode_image(image_bytes)
    shape = tf.shape(image)
    return _take(image, *padded_crop_window(shape[0], shape[1], seed, padding))

  if crop_before_decode:
    crop = tf.cond(tf.io.is_jpeg(image_bytes), cropped_jpeg, decoded)
  else:
    crop = decoded()
  crop.set_shape([None, None, 3])
  return _resize_levels(crop, image_size)


# --- the whole training transform ------------------------------------------------------------


def _chain_seeds(seed):
  """The seeds of the chain's crop, flip, ColorJitter and RandAugment draws."""
  return tf.unstack(split_seed(seed, 4))


def train_rand_augment_params(seed) -> RandAugmentParams:
  """The RandAugment draws of `train_augment(image, seed)`: with them,
  `apply_rand_augment_batch` of a batch of `train_augment(..., use_rand_augment=False)`
  images equals `train_augment` image by image (the batch-level form of the chain)."""
  return rand_augment_params(_chain_seeds(seed)[3])


def _augment_crop(x, flip_seed, jitter_seed, augment_seed, color_jitter_strength,
                  use_rand_augment, fill):
  """flip -> ColorJitter -> RandAugment on float32 levels; uint8 out."""
  x = tf.image.stateless_random_flip_left_right(x, flip_seed)
  if color_jitter_strength is not None:
    strength = float(color_jitter_strength)
    x = apply_color_jitter(x, color_jitter_params(jitter_seed, strength, strength, strength))
  if use_rand_augment:
    x = apply_rand_augment(x, rand_augment_params(augment_seed), fill)
  return tf.cast(x, tf.uint8)


@_graph_code
def train_augment(image, seed, *, image_size: int = 224, padding: int = 4,
                  color_jitter_strength: float | None = 0.4, use_rand_augment: bool = True,
                  fill: Sequence[int] = IMAGENET_FILL):
  """uint8 [H, W, 3] -> augmented uint8 [image_size, image_size, 3], before normalisation.

  reflect-pad `padding` -> RandomResizedCrop (the box of `tf_images.random_resized_crop`,
  see `padded_crop_window`) -> horizontal flip -> ColorJitter(x, x, x) (skipped when
  None) -> RandAugment (when `use_rand_augment`): the public ImageNet-LT chain with the
  defaults, the Places-LT chain with `use_rand_augment=False`. The colour and
  RandAugment ops run on the 224 x 224 crop, in float32 levels. A tf.data pipeline
  can instead map this with `use_rand_augment=False` and apply RandAugment after
  `batch()` (`train_rand_augment_params`, `apply_rand_augment_batch`): same images.
  """
  crop_seed, flip_seed, jitter_seed, augment_seed = _chain_seeds(seed)
  x = padded_random_resized_crop(image, crop_seed, image_size, padding)
  image = _augment_crop(x, flip_seed, jitter_seed, augment_seed, color_jitter_strength,
                        use_rand_augment, fill)
  image.set_shape([image_size, image_size, 3])
  return image


@_graph_code
def train_augment_encoded(image_bytes, seed, *, image_size: int = 224, padding: int = 4,
                          color_jitter_strength: float | None = 0.4,
                          use_rand_augment: bool = True, fill: Sequence[int] = IMAGENET_FILL):
  """`train_augment(tf_images.decode_image(image_bytes), seed, ...)` (crop by
  `decode_padded_random_resized_crop`): the form for a tf.data pipeline over files."""
  crop_seed, flip_seed, jitter_seed, augment_seed = _chain_seeds(seed)
  x = decode_padded_random_resized_crop(image_bytes, crop_seed, image_size, padding)
  image = _augment_crop(x, flip_seed, jitter_seed, augment_seed, color_jitter_strength,
                        use_rand_augment, fill)
  image.set_shape([image_size, image_size, 3])
  return image
