"""The model protocol: how every step, the state and the meta-gradient call a classifier.

A classifier is reached only through two pure functions of pytrees:

    apply(params, model_state, images, *, train, rng) -> (logits [B, C], new_model_state)
    init(rng, sample_images) -> (params, model_state)

`model_state` is any pytree (possibly empty: `{}` or `()`): BatchNorm running
statistics for linen, every non-parameter variable for NNX, an `eqx.nn.State`
for Equinox. It is an immutable value: `apply` never changes its argument and,
in evaluation mode, returns it unchanged. In training mode BatchNorm normalises
with batch statistics and the returned state holds the updated running averages.
`rng` is a key for the model's random streams (dropout); it may be None when
the model draws no random numbers.

The `Classifier` record itself is in `dnet_jax.protocol`.
`as_classifier(model)` turns what a user passes as `model=` into a `Classifier`:
a linen module (the default adapter, `linen_classifier`), an NNX module
(`dnet_jax.adapters.nnx_classifier`), an Equinox module without state
(`dnet_jax.adapters.equinox_classifier`; pass the state explicitly when it has
one), or a `Classifier` built by hand or with `function_classifier`.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
from flax import errors as flax_errors
from flax import linen as nn

from dnet_jax.protocol import Classifier, InitFn

# Names a linen `__call__` may use for its train/eval switch besides `train`. The
# inverted ones are True in evaluation mode.
_OTHER_TRAIN_FLAGS = ("training", "is_training")
_INVERTED_TRAIN_FLAGS = ("deterministic", "use_running_average", "eval", "inference")


def as_classifier(model: Any) -> Classifier:
  """The `Classifier` for whatever a user passed as `model=` (see the module docstring)."""
  if isinstance(model, Classifier):
    return model
  if isinstance(model, nn.Module):
    return linen_classifier(model)
  from dnet_jax import adapters  # imports NNX / Equinox only when needed
  if adapters.is_nnx_module(model):
    return adapters.nnx_classifier(model)
  if adapters.is_equinox_module(model):
    return adapters.equinox_classifier(model)
  what = f"the function {getattr(model, '__name__', model)!r}" if callable(model) else type(model).__name__
  raise TypeError(
      f"model= got {what}, which has no apply function dnet_jax knows how to call. Pass a Flax "
      "linen Module, a Flax NNX Module, an Equinox Module (with state: "
      "dj.equinox_classifier(model, state)), a plain function wrapped as "
      "dj.function_classifier(fn, params=...), or a dj.Classifier(apply=..., init=...).")


def model_state_is_empty(model_state: Any) -> bool:
  """True when the model state holds no arrays (never uses the truth value of a pytree)."""
  return not jax.tree.leaves(model_state)


def _call_parameters(fn: Callable) -> dict:
  try:
    return dict(inspect.signature(fn).parameters)
  except (TypeError, ValueError):
    return {}


def _linen_train_flag(module: nn.Module, train_arg: str | None, auto: bool) -> str | None:
  parameters = _call_parameters(type(module).__call__)
  name = type(module).__name__
  if not auto:
    if train_arg is not None and train_arg not in parameters:
      raise ValueError(
          f"{name}.__call__ has no parameter {train_arg!r} (its parameters: "
          f"{', '.join(p for p in parameters if p != 'self')}); pass the name of its train/eval "
          "switch as train_arg=, or train_arg=None if it has none.")
    return train_arg
  if "train" in parameters:
    return "train"
  others = [p for p in _OTHER_TRAIN_FLAGS + _INVERTED_TRAIN_FLAGS if p in parameters]
  if others:
    flag = others[0]
    fix = (f"dj.linen_classifier(model, train_arg={flag!r})" if flag in _OTHER_TRAIN_FLAGS else
           f"dj.linen_classifier(model, train_arg={flag!r}, train_arg_means_eval=True)")
    raise ValueError(
        f"{name}.__call__ takes {flag!r}, not 'train', so dnet_jax cannot switch it between "
        f"training and evaluation (BatchNorm and dropout would stay in one mode). Pass "
        f"model={fix} wherever you pass the model.")
  return None


def linen_classifier(module: nn.Module, *, train_arg: str | None = "auto",
                     train_arg_means_eval: bool = False,
                     rng_streams: tuple[str, ...] = ("dropout",),
                     state_collections: tuple[str, ...] = ("batch_stats",)) -> Classifier:
  """A linen module in the protocol; the default for `model=<linen module>`.

  Args:
    module: any linen module mapping images [B, ...] to logits [B, C].
    train_arg: the keyword of its train/eval switch. "auto" (default): `train`
      if `__call__` takes it, nothing if it takes no known switch, and a
      ValueError naming the fix if it takes another (e.g. `training`).
      None: never pass one.
    train_arg_means_eval: the switch is True in evaluation mode
      (`deterministic=`, `use_running_average=`).
    rng_streams: rng collections the module draws from; stream k gets
      `fold_in(rng, k)` (the first stream gets `rng` itself).
    state_collections: mutable variable collections carried as the model state:
      with one (the default, "batch_stats") the state is that collection's tree
      (as `TrainState.batch_stats` has always held it), with several a dict
      {collection: tree}; a model with none of them has the state {}.
  """
  flag = _linen_train_flag(module, None if train_arg == "auto" else train_arg, train_arg == "auto")
  name = type(module).__name__

  def flag_kwargs(train: bool) -> dict:
    if flag is None:
      return {}
    return {flag: (not train) if train_arg_means_eval else train}

  def rngs_for(rng):
    if rng is None:
      return None
    return {stream: rng if k == 0 else jax.random.fold_in(rng, k)
            for k, stream in enumerate(rng_streams)}

  def explain(error: Exception, rng) -> Exception:
    text = str(error)
    if rng is None:
      return ValueError(
          f"{name} draws random numbers ({text.splitlines()[0]}) but no rng was given: pass rng= "
          "(the steps pass one from the state's key).")
    return ValueError(
        f"{name} draws from an rng stream dnet_jax does not feed ({text.splitlines()[0]}). "
        f"Name all its streams: dj.linen_classifier(model, rng_streams=({', '.join(map(repr, rng_streams))}, "
        "'<missing stream>')).")

  single = len(state_collections) == 1

  def state_variables(model_state) -> dict:
    if model_state_is_empty(model_state):
      return {}
    return {state_collections[0]: model_state} if single else dict(model_state)

  def apply(params, model_state, images, *, train: bool, rng=None):
    collections = state_variables(model_state)
    mutable = list(collections) if train and collections else False
    try:
      out = module.apply({"params": params, **collections}, images, rngs=rngs_for(rng),
                         mutable=mutable, **flag_kwargs(train))
    except flax_errors.InvalidRngError as error:
      raise explain(error, rng) from error
    if not mutable:
      return out, model_state
    logits, mutated = out
    return logits, (mutated[state_collections[0]] if single else {**model_state, **mutated})

  def init(rng, sample_images):
    params_rng, other_rng = jax.random.split(rng)
    rngs = {"params": params_rng, **rngs_for(other_rng)}
    variables = module.init(rngs, sample_images, **flag_kwargs(False))
    unknown = set(variables) - {"params", *state_collections}
    if unknown:
      raise ValueError(
          f"The classifier {name} has variable collections {sorted(unknown)}; dnet_jax carries only "
          f"'params' and {list(state_collections)}. Keep other state outside the model, or name "
          "the collection: dj.linen_classifier(model, state_collections=(...)).")
    if single:
      return variables["params"], variables.get(state_collections[0], {})
    return variables["params"], {c: variables[c] for c in state_collections if c in variables}

  return Classifier(apply=apply, init=init, name=name)


def function_classifier(fn: Callable, *, params: Any = None, model_state: Any = (),
                        init: InitFn | None = None, name: str | None = None) -> Classifier:
  """A plain function as a classifier.

  `fn` is either stateless, `fn(params, images) -> logits`, optionally taking
  `train=` and/or `rng=` keywords (passed when its signature names them), or
  already in the protocol, `fn(params, model_state, images, *, train, rng) ->
  (logits, new_model_state)` (recognised by a `model_state` parameter).
  Give the initial `params` (and `model_state`), or an `init(rng, sample)`.
  """
  parameters = _call_parameters(fn)
  name = name or getattr(fn, "__name__", "function")
  if "model_state" in parameters:
    apply = fn
  else:
    takes_train, takes_rng = "train" in parameters, "rng" in parameters

    def apply(params, model_state, images, *, train: bool, rng=None):
      kwargs = {}
      if takes_train:
        kwargs["train"] = train
      if takes_rng:
        kwargs["rng"] = rng
      return fn(params, images, **kwargs), model_state

  if init is None:
    if params is None:
      init_fn = None
    else:
      def init_fn(rng, sample_images):
        del rng, sample_images  # copies: a donated train state must not delete the caller's arrays
        return jax.tree.map(lambda x: jnp.array(x, copy=True), (params, model_state))
  else:
    init_fn = init
  return Classifier(apply=apply, init=init_fn, name=name)


def loss_dtype(dtype) -> jnp.dtype:
  """The dtype losses, weights and metrics are computed in: at least float32."""
  return jnp.promote_types(dtype, jnp.float32)


def checked_logits(logits: jax.Array, num_examples: int, num_classes: int | None,
                   name: str) -> jax.Array:
  """Checks logits [B, C] against the batch and the number of classes; returns them in
  (at least) float32, so a bf16 model still gets float32 losses and metrics."""
  if num_classes is not None:
    chex.assert_shape(
        logits, (num_examples, num_classes), exception_type=ValueError,
        custom_message=(
            f"{name} returned logits of shape {tuple(logits.shape)}, expected (batch size, number "
            f"of classes of the state's class-accuracy vector) = ({num_examples}, {num_classes}). "
            "Build the model with that many outputs, or the state with num_classes equal to the "
            "model's."))
  chex.assert_type(logits, float, exception_type=TypeError,
                   custom_message=f"{name} must return floating-point logits.")
  return logits.astype(loss_dtype(logits.dtype))
