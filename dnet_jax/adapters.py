"""Flax NNX and Equinox models in the library's model protocol (`dnet_jax.classifier`).

Both frameworks keep parameters and state inside Python objects; the protocol
needs pure pytrees. Each adapter splits the model once into a static skeleton
and arrays, and every `apply` rebuilds a *fresh* model from the skeleton and
the arrays it is given, so nothing is mutated across passes or closed over
inside the library's `jax.vjp` (the cause of NNX's `TraceContextError` and
Equinox's "Attempted to use old state" when the same state feeds two passes).
NNX and Equinox are imported only when one of these adapters is used.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp

from dnet_jax.protocol import Classifier


def is_nnx_module(model: Any) -> bool:
  nnx = sys.modules.get("flax.nnx")
  return nnx is not None and isinstance(model, nnx.Module)


def is_equinox_module(model: Any) -> bool:
  eqx = sys.modules.get("equinox")
  return eqx is not None and isinstance(model, eqx.Module)


def _fresh(tree):
  """A structurally new copy of a pytree (new Python containers, same arrays)."""
  return jax.tree.map(lambda x: x, tree)


def _copy(tree):
  """Fresh buffers: a donated train state must not delete the user's module's own arrays."""
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def _nnx_rng_streams(module) -> tuple[str, ...]:
  from flax import nnx
  tags = {node.tag for _, node in nnx.iter_graph(module) if isinstance(node, nnx.RngStream)}
  return tuple(sorted(tags))


def nnx_classifier(module, *, name: str | None = None) -> Classifier:
  """A Flax NNX module in the protocol; the default for `model=<nnx.Module>`.

  params = the module's `nnx.Param` variables and model_state = every other
  variable except its rng streams, both as pure nested dicts
  (`nnx.to_pure_dict`). Training mode is `module.train()` (dropout on,
  BatchNorm with batch statistics), evaluation `module.eval()`. `rng` reseeds
  every rng stream of the module (stream k gets fold_in(rng, k)), so dropout
  masks come from the step's key; the streams' own keys are never advanced.
  `init` returns copies of the module's arrays (a donated train state must not
  delete the module's own).
  """
  from flax import nnx
  graphdef, params, rng_state, rest = nnx.split(module, nnx.Param, nnx.RngState, ...)
  streams = _nnx_rng_streams(module)
  name = name or type(module).__name__

  def merge(params_dict, state_dict):
    p, r = _fresh(params), _fresh(rest)
    nnx.replace_by_pure_dict(p, params_dict)
    nnx.replace_by_pure_dict(r, state_dict)
    return nnx.merge(graphdef, p, _fresh(rng_state), r)

  def apply(params_dict, model_state, images, *, train: bool, rng=None):
    model = merge(params_dict, model_state)
    model.train() if train else model.eval()
    if streams and train:
      if rng is None:
        raise ValueError(f"{name} draws random numbers (rng streams {list(streams)}) in training "
                         "mode but no rng was given: pass rng= (the steps pass one).")
      nnx.reseed(model, **{s: jax.random.fold_in(rng, k) for k, s in enumerate(streams)})
    logits = model(images)
    if not train:
      return logits, model_state
    _, _, _, new_rest = nnx.split(model, nnx.Param, nnx.RngState, ...)
    return logits, nnx.to_pure_dict(new_rest)

  def init(rng, sample_images):
    del rng, sample_images  # an NNX module is created with its weights
    return _copy(nnx.to_pure_dict(params)), _copy(nnx.to_pure_dict(rest))

  return Classifier(apply=apply, init=init, name=name)


def equinox_classifier(model, state=None, *, call: Callable | None = None,
                       axis_name: str = "batch", name: str | None = None) -> Classifier:
  """An Equinox module in the protocol (params = its inexact arrays, model_state = `state`).

  By default the module maps ONE example to logits, as Equinox models do:
  `model(x, state, *, key) -> (logits, state)` with a state, `model(x, *, key)`
  without; it is `jax.vmap`-ed over the batch with `axis_name` (the name its
  `eqx.nn.BatchNorm(axis_name=...)` must use). Give `call(model, images, state,
  key) -> (logits, state)` for any other convention (state None without one).
  `init` returns copies of the module's arrays (a donated train state must not
  delete the module's own). Training mode is `eqx.nn.inference_mode(model, False)`. The state is copied
  before every pass, as Equinox requires a state to be used once; evaluation
  returns the state it was given.
  """
  import equinox as eqx
  params, static = eqx.partition(model, eqx.is_inexact_array)
  name = name or type(model).__name__
  stateful = state is not None

  def default_call(module, images, model_state, key):
    keys = None if key is None else jax.random.split(key, images.shape[0])
    key_axis = None if keys is None else 0
    if stateful:
      fn = lambda x, s, k: module(x, s, key=k)  # noqa: E731
      return jax.vmap(fn, in_axes=(0, None, key_axis), out_axes=(0, None),
                      axis_name=axis_name)(images, model_state, keys)
    fn = lambda x, k: module(x, key=k)  # noqa: E731
    return jax.vmap(fn, in_axes=(0, key_axis), axis_name=axis_name)(images, keys), model_state

  forward = call or default_call

  def apply(params_tree, model_state, images, *, train: bool, rng=None):
    module = eqx.nn.inference_mode(eqx.combine(params_tree, static), value=not train)
    try:
      logits, new_state = forward(module, images, _fresh(model_state), rng)
    except RuntimeError as error:
      if rng is None and "key" in str(error).lower():
        raise ValueError(f"{name} draws random numbers in training mode ({error}) but no rng "
                         "was given: pass rng= (the steps pass one).") from error
      raise
    return logits, (new_state if train else model_state)

  def init(rng, sample_images):
    del rng, sample_images  # an Equinox module is created with its weights
    return _copy(params), _copy(state) if stateful else ()

  return Classifier(apply=apply, init=init, name=name)
