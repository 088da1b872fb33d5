"""PIL's image operations as TensorFlow functions on uint8 [H, W, 3] images (tf.data-ready).

The public Difficulty-Net code augments ImageNet-LT with torchvision's ColorJitter and
timm's RandAugment, both of which call Pillow (ImageEnhance, ImageOps, Image.transform).
These functions reproduce those Pillow operations with TensorFlow ops, so they run
inside a `tf.data` map (graph mode, parallel C++ threads) and take their arguments as
tensors. Each follows Pillow's arithmetic where it is documented or visible in its
Python source; tests/test_color_randaugment.py compares every one with Pillow itself.
Each accepts uint8 or float32 images and returns the input's dtype; internally they
work on float32 grey levels (integers 0..255, exact in float32, as are Pillow's integer
sums below 2^24), so a chain of ops converts only at its ends.

The building blocks (`mean_grey_level`, `grey_blend_partner`, `blend_levels`, `smooth`,
`histograms`, the `*_lut` functions, `apply_lut`, the `*_matrix` functions and
`affine_batch`) also take a batch [N, H, W, 3] with per-image arguments ([N] values,
[N, 3, 256] tables, [N, 6] matrices), computing each image exactly as alone:
the batch-level RandAugment of `color_randaugment` runs one call per op kind on all
the images that draw it (`partitioned`).

- Point operations (Pillow `ImageOps`): `invert` (255 - x), `posterize` (x & ~(2^(8-bits)
  - 1)), `solarize` (x < t ? x : 255 - x), `solarize_add` (x < 128 ? min(255, x + a) : x),
  `auto_contrast` (per channel, lut(i) = clip(int(i * 255 / (hi - lo) - lo * 255 / (hi -
  lo)), 0, 255) over the channel's min lo and max hi), `equalize` (per channel, with
  step = (N - h[last non-empty bin]) // 255: lut(i) = (step // 2 + sum_{j<i} h[j]) // step,
  identity if step is 0 or one bin only). Exact.
- Blends (Pillow `ImageEnhance`): out = trunc(clip(d + f (x - d), 0, 255)) computed in
  float32 as Pillow's `Image.blend` does, with the degenerate image d: black
  (`brightness`), the grey image L = (19595 R + 38470 G + 7471 B + 2^15) >> 16 (`color`),
  the constant int(mean(L) + 0.5) (`contrast`), or the 3x3 SMOOTH filter
  ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, rounded, border pixels unfiltered) (`sharpness`).
- Affine warps (Pillow `Image.transform(AFFINE)` / `Image.rotate`): output pixel (x, y)
  samples the input at (a (x + .5) + b (y + .5) + c, d (x + .5) + e (y + .5) + f) in
  continuous coordinates; a sample outside [0, W) x [0, H) is the fill colour, inside it
  is bilinear or bicubic (Pillow's a = -1 cubic) with edge-clamped neighbours,
  clipped and truncated to uint8. The domain test is float64 as in Pillow, the
  interpolation float32 (see `affine`): a truncated value can differ by 1.
  Bicubic samples that stay on their row (shears and translations in x) or column
  (in y) weigh only the 4 neighbours on it (`affine_batch`).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

from dnet_jax.data import tf_images

# TensorFlow with the accelerators hidden from it (JAX owns them).
tf = tf_images.tf_module()

# ITU-R 601-2 luma in Pillow's fixed point (Convert.c, "L24"): weights / 2^16.
_LUMA_WEIGHTS = (19595, 38470, 7471)


def levels(image):
  """An image as float32 grey levels (the working type: every function below keeps
  integer values in [0, 255] in float32, which holds them, and Pillow's integer sums
  below 2^24, exactly; a chain of ops then converts once at each end)."""
  return tf.cast(image, tf.float32)


def _like(values, image):
  """float32 levels back to the dtype of `image` (no op when that is float32)."""
  return tf.cast(values, tf.as_dtype(getattr(image, "dtype", "uint8")))


def per_image(values):
  """Per-image values [N] shaped [N, 1, 1, 1], to broadcast against a batch [N, H, W, 3]."""
  return tf.reshape(values, [-1, 1, 1, 1])


def partitioned(group, fns, *args):
  """Image i of the batch computed by `fns[group[i]]`: each function runs once, on the
  images of its group (`args`: per-image tensors, leading dimension N, gathered by
  `tf.dynamic_partition` of the image indices), and the results are put back in order
  (`tf.dynamic_stitch`). A group without images runs its function on empty tensors,
  which costs next to nothing (a `tf.cond` around it would cost more inside tf.data).
  The functions return per-image results of one dtype, leading dimension their
  images'.
  """
  group = tf.cast(group, tf.int32)
  indices = tf.dynamic_partition(tf.range(tf.shape(group)[0]), group, len(fns))
  outs = [fn(*[tf.gather(arg, index) for arg in args]) for fn, index in zip(fns, indices)]
  return tf.dynamic_stitch(indices, outs)


def _truncate(values):
  """Clip to [0, 255] and truncate, as Pillow's blends and warps store their results."""
  return tf.floor(tf.clip_by_value(values, 0.0, 255.0))


