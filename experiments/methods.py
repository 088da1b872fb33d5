"""Method name -> training step, loss and class weights.

A config names its method (`config.method`); this module turns the name into
the pieces the trainer needs:

  method              step                 per-example loss   class weights w
  difficulty_net      train_step (meta)    cross-entropy      C d / sum d, d = g_phi(a)
  difficulty_net_bs   train_step (meta)    Balanced Softmax   C d / sum d, d = g_phi(a)
  ce                  baseline_step        cross-entropy      1
  class_balanced      baseline_step        cross-entropy      effective number (Cui et al. 2019)
  cdb                 baseline_step        cross-entropy      C (1-a)^tau / sum (CDB, Sinha et al. 2020)
  focal               baseline_step        focal (gamma)      1
  balanced_softmax    baseline_step        Balanced Softmax   1

`validate_config` checks every name-valued field (method, meta_grad,
Difficulty-Net kind, model, dtype, schedule, ...) and raises a ValueError that
lists the valid choices; the trainer calls it before loading data or compiling.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dnet_jax import difficulty as dmath
from dnet_jax import losses
from dnet_jax import steps
from dnet_jax.meta import META_GRAD_MODES
from dnet_jax.models import MODEL_NAMES, build_difficulty_net

METHODS = ("difficulty_net", "difficulty_net_bs", "ce", "class_balanced", "cdb", "focal",
           "balanced_softmax")
DNET_METHODS = ("difficulty_net", "difficulty_net_bs")
DNET_KINDS = ("relative", "absolute")
LR_SCHEDULES = ("step", "cosine", "cosine_epoch", "constant", "public_cifar")
DTYPES = ("float32", "bfloat16", "float16")

_LOSS_OF_METHOD = {
    "difficulty_net": "ce",
    "difficulty_net_bs": "balanced_softmax",
    "ce": "ce",
    "class_balanced": "ce",
    "cdb": "ce",
    "focal": "focal",
    "balanced_softmax": "balanced_softmax",
}


def _choice_error(field: str, value: Any, choices) -> ValueError:
  return ValueError(f"Unknown {field} {value!r}; choose one of: {', '.join(choices)}.")


def parse_cdb_tau(tau: Any) -> float | str:
  """CDB's tau from a config value: "dynamic", or a number (also given as a string)."""
  if isinstance(tau, str):
    if tau.strip().lower() == "dynamic":
      return "dynamic"
    try:
      return float(tau)
    except ValueError:
      raise ValueError(f"cdb_tau must be 'dynamic' or a number, got {tau!r}.") from None
  if isinstance(tau, (int, float)) and not isinstance(tau, bool):
    return float(tau)
  raise ValueError(f"cdb_tau must be 'dynamic' or a number, got {tau!r}.")


def validate_config(config) -> None:
  """Raises ValueError on an unknown name or an impossible setting; cheap, compiles nothing."""
  if config.method not in METHODS:
    raise _choice_error("method", config.method, METHODS)
  if config.meta_grad not in META_GRAD_MODES:
    raise _choice_error("meta_grad", config.meta_grad, META_GRAD_MODES)
  if config.dnet.kind not in DNET_KINDS:
    raise _choice_error("dnet.kind", config.dnet.kind, DNET_KINDS)
  if config.model not in MODEL_NAMES:
    raise _choice_error("model", config.model, MODEL_NAMES)
  if config.dtype not in DTYPES:
    raise _choice_error("dtype", config.dtype, DTYPES)
  if config.lr_schedule not in LR_SCHEDULES:
    raise _choice_error("lr_schedule", config.lr_schedule, LR_SCHEDULES)
  if config.method == "cdb":
    parse_cdb_tau(config.cdb_tau)
  for field in ("num_epochs", "batch_size", "eval_batch_size", "log_every_steps",
                "checkpoint_every_epochs", "max_checkpoints_to_keep"):
    if int(config[field]) < 1:
      raise ValueError(f"{field} must be >= 1, got {config[field]}.")
  if config.method in DNET_METHODS and int(config.meta_batch_size) < 1:
    raise ValueError(f"meta_batch_size must be >= 1, got {config.meta_batch_size}.")
  if int(config.meta_interval) < 1:
    raise ValueError(f"meta_interval must be >= 1 (1 = every step), got {config.meta_interval}.")
  if int(config.max_steps) < 0:
    raise ValueError(f"max_steps must be >= 0 (0 = no limit), got {config.max_steps}.")


