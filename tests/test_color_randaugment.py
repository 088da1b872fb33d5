"""ColorJitter and RandAugment in TensorFlow against Pillow, and their sampling statistics.

References are computed with Pillow directly (ImageOps, ImageEnhance, Image.transform /
rotate), with timm's level-to-argument rules written out here from RECIPES.md.
Tolerances: point ops and blends are exact (same integer / float32 arithmetic). The
bilinear and bicubic warps truncate a float64 interpolation to uint8 as Pillow does; a value within
1e-15 of an integer can land on either side depending on the order of floating-point
operations, so a warp may differ by 1 grey level on a few pixels (at most 5% here,
typically < 1%), never more.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps
from scipy import stats

from dnet_jax.data import color_randaugment as cra
from dnet_jax.data import pil_ops

tf = cra.tf
FILL = (124, 116, 104)


def _images():
  """Two fixed RGB images: smooth gradients (as photos) and uniform noise (every level)."""
  y, x = np.mgrid[0:29, 0:41]
  smooth = np.stack([(x * 5 + y * 3) % 256, np.sin(x / 5.0) * 90 + 110 + y,
                     np.cos(y / 4.0) * 60 + 2 * x + 40], -1)
  noise = np.random.default_rng(0).integers(0, 256, (29, 41, 3))
  return [smooth.clip(0, 255).astype(np.uint8), noise.astype(np.uint8)]


IMAGES = _images()


def _timm_reference(img: Image.Image, name: str, magnitude: float, negate: bool,
                    bicubic: bool = False) -> Image.Image:
  """One RandAugment op by the rules of the public code's timm copy, with Pillow."""
  resample = Image.BICUBIC if bicubic else Image.BILINEAR

  def _pil_affine(img, matrix):
    return img.transform(img.size, Image.AFFINE, matrix, resample=resample, fillcolor=FILL)

  level = magnitude / 10.0
  sign = -1.0 if negate else 1.0
  enhance = level * 1.8 + 0.1
  return {
      "AutoContrast": lambda: ImageOps.autocontrast(img),
      "Equalize": lambda: ImageOps.equalize(img),
      "Invert": lambda: ImageOps.invert(img),
      "Rotate": lambda: img.rotate(sign * level * 30.0, resample=resample, fillcolor=FILL),
      "PosterizeTpu": lambda: ImageOps.posterize(img, int(level * 4)),
      "Solarize": lambda: ImageOps.solarize(img, int(level * 256)),
      "SolarizeAdd": lambda: img.point(
          [min(255, i + int(level * 110)) if i < 128 else i for i in range(256)] * 3),
      "Color": lambda: ImageEnhance.Color(img).enhance(enhance),
      "Contrast": lambda: ImageEnhance.Contrast(img).enhance(enhance),
      "Brightness": lambda: ImageEnhance.Brightness(img).enhance(enhance),
      "Sharpness": lambda: ImageEnhance.Sharpness(img).enhance(enhance),
      "ShearX": lambda: _pil_affine(img, (1, sign * level * 0.3, 0, 0, 1, 0)),
      "ShearY": lambda: _pil_affine(img, (1, 0, 0, sign * level * 0.3, 1, 0)),
      "TranslateXRel": lambda: _pil_affine(img, (1, 0, sign * level * 0.45 * img.size[0], 0, 1, 0)),
      "TranslateYRel": lambda: _pil_affine(img, (1, 0, 0, 0, 1, sign * level * 0.45 * img.size[1])),
  }[name]()


def _assert_matches(ours, reference, geometric: bool):
  ours, reference = np.asarray(ours, np.int32), np.asarray(reference, np.int32)
  assert ours.shape == reference.shape
  diff = np.abs(ours - reference)
  if geometric:
    assert diff.max() <= 1 and np.mean(diff > 0) <= 0.05, (diff.max(), np.mean(diff > 0))
  else:
    np.testing.assert_array_equal(ours, reference)


OP_CASES = [
    ("AutoContrast", 10.0, False), ("Equalize", 10.0, False), ("Invert", 10.0, False),
    ("Rotate", 8.3, False), ("Rotate", 10.0, True), ("PosterizeTpu", 8.3, False),
    ("PosterizeTpu", 10.0, False), ("Solarize", 7.1, False), ("SolarizeAdd", 9.4, False),
    ("Color", 3.3, False), ("Color", 9.6, False), ("Contrast", 2.2, False),
    ("Contrast", 9.6, False), ("Brightness", 4.4, False), ("Brightness", 9.9, False),
    ("Sharpness", 1.7, False), ("Sharpness", 9.1, False), ("ShearX", 9.2, False),
    ("ShearX", 10.0, True), ("ShearY", 8.8, True), ("TranslateXRel", 9.5, False),
    ("TranslateXRel", 10.0, True), ("TranslateYRel", 9.7, True),
]
# Geometric ops again with bicubic resampling (the public code picks it half the time).
OP_CASES = ([case + (False,) for case in OP_CASES]
            + [case + (True,) for case in OP_CASES if case[0] in cra.SIGNED_OPS])


