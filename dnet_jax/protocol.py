"""The `Classifier` record of the model protocol (`dnet_jax.classifier` describes it).

Kept apart so that the adapters (`dnet_jax.adapters`) and the dispatch that
chooses among them (`dnet_jax.classifier.as_classifier`) both build on it
without importing each other.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

ApplyFn = Callable[..., tuple[jax.Array, Any]]
InitFn = Callable[[jax.Array, jax.Array], tuple[Any, Any]]


@dataclasses.dataclass(frozen=True)
class Classifier:
  """A classifier in the library's protocol (see the module docstring).

  Attributes:
    apply: `apply(params, model_state, images, *, train, rng) -> (logits, new_model_state)`.
    init: `init(rng, sample_images) -> (params, model_state)`, or None when the
      parameters are created elsewhere (then `create_train_state` needs them).
    name: shown in error messages.
  """
  apply: ApplyFn
  init: InitFn | None = None
  name: str = "classifier"