@dataclasses.dataclass(frozen=True)
class Method:
  """What the trainer needs to know about a method.

  Attributes:
    name: the config name.
    uses_dnet: True for the Difficulty-Net methods (meta batches, `train_step`).
    loss_fn: per-example training loss `(logits, labels) -> [B]`.
    class_weights_fn: baselines only: `a -> w` (None = uniform weights).
    dnet: the Difficulty-Net module (Difficulty-Net methods only).
  """
  name: str
  uses_dnet: bool
  loss_fn: losses.LossFn
  class_weights_fn: Callable[[jax.Array], jax.Array] | None = None
  dnet: Any = None


def build_method(config, class_counts: np.ndarray, num_classes: int) -> Method:
  """The `Method` that `config.method` names, for a train set with `class_counts`."""
  validate_config(config)
  name = config.method
  loss_fn = losses.make_loss_fn(_LOSS_OF_METHOD[name], class_counts=class_counts,
                                focal_gamma=float(config.focal_gamma))
  if name in DNET_METHODS:
    dnet = build_difficulty_net(num_classes, kind=config.dnet.kind,
                                hidden=tuple(config.dnet.hidden),
                                use_bias=bool(config.dnet.use_bias))
    return Method(name, True, loss_fn, dnet=dnet)
  weights_fn = None
  if name == "class_balanced":
    fixed = dmath.class_balanced_weights(jnp.asarray(class_counts), float(config.cb_beta))
    weights_fn = lambda a: fixed  # noqa: E731 (fixed weights: ignore the accuracy)
  elif name == "cdb":
    tau = parse_cdb_tau(config.cdb_tau)
    weights_fn = functools.partial(dmath.cdb_weights, tau=tau)
  return Method(name, False, loss_fn, class_weights_fn=weights_fn)


def make_step_fn(method: Method, config, *, model, tx, dnet_tx, learning_rate, axis_name,
                 update_dnet: bool = True, lookahead_scale=None):
  """The pure step `(state, batch, meta_batch) -> (state, metrics)` of this method.

  Baselines ignore `meta_batch` (the trainer passes None and draws none).
  `update_dnet=False` gives the Difficulty-Net step without its meta update, which
  the trainer runs between meta updates when `config.meta_interval` > 1.
  `lookahead_scale`: per-parameter multipliers of the lookahead's rate (parameter groups).
  """
  if method.uses_dnet:
    step = functools.partial(
        steps.train_step, model=model, dnet=method.dnet, tx=tx, dnet_tx=dnet_tx,
        learning_rate=learning_rate, loss_fn=method.loss_fn,
        driver_weight=float(config.driver_weight), meta_grad=config.meta_grad,
        remat=bool(config.remat), update_dnet=update_dnet,
        batch_mean=config.get("loss_weighting", "per_example") == "batch_mean",
        lookahead_scale=lookahead_scale, axis_name=axis_name)
    return step
  baseline = functools.partial(
      steps.baseline_step, model=model, tx=tx, class_weights_fn=method.class_weights_fn,
      loss_fn=method.loss_fn, axis_name=axis_name)
  return lambda state, batch, meta_batch=None: baseline(state, batch)


def difficulty_and_weights(method: Method, dnet_params, class_accuracy):
  """(difficulty d, class weights w) that the method uses given the accuracy vector a.

  Difficulty-Net methods: the learned d = g_phi(a) and w = C d / sum d.
  Baselines: the measured difficulty 1 - a and their own (possibly fixed) weights.
  """
  if method.uses_dnet:
    d = method.dnet.apply({"params": dnet_params}, class_accuracy)
    return d, dmath.class_weights_from_difficulty(d)
  d = 1.0 - class_accuracy
  if method.class_weights_fn is None:
    return d, jnp.ones_like(class_accuracy)
  return d, method.class_weights_fn(class_accuracy)
