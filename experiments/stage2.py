"""`train_stage2(config, workdir)`: stage-2 classifier re-training from a stage-1 run.

  load the stage-1 run (results.json for its config, checkpoints/ for its state)
  check that the model and data fields of `config` are those of the stage-1 run
  restore its classifier params and BatchNorm statistics (orbax)
  evaluate the restored network once (it must reproduce stage 1's final test accuracy)
  for each stage-2 epoch e:
    batches of the epoch's class-balanced draw (seed, e)     [or a permutation: sampler=instance]
    state <- stage2_step(state, batch)                       [only the classifier layer / scales train]
    evaluate on the meta (validation) and test sets; checkpoint

The backbone (every parameter but the classifier layer) is frozen, and so are its
BatchNorm statistics by default: BatchNorm runs in evaluation mode, so the
features are exactly those of the stage-1 network (the restored network is
evaluated once and must reproduce stage 1's test accuracy) and only the decision
layer changes. MiSLAS instead re-estimates the BatchNorm statistics on the
class-balanced batches ("shifted BN"); that is cheap here and available as
`stage2.shift_bn=True` (scale and shift parameters still frozen), but off by
default to keep stage 2 a pure classifier re-training.
The step runs under `jax.jit` on one device: stage 2 trains a single layer, and
the class-balanced batches are cheap to feed.

Outputs in `workdir`, as stage 1: results.json (final and best-validation test
accuracy overall / many / medium / few, per-class accuracy, per-epoch history),
metrics.jsonl, checkpoints/, PNG plots (per-class accuracy plotted against the
stage-1 run), and a summary on the terminal. results.json adds "stage1" (the
stage-1 run it started from and the re-evaluation of its restored network),
"stage2" (method, LAS smoothing per class, final logit scales).
Rerunning the same command resumes from the newest stage-2 checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from dnet_jax import difficulty as dmath
from dnet_jax import optim
from dnet_jax import stage2 as s2
from dnet_jax.apply import init_classifier
from dnet_jax.data import batching
from dnet_jax.models import MODEL_NAMES, build_classifier
from dnet_jax.state import create_train_state
from experiments import checkpointing
from experiments import errors
from experiments import input_pipeline
from experiments import methods
from experiments import reporting
from experiments import trainer

SAMPLERS = ("class_balanced", "instance")
# fold_in tags of the stage-2 random streams (distinct from stage 1's).
_AUGMENT_STREAM = 0x533241
_HEAD_INIT_STREAM = 0x533249
_LOOP_VERSION = 1
# Stage-1 config fields that define the network and the data; stage 2 must use the same.
_MUST_MATCH = ("model", "dtype")
_DATA_FIELDS_NOT_CHECKED = ("data_dir",)


# ---------------------------------------------------------------------------- config


def validate_stage2_config(config) -> None:
  """Raises InvalidInputError (a ValueError) on a missing or impossible stage-2 field;
  cheap, compiles nothing."""
  if int(config.get("stage", 1)) != 2 or "stage2" not in config:
    raise errors.InvalidInputError("train_stage2 needs a stage-2 config (stage = 2 and a stage2 section); "
                     "see experiments/configs/digits_lt_stage2.py.")
  if not str(config.get("stage1_workdir", "")):
    raise errors.InvalidInputError("Set config.stage1_workdir to the workdir of a finished stage-1 run, e.g. "
                     "--config.stage1_workdir=/tmp/digits_lt.")
  s = config.stage2
  if s.method not in s2.STAGE2_METHODS:
    raise errors.InvalidInputError(f"Unknown stage2.method {s.method!r}; choose one of: "
                     f"{', '.join(s2.STAGE2_METHODS)}.")
  if s.sampler not in SAMPLERS:
    raise errors.InvalidInputError(f"Unknown stage2.sampler {s.sampler!r}; choose one of: {', '.join(SAMPLERS)}.")
  if s.las_rule not in s2.LAS_RULES:
    raise errors.InvalidInputError(f"Unknown stage2.las_rule {s.las_rule!r}; choose one of: "
                     f"{', '.join(s2.LAS_RULES)}.")
  if s.las_off_target not in s2.LAS_OFF_TARGET:
    raise errors.InvalidInputError(f"Unknown stage2.las_off_target {s.las_off_target!r}; choose one of: "
                     f"{', '.join(s2.LAS_OFF_TARGET)}.")
  for field in ("num_epochs", "batch_size"):
    if int(s[field]) < 1:
      raise errors.InvalidInputError(f"stage2.{field} must be >= 1, got {s[field]}.")
  if int(s.max_steps) < 0:
    raise errors.InvalidInputError(f"stage2.max_steps must be >= 0 (0 = no limit), got {s.max_steps}.")
  if config.model not in MODEL_NAMES:
    raise errors.InvalidInputError(f"Unknown model {config.model!r}; choose one of: {', '.join(MODEL_NAMES)}.")


def las_smoothing(config) -> tuple[float, float]:
  """(eps_head, eps_tail): explicit stage2.las_eps_* if both >= 0, else by stage2.las_rule."""
  s = config.stage2
  if float(s.las_eps_head) >= 0 and float(s.las_eps_tail) >= 0:
    return float(s.las_eps_head), float(s.las_eps_tail)
  return s2.las_smoothing_for_imbalance(float(config.data.imbalance_factor), s.las_rule)


# ---------------------------------------------------------------------------- the stage-1 run


def load_stage1_results(stage1_workdir: str) -> dict:
  """The stage-1 run's results.json; InvalidInputError with what to do if there is none."""
  path = os.path.join(stage1_workdir, reporting.RESULTS_FILE)
  if not os.path.isdir(stage1_workdir):
    raise errors.InvalidInputError(f"stage1_workdir {stage1_workdir!r} does not exist; run stage 1 "
                            "there first (python -m experiments.train --config=... --workdir=...).")
  if not os.path.isfile(path):
    raise errors.InvalidInputError(f"No {reporting.RESULTS_FILE} in stage1_workdir {stage1_workdir!r}: "
                            "it is not a stage-1 run of experiments.train (or it never finished an "
                            "invocation).")
  with open(path, encoding="utf-8") as f:
    results = json.load(f)
  if int(results.get("config", {}).get("stage", 1)) != 1:
    raise errors.InvalidInputError(f"{stage1_workdir!r} holds a stage-2 run; point stage1_workdir at a stage-1 run.")
  return results


