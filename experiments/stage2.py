"""`train_stage2(config, workdir)`: classifier re-training (LAS, cRT, LWS) of a stage-1 run.

  load the stage-1 run (results.json for its config, checkpoints/ for its state)
  check that the model and data fields of `config` are those of the stage-1 run
  restore its classifier params and BatchNorm statistics into the abstract state that
    `experiment.build` gives for the stage-1 config, after checking its identity
  experiment.build_stage2(...), then `trainer.run`: the loop of stage 1 (SIGTERM,
    exact resume, mid-epoch checkpoints, NaN checks), with the stage-2 sampler

The backbone (every parameter but the classifier layer) is frozen, and so are
its BatchNorm statistics unless `stage2.shift_bn` (MiSLAS's re-estimation on
the class-balanced batches). results.json adds "stage1" (the run it started
from and the re-evaluation of its restored network, which must reproduce
stage 1's final test accuracy) and "stage2" (method, LAS smoothing per class,
final logit scales).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import jax
import ml_collections
from absl import logging

from dnet_jax import parallel
from dnet_jax import stage2 as s2
from dnet_jax.models import MODEL_NAMES
from experiments import checkpoint_records
from experiments import checkpointing
from experiments import datasets
from experiments import errors
from experiments import experiment as experiment_lib
from experiments import loop as loop_lib
from experiments import reporting
from experiments import sampling
from experiments import trainer

# Stage-1 config fields that define the network and the data; stage 2 must use the same.
_MUST_MATCH = ("model", "dtype")
_DATA_FIELDS_NOT_CHECKED = ("data_dir",)
las_smoothing = experiment_lib.las_smoothing
INIT_CHECKPOINTS = ("best_val", "best_test", "last")
LR_SCHEDULES = ("cosine", "per_epoch_cosine")


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
  if s.sampler not in sampling.SAMPLERS:
    raise errors.InvalidInputError(f"Unknown stage2.sampler {s.sampler!r}; choose one of: "
                                   f"{', '.join(sampling.SAMPLERS)}.")
  if s.las_rule not in s2.LAS_RULES:
    raise errors.InvalidInputError(f"Unknown stage2.las_rule {s.las_rule!r}; choose one of: "
                     f"{', '.join(s2.LAS_RULES)}.")
  if s.las_off_target not in s2.LAS_OFF_TARGET:
    raise errors.InvalidInputError(f"Unknown stage2.las_off_target {s.las_off_target!r}; choose one of: "
                     f"{', '.join(s2.LAS_OFF_TARGET)}.")
  for field in ("num_epochs", "batch_size"):
    if int(s[field]) < 1:
      raise errors.InvalidInputError(f"stage2.{field} must be >= 1, got {s[field]}.")
  init = str(s.get("init_checkpoint", "best_val"))
  if init not in INIT_CHECKPOINTS:
    raise errors.InvalidInputError(f"Unknown stage2.init_checkpoint {init!r}; choose one of: "
                                   f"{', '.join(INIT_CHECKPOINTS)}.")
  if str(s.get("lr_schedule", "cosine")) not in LR_SCHEDULES:
    raise errors.InvalidInputError(f"Unknown stage2.lr_schedule {s.lr_schedule!r}; choose one "
                                   f"of: {', '.join(LR_SCHEDULES)}.")
  if str(s.get("train_transform", "stage1")) not in ("stage1", "test"):
    raise errors.InvalidInputError(f"Unknown stage2.train_transform {s.train_transform!r}; "
                                   "choose stage1 or test.")
  if str(s.get("train_transform", "stage1")) == "test":
    from experiments import streaming  # pylint: disable=g-import-not-at-top
    if streaming.is_streaming(config):
      raise errors.InvalidInputError(
          "stage2.train_transform='test' is for in-memory data sets; streamed data is "
          "augmented by tf.data as in stage 1. Set --config.stage2.train_transform=stage1.")
  pattern = str(s.get("shift_bn_only", ""))
  try:
    re.compile(pattern)
  except re.error as e:
    raise errors.InvalidInputError(f"stage2.shift_bn_only {pattern!r} is not a regular "
                                   f"expression ({e}).") from e
  if pattern and not bool(s.shift_bn):
    raise errors.InvalidInputError("stage2.shift_bn_only is set but stage2.shift_bn is False; "
                                   "set --config.stage2.shift_bn=True or clear shift_bn_only.")
  if s.method == "las" and not (bool(s.get("las_head", True)) or bool(s.las_scales)):
    raise errors.InvalidInputError("stage2.las_head and stage2.las_scales are both False: "
                                   "stage 2 would train nothing.")
  if float(s.get("scales_weight_decay", 0.0)) < 0:
    raise errors.InvalidInputError(f"stage2.scales_weight_decay must be >= 0, got "
                                   f"{s.scales_weight_decay}.")
  try:
    experiment_lib.stage2_sampler(config)
  except errors.InvalidInputError as e:
    raise errors.InvalidInputError(f"stage2.sampler: {e}") from e
  if int(s.max_steps) < 0:
    raise errors.InvalidInputError(f"stage2.max_steps must be >= 0 (0 = no limit), got {s.max_steps}.")
  if config.model not in MODEL_NAMES:
    raise errors.InvalidInputError(f"Unknown model {config.model!r}; choose one of: {', '.join(MODEL_NAMES)}.")

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


def stage1_checkpoint_dir(stage1_workdir: str, init_checkpoint: str) -> str:
  """Where the stage-1 state that stage 2 starts from is: checkpoints/ ("last") or
  best_checkpoints/best_val|best_test (kept by the stage-1 loop, one step each)."""
  if init_checkpoint == "last":
    return os.path.join(stage1_workdir, "checkpoints")
  return os.path.join(stage1_workdir, loop_lib.BEST_DIR, init_checkpoint)


def restore_stage1(stage1_workdir: str, stage1_results: dict, dataset,
                   init_checkpoint: str = "last") -> tuple[Any, Any, int]:
  """(params, batch_stats, step) of the stage-1 state `init_checkpoint` names: the
  newest complete checkpoint ("last") or the best-validation / best-test epoch.

  The checkpoint's identity (model, classes, method, image shape, array shapes)
  is checked against the stage-1 experiment that the run's results.json
  describes, built by `experiment.build`, before anything is restored.
  """
  directory = stage1_checkpoint_dir(stage1_workdir, init_checkpoint)
  if not os.path.isdir(directory):
    if init_checkpoint != "last":
      raise errors.InvalidInputError(
          f"No {os.path.relpath(directory, stage1_workdir)}/ in stage1_workdir "
          f"{stage1_workdir!r}: the stage-1 run kept no {init_checkpoint} state (it was run "
          "by an older version or never finished an epoch). Use "
          "--config.stage2.init_checkpoint=last to start from its newest checkpoint.")
    raise errors.InvalidInputError(f"No checkpoints/ in stage1_workdir {stage1_workdir!r}; is it "
                                   "a stage-1 run of experiments.train?")
  stage1_config = ml_collections.ConfigDict(stage1_results["config"])
  stage1 = experiment_lib.build(stage1_config, dataset)
  with checkpointing.Checkpointer(directory, asynchronous=False) as checkpointer:
    step = checkpointer.latest_step()
    if step is None:
      raise errors.InvalidInputError(f"No complete checkpoint in {directory}; run stage 1 to the "
                                     "end first.")
    problems = checkpoint_records.compatibility_problems(checkpointer.read_meta(step), stage1.identity)
    if problems:
      raise errors.CheckpointError(
          f"The stage-1 checkpoint {checkpointer.step_path(step)} is not the network that "
          f"{os.path.join(stage1_workdir, reporting.RESULTS_FILE)} describes (a "
          f"{stage1_config.model} for {dataset.num_classes} classes trained with "
          f"{stage1_config.method!r}): {'; '.join(problems)}. Point stage1_workdir at the "
          "stage-1 run the checkpoint belongs to.")
    state, _ = checkpointer.restore(step, stage1.abstract_state)
  total = stage1_results.get("total_steps")
  if init_checkpoint == "last" and total is not None and step < int(total):
    logging.warning("The stage-1 run in %s stopped at step %d of %d; stage 2 starts from that "
                    "unfinished network.", stage1_workdir, step, int(total))
  return state.params, state.batch_stats, int(step)


@dataclasses.dataclass
class Stage2Setup:
  """A stage-2 run: the stage-1 run it starts from, the dataset and the experiment."""
  stage1_workdir: str
  stage1_results: dict
  stage1_step: int
  params1: Any
  batch_stats1: Any
  dataset: Any
  experiment: Any


def prepare_stage2(config: ml_collections.ConfigDict) -> Stage2Setup:
  """Checks the config against the stage-1 run, restores it and builds the experiment.

  Raises InvalidInputError for a missing stage-1 run or checkpoint, or a config
  whose model or data differ from the stage-1 run's; CheckpointError for a
  stage-1 checkpoint of another network, or a corrupt one.
  """
  validate_stage2_config(config)
  stage1_workdir = os.path.abspath(str(config.stage1_workdir))
  stage1_results = load_stage1_results(stage1_workdir)
  check_compatible(config, stage1_results["config"])
  dataset = datasets.load(config, batch_size=int(config.stage2.batch_size), with_meta=False)
  if [int(c) for c in dataset.class_counts] != list(stage1_results.get("class_counts", [])):
    raise errors.InvalidInputError(
        f"The training set here has class counts {dataset.class_counts.tolist()} but the "
        f"stage-1 run had {stage1_results.get('class_counts')}.")
  logging.info("Data: %s", dataset.summary())
  params1, batch_stats1, stage1_step = restore_stage1(
      stage1_workdir, stage1_results, dataset, str(config.stage2.get("init_checkpoint", "best_val")))
  exp = experiment_lib.build_stage2(config, dataset, params1, batch_stats1)
  return Stage2Setup(stage1_workdir, stage1_results, stage1_step, params1, batch_stats1,
                     dataset, exp)


def load_stage2_state(config: ml_collections.ConfigDict, workdir: str) -> s2.Stage2State:
  """The newest stage-2 state saved in `workdir` (e.g. to use or inspect the trained model)."""
  setup = prepare_stage2(config)
  with checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                  asynchronous=False) as checkpointer:
    latest = checkpointer.latest_step()
    if latest is None:
      raise errors.InvalidInputError(f"No stage-2 checkpoint in {workdir}.")
    state, _ = checkpointer.restore(latest, setup.experiment.abstract_state)
  return state


def _restored_test(setup: Stage2Setup, config, groups) -> dict:
  """Test accuracy of the restored stage-1 network (unit logit scales, stage-1 head)."""
  s = config.stage2
  tx = s2.stage2_optimizer(0.0)
  state = s2.create_stage2_state(
      jax.random.key(0), setup.params1, setup.batch_stats1,
      s2.stage2_trainable("lws", setup.params1, setup.dataset.num_classes,
                          head_name=str(s.head_name)), tx)
  counts = loop_lib.eval_counts(setup.experiment.eval_step, parallel.replicate(state),
                                setup.dataset.eval_batches("test"))
  return reporting.accuracy_summary(*counts, groups)


_INIT_NOTES = {
    "best_val": "stage-1 epoch of best validation accuracy",
    "best_test": "stage-1 epoch of best TEST accuracy (the public ImageNet/Places habit; "
                 "it selects on the test set)",
    "last": "newest stage-1 checkpoint"}


def _without_per_class(block: dict | None) -> dict | None:
  return None if block is None else {k: v for k, v in block.items() if k != "per_class"}


def train_stage2(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Stage-2 training from `config.stage1_workdir`; writes and returns results.json's payload.

  Raises as `prepare_stage2`, and as `trainer.run` (NonFiniteError, Preempted, ...).
  """
  validate_stage2_config(config)
  if os.path.abspath(workdir) == os.path.abspath(str(config.stage1_workdir)):
    raise errors.InvalidInputError("The stage-2 workdir must differ from stage1_workdir.")
  setup = prepare_stage2(config)
  s, stage1_results = config.stage2, setup.stage1_results
  stage1_method = stage1_results["config"].get("method")

  def check_extra(saved: dict, path: str) -> None:
    if saved.get("stage1_step") != setup.stage1_step:
      raise errors.CheckpointError(
          f"The stage-2 checkpoint {path} started from step {saved.get('stage1_step')} of the "
          f"stage-1 run {setup.stage1_workdir}, which is now at step {setup.stage1_step}; use a "
          "new workdir (or delete this one) to redo stage 2.")

  def add_results(results: dict, progress) -> None:
    groups = setup.dataset.shot_groups(int(config.many_threshold), int(config.few_threshold))
    records = progress.records()
    eps_head, eps_tail = las_smoothing(config)
    las = s.method == "las"
    results["history"]["logit_scales"] = [r.get("logit_scales") for r in records]
    results["stage1"] = {
        "workdir": setup.stage1_workdir, "step": setup.stage1_step, "method": stage1_method,
        "meta_grad": stage1_results["config"].get("meta_grad"),
        "final_test": _without_per_class(stage1_results.get("final_test")),
        "best_val_test": _without_per_class(stage1_results.get("best_val_test")),
        "max_test": _without_per_class(stage1_results.get("max_test")),
        "restored_test": _without_per_class(_restored_test(setup, config, groups))}
    results["stage2"] = {
        "method": s.method, "sampler": s.sampler, "shift_bn": bool(s.shift_bn),
        "shift_bn_only": str(s.get("shift_bn_only", "")),
        "init_checkpoint": str(s.get("init_checkpoint", "best_val")),
        "init_checkpoint_note": _INIT_NOTES[str(s.get("init_checkpoint", "best_val"))],
        "trainable": sorted(setup.experiment.abstract_state.trainable),
        "las_eps_head": eps_head if las else None, "las_eps_tail": eps_tail if las else None,
        "las_epsilon_per_class": (s2.label_aware_epsilons(
            setup.dataset.class_counts, eps_head, eps_tail).tolist() if las else None),
        "logit_scales": records[-1].get("logit_scales") if records else None}

  def header(results: dict) -> str:
    final = (stage1_results.get("final_test") or {}).get("overall")
    return (f"Stage 2: {s.method} on the stage-1 {stage1_method} run {setup.stage1_workdir} "
            f"(step {setup.stage1_step}); stage-1 test, final epoch: "
            f"{reporting.format_percent(final)}")

  return trainer.run(
      config, workdir, setup.dataset, setup.experiment,
      label=f"{stage1_method} + {s.method} (stage 2)", learned_difficulty=False,
      compare_with=str(config.compare_with) or setup.stage1_workdir,
      extra={"stage1_step": setup.stage1_step}, check_extra=check_extra,
      add_results=add_results, header=header)
