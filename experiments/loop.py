"""The one training loop of both stages: a `for` over batches, periodic actions from `Periodic`.

    for step, batch, meta_batch in dataset.train_batches(progress.step, total_steps):
      state, metrics = experiment.train_step(state, batch, meta_batch)
      sums and the first non-finite step of each metric are kept on the device
      log?        -> metric writers (one device->host transfer), NaN/Inf check
      SIGTERM?    -> checkpoint (evaluation left to the resumed run at an epoch end), Preempted
      evaluate?   -> meta and test counts; at an epoch end experiment.refresh(state, a)
    (experiment.refresh_at == "epoch_start": also a from the initial network before step 0)
      checkpoint? -> state + `Progress` (NaN/Inf checked first; a failed save is an error)

`Periodic` is the one place where log / evaluate / checkpoint are decided.
`Progress` is the bookkeeping saved as JSON with every checkpoint: the step,
the per-epoch history, the partial epoch's metric sums, whether an evaluation
is pending, and the schedule the run was started with.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dnet_jax import difficulty as dmath
from dnet_jax import parallel
from experiments import errors
from experiments import metric_writers
from experiments import reporting

# Step metrics named first in a non-finite report, when several go bad at the same step.
_NON_FINITE_ORDER = ("train_loss", "grad_norm", "ce", "dnet_grad_norm", "meta_ce", "driver_loss")
_PREFETCH = 2


@dataclasses.dataclass(frozen=True)
class Periodic:
  """Which periodic actions follow step `step` (1-based: the number of steps done)."""
  steps_per_epoch: int
  total_steps: int
  log_every_steps: int
  checkpoint_every_epochs: int
  checkpoint_every_steps: int = 0

  def epoch_end(self, step: int) -> bool:
    return step % self.steps_per_epoch == 0

  def log(self, step: int) -> bool:
    return step % self.log_every_steps == 0 or step == self.total_steps

  def evaluate(self, step: int) -> bool:
    return self.epoch_end(step) or step == self.total_steps

  def checkpoint(self, step: int) -> bool:
    every_steps = self.checkpoint_every_steps
    return (step == self.total_steps or (every_steps > 0 and step % every_steps == 0)
            or (self.epoch_end(step)
                and (step // self.steps_per_epoch) % self.checkpoint_every_epochs == 0))


@dataclasses.dataclass
class Progress:
  """A run's bookkeeping, saved with every checkpoint (`to_json` / `from_json`)."""
  steps_per_epoch: int
  num_train: int
  step: int = 0
  history: list = dataclasses.field(default_factory=list)
  epoch_sums: dict | None = None      # metric sums of the current (partial) epoch
  epoch_steps: int = 0
  partial: dict | None = None         # the record of an evaluation inside an epoch
  pending_evaluation: bool = False    # stopped at an evaluation step before evaluating
  wall_time_s: float = 0.0
  schedule: dict = dataclasses.field(default_factory=dict)
  config: dict = dataclasses.field(default_factory=dict)
  extra: dict = dataclasses.field(default_factory=dict)
  # One entry per resumption with a changed config: {"step": ..., "changed": {field: [old, new]}}.
  config_history: list = dataclasses.field(default_factory=list)

  VERSION = 3

  def records(self) -> list[dict]:
    return list(self.history) + ([self.partial] if self.partial else [])

  def to_json(self) -> dict:
    epoch, position = divmod(self.step, self.steps_per_epoch)
    return {"version": self.VERSION, **dataclasses.asdict(self), "epoch": epoch,
            "position_in_epoch": position}

  @classmethod
  def from_json(cls, record: dict, path: str) -> "Progress":
    if record.get("version") != cls.VERSION:
      raise errors.CheckpointError(
          f"Checkpoint {path} holds bookkeeping of version {record.get('version')!r}; this "
          f"runner writes version {cls.VERSION}. Use a new --workdir.")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in record.items() if k in names})