def check_compatible(config, stage1_config: dict) -> None:
  """InvalidInputError listing the model/data fields in which `config` differs from stage 1."""
  now = ml_collections.ConfigDict(config).to_dict()
  diffs = []
  for field in _MUST_MATCH:
    if now.get(field) != stage1_config.get(field):
      diffs.append((field, stage1_config.get(field), now.get(field)))
  data_now, data_then = now.get("data", {}), stage1_config.get("data", {})
  for field in sorted(set(data_now) | set(data_then)):
    if field in _DATA_FIELDS_NOT_CHECKED:
      continue
    if data_now.get(field) != data_then.get(field):
      diffs.append((f"data.{field}", data_then.get(field), data_now.get(field)))
  if diffs:
    raise errors.InvalidInputError(
        "The stage-2 config does not match the stage-1 run in " + "; ".join(
            f"{name}: stage 1 {then!r}, here {here!r}" for name, then, here in diffs)
        + ". Pass the stage-1 values, e.g. " + " ".join(
            f"--config.{name}={then}" for name, then, _ in diffs) + ".")


def _stage1_abstract_state(stage1_config, data):
  """Shapes of the stage-1 TrainState, built as experiments.trainer builds it."""
  num_classes = data.num_classes
  method = methods.build_method(stage1_config, data.class_counts, num_classes)
  model = build_classifier(stage1_config.model, num_classes, dtype=jnp.dtype(stage1_config.dtype))
  steps_per_epoch = input_pipeline.steps_per_epoch(len(data.y_train), int(stage1_config.batch_size))
  schedule = trainer.learning_rate_schedule(stage1_config, steps_per_epoch)
  tx = optim.classifier_optimizer(schedule, momentum=float(stage1_config.momentum),
                                  weight_decay=float(stage1_config.weight_decay),
                                  nesterov=bool(stage1_config.nesterov))
  dnet_tx = (optim.dnet_optimizer(float(stage1_config.dnet.lr), float(stage1_config.dnet.weight_decay))
             if method.uses_dnet else None)
  sample = jnp.zeros((1,) + data.x_train.shape[1:], jnp.float32)
  return jax.eval_shape(functools.partial(
      create_train_state, model=model, tx=tx, sample_images=sample, num_classes=num_classes,
      dnet=method.dnet, dnet_tx=dnet_tx), jax.random.key(0))


