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
from a checkpoint therefore repeats exactly what the uninterrupted run does
(bit for bit on CPU; tests/test_resume.py kills a run with SIGKILL and checks).

Checkpoints (`experiments/checkpointing.py`) are written
  * at epoch ends (every `checkpoint_every_epochs`), after the refresh of a;
  * every `checkpoint_every_steps` steps (0 = off), also inside an epoch;
  * when the run stops: at `max_steps`, or on SIGTERM (`experiments/preemption.py`).
A checkpoint inside an epoch holds the state *before* any end-of-epoch refresh,
the position in the epoch and the partial epoch's metric sums, so continuing
it gives the same numbers as never having stopped. A checkpoint written on
SIGTERM right at an epoch end records that the end-of-epoch evaluation is
still pending (it can take long; a preemption notice gives seconds): the
resumed run does it first.

Reliability (what a user sees; exit codes in `experiments/errors.py`):
  * the config and data are checked before anything is compiled
    (`experiments/validation.py`): InvalidInputError;
  * a NaN/Inf in any step metric (train_loss, grad_norm, ...) is recorded on
    the device as the first step where each quantity went bad, carried across
    steps without a device->host transfer, and checked at every logging
    interval and before every evaluation and checkpoint: NonFiniteError
    "step 123: train_loss is nan", and the bad state is never saved;
  * SIGTERM: a checkpoint at the next step boundary, then `errors.Preempted`;
  * a corrupt checkpoint, or one of another experiment: CheckpointError
    naming it; incomplete step directories are skipped and set aside.

Outputs in `workdir`: checkpoints/, results.json, metrics.jsonl (and
TensorBoard events when available), PNG plots (see `reporting`).
Only process 0 writes logs, results and plots. After a resume,
metrics.jsonl also holds the steps between the checkpoint and the
interruption twice (the later lines are the ones the run continued from).

Data: in memory (`input_pipeline`: global batches, cut per process) or, for
`config.data.source` in `streaming.SOURCES` (split lists such as ImageNet-LT
and Places-LT, TFDS imagenet_lt), streamed from disk by tf.data, each process
reading only its part of every global batch (`experiments/streaming.py`).
`config.pretrained_path` loads backbone weights into a new run's state
(`experiments/pretrained_init.py`). Several processes: every one runs this
loop and takes part in every checkpoint save and restore (orbax synchronises
them); tests/test_multiprocess_runner.py checks 2 processes against 1.
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
from experiments import errors
from experiments import input_pipeline
from experiments import methods
from experiments import preemption
from experiments import pretrained_init
from experiments import reporting
from experiments import streaming
from experiments import validation

AXIS = parallel.AXIS_NAME
# fold_in tag that separates the augmentation keys from the step's dropout key.
_AUGMENT_STREAM = 0x617567
_LOOP_VERSION = 2
# Step metrics named first in a non-finite report, when several go bad at the same step.
_NON_FINITE_ORDER = ("train_loss", "grad_norm", "ce", "dnet_grad_norm", "meta_ce", "driver_loss")


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
  """Kept for callers of the old name: see `validation.validate_config`."""
  del uses_meta  # validate_config reads the method from the config
  validation.validate_config(config, num_devices)


def _to_devices(global_batch):
  """This process's block of a global host batch, sharded over its local devices.

  With one process this is `shard_batch(global_batch)`; with several, each
  feeds its contiguous block and the pmapped step sees the whole global batch
  (see `dnet_jax.distributed`).
  """
  return parallel.shard_batch(distributed.global_batch_to_local(global_batch))


def _split_sizes(data) -> tuple[int, int, int]:
  """(train, meta, test) sizes of in-memory (`LongTailedData`) or streamed data."""
  if isinstance(data, streaming.StreamingData):
    return data.num_train, data.num_meta, data.num_test
  return len(data.y_train), len(data.y_meta), len(data.y_test)


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


