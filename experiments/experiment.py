"""The experiment builder: a config and a `Dataset` -> what the loop trains (`Experiment`).

`build(config, dataset)` gives stage 1 (Difficulty-Net or a baseline);
`build_stage2(config, dataset, params, batch_stats)` gives a classifier
re-training (LAS, cRT, LWS) of a stage-1 network, which `experiments/stage2.py`
restores into the abstract state and identity that `build` gives for the
stage-1 config. The compiled steps come from `dnet_jax.parallel`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp

from dnet_jax import optim
from dnet_jax import parallel
from dnet_jax import schedules
from dnet_jax import stage2 as s2
from dnet_jax import steps
from dnet_jax.apply import init_classifier
from dnet_jax.models import build_classifier
from dnet_jax.state import create_train_state
from experiments import checkpoint_records
from experiments import errors
from experiments import methods
from experiments import pretrained_init
from experiments import sampling

AXIS = parallel.AXIS_NAME
# fold_in tags of the augmentation keys (distinct from the steps' own dropout keys).
_AUGMENT_STREAM = 0x617567
_STAGE2_AUGMENT_STREAM = 0x533241
_HEAD_INIT_STREAM = 0x533249


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything the loop calls (states are replicated over the local devices).

  Attributes:
    name: the method, as logs and the checkpoint identity name it.
    uses_meta: the train step takes a meta batch.
    sampler: the dataset's training order (a name or a `sampling.Sampler`).
    batch_size: global training batch size.
    steps_per_epoch, total_steps: of this run.
    schedule: the classifier's learning rate as a function of the step.
    schedule_fields: the config fields the schedule depends on; a resumed run must match.
    abstract_state: shapes of the (unreplicated) state.
    init_state: () -> a new run's state.
    train_step: (state, batch, meta batch or None) -> (state, metrics).
    eval_step: (state, batch) -> per-class {"correct", "total"} summed over devices.
    refresh: (state, class accuracy a) -> state, at every epoch end (and before the
      first step when `refresh_at` is "epoch_start").
    describe: (state, a) -> what an evaluation record adds (difficulty, class weights, ...).
    identity: what a checkpoint must match to be resumed (`checkpoint_records.run_identity`).
    non_finite_advice: what to change after a NaN/Inf.
    refresh_at: "epoch_end" or "epoch_start" (`config.refresh_at`; the loop reads it).
  """
  name: str
  uses_meta: bool
  sampler: str
  batch_size: int
  steps_per_epoch: int
  total_steps: int
  schedule: Callable
  schedule_fields: dict
  abstract_state: Any
  init_state: Callable[[], Any]
  train_step: Callable
  eval_step: Callable
  refresh: Callable
  describe: Callable
  identity: dict
  non_finite_advice: str
  refresh_at: str = "epoch_end"


def total_steps(num_epochs: int, steps_per_epoch: int, max_steps: int) -> int:
  total = int(num_epochs) * steps_per_epoch
  return min(total, int(max_steps)) if int(max_steps) > 0 else total


def learning_rate_schedule(config, steps_per_epoch: int):
  """The classifier's learning rate as a function of the step (`config.lr_schedule`).

  The cosine schedules span `num_epochs` (not `max_steps`), so that stopping a
  run early never changes the learning rates of the steps it does take.
  "cosine_epoch" is 0.5 lr (1 + cos(pi e / num_epochs)) for the whole epoch e, the
  public ImageNet-LT code's rule (ImageNet_Places-LT/train_stage1.py:557-564, set at
  the start of every epoch; `schedules.per_epoch_cosine_schedule`).
  """
  base = float(config.learning_rate)
  if config.lr_schedule == "step":
    return optim.warmup_step_schedule(base, steps_per_epoch, int(config.warmup_epochs),
                                      tuple(config.lr_decay_epochs), float(config.lr_decay_factor))
  if config.lr_schedule == "cosine_epoch":
    return schedules.per_epoch_cosine_schedule(steps_per_epoch, base, int(config.num_epochs))
  if config.lr_schedule == "cosine":
    return optim.cosine_schedule(base, int(config.num_epochs) * steps_per_epoch,
                                 int(config.warmup_epochs) * steps_per_epoch)
  if config.lr_schedule == "public_cifar":
    return schedules.public_cifar_stage1_schedule(
        steps_per_epoch, base, int(config.get("lr_ramp_epochs", 400)),
        tuple(int(e) for e in config.lr_decay_epochs), float(config.lr_decay_factor))
  return lambda step: jnp.full((), base, jnp.float32)