def restore_stage1(stage1_workdir: str, stage1_results: dict, data) -> tuple[Any, Any, int]:
  """(params, batch_stats, step) of the newest complete checkpoint of the stage-1 run.

  The checkpoint's record (model, classes, method, image shape, array shapes) is
  checked against the network that the run's results.json describes before
  anything is restored; `Checkpointer.restore` then verifies every array's checksum.
  """
  directory = os.path.join(stage1_workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise errors.InvalidInputError(f"No checkpoints/ in stage1_workdir {stage1_workdir!r}; is it "
                                   "a stage-1 run of experiments.train?")
  stage1_config = ml_collections.ConfigDict(stage1_results["config"])
  target = _stage1_abstract_state(stage1_config, data)
  identity = checkpointing.run_identity(
      model=stage1_config.model, num_classes=data.num_classes, method=stage1_config.method,
      image_shape=data.x_train.shape[1:], abstract_state=target)
  with checkpointing.Checkpointer(directory, asynchronous=False) as checkpointer:
    step = checkpointer.latest_step()
    if step is None:
      raise errors.InvalidInputError(f"No complete checkpoint in {directory}; run stage 1 to the "
                                     "end first.")
    problems = checkpointing.compatibility_problems(checkpointer.read_meta(step), identity)
    if problems:
      raise errors.CheckpointError(
          f"The stage-1 checkpoint {checkpointer.step_path(step)} is not the network that "
          f"{os.path.join(stage1_workdir, reporting.RESULTS_FILE)} describes (a "
          f"{stage1_config.model} for {data.num_classes} classes trained with "
          f"{stage1_config.method!r}): {'; '.join(problems)}. Point stage1_workdir at the "
          "stage-1 run the checkpoint belongs to.")
    state, _ = checkpointer.restore(step, target)
  total = stage1_results.get("total_steps")
  if total is not None and step < int(total):
    logging.warning("The stage-1 run in %s stopped at step %d of %d; stage 2 starts from that "
                    "unfinished network.", stage1_workdir, step, int(total))
  return state.params, state.batch_stats, int(step)


# ---------------------------------------------------------------------------- batches


def stage2_batch_indices(labels: np.ndarray, *, sampler: str, seed: int, epoch: int,
                         steps_per_epoch: int, batch_size: int) -> np.ndarray:
  """Indices [steps_per_epoch, batch_size] of one stage-2 epoch, a pure function of (seed, epoch).

  class_balanced: each index picks a class uniformly, then one of its images
  (`dnet_jax.data.batching.class_balanced_indices`); instance: a permutation.
  An epoch has as many examples as the training set (the last partial batch dropped).
  """
  n = steps_per_epoch * batch_size
  if sampler == "class_balanced":
    idx = batching.class_balanced_indices(labels, n, seed, epoch)
  else:
    idx = batching.epoch_permutation(seed, epoch, len(labels))[:n]
  return idx.reshape(steps_per_epoch, batch_size)


# ---------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class Stage2Setup:
  """What a stage-2 run is built from (see `prepare_stage2`)."""
  config: Any
  stage1_workdir: str
  stage1_results: dict
  stage1_step: int
  data: Any
  groups: dict
  params1: Any
  batch_stats1: Any
  model: Any
  head_name: str
  eps_head: float
  eps_tail: float
  epsilons: np.ndarray
  loss_fn: Any
  schedule: Any
  tx: Any
  steps_per_epoch: int
  total_steps: int
  seed_key: Any
  init_state: Any          # jitted (key, params, batch_stats) -> Stage2State
  preprocessors: tuple     # (train, eval) on-device preprocessing

  def abstract_state(self):
    return jax.eval_shape(self.init_state, self.seed_key, self.params1, self.batch_stats1)


def prepare_stage2(config: ml_collections.ConfigDict) -> Stage2Setup:
  """Checks the config against the stage-1 run, restores it and builds loss, optimizer, init.

  Raises InvalidInputError (a ValueError) for a missing stage-1 run or checkpoint,
  or a config whose model or data differ from the stage-1 run's; CheckpointError
  for a stage-1 checkpoint of another network, or a corrupt one.
  """
  validate_stage2_config(config)
  s = config.stage2
  stage1_workdir = os.path.abspath(str(config.stage1_workdir))
  stage1_results = load_stage1_results(stage1_workdir)
  check_compatible(config, stage1_results["config"])

  data = input_pipeline.load_data(config)
  if [int(c) for c in data.class_counts] != list(stage1_results.get("class_counts", [])):
    raise errors.InvalidInputError(f"The training set here has class counts {data.class_counts.tolist()} but the "
                     f"stage-1 run had {stage1_results.get('class_counts')}.")
  logging.info("Data: %s", data.summary())
  num_classes = data.num_classes
  groups = data.shot_groups(int(config.many_threshold), int(config.few_threshold))
  params1, batch_stats1, stage1_step = restore_stage1(stage1_workdir, stage1_results, data)

  steps_per_epoch = input_pipeline.steps_per_epoch(len(data.y_train), int(s.batch_size))
  total_steps = int(s.num_epochs) * steps_per_epoch
  if int(s.max_steps) > 0:
    total_steps = min(total_steps, int(s.max_steps))
  train_preprocess, _, eval_preprocess = input_pipeline.make_preprocessors(config, data)

  model = build_classifier(config.model, num_classes, dtype=jnp.dtype(config.dtype))
  head_name = str(s.head_name)
  s2.split_head(params1, head_name)  # a clear error if the network has no such layer
  eps_head, eps_tail = las_smoothing(config)
  epsilons = s2.label_aware_epsilons(data.class_counts, eps_head, eps_tail)
  loss_fn = s2.make_stage2_loss_fn(s.method, data.class_counts, eps_head=eps_head,
                                   eps_tail=eps_tail, off_target=s.las_off_target)
  schedule = optim.cosine_schedule(float(s.learning_rate), int(s.num_epochs) * steps_per_epoch)
  tx = s2.stage2_optimizer(schedule, momentum=float(s.momentum), weight_decay=float(s.weight_decay),
                           head_lr_factor=float(s.head_lr_factor) if s.method == "las" else 1.0)
  sample = jnp.zeros((1,) + data.x_train.shape[1:], jnp.float32)

  def init_state(key, params, batch_stats):
    new_head = None
    if s.method == "crt":
      fresh, _ = init_classifier(model, jax.random.fold_in(key, _HEAD_INIT_STREAM), sample)
      new_head = s2.split_head(fresh, head_name)[1]
    trainable = s2.stage2_trainable(s.method, params, num_classes, head_name=head_name,
                                    new_head=new_head, las_scales=bool(s.las_scales))
    return s2.create_stage2_state(key, params, batch_stats, trainable, tx)

  return Stage2Setup(
      config=config, stage1_workdir=stage1_workdir, stage1_results=stage1_results,
      stage1_step=stage1_step, data=data, groups=groups, params1=params1,
      batch_stats1=batch_stats1, model=model, head_name=head_name, eps_head=eps_head,
      eps_tail=eps_tail, epsilons=epsilons, loss_fn=loss_fn, schedule=schedule, tx=tx,
      steps_per_epoch=steps_per_epoch, total_steps=total_steps,
      seed_key=jax.random.key(int(config.seed)), init_state=jax.jit(init_state),
      preprocessors=(train_preprocess, eval_preprocess))


def load_stage2_state(config: ml_collections.ConfigDict, workdir: str) -> s2.Stage2State:
  """The newest stage-2 state saved in `workdir` (e.g. to use or inspect the trained model)."""
  setup = prepare_stage2(config)
  with checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                  asynchronous=False) as checkpointer:
    latest = checkpointer.latest_step()
    if latest is None:
      raise errors.InvalidInputError(f"No stage-2 checkpoint in {workdir}.")
    state, _ = checkpointer.restore(latest, setup.abstract_state())
  return state


