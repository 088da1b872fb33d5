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
training mode, as the public code's model does. alpha may be one rate or one per
parameter (parameter groups: theta_hat_k = theta_k - alpha_k g_k, as the public
Places-LT code's lookahead optimizer has the groups of the real one,
ImageNet_Places-LT/train_stage1.py:272-276). That optimizer is SGD with momentum
and weight decay (train_stage1.py:272-285, stepped at 417); the lookahead here is
plain SGD, as METHOD.md defines it. In the public code no gradient flows through
its lookahead (`driver_only` below), so there the choice changes no number.

Three ways to get dL_meta/dphi:
  * `nested`: `jax.grad` of L_meta, whose body calls `jax.grad` for the lookahead
    (reverse-over-reverse). The paper's method; the default.
  * `jvp`: the forward-mode identity
        dL_meta/ds_i = -(1 / B) <grad_theta l_i(theta), alpha v>,
        v = grad_theta_hat CE_meta(theta_hat),
    where all B dot products come from ONE `jax.jvp` of the per-example loss
    vector at theta in direction alpha v; then chain through s -> w -> d -> phi with a
    VJP of the tiny Difficulty-Net. Exactly the same number, computed differently:
    the tests use it as an independent oracle for `nested`.
  * `driver_only`: the public PyTorch code's behaviour. Its weights are detached
    before the lookahead (CIFAR-LT/cifar_train_exaugment.py:163,
    ImageNet_Places-LT/train_stage1.py:339), so the meta cross-entropy never reaches phi and the
    gradient is lambda * grad L_dr alone. No lookahead is computed.

With `axis_name` (under `jax.pmap`), the lookahead gradient is averaged over
devices before it is used and the meta-gradient is averaged at the end; with
pmap's collective semantics (the transpose of psum is psum) this is the exact
gradient of the mean meta-objective over the global batch (tested against a
single device in float64).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
from flax import linen as nn

from dnet_jax import difficulty as dmath
from dnet_jax import losses
from dnet_jax.classifier import as_classifier, checked_logits

META_GRAD_MODES = ("nested", "jvp", "driver_only")


def pmean_if(tree, axis_name: str | None):
  """`jax.lax.pmean(tree, axis_name)`, or `tree` unchanged when axis_name is None."""
  return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def pmean_floating(tree, axis_name: str | None):
  """`pmean_if` of the floating-point leaves only (a model state may hold integer counters)."""
  if axis_name is None:
    return tree
  return jax.tree.map(
      lambda x: jax.lax.pmean(x, axis_name) if jnp.issubdtype(x.dtype, jnp.inexact) else x, tree)


def split_step_rng(rng: jax.Array | None) -> tuple[jax.Array | None, jax.Array | None]:
  """(train_rng, meta_rng): the train key drives the lookahead and the real update alike,
  so both see the same dropout masks; the meta forward pass gets its own key.
  Without a key (a model that draws no random numbers) both are None."""
  if rng is None:
    return None, None
  train_rng, meta_rng = jax.random.split(rng)
  return train_rng, meta_rng


def per_parameter(learning_rate, params):
  """alpha as a pytree shaped like `params`: a scalar alpha is repeated for every
  parameter; a pytree of rates (one per parameter, e.g. parameter groups) is returned as is."""
  if jax.tree_util.treedef_is_leaf(jax.tree.structure(learning_rate)):
    return jax.tree.map(lambda _: learning_rate, params)
  return learning_rate


def scale_by_learning_rate(learning_rate, tree):
  """alpha * tree, leaf by leaf (alpha a scalar or a pytree like `tree`: `per_parameter`)."""
  return jax.tree.map(lambda a, x: (a * x).astype(x.dtype), per_parameter(learning_rate, tree),
                      tree)


def lookahead_params(params, grads, learning_rate):
  """theta_hat = theta - alpha * g: one plain SGD step (no momentum, no weight decay).

  alpha is a scalar or a pytree of per-parameter rates shaped like `params` (each
  parameter group steps at its own rate, as torch.optim.SGD parameter groups do).
  """
  return jax.tree.map(lambda p, step: (p - step).astype(p.dtype), params,
                      scale_by_learning_rate(learning_rate, grads))


def difficulty_of(dnet, dnet_params, class_accuracy):
  """d = g_phi(a) for a linen Difficulty-Net or a function `dnet(dnet_params, a)`."""
  if isinstance(dnet, nn.Module):
    return dnet.apply({"params": dnet_params}, class_accuracy)
  if callable(dnet):
    return dnet(dnet_params, class_accuracy)
  raise TypeError(f"dnet= must be a linen module or a function (dnet_params, class_accuracy) -> "
                  f"difficulty [C]; got {type(dnet).__name__}.")