def grayscale_levels(x):
  """Pillow's RGB -> L conversion, (19595 R + 38470 G + 7471 B + 32768) >> 16, float32
  [..., H, W] (every partial sum is an integer below 2^24, so float32 is exact in any
  order: one matrix product over the channels)."""
  luma = tf.tensordot(x, tf.constant(_LUMA_WEIGHTS, tf.float32), axes=[[-1], [0]])
  return tf.floor((luma + 32768.0) * (1.0 / 65536.0))


def grayscale(image):
  """`grayscale_levels` as uint8 [H, W]."""
  return tf.cast(grayscale_levels(levels(image)), tf.uint8)


def mean_grey_level(grey):
  """int(mean(L) + 0.5) of grey images [..., H, W], one per image (`ImageEnhance.Contrast`'s
  degenerate level)."""
  mean = tf.reduce_mean(tf.cast(grey, tf.float64), axis=[-2, -1])
  return tf.cast(tf.floor(mean + 0.5), tf.float32)


def blend_levels(degenerate, x, factor):
  """Pillow's `Image.blend(degenerate, image, factor)` on float32 levels: the float32
  value d + f (x - d), clipped and truncated (Blend.c)."""
  return _truncate(degenerate + tf.cast(factor, tf.float32) * (x - degenerate))


def blend(degenerate, image, factor):
  """`blend_levels` on images of any dtype (the result has `image`'s dtype)."""
  return _like(blend_levels(levels(degenerate), levels(image), factor), image)


def grey_blend_partner(x, scale, offset, grey=None):
  """scale L + offset, [..., H, W, 1] (one channel that broadcasts against the image's
  three): the degenerate image of `ImageEnhance` Color (1, 0), Contrast (0, mean level)
  and Brightness (0, 0), as one formula so one code path serves all three (for a
  batch, `scale` and `offset` are `per_image`)."""
  grey = grayscale_levels(x) if grey is None else grey
  return scale * grey[..., None] + offset


def brightness(image, factor):
  """`ImageEnhance.Brightness(image).enhance(factor)`: blend with black."""
  x = levels(image)
  return _like(blend_levels(tf.zeros_like(x), x, factor), image)


def grey_image(image):
  """The degenerate image of `ImageEnhance.Color`: L replicated to 3 channels."""
  x = levels(image)
  return _like(tf.broadcast_to(grey_blend_partner(x, 1.0, 0.0), tf.shape(x)), image)


def mean_grey_image(image, grey=None):
  """The degenerate image of `ImageEnhance.Contrast`: int(mean(L) + 0.5) everywhere
  (`grey`: the image's `grayscale`, when already computed)."""
  x = levels(image)
  grey = grayscale_levels(x) if grey is None else levels(grey)
  return _like(tf.fill(tf.shape(x), mean_grey_level(grey)), image)


def color(image, factor):
  """`ImageEnhance.Color(image).enhance(factor)`: blend with the grey image (saturation)."""
  x = levels(image)
  return _like(blend_levels(grey_blend_partner(x, 1.0, 0.0), x, factor), image)


