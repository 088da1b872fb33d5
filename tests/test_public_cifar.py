"""dnet_jax.data.public_cifar: double-padded crop, Cutout (with the AA:266 typo), composition."""

import numpy as np
import pytest

from dnet_jax.data import autoaugment as aa
from dnet_jax.data import public_cifar as pc


def images_uint8(batch=8, size=32, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)


# --- double-padded crop + flip ---------------------------------------------------

def reference_crop_flip(image, top, left, flip, r=4, z=4):
  """Pixel by pixel: canvas (i, j) -> reflected source pixel, or 0 in the zero border."""
  h, w = image.shape[:2]

  def reflect(k, n):  # torch/numpy "reflect": -1 -> 1, n -> n - 2
    return -k if k < 0 else (2 * (n - 1) - k if k >= n else k)

  out = np.zeros_like(image)
  for i in range(h):
    for j in range(w):
      y, x = top + i - z, left + j - z  # coordinates in the 40x40 reflect-padded image
      if 0 <= y < h + 2 * r and 0 <= x < w + 2 * r:
        out[i, j] = image[reflect(y - r, h), reflect(x - r, w)]
  return out[:, ::-1] if flip else out


def test_crop_flip_matches_pixelwise_reference():
  images = images_uint8(batch=12)
  params = pc.crop_flip_params(np.random.default_rng(3), 12)
  params = params._replace(top=np.r_[0, 16, 8, 4, params.top[4:]],
                           left=np.r_[0, 16, 8, 0, params.left[4:]],
                           flip=np.r_[False, True, False, False, params.flip[4:]])
  got = pc.apply_crop_flip(images, params)
  for i in range(12):
    expected = reference_crop_flip(images[i], params.top[i], params.left[i], params.flip[i])
    np.testing.assert_array_equal(got[i], expected)
  np.testing.assert_array_equal(got[2], images[2])  # corner (8, 8): the original image
  # corner (4, 0): rows 4.. are source rows 0..27; columns 4..7 reflect source columns 4..1.
  np.testing.assert_array_equal(got[3, 4:, 4:8], images[3, :28, 4:0:-1])
  assert not got[0, :4].any() and got[0, 4:, 4:].any()  # corner (0, 0): 4 zero rows/cols


def test_crop_flip_params_range_and_batch_api():
  params = pc.crop_flip_params(np.random.default_rng(0), 5000)
  assert sorted(set(params.top.tolist())) == list(range(17))
  assert sorted(set(params.left.tolist())) == list(range(17))
  assert 0.45 < params.flip.mean() < 0.55
  images = images_uint8()
  got = pc.crop_flip_batch(images, np.random.default_rng(9))
  expected = pc.apply_crop_flip(images, pc.crop_flip_params(np.random.default_rng(9), 8))
  np.testing.assert_array_equal(got, expected)


# --- Cutout ------------------------------------------------------------------------

@pytest.mark.parametrize("top, left, typo, rows, cols", [
    (3, 5, True, (3, 19), (3, 21)),  # typo: left <- top, right stays left + 16
    (3, 5, False, (3, 19), (5, 21)),
    (10, 0, True, (10, 26), (10, 16)),  # typo: 6 columns only
    (0, 15, True, (0, 16), (0, 31)),  # typo: 31 columns
    (-5, -3, True, (0, 11), (0, 13)),  # negative draws clip to 0 and shrink
    (-5, -3, False, (0, 11), (0, 13)),
    (-4, 6, True, (0, 12), (0, 22)),  # typo with a negative top: left <- 0
    (-4, 6, False, (0, 12), (6, 22)),
    (15, -8, True, (15, 31), (0, 8)),
])
def test_cutout_region_and_fill(top, left, typo, rows, cols):
  image = images_uint8(batch=1, seed=top + 20)
  fill = int(image.astype(np.int64).sum()) // image.size  # exact mean, truncated
  expected = image.copy()
  expected[0, rows[0]:rows[1], cols[0]:cols[1], :] = fill
  params = pc.CutoutParams(top=np.array([top]), left=np.array([left]))
  got = pc.apply_cutout(image, params, size=16, public_typo=typo)
  np.testing.assert_array_equal(got, expected)


def test_cutout_fill_is_the_truncated_image_mean():
  image = np.zeros((1, 32, 32, 3), np.uint8)
  image[0, :, :, 0] = 255
  image[0, 0, 0, 1] = 252
  mean = image.mean()  # (255 * 1024 + 252) / 3072 = 85.08...
  assert pc.mean_fill_values(image)[0] == int(mean) == 85
  params = pc.CutoutParams(top=np.array([8]), left=np.array([8]))
  got = pc.apply_cutout(image, params, public_typo=False)
  assert (got[0, 8:24, 8:24] == 85).all() and (got[0, :8] == image[0, :8]).all()


