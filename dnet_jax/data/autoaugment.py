"""AutoAugment, CIFAR-10 policy, as the public Difficulty-Net CIFAR code runs it.

Host-side (numpy + PIL + scipy), one image at a time inside a batch function:
the ops are PIL's own and scipy's cubic-spline ``affine_transform``, so the
pixels are exactly the public code's for the same random draws. On 32x32
images the per-image cost is tens of microseconds (most ops are PIL look-up
tables); ``experiments/augment_benchmark.py`` prints images/s per CPU core.

Semantics (hitachi-rd-cv/Difficulty_Net, ``CIFAR-LT/auto_augment.py``, "AA"):

* The 25 sub-policies of Cubuk et al. 2019 (AutoAugment, CVPR), CIFAR-10
  (AA:11-35). One is drawn uniformly per image (AA:39); each of its two ops is
  applied iff ``u < p`` with ``u ~ U[0, 1)`` (AA:62-68).
* A magnitude bin ``m`` in 0..9 selects ``[v_m, v_{m+1}]`` of an 11-point
  ``linspace(lo, hi)``; the op's value is drawn uniformly inside it,
  ``v = v_m + u (v_{m+1} - v_m)`` (Python's ``random.uniform``, AA:82-217). The
  sign comes from the linspace: ``lo < 0`` ranges are not mirrored at random.
* Geometric ops (AA:71-167) resample each channel with
  ``scipy.ndimage.affine_transform`` (spline order 3, ``mode="constant"``,
  fill 0, uint8 output) under the centred matrix ``T(o) A T(-o)`` with
  ``o = (H/2 + 0.5, W/2 + 0.5)``: output pixel ``p`` (row, col) reads input
  ``A (p - o) + o``. With scipy's (row, col) axes the public ``ShearX`` maps
  ``(r, c) -> (r + s (c - o), c)`` (a shear along rows) and ``ShearY``
  ``(r, c) -> (r, c + s (r - o))``; ``TranslateX`` reads column ``c + t W``,
  ``TranslateY`` row ``r + t H``; ``Rotate`` reads ``R(theta) (p - o) + o``.
* PIL ops (AA:170-217): ``ImageOps.autocontrast / invert / equalize`` (no
  magnitude), ``ImageOps.solarize(threshold)``,
  ``ImageOps.posterize(int(round(bits)))``,
  ``ImageEnhance.{Contrast, Color, Brightness, Sharpness}.enhance(factor)``.
  Invert, Solarize, Posterize, AutoContrast and Equalize are PIL look-up
  tables, computed here as the same tables in numpy (tests compare them with
  PIL, pixel for pixel); the four enhancers call PIL.

The one table difference: AA:25 writes the never-applied ``Invert`` (p = 0)
of sub-policy 15 with magnitude 0.3; the paper's table has 3. Invert ignores
its magnitude, so both run the same; the table below has the paper's 3.

Randomness is explicit: ``autoaugment_params(rng, batch_size)`` draws every
random number of a batch from a ``numpy.random.Generator`` and
``apply_autoaugment`` is deterministic, so a batch is a function of the
generator's seed (``dnet_jax.data.public_cifar.transform_rng`` builds one from
``(seed, epoch, batch_index)`` for exact resume).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageEnhance
from scipy import ndimage


class SubPolicy(NamedTuple):
  """Two ops, each ``(name, probability, magnitude bin in 0..9)``."""
  first: str
  first_prob: float
  first_magnitude: int
  second: str
  second_prob: float
  second_magnitude: int


# Cubuk et al. 2019, CIFAR-10 policy; the order of AA:11-35.
CIFAR10_POLICY: tuple[SubPolicy, ...] = tuple(SubPolicy(*row) for row in (
    ("Invert", 0.1, 7, "Contrast", 0.2, 6),
    ("Rotate", 0.7, 2, "TranslateX", 0.3, 9),
    ("Sharpness", 0.8, 1, "Sharpness", 0.9, 3),
    ("ShearY", 0.5, 8, "TranslateY", 0.7, 9),
    ("AutoContrast", 0.5, 8, "Equalize", 0.9, 2),
    ("ShearY", 0.2, 7, "Posterize", 0.3, 7),
    ("Color", 0.4, 3, "Brightness", 0.6, 7),
    ("Sharpness", 0.3, 9, "Brightness", 0.7, 9),
    ("Equalize", 0.6, 5, "Equalize", 0.5, 1),
    ("Contrast", 0.6, 7, "Sharpness", 0.6, 5),
    ("Color", 0.7, 7, "TranslateX", 0.5, 8),
    ("Equalize", 0.3, 7, "AutoContrast", 0.4, 8),
    ("TranslateY", 0.4, 3, "Sharpness", 0.2, 6),
    ("Brightness", 0.9, 6, "Color", 0.2, 8),
    ("Solarize", 0.5, 2, "Invert", 0.0, 3),
    ("Equalize", 0.2, 0, "AutoContrast", 0.6, 0),
    ("Equalize", 0.2, 8, "Equalize", 0.6, 4),
    ("Color", 0.9, 9, "Equalize", 0.6, 6),
    ("AutoContrast", 0.8, 4, "Solarize", 0.2, 8),
    ("Brightness", 0.1, 3, "Color", 0.7, 0),
    ("Solarize", 0.4, 5, "AutoContrast", 0.9, 3),
    ("TranslateY", 0.9, 9, "TranslateY", 0.7, 9),
    ("AutoContrast", 0.9, 2, "Solarize", 0.8, 3),
    ("Equalize", 0.8, 8, "Invert", 0.1, 3),
    ("TranslateY", 0.7, 9, "AutoContrast", 0.9, 1),
))

# (lo, hi) of each op's 11-point linspace (AA:82-217); None = no magnitude.
MAGNITUDE_RANGES: dict[str, tuple[float, float] | None] = {
    "ShearX": (-0.3, 0.3),
    "ShearY": (-0.3, 0.3),
    "TranslateX": (-150 / 331, 150 / 331),  # fraction of the image size
    "TranslateY": (-150 / 331, 150 / 331),
    "Rotate": (-30.0, 30.0),  # degrees
    "Solarize": (0.0, 256.0),  # threshold
    "Posterize": (4.0, 8.0),  # bits, rounded to an integer
    "Contrast": (0.1, 1.9),
    "Color": (0.1, 1.9),
    "Brightness": (0.1, 1.9),
    "Sharpness": (0.1, 1.9),
    "AutoContrast": None,
    "Invert": None,
    "Equalize": None,
}
OPS: tuple[str, ...] = tuple(MAGNITUDE_RANGES)
_NUM_BINS = 10  # magnitude bins 0..9 of the 11-point linspace


def _bin_edges(op: str, magnitude: int) -> tuple[float, float]:
  """``(v_m, v_{m+1})`` of the op's 11-point linspace; ``(0, 0)`` without magnitude."""
  if op not in MAGNITUDE_RANGES:
    raise ValueError(f"unknown AutoAugment op {op!r}; expected one of {OPS}.")
  value_range = MAGNITUDE_RANGES[op]
  if value_range is None:
    return 0.0, 0.0
  if not 0 <= magnitude < _NUM_BINS:
    raise ValueError(f"magnitude bin must be in 0..{_NUM_BINS - 1}, got {magnitude}.")
  grid = np.linspace(value_range[0], value_range[1], _NUM_BINS + 1)
  return float(grid[magnitude]), float(grid[magnitude + 1])