def contrast(image, factor):
  """`ImageEnhance.Contrast(image).enhance(factor)`: blend with the mean grey level."""
  x = levels(image)
  mean = mean_grey_level(grayscale_levels(x))
  return _like(blend_levels(mean * tf.ones_like(x), x, factor), image)


def smooth(image):
  """Pillow's `ImageFilter.SMOOTH`: 3x3 kernel [[1,1,1],[1,5,1],[1,1,1]] / 13, rounded;
  the first and last rows and columns are copied unfiltered (Pillow's Filter.c).
  [H, W, 3] or a batch [N, H, W, 3]."""
  x = levels(image)
  shape = tf.shape(x)
  height, width = shape[-3], shape[-2]
  # Integer sums (exact in float32, in any order) of the 9 shifted copies; then
  # floor((2 k + 13) / 26) = round(k / 13): the quotient is never within float32 rounding
  # of an integer unless it is one, as 26 is small.
  sums = 4.0 * x[..., 1:height - 1, 1:width - 1, :]
  for row in range(3):
    for col in range(3):
      sums += x[..., row:height - 2 + row, col:width - 2 + col, :]
  padding = [[0, 0]] * (x.shape.rank - 3) + [[1, 1], [1, 1], [0, 0]]
  interior = tf.pad(tf.floor((2.0 * sums + 13.0) / 26.0), padding)
  rows = tf.range(height)[:, None, None]
  cols = tf.range(width)[None, :, None]
  inside = (rows > 0) & (rows < height - 1) & (cols > 0) & (cols < width - 1)
  return _like(tf.where(inside, interior, x), image)


def sharpness(image, factor):
  """`ImageEnhance.Sharpness(image).enhance(factor)`: blend with the smoothed image."""
  x = levels(image)
  return _like(blend_levels(smooth(x), x, factor), image)


_CHANNEL_OFFSETS = (0, 256, 512)


def _flat_index(x):
  """Index of each value of [H, W, 3] (or a batch [N, H, W, 3]) into 3 (or N x 3)
  concatenated per-channel tables of 256 entries."""
  offsets = tf.constant(_CHANNEL_OFFSETS, tf.int32)
  if x.shape.rank == 4:
    offsets += 768 * tf.range(tf.shape(x)[0])[:, None, None, None]
  return tf.cast(x, tf.int32) + offsets


def apply_lut(image, luts):
  """Per-channel lookup table: out[..., c] = luts[c, image[..., c]], luts int [3, 256]
  (one gather from the 768 concatenated entries); for a batch [N, H, W, 3], one table
  per image, luts [N, 3, 256] (one gather from N x 768 entries)."""
  luts = tf.cast(tf.convert_to_tensor(luts), tf.float32)
  return _like(tf.gather(tf.reshape(luts, [-1]), _flat_index(levels(image))), image)


def _same_for_channels(lut):
  """A table [..., 256] repeated for the 3 channels: [..., 3, 256]."""
  return tf.repeat(tf.cast(lut, tf.int32)[..., None, :], 3, axis=-2)


def _argument(value):
  """A LUT argument (scalar or per-image [N]) as int32 [..., 1], against tf.range(256)."""
  return tf.cast(value, tf.int32)[..., None]


def invert_lut():
  """`ImageOps.invert`: 255 - x."""
  return _same_for_channels(255 - tf.range(256))


def posterize_lut(bits):
  """`ImageOps.posterize(image, bits)`: keep the `bits` most significant bits.

  bits = 0 gives black, as Pillow before 10 did (newer Pillow rejects 0); bits >= 8 is
  the identity, as timm's wrapper makes it."""
  bits = tf.clip_by_value(_argument(bits), 0, 8)
  mask = tf.bitwise.invert(tf.bitwise.left_shift(1, 8 - bits) - 1) & 255
  return _same_for_channels(tf.bitwise.bitwise_and(tf.range(256), mask))


def solarize_lut(threshold):
  """`ImageOps.solarize(image, threshold)`: x < threshold ? x : 255 - x."""
  x = tf.range(256)
  return _same_for_channels(tf.where(x < _argument(threshold), x, 255 - x))


