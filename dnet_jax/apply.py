"""Calling any Flax classifier the same way, with or without BatchNorm and dropout."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import jax
from flax import linen as nn


@functools.lru_cache(maxsize=None)
def _takes_train_flag(module_type: type) -> bool:
  return "train" in inspect.signature(module_type.__call__).parameters


def apply_classifier(model: nn.Module, params: Any, batch_stats: Any, images: jax.Array, *,
                     train: bool, rng: jax.Array | None = None) -> tuple[jax.Array, Any]:
  """Returns (logits, batch_stats) of `model` on `images`.

  Works for any linen module: `train=` is passed only if its `__call__` takes it;
  BatchNorm statistics are used (and, in training mode, updated and returned) only
  when the model has a `batch_stats` collection; `rng` feeds the "dropout" stream.
  In training mode BatchNorm normalises with batch statistics, so the returned
  statistics are the running averages after this batch.
  """
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  kwargs = {"train": train} if _takes_train_flag(type(model)) else {}
  rngs = {"dropout": rng} if rng is not None else None
  if train and batch_stats:
    logits, mutated = model.apply(variables, images, mutable=["batch_stats"], rngs=rngs, **kwargs)
    return logits, mutated["batch_stats"]
  return model.apply(variables, images, rngs=rngs, **kwargs), batch_stats


def init_classifier(model: nn.Module, rng: jax.Array, sample_images: jax.Array) -> tuple[Any, Any]:
  """Initialises `model`; returns (params, batch_stats) with batch_stats {} if it has none."""
  params_rng, dropout_rng = jax.random.split(rng)
  kwargs = {"train": False} if _takes_train_flag(type(model)) else {}
  variables = model.init({"params": params_rng, "dropout": dropout_rng}, sample_images, **kwargs)
  unknown = set(variables) - {"params", "batch_stats"}
  if unknown:
    raise ValueError(
        f"The classifier {type(model).__name__} has variable collections {sorted(unknown)}; "
        "dnet_jax steps carry only 'params' and 'batch_stats'. Keep other state outside the model "
        "or store it in one of those two collections.")
  return variables["params"], variables.get("batch_stats", {})
