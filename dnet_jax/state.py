"""The one pytree that holds all training state."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from dnet_jax.classifier import as_classifier


@flax.struct.dataclass
class TrainState:
  """Everything a Difficulty-Net (or baseline) run depends on, as plain arrays.

  Attributes:
    step: number of classifier updates done so far (int32 scalar).
    params: classifier parameters (any pytree).
    batch_stats: the classifier's model state, any pytree treated as an immutable
      value: a linen model's BatchNorm running statistics ({} if it has none), an
      NNX model's non-parameter variables, an Equinox `State`
      (see `dnet_jax.classifier`). `model_state` is the same field.
    opt_state: the classifier optimizer's state (e.g. SGD momentum).
    dnet_params: Difficulty-Net parameters ({} for fixed-weight baselines).
    dnet_opt_state: the Difficulty-Net optimizer's state (() for baselines).
    class_accuracy: float32 [C], per-class accuracy on the meta/validation set,
      refreshed after every epoch (METHOD.md: all zeros at the start).
    rng: raw uint32 key data (use `jax.random.wrap_key_data`); stored raw so that
      the state checkpoints and shards like any other array.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  dnet_params: Any
  dnet_opt_state: Any
  class_accuracy: jax.Array
  rng: jax.Array

  @property
  def model_state(self) -> Any:
    """The classifier's model state (the `batch_stats` field, by its general name)."""
    return self.batch_stats

  @property
  def key(self) -> jax.Array:
    """The typed PRNG key of this state."""
    return jax.random.wrap_key_data(self.rng)

  def step_key(self) -> jax.Array:
    """A fresh key for this step: fold_in(key, step), so it needs no state update."""
    return jax.random.fold_in(self.key, self.step)


def _key_data(rng: jax.Array) -> jax.Array:
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(rng)
  return jnp.asarray(rng, jnp.uint32)


def create_train_state(rng: jax.Array, model: Any, tx: optax.GradientTransformation,
                       sample_images: jax.Array, num_classes: int, *,
                       dnet: nn.Module | None = None,
                       dnet_tx: optax.GradientTransformation | None = None,
                       class_accuracy: jax.Array | None = None) -> TrainState:
  """Initialises the classifier (and Difficulty-Net, if given) and both optimizers.

  Args:
    rng: a PRNG key (typed `jax.random.key` or raw `PRNGKey` data).
    model: the classifier mapping images [B, ...] to logits [B, C]: a linen, NNX or
      Equinox module or a `dnet_jax.Classifier` (see `dnet_jax.classifier`).
    tx: the classifier's optax optimizer.
    sample_images: a batch of the input shape and dtype (only shapes are used).
    num_classes: C.
    dnet: Difficulty-Net module (`dnet_jax.models.DifficultyNet`); None for baselines.
    dnet_tx: its optimizer (required with `dnet`).
    class_accuracy: initial accuracy vector; zeros by default (METHOD.md).
  """
  if dnet is not None and dnet_tx is None:
    raise ValueError("create_train_state: a Difficulty-Net needs its optimizer; pass dnet_tx.")
  rng = _key_data(rng)
  model_key, dnet_key, state_key = jax.random.split(jax.random.wrap_key_data(rng), 3)
  classifier = as_classifier(model)
  if classifier.init is None:
    raise ValueError(f"create_train_state: {classifier.name} has no init function; give its "
                     "parameters: dj.function_classifier(fn, params=..., model_state=...).")
  params, batch_stats = classifier.init(model_key, sample_images)
  logits = jax.eval_shape(
      lambda p, b: classifier.apply(p, b, sample_images, train=False, rng=None)[0],
      params, batch_stats)
  if logits.ndim != 2 or logits.shape[-1] != num_classes:
    raise ValueError(
        f"The classifier {classifier.name} outputs {logits.shape[-1]} logits but "
        f"num_classes={num_classes} (logits shape {tuple(logits.shape)}); build the model with "
        "num_classes outputs per example.")
  if class_accuracy is None:
    class_accuracy = jnp.zeros((num_classes,), jnp.float32)
  elif jnp.shape(class_accuracy) != (num_classes,):
    raise ValueError(f"create_train_state: class_accuracy has shape {jnp.shape(class_accuracy)}, "
                     f"expected ({num_classes},).")
  if batch_stats is None:
    batch_stats = {}
  if dnet is not None:
    dnet_params = dnet.init(dnet_key, class_accuracy)["params"]
    dnet_opt_state = dnet_tx.init(dnet_params)
  else:
    dnet_params, dnet_opt_state = {}, ()
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
      opt_state=tx.init(params), dnet_params=dnet_params, dnet_opt_state=dnet_opt_state,
      class_accuracy=jnp.asarray(class_accuracy, jnp.float32),
      rng=jax.random.key_data(state_key))
