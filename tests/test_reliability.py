"""Reliability of the runner: non-finite values, SIGTERM in-process, checkpoint verification, pickles.

Whole runs are on the digits config (9 steps per epoch at batch 32) with
`jax_disable_most_optimizations`; the signal and kill tests through the
command line are in tests/test_resume.py, the input checks in
tests/test_validation.py.
"""

from __future__ import annotations

import ast
import errno
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from orbax.checkpoint._src.handlers import json_checkpoint_handler as ocp_json

from experiments import checkpointing
from experiments import errors
from experiments import datasets
from experiments import loop as loop_lib
from experiments import methods
from experiments import preemption
from experiments import reporting
from experiments import trainer
from experiments.configs import digits_lt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("fast_compilation")


def tiny_config(**overrides):
  """digits_lt, plain CE (cheapest to compile), 2 epochs of 9 steps."""
  config = digits_lt.get_config()
  config.method = "ce"
  config.num_epochs = 2
  config.progress_bar = False
  config.log_every_steps = 100
  for key, value in overrides.items():
    config[key] = value
  return config


def checkpoint_steps(workdir) -> list[int]:
  directory = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


# ---------------------------------------------------------------------------- non-finite values


def test_accumulate_records_the_first_non_finite_step_of_each_metric():
  metrics = lambda loss, grad: {"train_loss": jnp.float32(loss), "grad_norm": jnp.float32(grad)}
  sums, first_bad = loop_lib.accumulate(None, None, metrics(1.0, 2.0), jnp.int32(1))
  sums, first_bad = loop_lib.accumulate(sums, first_bad, metrics(np.inf, 3.0), jnp.int32(2))
  sums, first_bad = loop_lib.accumulate(sums, first_bad, metrics(np.nan, np.nan), jnp.int32(3))
  sums, first_bad = loop_lib.accumulate(sums, first_bad, metrics(1.0, 1.0), jnp.int32(4))
  entries = loop_lib.non_finite_entries(jax.device_get(first_bad))
  assert [(s, n) for s, n, _ in entries] == [(2, "train_loss"), (3, "grad_norm")]
  assert np.isposinf(entries[0][2]) and np.isnan(entries[1][2])
  assert float(sums["grad_norm"]) != float(sums["grad_norm"])  # the sums carry the NaN too
  assert loop_lib.non_finite_entries(
      jax.device_get(loop_lib.accumulate(None, None, metrics(1.0, 1.0), jnp.int32(1))[1])) == []


def test_periodic_actions_by_hand():
  periodic = loop_lib.Periodic(steps_per_epoch=9, total_steps=20, log_every_steps=4,
                               checkpoint_every_epochs=2, checkpoint_every_steps=5)
  steps = range(1, 21)
  assert [s for s in steps if periodic.log(s)] == [4, 8, 12, 16, 20]
  assert [s for s in steps if periodic.evaluate(s)] == [9, 18, 20]  # epoch ends and the end
  # every 5 steps, every 2nd epoch end (18, not 9), and the last step
  assert [s for s in steps if periodic.checkpoint(s)] == [5, 10, 15, 18, 20]


def test_progress_json_round_trip_and_version():
  progress = loop_lib.Progress(steps_per_epoch=9, num_train=300, step=13, history=[{"epoch": 1}],
                               epoch_sums={"train_loss": 2.5}, epoch_steps=4,
                               schedule={"num_epochs": 3}, extra={"stage1_step": 7})
  record = json.loads(json.dumps(progress.to_json()))
  assert (record["epoch"], record["position_in_epoch"]) == (1, 4)
  assert loop_lib.Progress.from_json(record, "ckpt/13") == progress
  with pytest.raises(errors.CheckpointError, match=r"ckpt/13 holds bookkeeping of version 2"):
    loop_lib.Progress.from_json(dict(record, version=2), "ckpt/13")


def _poison_step_fn(monkeypatch, bad_step: int):
  """Makes the step that brings the state to `bad_step` produce a NaN loss and NaN params."""
  original = methods.make_step_fn

  def make_step_fn(*args, **kwargs):
    step = original(*args, **kwargs)

    def poisoned(state, batch, meta_batch=None):
      new_state, metrics = step(state, batch, meta_batch)
      factor = jnp.where(new_state.step == bad_step, jnp.nan, 1.0).astype(jnp.float32)
      metrics = dict(metrics, train_loss=metrics["train_loss"] * factor)
      params = jax.tree.map(lambda p: p * factor.astype(p.dtype), new_state.params)
      return new_state.replace(params=params), metrics

    return poisoned

  monkeypatch.setattr(methods, "make_step_fn", make_step_fn)


