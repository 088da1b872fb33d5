"""PIL's image operations as TensorFlow functions on uint8 [H, W, 3] images (tf.data-ready).

The public Difficulty-Net code augments ImageNet-LT with torchvision's ColorJitter and
timm's RandAugment, both of which call Pillow (ImageEnhance, ImageOps, Image.transform).
These functions reproduce those Pillow operations with TensorFlow ops, so they run
inside a `tf.data` map (graph mode, parallel C++ threads) and take their arguments as
tensors. Each follows Pillow's arithmetic where it is documented or visible in its
Python source; tests/test_color_randaugment.py compares every one with Pillow itself.

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
  clipped and truncated to uint8.
"""

from __future__ import annotations

import math
from typing import Sequence

from dnet_jax.data import image_folder

# TensorFlow with the accelerators hidden from it (JAX owns them).
tf = image_folder._tf()  # pylint: disable=protected-access

# ITU-R 601-2 luma in Pillow's fixed point (Convert.c, "L24"): weights / 2^16.
_LUMA_WEIGHTS = (19595, 38470, 7471)


def _to_uint8(values):
  """Clip to [0, 255] and truncate, as Pillow's blends store their float results."""
  return tf.cast(tf.clip_by_value(values, 0.0, 255.0), tf.uint8)


def grayscale(image):
  """Pillow's RGB -> L conversion, (19595 R + 38470 G + 7471 B + 32768) >> 16, as uint8 [H, W]."""
  rgb = tf.cast(image, tf.int32)
  luma = (rgb[..., 0] * _LUMA_WEIGHTS[0] + rgb[..., 1] * _LUMA_WEIGHTS[1]
          + rgb[..., 2] * _LUMA_WEIGHTS[2] + 32768)
  return tf.cast(tf.bitwise.right_shift(luma, 16), tf.uint8)


def blend(degenerate, image, factor):
  """Pillow's `Image.blend(degenerate, image, factor)` in float32, truncated to uint8."""
  factor = tf.cast(factor, tf.float32)
  d = tf.cast(degenerate, tf.float32)
  return _to_uint8(d + factor * (tf.cast(image, tf.float32) - d))


def brightness(image, factor):
  """`ImageEnhance.Brightness(image).enhance(factor)`: blend with black."""
  return blend(tf.zeros_like(image), image, factor)


def grey_image(image):
  """The degenerate image of `ImageEnhance.Color`: L replicated to 3 channels."""
  return tf.repeat(grayscale(image)[..., None], 3, axis=-1)


def mean_grey_image(image, grey=None):
  """The degenerate image of `ImageEnhance.Contrast`: int(mean(L) + 0.5) everywhere
  (`grey`: the image's `grayscale`, when already computed)."""
  grey = grayscale(image) if grey is None else grey
  mean = tf.reduce_mean(tf.cast(grey, tf.float64))
  return tf.fill(tf.shape(image), tf.cast(tf.floor(mean + 0.5), tf.uint8))


def color(image, factor):
  """`ImageEnhance.Color(image).enhance(factor)`: blend with the grey image (saturation)."""
  return blend(grey_image(image), image, factor)


def contrast(image, factor):
  """`ImageEnhance.Contrast(image).enhance(factor)`: blend with the mean grey level."""
  return blend(mean_grey_image(image), image, factor)


def smooth(image):
  """Pillow's `ImageFilter.SMOOTH`: 3x3 kernel [[1,1,1],[1,5,1],[1,1,1]] / 13, rounded;
  the first and last rows and columns are copied unfiltered (Pillow's Filter.c)."""
  x = tf.cast(image, tf.float32)[None]
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32)
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  # Integer sums (exact in float32); floor(k / 13 + 1/2) never ties since 13 is odd.
  sums = tf.cast(tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "VALID")[0], tf.int32)
  interior = tf.cast(tf.math.floordiv(2 * sums + 13, 26), tf.uint8)
  padded = tf.pad(interior, [[1, 1], [1, 1], [0, 0]])
  shape = tf.shape(image)
  rows = tf.range(shape[0])[:, None, None]
  cols = tf.range(shape[1])[None, :, None]
  inside = (rows > 0) & (rows < shape[0] - 1) & (cols > 0) & (cols < shape[1] - 1)
  return tf.where(inside, padded, image)


def sharpness(image, factor):
  """`ImageEnhance.Sharpness(image).enhance(factor)`: blend with the smoothed image."""
  return blend(smooth(image), image, factor)