@jax.jit
def accumulate(sums, first_bad, metrics, step):
  """Adds a step's metrics to the epoch sums and records non-finite values, on the device.

  `first_bad[name] = (s, v)`: s is the first step whose metric `name` was NaN or
  Inf (-1 while none) and v that value; `step` is the step count after the
  update. None for `sums` / `first_bad` starts them.
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


def non_finite_entries(host_first_bad) -> list[tuple[int, str, float]]:
  """[(step, metric name, value)] of the metrics that went bad, earliest (and most telling) first."""
  if host_first_bad is None:
    return []
  entries = [(int(np.ravel(s)[0]), name, float(np.ravel(v)[0]))
             for name, (s, v) in host_first_bad.items() if np.ravel(s)[0] >= 0]
  rank = {name: i for i, name in enumerate(_NON_FINITE_ORDER)}
  return sorted(entries, key=lambda e: (e[0], rank.get(e[1], len(rank)), e[1]))


def _format_value(value: float) -> str:
  return "nan" if np.isnan(value) else ("inf" if value > 0 else "-inf")


@jax.jit
def _add_trees(a, b):
  return jax.tree.map(jnp.add, a, b)


def eval_counts(eval_step, p_state, batches, max_in_flight: int = 4):
  """Per-class (correct, total) float64 [C] of `batches` (this process's part of a split).

  Counts are summed on the device (the eval step's psum spans every process);
  at most `max_in_flight` batches run ahead of the host, so memory stays bounded.
  """
  total, pending = None, []
  for batch in batches:
    out = eval_step(p_state, parallel.shard_batch(batch))
    total = out if total is None else _add_trees(total, out)
    pending.append(total)
    if len(pending) > max_in_flight:
      jax.block_until_ready(pending.pop(0))
  if total is None:
    raise ValueError("evaluation got no batches.")
  host = jax.device_get(parallel.unreplicate(total))
  return np.asarray(host["correct"], np.float64), np.asarray(host["total"], np.float64)


def _prefetch(iterator, size: int):
  """Places each (step, batch, meta) on the devices `size` elements ahead (device_put is async)."""
  iterator, queue = iter(iterator), collections.deque()

  def enqueue(n):
    for step, batch, meta in itertools.islice(iterator, n):
      queue.append((step, parallel.shard_batch(batch),
                    None if meta is None else parallel.shard_batch(meta)))

  enqueue(size)
  while queue:
    yield queue.popleft()
    enqueue(1)


BEST_DIR = "best_checkpoints"  # <workdir>/best_checkpoints/{best_val,best_test}/<step>
BEST_KINDS = ("best_val", "best_test")


def is_new_best(kind: str, history: list[dict], record: dict) -> bool:
  """Whether `record` (an epoch-end evaluation) beats every earlier one of `history` in
  validation ("best_val") or test ("best_test") accuracy; ties keep the earlier record,
  as `reporting.select_final_and_best` does."""
  value = (lambda r: r["val_accuracy"]) if kind == "best_val" else (lambda r: r["test"]["overall"])
  return all(value(record) > value(r) for r in history)


class Loop:
  """Runs `experiment` on `dataset` from `progress.step` to `periodic.total_steps`.

  `best_checkpointers` ({"best_val": Checkpointer, "best_test": Checkpointer}, each
  keeping one step) receive the state of every evaluation that beats all epoch-end
  records so far in validation / test accuracy, whatever the main checkpointer keeps; stage 2 starts
  from one of them (`stage2.init_checkpoint`).
  """

  def __init__(self, experiment, dataset, progress: Progress, *, periodic: Periodic, groups,
               checkpointer, writer, stop, is_main: bool, progress_bar: bool,
               best_checkpointers: dict | None = None):
    self.best_checkpointers = dict(best_checkpointers or {})
    self.exp, self.data, self.progress, self.periodic = experiment, dataset, progress, periodic
    self.groups, self.checkpointer, self.writer, self.stop = groups, checkpointer, writer, stop
    self.is_main, self.show_bar = is_main, progress_bar
    self.p_state = self.sums = self.first_bad = None
    self.started = time.time()
    self.wall_before = progress.wall_time_s
    if progress.epoch_sums:
      self.sums = parallel.replicate({k: np.float32(v) for k, v in progress.epoch_sums.items()})

  # ------------------------------------------------------------------ checks and saves

  def check_finite(self, host_first_bad=None) -> None:
    """Raises NonFiniteError if any step metric so far was NaN/Inf (one small transfer)."""
    if host_first_bad is None and self.first_bad is not None:
      host_first_bad = jax.device_get(self.first_bad)
    entries = non_finite_entries(host_first_bad)
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
        + f". Non-finite training loss or gradient: the run stopped at step {self.progress.step} "
        f"without saving its state; {kept}. {self.exp.non_finite_advice}.")

  def save(self, *, replace: bool = False) -> None:
    """Checkpoints the state and `Progress` under the current step; a failed save raises."""
    self.check_finite()
    p = self.progress
    p.epoch_sums = ({k: float(v) for k, v in jax.device_get(
        parallel.unreplicate(self.sums)).items()} if self.sums is not None and p.epoch_steps
                    else None)
    p.wall_time_s = self.wall_before + time.time() - self.started
    save = self.checkpointer.replace if replace else self.checkpointer.save
    if not save(p.step, parallel.unreplicate(self.p_state), p.to_json(),
                identity=self.exp.identity):
      raise errors.CheckpointError(
          f"Checkpoint {self.checkpointer.step_path(p.step)} was not written (orbax declined "
          "the save). Check the free space and permissions of the workdir.")

  def save_best(self, kind: str) -> None:
    """The state of this epoch end into the `kind` checkpointer (one step kept); a rerun
    epoch (after a resume) finds the same step there and leaves it."""
    p = self.progress
    self.best_checkpointers[kind].save(p.step, parallel.unreplicate(self.p_state), p.to_json(),
                                       identity=self.exp.identity)

  # ------------------------------------------------------------------ evaluation

  def evaluate(self) -> None:
    """Validation and test counts; refresh at an epoch end; a record, scalars and one line."""
    self.check_finite()  # never evaluate, record or save a state that went bad
    p, exp = self.progress, self.exp
    epoch_done = self.periodic.epoch_end(p.step)
    val_correct, val_total = eval_counts(exp.eval_step, self.p_state, self.data.eval_batches("meta"))
    test = reporting.accuracy_summary(
        *eval_counts(exp.eval_step, self.p_state, self.data.eval_batches("test")), self.groups)
    class_accuracy = np.asarray(dmath.accuracy_from_counts(
        jnp.asarray(val_correct, jnp.float32), jnp.asarray(val_total, jnp.float32)))
    if epoch_done:  # the accuracy vector a that the next epoch's weights come from
      self.p_state = exp.refresh(self.p_state, class_accuracy)
    sums = (jax.device_get(parallel.unreplicate(self.sums)) if self.sums is not None else {})
    means = {k: float(v) / max(p.epoch_steps, 1) for k, v in sums.items()}
    record = {
        "epoch": p.step // p.steps_per_epoch if epoch_done else p.step / p.steps_per_epoch,
        "step": p.step, "partial": not epoch_done,
        "train_loss": means.get("train_loss"), "train_metrics": means,
        "learning_rate": float(exp.schedule(max(p.step - 1, 0))),
        "val_accuracy": float(val_correct.sum() / max(val_total.sum(), 1.0)),
        "val_per_class": [float(a) for a in class_accuracy], "test": test,
        **exp.describe(self.p_state, class_accuracy)}
    self.writer.write_scalars(p.step, {
        "epoch": float(record["epoch"]), "train_loss_epoch": record["train_loss"],
        "val_accuracy": record["val_accuracy"], "test_accuracy": test["overall"],
        **{f"test_{g}": test[g] for g in ("many", "medium", "few") if test[g] is not None}})
    self.writer.flush()
    num_epochs = -(-self.periodic.total_steps // p.steps_per_epoch)
    self._print(reporting.format_epoch_line(record, num_epochs))
    # Compared with the epoch-end records only; a partial record (a run stopped mid-epoch)
    # counts too, as it does in the report, until its epoch is finished.
    best = [k for k in self.best_checkpointers if is_new_best(k, p.history, record)]
    if epoch_done:
      p.history.append(record)
      p.partial, p.epoch_steps, self.sums = None, 0, None
    else:
      p.partial = record
    for kind in best:
      self.save_best(kind)

  def refresh_before_training(self) -> None:
    """a from the initial network's validation accuracy, before step 0 (refresh_at epoch_start).

    The public ImageNet-LT / Places-LT code measures a at the start of every epoch,
    epoch 0 included (ImageNet_Places-LT/train_stage1.py:291-304); the evaluations at
    our epoch ends give every later epoch's a, so only epoch 0's is added here.
    """
    correct, total = eval_counts(self.exp.eval_step, self.p_state,
                                 self.data.eval_batches("meta"))
    class_accuracy = np.asarray(dmath.accuracy_from_counts(
        jnp.asarray(correct, jnp.float32), jnp.asarray(total, jnp.float32)))
    self.p_state = self.exp.refresh(self.p_state, class_accuracy)
    self.progress.extra["initial_val_per_class"] = [float(a) for a in class_accuracy]
    self._print(f"epoch 0 start: validation accuracy {correct.sum() / max(total.sum(), 1.0):.4f} "
                "(the accuracy vector of the first epoch)")

  def _print(self, line: str) -> None:
    if self.is_main:
      (self.bar.write if self.show_bar else print)(line)

  # ------------------------------------------------------------------ the loop

  def run(self, state) -> Progress:
    """Runs the remaining steps from `state`; returns the final `Progress`."""
    p, exp, periodic = self.progress, self.exp, self.periodic
    self.p_state = parallel.replicate(state)
    del state
    logging.info("Training %s for steps %d..%d (%d per epoch) on %d device(s).", exp.name,
                 p.step, periodic.total_steps, p.steps_per_epoch, jax.device_count())
    self.bar = metric_writers.progress_bar(periodic.total_steps, p.step,
                                      enabled=self.is_main and self.show_bar)
    if p.pending_evaluation:  # the evaluation a SIGTERM at this step postponed
      p.pending_evaluation = False
      self.evaluate()
      self.save(replace=True)
    if getattr(exp, "refresh_at", "epoch_end") == "epoch_start" and p.step == 0:
      self.refresh_before_training()
    last_time, last_step = time.time(), p.step
    batches = self.data.train_batches(p.step, periodic.total_steps, with_meta=exp.uses_meta,
                                      sampler=exp.sampler)
    try:
      for step_index, batch, meta in _prefetch(batches, _PREFETCH):
        self.p_state, metrics = exp.train_step(self.p_state, batch, meta)
        # Epoch sums and first non-finite steps stay on the device: no transfer here.
        self.sums, self.first_bad = accumulate(self.sums, self.first_bad, metrics,
                                               self.p_state.step)
        p.step, p.epoch_steps = step_index + 1, p.epoch_steps + 1
        self.bar.update(1)
        if periodic.log(p.step):
          last_time, last_step = self._log(metrics, last_time, last_step)
        if self.stop.should_stop(p.step):
          self.preempt()
        if periodic.evaluate(p.step):
          self.evaluate()
        if periodic.checkpoint(p.step):
          self.save()
    finally:
      self.bar.close()
    jax.block_until_ready(self.p_state)
    return p

  def _log(self, metrics, last_time: float, last_step: int) -> tuple[float, int]:
    """The only per-interval device->host transfer: metrics and the non-finite record."""
    host_metrics, host_first_bad = jax.device_get((metrics, self.first_bad))
    self.check_finite(host_first_bad)
    self.checkpointer.poll()  # a background save that failed (full disk) stops the run here
    step = self.progress.step
    scalars = {k: float(np.ravel(v)[0]) for k, v in host_metrics.items()}
    now = time.time()
    scalars["images_per_sec"] = ((step - last_step) * self.exp.batch_size
                                 / max(now - last_time, 1e-9))
    scalars.setdefault("learning_rate", float(self.exp.schedule(step - 1)))
    self.writer.write_scalars(step, scalars)
    self.bar.set_postfix(loss=f"{scalars['train_loss']:.4f}",
                         img_s=f"{scalars['images_per_sec']:.0f}",
                         lr=f"{scalars['learning_rate']:.3g}")
    return now, step

  def preempt(self) -> None:
    """Saves a checkpoint at this step and raises `errors.Preempted`."""
    p = self.progress
    # At an evaluation step the evaluation is left to the resumed run (it may take minutes).
    p.pending_evaluation = self.periodic.evaluate(p.step)
    self.save()
    self.checkpointer.wait_until_finished()
    path = self.checkpointer.step_path(p.step)
    logging.warning("Stopped by %s at step %d; checkpoint %s saved.", self.stop.signal_name,
                    p.step, path)
    raise errors.Preempted(
        f"Stopped by {self.stop.signal_name} after step {p.step} of {self.periodic.total_steps}; "
        f"the checkpoint {path} holds everything needed to continue. Run the same command "
        f"again to resume from step {p.step} (exit code {errors.EXIT_PREEMPTED}).",
        step=p.step, checkpoint=path)
