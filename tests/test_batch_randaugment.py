"""Batch-level RandAugment equals the per-image RandAugment, bit for bit.

`color_randaugment.apply_rand_augment_batch` splits a batch by op kind and runs each kind
once; `apply_rand_augment` picks one kernel per image with `tf.cond` (and is itself
checked against Pillow in tests/test_color_randaugment.py). Both run the same kernels,
which compute every image of a batch as alone, so the uint8 results must be equal
exactly, whatever the batch composition, in eager mode and inside tf.data (graph mode).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from dnet_jax.data import color_randaugment as cra
from dnet_jax.data import split_lists

tf = cra.tf
NUM = 30  # every op twice: once per sign, once per interpolation


def _images(count: int, height: int = 32, width: int = 40) -> np.ndarray:
  """Distinct images: smooth colour fields (as photos), with noise on every third."""
  rng = np.random.default_rng(1)
  coarse = rng.uniform(0, 255, (count, height // 8 + 1, width // 8 + 1, 3)).astype(np.float32)
  smooth = tf.image.resize(coarse, [height, width], method="bilinear").numpy()
  noise = rng.normal(0, 40, smooth.shape) * (np.arange(count) % 3 == 0)[:, None, None, None]
  return np.clip(smooth + noise, 0, 255).astype(np.uint8)


def _params() -> cra.RandAugmentParams:
  """Draws [NUM, 2] covering every op with both signs and both resamplings (layer 0: op
  i mod 15, negated for i >= 15, bicubic for even i, so op k is bicubic at one of k,
  k + 15 and bilinear at the other), varied magnitudes, and layers not applied (both
  layers of image 3; layer 1 of every third image)."""
  i = np.arange(NUM)
  op = np.stack([i % 15, (7 * i + 3) % 15], axis=1)
  apply = np.stack([~np.isin(i, [3, 20]), i % 3 != 0], axis=1)
  magnitude = np.random.default_rng(2).uniform(4.0, 10.0, (NUM, 2)).astype(np.float32)
  magnitude[::4, 0] = 10.0
  negate = np.stack([i >= 15, i % 2 == 1], axis=1)
  bicubic = np.stack([i % 2 == 0, i % 4 < 2], axis=1)
  return cra.RandAugmentParams(tf.constant(op, tf.int32), tf.constant(apply),
                               tf.constant(magnitude), tf.constant(negate), tf.constant(bicubic))


def _per_image(images, params):
  return np.stack([cra.apply_rand_augment(image, cra.RandAugmentParams(*(f[k] for f in params)))
                   for k, image in enumerate(images)])


def test_batch_rand_augment_equals_per_image_in_eager_and_in_tf_data():
  images, params = _images(NUM), _params()
  expected = _per_image(images, params)
  # Applied ops changed the images, except: image 3 (no layer applied), 0 and 15
  # (AutoContrast alone on noise, already full range), 2 and 17 (Invert twice).
  changed = np.any(expected != images, axis=(1, 2, 3))
  np.testing.assert_array_equal(np.flatnonzero(~changed), [0, 2, 3, 15, 17])

  eager = cra.apply_rand_augment_batch(tf.constant(images), params)
  assert eager.dtype == tf.uint8
  np.testing.assert_array_equal(eager.numpy(), expected)

  # Graph mode, other batch compositions (7 + 7 + 7 + 7 + 2).
  ds = tf.data.Dataset.from_tensor_slices((images, params)).batch(7)
  ds = ds.map(lambda x, p: cra.apply_rand_augment_batch(x, cra.RandAugmentParams(*p)))
  np.testing.assert_array_equal(np.concatenate(list(ds.as_numpy_iterator())), expected)


def test_batch_rand_augment_keeps_float_levels_and_empty_batches():
  images, params = _images(4), cra.RandAugmentParams(*(f[:4] for f in _params()))
  levels = cra.apply_rand_augment_batch(tf.constant(images, tf.float32), params)
  assert levels.dtype == tf.float32
  np.testing.assert_array_equal(levels.numpy(), _per_image(images, params))
  empty = cra.apply_rand_augment_batch(tf.zeros([0, 8, 8, 3], tf.uint8),
                                       cra.RandAugmentParams(*(f[:0] for f in params)))
  assert empty.shape == (0, 8, 8, 3)


@pytest.fixture(scope="module")
def noise_list(tmp_path_factory):
  root = tmp_path_factory.mktemp("noise_images")
  lines = []
  for index, image in enumerate(_images(8, 36, 44)):
    Image.fromarray(image).save(root / f"img_{index}.png")
    lines.append(f"img_{index}.png {index % 2}")
  (root / "list.txt").write_text("\n".join(lines) + "\n")
  return root, split_lists.read_split_list(root / "list.txt", 2)


def test_examples_dataset_batch_rand_augment_equals_the_per_image_chain(noise_list,
                                                                        monkeypatch):
  """The training pipeline, with RandAugment after `batch()`, gives the images of
  `preprocess` (the whole chain on one image, RandAugment per image)."""
  root, split = noise_list
  batch_shapes, original = [], cra.apply_rand_augment_batch

  def spy(images, params):
    batch_shapes.append(images.shape.as_list())
    return original(images, params)

  monkeypatch.setattr(cra, "apply_rand_augment_batch", spy)
  indices = np.array([5, 2, 7, 0, 3, 6, 1, 4])
  seeds = split_lists.augmentation_seeds(3, 1, indices)
  ds = split_lists.examples_dataset(split, root, indices, seeds, batch_size=4, train=True,
                                    image_size=24, augment="public_imagenet",
                                    num_parallel_calls=2, batch_rand_augment=True)
  batched = np.concatenate([b["image"] for b in ds.as_numpy_iterator()])
  assert batch_shapes == [[4, 24, 24, 3]]  # traced once, on batches
  for row in (0, 3, 5):
    with open(os.path.join(root, split.paths[indices[row]]), "rb") as f:
      one = split_lists.preprocess(f.read(), seeds[row], train=True, image_size=24,
                                   resize_size=24, mean=split_lists.IMAGENET_MEAN,
                                   std=split_lists.IMAGENET_STD, augment="public_imagenet")
    np.testing.assert_array_equal(batched[row], one.numpy())
