"""`train_and_evaluate(config, workdir)` and `run`, which every stage goes through.

  validate the config                         (experiments/validation.py)
  dataset = datasets.load(config)             in memory or streamed; checks the data
  experiment = experiment.build(config, dataset)
  run(config, workdir, dataset, experiment):
    resume from the newest complete checkpoint of this experiment, or start afresh
    Loop(...).run(state)                      (experiments/loop.py)
    results.json, PNG plots, a summary        (process 0 only)

A finished run is not trained or evaluated again: its results are reported
(results.json is rewritten only if it is missing or older than the checkpoint).
Exit codes and errors: experiments/errors.py.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import jax
import ml_collections
from absl import logging

from experiments import checkpointing
from experiments import datasets
from experiments import errors
from experiments import experiment as experiment_lib
from experiments import loop as loop_lib
from experiments import metric_writers
from experiments import plots
from experiments import preemption
from experiments import pretrained_init
from experiments import reporting
from experiments import validation

# Fields that may change between a run and its resumption without changing what is trained
# (the schedule's own fields are checked separately: `Experiment.schedule_fields`).
_RUN_ONLY_FIELDS = ("max_steps", "num_epochs", "compare_with", "progress_bar", "log_every_steps",
                    "checkpoint_every_epochs", "checkpoint_every_steps", "max_checkpoints_to_keep",
                    "eval_batch_size", "data.data_dir", "stage2.max_steps", "stage2.num_epochs")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains and evaluates one stage-1 configuration; resumes from `workdir/checkpoints`.

  Returns the results dictionary that is also written to `workdir/results.json`
  (see `reporting.build_results`). Raises `errors.InvalidInputError` (config or
  data; before any compilation), `errors.CheckpointError`, `errors.NonFiniteError`,
  `errors.Preempted` (SIGTERM or SIGINT; a checkpoint was saved, or the signal came before
  training started: call again to continue).
  """
  validation.validate_config(config, jax.device_count())
  dataset = datasets.load(config)
  pretrained_init.check_path(str(config.get("pretrained_path", "") or ""))
  logging.info("Data: %s", dataset.summary())
  exp = experiment_lib.build(config, dataset)
  return run(config, workdir, dataset, exp, label=exp.name, learned_difficulty=exp.uses_meta,
             compare_with=str(config.compare_with))


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

  walk("", ml_collections.ConfigDict(config).to_dict())
  return flat


def _flag(field: str, value) -> str:
  """`--config.<field>=<value>` as the command line takes it."""
  if isinstance(value, (list, tuple)):
    return f'--config.{field}="({", ".join(str(v) for v in value)},)"'
  return f"--config.{field}={value}"


def _check_resumable(saved: loop_lib.Progress, fresh: loop_lib.Progress, step: int,
                     path: str) -> None:
  """A checkpoint's `Progress` must fit this run's data, batch size and schedule."""
  if saved.step != step:
    raise errors.CheckpointError(f"Checkpoint {path} records step {saved.step}, not {step}.")
  if (saved.steps_per_epoch, saved.num_train) != (fresh.steps_per_epoch, fresh.num_train):
    raise errors.CheckpointError(
        f"Checkpoint {path} was written with {saved.num_train} training images and "
        f"{saved.steps_per_epoch} steps per epoch, but this config gives {fresh.num_train} and "
        f"{fresh.steps_per_epoch}: use a new --workdir for a changed data set or batch size. "
        "Nothing was deleted.")
  changed = sorted(k for k in set(saved.schedule) | set(fresh.schedule)
                   if saved.schedule.get(k) != fresh.schedule.get(k))
  if changed:
    raise errors.InvalidInputError(
        f"Checkpoint {path} was trained with another learning-rate schedule: "
        + "; ".join(f"{k}: {saved.schedule.get(k)!r} there, {fresh.schedule.get(k)!r} now"
                    for k in changed)
        + ". Resuming would change the learning rate of the remaining steps; rerun with "
        + " ".join(_flag(k, saved.schedule[k]) for k in changed
                   if k != "steps_per_epoch" and saved.schedule.get(k) is not None)
        + ", or use a new --workdir.")
  diffs = sorted(k for k in set(saved.config) | set(fresh.config)
                 if saved.config.get(k) != fresh.config.get(k))
  if diffs:
    logging.warning(
        "Resuming a run whose checkpoint was written with a different config: %s. The results "
        "mix both settings (results.json lists them under 'config_history'); use a new workdir "
        "to start afresh.",
        "; ".join(f"{k}: {saved.config.get(k)} -> {fresh.config.get(k)}" for k in diffs))
    saved.config_history.append(
        {"step": step, "changed": {k: [saved.config.get(k), fresh.config.get(k)] for k in diffs}})


def _resume(checkpointer, exp, fresh: loop_lib.Progress, check_extra):
  """(progress, state or None): the newest checkpoint's, or a new run's; None = nothing to train."""
  if jax.process_count() == 1:
    # TODO(multi-process): every process would have to agree before one renames.
    checkpointer.recover_replaced()
    checkpointer.set_aside_incomplete()
  latest = checkpointer.latest_step()
  if latest is None:
    return fresh, (exp.init_state() if exp.total_steps > 0 else None)
  checkpointer.check_compatible(latest, exp.identity)
  path = checkpointer.step_path(latest)
  saved = loop_lib.Progress.from_json(checkpointer.restore_loop(latest), path)
  _check_resumable(saved, fresh, latest, path)
  if check_extra is not None:
    check_extra(saved.extra, path)
  saved.config, saved.extra = fresh.config, fresh.extra
  if latest < exp.total_steps or saved.pending_evaluation:
    logging.info("Resumed from checkpoint %s (epoch %.2f).", path, latest / saved.steps_per_epoch)
    return saved, checkpointer.restore(latest, exp.abstract_state)[0]
  return saved, None


