"""Exact resume: SIGKILL and SIGTERM through the command line; bad checkpoints in-process.

The command-line tests run `python -m experiments.train` on the digits config
(4 epochs of 19 steps at batch 16, a checkpoint every 7 steps) in child
processes: one uninterrupted reference run, one killed with SIGKILL after it
has written a checkpoint and moved on, one stopped with SIGTERM; each
interrupted run is then rerun with the same command, and its results.json
numbers and the arrays of its final checkpoint must equal the reference's bit
for bit. Every child has a timeout and is killed in a `finally`. The reference and the
reruns share JAX's persistent compilation cache (a session directory; the children that
get killed do not write to it), so a rerun does not compile again.

The in-process tests damage the checkpoints of a short run (incomplete step
directory, truncated or altered array file, another model / method / number
of classes) and check that the rerun ignores or reports them, by path, and
deletes nothing.
"""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import checkpointing
from experiments import errors
from experiments import trainer
from experiments.configs import digits_lt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# driver_only: the cheapest meta-gradient to compile; the state (both networks, both
# optimizers) and the resume logic are those of every mode.
OVERRIDES = ("--config.num_epochs=4", "--config.batch_size=16", "--config.meta_batch_size=20",
             "--config.dnet.hidden=(16,16)", "--config.meta_grad=driver_only",
             "--config.progress_bar=False", "--config.checkpoint_every_steps=7",
             "--config.log_every_steps=10", "--config.max_checkpoints_to_keep=2")