@jax.jit
def _accumulate(sums, first_bad, metrics, step):
  """Adds a step's metrics to the epoch sums and records non-finite values, on the device.

  `first_bad[name] = (s, v)`: s is the first step whose metric `name` was NaN or
  Inf (-1 while none) and v that value; `step` is the step count after the
  update (the runner's 1-based step). None for `sums` / `first_bad` starts them.
  """
  sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
  if first_bad is None:
    first_bad = {name: (jnp.full(jnp.shape(value), -1, jnp.int32),
                        jnp.zeros(jnp.shape(value), jnp.float32))
                 for name, value in metrics.items()}
  updated = {}
  for name, value in metrics.items():
    bad_step, bad_value = first_bad[name]
    new = (bad_step < 0) & ~jnp.isfinite(value)
    updated[name] = (jnp.where(new, step.astype(jnp.int32), bad_step),
                     jnp.where(new, value.astype(jnp.float32), bad_value))
  return sums, updated


def _non_finite_entries(host_first_bad) -> list[tuple[int, str, float]]:
  """[(step, metric name, value)] of the metrics that went bad, earliest (and most telling) first."""
  if host_first_bad is None:
    return []
  entries = [(int(np.ravel(s)[0]), name, float(np.ravel(v)[0]))
             for name, (s, v) in host_first_bad.items() if np.ravel(s)[0] >= 0]
  rank = {name: i for i, name in enumerate(_NON_FINITE_ORDER)}
  return sorted(entries, key=lambda e: (e[0], rank.get(e[1], len(rank)), e[1]))


def _format_value(value: float) -> str:
  return "nan" if np.isnan(value) else ("inf" if value > 0 else "-inf")


def _to_host_scalars(tree) -> dict[str, float]:
  """First device's copy of replicated scalar metrics, as Python floats (one transfer)."""
  host = jax.device_get(parallel.unreplicate(tree))
  return {k: float(v) for k, v in host.items()}


def _config_dict(config) -> dict:
  return ml_collections.ConfigDict(config).to_dict()


# Fields that may change between a run and its resumption without changing what is trained.
_RUN_ONLY_FIELDS = ("max_steps", "num_epochs", "compare_with", "progress_bar", "log_every_steps",
                    "checkpoint_every_epochs", "checkpoint_every_steps", "max_checkpoints_to_keep",
                    "eval_batch_size", "data.data_dir")


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

  def stream_counts(self, p_state, local_batches) -> tuple[np.ndarray, np.ndarray]:
    """Counts of this process's batches of a streamed split (summed over all processes)."""
    return streaming.eval_counts(self._p_eval, p_state, local_batches, parallel.shard_batch)


def _fresh_loop(steps_per_epoch: int, num_train: int) -> dict:
  return {"version": _LOOP_VERSION, "step": 0, "steps_per_epoch": steps_per_epoch,
          "num_train": num_train, "history": [], "epoch_sums": None, "epoch_steps": 0,
          "partial": None, "pending_evaluation": False, "wall_time_s": 0.0}


