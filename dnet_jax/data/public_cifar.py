"""The public Difficulty-Net CIFAR train transform on uint8 batches (host, numpy).

hitachi-rd-cv/Difficulty_Net, ``CIFAR-LT/cifar_train_exaugment.py`` ("C1")
lines 420-435 (the same in ``cifar_train_exaugment_stage2.py`` lines 318-331):

  reflect-pad 4 -> RandomCrop(32, padding=4) -> RandomHorizontalFlip
  -> AutoAugment (CIFAR-10 policy) -> Cutout(16) -> ToTensor -> Normalize

* Double-padded crop: the reflect padding (``F.pad(mode="reflect")``, numpy's
  ``"reflect"``: the edge pixel is not repeated) gives 40x40; ``RandomCrop``'s
  ``padding=4`` zero-pads that to 48x48 and crops 32x32 at a top-left corner
  uniform on ``{0..16}^2``. The uint8 -> float -> uint8 round trip around the
  reflect padding (ToTensor, ToPILImage) is exact for every byte value.
* Flip: left-right with probability 1/2.
* Cutout (``CIFAR-LT/auto_augment.py`` "AA" lines 251-272): ``top`` and
  ``left`` uniform integers in ``[-size // 2, H - size)`` and
  ``[-size // 2, W - size)``; rows ``[max(top, 0), top + size)`` and columns
  ``[left', left + size)`` are set to the image's mean over all pixels and
  channels, truncated to uint8 (numpy's float -> uint8 assignment). AA:266
  reads ``left = 0 if left < 0 else top``, so with ``public_typo=True`` (the
  public recipe) ``left' = 0`` for a negative ``left`` and ``left' = max(top,
  0)`` otherwise -- the square then spans columns ``[max(top, 0), left +
  size)``, between 1 and 31 wide. With ``public_typo=False``,
  ``left' = max(left, 0)``. Either way the region ends at ``top + size``
  / ``left + size`` of the drawn values, so a negative draw shrinks it.

Normalisation is left to the caller (``dnet_jax.data.augment.normalize`` with
``CIFAR100_MEAN`` / ``CIFAR100_STD``, which C1:417-418 uses for CIFAR-10 too).

Every function takes a ``numpy.random.Generator``; ``transform_rng(seed,
epoch, batch_index)`` gives the generator of one batch, so a batch is a pure
function of those three integers and a resumed run sees the same pixels.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from dnet_jax.data import autoaugment

# Stream tag of the train-transform generators (dnet_jax.data.batching uses 0-2).
_TRANSFORM_STREAM = 3


def transform_rng(seed: int, epoch: int, batch_index: int) -> np.random.Generator:
  """The generator of one batch's augmentation, from ``(seed, epoch, batch_index)``."""
  if min(seed, epoch, batch_index) < 0:
    raise ValueError(
        f"seed, epoch and batch_index must be >= 0, got {seed}, {epoch}, {batch_index}.")
  return np.random.default_rng([int(seed), _TRANSFORM_STREAM, int(epoch), int(batch_index)])


class CropFlipParams(NamedTuple):
  """Per-image crop corner in the padded canvas and flip flag."""
  top: np.ndarray  # (B,) int in [0, 2 * (reflect + zero)]
  left: np.ndarray  # (B,) int in [0, 2 * (reflect + zero)]
  flip: np.ndarray  # (B,) bool, True = mirror left-right


def crop_flip_params(rng: np.random.Generator, batch_size: int,
                     reflect_padding: int = 4, zero_padding: int = 4) -> CropFlipParams:
  """Corners uniform on ``{0..2 (r + z)}`` (torchvision RandomCrop), flips p = 1/2."""
  span = 2 * (reflect_padding + zero_padding) + 1
  return CropFlipParams(top=rng.integers(0, span, batch_size),
                        left=rng.integers(0, span, batch_size),
                        flip=rng.random(batch_size) < 0.5)


def double_padded_canvas(images: np.ndarray, reflect_padding: int = 4,
                         zero_padding: int = 4) -> np.ndarray:
  """Reflect-pads H and W by ``reflect_padding``, then zero-pads by ``zero_padding``."""
  r, z = reflect_padding, zero_padding
  if r >= min(images.shape[1:3]):
    raise ValueError(f"reflect padding {r} needs images larger than {r} pixels, "
                     f"got {images.shape[1:3]}.")
  canvas = np.pad(images, ((0, 0), (r, r), (r, r), (0, 0)), mode="reflect")
  return np.pad(canvas, ((0, 0), (z, z), (z, z), (0, 0)))