def test_injected_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  _poison_step_fn(monkeypatch, bad_step=5)
  workdir = str(tmp_path / "nan")
  # Metrics are fetched only every 100 steps: the NaN of step 5 is found by the check
  # before the checkpoint of step 6, from the record kept on the device.
  config = tiny_config(checkpoint_every_steps=2, max_steps=9)
  with pytest.raises(errors.NonFiniteError,
                     match=r"^step 5: train_loss is nan \(also grad_norm is nan from step 6; ce is nan "
                           r"from step 6\)\. "
                           r"Non-finite training loss or gradient: the run stopped at step 6 "
                           r"without saving its state; the newest checkpoint, .*checkpoints/4, "
                           r"is the last good state"):
    trainer.train_and_evaluate(config, workdir)
  assert checkpoint_steps(workdir) == [2, 4]
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    assert checkpointer.latest_step() == 4
    meta = checkpointer.read_meta(4)
    assert meta["method"] == "ce" and meta["num_classes"] == 10
  finally:
    checkpointer.close()
  assert not os.path.exists(os.path.join(workdir, "results.json"))


def test_huge_learning_rate_names_the_step_and_the_quantity(tmp_path):
  config = tiny_config(learning_rate=1e30, max_steps=6, log_every_steps=1)
  with pytest.raises(FloatingPointError,
                     match=r"^step [1-6]: (train_loss|grad_norm) is (nan|inf|-inf)"):
    trainer.train_and_evaluate(config, str(tmp_path / "lr"))


def test_a_non_finite_state_is_never_saved(tmp_path):
  state = {"params": {"w": jnp.array([1.0, np.nan]), "b": jnp.array([np.inf])},
           "step": jnp.int32(3)}
  with checkpointing.Checkpointer(str(tmp_path / "ckpt"), asynchronous=False) as checkpointer:
    with pytest.raises(errors.NonFiniteError,
                       match=r"step 3: the training state has non-finite values in "
                             r"params/b \(inf\), params/w \(nan\); it was not saved"):
      checkpointer.save(3, state, {"step": 3})
    assert checkpointer.all_steps() == []


# ---------------------------------------------------------------------------- full disk


def test_a_failed_background_save_stops_the_run_with_exit_3(tmp_path, monkeypatch):
  """ENOSPC in orbax's writer thread (simulated at the file write of its JSON items)."""
  original = ocp_json.JsonCheckpointHandler._save_fn

  async def save_fn(self, x, directory):
    if "6.orbax-checkpoint-tmp" in str(directory):  # the save of step 6 hits a full disk
      raise OSError(errno.ENOSPC, "No space left on device", str(directory))
    return await original(self, x, directory)

  monkeypatch.setattr(ocp_json.JsonCheckpointHandler, "_save_fn", save_fn)
  workdir = str(tmp_path / "full")
  trained = []
  original_step = loop_lib.Loop.evaluate
  monkeypatch.setattr(loop_lib.Loop, "evaluate",
                      lambda self: (trained.append(self.progress.step), original_step(self))[1])
  with pytest.raises(errors.CheckpointError,
                     match=r"^Saving checkpoint .*checkpoints/6 in .*checkpoints failed: .*No "
                           r"space left on device.*\. the disk is full: free space on it, then "
                           r"rerun the same command; the newest complete checkpoint, "
                           r".*checkpoints/3, is kept and the rerun resumes from it\.$") as raised:
    trainer.train_and_evaluate(tiny_config(checkpoint_every_steps=3, log_every_steps=1), workdir)
  assert raised.value.exit_code == errors.EXIT_CHECKPOINT == 3
  assert trained == []  # stopped before the epoch end at step 9: no further epoch trained
  assert checkpoint_steps(workdir) == [3]
  assert not os.path.exists(os.path.join(workdir, "results.json"))


