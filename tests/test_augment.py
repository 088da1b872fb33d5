"""Tests of dnet_jax.data.augment against hand-written numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dnet_jax import data as dd


def images_uint8(batch=16, height=8, width=8, channels=3, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(1, 256, (batch, height, width, channels), dtype=np.uint8)


def numpy_crop_flip(images, offset_y, offset_x, flip, padding):
  """Reference: zero-pad, slice, mirror, one image at a time."""
  _, h, w, _ = images.shape
  out = []
  for img, oy, ox, f in zip(images, offset_y, offset_x, flip):
    padded = np.zeros((h + 2 * padding, w + 2 * padding, img.shape[-1]),
                      img.dtype)
    padded[padding:padding + h, padding:padding + w] = img
    crop = padded[oy:oy + h, ox:ox + w]
    out.append(crop[:, ::-1] if f else crop)
  return np.stack(out)


def test_random_crop_flip_matches_numpy():
  x = images_uint8()
  key = jax.random.key(3)
  got = np.asarray(dd.random_crop_flip(key, jnp.asarray(x), padding=2))
  params = dd.crop_flip_params(key, len(x), 2)
  oy, ox, flip = (np.asarray(p) for p in params)
  assert oy.min() >= 0 and oy.max() <= 4 and ox.min() >= 0 and ox.max() <= 4
  np.testing.assert_array_equal(got, numpy_crop_flip(x, oy, ox, flip, 2))
  assert got.dtype == np.uint8 and got.shape == x.shape


def test_crop_flip_hand_case():
  x = np.arange(9, dtype=np.float32).reshape(1, 3, 3, 1)
  params = dd.CropFlipParams(jnp.array([0]), jnp.array([2]), jnp.array([True]))
  got = np.asarray(dd.apply_crop_flip(jnp.asarray(x), params, 1))[0, ..., 0]
  # Padded rows 0..2, columns 2..4 = [[0,0,0],[1,2,0],[4,5,0]], mirrored.
  np.testing.assert_array_equal(got, [[0, 0, 0], [0, 2, 1], [0, 5, 4]])
  centre = dd.CropFlipParams(jnp.array([1]), jnp.array([1]), jnp.array([False]))
  np.testing.assert_array_equal(
      np.asarray(dd.apply_crop_flip(jnp.asarray(x), centre, 1)), x)


def test_crop_flip_statistics():
  params = dd.crop_flip_params(jax.random.key(0), 4000, 4)
  flip = np.asarray(params.flip)
  assert 0.45 < flip.mean() < 0.55
  assert sorted(set(np.asarray(params.offset_y).tolist())) == list(range(9))
  assert sorted(set(np.asarray(params.offset_x).tolist())) == list(range(9))
  # Different keys, different draws.
  other = dd.crop_flip_params(jax.random.key(1), 4000, 4)
  assert not np.array_equal(flip, np.asarray(other.flip))


def test_cutout_mask_areas():
  params = dd.CutoutParams(jnp.array([16, 0, 31, 10]),
                           jnp.array([16, 0, 5, 31]))
  mask = np.asarray(dd.cutout_mask(params, 32, 32, 16))[..., 0]
  zero_area = (~mask).sum(axis=(1, 2)).tolist()
  # Rows/cols [c - 8, c + 8) clipped to [0, 32): interior 16x16; corner
  # 8x8; (31, 5): rows 23..31 x cols 0..12 = 9x13; (10, 31): 16x9.
  assert zero_area == [256, 64, 117, 144]
  assert not mask[0, 8:24, 8:24].any() and mask[0, 24:, :].all()
  odd = np.asarray(dd.cutout_mask(dd.CutoutParams(jnp.array([10]),
                                                  jnp.array([10])), 32, 32, 5))
  assert (~odd).sum() == 25


def test_cutout_matches_numpy():
  x = images_uint8(batch=32, height=32, width=32)
  key = jax.random.key(7)
  got = np.asarray(dd.cutout(key, jnp.asarray(x), size=16))
  cy, cx = (np.asarray(p) for p in dd.cutout_params(key, 32, 32, 32))
  want = x.copy()
  for i in range(len(x)):  # DeVries & Taylor's clipping, per image
    y1, y2 = np.clip([cy[i] - 8, cy[i] + 8], 0, 32)
    x1, x2 = np.clip([cx[i] - 8, cx[i] + 8], 0, 32)
    want[i, y1:y2, x1:x2] = 0
  np.testing.assert_array_equal(got, want)
  assert got.dtype == np.uint8


def test_normalize_hand_values():
  x = jnp.array([[[[0, 255, 51]]]], jnp.uint8)
  out = dd.normalize(x, (0.5, 0.5, 0.0), (0.25, 0.25, 0.1))
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out)[0, 0, 0], [-2.0, 2.0, 2.0],
                             rtol=1e-6)


def test_make_preprocess_eval_and_train():
  x = jnp.asarray(images_uint8(batch=8, height=32, width=32))
  mean, std = dd.CIFAR100_MEAN, dd.CIFAR100_STD
  evaluate = dd.make_preprocess(mean, std, augment=False)
  np.testing.assert_array_equal(
      np.asarray(evaluate(jax.random.key(0), x)),
      np.asarray(dd.normalize(x, mean, std)))
  np.testing.assert_array_equal(np.asarray(evaluate(jax.random.key(0), x)),
                                np.asarray(evaluate(jax.random.key(1), x)))

  train = dd.make_preprocess(mean, std, augment=True, cutout_size=16)
  out = train(jax.random.key(0), x)
  assert out.shape == x.shape and out.dtype == jnp.float32
  # Cutout zeroes raw pixels before normalisation: -mean/std appears.
  black = (-np.asarray(mean) / np.asarray(std)).astype(np.float32)
  assert np.isclose(np.asarray(out), black).all(axis=-1).any()
  assert not np.array_equal(np.asarray(out),
                            np.asarray(train(jax.random.key(1), x)))
  with pytest.raises(ValueError, match="cutout_size"):
    dd.make_preprocess(mean, std, augment=True, cutout_size=-1)


def test_preprocess_compiles_once():
  traces = []
  preprocess = dd.make_preprocess((0.5,), (0.25,), augment=True, cutout_size=4)

  def counted(rng, images):
    traces.append(1)
    return preprocess(rng, images)

  jitted = jax.jit(counted)
  x = jnp.asarray(images_uint8(batch=4, channels=1))
  for seed in range(3):
    out = jitted(jax.random.key(seed), x)
  jax.block_until_ready(out)
  assert len(traces) == 1


@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.float32])
def test_augmentations_preserve_shape_and_dtype(dtype):
  x = jnp.asarray(images_uint8(batch=3, height=6, width=5)).astype(dtype)
  key = jax.random.key(0)
  for out in (dd.random_crop_flip(key, x, padding=3), dd.cutout(key, x, 4),
              jax.jit(dd.random_crop_flip, static_argnums=2)(key, x, 3)):
    assert out.shape == x.shape and out.dtype == x.dtype


def test_channel_mean_std():
  x = images_uint8(batch=50, height=4, width=4)
  mean, std = dd.channel_mean_std(x)
  ref = x.astype(np.float64) / 255
  np.testing.assert_allclose(mean, ref.mean(axis=(0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(std, ref.std(axis=(0, 1, 2)), rtol=1e-4)