def solarize_add_lut(addition, threshold=128):
  """timm's `solarize_add`: x < threshold ? min(255, x + addition) : x."""
  x = tf.range(256)
  added = tf.minimum(x + _argument(addition), 255)
  return _same_for_channels(tf.where(x < _argument(threshold), added, x))


def histograms(image):
  """Per-channel histograms, int64 [3, 256] of [H, W, 3] or [N, 3, 256] of a batch (one
  bincount over the 768 flat bins of each image)."""
  index = _flat_index(levels(image))
  bins = 768 * tf.reduce_prod(tf.shape(index)[:-3])
  counts = tf.math.bincount(tf.reshape(index, [-1]), minlength=bins, maxlength=bins,
                            dtype=tf.int64)
  return tf.reshape(counts, tf.concat([tf.shape(index)[:-3], [3, 256]], 0))


def auto_contrast_lut(histogram):
  """`ImageOps.autocontrast` (no cutoff) from per-channel histograms [..., 3, 256]: stretch each
  channel's [lo, hi] (lowest and highest non-empty bins) to [0, 255] with
  lut(i) = int(i * scale + offset), scale = 255 / (hi - lo), offset = -lo * scale, in
  float64 as Pillow's Python code computes it; the identity where hi <= lo."""
  occupied = histogram > 0
  index = tf.range(256, dtype=tf.float64)
  lo = tf.reduce_min(tf.where(occupied, index, 255.0), axis=-1, keepdims=True)
  hi = tf.reduce_max(tf.where(occupied, index, 0.0), axis=-1, keepdims=True)
  scale = 255.0 / tf.maximum(hi - lo, 1.0)
  offset = -lo * scale
  stretched = tf.clip_by_value(tf.cast(index * scale + offset, tf.int32), 0, 255)
  return tf.where(hi > lo, stretched, tf.range(256)[None])


