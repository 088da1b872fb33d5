"""The meta-gradient of Difficulty-Net, in one place.

Notation (METHOD.md; Sinha & Ohashi, WACV 2023, section 3.3): a train batch
(x, y) of size B, a meta batch (x^m, y^m), the accuracy vector a, the classifier
learning rate alpha of the current step, and

    d(phi) = g_phi(a),   w(phi) = C d / sum_c d_c,   s_i = w_{y_i}
    L_train(theta, w) = (1/B) sum_i s_i l_i(theta)                       (step 1)
    theta_hat(phi)    = theta - alpha grad_theta L_train(theta, w(phi))   (step 2)
    L_meta(phi)       = CE(f_theta_hat(phi)(x^m), y^m) + lambda L_dr(d(phi), a)   (step 3)

The lookahead uses plain SGD and BatchNorm in training mode (batch statistics;
its running statistics are thrown away); the meta forward pass also runs in
training mode, as the public code's model does.

Three ways to get dL_meta/dphi:
  * `nested`: `jax.grad` of L_meta, whose body calls `jax.grad` for the lookahead
    (reverse-over-reverse). The paper's method; the default.
  * `jvp`: the forward-mode identity
        dL_meta/ds_i = -(alpha / B) <grad_theta l_i(theta), v>,
        v = grad_theta_hat CE_meta(theta_hat),
    where all B dot products come from ONE `jax.jvp` of the per-example loss
    vector at theta in direction v; then chain through s -> w -> d -> phi with a
    VJP of the tiny Difficulty-Net. Exactly the same number, computed differently:
    the tests use it as an independent oracle for `nested`.
  * `driver_only`: the public PyTorch code's behaviour. Its weights are detached
    before the lookahead, so the meta cross-entropy never reaches phi and the
    gradient is lambda * grad L_dr alone. No lookahead is computed.

With `axis_name` (under `jax.pmap`), the lookahead gradient is averaged over
devices before it is used and the meta-gradient is averaged at the end; with
pmap's collective semantics (the transpose of psum is psum) this is the exact
gradient of the mean meta-objective over the global batch (tested against a
single device in float64).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from dnet_jax import difficulty as dmath
from dnet_jax import losses
from dnet_jax.apply import apply_classifier

META_GRAD_MODES = ("nested", "jvp", "driver_only")


def pmean_if(tree, axis_name: str | None):
  """`jax.lax.pmean(tree, axis_name)`, or `tree` unchanged when axis_name is None."""
  return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def split_step_rng(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(train_rng, meta_rng): the train key drives the lookahead and the real update alike,
  so both see the same dropout masks; the meta forward pass gets its own key."""
  train_rng, meta_rng = jax.random.split(rng)
  return train_rng, meta_rng


def lookahead_params(params, grads, learning_rate):
  """theta_hat = theta - alpha * g: one plain SGD step (no momentum, no weight decay)."""
  return jax.tree.map(lambda p, g: (p - learning_rate * g).astype(p.dtype), params, grads)


@dataclasses.dataclass(frozen=True)
class MetaProblem:
  """The fixed parts of the meta-objective: which networks and losses, and how to reduce.

  Attributes:
    model: the classifier f_theta (any linen module).
    dnet: Difficulty-Net g_phi.
    loss_fn: per-example training loss l_i, `loss_fn(logits, labels) -> [B]`
      (cross-entropy, or Balanced Softmax for Difficulty-Net + BS).
    driver_weight: lambda (0.3 in the paper).
    axis_name: pmap axis to average over, or None on one device.
  """
  model: nn.Module
  dnet: nn.Module
  loss_fn: Callable[[jax.Array, jax.Array], jax.Array] = losses.cross_entropy
  driver_weight: float = 0.3
  axis_name: str | None = None

  def difficulty(self, dnet_params, class_accuracy):
    """d = g_phi(a)."""
    return self.dnet.apply({"params": dnet_params}, class_accuracy)

  def class_weights(self, dnet_params, class_accuracy):
    """w = C d / sum d."""
    return dmath.class_weights_from_difficulty(self.difficulty(dnet_params, class_accuracy))

  def per_example_loss(self, params, batch_stats, batch, rng):
    """(l(theta) [B], logits, new batch_stats), BatchNorm in training mode."""
    logits, new_stats = apply_classifier(self.model, params, batch_stats, batch["image"],
                                         train=True, rng=rng)
    return self.loss_fn(logits, batch["label"]), (logits, new_stats)

  def train_loss(self, params, class_weights, batch_stats, batch, rng):
    """L_train(theta, w) = (1/B) sum_i w_{y_i} l_i(theta); aux = (logits, new batch_stats)."""
    per_example, aux = self.per_example_loss(params, batch_stats, batch, rng)
    return losses.weighted_mean(per_example, class_weights, batch["label"]), aux

  def meta_cross_entropy(self, params, batch_stats, meta_batch, rng):
    """Plain mean cross-entropy on the (balanced) meta batch, BatchNorm in training mode."""
    logits, _ = apply_classifier(self.model, params, batch_stats, meta_batch["image"],
                                 train=True, rng=rng)
    return jnp.mean(losses.cross_entropy(logits, meta_batch["label"]))


@dataclasses.dataclass(frozen=True)
class MetaInputs:
  """The per-step data of the meta-objective (all arrays)."""
  params: Any
  batch_stats: Any
  class_accuracy: jax.Array
  batch: dict
  meta_batch: dict
  learning_rate: jax.Array
  rng: jax.Array


