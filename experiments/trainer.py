"""`train_and_evaluate(config, workdir)`: the experiment loop of Difficulty-Net and its baselines.

The loop (Sinha & Ohashi, WACV 2023; METHOD.md):

  for each epoch e:
    for each full batch b of the epoch's permutation (seed, e):
      meta batch of global step s from (seed, s)              [Difficulty-Net methods]
      state <- step(state, batch, meta batch)                  [pmapped over local devices]
    evaluate on the meta set (eval mode)  -> a, val accuracy; state.class_accuracy <- a
    evaluate on the test set              -> test top-1 overall / many / medium / few
    checkpoint (state + bookkeeping)

Everything a step depends on is a function of the seed, the epoch/step and the
state: data order from (seed, epoch), meta batches from (seed, step), the
augmentation and dropout keys from `fold_in(state key, step)`. A run resumed
from a checkpoint therefore repeats exactly what the uninterrupted run does.
Checkpoints are written at epoch ends and when the run stops; a stop in the
middle of an epoch (`max_steps`) saves the state *before* any end-of-epoch
refresh, together with the partial epoch's metric sums, so that continuing it
later gives the same numbers as never having stopped.

Outputs in `workdir`: checkpoints/, results.json, metrics.jsonl (and
TensorBoard events when available), PNG plots (see `reporting`).
Only process 0 writes logs, results and plots.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from dnet_jax import difficulty as dmath
from dnet_jax import distributed
from dnet_jax import optim
from dnet_jax import parallel
from dnet_jax import steps
from dnet_jax.models import build_classifier
from dnet_jax.state import create_train_state
from experiments import checkpointing
from experiments import input_pipeline
from experiments import methods
from experiments import reporting

AXIS = parallel.AXIS_NAME
# fold_in tag that separates the augmentation keys from the step's dropout key.
_AUGMENT_STREAM = 0x617567
_LOOP_VERSION = 1


# ---------------------------------------------------------------------------- building blocks


def learning_rate_schedule(config, steps_per_epoch: int):
  """The classifier's learning rate as a function of the step (`config.lr_schedule`).

  The cosine schedule spans `num_epochs` (not `max_steps`), so that stopping a
  run early never changes the learning rates of the steps it does take.
  """
  base = float(config.learning_rate)
  if config.lr_schedule == "step":
    return optim.warmup_step_schedule(base, steps_per_epoch, int(config.warmup_epochs),
                                      tuple(config.lr_decay_epochs), float(config.lr_decay_factor))
  if config.lr_schedule == "cosine":
    return optim.cosine_schedule(base, int(config.num_epochs) * steps_per_epoch,
                                 int(config.warmup_epochs) * steps_per_epoch)
  return lambda step: jnp.full((), base, jnp.float32)


def _check_divisible(config, num_devices: int, uses_meta: bool) -> None:
  fields = ["batch_size", "eval_batch_size"] + (["meta_batch_size"] if uses_meta else [])
  for field in fields:
    if int(config[field]) % num_devices:
      raise ValueError(
          f"{field}={config[field]} is not divisible by the {num_devices} devices; the global "
          f"batch is split evenly across devices, so choose a multiple of {num_devices}.")


def _to_devices(global_batch):
  """This process's block of a global host batch, sharded over its local devices.

  With one process this is `shard_batch(global_batch)`; with several, each
  feeds its contiguous block and the pmapped step sees the whole global batch
  (see `dnet_jax.distributed`).
  """
  return parallel.shard_batch(distributed.global_batch_to_local(global_batch))


def _make_train_fn(step_fn, train_preprocess, meta_preprocess, uses_meta: bool):
  """The per-device training function: on-device preprocessing, then the method's step."""

  def augment_keys(state):
    key = jax.random.fold_in(state.step_key(), _AUGMENT_STREAM)
    key = jax.random.fold_in(key, jax.lax.axis_index(AXIS))  # different crops per device
    return jax.random.split(key)

  def preprocess(batch, fn, key):
    return {"image": fn(key, batch["image"]), "label": batch["label"]}

  if uses_meta:
    def train_fn(state, batch, meta_batch):
      train_key, meta_key = augment_keys(state)
      return step_fn(state, preprocess(batch, train_preprocess, train_key),
                     preprocess(meta_batch, meta_preprocess, meta_key))
  else:
    def train_fn(state, batch):
      train_key, _ = augment_keys(state)
      return step_fn(state, preprocess(batch, train_preprocess, train_key), None)
  return train_fn


