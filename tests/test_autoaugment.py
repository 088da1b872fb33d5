"""dnet_jax.data.autoaugment against PIL / scipy computed directly and the paper's table."""

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps
from scipy import ndimage, stats

from dnet_jax.data import autoaugment as aa

# Cubuk et al. 2019 (AutoAugment), CIFAR-10 policy: "op,prob,magnitude op,prob,magnitude".
PAPER_CIFAR10_POLICY = """
Invert,0.1,7 Contrast,0.2,6
Rotate,0.7,2 TranslateX,0.3,9
Sharpness,0.8,1 Sharpness,0.9,3
ShearY,0.5,8 TranslateY,0.7,9
AutoContrast,0.5,8 Equalize,0.9,2
ShearY,0.2,7 Posterize,0.3,7
Color,0.4,3 Brightness,0.6,7
Sharpness,0.3,9 Brightness,0.7,9
Equalize,0.6,5 Equalize,0.5,1
Contrast,0.6,7 Sharpness,0.6,5
Color,0.7,7 TranslateX,0.5,8
Equalize,0.3,7 AutoContrast,0.4,8
TranslateY,0.4,3 Sharpness,0.2,6
Brightness,0.9,6 Color,0.2,8
Solarize,0.5,2 Invert,0.0,3
Equalize,0.2,0 AutoContrast,0.6,0
Equalize,0.2,8 Equalize,0.6,4
Color,0.9,9 Equalize,0.6,6
AutoContrast,0.8,4 Solarize,0.2,8
Brightness,0.1,3 Color,0.7,0
Solarize,0.4,5 AutoContrast,0.9,3
TranslateY,0.9,9 TranslateY,0.7,9
AutoContrast,0.9,2 Solarize,0.8,3
Equalize,0.8,8 Invert,0.1,3
TranslateY,0.7,9 AutoContrast,0.9,1
"""


def paper_policy():
  rows = []
  for line in PAPER_CIFAR10_POLICY.strip().splitlines():
    row = []
    for op in line.split():
      name, prob, magnitude = op.split(",")
      row += [name, float(prob), int(magnitude)]
    rows.append(tuple(row))
  return rows


def test_policy_table_is_the_papers():
  assert len(aa.CIFAR10_POLICY) == 25
  assert [tuple(p) for p in aa.CIFAR10_POLICY] == paper_policy()


def smooth_image(seed=0, size=32):
  """A natural-looking RGB image: smooth gradients plus noise, full byte range."""
  rng = np.random.default_rng(seed)
  r, c = np.mgrid[0:size, 0:size] / (size - 1)
  base = np.stack([255 * r, 255 * c, 127 + 120 * np.sin(6 * r * c)], axis=-1)
  noisy = base + rng.normal(0, 20, base.shape)
  return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def all_values_image():
  """Every byte value in every channel (16 x 16 x 3)."""
  v = np.arange(256, dtype=np.uint8).reshape(16, 16)
  return np.stack([v, v[::-1], v.T], axis=-1)


# --- magnitudes: hand-computed bins of the 11-point linspace ------------------

@pytest.mark.parametrize("op, magnitude, u, expected", [
    ("Rotate", 2, 0.5, -15.0),  # linspace(-30, 30): bin 2 = [-18, -12]
    ("Rotate", 9, 0.0, 24.0),
    ("ShearY", 8, 0.25, 0.195),  # linspace(-.3, .3): bin 8 = [.18, .24]
    ("ShearX", 0, 0.5, -0.27),  # bin 0 is negative: signs are not randomised
    ("TranslateY", 9, 0.5, 135 / 331),  # bin 9 = [120/331, 150/331]
    ("TranslateX", 3, 0.0, -60 / 331),
    ("Solarize", 2, 0.5, 64.0),  # linspace(0, 256): bin 2 = [51.2, 76.8]
    ("Posterize", 7, 0.5, 7.0),  # linspace(4, 8): bin 7 = [6.8, 7.2]
    ("Contrast", 6, 0.5, 1.27),  # linspace(.1, 1.9): bin 6 = [1.18, 1.36]
    ("Brightness", 0, 1.0, 0.28),
    ("Invert", 7, 0.5, 0.0),  # no magnitude
])
def test_magnitude_value(op, magnitude, u, expected):
  assert aa.magnitude_value(op, magnitude, u) == pytest.approx(expected, abs=1e-12)


def test_magnitude_errors():
  with pytest.raises(ValueError, match="unknown AutoAugment op"):
    aa.magnitude_value("Blur", 1, 0.5)
  with pytest.raises(ValueError, match="magnitude bin"):
    aa.magnitude_value("Rotate", 10, 0.5)


# --- PIL ops: equal to PIL on fixed images and values --------------------------

