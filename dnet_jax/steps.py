"""Pure training and evaluation steps: `train_step`, `baseline_step`, `eval_step`.

Each step is a pure function `(state, batch, ...) -> (state, metrics)` of plain
pytrees; the networks, optimizers and losses are keyword arguments that the
caller binds once (e.g. with `functools.partial`) before `jax.jit` or
`jax.pmap`. Batches are dicts with "image" [B, ...] and "label" [B] (int32),
and for evaluation optionally "mask" [B] (1 = real example, 0 = padding).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from dnet_jax import difficulty as dmath
from dnet_jax import losses
from dnet_jax.apply import apply_classifier
from dnet_jax import meta
from dnet_jax.meta import MetaInputs, MetaProblem, pmean_if, split_step_rng
from dnet_jax.state import TrainState

LearningRate = float | Callable[[jax.Array], jax.Array]


def _learning_rate(learning_rate: LearningRate, step: jax.Array) -> jax.Array:
  return learning_rate(step) if callable(learning_rate) else jnp.asarray(learning_rate)


def _step_key(state: TrainState, axis_name: str | None) -> jax.Array:
  key = state.step_key()
  if axis_name is not None:  # different dropout masks on different devices
    key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
  return key


def _classifier_update(state: TrainState, forward: meta.TrainForward, labels, class_weights, *,
                       tx, axis_name):
  """Real update of theta on L_train(theta, w) with `tx`, from the shared forward pass.

  Returns the new (params, batch_stats, opt_state) and the step's scalar metrics.
  BatchNorm statistics are the ones this forward pass produced.
  """
  grads = meta.weighted_gradient(forward, class_weights, labels, axis_name)
  # Per-device running statistics are averaged (a no-op with synchronised BatchNorm).
  batch_stats = pmean_if(forward.batch_stats, axis_name)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
      "train_loss": losses.weighted_mean(forward.per_example, class_weights, labels),
      "ce": jnp.mean(losses.cross_entropy(forward.logits, labels)),
      "batch_accuracy": jnp.mean((jnp.argmax(forward.logits, -1) == labels).astype(jnp.float32)),
      "grad_norm": optax.global_norm(grads),
      "weight_min": jnp.min(class_weights),
      "weight_max": jnp.max(class_weights),
  }
  return params, batch_stats, opt_state, metrics


def train_step(state: TrainState, batch: dict, meta_batch: dict, *, model: nn.Module,
               dnet: nn.Module, tx: optax.GradientTransformation,
               dnet_tx: optax.GradientTransformation, learning_rate: LearningRate,
               loss_fn: losses.LossFn = losses.cross_entropy, driver_weight: float = 0.3,
               meta_grad: str = "nested", update_dnet: bool = True, remat: bool = False,
               axis_name: str | None = None):
  """One Difficulty-Net iteration (METHOD.md steps 1-4; Sinha & Ohashi, WACV 2023, Alg. 1).

    1. d = g_phi(a), w = C d / sum d, L_train(theta, phi) = (1/B) sum_i w_{y_i} l_i(theta).
    2. theta_hat(phi) = theta - alpha grad_theta L_train   (plain SGD, BN batch statistics).
    3. phi <- dnet_tx step on dL_meta/dphi, L_meta = CE(f_theta_hat(x^m), y^m) + lambda L_dr,
       with the gradient through the lookahead (`meta_grad`, see `dnet_jax.meta`).
    4. w' = w(phi_new) (no gradient to phi); theta <- tx step on L_train(theta, w');
       BatchNorm running statistics updated.

  The classifier's forward pass on the train batch runs once and serves steps
  1, 2, 3 and 4 (L_train is linear in the weights, so only the cotangent of its
  VJP changes between the lookahead and the real update).

  Args:
    state: the `TrainState` (classifier, Difficulty-Net, optimizers, accuracy, step, key).
    batch: train batch {"image", "label"} (per device under pmap).
    meta_batch: meta batch {"image", "label"} drawn from the balanced meta set.
    model: any Flax classifier; it may take `train=` and may have BatchNorm/dropout.
    dnet: Difficulty-Net (`DifficultyNet` or `AbsoluteDifficultyNet`).
    tx: the classifier optimizer (e.g. SGD with momentum and weight decay).
    dnet_tx: the Difficulty-Net optimizer (Adam, with L2 added to the gradient).
    learning_rate: alpha of the lookahead: a number or the classifier's schedule,
      called with `state.step` (it should be the schedule inside `tx`).
    loss_fn: per-example training loss (cross-entropy, Balanced Softmax, focal).
    driver_weight: lambda.
    meta_grad: "nested" (default), "jvp" (same value, forward mode) or
      "driver_only" (the public code: Difficulty-Net trained by L_dr alone).
    update_dnet: False skips steps 2-3 (no lookahead, Difficulty-Net unchanged)
      and trains theta with the current weights. `MetaIntervalStep` uses it to
      update Difficulty-Net only every k-th step; True (the default) is the exact
      method. It is a Python bool, not a traced value: XLA:CPU runs a
      `lax.cond` around the meta step about 50x slower, so the two variants
      are compiled separately and chosen on the host. metrics["meta_updated"]
      says which ran.
    remat: `jax.checkpoint` every classifier pass (memory for compute).
    axis_name: the pmap axis; gradients are averaged and counts summed over it.

  Returns:
    (new_state, metrics): metrics is a dict of scalars (device arrays).
  """
  meta.check_meta_grad_mode(meta_grad)
  key = _step_key(state, axis_name)
  train_rng, _ = split_step_rng(key)
  alpha = _learning_rate(learning_rate, state.step)
  problem = MetaProblem(model=model, dnet=dnet, loss_fn=loss_fn, driver_weight=driver_weight,
                        axis_name=axis_name, remat=remat)
  inputs = MetaInputs(params=state.params, batch_stats=state.batch_stats,
                      class_accuracy=state.class_accuracy, batch=batch, meta_batch=meta_batch,
                      learning_rate=alpha, rng=key)
  forward = meta.train_forward(problem, state.params, state.batch_stats, batch, train_rng)

  def meta_update(_):
    dnet_grads, aux = meta.meta_gradient(meta_grad, problem, state.dnet_params, inputs, forward)
    updates, dnet_opt_state = dnet_tx.update(dnet_grads, state.dnet_opt_state, state.dnet_params)
    aux = dict(aux, dnet_grad_norm=optax.global_norm(dnet_grads),
               meta_updated=jnp.ones((), jnp.float32))
    return optax.apply_updates(state.dnet_params, updates), dnet_opt_state, aux

  if update_dnet:
    dnet_params, dnet_opt_state, meta_metrics = meta_update(None)
  else:  # same metric names, so the two variants' metrics can be summed
    shapes = jax.eval_shape(meta_update, None)[2]
    meta_metrics = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    dnet_params, dnet_opt_state = state.dnet_params, state.dnet_opt_state

  weights = jax.lax.stop_gradient(problem.class_weights(dnet_params, state.class_accuracy))
  params, batch_stats, opt_state, metrics = _classifier_update(
      state, forward, batch["label"], weights, tx=tx, axis_name=axis_name)
  metrics.update(meta_metrics)
  metrics["learning_rate"] = alpha
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, dnet_params=dnet_params,
                            dnet_opt_state=dnet_opt_state)
  return new_state, pmean_if(metrics, axis_name)


def baseline_step(state: TrainState, batch: dict, *, model: nn.Module,
                  tx: optax.GradientTransformation,
                  class_weights_fn: Callable[[jax.Array], jax.Array] | None = None,
                  loss_fn: losses.LossFn = losses.cross_entropy,
                  axis_name: str | None = None):
  """One step of a fixed-weight baseline on the same state and metrics as `train_step`.

    L(theta) = (1/B) sum_i w_{y_i} l_i(theta),   w = class_weights_fn(a) (ones if None).

  Plain CE: no weights, `losses.cross_entropy`. Class-balanced (Cui et al. 2019):
  `lambda a: class_balanced_weights(counts)`. CDB (Sinha et al. 2020):
  `lambda a: cdb_weights(a, tau)`, reading the accuracy vector refreshed every
  epoch. Focal and Balanced Softmax: pass their `loss_fn`.
  """
  num_classes = state.class_accuracy.shape[-1]
  if class_weights_fn is None:
    weights = jnp.ones((num_classes,), jnp.float32)
  else:
    weights = jax.lax.stop_gradient(class_weights_fn(state.class_accuracy))
  train_rng, _ = split_step_rng(_step_key(state, axis_name))
  problem = MetaProblem(model=model, dnet=None, loss_fn=loss_fn, axis_name=axis_name)
  forward = meta.train_forward(problem, state.params, state.batch_stats, batch, train_rng)
  params, batch_stats, opt_state, metrics = _classifier_update(
      state, forward, batch["label"], weights, tx=tx, axis_name=axis_name)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state)
  return new_state, pmean_if(metrics, axis_name)


def eval_step(state: TrainState, batch: dict, *, model: nn.Module, num_classes: int | None = None,
              axis_name: str | None = None) -> dict:
  """Per-class top-1 counts of the classifier in evaluation mode (running BN statistics).

  Returns {"correct": [C], "total": [C]}, summed over `axis_name`; sum them over
  batches on the host and use `accuracy_from_counts`. Padding examples carry
  batch["mask"] = 0 and are not counted.
  """
  num_classes = num_classes or state.class_accuracy.shape[-1]
  logits, _ = apply_classifier(model, state.params, state.batch_stats, batch["image"], train=False)
  correct, total = dmath.per_class_counts(logits, batch["label"], num_classes, batch.get("mask"))
  counts = {"correct": correct, "total": total}
  return counts if axis_name is None else jax.lax.psum(counts, axis_name)


def with_class_accuracy(state: TrainState, correct, total) -> TrainState:
  """The state with its accuracy vector refreshed from meta-set counts (after an epoch)."""
  return state.replace(class_accuracy=dmath.accuracy_from_counts(
      jnp.asarray(correct, jnp.float32), jnp.asarray(total, jnp.float32)))