def _make_eval_fn(model, eval_preprocess, num_classes: int):
  def eval_fn(state, batch):
    batch = dict(batch, image=eval_preprocess(None, batch["image"]))
    return steps.eval_step(state, batch, model=model, num_classes=num_classes, axis_name=AXIS)
  return eval_fn


@jax.jit
def _add_trees(a, b):
  return jax.tree.map(jnp.add, a, b)


def _to_host_scalars(tree) -> dict[str, float]:
  """First device's copy of replicated scalar metrics, as Python floats (one transfer)."""
  host = jax.device_get(parallel.unreplicate(tree))
  return {k: float(v) for k, v in host.items()}


def _config_dict(config) -> dict:
  return ml_collections.ConfigDict(config).to_dict()


# Fields that may change between a run and its resumption without changing what is trained.
_RUN_ONLY_FIELDS = ("max_steps", "num_epochs", "compare_with", "progress_bar", "log_every_steps",
                    "checkpoint_every_epochs", "max_checkpoints_to_keep", "eval_batch_size",
                    "data.data_dir")


def _training_fields(config) -> dict[str, str]:
  """The config flattened to {"a.b": repr(value)}, without the run-only fields."""
  flat = {}

  def walk(prefix, node):
    for key, value in node.items():
      name = f"{prefix}{key}"
      if isinstance(value, dict):
        walk(name + ".", value)
      elif name not in _RUN_ONLY_FIELDS:
        flat[name] = repr(tuple(value) if isinstance(value, list) else value)

  walk("", _config_dict(config))
  return flat


def _warn_if_config_changed(saved: dict | None, config) -> None:
  if not saved:
    return
  now = _training_fields(config)
  changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
  if changed:
    logging.warning(
        "Resuming a run whose checkpoint was written with a different config: %s. The results "
        "mix both settings; use a new workdir to start afresh.",
        "; ".join(f"{k}: {saved.get(k)} -> {now.get(k)}" for k in changed))


# ---------------------------------------------------------------------------- the loop


