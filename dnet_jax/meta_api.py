"""The Difficulty-Net meta-gradient for users with their own train state and step.

Everything here is a pure function of pytrees, jit- and pmap-able inside the
user's own step. The user gives two loss functions of the classifier
parameters theta (any pytree):

    per_example_loss(params, batch[, rng=]) -> l [B]     (or (l, aux) with has_aux=True)
    meta_loss(params, meta_batch[, rng=])   -> scalar    (plain mean CE on the meta batch)

and Difficulty-Net as a linen module or a function `dnet(dnet_params, a) -> d [C]`.
The maths (METHOD.md steps 1-3, Sinha & Ohashi, WACV 2023) is `dnet_jax.meta`'s:

    w = C d / sum d,  theta_hat = theta - alpha (1/B) sum_i w_{y_i} grad l_i(theta),
    L_meta(phi) = meta_loss(theta_hat) + lambda mean_c (d_c - t_c)^2.

`shared_forward` runs the classifier ONCE on the train batch; the lookahead,
the meta-gradient and the classifier gradient for any class weights all reuse
it (`SharedForward.gradient(w)`), so a user's step keeps that saving.
`meta_gradients` is the one-call form. When the function is called with a key
(`rng=`), both loss functions are called with `rng=` (the train key, the meta
key); without one, they are called without it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp

from dnet_jax import difficulty as dmath
from dnet_jax import losses
from dnet_jax import meta
from dnet_jax.classifier import loss_dtype
from dnet_jax.meta import MetaInputs, TrainForward


def _call(fn: Callable, params, batch, rng):
  return fn(params, batch) if rng is None else fn(params, batch, rng=rng)


@dataclasses.dataclass(frozen=True)
class FunctionProblem:
  """The meta-objective's fixed parts from user loss functions (the interface of
  `meta.MetaProblem` that `dnet_jax.meta`'s gradient functions use)."""
  per_example_loss_fn: Callable
  meta_loss_fn: Callable
  dnet: Any
  driver_weight: float = 0.3
  axis_name: str | None = None
  has_aux: bool = False

  def difficulty(self, dnet_params, class_accuracy):
    return meta.difficulty_of(self.dnet, dnet_params, class_accuracy)

  def class_weights(self, dnet_params, class_accuracy):
    return dmath.class_weights_from_difficulty(self.difficulty(dnet_params, class_accuracy))

  def per_example_loss(self, params, model_state, batch, rng):
    del model_state  # the user's functions carry their own
    out = _call(self.per_example_loss_fn, params, batch, rng)
    values, aux = out if self.has_aux else (out, None)
    if values.ndim != 1:
      raise ValueError(f"per_example_loss must return one loss per example, shape [B]; got shape "
                       f"{tuple(values.shape)}. Return the unreduced losses (do not take the mean).")
    return values.astype(loss_dtype(values.dtype)), (None, aux)

  def meta_cross_entropy(self, params, model_state, meta_batch, rng):
    del model_state
    value = _call(self.meta_loss_fn, params, meta_batch, rng)
    chex.assert_rank(value, 0, exception_type=ValueError,
                     custom_message="meta_loss must return a scalar (the mean over the meta batch).")
    return value.astype(loss_dtype(value.dtype))


class SharedForward(NamedTuple):
  """One forward pass of the classifier on the train batch, with its VJP kept.

  Attributes:
    per_example: l_i(theta) [B], float32 or wider.
    vjp: the VJP of l at theta.
    aux: what `per_example_loss` returned as aux (has_aux=True), e.g. new BatchNorm
      statistics; None otherwise.
    labels: y [B].
    axis_name: gradients are averaged over it (pmap), or None.
  """
  per_example: jax.Array
  vjp: Callable
  aux: Any
  labels: jax.Array
  axis_name: str | None = None

  def gradient(self, class_weights: jax.Array):
    """grad_theta (1/B) sum_i w_{y_i} l_i(theta): no new forward pass."""
    forward = TrainForward(self.per_example, self.vjp, None, None)
    return meta.weighted_gradient(forward, class_weights, self.labels, self.axis_name)

  def loss(self, class_weights: jax.Array) -> jax.Array:
    """(1/B) sum_i w_{y_i} l_i(theta) (local batch)."""
    return losses.weighted_mean(self.per_example, class_weights, self.labels)

  def as_train_forward(self) -> TrainForward:
    return TrainForward(self.per_example, self.vjp, None, self.aux)


def _check_inputs(inputs: MetaInputs) -> None:
  labels = inputs.train_labels
  chex.assert_rank(inputs.class_accuracy, 1, exception_type=ValueError,
                   custom_message="class_accuracy must be a vector [C] of per-class accuracies.")
  chex.assert_rank(labels, 1, exception_type=ValueError,
                   custom_message="labels must be a vector [B] of int class indices.")
  chex.assert_type(labels, int, exception_type=TypeError,
                   custom_message="labels must be integer class indices.")