@pytest.mark.parametrize("image_index", [0, 1])
@pytest.mark.parametrize("name, magnitude, negate, bicubic", OP_CASES)
def test_each_rand_augment_op_equals_pillow(name, magnitude, negate, bicubic, image_index):
  image = IMAGES[image_index]
  magnitude = float(np.float32(magnitude))  # the value a float32 draw would hold
  ours = cra.apply_op(image, cra.RAND_AUGMENT_OPS.index(name), magnitude, negate, FILL,
                      bicubic=bicubic)
  reference = _timm_reference(Image.fromarray(image), name, magnitude, negate, bicubic)
  _assert_matches(ours, reference, geometric=name in cra.SIGNED_OPS)
  if name not in ("AutoContrast", "Equalize") or image_index == 0:  # noise: already full range
    assert not np.array_equal(np.asarray(ours), image)  # the op did something


def test_posterize_zero_bits_is_black_and_degenerate_histograms_are_identity():
  np.testing.assert_array_equal(pil_ops.posterize(IMAGES[0], 0), np.zeros_like(IMAGES[0]))
  flat = np.full((5, 6, 3), 77, np.uint8)
  for op in (pil_ops.auto_contrast, pil_ops.equalize):
    np.testing.assert_array_equal(op(flat), np.asarray(getattr(
        ImageOps, "autocontrast" if op is pil_ops.auto_contrast else "equalize")(
            Image.fromarray(flat))))


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_color_jitter_with_fixed_draws_equals_pillow(order):
  image = IMAGES[0]
  factors = np.array([1.31, 0.67, 1.22], np.float32)  # brightness, contrast, saturation
  params = cra.ColorJitterParams(tf.constant(factors), tf.constant(order, tf.int32))
  ours = cra.apply_color_jitter(image, params)
  # torchvision's PIL ColorJitter: adjust_brightness / _contrast / _saturation are
  # ImageEnhance.Brightness / Contrast / Color, each returning a uint8 image.
  enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
  reference = Image.fromarray(image)
  for k in order:
    reference = enhancers[k](reference).enhance(float(factors[k]))
  _assert_matches(ours, reference, geometric=False)


def test_rand_augment_with_fixed_draws_equals_pillow():
  image = IMAGES[0]
  cases = [((3, 10), (True, True), (9.4, 10.0), (True, False), (True, False)),  # Rotate, Sharpness
           ((14, 1), (True, False), (10.0, 9.0), (False, False), (False, True)),  # TranslateYRel
           ((7, 7), (True, True), (8.9, 10.0), (False, True), (False, False))]  # Color twice
  for ops, apply, magnitudes, negate, bicubic in cases:
    magnitudes = np.array(magnitudes, np.float32)
    params = cra.RandAugmentParams(tf.constant(ops, tf.int32), tf.constant(apply),
                                   tf.constant(magnitudes), tf.constant(negate),
                                   tf.constant(bicubic))
    ours = cra.apply_rand_augment(image, params, FILL)
    reference = Image.fromarray(image)
    for op, on, m, neg, cubic in zip(ops, apply, magnitudes, negate, bicubic):
      if on:
        reference = _timm_reference(reference, cra.RAND_AUGMENT_OPS[op], float(m), neg, cubic)
    geometric = any(cra.RAND_AUGMENT_OPS[o] in cra.SIGNED_OPS for o, on in zip(ops, apply) if on)
    _assert_matches(ours, reference, geometric)


def _draw(params_fn, n: int):
  """params_fn(seed) for seeds (7, 0..n-1), stacked: one tf.data pass, no Python loop."""
  ds = tf.data.Dataset.range(n).map(lambda i: params_fn(tf.stack([tf.constant(7, tf.int64), i])))
  return next(iter(ds.batch(n)))


def test_rand_augment_sampling_statistics():
  n = 4000
  params = _draw(cra.rand_augment_params, n)
  ops = params.op.numpy().ravel()
  assert set(np.unique(ops)) == set(range(15))
  # Ops uniform on 15 with replacement: chi-square over the 2n draws, and the two
  # layers independent (same op twice with probability 1/15).
  assert stats.chisquare(np.bincount(ops, minlength=15)).pvalue > 1e-3
  same = np.mean(params.op.numpy()[:, 0] == params.op.numpy()[:, 1])
  assert stats.binomtest(int(same * n), n, 1 / 15).pvalue > 1e-3
  for flags in (params.apply.numpy().ravel(), params.negate.numpy().ravel(),
                params.bicubic.numpy().ravel()):
    assert stats.binomtest(int(flags.sum()), flags.size, 0.5).pvalue > 1e-3
  # Magnitude: clip(N(10, 0.5), 0, 10): half the mass at exactly 10, the rest a
  # half-normal below 10.
  m = params.magnitude.numpy().ravel().astype(np.float64)
  assert m.min() >= 0.0 and m.max() == 10.0
  at_max = m == 10.0
  assert stats.binomtest(int(at_max.sum()), m.size, 0.5).pvalue > 1e-3
  below = 10.0 - m[~at_max]
  assert stats.kstest(below, stats.halfnorm(scale=0.5).cdf).pvalue > 1e-3
  np.testing.assert_allclose(m.mean(), 10.0 - 0.5 / np.sqrt(2 * np.pi), atol=4 * 0.3 / np.sqrt(m.size))