def _check_loop(loop: dict, step: int, path: str, steps_per_epoch: int, num_train: int) -> None:
  """The bookkeeping of checkpoint `path` must fit this run's data and batch size."""
  if loop.get("version") != _LOOP_VERSION or int(loop.get("step", -1)) != step:
    raise errors.CheckpointError(
        f"Checkpoint {path} holds bookkeeping of version {loop.get('version')!r} for step "
        f"{loop.get('step')!r}; this runner writes version {_LOOP_VERSION}. Use a new --workdir.")
  if (loop.get("steps_per_epoch"), loop.get("num_train")) != (steps_per_epoch, num_train):
    raise errors.CheckpointError(
        f"Checkpoint {path} was written with {loop.get('num_train')} training images and "
        f"{loop.get('steps_per_epoch')} steps per epoch, but this config gives {num_train} and "
        f"{steps_per_epoch}: use a new --workdir for a changed data set or batch size. Nothing "
        "was deleted.")


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

  Raises:
    errors.InvalidInputError: the config or the data is invalid (before any compilation).
    errors.CheckpointError: the newest checkpoint is corrupt or from another experiment.
    errors.NonFiniteError: a step metric or the state became NaN/Inf (nothing bad is saved).
    errors.Preempted: SIGTERM arrived; a checkpoint was saved, call again to continue.
  """
  run_start = time.time()
  devices = jax.local_devices()
  num_devices = jax.device_count()  # all processes' devices share the global batch
  # Everything that can be checked is checked before any data is fed or anything compiled.
  validation.validate_config(config, num_devices)
  method_name = config.method
  uses_meta = method_name in methods.DNET_METHODS
  streamed = streaming.is_streaming(config)
  if streamed:  # read from disk by tf.data, each process its own shard (experiments/streaming.py)
    data = streaming.load(config)
  else:
    data = validation.load_data(config)
    validation.check_data(data, config, uses_meta)
  pretrained_path = str(config.get("pretrained_path", "") or "")
  pretrained_init.check_path(pretrained_path)
  logging.info("Data: %s", data.summary())

  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  if jax.process_count() > 1:
    logging.info("Multi-process run: process %d of %d feeds its part of every global batch; all "
                 "processes write checkpoints together, only process 0 results and logs.",
                 jax.process_index(), jax.process_count())
  if is_main:
    os.makedirs(workdir, exist_ok=True)
  num_classes = data.num_classes
  groups = data.shot_groups(int(config.many_threshold), int(config.few_threshold))
  num_train, num_meta, num_test = _split_sizes(data)
  steps_per_epoch = (data.steps_per_epoch if streamed else
                     input_pipeline.steps_per_epoch(num_train, int(config.batch_size)))
  total_steps = int(config.num_epochs) * steps_per_epoch
  if int(config.max_steps) > 0:
    total_steps = min(total_steps, int(config.max_steps))
  # Streamed images arrive cropped, flipped and normalised by tf.data: no on-device preprocessing.
  train_preprocess, meta_preprocess, eval_preprocess = (
      streaming.preprocessors() if streamed else input_pipeline.make_preprocessors(config, data))
  image_shape = tuple(data.image_shape) if streamed else data.x_train.shape[1:]

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
  sample_images = jnp.zeros((1,) + image_shape, jnp.float32)
  make_state = functools.partial(
      create_train_state, model=model, tx=tx, sample_images=sample_images,
      num_classes=num_classes, dnet=method.dnet, dnet_tx=dnet_tx)
  abstract_state = jax.eval_shape(make_state, jax.random.key(0))  # traces, compiles nothing
  identity = checkpointing.run_identity(
      model=config.model, num_classes=num_classes, method=method_name,
      image_shape=image_shape, abstract_state=abstract_state)

  # Resume: the newest complete checkpoint, checked against this run before it is restored.
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                            int(config.max_checkpoints_to_keep))
  try:
    if jax.process_count() == 1:
      # TODO(multi-process): every process would have to agree before one renames.
      checkpointer.set_aside_incomplete()
    loop = _fresh_loop(steps_per_epoch, num_train)
    latest = checkpointer.latest_step()
    state = None
    if latest is not None:
      checkpointer.check_compatible(latest, identity)
      loop = checkpointer.restore_loop(latest)
      _check_loop(loop, latest, checkpointer.step_path(latest), steps_per_epoch, num_train)
      if latest < total_steps or (latest == total_steps and loop.get("pending_evaluation")):
        state, loop = checkpointer.restore(latest, abstract_state)
      _warn_if_config_changed(loop.get("config"), config)
      logging.info("Resumed from checkpoint %s (epoch %.2f).", checkpointer.step_path(latest),
                   latest / steps_per_epoch)
    elif total_steps > 0:
      # One compiled initialisation instead of hundreds of eagerly compiled ops.
      state = jax.jit(make_state)(jax.random.key(int(config.seed)))
      if pretrained_path:  # a new run only: a resumed one continues from its checkpoint
        state = pretrained_init.load_into_state(state, pretrained_path, tx)
  except BaseException:
    checkpointer.close()
    raise
  start_step = int(loop["step"])
  previous_wall = float(loop.get("wall_time_s", 0.0))

  writer, writer_kind = reporting.create_metric_writer(workdir, is_main=is_main)
  logging.info("Metric writer: %s", writer_kind)
  diff_and_weights = jax.jit(functools.partial(methods.difficulty_and_weights, method))

  if state is not None:
    try:
      with preemption.StopSignal() as stop:
        runner = _Loop(config=config, data=data, loop=loop, method=method, model=model, tx=tx,
                       dnet_tx=dnet_tx, schedule=schedule,
                       preprocessors=(train_preprocess, meta_preprocess, eval_preprocess),
                       groups=groups, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                       checkpointer=checkpointer, writer=writer,
                       diff_and_weights=diff_and_weights, is_main=is_main,
                       previous_wall=previous_wall, run_start=run_start, identity=identity,
                       stop=stop)
        loop = runner.run(state)
    except BaseException:  # finish pending checkpoint writes (of good states), close the logs
      checkpointer.close()
      writer.close()
      raise
    checkpointer.close()
    writer.flush()
  else:
    checkpointer.close()
    logging.info("Run already finished at step %d (total %d); reporting only.", start_step,
                 total_steps)

  history = list(loop["history"]) + ([loop["partial"]] if loop.get("partial") else [])
  wall_this_run = time.time() - run_start
  trained = state is not None
  results = reporting.build_results(
      config_dict=_config_dict(config),
      data_info={"name": data.name, "num_classes": num_classes,
                 "class_counts": [int(c) for c in data.class_counts],
                 "num_train": num_train, "num_meta": num_meta, "num_test": num_test,
                 "shot_groups": {k: np.flatnonzero(v).tolist() for k, v in groups.items()},
                 "many_threshold": int(config.many_threshold),
                 "few_threshold": int(config.few_threshold)},
      history=history,
      run_info={"steps": int(loop["step"]), "start_step": start_step,
                "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
                "devices": num_devices, "device_kind": devices[0].device_kind,
                "process_count": jax.process_count(),
                "wall_time_s": previous_wall + (wall_this_run if trained else 0.0),
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


class _Loop:
  """Steps loop["step"] .. total_steps - 1 with evaluation, checkpoints and the stop checks.

  Holds what changes from step to step (replicated state, step, epoch sums,
  first non-finite steps, history) so that the boundary work (evaluate,
  checkpoint) reads as methods rather than closures over reassigned names.
  """

  def __init__(self, *, config, data, loop, method, model, tx, dnet_tx, schedule, preprocessors,
               groups, steps_per_epoch, total_steps, checkpointer, writer, diff_and_weights,
               is_main, previous_wall, run_start, identity, stop):
    self.config, self.data, self.method = config, data, method
    self.schedule, self.groups = schedule, groups
    self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
    self.checkpointer, self.writer = checkpointer, writer
    self.diff_and_weights, self.is_main = diff_and_weights, is_main
    self.previous_wall, self.run_start = previous_wall, run_start
    self.identity, self.stop = identity, stop
    train_preprocess, meta_preprocess, eval_preprocess = preprocessors
    step_fn = methods.make_step_fn(method, config, model=model, tx=tx, dnet_tx=dnet_tx,
                                   learning_rate=schedule, axis_name=AXIS)
    self.p_train = jax.pmap(
        _make_train_fn(step_fn, train_preprocess, meta_preprocess, method.uses_dnet),
        axis_name=AXIS, donate_argnums=(0,))
    # meta_interval k > 1: Difficulty-Net is updated on steps with step % k == 0 only; the
    # other steps run a separately compiled step without the meta update (chosen here, on
    # the host: a lax.cond around the meta step is ~50x slower on XLA:CPU).
    self.meta_interval = int(config.meta_interval) if method.uses_dnet else 1
    self.p_train_plain = None
    if self.meta_interval > 1:
      plain_fn = methods.make_step_fn(method, config, model=model, tx=tx, dnet_tx=dnet_tx,
                                      learning_rate=schedule, axis_name=AXIS, update_dnet=False)
      self.p_train_plain = jax.pmap(
          _make_train_fn(plain_fn, train_preprocess, meta_preprocess, method.uses_dnet),
          axis_name=AXIS, donate_argnums=(0,))
    self.evaluator = _Evaluator(
        jax.pmap(_make_eval_fn(model, eval_preprocess, data.num_classes), axis_name=AXIS),
        int(config.eval_batch_size))
    self.every_steps = int(config.get("checkpoint_every_steps", 0))
    self.loop = dict(loop)
    self.step = int(loop["step"])
    self.history = list(loop["history"])
    self.epoch_sums = (parallel.replicate({k: np.float32(v) for k, v in loop["epoch_sums"].items()})
                       if loop.get("epoch_sums") else None)
    self.epoch_steps = int(loop.get("epoch_steps", 0))
    self.first_bad = None  # on-device {metric: (first non-finite step, value)}
    self.metrics = None
    self.p_state = None

  # -------------------------------------------------------------------------- checks

  def check_finite(self, host_first_bad=None) -> None:
    """Raises NonFiniteError if any step metric so far was NaN/Inf (one small transfer)."""
    if host_first_bad is None:
      if self.first_bad is None:
        return
      host_first_bad = jax.device_get(self.first_bad)
    entries = _non_finite_entries(host_first_bad)
    if not entries:
      return
    first_step, name, value = entries[0]
    others = [f"{n} is {_format_value(v)} from step {s}" for s, n, v in entries[1:]]
    self.checkpointer.wait_until_finished()
    latest = self.checkpointer.latest_step()
    kept = (f"the newest checkpoint, {self.checkpointer.step_path(latest)}, is the last good state"
            if latest is not None else "no checkpoint had been written")
    raise errors.NonFiniteError(
        f"step {first_step}: {name} is {_format_value(value)}"
        + (f" (also {'; '.join(others)})" if others else "")
        + f". Non-finite training loss or gradient: the run stopped at step {self.step} without "
        f"saving its state; {kept}. Lower the learning rate (learning_rate="
        f"{self.config.learning_rate}) or check the data"
        + ("" if self.config.dtype == "float32" else
           f", or compute in float32 (dtype={self.config.dtype})") + ".")

  # -------------------------------------------------------------------------- checkpoints

  def save(self, *, partial_record=None, pending_evaluation=False) -> bool:
    """Checkpoints the current state and bookkeeping under the current step."""
    self.check_finite()
    best = reporting.select_final_and_best(self.history)[1]
    self.loop = {
        "version": _LOOP_VERSION, "step": self.step, "steps_per_epoch": self.steps_per_epoch,
        "num_train": _split_sizes(self.data)[0],
        # Position in the data order: batch `position_in_epoch` of the permutation (seed, epoch).
        "seed": int(self.config.seed), "epoch": self.step // self.steps_per_epoch,
        "position_in_epoch": self.step % self.steps_per_epoch,
        "history": self.history,
        "best_val": (None if best is None else
                     {k: best[k] for k in ("epoch", "step", "val_accuracy")}),
        "epoch_sums": (_to_host_scalars(self.epoch_sums)
                       if (self.epoch_sums is not None and self.epoch_steps) else None),
        "epoch_steps": self.epoch_steps, "partial": partial_record,
        "pending_evaluation": bool(pending_evaluation),
        "wall_time_s": self.previous_wall + time.time() - self.run_start,
        "config": _training_fields(self.config),
    }
    return self.checkpointer.save(self.step, parallel.unreplicate(self.p_state), self.loop,
                                  identity=self.identity)

  # -------------------------------------------------------------------------- evaluation

  def evaluate(self):
    if isinstance(self.data, streaming.StreamingData):
      val_correct, val_total = self.evaluator.stream_counts(self.p_state,
                                                            self.data.eval_batches("meta"))
      test_correct, test_total = self.evaluator.stream_counts(self.p_state,
                                                              self.data.eval_batches("test"))
    else:
      val_correct, val_total = self.evaluator.counts(self.p_state, self.data.x_meta,
                                                     self.data.y_meta)
      test_correct, test_total = self.evaluator.counts(self.p_state, self.data.x_test,
                                                       self.data.y_test)
    class_accuracy = np.asarray(dmath.accuracy_from_counts(
        jnp.asarray(val_correct, jnp.float32), jnp.asarray(val_total, jnp.float32)))
    test = reporting.accuracy_summary(test_correct, test_total, self.groups)
    return class_accuracy, val_correct, val_total, test

  def epoch_record(self, class_accuracy, val_correct, val_total, test, epoch, partial) -> dict:
    """One evaluation's record. `difficulty` and `class_weights` are those the method
    derives from the accuracy just measured, i.e. what the next epoch starts with."""
    difficulty, weights = jax.device_get(self.diff_and_weights(
        parallel.unreplicate(self.p_state.dnet_params), jnp.asarray(class_accuracy)))
    sums = _to_host_scalars(self.epoch_sums) if self.epoch_sums is not None else {}
    means = {k: v / max(self.epoch_steps, 1) for k, v in sums.items()}
    return {
        "epoch": epoch, "step": self.step, "partial": partial,
        "train_loss": means.get("train_loss"),
        "train_metrics": means,
        "learning_rate": float(self.schedule(max(self.step - 1, 0))),
        "val_accuracy": float(val_correct.sum() / max(val_total.sum(), 1.0)),
        "val_per_class": [float(a) for a in class_accuracy],
        "test": test,
        "difficulty": [float(d) for d in difficulty],
        "class_weights": [float(w) for w in weights],
    }

  def at_boundary(self) -> bool:
    return self.step % self.steps_per_epoch == 0 or self.step == self.total_steps

  def boundary(self) -> None:
    """Epoch end (or the last step inside an epoch): evaluate, refresh a, record, checkpoint."""
    self.check_finite()  # never evaluate, record or save a state that went bad
    epoch_done = self.step % self.steps_per_epoch == 0
    epoch = self.step // self.steps_per_epoch if epoch_done else self.step / self.steps_per_epoch
    class_accuracy, val_correct, val_total, test = self.evaluate()
    if epoch_done:
      # Refresh the accuracy vector a that the next epoch's weights are computed from.
      self.p_state = self.p_state.replace(
          class_accuracy=parallel.replicate(jnp.asarray(class_accuracy)))
    record = self.epoch_record(class_accuracy, val_correct, val_total, test, epoch,
                               partial=not epoch_done)
    self.writer.write_scalars(self.step, {
        "epoch": float(epoch), "train_loss_epoch": record["train_loss"],
        "val_accuracy": record["val_accuracy"], "test_accuracy": test["overall"],
        **{f"test_{g}": test[g] for g in ("many", "medium", "few") if test[g] is not None}})
    self.writer.flush()
    logging.info("epoch %s step %d: train loss %.4f, val %.2f%%, test %.2f%% "
                 "(many %s, medium %s, few %s)", f"{epoch:.2f}" if not epoch_done else epoch,
                 self.step, record["train_loss"] if record["train_loss"] is not None else np.nan,
                 100 * record["val_accuracy"], 100 * test["overall"],
                 *(reporting.format_percent(test[g]) for g in ("many", "medium", "few")))
    if epoch_done:
      self.history.append(record)
      self.epoch_sums, self.epoch_steps = None, 0
      if ((self.step // self.steps_per_epoch) % int(self.config.checkpoint_every_epochs) == 0
          or self.step == self.total_steps
          or (self.every_steps and self.step % self.every_steps == 0)):
        self.save()
    else:  # stopped by max_steps inside an epoch: keep the un-refreshed state
      self.save(partial_record=record)

  # -------------------------------------------------------------------------- the loop

  def run(self, state) -> dict:
    """Runs the remaining steps; returns the bookkeeping of the last checkpoint."""
    config, data, method = self.config, self.data, self.method
    self.p_state = parallel.replicate(state)
    del state
    if self.loop.get("pending_evaluation") and self.at_boundary():
      self.boundary()  # the evaluation a SIGTERM at this epoch end postponed
    self.loop["pending_evaluation"] = False
    log_every = int(config.log_every_steps)
    logging.info("Training %s for steps %d..%d (%d per epoch) on %d device(s).", method.name,
                 self.step, self.total_steps, self.steps_per_epoch, jax.device_count())
    bar = reporting.progress_bar(self.total_steps, self.step,
                                 enabled=self.is_main and bool(config.progress_bar))
    last_log_time, last_log_step = time.time(), self.step
    batch_size = int(config.batch_size)

    if isinstance(data, streaming.StreamingData):  # this process's part of each global batch
      to_devices = parallel.shard_batch
      stream = data.train_stream(self.step, self.total_steps, with_meta=method.uses_dnet)
    else:  # global batches, cut into this process's part by _to_devices
      to_devices = _to_devices
      stream = input_pipeline.train_stream(
          data, seed=int(config.seed), start_step=self.step, end_step=self.total_steps,
          batch_size=batch_size,
          meta_batch_size=int(config.meta_batch_size) if method.uses_dnet else None)

    def put(item):
      s, batch, meta = item
      return s, to_devices(batch), (to_devices(meta) if meta else None)

    for step_index, batch, meta in input_pipeline.prefetch_to_device(stream, 2, put):
      if method.uses_dnet:
        p_train = (self.p_train if step_index % self.meta_interval == 0
                   else self.p_train_plain)
        self.p_state, self.metrics = p_train(self.p_state, batch, meta)
      else:
        self.p_state, self.metrics = self.p_train(self.p_state, batch)
      # Epoch sums and first non-finite steps stay on the device: no transfer here.
      self.epoch_sums, self.first_bad = _accumulate(self.epoch_sums, self.first_bad,
                                                    self.metrics, self.p_state.step)
      self.step = step_index + 1
      self.epoch_steps += 1
      bar.update(1)

      if self.step % log_every == 0 or self.step == self.total_steps:
        # The only per-interval device->host transfer: metrics and the non-finite record.
        host_metrics, host_first_bad = jax.device_get((self.metrics, self.first_bad))
        self.check_finite(host_first_bad)
        scalars = {k: float(np.ravel(v)[0]) for k, v in host_metrics.items()}
        now = time.time()
        scalars["images_per_sec"] = ((self.step - last_log_step) * batch_size
                                     / max(now - last_log_time, 1e-9))
        last_log_time, last_log_step = now, self.step
        self.writer.write_scalars(self.step, scalars)
        bar.set_postfix(loss=f"{scalars['train_loss']:.4f}",
                        img_s=f"{scalars['images_per_sec']:.0f}",
                        lr=f"{scalars.get('learning_rate', float(self.schedule(self.step - 1))):.3g}")

      if self.stop.should_stop(self.step):
        bar.close()
        self.preempt()
      if self.at_boundary():
        self.boundary()
      elif self.every_steps and self.step % self.every_steps == 0:
        self.save()  # inside an epoch: the position and the partial sums go with the state
    bar.close()
    jax.block_until_ready(self.p_state)
    self.loop.update(step=self.step, history=self.history)
    return self.loop

  def preempt(self) -> None:
    """Saves a checkpoint at this step boundary and raises `errors.Preempted`."""
    # At an epoch end the evaluation is left to the resumed run (it may take minutes).
    self.save(pending_evaluation=self.at_boundary())
    self.checkpointer.wait_until_finished()
    path = self.checkpointer.step_path(self.step)
    logging.warning("Stopped by %s at step %d; checkpoint %s saved.", self.stop.signal_name,
                    self.step, path)
    raise errors.Preempted(
        f"Stopped by {self.stop.signal_name} after step {self.step} of {self.total_steps}; the "
        f"checkpoint {path} holds everything needed to continue. Run the same command again "
        f"to resume from step {self.step} (exit code {errors.EXIT_PREEMPTED}).",
        step=self.step, checkpoint=path)