def meta_objective(problem: MetaProblem, dnet_params, inputs: MetaInputs):
  """L_meta(phi) for the local batch; returns (value, aux dict of scalars).

  The lookahead gradient inside is itself a `jax.grad`, so `jax.grad` of this
  function is the nested (second-order) meta-gradient.
  """
  train_rng, meta_rng = split_step_rng(inputs.rng)
  difficulty = problem.difficulty(dnet_params, inputs.class_accuracy)
  weights = dmath.class_weights_from_difficulty(difficulty)
  grads, train_loss = _grad_with_value(problem, inputs, weights, train_rng)
  grads = pmean_if(grads, problem.axis_name)
  theta_hat = lookahead_params(inputs.params, grads, inputs.learning_rate)
  meta_ce = problem.meta_cross_entropy(theta_hat, inputs.batch_stats, inputs.meta_batch, meta_rng)
  drv = dmath.driver_loss(difficulty, inputs.class_accuracy)
  value = meta_ce + problem.driver_weight * drv
  return value, {"meta_ce": meta_ce, "driver_loss": drv, "lookahead_train_loss": train_loss}


def _grad_with_value(problem: MetaProblem, inputs: MetaInputs, weights, rng):
  def loss(params):
    value, _ = problem.train_loss(params, weights, inputs.batch_stats, inputs.batch, rng)
    return value, value
  return jax.grad(loss, has_aux=True)(inputs.params)


def nested_meta_gradient(problem: MetaProblem, dnet_params, inputs: MetaInputs):
  """dL_meta/dphi by `jax.grad` through the lookahead (reverse-over-reverse)."""
  grads, aux = jax.grad(meta_objective, argnums=1, has_aux=True)(problem, dnet_params, inputs)
  return pmean_if(grads, problem.axis_name), aux


def jvp_meta_gradient(problem: MetaProblem, dnet_params, inputs: MetaInputs):
  """dL_meta/dphi by the forward-mode identity (see the module docstring).

    dL/ds_i = -(alpha / B) (J v)_i,   J = d l / d theta [B x P],   v = grad CE_meta(theta_hat),
    dL/dw_c = sum_{i: y_i = c} dL/ds_i,   dL/dphi = VJP_{phi -> w}(dL/dw) + lambda dL_dr/dphi.
  """
  train_rng, meta_rng = split_step_rng(inputs.rng)
  labels = inputs.batch["label"]
  batch_size = labels.shape[0]
  num_classes = inputs.class_accuracy.shape[-1]

  def per_example(params):
    return problem.per_example_loss(params, inputs.batch_stats, inputs.batch, train_rng)[0]

  difficulty, difficulty_vjp = jax.vjp(
      lambda phi: problem.difficulty(phi, inputs.class_accuracy), dnet_params)
  weights, weights_vjp = jax.vjp(dmath.class_weights_from_difficulty, difficulty)
  per_example_values, per_example_vjp = jax.vjp(per_example, inputs.params)
  sample_weights = weights[labels]
  (grads,) = per_example_vjp((sample_weights / batch_size).astype(per_example_values.dtype))
  grads = pmean_if(grads, problem.axis_name)
  theta_hat = lookahead_params(inputs.params, grads, inputs.learning_rate)
  meta_ce, v = jax.value_and_grad(problem.meta_cross_entropy)(
      theta_hat, inputs.batch_stats, inputs.meta_batch, meta_rng)
  v = pmean_if(v, problem.axis_name)
  _, jv = jax.jvp(per_example, (inputs.params,), (v,))
  d_sample_weights = -(inputs.learning_rate / batch_size) * jv
  d_weights = jax.ops.segment_sum(d_sample_weights, labels, num_segments=num_classes)
  (d_difficulty,) = weights_vjp(d_weights.astype(weights.dtype))
  drv, d_driver = jax.value_and_grad(dmath.driver_loss)(difficulty, inputs.class_accuracy)
  (grads_phi,) = difficulty_vjp(d_difficulty + problem.driver_weight * d_driver)
  aux = {"meta_ce": meta_ce, "driver_loss": drv,
         "lookahead_train_loss": jnp.mean(sample_weights * per_example_values)}
  return pmean_if(grads_phi, problem.axis_name), aux


def driver_only_meta_gradient(problem: MetaProblem, dnet_params, inputs: MetaInputs):
  """The public code's effective gradient: lambda * grad_phi L_dr; no lookahead."""
  def objective(phi):
    drv = dmath.driver_loss(problem.difficulty(phi, inputs.class_accuracy), inputs.class_accuracy)
    return problem.driver_weight * drv, drv
  grads, drv = jax.grad(objective, has_aux=True)(dnet_params)
  return pmean_if(grads, problem.axis_name), {"driver_loss": drv}


_MODES = {
    "nested": nested_meta_gradient,
    "jvp": jvp_meta_gradient,
    "driver_only": driver_only_meta_gradient,
}


def meta_gradient(mode: str, problem: MetaProblem, dnet_params, inputs: MetaInputs):
  """dL_meta/dphi (averaged over `problem.axis_name`) and aux scalars, by mode."""
  if mode not in _MODES:
    raise ValueError(f"Unknown meta-gradient mode {mode!r}; choose one of {', '.join(META_GRAD_MODES)}.")
  return _MODES[mode](problem, dnet_params, inputs)