@dataclasses.dataclass(frozen=True)
class MetaProblem:
  """The fixed parts of the meta-objective: which networks and losses, and how to reduce.

  Attributes:
    model: the classifier f_theta: any model `dnet_jax.classifier.as_classifier`
      accepts (linen, NNX, Equinox, a `Classifier`).
    dnet: Difficulty-Net g_phi, a linen module or a function
      `dnet(dnet_params, class_accuracy) -> difficulty [C]`.
    loss_fn: per-example training loss l_i, `loss_fn(logits, labels) -> [B]`
      (cross-entropy, or Balanced Softmax for Difficulty-Net + BS).
    driver_weight: lambda (0.3 in the paper).
    axis_name: pmap axis to average over, or None on one device.
    remat: wrap every classifier pass in `jax.checkpoint`, so only its inputs
      are kept for the backward passes (less memory, more compute).
    num_classes: C, to check the model's logits against (None: not checked).

  The classifier's logits are cast to (at least) float32 before any loss, so
  losses, weights and the meta-gradient are float32 whatever the model computes in.
  """
  model: Any
  dnet: Any
  loss_fn: Callable[[jax.Array, jax.Array], jax.Array] = losses.cross_entropy
  driver_weight: float = 0.3
  axis_name: str | None = None
  remat: bool = False
  num_classes: int | None = None

  def __post_init__(self):
    object.__setattr__(self, "classifier", as_classifier(self.model))

  def logits(self, params, model_state, images, *, train: bool, rng):
    """(float32-or-wider logits [B, C], new model state) of the classifier."""
    logits, new_state = self.classifier.apply(params, model_state, images, train=train, rng=rng)
    return checked_logits(logits, images.shape[0], self.num_classes, self.classifier.name), new_state

  def difficulty(self, dnet_params, class_accuracy):
    """d = g_phi(a)."""
    return difficulty_of(self.dnet, dnet_params, class_accuracy)

  def class_weights(self, dnet_params, class_accuracy):
    """w = C d / sum d."""
    return dmath.class_weights_from_difficulty(self.difficulty(dnet_params, class_accuracy))

  def _maybe_remat(self, fn):
    return jax.checkpoint(fn) if self.remat else fn

  def per_example_loss(self, params, batch_stats, batch, rng):
    """(l(theta) [B], (logits, new batch_stats)), BatchNorm in training mode."""
    def fn(params):
      logits, new_stats = self.logits(params, batch_stats, batch["image"], train=True, rng=rng)
      return self.loss_fn(logits, batch["label"]), (logits, new_stats)
    return self._maybe_remat(fn)(params)

  def train_loss(self, params, class_weights, batch_stats, batch, rng):
    """L_train(theta, w) = (1/B) sum_i w_{y_i} l_i(theta); aux = (logits, new batch_stats)."""
    per_example, aux = self.per_example_loss(params, batch_stats, batch, rng)
    return losses.weighted_mean(per_example, class_weights, batch["label"]), aux

  def meta_cross_entropy(self, params, batch_stats, meta_batch, rng):
    """Mean cross-entropy on the (balanced) meta batch, BatchNorm in training mode.

    With meta_batch["mask"] (padding = 0, see `dnet_jax.parallel.pad_batch`) it is
    the mean over the real examples of the whole (global) meta batch.
    """
    def fn(params):
      logits, _ = self.logits(params, batch_stats, meta_batch["image"], train=True, rng=rng)
      per_example = losses.cross_entropy(logits, meta_batch["label"])
      return masked_mean(per_example, meta_batch.get("mask"), self.axis_name)
    return self._maybe_remat(fn)(params)


def masked_mean(values: jax.Array, mask: jax.Array | None, axis_name: str | None) -> jax.Array:
  """Mean of `values` over the unmasked examples of the global batch.

  Per device it is n * sum_local(mask * v) / sum_global(mask), so that the
  `pmean` the steps apply over n devices gives sum_global(mask * v) / sum_global(mask).
  """
  if mask is None:
    return jnp.mean(values)
  mask = mask.astype(values.dtype)
  count = jnp.sum(mask)
  devices = 1.0
  if axis_name is not None:
    count = jax.lax.psum(count, axis_name)
    devices = jax.lax.psum(1.0, axis_name)
  return devices * jnp.sum(mask * values) / jnp.maximum(count, 1.0)


