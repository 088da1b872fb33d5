"""On-device image augmentation and normalisation (pure JAX, jit-able).

All functions take a batch ``images`` of shape ``(B, H, W, C)`` and treat
every image independently, with randomness drawn per image from one key.
They are vectorised (``vmap`` / broadcasting), so they trace once per shape.

The random parameters are drawn by separate ``*_params`` functions so a test
(or a user) can reproduce exactly what an augmentation did.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Per-channel statistics of the train splits in [0, 1] units, as used by the
# public CIFAR code (and most CIFAR-LT code bases).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


class CropFlipParams(NamedTuple):
  """Per-image crop offsets into the padded image and flip flags."""
  offset_y: jax.Array  # (B,) int32 in [0, 2 * padding]
  offset_x: jax.Array  # (B,) int32 in [0, 2 * padding]
  flip: jax.Array  # (B,) bool, True = mirror left-right


def crop_flip_params(
    rng: jax.Array, batch_size: int, padding: int
) -> CropFlipParams:
  """Draws the parameters of ``random_crop_flip``.

  Offsets are uniform on ``{0, ..., 2 * padding}`` (every crop position of
  the padded image, as torchvision's ``RandomCrop(32, padding=4)``); flips
  are Bernoulli(0.5) (``RandomHorizontalFlip``).
  """
  key_y, key_x, key_flip = jax.random.split(rng, 3)
  offset_y = jax.random.randint(key_y, (batch_size,), 0, 2 * padding + 1)
  offset_x = jax.random.randint(key_x, (batch_size,), 0, 2 * padding + 1)
  flip = jax.random.bernoulli(key_flip, 0.5, (batch_size,))
  return CropFlipParams(offset_y, offset_x, flip)


def apply_crop_flip(
    images: jax.Array, params: CropFlipParams, padding: int
) -> jax.Array:
  """Zero-pads by ``padding``, crops back to HxW at the offsets, flips.

  ``out[i] = flip_i ? P_i[:, ::-1] : P_i`` with
  ``P_i = pad(images[i])[oy_i:oy_i + H, ox_i:ox_i + W]``.
  """
  _, height, width, channels = images.shape
  padded = jnp.pad(
      images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))

  def crop_one(image, oy, ox, flip):
    crop = jax.lax.dynamic_slice(image, (oy, ox, 0), (height, width, channels))
    return jnp.where(flip, crop[:, ::-1], crop)

  return jax.vmap(crop_one)(padded, params.offset_y, params.offset_x,
                            params.flip)


def random_crop_flip(
    rng: jax.Array, images: jax.Array, padding: int = 4
) -> jax.Array:
  """Padded random crop + horizontal flip (He et al. 2016 CIFAR recipe).

  Per image: pad with ``padding`` zero pixels on each side, crop a random
  HxW window, mirror left-right with probability 0.5. Shape and dtype are
  preserved. METHOD.md "Data protocol": 4-pixel padding on CIFAR.
  """
  params = crop_flip_params(rng, images.shape[0], padding)
  return apply_crop_flip(images, params, padding)


class CutoutParams(NamedTuple):
  """Per-image centres of the Cutout square."""
  center_y: jax.Array  # (B,) int32 in [0, H)
  center_x: jax.Array  # (B,) int32 in [0, W)


def cutout_params(
    rng: jax.Array, batch_size: int, height: int, width: int
) -> CutoutParams:
  """Draws Cutout centres uniformly over all pixels (DeVries & Taylor 2017)."""
  key_y, key_x = jax.random.split(rng)
  return CutoutParams(
      jax.random.randint(key_y, (batch_size,), 0, height),
      jax.random.randint(key_x, (batch_size,), 0, width))


def cutout_mask(
    params: CutoutParams, height: int, width: int, size: int
) -> jax.Array:
  """``(B, H, W, 1)`` bool mask, False inside each image's square.

  Square rows ``[cy - size // 2, cy - size // 2 + size)`` clipped to
  ``[0, H)``, same for columns: a ``size x size`` square for an interior
  centre, smaller where it crosses the border (DeVries & Taylor 2017; for an
  even ``size`` this is exactly their ``clip(y -/+ size // 2)``).
  """
  top = params.center_y[:, None] - size // 2
  left = params.center_x[:, None] - size // 2
  rows = jnp.arange(height)[None, :]
  cols = jnp.arange(width)[None, :]
  in_rows = (rows >= top) & (rows < top + size)  # (B, H)
  in_cols = (cols >= left) & (cols < left + size)  # (B, W)
  inside = in_rows[:, :, None] & in_cols[:, None, :]
  return ~inside[..., None]


def cutout(rng: jax.Array, images: jax.Array, size: int = 16) -> jax.Array:
  """Cutout: zero one ``size x size`` square per image (DeVries & Taylor 2017).

  The centre is uniform over the image and the square is clipped at the
  borders. Shape and dtype are preserved.
  """
  batch, height, width, _ = images.shape
  params = cutout_params(rng, batch, height, width)
  keep = cutout_mask(params, height, width, size)
  return jnp.where(keep, images, jnp.zeros((), images.dtype))


def normalize(
    images_uint8: jax.Array, mean: Sequence[float], std: Sequence[float]
) -> jax.Array:
  """``(x / 255 - mean) / std`` per channel, as float32.

  ``mean`` and ``std`` are in [0, 1] units (torchvision's ``ToTensor`` then
  ``Normalize``), one value per channel or a scalar.
  """
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (images_uint8.astype(jnp.float32) / 255.0 - mean) / std


def make_preprocess(
    mean: Sequence[float],
    std: Sequence[float],
    augment: bool,
    cutout_size: int = 0,
    padding: int = 4,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Returns ``fn(rng, images_uint8) -> float32`` normalised images.

  With ``augment``: random crop (``padding``) + flip, then Cutout of
  ``cutout_size`` if > 0, then ``normalize``. Cutout is applied to the raw
  image, before normalisation, so the square is black -- as in the CIFAR-LT
  code bases that put ``Cutout`` right after ``ToTensor`` and before
  ``Normalize``. Without ``augment`` the key is ignored (evaluation).
  The returned function is pure and jit-able.
  """
  if cutout_size < 0 or padding < 0:
    raise ValueError(
        f"cutout_size and padding must be >= 0, got {cutout_size} and "
        f"{padding}.")

  def preprocess(rng: jax.Array, images_uint8: jax.Array) -> jax.Array:
    images = images_uint8
    if augment:
      crop_key, cutout_key = jax.random.split(rng)
      images = random_crop_flip(crop_key, images, padding)
      if cutout_size > 0:
        images = cutout(cutout_key, images, cutout_size)
    return normalize(images, mean, std)

  return preprocess


def channel_mean_std(images_uint8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std in [0, 1] units of a uint8 NHWC array (host).

  For datasets without published statistics (digits, npz); compute it on the
  train set only.
  """
  x = np.asarray(images_uint8)
  if x.ndim != 4 or x.shape[0] == 0:
    raise ValueError(f"expected a non-empty NHWC array, got shape {x.shape}.")
  total = np.zeros(x.shape[-1])
  total_sq = np.zeros(x.shape[-1])
  for start in range(0, x.shape[0], 4096):  # chunks bound the float copy
    chunk = x[start:start + 4096].astype(np.float64) / 255.0
    total += chunk.sum(axis=(0, 1, 2))
    total_sq += np.square(chunk).sum(axis=(0, 1, 2))
  n = x.shape[0] * x.shape[1] * x.shape[2]
  mean = total / n
  std = np.sqrt(np.maximum(total_sq / n - mean ** 2, 0.0))
  return mean.astype(np.float32), np.maximum(std, 1e-3).astype(np.float32)