TOTAL_STEPS = 4 * (314 // 16)  # 76; checkpoints every 7 steps and at each epoch end (19)
RUN_TIMEOUT_S = 180
COMPARED = ("final_test", "best_val_test", "best_val_epoch", "history", "steps", "total_steps",
            "per_class_test_accuracy", "class_counts", "config")


# ---------------------------------------------------------------------------- child processes


def _env(compilation_cache: str = "") -> dict:
  """The children's environment; with `compilation_cache` (a directory), JAX's persistent
  compilation cache there, so that a child loads the programs an earlier child compiled."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="true", TF_CPP_MIN_LOG_LEVEL="2")
  if compilation_cache:
    env.update(JAX_COMPILATION_CACHE_DIR=compilation_cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


class Child:
  """`python -m experiments.train ... --workdir=workdir` in the background, output to a file.

  compilation_cache: see `_env`. The children that get killed run without it (a kill during
  a cache write would leave a truncated entry, which JAX skips with a warning)."""

  def __init__(self, workdir, name: str, compilation_cache: str = ""):
    self.workdir = str(workdir)
    self.log_path = f"{workdir}.{name}.log"
    command = [sys.executable, "-m", "experiments.train",
               "--config=experiments/configs/digits_lt.py", f"--workdir={workdir}", *OVERRIDES]
    with open(self.log_path, "w") as log:
      self.proc = subprocess.Popen(command, cwd=REPO, env=_env(compilation_cache), stdout=log,
                                   stderr=subprocess.STDOUT)

  def output(self) -> str:
    with open(self.log_path, errors="replace") as f:
      return f.read()

  def wait(self, timeout: float = RUN_TIMEOUT_S) -> int:
    try:
      return self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.kill()
      pytest.fail(f"{self.log_path}: no exit within {timeout} s:\n{self.output()[-3000:]}")

  def kill(self) -> None:
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait(timeout=30)

  def checkpoints(self) -> list[int]:
    """Steps with a complete (committed) checkpoint."""
    directory = os.path.join(self.workdir, "checkpoints")
    if not os.path.isdir(directory):
      return []
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit() and os.path.isfile(
        os.path.join(directory, n, "commit_success.txt")))

  def wait_for_checkpoint(self, min_step: int, timeout: float = RUN_TIMEOUT_S) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      steps = self.checkpoints()
      if steps and steps[-1] >= min_step:
        return steps[-1]
      if self.proc.poll() is not None:
        pytest.fail(f"exited ({self.proc.returncode}) before a checkpoint at step {min_step}:\n"
                    f"{self.output()[-3000:]}")
      time.sleep(0.01)
    self.kill()
    pytest.fail(f"no checkpoint at step >= {min_step} within {timeout} s")


def read_results(workdir) -> dict:
  with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
    return json.load(f)


def final_arrays(workdir, step: int):
  """(arrays of the final checkpoint's state, their recorded SHA-256s)."""
  path = os.path.join(workdir, "checkpoints", str(step))
  with ocp.StandardCheckpointer() as reader:
    arrays = jax.device_get(reader.restore(os.path.join(path, "state")))
  with open(os.path.join(workdir, "checkpoints", "digests", f"{step}.json"),
            encoding="utf-8") as f:
    digests = json.load(f)
  return arrays, digests


def assert_same_run(workdir, reference_workdir):
  results, reference = read_results(workdir), read_results(reference_workdir)
  for key in COMPARED:
    assert results[key] == reference[key], key
  arrays, digests = final_arrays(workdir, TOTAL_STEPS)
  reference_arrays, reference_digests = final_arrays(reference_workdir, TOTAL_STEPS)
  assert digests == reference_digests
  flat, tree = jax.tree.flatten(arrays)
  reference_flat, reference_tree = jax.tree.flatten(reference_arrays)
  assert tree == reference_tree
  for a, b in zip(flat, reference_flat):
    assert a.dtype == b.dtype and np.array_equal(a, b)  # bit-identical parameters


@pytest.fixture(scope="module")
def reference(tmp_path_factory, child_compilation_cache):
  """An uninterrupted run, started at once and awaited when first needed (it runs meanwhile)."""
  child = Child(tmp_path_factory.mktemp("reference") / "run", "reference",
                child_compilation_cache)
  waited = []

  def result():
    if not waited:
      code = child.wait()
      assert code == 0, child.output()[-3000:]
      waited.append(code)
    return child.workdir

  try:
    yield result
  finally:
    child.kill()


def test_sigkill_mid_run_then_rerun_gives_identical_results(tmp_path, reference,
                                                            child_compilation_cache):
  workdir = tmp_path / "killed"
  child = Child(workdir, "killed")
  try:
    seen = child.wait_for_checkpoint(min_step=10)
    time.sleep(0.2)  # past the checkpoint: training (and maybe the next save) under way
    child.proc.send_signal(signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL
  finally:
    child.kill()
  assert not os.path.exists(workdir / "results.json"), (
      "the run finished before it was killed; give it more steps")
  left = child.checkpoints()
  assert seen <= left[-1] < TOTAL_STEPS, left

  rerun = Child(workdir, "rerun", child_compilation_cache)
  try:
    code = rerun.wait()
  finally:
    rerun.kill()
  assert code == 0, rerun.output()[-3000:]
  results = read_results(workdir)
  assert results["start_step"] == left[-1] and results["steps"] == TOTAL_STEPS
  assert_same_run(workdir, reference())


def test_sigterm_checkpoints_exits_75_and_the_rerun_continues(tmp_path, reference,
                                                              child_compilation_cache):
  workdir = tmp_path / "terminated"
  child = Child(workdir, "terminated", child_compilation_cache)
  try:
    child.wait_for_checkpoint(min_step=10)
    child.proc.send_signal(signal.SIGTERM)
    code = child.wait(timeout=60)
  finally:
    child.kill()
  output = child.output()
  assert code == errors.EXIT_PREEMPTED == 75, output[-3000:]
  match = re.search(rf"Preempted: Stopped by SIGTERM after step (\d+) of {TOTAL_STEPS}; the "
                    rf"checkpoint (\S+) holds everything needed to continue\. Run the same command "
                    rf"again to resume from step \1 \(exit code 75\)\.", output)
  assert match, output[-3000:]
  assert "Traceback" not in output
  stopped = int(match.group(1))
  assert match.group(2) == os.path.join(workdir, "checkpoints", str(stopped))
  assert child.checkpoints()[-1] == stopped < TOTAL_STEPS

  rerun = Child(workdir, "rerun", child_compilation_cache)
  try:
    code = rerun.wait()
  finally:
    rerun.kill()
  assert code == 0, rerun.output()[-3000:]
  assert read_results(workdir)["start_step"] == stopped
  assert_same_run(workdir, reference())


# ---------------------------------------------------------------------------- bad checkpoints


pytestmark = pytest.mark.usefixtures("fast_compilation")


def small_config(**overrides):
  config = digits_lt.get_config()
  config.method = "ce"
  config.num_epochs = 2
  config.max_steps = 11  # checkpoints at 9 (epoch 1) and 11 (inside epoch 2)
  config.progress_bar = False
  config.log_every_steps = 100
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  previous = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    workdir = str(tmp_path_factory.mktemp("source") / "run")
    trainer.train_and_evaluate(small_config(), workdir)
  finally:
    jax.config.update("jax_disable_most_optimizations", previous)
  return workdir


def copy_run(finished_run, tmp_path) -> str:
  workdir = str(tmp_path / "run")
  shutil.copytree(finished_run, workdir)
  return workdir


def listing(workdir) -> dict[str, tuple[int, bytes]]:
  """Every file under checkpoints/ with its size and content hash (to show nothing changed)."""
  out = {}
  root = os.path.join(workdir, "checkpoints")
  for directory, _, files in os.walk(root):
    for name in files:
      path = os.path.join(directory, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def largest_array_file(step_dir: str) -> str:
  files = []
  for directory, _, names in os.walk(os.path.join(step_dir, "state")):
    if os.sep + "d" in directory:
      files += [os.path.join(directory, n) for n in names]
  return max(files, key=os.path.getsize)


def test_an_incomplete_step_directory_is_set_aside_not_loaded(finished_run, tmp_path):
  workdir = copy_run(finished_run, tmp_path)
  step_dir = os.path.join(workdir, "checkpoints", "11")
  os.remove(os.path.join(step_dir, "commit_success.txt"))  # as if copied or saved half-way
  shutil.rmtree(os.path.join(step_dir, "state"))
  kept = {k: v for k, v in listing(workdir).items() if k.startswith("11" + os.sep)}

  results = trainer.train_and_evaluate(small_config(), workdir)
  assert results["start_step"] == 9 and results["steps"] == 11  # from the last good one
  aside = listing(workdir)
  assert {k.replace("11.incomplete", "11", 1): v for k, v in aside.items()
          if k.startswith("11.incomplete" + os.sep)} == kept  # moved, not deleted
  with checkpointing.Checkpointer(os.path.join(workdir, "checkpoints")) as checkpointer:
    assert checkpointer.latest_step() == 11  # saved again, complete
  assert results["final_test"] == read_results(finished_run)["final_test"]  # same numbers


def test_half_written_checkpoints_are_never_the_latest(finished_run, tmp_path):
  workdir = copy_run(finished_run, tmp_path)
  checkpoints = os.path.join(workdir, "checkpoints")
  # A save killed before orbax renamed it (left as *.orbax-checkpoint-tmp*), and a step
  # directory without orbax's commit marker: neither may become the latest.
  shutil.copytree(os.path.join(checkpoints, "11"),
                  os.path.join(checkpoints, "12.orbax-checkpoint-tmp-1234"))
  shutil.copytree(os.path.join(checkpoints, "11"), os.path.join(checkpoints, "13"))
  os.remove(os.path.join(checkpoints, "13", "commit_success.txt"))
  with checkpointing.Checkpointer(checkpoints) as checkpointer:
    assert checkpointer.latest_step() == 11
    assert checkpointer.incomplete_reason(13).startswith("no commit_success.txt")
  assert os.path.isdir(os.path.join(checkpoints, "13"))  # ignored, not deleted


def test_an_edited_bookkeeping_record_is_refused(finished_run, tmp_path):
  workdir = copy_run(finished_run, tmp_path)
  step_dir = os.path.join(workdir, "checkpoints", "11")
  path = os.path.join(step_dir, "loop", "metadata")
  with open(path, encoding="utf-8") as f:
    loop = json.load(f)
  loop["history"][0]["val_accuracy"] = 1.0  # valid JSON: epoch 1 would become the best
  with open(path, "w", encoding="utf-8") as f:
    json.dump(loop, f)
  before = listing(workdir)
  with pytest.raises(errors.CheckpointError,
                     match=rf"^Checkpoint {re.escape(step_dir)} is corrupt: its bookkeeping "
                           rf"\({re.escape(step_dir)}/loop: history, best-validation record, "
                           r"position in the data\) differs from the checksum recorded when it "
                           r"was saved\. Nothing was deleted; to resume from the previous "
                           r"checkpoint \(step 9\)") as raised:
    trainer.train_and_evaluate(small_config(), workdir)
  assert raised.value.exit_code == 3
  assert listing(workdir) == before


def test_the_leftover_of_max_to_keep_is_removed_not_set_aside(finished_run, tmp_path):
  workdir = copy_run(finished_run, tmp_path)
  checkpoints = os.path.join(workdir, "checkpoints")
  # A process stopped while orbax deleted an old checkpoint (max_to_keep=1: 9 goes when 11 is
  # saved): its commit marker and state are gone, the rest is left.
  os.remove(os.path.join(checkpoints, "9", "commit_success.txt"))
  shutil.rmtree(os.path.join(checkpoints, "9", "state"))
  with checkpointing.Checkpointer(checkpoints, max_to_keep=1) as checkpointer:
    assert checkpointer.set_aside_incomplete() == [os.path.join(checkpoints, "9")]
  assert sorted(os.listdir(checkpoints)) == ["11", "digests"]
  # With room for both it is an ordinary incomplete checkpoint: set aside, not deleted.
  workdir = copy_run(finished_run, tmp_path / "second")
  checkpoints = os.path.join(workdir, "checkpoints")
  os.remove(os.path.join(checkpoints, "9", "commit_success.txt"))
  with checkpointing.Checkpointer(checkpoints, max_to_keep=2) as checkpointer:
    assert checkpointer.set_aside_incomplete() == [os.path.join(checkpoints, "9.incomplete")]


# orbax leaves a read coroutine of the other arrays un-awaited after the first failure.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncate", "flip_byte"])
def test_a_corrupt_checkpoint_is_a_clear_error_and_nothing_is_deleted(finished_run, tmp_path,
                                                                      damage):
  workdir = copy_run(finished_run, tmp_path)
  step_dir = os.path.join(workdir, "checkpoints", "11")
  path = largest_array_file(step_dir)
  with open(path, "rb") as f:
    data = bytearray(f.read())
  if damage == "truncate":
    data = data[:len(data) // 2]
    match = (rf"^Checkpoint {re.escape(step_dir)} cannot be read: .*(OUT_OF_RANGE|DATA_LOSS|"
             r"error|Error)")
  else:
    data[len(data) // 2] ^= 0xFF
    match = (rf"^Checkpoint {re.escape(step_dir)} (is corrupt: array\(s\) .* differ from the "
             r"checksums recorded when it was saved|cannot be read: )")
  with open(path, "wb") as f:
    f.write(data)
  before = listing(workdir)
  with pytest.raises(errors.CheckpointError, match=match) as raised:
    trainer.train_and_evaluate(small_config(max_steps=18), workdir)
  assert ("Nothing was deleted; to resume from the previous checkpoint (step 9), move "
          f"{step_dir} out of") in str(raised.value)
  assert raised.value.exit_code == errors.EXIT_CHECKPOINT == 3
  assert listing(workdir) == before
  gc.collect()  # orbax's un-awaited coroutine is finalised here, under this test's filter


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_truncated_array_file_through_the_command_line_is_one_short_message(finished_run,
                                                                             tmp_path):
  workdir = copy_run(finished_run, tmp_path)
  step_dir = os.path.join(workdir, "checkpoints", "11")
  path = largest_array_file(step_dir)
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])
  command = [sys.executable, "-m", "experiments.train", "--config=experiments/configs/digits_lt.py",
             f"--workdir={workdir}", "--config.method=ce", "--config.num_epochs=2",
             "--config.max_steps=18", "--config.progress_bar=False"]
  proc = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True,
                        timeout=RUN_TIMEOUT_S)
  assert proc.returncode == 3, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) < 40, proc.stderr[-3000:]  # not ~1,380 lines of TensorStore specs
  assert lines[-2].startswith(f"CheckpointError: Checkpoint {step_dir} cannot be read: ")
  assert lines[-1] == f"(full traceback in {workdir}/run.log)"
  assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("override,match", [
    ({"model": "small_cnn_nobn"}, r"model: 'small_cnn' in the checkpoint, 'small_cnn_nobn' now"),
    ({"method": "cdb"}, r"method: 'ce' in the checkpoint, 'cdb' now"),
])
def test_a_checkpoint_of_another_experiment_is_refused(finished_run, tmp_path, override, match):
  workdir = copy_run(finished_run, tmp_path)
  before = listing(workdir)
  with pytest.raises(errors.CheckpointError,
                     match=rf"^Checkpoint {re.escape(workdir)}/checkpoints/11 was written by a "
                           rf"different experiment and cannot be resumed by this config: {match}"
                           r"\. Use a new --workdir"):
    trainer.train_and_evaluate(small_config(**override), workdir)
  assert listing(workdir) == before


def test_another_number_of_classes_is_refused(tmp_path):
  def write(path, num_classes):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(num_classes), 8)
    np.savez(path, x_train=rng.integers(0, 256, (len(y), 8, 8, 1), dtype=np.uint8), y_train=y,
             x_test=rng.integers(0, 256, (len(y), 8, 8, 1), dtype=np.uint8), y_test=y)

  def config(path):
    c = small_config(max_steps=1, batch_size=4, eval_batch_size=8)
    c.data.source, c.data.name, c.data.data_dir = "npz", "toy", str(path)
    c.data.imbalance_factor, c.data.meta_per_class = 1.0, 2
    return c

  write(tmp_path / "three.npz", 3)
  write(tmp_path / "four.npz", 4)
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(config(tmp_path / "three.npz"), workdir)
  before = listing(workdir)
  with pytest.raises(errors.CheckpointError,
                     match=r"cannot be resumed by this config: num_classes: 3 in the checkpoint, "
                           r"4 now"):
    trainer.train_and_evaluate(config(tmp_path / "four.npz"), workdir)
  assert listing(workdir) == before


def test_compatibility_names_the_arrays_that_differ():
  saved = {"format": checkpointing.FORMAT_VERSION, "model": "m", "num_classes": 3,
           "method": "difficulty_net", "image_shape": [8, 8, 1],
           "state_shapes": [["dnet_params/Dense_0/kernel", [3, 16], "float32"],
                            ["params/w", [2], "float32"]]}
  expected = dict(saved, state_shapes=[["dnet_params/Dense_0/kernel", [3, 8], "float32"],
                                       ["params/w", [2], "float32"], ["params/b", [2], "float32"]])
  saved["state_fingerprint"] = checkpointing.shapes_fingerprint(saved["state_shapes"])
  expected["state_fingerprint"] = checkpointing.shapes_fingerprint(expected["state_shapes"])
  assert checkpointing.compatibility_problems(saved, expected) == [
      "the state's arrays differ (dnet_params/Dense_0/kernel: [3, 16] float32 -> [3, 8] float32; "
      "params/b is new)"]
  assert checkpointing.compatibility_problems(saved, dict(saved)) == []


def test_exceptions_at_finalisation_go_to_run_log_not_the_terminal(tmp_path):
  """The entry point's hook for "Exception ignored in ..." (orbax's leftover reads after a
  failed restore print ~100 lines each when collected, burying the one-line error)."""
  script = ("import asyncio, gc, sys\n"
            "from experiments import train\n"
            f"train._log_cleanup_errors({str(tmp_path)!r})\n"
            "class Leftover:\n"
            "  def __del__(self):\n"
            "    raise RuntimeError('TensorStore spec ' * 50)\n"
            "Leftover()\n"
            "gc.collect()\n"
            "print('done')\n")
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and proc.stdout == "done\n", proc.stderr
  assert "TensorStore" not in proc.stderr and "Exception ignored" not in proc.stderr
  logged = (tmp_path / "run.log").read_text()
  assert "Exception ignored" in logged and "RuntimeError: TensorStore spec" in logged