@flax.struct.dataclass
class MetaInputs:
  """The per-step data of the meta-objective: a pytree of arrays.

  Attributes:
    params: classifier parameters theta.
    batch_stats: the model state (any pytree; {} or () if none).
    class_accuracy: a [C].
    batch: train batch {"image", "label"[, ...]} (any pytree with `labels` given).
    meta_batch: meta batch {"image", "label"[, "mask"]}.
    learning_rate: alpha of the lookahead: a scalar, or a pytree of per-parameter
      rates shaped like `params` (`lookahead_params`).
    rng: the step's key, or None for a model that draws no random numbers.
    labels: y [B] when `batch` is not a dict with "label".
  """
  params: Any
  batch_stats: Any
  class_accuracy: jax.Array
  batch: Any
  meta_batch: Any
  learning_rate: jax.Array
  rng: Any = None
  labels: Any = None

  @property
  def train_labels(self) -> jax.Array:
    return self.batch["label"] if self.labels is None else self.labels


class TrainForward(NamedTuple):
  """The classifier's forward pass on the train batch at theta, kept for reuse.

  `vjp(c)` returns (sum_i c_i grad_theta l_i,): with c = s / B it is the gradient
  of L_train for any per-example weights s. The lookahead (old weights), the
  meta-gradient (differentiating through it) and the real update (new weights)
  all reuse this one forward pass: L_train is linear in the weights.
  """
  per_example: jax.Array
  vjp: Callable
  logits: jax.Array
  batch_stats: Any


def train_forward(problem: MetaProblem, params, batch_stats, batch, rng) -> TrainForward:
  """Runs the classifier once on the train batch (BatchNorm in training mode)."""
  per_example, vjp_fn, (logits, new_stats) = jax.vjp(
      lambda p: problem.per_example_loss(p, batch_stats, batch, rng), params, has_aux=True)
  return TrainForward(per_example, vjp_fn, logits, new_stats)


def weighted_gradient(forward: TrainForward, class_weights, labels, axis_name=None):
  """grad_theta L_train(theta, w) = (1/B) sum_i w_{y_i} grad l_i, averaged over axis_name."""
  cotangent = (class_weights[labels] / labels.shape[0]).astype(forward.per_example.dtype)
  return pmean_if(forward.vjp(cotangent)[0], axis_name)


def meta_objective(problem: MetaProblem, dnet_params, inputs: MetaInputs):
  """L_meta(phi) for the local batch, written out literally; returns (value, aux).

  The lookahead gradient inside is itself a `jax.grad`, so `jax.grad` of this
  function is the nested (second-order) meta-gradient. This is the reference
  definition: finite differences of it are the tests' ground truth.
  """
  train_rng, meta_rng = split_step_rng(inputs.rng)
  difficulty = problem.difficulty(dnet_params, inputs.class_accuracy)
  weights = dmath.class_weights_from_difficulty(difficulty)

  def train_loss(params):
    per_example, _ = problem.per_example_loss(params, inputs.batch_stats, inputs.batch, train_rng)
    value = losses.weighted_mean(per_example, weights, inputs.train_labels)
    return value, value

  grads, train_loss_value = jax.grad(train_loss, has_aux=True)(inputs.params)
  grads = pmean_if(grads, problem.axis_name)
  theta_hat = lookahead_params(inputs.params, grads, inputs.learning_rate)
  meta_ce = problem.meta_cross_entropy(theta_hat, inputs.batch_stats, inputs.meta_batch, meta_rng)
  drv = dmath.driver_loss(difficulty, inputs.class_accuracy)
  value = meta_ce + problem.driver_weight * drv
  return value, {"meta_ce": meta_ce, "driver_loss": drv, "lookahead_train_loss": train_loss_value}


def reference_nested_meta_gradient(problem: MetaProblem, dnet_params, inputs: MetaInputs):
  """`jax.grad(meta_objective)`: the literal nested form, recomputing every pass."""
  grads, aux = jax.grad(meta_objective, argnums=1, has_aux=True)(problem, dnet_params, inputs)
  return pmean_if(grads, problem.axis_name), aux


def nested_meta_gradient(problem: MetaProblem, dnet_params, inputs: MetaInputs,
                         forward: TrainForward | None = None):
  """dL_meta/dphi by `jax.grad` through the lookahead gradient (reverse-over-reverse).

  The lookahead gradient is the VJP of the shared train forward pass with
  cotangent w(phi)[y] / B; `jax.grad` differentiates through that VJP (which
  XLA runs as one tangent pass over the saved activations), so no classifier
  pass is recomputed. Equals `reference_nested_meta_gradient` (tested).
  """
  train_rng, meta_rng = split_step_rng(inputs.rng)
  if forward is None:
    forward = train_forward(problem, inputs.params, inputs.batch_stats, inputs.batch, train_rng)
  labels = inputs.train_labels

  def objective(phi):
    difficulty = problem.difficulty(phi, inputs.class_accuracy)
    weights = dmath.class_weights_from_difficulty(difficulty)
    grads = weighted_gradient(forward, weights, labels, problem.axis_name)
    theta_hat = lookahead_params(inputs.params, grads, inputs.learning_rate)
    meta_ce = problem.meta_cross_entropy(theta_hat, inputs.batch_stats, inputs.meta_batch, meta_rng)
    drv = dmath.driver_loss(difficulty, inputs.class_accuracy)
    train_loss = losses.weighted_mean(forward.per_example, weights, labels)
    return meta_ce + problem.driver_weight * drv, {
        "meta_ce": meta_ce, "driver_loss": drv, "lookahead_train_loss": train_loss}

  grads, aux = jax.grad(objective, has_aux=True)(dnet_params)
  return pmean_if(grads, problem.axis_name), aux