def test_color_jitter_sampling_statistics():
  n = 3000
  params = _draw(lambda seed: cra.color_jitter_params(seed, 0.4, 0.2, 1.5), n)
  factors = params.factors.numpy().astype(np.float64)
  for column, (low, high) in enumerate([(0.6, 1.4), (0.8, 1.2), (0.0, 2.5)]):
    assert stats.kstest(factors[:, column], stats.uniform(low, high - low).cdf).pvalue > 1e-3
  orders = [tuple(o) for o in params.order.numpy()]
  counts = [orders.count(p) for p in itertools.permutations(range(3))]
  assert sum(counts) == n and stats.chisquare(counts).pvalue > 1e-3
  with pytest.raises(ValueError, match="brightness must be >= 0"):
    cra.color_jitter_params(tf.constant([0, 1]), brightness=-0.1)


def test_reflect_pad_matches_torch_reflect_semantics():
  image = IMAGES[1][:6, :7]
  np.testing.assert_array_equal(cra.reflect_pad(image, 4),
                                np.pad(image, ((4, 4), (4, 4), (0, 0)), mode="reflect"))


def test_train_augment_is_a_function_of_the_seed_inside_tf_data():
  # One pipeline (tracing the 15-way switch costs seconds): image 0 and 1 with seed 1, then
  # both again with seed 1, then with seed 2, through 2 parallel calls.
  images = np.stack([IMAGES[0], IMAGES[1]] * 3)
  seeds = np.array([[1, 3]] * 4 + [[2, 3]] * 2, np.int64)
  ds = tf.data.Dataset.from_tensor_slices((images, seeds)).map(
      lambda image, seed: cra.train_augment(image, seed, image_size=24),
      num_parallel_calls=2, deterministic=True)
  out = np.stack(list(ds.as_numpy_iterator()))
  assert out.shape == (6, 24, 24, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[0:2], out[2:4])
  assert not np.array_equal(out[0:2], out[4:6])


# --- reflect padding + RandomResizedCrop without building the padded image -------------------


def _padded_crop_reference(image, seed, size):
  """numpy reflect padding (torch's "reflect"), then split_lists's crop, rounded."""
  from dnet_jax.data import split_lists  # pylint: disable=import-outside-toplevel
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0)), mode="reflect")
  resized = split_lists.random_resized_crop(padded, seed, size).numpy()
  return np.clip(np.round(resized), 0, 255)


@pytest.mark.parametrize("height, width", [(29, 41), (6, 7)])  # (6, 7): boxes reach both pads
def test_padded_crop_equals_reflect_pad_then_random_resized_crop(height, width):
  image = IMAGES[1][:height, :width]
  for i in range(6):
    seed = tf.constant([5, i], tf.int64)
    np.testing.assert_array_equal(cra.padded_random_resized_crop(image, seed, 16),
                                  _padded_crop_reference(image, seed, 16))


def _encode(image, fmt):
  import io  # pylint: disable=import-outside-toplevel
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
  return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_crop_of_encoded_bytes_equals_crop_of_decoded_image(fmt):
  # A 4:2:0 JPEG (Pillow's default): decoding only the window must not change the
  # box's pixels at its edges (chroma upsampling).
  data = _encode(np.repeat(np.repeat(IMAGES[1], 2, 0), 2, 1)[:53, :75], fmt)
  decoded = tf.io.decode_image(data, channels=3).numpy()
  for i in range(6):
    seed = tf.constant([9, i], tf.int64)
    expected = _padded_crop_reference(decoded, seed, 16)
    for crop_before_decode in (False, True):
      np.testing.assert_array_equal(cra.decode_padded_random_resized_crop(
          tf.constant(data), seed, 16, crop_before_decode=crop_before_decode), expected)
  seed = tf.constant([2, 3], tf.int64)
  np.testing.assert_array_equal(cra.train_augment_encoded(tf.constant(data), seed, image_size=16),
                                cra.train_augment(decoded, seed, image_size=16))


def test_padding_larger_than_the_image_is_a_clear_error():
  with pytest.raises(tf.errors.InvalidArgumentError, match="reflect padding 4 needs images"):
    cra.padded_random_resized_crop(IMAGES[0][:4, :9], tf.constant([0, 1]), 8)