def magnitude_value(op: str, magnitude: int, u: float) -> float:
  """The op's value for bin ``magnitude`` and a uniform draw ``u`` in [0, 1).

  ``v = v_m + u (v_{m+1} - v_m)`` with ``v = linspace(lo, hi, 11)`` (AA:82-217,
  ``random.uniform(v[m], v[m + 1])``). Ops without a magnitude return 0.
  """
  low, high = _bin_edges(op, magnitude)
  return low + u * (high - low)


def centred_affine(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
  """Resamples each channel under the centred 3x3 affine ``matrix = [A | t]``.

  Output pixel ``p`` (row, col) reads input ``A (p - o) + t + o``, i.e. the
  matrix ``T(o) [A | t] T(-o)`` with ``o = (H / 2 + 0.5, W / 2 + 0.5)``
  (AA:71-77); cubic spline (order 3), constant fill 0, uint8 output rounded
  and clipped by scipy (AA:90-93).
  """
  height, width = image.shape[:2]
  centre = np.array([height / 2 + 0.5, width / 2 + 0.5])
  linear, shift = matrix[:2, :2], matrix[:2, 2]
  offset = centre + shift - linear @ centre
  return np.stack([ndimage.affine_transform(image[:, :, c], linear, offset)
                   for c in range(image.shape[2])], axis=2)


def geometric_matrix(op: str, value: float, height: int, width: int) -> np.ndarray:
  """The 3x3 ``[A | t]`` of AA's geometric ops in scipy's (row, col) axes."""
  if op == "ShearX":
    return np.array([[1.0, value, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
  if op == "ShearY":
    return np.array([[1.0, 0.0, 0.0], [value, 1.0, 0.0], [0.0, 0.0, 1.0]])
  if op == "TranslateX":
    return np.array([[1.0, 0.0, 0.0], [0.0, 1.0, width * value], [0.0, 0.0, 1.0]])
  if op == "TranslateY":
    return np.array([[1.0, 0.0, height * value], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
  if op == "Rotate":
    theta = np.deg2rad(value)
    return np.array([[np.cos(theta), -np.sin(theta), 0.0],
                     [np.sin(theta), np.cos(theta), 0.0], [0.0, 0.0, 1.0]])
  raise ValueError(f"{op!r} is not a geometric op.")


def _geometric(op: str) -> Callable[[np.ndarray, float], np.ndarray]:
  def apply(image: np.ndarray, value: float) -> np.ndarray:
    return centred_affine(image, geometric_matrix(op, value, *image.shape[:2]))
  return apply


def _pil(op: Callable[[Image.Image, float], Image.Image]
         ) -> Callable[[np.ndarray, float], np.ndarray]:
  def apply(image: np.ndarray, value: float) -> np.ndarray:
    return np.asarray(op(Image.fromarray(image), value))
  return apply


# Invert, Solarize, Posterize, AutoContrast and Equalize are PIL look-up
# tables (ImageOps); the same tables in numpy skip the PIL round trip.


def invert(image: np.ndarray) -> np.ndarray:
  """``255 - x`` (PIL ``ImageOps.invert``)."""
  return 255 - image


def solarize(image: np.ndarray, threshold: float) -> np.ndarray:
  """``x if x < threshold else 255 - x`` (PIL ``ImageOps.solarize``)."""
  return np.where(image < threshold, image, 255 - image)


def posterize(image: np.ndarray, bits: int) -> np.ndarray:
  """Keeps the top ``bits`` bits: ``x & ~(2^(8 - bits) - 1)`` (PIL ``ImageOps.posterize``)."""
  if not 1 <= bits <= 8:
    raise ValueError(f"posterize keeps 1..8 bits, got {bits}.")
  return image & np.uint8(0xFF & ~(2 ** (8 - bits) - 1))


def _per_channel_lut(image: np.ndarray, luts: np.ndarray) -> np.ndarray:
  """``out[..., c] = luts[c][image[..., c]]`` for a ``(C, 256)`` table."""
  channels = np.arange(image.shape[-1])
  return luts[channels, image].astype(np.uint8)


def auto_contrast(image: np.ndarray) -> np.ndarray:
  """PIL ``ImageOps.autocontrast`` (cutoff 0), channel by channel.

  With ``lo``/``hi`` the channel's min/max: ``lut(x) = clip(int(x s - lo s), 0,
  255)``, ``s = 255 / (hi - lo)``; identity when ``hi <= lo``.
  """
  flat = image.reshape(-1, image.shape[-1])
  low, high = flat.min(axis=0).astype(np.float64), flat.max(axis=0).astype(np.float64)
  spread = np.where(high > low, high - low, 1.0)
  scale = 255.0 / spread
  offset = -low * scale
  luts = np.trunc(np.arange(256)[None, :] * scale[:, None] + offset[:, None])
  luts = np.clip(luts, 0, 255)
  luts = np.where((high > low)[:, None], luts, np.arange(256)[None, :])
  return _per_channel_lut(image, luts.astype(np.int64))


def equalize(image: np.ndarray) -> np.ndarray:
  """PIL ``ImageOps.equalize``, channel by channel.

  ``step = (N - h[last]) // 255`` with ``h`` the histogram and ``last`` its
  highest non-empty bin; ``lut(i) = (step // 2 + sum_{j < i} h[j]) // step``
  (clipped to 255); identity when one bin holds everything or ``step == 0``.
  """
  flat = image.reshape(-1, image.shape[-1])
  identity = np.arange(256)
  luts = np.empty((flat.shape[1], 256), np.int64)
  for c in range(flat.shape[1]):
    hist = np.bincount(flat[:, c], minlength=256)
    nonzero = np.flatnonzero(hist)
    step = (flat.shape[0] - hist[nonzero[-1]]) // 255
    if len(nonzero) <= 1 or step == 0:
      luts[c] = identity
      continue
    before = np.concatenate([[0], np.cumsum(hist)[:-1]])
    luts[c] = np.minimum((step // 2 + before) // step, 255)
  return _per_channel_lut(image, luts)


_APPLY: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "ShearX": _geometric("ShearX"),
    "ShearY": _geometric("ShearY"),
    "TranslateX": _geometric("TranslateX"),
    "TranslateY": _geometric("TranslateY"),
    "Rotate": _geometric("Rotate"),
    "AutoContrast": lambda image, v: auto_contrast(image),
    "Invert": lambda image, v: invert(image),
    "Equalize": lambda image, v: equalize(image),
    "Solarize": lambda image, v: solarize(image, v),
    "Posterize": lambda image, v: posterize(image, int(round(v))),
    "Contrast": _pil(lambda im, v: ImageEnhance.Contrast(im).enhance(v)),
    "Color": _pil(lambda im, v: ImageEnhance.Color(im).enhance(v)),
    "Brightness": _pil(lambda im, v: ImageEnhance.Brightness(im).enhance(v)),
    "Sharpness": _pil(lambda im, v: ImageEnhance.Sharpness(im).enhance(v)),
}


def apply_op(image: np.ndarray, op: str, value: float) -> np.ndarray:
  """Applies one op with its value (``magnitude_value``) to an HxWx3 uint8 image."""
  if op not in _APPLY:
    raise ValueError(f"unknown AutoAugment op {op!r}; expected one of {OPS}.")
  return _APPLY[op](image, value)


class AutoAugmentParams(NamedTuple):
  """Every random number AutoAugment uses on a batch."""
  policy: np.ndarray  # (B,) int, index of the sub-policy
  apply_draw: np.ndarray  # (B, 2) float in [0, 1): op k runs iff < its probability
  value_draw: np.ndarray  # (B, 2) float in [0, 1): position inside the magnitude bin


def autoaugment_params(rng: np.random.Generator, batch_size: int,
                       num_policies: int = len(CIFAR10_POLICY)) -> AutoAugmentParams:
  """Draws a batch's sub-policies (uniform) and uniform op/magnitude draws."""
  return AutoAugmentParams(
      policy=rng.integers(0, num_policies, batch_size),
      apply_draw=rng.random((batch_size, 2)),
      value_draw=rng.random((batch_size, 2)))


def _check_images(images: np.ndarray) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(
        "expected uint8 RGB images of shape (B, H, W, 3), got "
        f"{images.dtype} {images.shape}; convert with np.asarray(x, np.uint8) "
        "before normalising.")
  return images


@functools.lru_cache(maxsize=8)
def _policy_table(policy: tuple[SubPolicy, ...]) -> tuple[np.ndarray, ...]:
  names = np.array([[p.first, p.second] for p in policy])
  probs = np.array([[p.first_prob, p.second_prob] for p in policy], np.float64)
  edges = np.array([[_bin_edges(p.first, p.first_magnitude),
                     _bin_edges(p.second, p.second_magnitude)] for p in policy])
  return names, probs, edges[..., 0], edges[..., 1]


def _policy_columns(policy: Sequence[SubPolicy]) -> tuple[np.ndarray, ...]:
  """``(P, 2)`` op names, probabilities and bin edges (low, high) of a policy table."""
  return _policy_table(tuple(SubPolicy(*p) for p in policy))


def ops_applied(params: AutoAugmentParams,
                policy: Sequence[SubPolicy] = CIFAR10_POLICY) -> np.ndarray:
  """``(B, 2)`` bool: op k of image i's sub-policy runs iff ``u < p`` (AA:62-66)."""
  _, probs, _, _ = _policy_columns(policy)
  return params.apply_draw < probs[params.policy]


def op_values(params: AutoAugmentParams,
              policy: Sequence[SubPolicy] = CIFAR10_POLICY) -> np.ndarray:
  """``(B, 2)`` float: each op's value from its bin and ``value_draw``."""
  _, _, low, high = _policy_columns(policy)
  low, high = low[params.policy], high[params.policy]
  return low + params.value_draw * (high - low)


def apply_autoaugment(images: np.ndarray, params: AutoAugmentParams,
                      policy: Sequence[SubPolicy] = CIFAR10_POLICY) -> np.ndarray:
  """``(B, H, W, 3)`` uint8 -> uint8, each image through its drawn sub-policy.

  Image ``i`` runs op ``k`` of sub-policy ``params.policy[i]`` where
  ``ops_applied`` says so, with the value ``op_values`` gives, first op first.
  """
  images = _check_images(images)
  names = _policy_columns(policy)[0]
  applied = ops_applied(params, policy)
  values = op_values(params, policy)
  out = images.copy()
  for i in np.flatnonzero(applied.any(axis=1)):
    image = images[i]
    for k in range(2):
      if applied[i, k]:
        image = apply_op(image, names[params.policy[i], k], values[i, k])
    out[i] = image
  return out


def augment_batch(images_uint8: np.ndarray, rng: np.random.Generator,
                  policy: Sequence[SubPolicy] = CIFAR10_POLICY) -> np.ndarray:
  """AutoAugment on a uint8 batch with the random numbers drawn from ``rng``."""
  params = autoaugment_params(rng, len(images_uint8), len(policy))
  return apply_autoaugment(images_uint8, params, policy)