def jvp_meta_gradient(problem: MetaProblem, dnet_params, inputs: MetaInputs,
                      forward: TrainForward | None = None):
  """dL_meta/dphi by the forward-mode identity (see the module docstring).

    dL/ds_i = -(1 / B) (J A v)_i,   J = d l / d theta [B x P],   v = grad CE_meta(theta_hat),
    dL/dw_c = sum_{i: y_i = c} dL/ds_i,   dL/dphi = VJP_{phi -> w}(dL/dw) + lambda dL_dr/dphi.

  with A = alpha I, or the diagonal of per-parameter rates (`lookahead_params`).
  J A v is ONE `jax.jvp` of the per-example loss vector at theta in direction A v.
  Without `forward` the function computes everything afresh (the tests' oracle);
  with it, J v is the transpose of the shared forward's VJP (no new forward pass).
  """
  train_rng, meta_rng = split_step_rng(inputs.rng)
  labels = inputs.train_labels
  batch_size = labels.shape[0]
  num_classes = inputs.class_accuracy.shape[-1]

  def per_example(params):
    return problem.per_example_loss(params, inputs.batch_stats, inputs.batch, train_rng)[0]

  difficulty, difficulty_vjp = jax.vjp(
      lambda phi: problem.difficulty(phi, inputs.class_accuracy), dnet_params)
  weights, weights_vjp = jax.vjp(dmath.class_weights_from_difficulty, difficulty)
  shared = forward is not None
  if not shared:
    per_example_values, vjp_fn = jax.vjp(per_example, inputs.params)
    forward = TrainForward(per_example_values, vjp_fn, None, None)
  grads = weighted_gradient(forward, weights, labels, problem.axis_name)
  theta_hat = lookahead_params(inputs.params, grads, inputs.learning_rate)
  meta_ce, v = jax.value_and_grad(problem.meta_cross_entropy)(
      theta_hat, inputs.batch_stats, inputs.meta_batch, meta_rng)
  direction = scale_by_learning_rate(inputs.learning_rate, pmean_if(v, problem.axis_name))
  if shared:
    (jv,) = jax.linear_transpose(forward.vjp, forward.per_example)((direction,))
  else:
    _, jv = jax.jvp(per_example, (inputs.params,), (direction,))
  d_sample_weights = -jv / batch_size
  d_weights = jax.ops.segment_sum(d_sample_weights, labels, num_segments=num_classes)
  (d_difficulty,) = weights_vjp(d_weights.astype(weights.dtype))
  drv, d_driver = jax.value_and_grad(dmath.driver_loss)(difficulty, inputs.class_accuracy)
  (grads_phi,) = difficulty_vjp(d_difficulty + problem.driver_weight * d_driver)
  aux = {"meta_ce": meta_ce, "driver_loss": drv,
         "lookahead_train_loss": losses.weighted_mean(forward.per_example, weights, labels)}
  return pmean_if(grads_phi, problem.axis_name), aux


def driver_only_meta_gradient(problem: MetaProblem, dnet_params, inputs: MetaInputs,
                              forward: TrainForward | None = None):
  """The public code's effective gradient: lambda * grad_phi L_dr; no lookahead."""
  del forward  # the classifier plays no part
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


def check_meta_grad_mode(mode: str) -> None:
  """Raises a ValueError naming the valid modes if `mode` is not one of them."""
  if mode not in _MODES:
    raise ValueError(f"Unknown meta-gradient mode {mode!r}; choose one of {', '.join(META_GRAD_MODES)}.")


def meta_gradient(mode: str, problem: MetaProblem, dnet_params, inputs: MetaInputs,
                  forward: TrainForward | None = None):
  """dL_meta/dphi (averaged over `problem.axis_name`) and aux scalars, by mode.

  Pass the step's shared `forward` (from `train_forward`) to reuse its forward pass.
  """
  check_meta_grad_mode(mode)
  return _MODES[mode](problem, dnet_params, inputs, forward)