def _schedule_fields(config, steps_per_epoch: int) -> dict:
  fields = {"lr_schedule": config.lr_schedule, "learning_rate": float(config.learning_rate),
            "steps_per_epoch": steps_per_epoch}
  if config.lr_schedule == "cosine":
    fields.update(num_epochs=int(config.num_epochs), warmup_epochs=int(config.warmup_epochs))
  elif config.lr_schedule == "cosine_epoch":
    fields.update(num_epochs=int(config.num_epochs))
  elif config.lr_schedule in ("step", "public_cifar"):
    fields.update(warmup_epochs=int(config.warmup_epochs),
                  lr_decay_epochs=[int(e) for e in config.lr_decay_epochs],
                  lr_decay_factor=float(config.lr_decay_factor))
  groups = param_groups(config)
  if groups:  # per-group rates are part of the schedule a resumed run must keep
    fields["param_groups"] = {name: [list(p), m] for name, (p, m) in groups.items()}
  return fields


def model_options(config) -> dict:
  """`config.model_kwargs` as keyword arguments of `build_classifier` (head, surgery, ...)."""
  options = config.get("model_kwargs", None)
  return dict(options.to_dict() if hasattr(options, "to_dict") else (options or {}))


def param_groups(config) -> dict:
  """`config.param_groups` as {name: (patterns, learning-rate multiplier)}."""
  groups = config.get("param_groups", None)
  groups = groups.to_dict() if hasattr(groups, "to_dict") else dict(groups or {})
  return {name: (tuple(patterns), float(multiplier))
          for name, (patterns, multiplier) in groups.items()}


def classifier_optimizer(config, schedule):
  """SGD (momentum, L2 weight decay, Nesterov as configured) at `schedule`, or per group.

  With `config.param_groups` = {name: (patterns, m)}, the parameters of group `name`
  train at m x schedule(step) and the others at schedule(step)
  (`optim.parameter_group_optimizer`), as torch.optim.SGD parameter groups whose
  rates one schedule scales together (the public Places-LT code,
  ImageNet_Places-LT/train_stage1.py:266-271 and 557-581).
  """
  options = dict(momentum=float(config.momentum), weight_decay=float(config.weight_decay),
                 nesterov=bool(config.nesterov))
  groups = param_groups(config)
  if not groups:
    return optim.classifier_optimizer(schedule, **options)
  scaled = {name: (patterns, _scaled(schedule, multiplier))
            for name, (patterns, multiplier) in groups.items()}
  return optim.parameter_group_optimizer(scaled, default_learning_rate=schedule, **options)


def _scaled(schedule, factor: float):
  return lambda step: factor * schedule(step)


def _preprocessed(batch, fn, key):
  return {"image": fn(key, batch["image"]), "label": batch["label"]}


def _augment_keys(state, stream: int):
  key = jax.random.fold_in(state.step_key(), stream)
  key = jax.random.fold_in(key, jax.lax.axis_index(AXIS))  # different crops per device
  return jax.random.split(key)


def _per_device_step(step_fn, preprocessors, stream: int):
  """`(state, batch, meta) -> (state, metrics)`: on-device preprocessing, then `step_fn`."""
  train_pre, meta_pre, _ = preprocessors

  def train_fn(state, batch, meta_batch):
    train_key, meta_key = _augment_keys(state, stream)
    meta = None if meta_batch is None else _preprocessed(meta_batch, meta_pre, meta_key)
    return step_fn(state, _preprocessed(batch, train_pre, train_key), meta)
  return train_fn