def equalize_lut(histogram):
  """`ImageOps.equalize` from per-channel histograms [..., 3, 256] (lookup table in the module
  docstring)."""
  index = tf.range(256, dtype=tf.int64)
  occupied = histogram > 0
  last_bin = tf.reduce_max(tf.where(occupied, index, -1), axis=-1, keepdims=True)
  last = tf.reduce_sum(tf.where(index == last_bin, histogram, 0), axis=-1, keepdims=True)
  step = (tf.reduce_sum(histogram, axis=-1, keepdims=True) - last) // 255
  safe_step = tf.maximum(step, 1)
  below = tf.cumsum(histogram, axis=-1, exclusive=True)
  lut = tf.cast(tf.minimum((safe_step // 2 + below) // safe_step, 255), tf.int32)
  single = tf.reduce_sum(tf.cast(occupied, tf.int32), axis=-1, keepdims=True) <= 1
  return tf.where(single | (step == 0), tf.range(256)[None], lut)


def invert(image):
  """`ImageOps.invert`."""
  return apply_lut(image, invert_lut())


def posterize(image, bits):
  """`ImageOps.posterize` (see `posterize_lut`)."""
  return apply_lut(image, posterize_lut(bits))


def solarize(image, threshold):
  """`ImageOps.solarize`."""
  return apply_lut(image, solarize_lut(threshold))


def solarize_add(image, addition, threshold=128):
  """timm's `solarize_add`."""
  return apply_lut(image, solarize_add_lut(addition, threshold))


def auto_contrast(image):
  """`ImageOps.autocontrast(image)`."""
  return apply_lut(image, auto_contrast_lut(histograms(image)))


def equalize(image):
  """`ImageOps.equalize(image)`."""
  return apply_lut(image, equalize_lut(histograms(image)))


def _inside_and_sample_points(shape, matrix):
  """Pillow's affine sampling (Geometry.c) for output pixels (x, y) of a batch [N, H, W, 3]
  with matrices [N, 6]: the input point (a (x + .5) + b (y + .5) + c, d (x + .5) +
  e (y + .5) + f) in float64, whether it lies in [0, W) x [0, H), and the point in
  pixel-index units (minus 0.5); each [N, H, W]."""
  height, width = shape[1], shape[2]
  ys = tf.cast(tf.range(height), tf.float64)[:, None] + 0.5
  xs = tf.cast(tf.range(width), tf.float64)[None, :] + 0.5
  a, b, c, d, e, f = (matrix[:, k, None, None] for k in range(6))
  u = a * xs + b * ys + c
  v = d * xs + e * ys + f
  inside = ((u >= 0.0) & (u < tf.cast(width, tf.float64)) & (v >= 0.0)
            & (v < tf.cast(height, tf.float64)))
  return inside, u - 0.5, v - 0.5


def _bilinear_warp(x, matrix):
  """Bilinear samples at Pillow's points with edge-clamped neighbours, float32 [N, H, W, 3].

  `ImageProjectiveTransformV3` maps output index (x, y) to (a0 x + a1 y + a2, ...);
  Pillow's point in index units is a x + b y + (c + (a + b) / 2 - 1/2), so the
  offsets shift by half a pixel. Its "NEAREST" fill mode clamps the point into the
  image, which for Pillow's domain [-1/2, W - 1/2) equals clamping the neighbours.
  """
  a, b, c, d, e, f = tf.unstack(matrix, axis=1)
  zero = tf.zeros_like(a)
  transform = tf.stack([a, b, c + (0.5 * (a + b) - 0.5), d, e, f + (0.5 * (d + e) - 0.5),
                        zero, zero], axis=1)
  return tf.raw_ops.ImageProjectiveTransformV3(
      images=x, transforms=tf.cast(transform, tf.float32), output_shape=tf.shape(x)[1:3],
      fill_value=0.0, interpolation="BILINEAR", fill_mode="NEAREST")


def _cubic_weights(d):
  """Pillow's cubic convolution (Geometry.c, a = -1) as weights of the 4 neighbours at
  offsets -1, 0, 1, 2 from the point's floor, d its fractional part: the Horner form
  p1 + d (c1 + d (c2 + d c3)) of the docstring of `affine`, expanded per neighbour."""
  d2, d3 = d * d, d * d * d
  return tf.stack([-d + 2.0 * d2 - d3, 1.0 - 2.0 * d2 + d3, d + d2 - d3, d3 - d2], axis=-1)


def _floor_and_weights(points):
  """floor(points) as int32 and the 4 cubic weights of the fractional part, float32 (the
  fraction is exact in float64, then rounded to float32 for the weights)."""
  floor = tf.floor(points)
  return tf.cast(floor, tf.int32), _cubic_weights(tf.cast(points - floor, tf.float32))


def _row_windows(x):
  """Table [N H (W+1), 12] of the edge-clamped 4-pixel windows of every row of a batch
  [N, H, W, 3], one per start column -1 .. W-1 (window s = columns s-1 .. s+2): the 4
  horizontal neighbours of a sample are one row of it."""
  width = tf.shape(x)[2]
  clamped = tf.gather(x, tf.clip_by_value(tf.range(-2, width + 2), 0, width - 1), axis=2)
  windows = tf.stack([clamped[:, :, k:k + width + 1] for k in range(4)], axis=3)
  return tf.reshape(windows, [-1, 12])


def _window_index(x, rows, start):
  """Row of `_row_windows(x)` for image rows `rows` (clamped) and floor columns `start`
  ([N, H, W, ...] broadcast)."""
  shape = tf.shape(x)
  height, width = shape[1], shape[2]
  rows = tf.clip_by_value(rows, 0, height - 1) + height * tf.range(shape[0])[:, None, None, None]
  return rows * (width + 1) + tf.clip_by_value(start, -1, width - 1) + 1


def _bicubic_warp(x, u, v):
  """Bicubic samples at index points (u, v) [N, H, W] with edge-clamped neighbours,
  float32 [N, H, W, 3]: each output pixel gathers 4 rows of `_row_windows` (12
  contiguous floats each) instead of 16 pixels; then weighs each row's 4 neighbours by
  the horizontal weights and the 4 row values by the vertical ones."""
  u0, wx = _floor_and_weights(u)
  v0, wy = _floor_and_weights(v)
  rows = v0[..., None] + tf.range(-1, 3)  # [N, H, W, 4]
  patches = tf.gather(_row_windows(x), _window_index(x, rows, u0[..., None]))
  patches = tf.reshape(patches, tf.concat([tf.shape(rows), [4, 3]], 0))  # [N, H, W, 4, 4, 3]
  across = tf.reduce_sum(patches * wx[..., None, :, None], axis=4)  # each row's sample
  return tf.reduce_sum(across * wy[..., None], axis=3)


def _bicubic_rows(x, u):
  """`_bicubic_warp` where every sample lies on its output pixel's row (v = y: the
  vertical weights are 0, 1, 0, 0): one window of 4 pixels per output pixel."""
  u0, wx = _floor_and_weights(u)
  rows = tf.range(tf.shape(x)[1])[None, :, None, None]
  patches = tf.gather(_row_windows(x), _window_index(x, rows, u0[..., None]))[..., 0, :]
  patches = tf.reshape(patches, tf.concat([tf.shape(u), [4, 3]], 0))  # [N, H, W, 4, 3]
  return tf.reduce_sum(patches * wx[..., None], axis=3)


def _bicubic_columns(x, v):
  """`_bicubic_rows` along columns (u = x), on the transposed images."""
  transposed = _bicubic_rows(tf.transpose(x, [0, 2, 1, 3]), tf.transpose(v, [0, 2, 1]))
  return tf.transpose(transposed, [0, 2, 1, 3])


# Resampling kernels of `affine_batch`, by group.
_BILINEAR, _BICUBIC, _BICUBIC_ROWS, _BICUBIC_COLUMNS = 0, 1, 2, 3


def _resampling_group(matrices, bicubic):
  """Each image's resampling kernel: bilinear, or bicubic along rows where the matrix
  keeps rows (d, e, f) = (0, 1, 0) (shears and translations in x), along columns
  where it keeps columns (a, b, c) = (1, 0, 0), else the general bicubic."""
  rows = tf.reduce_all(tf.equal(matrices[:, 3:], tf.constant([0.0, 1.0, 0.0], tf.float64)), 1)
  columns = tf.reduce_all(tf.equal(matrices[:, :3], tf.constant([1.0, 0.0, 0.0], tf.float64)), 1)
  cubic = tf.where(rows, _BICUBIC_ROWS, tf.where(columns, _BICUBIC_COLUMNS, _BICUBIC))
  return tf.where(tf.cast(bicubic, tf.bool), cubic, _BILINEAR)


def affine_batch(images, matrices, fill: Sequence[int], bicubic):
  """`affine` of each image of a batch [N, H, W, 3] with its own matrix (float64 [N, 6])
  and resampling (bool [N]: bicubic, else bilinear); each resampling runs only on the
  images that use it (`partitioned`). Bicubic samples that stay on their row (or
  column), as in shears and translations, weigh 4 neighbours instead of 16 (the other
  weights are 0)."""
  x = levels(images)
  matrices = tf.cast(matrices, tf.float64)
  inside, u, v = _inside_and_sample_points(tf.shape(x), matrices)
  value = partitioned(_resampling_group(matrices, bicubic),
                      [lambda x, m, u, v: _bilinear_warp(x, m),
                       lambda x, m, u, v: _bicubic_warp(x, u, v),
                       lambda x, m, u, v: _bicubic_rows(x, u),
                       lambda x, m, u, v: _bicubic_columns(x, v)], x, matrices, u, v)
  fill = tf.constant(fill, tf.float32)
  return _like(tf.where(inside[..., None], _truncate(value), fill), images)


def affine(image, matrix, fill: Sequence[int], bicubic=False):
  """`image.transform(size, Image.AFFINE, matrix, resample=..., fillcolor=fill)`.

  `matrix` (a, b, c, d, e, f) maps output to input coordinates in Pillow's convention
  (pixel centres at +0.5, see the module docstring). Resampling is BILINEAR, or
  BICUBIC where `bicubic` (a Python or a tensor bool): Pillow's cubic convolution with
  a = -1, p1 + d (c1 + d (c2 + d c3)) with c1 = p2 - p0, c2 = 2 (p0 - p1) + p2 - p3,
  c3 = p1 - p0 - p2 + p3, over the 4 x 4 edge-clamped neighbours, each row first and
  then the 4 row values, as Pillow. The domain test and the sample points are float64
  as in Pillow; the weights and the interpolation are float32 (Pillow: float64), which
  moves a value by ~1e-4 grey levels, so where Pillow's value lies that close to an
  integer the truncated result can differ by 1. The result is clipped to [0, 255] and
  truncated, as Pillow stores it. (`affine_batch` with a batch of one.)
  """
  matrix = tf.cast(tf.convert_to_tensor(matrix), tf.float64)
  bicubic = tf.reshape(tf.cast(bicubic, tf.bool), [1])
  return _like(affine_batch(levels(image)[None], matrix[None], fill, bicubic)[0], image)


def _affine_matrix(*coefficients):
  """(a, b, c, d, e, f) as float64 [..., 6]; scalars broadcast against per-image [N] values."""
  values = [tf.cast(value, tf.float64) for value in coefficients]
  shape = functools.reduce(tf.broadcast_dynamic_shape, [tf.shape(value) for value in values])
  return tf.stack([tf.broadcast_to(value, shape) for value in values], axis=-1)


def rotation_matrix(degrees, height, width):
  """Pillow's `Image.rotate` matrix: counter-clockwise by `degrees` about (W/2, H/2)."""
  angle = -tf.cast(degrees, tf.float64) * (math.pi / 180.0)
  cos, sin = tf.cos(angle), tf.sin(angle)
  cx, cy = tf.cast(width, tf.float64) / 2.0, tf.cast(height, tf.float64) / 2.0
  return _affine_matrix(cos, sin, cos * -cx + sin * -cy + cx,
                        -sin, cos, -sin * -cx + cos * -cy + cy)


def shear_x_matrix(factor):
  """timm's `shear_x`: AFFINE (1, factor, 0, 0, 1, 0)."""
  return _affine_matrix(1.0, factor, 0.0, 0.0, 1.0, 0.0)


def shear_y_matrix(factor):
  """timm's `shear_y`: AFFINE (1, 0, 0, factor, 1, 0)."""
  return _affine_matrix(1.0, 0.0, 0.0, factor, 1.0, 0.0)


def translate_x_matrix(pixels):
  """timm's `translate_x_abs`: AFFINE (1, 0, pixels, 0, 1, 0) (content moves left for
  pixels > 0)."""
  return _affine_matrix(1.0, 0.0, pixels, 0.0, 1.0, 0.0)


def translate_y_matrix(pixels):
  """timm's `translate_y_abs`: AFFINE (1, 0, 0, 0, 1, pixels)."""
  return _affine_matrix(1.0, 0.0, 0.0, 0.0, 1.0, pixels)


def rotate(image, degrees, fill: Sequence[int], bicubic=False):
  """`image.rotate(degrees, resample=BILINEAR or BICUBIC, fillcolor=fill)` (same size)."""
  shape = tf.shape(image)
  return affine(image, rotation_matrix(degrees, shape[0], shape[1]), fill, bicubic)


def shear_x(image, factor, fill: Sequence[int], bicubic=False):
  """timm's `shear_x` (bilinear or bicubic resampling)."""
  return affine(image, shear_x_matrix(factor), fill, bicubic)


def shear_y(image, factor, fill: Sequence[int], bicubic=False):
  """timm's `shear_y` (bilinear or bicubic resampling)."""
  return affine(image, shear_y_matrix(factor), fill, bicubic)


def translate_x(image, pixels, fill: Sequence[int], bicubic=False):
  """timm's `translate_x_abs` (bilinear or bicubic resampling)."""
  return affine(image, translate_x_matrix(pixels), fill, bicubic)


def translate_y(image, pixels, fill: Sequence[int], bicubic=False):
  """timm's `translate_y_abs` (bilinear or bicubic resampling)."""
  return affine(image, translate_y_matrix(pixels), fill, bicubic)
