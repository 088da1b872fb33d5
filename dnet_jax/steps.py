"""Pure training and evaluation steps: `train_step`, `baseline_step`, `eval_step`.

Each step is a pure function `(state, batch, ...) -> (state, metrics)` of plain
pytrees; the networks, optimizers and losses are keyword arguments that the
caller binds once (e.g. with `functools.partial`) before `jax.jit` or
`jax.pmap`. The model is reached only through `dnet_jax.classifier`'s protocol
(linen, NNX, Equinox, a plain function). Batches are dicts with "image" [B, ...]
and "label" [B] (int32), or (images, labels) pairs; evaluation and meta batches
may carry "mask" [B] (1 = real example, 0 = padding, see `parallel.pad_batch`).
"""

from __future__ import annotations

from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dnet_jax import difficulty as dmath
from dnet_jax import losses
from dnet_jax import meta
from dnet_jax.classifier import as_classifier, checked_logits
from dnet_jax.meta import MetaInputs, MetaProblem, pmean_floating, pmean_if, split_step_rng
from dnet_jax.state import TrainState

LearningRate = float | Callable[[jax.Array], jax.Array]


def _learning_rate(learning_rate: LearningRate, step: jax.Array) -> jax.Array:
  return learning_rate(step) if callable(learning_rate) else jnp.asarray(learning_rate)


def _lookahead_rates(alpha: jax.Array, scale: Any, params: Any):
  """alpha, or alpha x scale_k per parameter (`train_step`'s lookahead_scale)."""
  if scale is None:
    return alpha
  if jax.tree.structure(scale) != jax.tree.structure(params):
    raise ValueError(
        "lookahead_scale must be a pytree of floats shaped like the classifier's params "
        f"(e.g. optim.parameter_group_multipliers(params, groups)); got structure "
        f"{jax.tree.structure(scale)} for params {jax.tree.structure(params)}.")
  return jax.tree.map(lambda m: jnp.asarray(m, alpha.dtype) * alpha, scale)


def as_batch(batch: Any, what: str = "batch") -> dict:
  """A batch as a dict {"image", "label"[, "mask"]}; an (images, labels) pair is accepted."""
  if isinstance(batch, (tuple, list)) and len(batch) == 2:
    return {"image": batch[0], "label": batch[1]}
  if isinstance(batch, dict) and "image" in batch and "label" in batch:
    return batch
  raise TypeError(f"The {what} must be a dict with 'image' and 'label' (and optionally 'mask') or "
                  f"an (images, labels) pair; got {type(batch).__name__}"
                  f"{' with keys ' + str(sorted(batch)) if isinstance(batch, dict) else ''}.")


def num_classes_of(state: TrainState) -> int:
  """C from the state's accuracy vector, which must be [C] inside a step."""
  accuracy = state.class_accuracy
  if accuracy.ndim != 1:
    raise ValueError(
        f"The state's class_accuracy has shape {tuple(accuracy.shape)} inside the step; it must be "
        "a vector [C]. Under pmap the whole state must be replicated (dj.replicate(state)) and its "
        "accuracy refreshed with dj.with_class_accuracy, which keeps that layout; with jax.jit do "
        "not replicate it (use dj.replicate_on_mesh for a mesh).")
  chex.assert_type(accuracy, float, exception_type=TypeError,
                   custom_message="class_accuracy must be a floating-point vector.")
  return accuracy.shape[0]


def _step_key(state: TrainState, axis_name: str | None) -> jax.Array:
  key = state.step_key()
  if axis_name is not None:  # different dropout masks on different devices
    key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
  return key


def batch_mean_weights(class_weights, labels, axis_name: str | None = None):
  """Every class weighted by wbar = mean_i w_{y_i} over the (global) batch.

  The public Difficulty-Net code's Balanced Softmax returns the per-example loss
  with shape (B, 1) (CIFAR-LT/cifar_train_exaugment.py:62-71;
  ImageNet_Places-LT/train_stage1.py:88-93), which broadcasts against the (B,)
  example weights in `torch.mean(batch_weights * criterion(output, target))`
  (train_stage1.py:457) to a (B, B) matrix, so its loss is
  mean_i l_i x mean_j w_{y_j}: the weights rescale the whole batch instead of
  weighting examples. With these uniform weights, (1/B) sum_i wbar l_i is that loss.
  """
  mean = jnp.mean(class_weights[labels])
  if axis_name is not None:  # equal per-device batches: the mean of means is the global mean
    mean = jax.lax.pmean(mean, axis_name)
  return jnp.full_like(class_weights, mean)