@pytest.mark.parametrize("image_fn", [smooth_image, all_values_image])
@pytest.mark.parametrize("op, value, reference", [
    ("Invert", 0.0, lambda im: ImageOps.invert(im)),
    ("AutoContrast", 0.0, lambda im: ImageOps.autocontrast(im)),
    ("Equalize", 0.0, lambda im: ImageOps.equalize(im)),
    ("Solarize", 0.0, lambda im: ImageOps.solarize(im, 0.0)),
    ("Solarize", 64.0, lambda im: ImageOps.solarize(im, 64.0)),
    ("Solarize", 51.2, lambda im: ImageOps.solarize(im, 51.2)),
    ("Solarize", 255.7, lambda im: ImageOps.solarize(im, 255.7)),
    ("Solarize", 256.0, lambda im: ImageOps.solarize(im, 256.0)),
    ("Contrast", 1.27, lambda im: ImageEnhance.Contrast(im).enhance(1.27)),
    ("Contrast", 0.1, lambda im: ImageEnhance.Contrast(im).enhance(0.1)),
    ("Color", 1.9, lambda im: ImageEnhance.Color(im).enhance(1.9)),
    ("Color", 0.37, lambda im: ImageEnhance.Color(im).enhance(0.37)),
    ("Brightness", 1.63, lambda im: ImageEnhance.Brightness(im).enhance(1.63)),
    ("Brightness", 0.28, lambda im: ImageEnhance.Brightness(im).enhance(0.28)),
    ("Sharpness", 0.19, lambda im: ImageEnhance.Sharpness(im).enhance(0.19)),
    ("Sharpness", 1.81, lambda im: ImageEnhance.Sharpness(im).enhance(1.81)),
])
def test_pil_ops_equal_pil(image_fn, op, value, reference):
  image = image_fn()
  got = aa.apply_op(image, op, value)
  assert got.dtype == np.uint8 and got.shape == image.shape
  np.testing.assert_array_equal(got, np.asarray(reference(Image.fromarray(image))))


def test_lut_ops_hand_values():
  x = np.array([[[0, 15, 16]], [[127, 128, 255]]], np.uint8)
  np.testing.assert_array_equal(aa.apply_op(x, "Invert", 0), 255 - x)
  np.testing.assert_array_equal(aa.apply_op(x, "Solarize", 127.5),
                                [[[0, 15, 16]], [[127, 127, 0]]])
  np.testing.assert_array_equal(aa.apply_op(x, "Posterize", 4.0),
                                [[[0, 0, 16]], [[112, 128, 240]]])


def test_equalize_lut_overflow_and_flat_channel():
  """511 pixels below the top bin: the last LUT entry is 256, PIL clips to 255."""
  x = np.zeros((32, 32, 3), np.uint8)
  x.reshape(-1, 3)[511:] = 200
  x[..., 2] = 9  # one bin only: identity
  np.testing.assert_array_equal(aa.apply_op(x, "Equalize", 0),
                                np.asarray(ImageOps.equalize(Image.fromarray(x))))
  assert aa.apply_op(x, "Equalize", 0)[..., 0].max() == 255


@pytest.mark.parametrize("u, bits", [(0.1, 6), (0.24, 6), (0.26, 7), (0.9, 7)])
def test_posterize_rounds_the_drawn_bits(u, bits):
  """Bin 6 of linspace(4, 8) is [6.4, 6.8]: round() gives 6 below 6.5, 7 above."""
  image = all_values_image()
  value = aa.magnitude_value("Posterize", 6, u)
  got = aa.apply_op(image, "Posterize", value)
  np.testing.assert_array_equal(got, np.asarray(ImageOps.posterize(Image.fromarray(image), bits)))
  np.testing.assert_array_equal(got, image & (256 - 2 ** (8 - bits)))


# --- geometric ops: scipy spline resampling with the public centre -------------

def reference_geometric(image, mapping):
  """scipy.ndimage.geometric_transform (order 3, fill 0) of an output->input map, float."""
  return np.stack([ndimage.geometric_transform(image[:, :, c].astype(np.float64), mapping,
                                               order=3, mode="constant", cval=0.0)
                   for c in range(3)], axis=-1)


def public_map(op, value, size=32):
  """Output (r, c) -> input coordinates, centre o = size / 2 + 0.5, as AA:71-167 reads."""
  o = size / 2 + 0.5
  theta = np.deg2rad(value)
  return {
      "ShearX": lambda p: (p[0] + value * (p[1] - o), p[1]),
      "ShearY": lambda p: (p[0], value * (p[0] - o) + p[1]),
      "TranslateX": lambda p: (p[0], p[1] + size * value),
      "TranslateY": lambda p: (p[0] + size * value, p[1]),
      "Rotate": lambda p: (np.cos(theta) * (p[0] - o) - np.sin(theta) * (p[1] - o) + o,
                           np.sin(theta) * (p[0] - o) + np.cos(theta) * (p[1] - o) + o),
  }[op]