class _Evaluator:
  """Per-class counts of a data set with the pmapped eval step; summed on the host."""

  def __init__(self, p_eval, batch_size: int):
    self._p_eval = p_eval
    self._batch_size = batch_size

  def counts(self, p_state, x, y) -> tuple[np.ndarray, np.ndarray]:
    outputs = [self._p_eval(p_state, _to_devices(batch))
               for batch in input_pipeline.eval_batches(x, y, self._batch_size)]
    outputs = jax.device_get(outputs)  # one transfer after all batches are dispatched
    correct = np.sum([o["correct"][0] for o in outputs], axis=0, dtype=np.float64)
    total = np.sum([o["total"][0] for o in outputs], axis=0, dtype=np.float64)
    return correct, total


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains and evaluates one configuration; resumes from `workdir/checkpoints` if present.

  Args:
    config: an experiment config (see `experiments/configs/base.py` for the fields).
    workdir: where checkpoints, logs, results.json and plots go.

  Returns:
    The results dictionary that is also written to `workdir/results.json`:
    config, data (name, class counts, shot groups), final_test and
    best_val_test ({epoch, step, val_accuracy, overall, many, medium, few,
    per_class}), best_val_epoch, per_class_test_accuracy (final epoch),
    class_counts, history (per-epoch train loss, learning rate, val/test
    accuracy, class accuracy vector a, difficulty and class weights), steps,
    start_step, devices, wall_time_s (all invocations) and wall_time_this_run_s,
    metric_writer, plots.
  """
  run_start = time.time()
  methods.validate_config(config)  # cheap; before loading data or compiling anything
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  devices = jax.local_devices()
  num_devices = jax.device_count()  # all processes' devices share the global batch
  method_name = config.method
  uses_meta = method_name in methods.DNET_METHODS
  _check_divisible(config, num_devices, uses_meta)
  if jax.process_count() > 1:
    logging.warning("Multi-process run: batches are split across processes and only process 0 "
                    "writes results, but checkpointing across processes is untested.")
  if is_main:
    os.makedirs(workdir, exist_ok=True)
  writer, writer_kind = reporting.create_metric_writer(workdir, is_main=is_main)
  logging.info("Metric writer: %s", writer_kind)

  # Data.
  data = input_pipeline.load_data(config)
  logging.info("Data: %s", data.summary())
  num_classes = data.num_classes
  if uses_meta and int(config.meta_batch_size) > len(data.y_meta):
    raise ValueError(
        f"meta_batch_size={config.meta_batch_size} exceeds the meta set ({len(data.y_meta)} "
        "images); lower it or raise data.meta_per_class.")
  groups = data.shot_groups(int(config.many_threshold), int(config.few_threshold))
  steps_per_epoch = input_pipeline.steps_per_epoch(len(data.y_train), int(config.batch_size))
  total_steps = int(config.num_epochs) * steps_per_epoch
  if int(config.max_steps) > 0:
    total_steps = min(total_steps, int(config.max_steps))
  train_preprocess, meta_preprocess, eval_preprocess = input_pipeline.make_preprocessors(config, data)

  # Model, method, optimizers, state.
  method = methods.build_method(config, data.class_counts, num_classes)
  model = build_classifier(config.model, num_classes,
                           bn_axis_name=AXIS if config.sync_batchnorm else None,
                           dtype=jnp.dtype(config.dtype))
  schedule = learning_rate_schedule(config, steps_per_epoch)
  tx = optim.classifier_optimizer(schedule, momentum=float(config.momentum),
                                  weight_decay=float(config.weight_decay),
                                  nesterov=bool(config.nesterov))
  dnet_tx = (optim.dnet_optimizer(float(config.dnet.lr), float(config.dnet.weight_decay))
             if method.uses_dnet else None)
  sample_images = jnp.zeros((1,) + data.x_train.shape[1:], jnp.float32)
  # One compiled initialisation instead of hundreds of eagerly compiled ops.
  init_state = jax.jit(functools.partial(
      create_train_state, model=model, tx=tx, sample_images=sample_images,
      num_classes=num_classes, dnet=method.dnet, dnet_tx=dnet_tx))

  # Resume.
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                            int(config.max_checkpoints_to_keep))
  loop = {"version": _LOOP_VERSION, "step": 0, "steps_per_epoch": steps_per_epoch,
          "num_train": int(len(data.y_train)), "history": [], "epoch_sums": None,
          "epoch_steps": 0, "partial": None, "wall_time_s": 0.0}
  latest = checkpointer.latest_step()
  state = None
  if latest is not None:
    if latest >= total_steps:  # finished: the bookkeeping is all that reporting needs
      loop = checkpointer.restore_loop(latest)
    else:
      state, loop = checkpointer.restore(latest, jax.eval_shape(init_state, jax.random.key(0)))
    if (loop.get("steps_per_epoch"), loop.get("num_train")) != (steps_per_epoch, len(data.y_train)):
      raise ValueError(
          f"The checkpoint in {checkpointer.directory} was written with {loop.get('num_train')} "
          f"training images and {loop.get('steps_per_epoch')} steps per epoch, but this config "
          f"gives {len(data.y_train)} and {steps_per_epoch}: use a new workdir for a changed "
          "data set or batch size.")
    _warn_if_config_changed(loop.get("config"), config)
    logging.info("Resumed from checkpoint at step %d (epoch %.2f).", latest, latest / steps_per_epoch)
  elif total_steps > 0:
    state = init_state(jax.random.key(int(config.seed)))
  start_step = int(loop["step"])
  previous_wall = float(loop.get("wall_time_s", 0.0))

  diff_and_weights = jax.jit(functools.partial(methods.difficulty_and_weights, method))

  if start_step < total_steps:
    try:
      loop = _train(config, data, state, loop, method, model, tx, dnet_tx, schedule,
                    (train_preprocess, meta_preprocess, eval_preprocess), groups, steps_per_epoch,
                    total_steps, checkpointer, writer, diff_and_weights, is_main,
                    previous_wall, run_start)
    finally:  # also on errors: finish pending checkpoint writes and flush the logs
      checkpointer.close()
      writer.flush()
  else:
    checkpointer.close()
    logging.info("Run already finished at step %d (total %d); reporting only.", start_step,
                 total_steps)

  history = list(loop["history"]) + ([loop["partial"]] if loop.get("partial") else [])
  wall_this_run = time.time() - run_start
  results = reporting.build_results(
      config_dict=_config_dict(config),
      data_info={"name": data.name, "num_classes": num_classes,
                 "class_counts": [int(c) for c in data.class_counts],
                 "num_train": int(len(data.y_train)), "num_meta": int(len(data.y_meta)),
                 "num_test": int(len(data.y_test)),
                 "shot_groups": {k: np.flatnonzero(v).tolist() for k, v in groups.items()},
                 "many_threshold": int(config.many_threshold),
                 "few_threshold": int(config.few_threshold)},
      history=history,
      run_info={"steps": int(loop["step"]), "start_step": start_step,
                "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
                "devices": num_devices, "device_kind": devices[0].device_kind,
                "process_count": jax.process_count(),
                "wall_time_s": previous_wall + (wall_this_run if start_step < total_steps else 0.0),
                "wall_time_this_run_s": wall_this_run, "metric_writer": writer_kind,
                "workdir": workdir})
  plot_paths = {}
  if is_main:
    plot_paths = reporting.write_plots(
        workdir, results, groups, (int(config.many_threshold), int(config.few_threshold)),
        learned_difficulty=method.uses_dnet, compare_with=str(config.compare_with))
    results["plots"] = plot_paths
    reporting.write_json(os.path.join(workdir, reporting.RESULTS_FILE), results)
    print(reporting.format_summary(results, workdir, plot_paths), flush=True)
  writer.close()
  return results


def _train(config, data, state, loop, method, model, tx, dnet_tx, schedule, preprocessors, groups,
           steps_per_epoch, total_steps, checkpointer, writer, diff_and_weights, is_main,
           previous_wall, run_start) -> dict:
  """Runs steps loop["step"] .. total_steps - 1 with evaluation and checkpoints; returns `loop`."""
  train_preprocess, meta_preprocess, eval_preprocess = preprocessors
  num_classes = data.num_classes
  seed = int(config.seed)
  batch_size = int(config.batch_size)
  step_fn = methods.make_step_fn(method, config, model=model, tx=tx, dnet_tx=dnet_tx,
                                 learning_rate=schedule, axis_name=AXIS)
  p_train = jax.pmap(_make_train_fn(step_fn, train_preprocess, meta_preprocess, method.uses_dnet),
                     axis_name=AXIS, donate_argnums=(0,))
  evaluator = _Evaluator(jax.pmap(_make_eval_fn(model, eval_preprocess, num_classes),
                                  axis_name=AXIS), int(config.eval_batch_size))
  p_state = parallel.replicate(state)
  del state

  step = int(loop["step"])
  history = list(loop["history"])
  epoch_sums = (parallel.replicate({k: np.float32(v) for k, v in loop["epoch_sums"].items()})
                if loop.get("epoch_sums") else None)
  epoch_steps = int(loop.get("epoch_steps", 0))
  log_every = int(config.log_every_steps)
  logging.info("Training %s for steps %d..%d (%d per epoch) on %d device(s).", method.name, step,
               total_steps, steps_per_epoch, jax.device_count())
  bar = reporting.progress_bar(total_steps, step, enabled=is_main and bool(config.progress_bar))
  last_log_time, last_log_step = time.time(), step

  def put(item):
    s, batch, meta = item
    return s, _to_devices(batch), (_to_devices(meta) if meta else None)

  stream = input_pipeline.train_stream(
      data, seed=seed, start_step=step, end_step=total_steps, batch_size=batch_size,
      meta_batch_size=int(config.meta_batch_size) if method.uses_dnet else None)
  metrics = None

  def evaluate(p_state):
    val_correct, val_total = evaluator.counts(p_state, data.x_meta, data.y_meta)
    test_correct, test_total = evaluator.counts(p_state, data.x_test, data.y_test)
    class_accuracy = np.asarray(dmath.accuracy_from_counts(
        jnp.asarray(val_correct, jnp.float32), jnp.asarray(val_total, jnp.float32)))
    return class_accuracy, val_correct, val_total, reporting.accuracy_summary(test_correct,
                                                                              test_total, groups)

  def epoch_record(p_state, class_accuracy, val_correct, val_total, test, epoch, partial):
    """One evaluation's record. `difficulty` and `class_weights` are those the method
    derives from the accuracy just measured, i.e. what the next epoch starts with."""
    difficulty, weights = jax.device_get(diff_and_weights(
        parallel.unreplicate(p_state.dnet_params), jnp.asarray(class_accuracy)))
    means = {k: v / max(epoch_steps, 1) for k, v in _to_host_scalars(epoch_sums).items()}
    return {
        "epoch": epoch, "step": step, "partial": partial,
        "train_loss": means.get("train_loss"),
        "train_metrics": means,
        "learning_rate": float(schedule(max(step - 1, 0))),
        "val_accuracy": float(val_correct.sum() / max(val_total.sum(), 1.0)),
        "val_per_class": [float(a) for a in class_accuracy],
        "test": test,
        "difficulty": [float(d) for d in difficulty],
        "class_weights": [float(w) for w in weights],
    }

  def save(p_state, partial_record=None):
    state = parallel.unreplicate(p_state)
    loop_now = {
        "version": _LOOP_VERSION, "step": step, "steps_per_epoch": steps_per_epoch,
        "num_train": int(len(data.y_train)), "history": history,
        "epoch_sums": (_to_host_scalars(epoch_sums) if (epoch_sums is not None and epoch_steps)
                       else None),
        "epoch_steps": epoch_steps, "partial": partial_record,
        "wall_time_s": previous_wall + time.time() - run_start,
        "config": _training_fields(config),
    }
    checkpointer.save(step, state, loop_now)
    return loop_now

  loop_now = dict(loop)
  for step_index, batch, meta in input_pipeline.prefetch_to_device(stream, 2, put):
    if method.uses_dnet:
      p_state, metrics = p_train(p_state, batch, meta)
    else:
      p_state, metrics = p_train(p_state, batch)
    epoch_sums = metrics if epoch_sums is None else _add_trees(epoch_sums, metrics)
    step = step_index + 1
    epoch_steps += 1
    bar.update(1)

    if step % log_every == 0 or step == total_steps:
      scalars = _to_host_scalars(metrics)  # the only per-step device->host transfer
      if not np.isfinite(scalars["train_loss"]):
        raise FloatingPointError(
            f"Non-finite training loss {scalars['train_loss']} at step {step}; lower the "
            "learning rate or check the data.")
      now = time.time()
      scalars["images_per_sec"] = (step - last_log_step) * batch_size / max(now - last_log_time, 1e-9)
      last_log_time, last_log_step = now, step
      writer.write_scalars(step, scalars)
      bar.set_postfix(loss=f"{scalars['train_loss']:.4f}", img_s=f"{scalars['images_per_sec']:.0f}",
                      lr=f"{scalars.get('learning_rate', float(schedule(step - 1))):.3g}")

    epoch_done = step % steps_per_epoch == 0
    if not epoch_done and step < total_steps:
      continue
    epoch = step // steps_per_epoch if epoch_done else step / steps_per_epoch
    class_accuracy, val_correct, val_total, test = evaluate(p_state)
    if epoch_done:
      # Refresh the accuracy vector a that the next epoch's weights are computed from.
      p_state = p_state.replace(class_accuracy=parallel.replicate(jnp.asarray(class_accuracy)))
    record = epoch_record(p_state, class_accuracy, val_correct, val_total, test, epoch,
                          partial=not epoch_done)
    writer.write_scalars(step, {
        "epoch": float(epoch), "train_loss_epoch": record["train_loss"],
        "val_accuracy": record["val_accuracy"], "test_accuracy": test["overall"],
        **{f"test_{g}": test[g] for g in ("many", "medium", "few") if test[g] is not None}})
    writer.flush()
    logging.info("epoch %s step %d: train loss %.4f, val %.2f%%, test %.2f%% "
                 "(many %s, medium %s, few %s)", f"{epoch:.2f}" if not epoch_done else epoch,
                 step, record["train_loss"], 100 * record["val_accuracy"], 100 * test["overall"],
                 *(reporting.format_percent(test[g]) for g in ("many", "medium", "few")))
    if epoch_done:
      history.append(record)
      epoch_sums, epoch_steps = None, 0
      if (step // steps_per_epoch) % int(config.checkpoint_every_epochs) == 0 or step == total_steps:
        loop_now = save(p_state)
    else:  # stopped by max_steps inside an epoch: keep the un-refreshed state
      loop_now = save(p_state, partial_record=record)
  bar.close()
  jax.block_until_ready(p_state)
  loop_now.update(step=step, history=history)
  return loop_now
