"""Stage 2: classifier re-training on a frozen backbone (LAS, cRT, LWS) as pure functions.

Two-stage training (METHOD.md "Two-stage training"; Kang et al., ICLR 2020,
"Decoupling Representation and Classifier"): stage 1 learns the whole network
(here with Difficulty-Net or a baseline); stage 2 freezes everything but the
final classifier layer (the Dense named "classifier" in this package's models)
and re-trains the decision boundary for a few epochs with class-balanced
sampling. Three variants:

  las   label-aware smoothing (Zhong et al., "Improving Calibration for
        Long-Tailed Recognition" (MiSLAS), CVPR 2021): the stage-1 classifier
        layer and per-class logit scales f (as MiSLAS's stage 2 trains them
        together) on the LAS loss below.
  crt   classifier re-training (Kang et al. 2020): a re-initialised classifier
        layer on plain cross-entropy.
  lws   learnable weight scaling (Kang et al. 2020): the stage-1 classifier
        layer stays fixed; only the per-class scales f of `logits * f` train.

Label-aware smoothing. With n_c the training images of class c, n_max / n_min
the largest / smallest class and (eps_head, eps_tail) the smoothing of the
head / tail class, the concave profile of MiSLAS is

    eps_c = eps_tail + (eps_head - eps_tail) * sin(pi/2 * (n_c - n_min) / (n_max - n_min)),

so head classes are smoothed most. An example of class y gets the target

    off_target="uniform" (default):  q = (1 - eps_y) one_hot(y) + eps_y / C
    off_target="others":             q_y = 1 - eps_y,  q_k = eps_y / (C - 1) for k != y

and the loss is the cross-entropy with q, l = -sum_k q_k log p_k. "uniform"
spreads eps_y over all C classes (the true class keeps 1 - eps_y + eps_y / C);
it is what MiSLAS's public code computes ((1 - eps) NLL + eps * mean_k(-log p_k)).
"others" spreads it over the other C - 1 classes, which is how we recall the
paper's equation; we could not check the paper's text from here, so the public
code's form is the default and the other is a documented option.

All functions are pure and jit-able; `stage2_step` returns
`(new_state, metrics)` like `dnet_jax.steps`, and the frozen backbone is data in
the state, never differentiated.
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from dnet_jax import difficulty as dmath
from dnet_jax import losses
from dnet_jax.apply import apply_classifier
from dnet_jax.meta import pmean_if

STAGE2_METHODS = ("las", "crt", "lws")
LAS_OFF_TARGET = ("uniform", "others")
LAS_RULES = ("cifar", "imagenet")
DEFAULT_HEAD = "classifier"

# Trainable groups: the classifier layer's parameters and the LWS logit scales.
HEAD, SCALES = "head", "scales"


# ---------------------------------------------------------------------------- label-aware smoothing


def las_smoothing_for_imbalance(imbalance_factor: float, rule: str = "cifar") -> tuple[float, float]:
  """(eps_head, eps_tail) of label-aware smoothing for a data set and imbalance factor rho.

  METHOD.md ("Two-stage training"), following MiSLAS's settings:
    cifar:    (0.4, 0.0) for rho > 100, (0.4, 0.1) for rho > 50, (0.3, 0.0) for rho > 20,
              else (0.2, 0.0);   e.g. rho = 100 -> (0.4, 0.1), rho = 50 -> (0.3, 0.0),
              rho = 10 -> (0.2, 0.0) (the inequalities are strict).
    imagenet: (0.3, 0.0) whatever rho.
  """
  if rule == "imagenet":
    return 0.3, 0.0
  if rule != "cifar":
    raise ValueError(f"Unknown LAS rule {rule!r}; choose one of: {', '.join(LAS_RULES)}.")
  rho = float(imbalance_factor)
  if not rho >= 1.0:
    raise ValueError(f"The imbalance factor must be >= 1, got {imbalance_factor!r}.")
  if rho > 100:
    return 0.4, 0.0
  if rho > 50:
    return 0.4, 0.1
  if rho > 20:
    return 0.3, 0.0
  return 0.2, 0.0


def label_aware_epsilons(class_counts, eps_head: float, eps_tail: float) -> np.ndarray:
  """Per-class smoothing eps_c of LAS, concave in n_c (MiSLAS, CVPR 2021):

    eps_c = eps_tail + (eps_head - eps_tail) * sin(pi/2 * (n_c - n_min) / (n_max - n_min)).

  If every class has the same count (no head, no tail) all get eps_head.
  Returns float32 [C] (a host array: the counts are fixed for a run).

  Example: counts (100, 10, 1), (eps_head, eps_tail) = (0.4, 0.1) ->
  (0.4, 0.1 + 0.3 sin(pi/2 * 9/99), 0.1) = (0.4, 0.14269, 0.1).
  """
  n = np.asarray(class_counts, np.float64)
  if n.ndim != 1 or n.size == 0 or np.any(n < 0):
    raise ValueError(f"class_counts must be a 1-D array of non-negative counts, got {class_counts!r}.")
  for name, eps in (("eps_head", eps_head), ("eps_tail", eps_tail)):
    if not 0.0 <= float(eps) < 1.0:
      raise ValueError(f"{name} must lie in [0, 1), got {eps!r}.")
  span = n.max() - n.min()
  ratio = (n - n.min()) / span if span > 0 else np.ones_like(n)
  eps = float(eps_tail) + (float(eps_head) - float(eps_tail)) * np.sin(0.5 * math.pi * ratio)
  return eps.astype(np.float32)


def label_aware_targets(labels: jax.Array, epsilons: jax.Array, num_classes: int,
                        off_target: str = "uniform") -> jax.Array:
  """Smoothed targets q [B, C] of LAS for integer labels [B] and per-class eps [C].

  "uniform": q = (1 - eps_y) one_hot(y) + eps_y / C.
  "others":  q_y = 1 - eps_y, q_k = eps_y / (C - 1) for k != y.
  Each row sums to 1.
  """
  eps = jnp.asarray(epsilons, jnp.float32)[labels][:, None]
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if off_target == "uniform":
    return (1.0 - eps) * one_hot + eps / num_classes
  if off_target == "others":
    if num_classes < 2:
      raise ValueError("off_target='others' needs at least 2 classes.")
    return (1.0 - eps) * one_hot + (eps / (num_classes - 1)) * (1.0 - one_hot)
  raise ValueError(f"Unknown off_target {off_target!r}; choose one of: {', '.join(LAS_OFF_TARGET)}.")


def label_aware_smoothing_loss(logits: jax.Array, labels: jax.Array, epsilons: jax.Array,
                               off_target: str = "uniform") -> jax.Array:
  """Per-example LAS loss l_i = -sum_k q_ik log softmax(z_i)_k (see `label_aware_targets`)."""
  targets = label_aware_targets(labels, epsilons, logits.shape[-1], off_target)
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(targets * log_p, axis=-1)


def make_las_loss_fn(class_counts, eps_head: float, eps_tail: float,
                     off_target: str = "uniform") -> losses.LossFn:
  """`loss_fn(logits, labels) -> [B]` of LAS for a training set with `class_counts`."""
  if off_target not in LAS_OFF_TARGET:
    raise ValueError(f"Unknown off_target {off_target!r}; choose one of: {', '.join(LAS_OFF_TARGET)}.")
  epsilons = jnp.asarray(label_aware_epsilons(class_counts, eps_head, eps_tail))

  def las_loss(logits, labels):
    return label_aware_smoothing_loss(logits, labels, epsilons, off_target)

  return las_loss


# ---------------------------------------------------------------------------- head and trainables


def split_head(params: Mapping[str, Any], head_name: str = DEFAULT_HEAD) -> tuple[dict, Any]:
  """(backbone params, classifier-layer params): the top-level entry `head_name` is the head."""
  if head_name not in params:
    raise ValueError(
        f"The classifier has no top-level parameter entry {head_name!r} to re-train in stage 2; "
        f"its entries are {sorted(params)}. Name the final Dense {head_name!r} or set "
        "stage2.head_name.")
  backbone = {k: v for k, v in params.items() if k != head_name}
  return backbone, params[head_name]


def merge_head(params: Mapping[str, Any], head: Any, head_name: str = DEFAULT_HEAD) -> dict:
  """`params` with its classifier layer replaced by `head`."""
  merged = dict(params)
  merged[head_name] = head
  return merged


def stage2_trainable(method: str, params: Mapping[str, Any], num_classes: int, *,
                     head_name: str = DEFAULT_HEAD, new_head: Any = None,
                     las_scales: bool = True, las_head: bool = True) -> dict:
  """The parameters that stage 2 trains, by method:

    las: {"head": stage-1 classifier layer, "scales": ones(C)} (no scales if
         las_scales=False; no head if las_head=False: LWS scales on the LAS loss,
         the public ImageNet-LT / Places-LT stage 2)
    crt: {"head": new_head}   (a freshly initialised classifier layer; required)
    lws: {"scales": ones(C)}

  Everything else in `params` stays frozen.
  """
  _, head = split_head(params, head_name)
  scales = jnp.ones((num_classes,), jnp.float32)
  if method == "las":
    if not (las_head or las_scales):
      raise ValueError("las with neither the head nor the scales would train nothing.")
    trainable = {HEAD: head} if las_head else {}
    return dict(trainable, **{SCALES: scales}) if las_scales else trainable
  if method == "crt":
    if new_head is None:
      raise ValueError("cRT re-initialises the classifier layer: pass new_head=.")
    if jax.tree.structure(new_head) != jax.tree.structure(head):
      raise ValueError("new_head must have the structure of the stage-1 classifier layer.")
    return {HEAD: new_head}
  if method == "lws":
    return {SCALES: scales}
  raise ValueError(f"Unknown stage-2 method {method!r}; choose one of: {', '.join(STAGE2_METHODS)}.")


def stage2_optimizer(learning_rate, *, momentum: float = 0.9, weight_decay: float = 2e-4,
                     head_lr_factor: float = 1.0, nesterov: bool = False,
                     scales_weight_decay: float = 0.0) -> optax.GradientTransformation:
  """SGD with momentum on the stage-2 trainables, one group each:

    head:   L2 weight decay + SGD at head_lr_factor * learning_rate
            (MiSLAS trains the stage-1 head at 0.2 x the scales' rate next to LWS),
    scales: L2 `scales_weight_decay` (default 0: it pulls the scales to 0; the
            public Difficulty-Net stage 2 uses 1e-4 on CIFAR, C2, 2e-4 / 5e-4 on
            ImageNet-LT / Places-LT) + SGD at learning_rate.

  L2 here is torch's SGD weight decay: g + wd * p before momentum.

  `learning_rate` is a number or a schedule `step -> lr`.
  """
  if callable(learning_rate):
    head_lr = lambda step: head_lr_factor * learning_rate(step)  # noqa: E731
  else:
    head_lr = head_lr_factor * learning_rate
  transforms = {
      HEAD: optax.chain(optax.add_decayed_weights(weight_decay),
                        optax.sgd(head_lr, momentum=momentum, nesterov=nesterov)),
      SCALES: optax.chain(optax.add_decayed_weights(scales_weight_decay),
                          optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov)),
  }

  def labels(trainable):
    return {group: jax.tree.map(lambda _: group, sub) for group, sub in trainable.items()}

  return optax.multi_transform(transforms, labels)


# ---------------------------------------------------------------------------- state and steps


@flax.struct.dataclass
class Stage2State:
  """Everything a stage-2 run depends on, as one pytree.

  Attributes:
    step: stage-2 updates done so far (int32 scalar).
    params: the stage-1 classifier parameters, frozen (its classifier layer is
      used only when stage 2 does not train one, i.e. LWS).
    batch_stats: the stage-1 BatchNorm running statistics (frozen unless shift_bn).
    trainable: {"head": classifier-layer params, "scales": [C]}, a subset by method.
    opt_state: the stage-2 optimizer's state over `trainable`.
    rng: raw uint32 key data.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  trainable: Any
  opt_state: Any
  rng: jax.Array

  def step_key(self) -> jax.Array:
    return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


def create_stage2_state(rng: jax.Array, params, batch_stats, trainable, tx) -> Stage2State:
  """A stage-2 state at step 0 from the stage-1 (params, batch_stats) and the trainables."""
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  return Stage2State(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                     trainable=trainable, opt_state=tx.init(trainable),
                     rng=jnp.asarray(rng, jnp.uint32))


@contextlib.contextmanager
def batchnorm_train_only(pattern: str):
  """Within this context, a Flax linen `nn.BatchNorm` runs in training mode only if its
  module path ("/"-joined names, e.g. "layer4_2/bn1") matches the regular expression
  `pattern` (`re.search`); the others use their running statistics and keep them.

  Used with a model applied in training mode, so that only the matched BatchNorm
  layers are "shifted" (the public Places-LT stage 2 re-estimates only the new
  block's). It only reaches Flax linen BatchNorm modules.
  """
  regex = re.compile(pattern)

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (isinstance(module, nn.BatchNorm) and context.method_name == "__call__"
        and not regex.search("/".join(module.scope.path))):
      # The module object lives for this apply only; evaluation mode for it alone.
      object.__setattr__(module, "use_running_average", True)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    yield


def stage2_logits(model: nn.Module, params, batch_stats, trainable, images, *,
                  head_name: str = DEFAULT_HEAD, train_batchnorm: bool = False,
                  rng: jax.Array | None = None,
                  batchnorm_pattern: str = "") -> tuple[jax.Array, Any]:
  """(logits, batch_stats) of the stage-2 classifier: the frozen network with the trained
  head, then `logits * scales` if scales are trained (LWS: z_c f_c).

  `train_batchnorm=False` (the default) runs BatchNorm on its stored running
  statistics, so the backbone is exactly the stage-1 network in evaluation mode.
  `train_batchnorm=True` with a `batchnorm_pattern` trains only the BatchNorm
  layers whose path matches it (`batchnorm_train_only`).
  """
  if HEAD in trainable:
    params = merge_head(params, trainable[HEAD], head_name)
  context = (batchnorm_train_only(batchnorm_pattern) if train_batchnorm and batchnorm_pattern
             else contextlib.nullcontext())
  with context:
    logits, batch_stats = apply_classifier(model, params, batch_stats, images,
                                           train=train_batchnorm, rng=rng)
  if SCALES in trainable:
    logits = logits * trainable[SCALES].astype(logits.dtype)
  return logits, batch_stats


def stage2_step(state: Stage2State, batch: dict, *, model: nn.Module,
                tx: optax.GradientTransformation, loss_fn: losses.LossFn = losses.cross_entropy,
                head_name: str = DEFAULT_HEAD, shift_bn: bool = False,
                shift_bn_pattern: str = "",
                axis_name: str | None = None) -> tuple[Stage2State, dict]:
  """One stage-2 update: L(trainable) = (1/B) sum_i loss_fn(z_i, y_i), gradient in the
  trainables only, then `tx`. The backbone parameters are never differentiated.

  shift_bn: False (default) keeps BatchNorm in evaluation mode with the frozen
  stage-1 statistics. True is MiSLAS's "shifted BatchNorm": the backbone runs in
  training mode (batch statistics; class-balanced batches) and its running
  statistics are updated; BatchNorm's scale and shift parameters still stay frozen.
  `shift_bn_pattern` (with shift_bn) limits that to the BatchNorm layers whose
  module path matches the regular expression (`batchnorm_train_only`).
  """
  images, labels = batch["image"], batch["label"]
  rng = state.step_key() if shift_bn else None
  if rng is not None and axis_name is not None:
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))

  def loss(trainable):
    logits, new_stats = stage2_logits(model, state.params, state.batch_stats, trainable, images,
                                      head_name=head_name, train_batchnorm=shift_bn, rng=rng,
                                      batchnorm_pattern=shift_bn_pattern)
    per_example = loss_fn(logits, labels)
    return jnp.mean(per_example), (logits, new_stats)

  (value, (logits, new_stats)), grads = jax.value_and_grad(loss, has_aux=True)(state.trainable)
  grads = pmean_if(grads, axis_name)
  updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
  trainable = optax.apply_updates(state.trainable, updates)
  batch_stats = pmean_if(new_stats, axis_name) if shift_bn else state.batch_stats
  metrics = {
      "train_loss": value,
      "ce": jnp.mean(losses.cross_entropy(logits, labels)),
      "batch_accuracy": jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32)),
      "grad_norm": optax.global_norm(grads),
  }
  if SCALES in trainable:
    metrics["scale_min"] = jnp.min(trainable[SCALES])
    metrics["scale_max"] = jnp.max(trainable[SCALES])
  new_state = state.replace(step=state.step + 1, trainable=trainable, batch_stats=batch_stats,
                            opt_state=opt_state)
  return new_state, pmean_if(metrics, axis_name)


def stage2_eval_step(state: Stage2State, batch: dict, *, model: nn.Module, num_classes: int,
                     head_name: str = DEFAULT_HEAD, axis_name: str | None = None) -> dict:
  """Per-class top-1 counts {"correct", "total"} of the stage-2 classifier (eval mode)."""
  logits, _ = stage2_logits(model, state.params, state.batch_stats, state.trainable,
                            batch["image"], head_name=head_name)
  correct, total = dmath.per_class_counts(logits, batch["label"], num_classes, batch.get("mask"))
  counts = {"correct": correct, "total": total}
  return counts if axis_name is None else jax.lax.psum(counts, axis_name)


def make_stage2_loss_fn(method: str, class_counts, *, eps_head: float, eps_tail: float,
                        off_target: str = "uniform") -> losses.LossFn:
  """LAS for "las", plain cross-entropy for "crt" and "lws" (Kang et al. 2020)."""
  if method == "las":
    return make_las_loss_fn(class_counts, eps_head, eps_tail, off_target)
  if method in ("crt", "lws"):
    return losses.cross_entropy
  raise ValueError(f"Unknown stage-2 method {method!r}; choose one of: {', '.join(STAGE2_METHODS)}.")