def test_too_little_free_space_is_refused_before_saving(tmp_path, monkeypatch):
  checkpointer = checkpointing.Checkpointer(str(tmp_path / "checkpoints"))
  usage = checkpointing.shutil.disk_usage(str(tmp_path))
  monkeypatch.setattr(checkpointing.shutil, "disk_usage",
                      lambda path: usage._replace(free=1000))
  try:
    with pytest.raises(errors.CheckpointError,
                       match=r"^Not enough free space to save checkpoint .*checkpoints/3: 0\.0 MiB "
                             r"free, 1\.0 MiB needed\. Free space and rerun the same command; no "
                             r"checkpoint was completed\.$"):
      checkpointer.save(3, {"w": jnp.ones((4,))}, {"step": 3})
    assert checkpointer.all_steps() == []
  finally:
    checkpointer.close()
  with pytest.raises(errors.CheckpointError, match=r"^Only 0\.0 MiB are free on the file system "
                                                   r"of .* \(a run needs at least 64 MiB"):
    checkpointing.check_writable(str(tmp_path))


def test_an_unwritable_checkpoint_directory_is_refused_at_start(tmp_path, monkeypatch):
  def read_only(path, *args, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system", path)

  monkeypatch.setattr(checkpointing, "open", read_only, raising=False)
  with pytest.raises(errors.CheckpointError,
                     match=r"^Cannot write to .*checkpoints \(Read-only file system\): the "
                           r"directory is read-only or not writable: fix its permissions, or pass "
                           r"another --workdir\. Nothing was started") as raised:
    checkpointing.check_writable(str(tmp_path / "checkpoints"))
  assert raised.value.exit_code == 3
  monkeypatch.undo()
  checkpointer = checkpointing.Checkpointer(str(tmp_path / "checkpoints"))
  try:  # a directory that becomes read-only during the run: refused before orbax writes
    monkeypatch.setattr(checkpointing, "open", read_only, raising=False)
    with pytest.raises(errors.CheckpointError,
                       match=r"^Cannot write to .*checkpoints \(Read-only file system\): .* "
                             r"Checkpoint .*checkpoints/3 was not saved; no checkpoint was "
                             r"completed\.$"):
      checkpointer.save(3, {"w": jnp.ones((4,))}, {"step": 3})
    monkeypatch.undo()
    assert checkpointer.all_steps() == []
  finally:
    checkpointer.close()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only directory")
def test_a_read_only_checkpoint_directory_is_refused_at_once(tmp_path):
  directory = tmp_path / "checkpoints"
  directory.mkdir()
  directory.chmod(0o555)
  try:
    with pytest.raises(errors.CheckpointError, match=r"Permission denied\): the directory is "
                                                     r"read-only or not writable"):
      checkpointing.check_writable(str(directory))
  finally:
    directory.chmod(0o755)


# ---------------------------------------------------------------------------- honest numbers


def test_classes_without_test_examples_leave_the_group_means():
  # Class 2 (many-shot) has no test examples; by hand: many = (9/10 + 1/1) / 2 = 0.95.
  correct, total = np.array([9, 1, 0, 2]), np.array([10, 1, 0, 4])
  groups = {"many": np.array([True, True, True, False]), "medium": np.array([0, 0, 0, 1], bool),
            "few": np.array([False] * 4)}
  summary = reporting.accuracy_summary(correct, total, groups)
  assert summary["many"] == pytest.approx(0.95) and summary["medium"] == 0.5
  assert summary["few"] is None
  assert summary["overall"] == pytest.approx(12 / 15)
  assert summary["per_class"] == [0.9, 1.0, None, 0.5]
  assert summary["classes_without_examples"] == [2]
  only_empty = reporting.accuracy_summary(correct, total,
                                          {"many": np.array([0, 0, 1, 0], bool)})
  assert only_empty["many"] is None


def test_a_resumption_with_another_config_is_kept_in_the_history():
  fresh = lambda **config: loop_lib.Progress(steps_per_epoch=9, num_train=314,  # noqa: E731
                                             config=config)
  saved = fresh(seed="0", method="'ce'")
  saved.step = 9
  trainer._check_resumable(saved, fresh(seed="1", method="'ce'"), 9, "ckpt/9")  # pylint: disable=protected-access
  assert saved.config_history == [{"step": 9, "changed": {"seed": ["0", "1"]}}]
  record = loop_lib.Progress.from_json(json.loads(json.dumps(saved.to_json())), "ckpt/9")
  assert record.config_history == saved.config_history  # kept in every later checkpoint


# ---------------------------------------------------------------------------- SIGTERM in-process


def test_stop_signal_sets_a_flag_and_restores_the_previous_handler():
  calls = []
  previous = signal.signal(signal.SIGTERM, lambda *a: calls.append(a))
  try:
    with preemption.StopSignal() as stop:
      assert not stop.should_stop(1)
      os.kill(os.getpid(), signal.SIGTERM)
      assert stop.should_stop(2) and stop.signal_name == "SIGTERM"
      assert calls == []  # ours, not the previous handler
    os.kill(os.getpid(), signal.SIGTERM)  # the previous handler is back
    assert len(calls) == 1
  finally:
    signal.signal(signal.SIGTERM, previous)


def _sigterm_at(monkeypatch, step_index: int, signum: int = signal.SIGTERM):
  """Sends SIGTERM (or `signum`) to this process when the input pipeline builds batch `step_index`.

  With the two-batch prefetch that happens right after step `step_index - 1`
  (1-based) finished, so the loop stops after step `step_index`.
  """
  original = datasets.InMemoryDataset.train_batches

  def train_batches(*args, **kwargs):
    for item in original(*args, **kwargs):
      if item[0] == step_index:
        os.kill(os.getpid(), signum)
      yield item

  monkeypatch.setattr(datasets.InMemoryDataset, "train_batches", train_batches)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """A straight run of `resumable_config` and the SHA-256 of its final state arrays.

  It runs as the entry point runs it, inside a StopSignal held from start-up, and
  gets a SIGTERM while results.json is being written (`sigterm_during_the_final_write`).
  """
  previous = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  original_write = reporting.write_json

  def write_json(path, results):
    os.kill(os.getpid(), signal.SIGTERM)  # the scheduler's notice, in the middle of the write
    original_write(path, results)

  try:
    workdir = str(tmp_path_factory.mktemp("straight"))
    reporting.write_json = write_json
    with preemption.StopSignal() as outer:
      results = trainer.train_and_evaluate(resumable_config(), workdir)
    sigterm_during_the_final_write.update(requested=outer.signal_name, workdir=workdir)
  finally:
    reporting.write_json = original_write
    jax.config.update("jax_disable_most_optimizations", previous)
  return results, final_digests(workdir, results["steps"])


sigterm_during_the_final_write = {}


def test_a_sigterm_during_the_final_write_lets_it_finish(uninterrupted):
  results, _ = uninterrupted
  assert sigterm_during_the_final_write["requested"] == "SIGTERM"  # it arrived, and was held
  with open(os.path.join(sigterm_during_the_final_write["workdir"], "results.json"),
            encoding="utf-8") as f:
    written = json.load(f)
  assert written["steps"] == results["steps"] == 18 and written["config_history"] == []


def resumable_config():
  # Difficulty-Net (small) so that the state has both networks and both optimizers.
  config = tiny_config(method="difficulty_net", meta_batch_size=20)
  config.dnet.hidden = (16, 16)
  config.meta_grad = "driver_only"  # the cheapest meta-gradient to compile
  return config


def final_digests(workdir, step):
  with checkpointing.Checkpointer(os.path.join(workdir, "checkpoints")) as checkpointer:
    return checkpointer.read_digests(step)


COMPARED = ("final_test", "best_val_test", "best_val_epoch", "history", "steps",
            "per_class_test_accuracy")


@pytest.mark.parametrize("stop_after,signum", [(5, signal.SIGINT), (9, signal.SIGTERM)],
                         ids=["ctrl_c_inside_epoch", "sigterm_at_epoch_end"])
def test_sigterm_saves_a_checkpoint_and_the_rerun_gives_the_same_result(
    tmp_path, monkeypatch, uninterrupted, stop_after, signum):
  reference, reference_digests = uninterrupted
  workdir = str(tmp_path / "run")
  # Our own handler outside the run: the runner's replaces it during the loop and must give
  # it back (and if the runner installed none, the SIGTERM lands here, not on pytest).
  outside = []
  fallback = lambda *args: outside.append(args)  # noqa: E731
  previous = signal.signal(signum, fallback)
  try:
    with monkeypatch.context() as patch:
      _sigterm_at(patch, stop_after, signum)
      with pytest.raises(errors.Preempted,
                         match=rf"Stopped by {signal.Signals(signum).name} after step {stop_after} "
                               rf"of 18; the checkpoint .*checkpoints/{stop_after} holds "
                               rf"everything needed to continue") as stopped:
        trainer.train_and_evaluate(resumable_config(), workdir)
    assert signal.getsignal(signum) is fallback  # the previous handler is back
  finally:
    signal.signal(signum, previous)
  assert outside == []  # the runner's handler took the signal
  assert stopped.value.exit_code == errors.EXIT_PREEMPTED == 75
  assert checkpoint_steps(workdir)[-1] == stop_after
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  with checkpointing.Checkpointer(os.path.join(workdir, "checkpoints")) as checkpointer:
    loop = checkpointer.restore_loop(stop_after)
  # At an epoch end the evaluation is left to the resumed run; inside one, the position is kept.
  assert loop["pending_evaluation"] == (stop_after == 9)
  assert (loop["epoch"], loop["position_in_epoch"]) == divmod(stop_after, 9)

  resumed = trainer.train_and_evaluate(resumable_config(), workdir)
  assert resumed["start_step"] == stop_after
  for key in COMPARED:
    assert resumed[key] == reference[key], key
  assert final_digests(workdir, 18) == reference_digests  # bit-identical final state


# ---------------------------------------------------------------------------- untrusted files


_UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "torch",
                   "pandas", "pd", "shelve", "marshal", "jsonpickle"}