def apply_crop_flip(images: np.ndarray, params: CropFlipParams,
                    reflect_padding: int = 4, zero_padding: int = 4) -> np.ndarray:
  """``out[i] = canvas[i][top:top + H, left:left + W]``, mirrored where ``flip``."""
  images = _check_uint8(images)
  batch, height, width, _ = images.shape
  canvas = double_padded_canvas(images, reflect_padding, zero_padding)
  rows = params.top[:, None] + np.arange(height)[None, :]  # (B, H)
  cols = params.left[:, None] + np.arange(width)[None, :]  # (B, W)
  cols = np.where(params.flip[:, None], cols[:, ::-1], cols)
  return canvas[np.arange(batch)[:, None, None], rows[:, :, None], cols[:, None, :]]


def crop_flip_batch(images_uint8: np.ndarray, rng: np.random.Generator,
                    reflect_padding: int = 4, zero_padding: int = 4) -> np.ndarray:
  """The public double-padded random crop + horizontal flip of a uint8 batch."""
  params = crop_flip_params(rng, len(images_uint8), reflect_padding, zero_padding)
  return apply_crop_flip(images_uint8, params, reflect_padding, zero_padding)


class CutoutParams(NamedTuple):
  """Per-image drawn corner of the Cutout square (may be negative)."""
  top: np.ndarray  # (B,) int in [-size // 2, H - size)
  left: np.ndarray  # (B,) int in [-size // 2, W - size)


def cutout_params(rng: np.random.Generator, batch_size: int, height: int, width: int,
                  size: int = 16) -> CutoutParams:
  """``top``, ``left`` uniform integers in ``[-size // 2, H or W - size)`` (AA:260-261)."""
  if not 0 < size < min(height, width) + size // 2:
    raise ValueError(f"Cutout size {size} does not fit {height}x{width} images.")
  return CutoutParams(top=rng.integers(-(size // 2), height - size, batch_size),
                      left=rng.integers(-(size // 2), width - size, batch_size))


def cutout_mask(params: CutoutParams, height: int, width: int, size: int = 16,
                public_typo: bool = True) -> np.ndarray:
  """``(B, H, W)`` bool, True inside each image's Cutout region (AA:262-268)."""
  row_start = np.maximum(params.top, 0)
  if public_typo:
    col_start = np.where(params.left < 0, 0, row_start)
  else:
    col_start = np.maximum(params.left, 0)
  rows = np.arange(height)[None, :]
  cols = np.arange(width)[None, :]
  in_rows = (rows >= row_start[:, None]) & (rows < params.top[:, None] + size)
  in_cols = (cols >= col_start[:, None]) & (cols < params.left[:, None] + size)
  return in_rows[:, :, None] & in_cols[:, None, :]


def mean_fill_values(images: np.ndarray) -> np.ndarray:
  """``(B,)`` uint8: each image's mean over pixels and channels, truncated.

  Equal to AA:258+268's ``uint8 <- float(img.mean())``: the float64 mean of
  integers below 2^53 is the correctly rounded quotient, whose truncation is
  the integer floor computed here.
  """
  flat = images.reshape(len(images), -1)
  return (flat.sum(axis=1, dtype=np.int64) // flat.shape[1]).astype(np.uint8)


def apply_cutout(images: np.ndarray, params: CutoutParams, size: int = 16,
                 public_typo: bool = True) -> np.ndarray:
  """Fills each image's Cutout region with its own mean value (uint8)."""
  images = _check_uint8(images)
  mask = cutout_mask(params, images.shape[1], images.shape[2], size, public_typo)
  fill = mean_fill_values(images)[:, None, None, None]
  return np.where(mask[..., None], fill, images)


def cutout_batch(images_uint8: np.ndarray, rng: np.random.Generator, size: int = 16,
                 public_typo: bool = True) -> np.ndarray:
  """The public Cutout (mean fill) of a uint8 batch."""
  batch, height, width = np.shape(images_uint8)[:3]
  params = cutout_params(rng, batch, height, width, size)
  return apply_cutout(images_uint8, params, size, public_typo)


def public_train_transform(images_uint8: np.ndarray, rng: np.random.Generator,
                           public_typo: bool = True, cutout_size: int = 16) -> np.ndarray:
  """C1:420-431 on a uint8 batch: crop + flip, AutoAugment, Cutout; uint8 out.

  The random numbers are drawn from ``rng`` in that order (crop/flip,
  AutoAugment, Cutout), each stage as one vectorised draw for the batch.
  """
  images = _check_uint8(images_uint8)
  images = crop_flip_batch(images, rng)
  images = autoaugment.augment_batch(images, rng)
  return cutout_batch(images, rng, cutout_size, public_typo)


def _check_uint8(images: np.ndarray) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(
        f"expected uint8 images of shape (B, H, W, C), got {images.dtype} "
        f"{images.shape}; augment the raw bytes and normalise afterwards.")
  return images