def shared_forward(per_example_loss: Callable, params, batch, labels: jax.Array, *,
                   rng: jax.Array | None = None, has_aux: bool = False,
                   axis_name: str | None = None) -> SharedForward:
  """Runs `per_example_loss(params, batch[, rng=])` once and keeps its VJP.

  `rng` here is the train key (with `meta_gradients(rng=k)` the train key is
  `jax.random.split(k)[0]`, see `dnet_jax.meta.split_step_rng`).
  """
  problem = FunctionProblem(per_example_loss, None, None, has_aux=has_aux, axis_name=axis_name)
  per_example, vjp, (_, aux) = jax.vjp(
      lambda p: problem.per_example_loss(p, None, batch, rng), params, has_aux=True)
  return SharedForward(per_example, vjp, aux, jnp.asarray(labels), axis_name)


def difficulty_net_gradient(per_example_loss: Callable, meta_loss: Callable, dnet, dnet_params,
                            inputs: MetaInputs, *, driver_weight: float = 0.3,
                            mode: str = "nested", forward: SharedForward | None = None,
                            has_aux: bool = False, axis_name: str | None = None):
  """dL_meta/dphi and aux scalars (meta_ce, driver_loss, lookahead_train_loss).

  `mode` as in `dnet_jax.meta`: "nested" (default), "jvp", "driver_only". Pass
  the step's `forward` (from `shared_forward` with the train key) to reuse its
  forward pass; without it one is run here. `inputs.batch_stats` is not used
  (the user's functions carry their own model state): pass None.
  """
  meta.check_meta_grad_mode(mode)
  _check_inputs(inputs)
  problem = FunctionProblem(per_example_loss, meta_loss, dnet, driver_weight, axis_name, has_aux)
  train_forward = None if forward is None else forward.as_train_forward()
  return meta.meta_gradient(mode, problem, dnet_params, inputs, train_forward)


class MetaGradients(NamedTuple):
  """What `meta_gradients` returns.

  Attributes:
    dnet_grads: dL_meta/dphi (the Difficulty-Net gradient), averaged over axis_name.
    class_weights: w = C d / sum d at the given phi (the weights the lookahead used).
    classifier_grads: grad_theta L_train(theta, w) from the shared forward pass.
    train_loss: L_train(theta, w) on the local batch.
    aux: the aux of `per_example_loss` (has_aux=True) or None.
    metrics: meta_ce, driver_loss, lookahead_train_loss.
  """
  dnet_grads: Any
  class_weights: jax.Array
  classifier_grads: Any
  train_loss: jax.Array
  aux: Any
  metrics: dict


def meta_gradients(per_example_loss: Callable, meta_loss: Callable, dnet, dnet_params,
                   inputs: MetaInputs, *, driver_weight: float = 0.3, mode: str = "nested",
                   has_aux: bool = False, axis_name: str | None = None) -> MetaGradients:
  """The Difficulty-Net gradient, the class weights and the classifier gradient, from one
  forward pass of the classifier on the train batch.

  `classifier_grads` uses the weights of the *given* phi. METHOD.md step 4 updates
  theta with the weights of the *updated* phi; for that, call `shared_forward`,
  `difficulty_net_gradient(..., forward=fwd)`, update phi, and take
  `fwd.gradient(class_weights(dnet, new_phi, a))` (one forward pass all the same).
  """
  _check_inputs(inputs)
  train_rng, _ = meta.split_step_rng(inputs.rng)
  labels = inputs.train_labels
  forward = shared_forward(per_example_loss, inputs.params, inputs.batch, labels, rng=train_rng,
                           has_aux=has_aux, axis_name=axis_name)
  dnet_grads, metrics = difficulty_net_gradient(
      per_example_loss, meta_loss, dnet, dnet_params, inputs, driver_weight=driver_weight,
      mode=mode, forward=forward, has_aux=has_aux, axis_name=axis_name)
  weights = jax.lax.stop_gradient(class_weights(dnet, dnet_params, inputs.class_accuracy))
  return MetaGradients(dnet_grads, weights, forward.gradient(weights), forward.loss(weights),
                       forward.aux, metrics)


def class_weights(dnet, dnet_params, class_accuracy: jax.Array) -> jax.Array:
  """w = C g_phi(a) / sum_c g_phi(a)_c for a linen Difficulty-Net or a function."""
  return dmath.class_weights_from_difficulty(meta.difficulty_of(dnet, dnet_params, class_accuracy))
