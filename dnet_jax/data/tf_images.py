"""TensorFlow image basics shared by the tf.data pipelines: the lazy TensorFlow import,
decoding, the Inception-style random crop and the evaluation resize-and-crop.

`tf_module()` imports TensorFlow on first use with its GPUs hidden, so that
importing `dnet_jax.data` never loads TensorFlow and TensorFlow never takes the
accelerators JAX uses.
"""

from __future__ import annotations


def tf_module():
  """TensorFlow, imported on first use, with GPUs hidden (JAX owns the accelerators)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # already initialised: devices can no longer change
    pass
  return tf


def decode_image(image_bytes):
  """Encoded JPEG/PNG/BMP/GIF bytes -> uint8 [H, W, 3] (grey and CMYK converted)."""
  tf = tf_module()
  image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def random_resized_crop(image, seed, image_size: int, area_range=(0.08, 1.0),
                        aspect_ratio_range=(3 / 4, 4 / 3), max_attempts: int = 10):
  """Inception-style crop (torchvision `RandomResizedCrop`) with a stateless seed [2].

  Samples a box covering `area_range` of the image with an aspect ratio in
  `aspect_ratio_range` (whole image if no box is found in `max_attempts`),
  then resizes it to `image_size` x `image_size` (bilinear, antialiased).
  """
  tf = tf_module()
  shape = tf.shape(image)
  whole = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, shape=[1, 1, 4])
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=whole, seed=seed, min_object_covered=0.0,
      aspect_ratio_range=aspect_ratio_range, area_range=area_range,
      max_attempts=max_attempts, use_image_if_no_bounding_boxes=True)
  crop = tf.slice(image, begin, size)
  return tf.image.resize(crop, [image_size, image_size], method="bilinear", antialias=True)


def resize_center_crop(image, image_size: int, resize_size: int):
  """Resize the shorter side to `resize_size`, then crop the central `image_size` square."""
  tf = tf_module()
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = resize_size / tf.minimum(shape[0], shape[1])
  new_hw = tf.cast(tf.round(shape * scale), tf.int32)
  new_hw = tf.maximum(new_hw, resize_size)  # guard against rounding below the target
  image = tf.image.resize(image, new_hw, method="bilinear", antialias=True)
  top = (new_hw[0] - image_size) // 2
  left = (new_hw[1] - image_size) // 2
  return tf.image.crop_to_bounding_box(image, top, left, image_size, image_size)