def train_stage2(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Stage-2 training from `config.stage1_workdir`; writes and returns results.json's payload.

  Raises InvalidInputError (a ValueError) for a missing stage-1 run or checkpoint,
  or a config whose model or data differ from the stage-1 run's; CheckpointError
  for a stage-1 checkpoint of another network, or a corrupt one.
  """
  run_start = time.time()
  validate_stage2_config(config)
  workdir = os.path.abspath(workdir)
  if workdir == os.path.abspath(str(config.stage1_workdir)):
    raise errors.InvalidInputError("The stage-2 workdir must differ from stage1_workdir.")
  setup = prepare_stage2(config)
  s = config.stage2
  data, groups, model, head_name = setup.data, setup.groups, setup.model, setup.head_name
  num_classes = data.num_classes
  params1, batch_stats1, tx = setup.params1, setup.batch_stats1, setup.tx
  stage1_workdir, stage1_results, stage1_step = (setup.stage1_workdir, setup.stage1_results,
                                                 setup.stage1_step)
  steps_per_epoch, total_steps, schedule = setup.steps_per_epoch, setup.total_steps, setup.schedule
  eps_head, eps_tail, epsilons = setup.eps_head, setup.eps_tail, setup.epsilons
  train_preprocess, eval_preprocess = setup.preprocessors
  batch_size = int(s.batch_size)
  seed_key = setup.seed_key
  os.makedirs(workdir, exist_ok=True)
  writer, writer_kind = reporting.create_metric_writer(workdir)

  eval_fn = jax.jit(lambda state, batch: s2.stage2_eval_step(
      state, dict(batch, image=eval_preprocess(None, batch["image"])), model=model,
      num_classes=num_classes, head_name=head_name))

  def step_fn(state, batch):
    key = jax.random.fold_in(state.step_key(), _AUGMENT_STREAM)
    batch = {"image": train_preprocess(key, batch["image"]), "label": batch["label"]}
    return s2.stage2_step(state, batch, model=model, tx=tx, loss_fn=setup.loss_fn,
                          head_name=head_name, shift_bn=bool(s.shift_bn))

  train_step = jax.jit(step_fn, donate_argnums=(0,))

  def counts(state, x, y):
    outputs = jax.device_get([eval_fn(state, b) for b in input_pipeline.eval_batches(
        x, y, int(config.eval_batch_size))])
    return (np.sum([o["correct"] for o in outputs], axis=0, dtype=np.float64),
            np.sum([o["total"] for o in outputs], axis=0, dtype=np.float64))

  # Resume, or start from the stage-1 network.
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                            int(config.max_checkpoints_to_keep))
  abstract = setup.abstract_state()
  identity = checkpointing.run_identity(
      model=config.model, num_classes=num_classes, method=f"stage2_{s.method}",
      image_shape=data.x_train.shape[1:], abstract_state=abstract)
  checkpointer.set_aside_incomplete()
  latest = checkpointer.latest_step()
  loop = {"version": _LOOP_VERSION, "step": 0, "history": [], "wall_time_s": 0.0,
          "steps_per_epoch": steps_per_epoch}
  if latest is not None:
    checkpointer.check_compatible(latest, identity)
    state, loop = checkpointer.restore(latest, abstract)
    if loop.get("steps_per_epoch") != steps_per_epoch:
      raise errors.CheckpointError(
          f"The stage-2 checkpoint in {checkpointer.directory} has {loop.get('steps_per_epoch')} "
          f"steps per epoch, this config {steps_per_epoch}: use a new workdir.")
    if loop.get("stage1_step", stage1_step) != stage1_step:
      raise errors.CheckpointError(
          f"The stage-2 run in {workdir} started from step {loop['stage1_step']} of the stage-1 "
          f"run {stage1_workdir}, which is now at step {stage1_step}; use a new workdir (or "
          "delete this one) to redo stage 2.")
    logging.info("Resumed stage 2 from step %d.", latest)
  else:
    state = setup.init_state(seed_key, params1, batch_stats1)

  # The restored network must reproduce stage 1's final test accuracy (checks the restore).
  reload_state = s2.create_stage2_state(
      seed_key, params1, batch_stats1, s2.stage2_trainable("lws", params1, num_classes,
                                                           head_name=head_name), tx)
  reload_test = reporting.accuracy_summary(*counts(reload_state, data.x_test, data.y_test), groups)
  stage1_final = (stage1_results.get("final_test") or {}).get("overall")
  if stage1_final is not None and abs(reload_test["overall"] - stage1_final) > 1e-6 and \
      stage1_step == int(stage1_results.get("steps", -1)):
    logging.warning("The restored stage-1 network gives %.4f test accuracy, its results.json %.4f.",
                    reload_test["overall"], stage1_final)
  del reload_state

  # A run stopped inside an epoch (stage2.max_steps) left a partial record; it is redone.
  history = [r for r in loop["history"] if not r.get("partial")]
  step = int(loop["step"])
  start_step = step
  previous_wall = float(loop.get("wall_time_s", 0.0))
  seed = int(config.seed)
  logging.info("Stage 2 (%s) for steps %d..%d (%d per epoch) from %s step %d.", s.method, step,
               total_steps, steps_per_epoch, stage1_workdir, stage1_step)
  bar = reporting.progress_bar(total_steps, step, enabled=bool(config.progress_bar))
  epoch_sums, epoch_steps = None, 0
  log_every = int(config.log_every_steps)
  try:
    while step < total_steps:
      epoch, index = divmod(step, steps_per_epoch)
      order = stage2_batch_indices(data.y_train, sampler=s.sampler, seed=seed, epoch=epoch,
                                   steps_per_epoch=steps_per_epoch, batch_size=batch_size)
      # A run resumed inside an epoch (it stopped at stage2.max_steps) continues with the
      # next batch of the same draw; that epoch's mean train loss then covers only the
      # resumed steps.
      for index in range(index, steps_per_epoch):
        if step >= total_steps:
          break
        idx = order[index]
        state, metrics = train_step(state, {"image": data.x_train[idx], "label": data.y_train[idx]})
        epoch_sums = metrics if epoch_sums is None else _add_trees(epoch_sums, metrics)
        epoch_steps += 1
        step += 1
        bar.update(1)
        if step % log_every == 0 or step == total_steps:
          scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
          if not np.isfinite(scalars["train_loss"]):
            raise errors.NonFiniteError(
                f"Non-finite stage-2 loss {scalars['train_loss']} at step {step}; lower "
                "stage2.learning_rate.")
          writer.write_scalars(step, scalars)
      epoch_done = step % steps_per_epoch == 0
      val_correct, val_total = counts(state, data.x_meta, data.y_meta)
      test = reporting.accuracy_summary(*counts(state, data.x_test, data.y_test), groups)
      class_accuracy = np.asarray(dmath.accuracy_from_counts(
          jnp.asarray(val_correct, jnp.float32), jnp.asarray(val_total, jnp.float32)))
      means = {k: float(v) / max(epoch_steps, 1)
               for k, v in jax.device_get(epoch_sums).items()} if epoch_sums else {}
      record = {
          "epoch": (step // steps_per_epoch) if epoch_done else step / steps_per_epoch,
          "step": step, "partial": not epoch_done,
          "train_loss": means.get("train_loss"), "train_metrics": means,
          "learning_rate": float(schedule(max(step - 1, 0))),
          "val_accuracy": float(val_correct.sum() / max(val_total.sum(), 1.0)),
          "val_per_class": [float(a) for a in class_accuracy],
          "test": test,
          # Stage 2 weights no loss term: balance comes from the sampler.
          "difficulty": [float(1.0 - a) for a in class_accuracy],
          "class_weights": [1.0] * num_classes,
          "logit_scales": _scales(state),
      }
      history.append(record)
      epoch_sums, epoch_steps = None, 0
      writer.write_scalars(step, {"epoch": float(record["epoch"]),
                                  "val_accuracy": record["val_accuracy"],
                                  "test_accuracy": test["overall"]})
      writer.flush()
      logging.info("stage-2 epoch %s step %d: train loss %.4f, val %.2f%%, test %.2f%%",
                   record["epoch"], step, record["train_loss"], 100 * record["val_accuracy"],
                   100 * test["overall"])
      loop = {"version": _LOOP_VERSION, "step": step, "history": history,
              "steps_per_epoch": steps_per_epoch, "stage1_step": stage1_step,
              "wall_time_s": previous_wall + time.time() - run_start}
      checkpointer.save(step, state, loop, identity=identity)
  finally:
    bar.close()
    checkpointer.close()
    writer.flush()

  wall_this_run = time.time() - run_start
  config_dict = ml_collections.ConfigDict(config).to_dict()
  results = reporting.build_results(
      config_dict=config_dict,
      data_info={"name": data.name, "num_classes": num_classes,
                 "class_counts": [int(c) for c in data.class_counts],
                 "num_train": int(len(data.y_train)), "num_meta": int(len(data.y_meta)),
                 "num_test": int(len(data.y_test)),
                 "shot_groups": {k: np.flatnonzero(v).tolist() for k, v in groups.items()},
                 "many_threshold": int(config.many_threshold),
                 "few_threshold": int(config.few_threshold)},
      history=history,
      run_info={"steps": step, "start_step": start_step, "total_steps": total_steps,
                "steps_per_epoch": steps_per_epoch, "devices": 1,
                "device_kind": jax.devices()[0].device_kind, "process_count": 1,
                "wall_time_s": previous_wall + (wall_this_run if start_step < total_steps else 0.0),
                "wall_time_this_run_s": wall_this_run, "metric_writer": writer_kind,
                "workdir": workdir})
  results["history"]["logit_scales"] = [r.get("logit_scales") for r in history]
  results["stage1"] = {
      "workdir": stage1_workdir, "step": stage1_step,
      "method": stage1_results["config"].get("method"),
      "meta_grad": stage1_results["config"].get("meta_grad"),
      "final_test": _without_per_class(stage1_results.get("final_test")),
      "best_val_test": _without_per_class(stage1_results.get("best_val_test")),
      "restored_test": _without_per_class(reload_test),
  }
  results["stage2"] = {
      "method": s.method, "sampler": s.sampler, "shift_bn": bool(s.shift_bn),
      "las_eps_head": eps_head if s.method == "las" else None,
      "las_eps_tail": eps_tail if s.method == "las" else None,
      "las_epsilon_per_class": epsilons.tolist() if s.method == "las" else None,
      "logit_scales": history[-1]["logit_scales"] if history else None,
  }
  compare_with = str(config.compare_with) or stage1_workdir
  # Plots and the summary name the run "<stage-1 method> + <stage-2 method> (stage 2)";
  # results.json keeps the config as given.
  labelled = dict(results, config=dict(
      config_dict, method=f"{results['stage1']['method']} + {s.method} (stage 2)"))
  plot_paths = reporting.write_plots(
      workdir, labelled, groups, (int(config.many_threshold), int(config.few_threshold)),
      learned_difficulty=False, compare_with=compare_with)
  results["plots"] = plot_paths
  reporting.write_json(os.path.join(workdir, reporting.RESULTS_FILE), results)
  print(f"Stage 2: {s.method} on the stage-1 {results['stage1']['method']} run "
        f"{stage1_workdir} (step {stage1_step}); stage-1 test, final epoch: "
        f"{reporting.format_percent(stage1_final)}", flush=True)
  print(reporting.format_summary(labelled, workdir, plot_paths), flush=True)
  writer.close()
  return results


@jax.jit
def _add_trees(a, b):
  return jax.tree.map(jnp.add, a, b)


def _scales(state) -> list[float] | None:
  if s2.SCALES not in state.trainable:
    return None
  return [float(f) for f in jax.device_get(state.trainable[s2.SCALES])]


def _without_per_class(block: dict | None) -> dict | None:
  if block is None:
    return None
  return {k: v for k, v in block.items() if k != "per_class"}