def apply_lut(image, luts):
  """Per-channel lookup table: out[..., c] = luts[c, image[..., c]], luts int32 [3, 256]."""
  channels = [tf.gather(luts[c], tf.cast(image[..., c], tf.int32)) for c in range(3)]
  return tf.cast(tf.stack(channels, axis=-1), tf.uint8)


def _same_for_channels(lut):
  return tf.tile(tf.cast(lut, tf.int32)[None], [3, 1])


def invert_lut():
  """`ImageOps.invert`: 255 - x."""
  return _same_for_channels(255 - tf.range(256))


def posterize_lut(bits):
  """`ImageOps.posterize(image, bits)`: keep the `bits` most significant bits.

  bits = 0 gives black, as Pillow before 10 did (newer Pillow rejects 0); bits >= 8 is
  the identity, as timm's wrapper makes it."""
  bits = tf.clip_by_value(tf.cast(bits, tf.int32), 0, 8)
  mask = tf.bitwise.invert(tf.bitwise.left_shift(1, 8 - bits) - 1) & 255
  return _same_for_channels(tf.bitwise.bitwise_and(tf.range(256), mask))


def solarize_lut(threshold):
  """`ImageOps.solarize(image, threshold)`: x < threshold ? x : 255 - x."""
  x = tf.range(256)
  return _same_for_channels(tf.where(x < tf.cast(threshold, tf.int32), x, 255 - x))


def solarize_add_lut(addition, threshold=128):
  """timm's `solarize_add`: x < threshold ? min(255, x + addition) : x."""
  x = tf.range(256)
  added = tf.minimum(x + tf.cast(addition, tf.int32), 255)
  return _same_for_channels(tf.where(x < tf.cast(threshold, tf.int32), added, x))


def histograms(image):
  """Per-channel histograms, int64 [3, 256]."""
  return tf.stack([tf.math.bincount(tf.cast(image[..., c], tf.int32), minlength=256,
                                    maxlength=256, dtype=tf.int64) for c in range(3)])


def auto_contrast_lut(histogram):
  """`ImageOps.autocontrast` (no cutoff) from per-channel histograms [3, 256]: stretch each
  channel's [lo, hi] (lowest and highest non-empty bins) to [0, 255] with
  lut(i) = int(i * scale + offset), scale = 255 / (hi - lo), offset = -lo * scale, in
  float64 as Pillow's Python code computes it; the identity where hi <= lo."""
  occupied = histogram > 0
  index = tf.range(256, dtype=tf.float64)
  lo = tf.reduce_min(tf.where(occupied, index, 255.0), axis=1, keepdims=True)
  hi = tf.reduce_max(tf.where(occupied, index, 0.0), axis=1, keepdims=True)
  scale = 255.0 / tf.maximum(hi - lo, 1.0)
  offset = -lo * scale
  stretched = tf.clip_by_value(tf.cast(index * scale + offset, tf.int32), 0, 255)
  return tf.where(hi > lo, stretched, tf.range(256)[None])