@pytest.mark.parametrize("op, magnitude, u", [
    ("ShearX", 1, 0.3), ("ShearY", 8, 0.7), ("ShearY", 2, 0.5),
    ("TranslateX", 9, 0.4), ("TranslateX", 0, 0.9), ("TranslateY", 3, 0.2),
    ("Rotate", 2, 0.6), ("Rotate", 8, 0.1),
])
def test_geometric_ops_equal_scipy_spline(op, magnitude, u):
  image = smooth_image(seed=magnitude)
  value = aa.magnitude_value(op, magnitude, u)
  got = aa.apply_op(image, op, value)
  exact = np.clip(reference_geometric(image, public_map(op, value)), 0, 255)
  assert got.dtype == np.uint8
  # scipy rounds the spline value to the nearest byte for uint8 output.
  assert np.abs(got - exact).max() <= 0.5 + 1e-6
  assert (got != image).mean() > 0.3  # the op did move pixels


def test_translate_by_whole_pixels_is_a_shift_with_zero_fill():
  image = smooth_image()
  got_x = aa.apply_op(image, "TranslateX", 3 / 32)  # output column c reads c + 3
  expected_x = np.zeros_like(image)
  expected_x[:, :-3] = image[:, 3:]
  np.testing.assert_array_equal(got_x, expected_x)
  got_y = aa.apply_op(image, "TranslateY", -5 / 32)  # output row r reads r - 5
  expected_y = np.zeros_like(image)
  expected_y[5:] = image[:-5]
  np.testing.assert_array_equal(got_y, expected_y)


def test_rotate_half_turn_about_the_public_centre():
  """Centre (16.5, 16.5): output (r, c) reads (33 - r, 33 - c).

  Row / column 2 reads input 31, the last one, where cos(pi) rounding can put
  the coordinate a hair outside the image (fill 0), so it is left out.
  """
  image = smooth_image()
  got = aa.apply_op(image, "Rotate", 180.0)
  np.testing.assert_array_equal(got[3:, 3:], image[::-1, ::-1][1:30, 1:30])
  assert not got[:2].any() and not got[:, :2].any()


# --- sampling: sub-policies uniform, ops with their probabilities --------------

def test_sampling_frequencies_chi_square():
  n = 50_000
  params = aa.autoaugment_params(np.random.default_rng(123), n)
  counts = np.bincount(params.policy, minlength=25)
  assert stats.chisquare(counts).pvalue > 1e-3
  applied = aa.ops_applied(params)
  probs = np.array([[p.first_prob, p.second_prob] for p in aa.CIFAR10_POLICY])
  hits = np.stack([applied[params.policy == i].sum(axis=0) for i in range(25)])
  live = probs > 0
  expected = counts[:, None] * probs
  variance = np.where(live, expected * (1 - probs), 1.0)
  statistic = (((hits - expected) ** 2) / variance)[live].sum()
  assert stats.chi2.sf(statistic, live.sum()) > 1e-3
  assert hits[~live].sum() == 0  # Invert with p = 0 never runs


def test_op_values_inside_their_bins():
  params = aa.autoaugment_params(np.random.default_rng(5), 2000)
  values = aa.op_values(params)
  for i in range(25):
    sub = aa.CIFAR10_POLICY[i]
    for k, (op, m) in enumerate([(sub.first, sub.first_magnitude),
                                 (sub.second, sub.second_magnitude)]):
      v = values[params.policy == i, k]
      low, high = aa.magnitude_value(op, m, 0.0), aa.magnitude_value(op, m, 1.0)
      assert np.all((v >= low) & (v <= high))


def test_apply_autoaugment_runs_exactly_the_drawn_ops():
  """Invert then Posterize(4 bits) on the value 5: 5 / 250 / 0 / 240 tells which ran."""
  policy = [aa.SubPolicy("Invert", 0.5, 0, "Posterize", 0.5, 0)]
  params = aa.autoaugment_params(np.random.default_rng(0), 64, num_policies=1)
  images = np.full((64, 4, 4, 3), 5, np.uint8)
  got = aa.apply_autoaugment(images, params, policy)[:, 0, 0, 0]
  applied = aa.ops_applied(params, policy)
  expected = np.select([applied[:, 0] & applied[:, 1], applied[:, 0], applied[:, 1]],
                       [240, 250, 0], 5)
  np.testing.assert_array_equal(got, expected)
  assert len(set(expected.tolist())) == 4


def test_augment_batch_deterministic_and_validated():
  images = np.stack([smooth_image(s) for s in range(8)])
  a = aa.augment_batch(images, np.random.default_rng(7))
  b = aa.augment_batch(images, np.random.default_rng(7))
  np.testing.assert_array_equal(a, b)
  assert a.dtype == np.uint8 and a.shape == images.shape
  assert not np.array_equal(a, aa.augment_batch(images, np.random.default_rng(8)))
  with pytest.raises(ValueError, match="uint8 RGB"):
    aa.augment_batch(images.astype(np.float32), np.random.default_rng(0))