def _pmapped_eval(eval_fn, preprocessors):
  eval_pre = preprocessors[2]
  return parallel.pmap_step(
      lambda state, batch: eval_fn(state, dict(batch, image=eval_pre(None, batch["image"]))),
      donate=False)


def _replicated_refresh(state, class_accuracy):
  return state.replace(class_accuracy=parallel.replicate(jnp.asarray(class_accuracy)))


def build(config, dataset) -> Experiment:
  """Stage 1: the method `config.method` names, trained on `dataset`."""
  num_classes = dataset.num_classes
  method = methods.build_method(config, dataset.class_counts, num_classes)
  model = build_classifier(
      config.model, num_classes, bn_axis_name=AXIS if config.sync_batchnorm else None,
      dtype=jnp.dtype(config.dtype), **model_options(config))
  spe = dataset.steps_per_epoch
  schedule = learning_rate_schedule(config, spe)
  tx = classifier_optimizer(config, schedule)
  dnet_tx = (optim.dnet_optimizer(float(config.dnet.lr), float(config.dnet.weight_decay))
             if method.uses_dnet else None)
  make_state = functools.partial(
      create_train_state, model=model, tx=tx,
      sample_images=jnp.zeros((1,) + tuple(dataset.image_shape), jnp.float32),
      num_classes=num_classes, dnet=method.dnet, dnet_tx=dnet_tx)
  abstract_state = jax.eval_shape(make_state, jax.random.key(0))  # traces, compiles nothing

  def init_state():
    state = jax.jit(make_state)(jax.random.key(int(config.seed)))
    path = str(config.get("pretrained_path", "") or "")
    if not path:
      return state
    new_names, dropped_names = pretrained_init.surgery_names(model)
    return pretrained_init.load_into_state(state, path, tx, new_names=new_names,
                                           dropped_names=dropped_names)

  groups = param_groups(config)
  # With parameter groups the lookahead steps each group at its own rate, as the public
  # code's lookahead optimizer does (ImageNet_Places-LT/train_stage1.py:272-276).
  lookahead_scale = (optim.parameter_group_multipliers(abstract_state.params, groups)
                     if groups else None)

  def pmapped(update_dnet: bool):
    step_fn = methods.make_step_fn(method, config, model=model, tx=tx, dnet_tx=dnet_tx,
                                   learning_rate=schedule, axis_name=AXIS,
                                   update_dnet=update_dnet, lookahead_scale=lookahead_scale)
    return parallel.pmap_step(_per_device_step(step_fn, dataset.preprocessors, _AUGMENT_STREAM))

  interval = int(config.meta_interval) if method.uses_dnet else 1
  # meta_interval k > 1: the meta update runs on steps with step % k == 0 only, the others
  # run a separately compiled step without it (chosen on the host by MetaIntervalStep).
  train_step = (parallel.MetaIntervalStep(pmapped(True), pmapped(False), interval)
                if interval > 1 else pmapped(True))
  eval_step = _pmapped_eval(functools.partial(steps.eval_step, model=model,
                                              num_classes=num_classes, axis_name=AXIS),
                            dataset.preprocessors)
  diff_and_weights = jax.jit(functools.partial(methods.difficulty_and_weights, method))

  def describe(p_state, class_accuracy):
    d, w = jax.device_get(diff_and_weights(parallel.unreplicate(p_state.dnet_params),
                                           jnp.asarray(class_accuracy)))
    return {"difficulty": [float(x) for x in d], "class_weights": [float(x) for x in w]}

  advice = f"Lower the learning rate (learning_rate={config.learning_rate}) or check the data"
  if config.dtype != "float32":
    advice += f", or compute in float32 (dtype={config.dtype})"
  return Experiment(
      name=method.name, uses_meta=method.uses_dnet, sampler="instance",
      batch_size=int(config.batch_size), steps_per_epoch=spe,
      total_steps=total_steps(config.num_epochs, spe, config.max_steps), schedule=schedule,
      schedule_fields=_schedule_fields(config, spe), abstract_state=abstract_state,
      init_state=init_state, train_step=train_step, eval_step=eval_step,
      refresh=_replicated_refresh, describe=describe,
      identity=checkpoint_records.run_identity(
          model=config.model, num_classes=num_classes, method=method.name,
          image_shape=dataset.image_shape, abstract_state=abstract_state),
      non_finite_advice=advice, refresh_at=str(config.get("refresh_at", "epoch_end")))