def equalize_lut(histogram):
  """`ImageOps.equalize` from per-channel histograms [3, 256] (lookup table in the module
  docstring)."""
  index = tf.range(256, dtype=tf.int64)
  occupied = histogram > 0
  last_bin = tf.reduce_max(tf.where(occupied, index, -1), axis=1, keepdims=True)
  last = tf.reduce_sum(tf.where(index[None] == last_bin, histogram, 0), axis=1, keepdims=True)
  step = (tf.reduce_sum(histogram, axis=1, keepdims=True) - last) // 255
  safe_step = tf.maximum(step, 1)
  below = tf.cumsum(histogram, axis=1, exclusive=True)
  lut = tf.cast(tf.minimum((safe_step // 2 + below) // safe_step, 255), tf.int32)
  single = tf.reduce_sum(tf.cast(occupied, tf.int32), axis=1, keepdims=True) <= 1
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


def _cubic(p0, p1, p2, p3, d):
  """Pillow's transform cubic (Geometry.c, a = -1): p1 + d (c1 + d (c2 + d c3))."""
  c1 = -p0 + p2
  c2 = 2.0 * (p0 - p1) + p2 - p3
  c3 = -p0 + p1 - p2 + p3
  return p1 + d * (c1 + d * (c2 + d * c3))


def affine(image, matrix, fill: Sequence[int], bicubic=False):
  """`image.transform(size, Image.AFFINE, matrix, resample=..., fillcolor=fill)`.

  `matrix` (a, b, c, d, e, f) maps output to input coordinates in Pillow's convention
  (pixel centres at +0.5, see the module docstring). Resampling is BILINEAR, or
  BICUBIC where `bicubic` (a Python or a tensor bool): Pillow's cubic convolution with
  a = -1 over the 4 x 4 edge-clamped neighbours. Computed in float64; the result is
  clipped to [0, 255] and truncated, as Pillow stores it.
  """
  matrix = tf.cast(tf.convert_to_tensor(matrix), tf.float64)
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  ys = tf.cast(tf.range(height), tf.float64)[:, None] + 0.5
  xs = tf.cast(tf.range(width), tf.float64)[None, :] + 0.5
  u = matrix[0] * xs + matrix[1] * ys + matrix[2]
  v = matrix[3] * xs + matrix[4] * ys + matrix[5]
  w_f, h_f = tf.cast(width, tf.float64), tf.cast(height, tf.float64)
  inside = (u >= 0.0) & (u < w_f) & (v >= 0.0) & (v < h_f)
  u, v = u - 0.5, v - 0.5
  x0, y0 = tf.floor(u), tf.floor(v)
  dx, dy = (u - x0)[..., None], (v - y0)[..., None]
  x0, y0 = tf.cast(x0, tf.int32), tf.cast(y0, tf.int32)
  pixels = tf.reshape(tf.cast(image, tf.float64), [-1, 3])
  column = lambda k: tf.clip_by_value(x0 + k, 0, width - 1)
  row = lambda k: tf.clip_by_value(y0 + k, 0, height - 1)
  at = lambda yy, xx: tf.gather(pixels, yy * width + xx)

  def bilinear():
    top = at(row(0), column(0)) + (at(row(0), column(1)) - at(row(0), column(0))) * dx
    bottom = at(row(1), column(0)) + (at(row(1), column(1)) - at(row(1), column(0))) * dx
    return top + (bottom - top) * dy

  def cubic():
    rows = [_cubic(*[at(row(j), column(k)) for k in (-1, 0, 1, 2)], dx) for j in (-1, 0, 1, 2)]
    return _cubic(*rows, dy)

  if isinstance(bicubic, bool):
    value = cubic() if bicubic else bilinear()
  else:
    value = tf.cond(tf.cast(bicubic, tf.bool), cubic, bilinear)
  fill = tf.broadcast_to(tf.constant(fill, tf.float64), tf.shape(value))
  out = tf.where(inside[..., None], tf.floor(tf.clip_by_value(value, 0.0, 255.0)), fill)
  return tf.cast(out, tf.uint8)


def rotation_matrix(degrees, height, width):
  """Pillow's `Image.rotate` matrix: counter-clockwise by `degrees` about (W/2, H/2)."""
  angle = -tf.cast(degrees, tf.float64) * (math.pi / 180.0)
  cos, sin = tf.cos(angle), tf.sin(angle)
  cx, cy = tf.cast(width, tf.float64) / 2.0, tf.cast(height, tf.float64) / 2.0
  return tf.stack([cos, sin, cos * -cx + sin * -cy + cx,
                   -sin, cos, -sin * -cx + cos * -cy + cy])


def shear_x_matrix(factor):
  """timm's `shear_x`: AFFINE (1, factor, 0, 0, 1, 0)."""
  one, zero = tf.constant(1.0, tf.float64), tf.constant(0.0, tf.float64)
  return tf.stack([one, tf.cast(factor, tf.float64), zero, zero, one, zero])


def shear_y_matrix(factor):
  """timm's `shear_y`: AFFINE (1, 0, 0, factor, 1, 0)."""
  one, zero = tf.constant(1.0, tf.float64), tf.constant(0.0, tf.float64)
  return tf.stack([one, zero, zero, tf.cast(factor, tf.float64), one, zero])


def translate_x_matrix(pixels):
  """timm's `translate_x_abs`: AFFINE (1, 0, pixels, 0, 1, 0) (content moves left for
  pixels > 0)."""
  one, zero = tf.constant(1.0, tf.float64), tf.constant(0.0, tf.float64)
  return tf.stack([one, zero, tf.cast(pixels, tf.float64), zero, one, zero])


def translate_y_matrix(pixels):
  """timm's `translate_y_abs`: AFFINE (1, 0, 0, 0, 1, pixels)."""
  one, zero = tf.constant(1.0, tf.float64), tf.constant(0.0, tf.float64)
  return tf.stack([one, zero, zero, zero, one, tf.cast(pixels, tf.float64)])


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
