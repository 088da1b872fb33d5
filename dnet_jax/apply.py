"""Calling a linen classifier directly (kept for code written before `dnet_jax.classifier`).

`apply_classifier` / `init_classifier` are the linen adapter of
`dnet_jax.classifier.linen_classifier` under their original names and
signatures; new code uses `as_classifier(model).apply` / `.init`, which take any
model kind.
"""

from __future__ import annotations

from typing import Any

import jax

from dnet_jax.classifier import as_classifier


def apply_classifier(model, params: Any, batch_stats: Any, images: jax.Array, *,
                     train: bool, rng: jax.Array | None = None) -> tuple[jax.Array, Any]:
  """Returns (logits, model_state) of `model` on `images` (see `dnet_jax.classifier`).

  For a linen module the model state is its `batch_stats` collection ({} if it
  has none): used, and in training mode updated and returned; `train=` is
  passed only if its `__call__` takes it; `rng` feeds the "dropout" stream.
  """
  return as_classifier(model).apply(params, batch_stats, images, train=train, rng=rng)


def init_classifier(model, rng: jax.Array, sample_images: jax.Array) -> tuple[Any, Any]:
  """Initialises `model`; returns (params, model_state), {} state for a linen model without one."""
  classifier = as_classifier(model)
  if classifier.init is None:
    raise ValueError(f"{classifier.name} has no init function; give its parameters "
                     "(dj.function_classifier(fn, params=...)).")
  return classifier.init(rng, sample_images)