def las_smoothing(config) -> tuple[float, float]:
  """(eps_head, eps_tail): explicit stage2.las_eps_* if both >= 0, else by stage2.las_rule."""
  s = config.stage2
  if float(s.las_eps_head) >= 0 and float(s.las_eps_tail) >= 0:
    return float(s.las_eps_head), float(s.las_eps_tail)
  return s2.las_smoothing_for_imbalance(float(config.data.imbalance_factor), s.las_rule)


def stage2_sampler(config) -> sampling.Sampler:
  """The stage-2 training order (`stage2.sampler`, samples_per_class, iterations_per_epoch)."""
  s = config.stage2
  return sampling.Sampler(str(s.sampler), int(s.get("samples_per_class", 4)),
                          int(s.get("iterations_per_epoch", 0)))


def stage2_schedule(config, steps_per_epoch: int):
  """`stage2.lr_schedule`: "cosine" (per step, over num_epochs) or "per_epoch_cosine"
  (0.5 lr (1 + cos(pi e / num_epochs)) in epoch e, `schedules.per_epoch_cosine_schedule`)."""
  s = config.stage2
  kind = str(s.get("lr_schedule", "cosine"))
  if kind == "per_epoch_cosine":
    return schedules.per_epoch_cosine_schedule(steps_per_epoch, float(s.learning_rate),
                                               int(s.num_epochs))
  return optim.cosine_schedule(float(s.learning_rate), int(s.num_epochs) * steps_per_epoch)


def _stage2_preprocessors(config, dataset):
  """(train, meta, eval): the stage-1 training transform, or none (`stage2.train_transform`)."""
  train, meta, evaluate = dataset.preprocessors
  if str(config.stage2.get("train_transform", "stage1")) == "test":
    train = evaluate
  return train, meta, evaluate


def _check_shift_bn_pattern(config, batch_stats) -> None:
  """InvalidInputError if `stage2.shift_bn_only` matches no BatchNorm of the network."""
  s = config.stage2
  pattern = str(s.get("shift_bn_only", ""))
  if not (bool(s.shift_bn) and pattern):
    return
  paths = sorted({"/".join(str(getattr(k, "key", k)) for k in path[:-1])
                  for path, _ in jax.tree_util.tree_leaves_with_path(batch_stats or {})})
  if not any(re.search(pattern, p) for p in paths):
    raise errors.InvalidInputError(
        f"stage2.shift_bn_only={pattern!r} matches no BatchNorm layer of {config.model}; its "
        f"BatchNorm layers are {', '.join(paths[:8])}{', ...' if len(paths) > 8 else ''}.")