def _classifier_update(state: TrainState, forward: meta.TrainForward, labels, class_weights, *,
                       tx, axis_name):
  """Real update of theta on L_train(theta, w) with `tx`, from the shared forward pass.

  Returns the new (params, batch_stats, opt_state) and the step's scalar metrics.
  BatchNorm statistics are the ones this forward pass produced.
  """
  grads = meta.weighted_gradient(forward, class_weights, labels, axis_name)
  # Per-device running statistics are averaged (a no-op with synchronised BatchNorm).
  batch_stats = pmean_floating(forward.batch_stats, axis_name)
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


def train_step(state: TrainState, batch: dict, meta_batch: dict, *, model: Any,
               dnet: Any, tx: optax.GradientTransformation,
               dnet_tx: optax.GradientTransformation, learning_rate: LearningRate,
               loss_fn: losses.LossFn = losses.cross_entropy, driver_weight: float = 0.3,
               meta_grad: str = "nested", update_dnet: bool = True, remat: bool = False,
               batch_mean: bool = False, lookahead_scale: Any = None,
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
    model: the classifier: a linen module (it may take `train=` and have BatchNorm /
      dropout), an NNX or Equinox module, or any `dnet_jax.Classifier`
      (`dnet_jax.classifier` describes the protocol).
    dnet: Difficulty-Net (`DifficultyNet` or `AbsoluteDifficultyNet`).
    tx: the classifier optimizer (e.g. SGD with momentum and weight decay).
    dnet_tx: the Difficulty-Net optimizer (Adam, with L2 added to the gradient).
    learning_rate: alpha of the lookahead: a number or the classifier's schedule,
      called with `state.step` (it should be the schedule inside `tx`).
    loss_fn: per-example training loss (cross-entropy, Balanced Softmax, focal).
    driver_weight: lambda.
    meta_grad: "nested" (default), "jvp" (same value, forward mode) or
      "driver_only" (the public code: Difficulty-Net trained by L_dr alone;
      `dnet_jax.meta` cites the lines).
    update_dnet: False skips steps 2-3 (no lookahead, Difficulty-Net unchanged)
      and trains theta with the current weights. `MetaIntervalStep` uses it to
      update Difficulty-Net only every k-th step; True (the default) is the exact
      method. It is a Python bool, not a traced value: XLA:CPU runs a
      `lax.cond` around the meta step about 50x slower, so the two variants
      are compiled separately and chosen on the host. metrics["meta_updated"]
      says which ran.
    remat: `jax.checkpoint` every classifier pass (memory for compute).
    batch_mean: step 4 uses `batch_mean_weights` instead of per-example weights:
      the public code's Balanced Softmax returns shape (B, 1, 1), so its
      `mean(loss * weights)` is mean(loss) x mean(weights) (CIFAR-LT/
      cifar_train_exaugment.py:62-71 and 242). The meta-gradient is unchanged,
      so use it with meta_grad="driver_only", as the public code runs.
    lookahead_scale: None, or a pytree of floats shaped like the classifier's
      params: the lookahead steps parameter k at lookahead_scale_k x alpha, the rates
      of parameter groups in `tx` (`optim.parameter_group_multipliers`).
    axis_name: the pmap axis; gradients are averaged and counts summed over it.

  Returns:
    (new_state, metrics): metrics is a dict of scalars (device arrays);
    metrics["learning_rate"] is alpha (the unscaled rate).
  """
  meta.check_meta_grad_mode(meta_grad)
  batch, meta_batch = as_batch(batch), as_batch(meta_batch, "meta batch")
  key = _step_key(state, axis_name)
  train_rng, _ = split_step_rng(key)
  alpha = _learning_rate(learning_rate, state.step)
  problem = MetaProblem(model=model, dnet=dnet, loss_fn=loss_fn, driver_weight=driver_weight,
                        axis_name=axis_name, remat=remat, num_classes=num_classes_of(state))
  inputs = MetaInputs(params=state.params, batch_stats=state.batch_stats,
                      class_accuracy=state.class_accuracy, batch=batch, meta_batch=meta_batch,
                      learning_rate=_lookahead_rates(alpha, lookahead_scale, state.params),
                      rng=key)
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
  if batch_mean:
    weights = batch_mean_weights(weights, batch["label"], axis_name)
  params, batch_stats, opt_state, metrics = _classifier_update(
      state, forward, batch["label"], weights, tx=tx, axis_name=axis_name)
  metrics.update(meta_metrics)
  metrics["learning_rate"] = alpha
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, dnet_params=dnet_params,
                            dnet_opt_state=dnet_opt_state)
  return new_state, pmean_if(metrics, axis_name)


def baseline_step(state: TrainState, batch: dict, *, model: Any,
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
  batch = as_batch(batch)
  num_classes = num_classes_of(state)
  if class_weights_fn is None:
    weights = jnp.ones((num_classes,), jnp.float32)
  else:
    weights = jax.lax.stop_gradient(class_weights_fn(state.class_accuracy))
  train_rng, _ = split_step_rng(_step_key(state, axis_name))
  problem = MetaProblem(model=model, dnet=None, loss_fn=loss_fn, axis_name=axis_name,
                        num_classes=num_classes)
  forward = meta.train_forward(problem, state.params, state.batch_stats, batch, train_rng)
  params, batch_stats, opt_state, metrics = _classifier_update(
      state, forward, batch["label"], weights, tx=tx, axis_name=axis_name)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state)
  return new_state, pmean_if(metrics, axis_name)


def eval_step(state: TrainState, batch: dict, *, model: Any, num_classes: int | None = None,
              axis_name: str | None = None) -> dict:
  """Per-class top-1 counts of the classifier in evaluation mode (running BN statistics).

  Returns {"correct": [C], "total": [C]}, summed over `axis_name`; sum them over
  batches on the host and use `accuracy_from_counts`. Padding examples carry
  batch["mask"] = 0 and are not counted.
  """
  batch = as_batch(batch)
  num_classes = num_classes or num_classes_of(state)
  classifier = as_classifier(model)
  logits, _ = classifier.apply(state.params, state.batch_stats, batch["image"], train=False, rng=None)
  logits = checked_logits(logits, batch["image"].shape[0], num_classes, classifier.name)
  correct, total = dmath.per_class_counts(logits, batch["label"], num_classes, batch.get("mask"))
  counts = {"correct": correct, "total": total}
  return counts if axis_name is None else jax.lax.psum(counts, axis_name)


def with_class_accuracy(state: TrainState, correct, total) -> TrainState:
  """The state with its accuracy vector refreshed from meta-set counts (after an epoch).

  a_c = correct_c / total_c (0 where total_c = 0). The new vector keeps the
  layout of the state's: for a replicated (pmap) state [n_devices, C] the
  counts may be [C] or the [n_devices, C] that `pmap_eval_step` returns, and the
  result is placed on the same devices with the same sharding; for a state on a
  mesh (`replicate_on_mesh`) it keeps that sharding too. A shape that fits
  neither is refused with both shapes named.
  """
  old = state.class_accuracy
  accuracy = dmath.accuracy_from_counts(jnp.asarray(correct, jnp.float32),
                                        jnp.asarray(total, jnp.float32))
  num_classes = old.shape[-1]
  if accuracy.shape[-1:] != (num_classes,) or accuracy.ndim > old.ndim:
    raise ValueError(
        f"with_class_accuracy: counts of shape {tuple(accuracy.shape)} do not fit the state's "
        f"class_accuracy of shape {tuple(old.shape)}; give per-class counts [C={num_classes}] "
        "(or, for a replicated state, the [n_devices, C] counts of pmap_eval_step).")
  if isinstance(old, jax.core.Tracer):
    return state.replace(class_accuracy=jnp.broadcast_to(accuracy, old.shape).astype(old.dtype))
  return state.replace(class_accuracy=_place_like(_first_row(accuracy, num_classes), old))


def _first_row(x, num_classes: int) -> np.ndarray:
  """A [C] host copy of x ([C], or [n, C] with identical rows), read without a device program."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = x.addressable_data(0)
  return np.asarray(jax.device_get(x)).reshape(-1, num_classes)[0]


def _place_like(row: np.ndarray, like: jax.Array) -> jax.Array:
  """`row` broadcast to `like`'s shape, with `like`'s dtype and sharding (any process count)."""
  full = np.broadcast_to(row.astype(like.dtype), like.shape)
  sharding = getattr(like, "sharding", None)
  if sharding is None:
    return jnp.asarray(full)
  shards = [jax.device_put(full[index], device)
            for device, index in sharding.addressable_devices_indices_map(like.shape).items()]
  return jax.make_array_from_single_device_arrays(like.shape, sharding, shards)