def _reported_results(workdir: str, step: int) -> dict | None:
  """results.json of this workdir if it reports the run at `step`, else None."""
  path = os.path.join(workdir, reporting.RESULTS_FILE)
  try:
    with open(path, encoding="utf-8") as f:
      results = json.load(f)
  except (OSError, ValueError):
    return None
  return results if results.get("steps") == step else None


def run(config, workdir: str, dataset, exp, *, label: str, learned_difficulty: bool,
        compare_with: str = "", extra: dict | None = None,
        check_extra: Callable | None = None, add_results: Callable | None = None,
        header: Callable | None = None) -> dict[str, Any]:
  """Trains `exp` on `dataset` in `workdir` (resuming), then reports; returns the results.

  `extra` goes into every checkpoint's `Progress`; `check_extra(saved_extra, path)`
  refuses a checkpoint whose extra does not fit. `add_results(results, progress)`
  adds blocks to results.json; `header(results)` is printed above the summary.
  """
  run_start = time.time()
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  if is_main:
    os.makedirs(workdir, exist_ok=True)
  fresh = loop_lib.Progress(steps_per_epoch=exp.steps_per_epoch, num_train=dataset.num_train,
                            schedule=exp.schedule_fields, config=_training_fields(config),
                            extra=dict(extra or {}))
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                            int(config.max_checkpoints_to_keep))
  try:
    preemption.raise_if_requested("while the data was loaded")
    progress, state = _resume(checkpointer, exp, fresh, check_extra)
    start_step = progress.step
    if state is None:
      checkpointer.close()
      reported = _reported_results(workdir, progress.step)
      if reported is not None:  # finished and reported: report again, rewrite nothing
        return _print_report(dict(reported, start_step=start_step,
                                  wall_time_this_run_s=time.time() - run_start),
                             workdir, header, is_main, label=label)
      writer_kind = "none (nothing trained)"
    else:
      progress, writer_kind = _train(config, exp, dataset, progress, state, checkpointer,
                                     is_main)
  except BaseException:
    checkpointer.close()
    raise
  checkpointer.close()
  groups = dataset.shot_groups(int(config.many_threshold), int(config.few_threshold))
  wall = time.time() - run_start
  results = reporting.build_results(
      config_dict=ml_collections.ConfigDict(config).to_dict(),
      data_info=dataset.info(int(config.many_threshold), int(config.few_threshold)),
      history=progress.records(),
      run_info={"steps": progress.step, "start_step": start_step,
                "total_steps": exp.total_steps, "steps_per_epoch": exp.steps_per_epoch,
                "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind,
                "process_count": jax.process_count(),
                "wall_time_s": progress.wall_time_s, "wall_time_this_run_s": wall,
                "metric_writer": writer_kind,
                "workdir": workdir})
  # Every resumption with a changed config (results.json's "config" is the latest one).
  results["config_history"] = list(progress.config_history)
  if add_results is not None:
    add_results(results, progress)
  if is_main:
    labelled = dict(results, config=dict(results["config"], method=label))
    results["plots"] = plots.write_plots(
        workdir, labelled, groups, (int(config.many_threshold), int(config.few_threshold)),
        learned_difficulty=learned_difficulty, compare_with=compare_with)
    reporting.write_json(os.path.join(workdir, reporting.RESULTS_FILE), results)
  return _print_report(results, workdir, header, is_main, label=label)


def _train(config, exp, dataset, progress, state, checkpointer, is_main):
  writer, writer_kind = metric_writers.create_metric_writer(os.path.dirname(checkpointer.directory),
                                                       is_main=is_main)
  logging.info("Metric writer: %s", writer_kind)
  periodic = loop_lib.Periodic(
      steps_per_epoch=exp.steps_per_epoch, total_steps=exp.total_steps,
      log_every_steps=int(config.log_every_steps),
      checkpoint_every_epochs=int(config.checkpoint_every_epochs),
      checkpoint_every_steps=int(config.get("checkpoint_every_steps", 0)))
  groups = dataset.shot_groups(int(config.many_threshold), int(config.few_threshold))
  best = {}
  if int(config.get("stage", 1)) == 1:  # stage 2 may start from either (stage2.init_checkpoint)
    root = os.path.join(os.path.dirname(checkpointer.directory), loop_lib.BEST_DIR)
    best = {kind: checkpointing.Checkpointer(os.path.join(root, kind), max_to_keep=1)
            for kind in loop_lib.BEST_KINDS}
  try:
    with preemption.StopSignal() as stop:
      progress = loop_lib.Loop(
          exp, dataset, progress, periodic=periodic, groups=groups, checkpointer=checkpointer,
          writer=writer, stop=stop, is_main=is_main,
          progress_bar=bool(config.progress_bar), best_checkpointers=best).run(state)
    return progress, writer_kind
  finally:
    for kept in best.values():
      kept.close()
    writer.close()


def _print_report(results: dict, workdir: str, header, is_main: bool, label: str | None = None):
  if is_main:
    if header is not None:
      print(header(results), flush=True)
    shown = results if label is None else dict(results, config=dict(results["config"],
                                                                    method=label))
    print(reporting.format_summary(shown, workdir, results.get("plots") or {}), flush=True)
  return results