def build_stage2(config, dataset, params, batch_stats) -> Experiment:
  """Stage 2 (`config.stage2.method`) on the stage-1 network (params, batch_stats)."""
  s, num_classes = config.stage2, dataset.num_classes
  model = build_classifier(config.model, num_classes, dtype=jnp.dtype(config.dtype),
                           **model_options(config))
  head_name = str(s.head_name)
  s2.split_head(params, head_name)  # a clear error if the network has no such layer
  eps_head, eps_tail = las_smoothing(config)
  loss_fn = s2.make_stage2_loss_fn(s.method, dataset.class_counts, eps_head=eps_head,
                                   eps_tail=eps_tail, off_target=s.las_off_target)
  _check_shift_bn_pattern(config, batch_stats)
  sampler = stage2_sampler(config)
  spe = dataset.steps_for(sampler)
  schedule = stage2_schedule(config, spe)
  tx = s2.stage2_optimizer(schedule, momentum=float(s.momentum), weight_decay=float(s.weight_decay),
                           head_lr_factor=float(s.head_lr_factor) if s.method == "las" else 1.0,
                           scales_weight_decay=float(s.get("scales_weight_decay", 0.0)))
  sample = jnp.zeros((1,) + tuple(dataset.image_shape), jnp.float32)
  key = jax.random.key(int(config.seed))

  def make_state(key, params, batch_stats):
    new_head = None
    if s.method == "crt":
      fresh, _ = init_classifier(model, jax.random.fold_in(key, _HEAD_INIT_STREAM), sample)
      new_head = s2.split_head(fresh, head_name)[1]
    trainable = s2.stage2_trainable(s.method, params, num_classes, head_name=head_name,
                                    new_head=new_head, las_scales=bool(s.las_scales),
                                    las_head=bool(s.get("las_head", True)))
    return s2.create_stage2_state(key, params, batch_stats, trainable, tx)

  abstract_state = jax.eval_shape(make_state, key, params, batch_stats)
  step_fn = functools.partial(s2.stage2_step, model=model, tx=tx, loss_fn=loss_fn,
                              head_name=head_name, shift_bn=bool(s.shift_bn),
                              shift_bn_pattern=str(s.get("shift_bn_only", "")), axis_name=AXIS)
  train_step = parallel.pmap_step(_per_device_step(
      lambda state, batch, meta: step_fn(state, batch), _stage2_preprocessors(config, dataset),
      _STAGE2_AUGMENT_STREAM))
  eval_step = _pmapped_eval(functools.partial(s2.stage2_eval_step, model=model,
                                              num_classes=num_classes, head_name=head_name,
                                              axis_name=AXIS), dataset.preprocessors)

  def describe(p_state, class_accuracy):
    trainable = p_state.trainable
    scales = (None if s2.SCALES not in trainable else
              [float(x) for x in jax.device_get(parallel.unreplicate(trainable[s2.SCALES]))])
    # Stage 2 weights no loss term: balance comes from the sampler.
    return {"difficulty": [float(1.0 - a) for a in class_accuracy],
            "class_weights": [1.0] * num_classes, "logit_scales": scales}

  name = f"stage2_{s.method}"
  return Experiment(
      name=name, uses_meta=False, sampler=sampler, batch_size=int(s.batch_size),
      steps_per_epoch=spe, total_steps=total_steps(s.num_epochs, spe, s.max_steps),
      schedule=schedule,
      schedule_fields={"stage2.num_epochs": int(s.num_epochs),
                       "stage2.learning_rate": float(s.learning_rate),
                       "stage2.lr_schedule": str(s.get("lr_schedule", "cosine")),
                       "steps_per_epoch": spe},
      abstract_state=abstract_state,
      init_state=lambda: jax.jit(make_state)(key, params, batch_stats),
      train_step=train_step, eval_step=eval_step, refresh=lambda state, a: state,
      describe=describe,
      identity=checkpoint_records.run_identity(model=config.model, num_classes=num_classes,
                                          method=name, image_shape=dataset.image_shape,
                                          abstract_state=abstract_state),
      non_finite_advice=f"Lower stage2.learning_rate (now {s.learning_rate})")


def lws_state(params, batch_stats, num_classes: int, head_name: str, tx, seed: int):
  """The stage-1 network as a stage-2 state with unit logit scales (to re-evaluate it)."""
  return s2.create_stage2_state(
      jax.random.key(seed), params, batch_stats,
      s2.stage2_trainable("lws", params, num_classes, head_name=head_name), tx)