_UNSAFE_CALLS = {"load", "loads", "Unpickler", "read_pickle", "open"}


def _unsafe_reads(path: str) -> list[str]:
  """Calls in a source file that could unpickle untrusted bytes outside safe_pickle."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module in _UNSAFE_MODULES:
      names = {a.name for a in node.names} & _UNSAFE_CALLS
      if names:
        found.append(f"line {node.lineno}: from {node.module} import {', '.join(sorted(names))}")
    if not isinstance(node, ast.Call):
      continue
    for keyword in node.keywords:
      if (keyword.arg == "allow_pickle" and not
          (isinstance(keyword.value, ast.Constant) and keyword.value.value is False)):
        found.append(f"line {node.lineno}: allow_pickle is not False")
    func = node.func
    if not (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)):
      continue
    module, name = func.value.id, func.attr
    if module in _UNSAFE_MODULES and name in _UNSAFE_CALLS:
      found.append(f"line {node.lineno}: {module}.{name}")
    if module in ("np", "numpy", "jnp") and name == "load" and not any(
        k.arg == "allow_pickle" for k in node.keywords):
      found.append(f"line {node.lineno}: {module}.load without allow_pickle=False")
  return found


def test_every_pickle_read_goes_through_the_restricted_unpickler():
  """No module of the library or the runner unpickles except dnet_jax/data/safe_pickle.py.

  (Checkpoints are orbax: tensorstore arrays and JSON, no pickle; .npz files
  are read with allow_pickle=False.)
  """
  allowed = os.path.join(REPO, "dnet_jax", "data", "safe_pickle.py")
  problems = {}
  for package in ("dnet_jax", "experiments", "scripts"):
    for root, _, files in os.walk(os.path.join(REPO, package)):
      for name in files:
        path = os.path.join(root, name)
        if name.endswith(".py") and path != allowed:
          found = _unsafe_reads(path)
          if found:
            problems[os.path.relpath(path, REPO)] = found
  assert not problems, problems
  # The checker itself sees what it is meant to see.
  probe = os.path.join(REPO, "tests", "test_reliability.py")
  assert _unsafe_reads(probe) == []


def test_the_audit_catches_unsafe_reads(tmp_path):
  path = tmp_path / "bad.py"
  path.write_text("import pickle\nimport numpy as np\nfrom dill import load\n"
                  "pickle.load(open('f', 'rb'))\nnp.load('x.npy')\n"
                  "np.load('y.npz', allow_pickle=True)\nnp.load('z.npz', allow_pickle=False)\n")
  found = _unsafe_reads(str(path))
  assert found == ["line 3: from dill import load", "line 4: pickle.load",
                   "line 5: np.load without allow_pickle=False",
                   "line 6: allow_pickle is not False"], found