def test_cutout_placement_range_and_size():
  params = pc.cutout_params(np.random.default_rng(0), 4000, 32, 32, 16)
  for draws in (params.top, params.left):
    assert sorted(set(draws.tolist())) == list(range(-8, 16))
  mask = pc.cutout_mask(params, 32, 32, 16, public_typo=False)
  heights = mask.any(axis=2).sum(axis=1)
  widths = mask.any(axis=1).sum(axis=1)
  np.testing.assert_array_equal(heights, 16 + np.minimum(params.top, 0))
  np.testing.assert_array_equal(widths, 16 + np.minimum(params.left, 0))
  assert not mask[:, 31].any() and not mask[:, :, 31].any()  # ends before row/col 31


def test_cutout_batch_uses_its_generator():
  images = images_uint8()
  got = pc.cutout_batch(images, np.random.default_rng(4))
  params = pc.cutout_params(np.random.default_rng(4), 8, 32, 32)
  np.testing.assert_array_equal(got, pc.apply_cutout(images, params))
  with pytest.raises(ValueError, match="does not fit"):
    pc.cutout_params(np.random.default_rng(0), 1, 8, 8, 20)


# --- the composed public transform ---------------------------------------------------

def test_public_train_transform_composes_crop_autoaugment_cutout():
  images = images_uint8(batch=16)
  got = pc.public_train_transform(images, pc.transform_rng(1, 2, 3))
  rng = pc.transform_rng(1, 2, 3)
  expected = pc.crop_flip_batch(images, rng)
  expected = aa.augment_batch(expected, rng)
  expected = pc.cutout_batch(expected, rng)
  np.testing.assert_array_equal(got, expected)
  assert got.dtype == np.uint8 and got.shape == images.shape
  again = pc.public_train_transform(images, pc.transform_rng(1, 2, 3))
  np.testing.assert_array_equal(got, again)
  other = pc.public_train_transform(images, pc.transform_rng(1, 2, 4))
  assert not np.array_equal(got, other)


def test_bad_input_errors():
  with pytest.raises(ValueError, match="uint8"):
    pc.public_train_transform(np.zeros((2, 32, 32, 3), np.float32), pc.transform_rng(0, 0, 0))
  with pytest.raises(ValueError, match=">= 0"):
    pc.transform_rng(0, -1, 0)


# ---------------------------------------------------------------------------- the runner's hook


def test_in_memory_dataset_applies_the_host_transform_per_seed_epoch_index():
  import functools

  from dnet_jax.data import long_tail
  from experiments import datasets
  from experiments import sampling

  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(3), [10, 4, 2]).astype(np.int32)
  images = rng.integers(0, 256, size=(len(labels), 32, 32, 3), dtype=np.uint8)
  data = long_tail.LongTailedData(images, labels, images[:3], labels[:3], images[:3],
                                  labels[:3], 3, np.array([10, 4, 2]), "toy")
  transform = functools.partial(pc.public_train_transform, public_typo=True)

  def dataset(workers):
    return datasets.InMemoryDataset(data, batch_size=4, meta_batch_size=0, eval_batch_size=4,
                                    seed=5, preprocessors=None, host_transform=transform,
                                    host_workers=workers)

  inline = list(dataset(0).train_batches(0, 8, with_meta=False))  # 4 steps per epoch, 2 epochs
  threaded = list(dataset(2).train_batches(0, 8, with_meta=False))
  resumed = list(dataset(2).train_batches(5, 8, with_meta=False))
  for step, batch, _ in inline:
    epoch, index = divmod(step, 4)
    rows = sampling.epoch_order("instance", labels, 5, epoch, 16)[4 * index:4 * index + 4]
    expected = pc.public_train_transform(
        images[rows], pc.transform_rng(5, epoch, index), public_typo=True)
    np.testing.assert_array_equal(batch["image"], expected)
    np.testing.assert_array_equal(batch["label"], labels[rows])
    np.testing.assert_array_equal(threaded[step][1]["image"], expected)
    if step >= 5:
      np.testing.assert_array_equal(resumed[step - 5][1]["image"], expected)


def test_host_transform_config_errors_name_the_fix():
  import ml_collections

  from experiments import datasets
  from experiments.errors import InvalidInputError

  config = ml_collections.ConfigDict({"host_transform": "public_cifar", "augment": True,
                                      "cutout_size": 16, "cutout_public_typo": True})
  with pytest.raises(InvalidInputError, match="augment=False"):
    datasets.make_host_transform(config)
  config.augment, config.host_transform = False, "randaugment"
  with pytest.raises(InvalidInputError, match="public_cifar"):
    datasets.make_host_transform(config)
