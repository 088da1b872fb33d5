"""`python -m experiments.train` as 2 processes x 2 CPU devices equals 1 process x 4 devices.

The entry point runs on the digits config (9 steps per epoch) as
  * a pair of processes joined by `--jax_distributed
    --coordinator_address=localhost:PORT --num_processes=2 --process_id=I`
    (CPU collectives over gloo), sharing one workdir as the hosts of a pod
    share a file system: first to step 11 (epoch 1 with its evaluation and
    checkpoint at step 9, then a partial-epoch evaluation and checkpoint at
    11), then the same two commands with a budget of 13 steps, which resume
    from the checkpoint at step 11 (every process restores it);
  * one reference process with 4 CPU devices, straight to step 13.
Both have the same 4-device global layout and see the same global batches, so
they compute the same function. What must hold:
  * results.json (written by process 0 only) has the same accuracies, per
    class, at every evaluation, and train losses equal up to float32 rounding;
  * the checkpoints both wrote at steps 9 and 13 hold the same parameters, up
    to the tolerance below (orbax refuses host-local arrays from several
    processes; experiments/checkpointing.py then saves host copies, process 0
    writing and all processes taking part in the save);
  * only process 0 wrote results, metrics and plots: each logged step once in
    metrics.jsonl (the writer appends, so a second writer would double every
    line), at most one TensorBoard event file per run of process 0, and no
    summary printed by process 1.

Tolerance. The runs differ only in the order of float32 sums across devices:
the 4-way gradient, BatchNorm and count all-reduces are one in-process XLA
reduction in the reference and a local reduction plus a gloo all-reduce
between the processes here. A reordered float32 sum differs by a few ulps
(~1e-7 relative), and a dozen SGD-momentum steps with the nested
meta-gradient through BatchNorm carry such differences along without blowing
them up: measured, the largest difference of any array was 2.4e-7 (a
BatchNorm variance) and most arrays were bit-identical. Parameters and losses
are compared with rtol = atol = 1e-5, 40x that; a wrong shard order, a
missing process, a stale replica or a wrong restore changes them by far more
(the step-9 -> step-13 update alone moves them by > 100 x atol, checked
below). Accuracies are counts of argmax decisions and compare exactly (a
near-tie flipped by rounding would show here; none did).

Every wait has a timeout; the children are killed in `finally` and their logs
are shown on failure.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dnet_jax.models.pretrained import flatten_variables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240  # per phase
RTOL = ATOL = 1e-5
FIRST_STOP, STEPS = 11, 13
COMMON = ["--config=experiments/configs/digits_lt.py", "--config.num_epochs=2",
          "--config.meta_batch_size=48",  # divisible by 4 devices
          "--config.progress_bar=False", "--config.log_every_steps=4"]


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(n_devices: int) -> dict:
  env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}  # gRPC to localhost
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}",
             JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="true",
             TF_CPP_MIN_LOG_LEVEL="2")
  return env


def _tail(path, n=3000) -> str:
  with open(path, errors="replace") as f:
    return f.read()[-n:]


def _run_phase(root, jobs: dict) -> None:
  """Runs {name: (args, n_devices)} concurrently; fails with their logs unless all exit 0."""
  procs = {}
  failure = None
  try:
    for name, (args, n_devices) in jobs.items():
      log = open(root / f"{name}.log", "w")
      procs[name] = (subprocess.Popen(
          [sys.executable, "-m", "experiments.train", *COMMON, *args], cwd=REPO,
          env=_env(n_devices), stdout=log, stderr=subprocess.STDOUT), log)
    deadline = time.monotonic() + TIMEOUT_S
    for name, (proc, _) in procs.items():
      try:
        rc = proc.wait(timeout=max(deadline - time.monotonic(), 1))
      except subprocess.TimeoutExpired:
        failure = f"{name} did not finish within {TIMEOUT_S} s"
        break
      if rc != 0:
        failure = f"{name} exited with status {rc}"
        break
  finally:
    for proc, log in procs.values():
      if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)
      log.close()
  if failure:
    logs = "\n".join(f"--- {n} ---\n{_tail(root / f'{n}.log')}" for n in jobs)
    pytest.fail(f"{failure}.\n{logs}")


def _pair(workdir, max_steps: int, phase: str) -> dict:
  cluster = [f"--workdir={workdir}", f"--config.max_steps={max_steps}", "--jax_distributed",
             f"--coordinator_address=localhost:{_free_port()}", "--num_processes=2"]
  return {f"{phase}_process{i}": ([*cluster, f"--process_id={i}"], 2) for i in range(2)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("mp_runner")
  shared, reference = root / "shared", root / "reference"
  _run_phase(root, {**_pair(shared, FIRST_STOP, "first"),
                    "reference": ([f"--workdir={reference}", f"--config.max_steps={STEPS}"], 4)})
  with open(shared / "results.json", encoding="utf-8") as f:
    first = json.load(f)
  _run_phase(root, _pair(shared, STEPS, "resumed"))
  return {"shared": shared, "reference": reference, "logs": root, "first": first}


def _results(workdir):
  with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
    return json.load(f)


def _checkpoint(workdir, step):
  """The state arrays of a checkpoint, restored onto this process's one device."""
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as reader:
    # The reference saved with a 4-device sharding; restore each array onto one device.
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          reader.metadata(path).item_metadata.tree,
                          is_leaf=lambda x: hasattr(x, "shape"))
    state = jax.device_get(reader.restore(path, target))
  return flatten_variables({"params": state["params"], "batch_stats": state["batch_stats"],
                            "dnet_params": state["dnet_params"],
                            "class_accuracy": {"a": state["class_accuracy"]}})


def test_two_processes_report_what_one_process_reports(runs):
  multi, single = _results(runs["shared"]), _results(runs["reference"])
  assert runs["first"]["steps"] == FIRST_STOP and runs["first"]["process_count"] == 2
  assert multi["start_step"] == FIRST_STOP and multi["steps"] == single["steps"] == STEPS
  for i in range(2):  # every process restored the checkpoint of step 11
    assert "Resumed from checkpoint" in _tail(runs["logs"] / f"resumed_process{i}.log", 10**6)
  assert multi["process_count"] == 2 and single["process_count"] == 1
  assert multi["devices"] == single["devices"] == 4
  assert multi["history"]["step"] == single["history"]["step"] == [9, STEPS]
  for key in ("val_accuracy", "val_per_class", "test_accuracy", "test_many", "test_medium",
              "test_few"):
    assert multi["history"][key] == single["history"][key], key
  for block in ("final_test", "best_val_test"):
    assert multi[block] == single[block], block
  np.testing.assert_allclose(multi["history"]["train_loss"], single["history"]["train_loss"],
                             rtol=RTOL)
  np.testing.assert_allclose(multi["history"]["difficulty"], single["history"]["difficulty"],
                             rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("step", [9, STEPS])
def test_checkpoints_hold_the_same_parameters(runs, step):
  multi, single = _checkpoint(runs["shared"], step), _checkpoint(runs["reference"], step)
  assert sorted(multi) == sorted(single)
  worst = max(float(np.max(np.abs(multi[k] - single[k]))) for k in single)
  for key in single:
    np.testing.assert_allclose(multi[key], single[key], rtol=RTOL, atol=ATOL,
                               err_msg=f"{key} (largest difference of any array: {worst:.3g})")
  if step == 9:  # the later steps move the parameters far beyond the tolerance
    later = _checkpoint(runs["reference"], STEPS)
    assert max(float(np.max(np.abs(later[k] - single[k]))) for k in single) > 100 * ATOL


def test_only_process_0_wrote_results_logs_and_plots(runs):
  shared = str(runs["shared"])
  assert os.path.isfile(os.path.join(shared, "results.json"))
  assert glob.glob(os.path.join(shared, "*.png"))
  events = glob.glob(os.path.join(shared, "events.out.tfevents*"))
  assert len(events) <= 2, events  # one per run of process 0 (none without TensorBoard)
  with open(os.path.join(shared, "metrics.jsonl"), encoding="utf-8") as f:
    lines = [json.loads(line) for line in f if line.strip()]
  logged = [(r.get("step"), tuple(sorted(k for k in r if k != "step"))) for r in lines]
  assert len(logged) == len(set(logged)), "a step was logged twice: two processes wrote"
  assert {step for step, _ in logged} >= {4, 8, 9, FIRST_STOP, 12, STEPS}
  for phase in ("first", "resumed"):
    assert "test, final epoch" in _tail(runs["logs"] / f"{phase}_process0.log", 20000)
    assert "test, final epoch" not in _tail(runs["logs"] / f"{phase}_process1.log", 20000)
  checkpoints = os.path.join(shared, "checkpoints")
  assert sorted(os.listdir(checkpoints)) == ["11", "13", "9", "digests"]
  # The arrays' checksums and the loop record's, of the kept checkpoints only.
  assert sorted(os.listdir(os.path.join(checkpoints, "digests"))) == [
      "11-loop.json", "11.json", "13-loop.json", "13.json", "9-loop.json", "9.json"]


def test_cluster_flags_need_jax_distributed(tmp_path):
  command = [sys.executable, "-m", "experiments.train", *COMMON, f"--workdir={tmp_path}",
             "--num_processes=2", "--process_id=0"]
  proc = subprocess.run(command, cwd=REPO, env=_env(1), capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode != 0
  assert "only apply with --jax_distributed" in proc.stderr
  assert not os.path.exists(tmp_path / "checkpoints")


def test_each_checkpoint_manager_of_a_run_has_its_own_barriers(tmp_path):
  """The run's checkpoints and its two best-state keepers save at the same step; orbax
  names their save barriers by fixed strings, so without distinct prefixes the
  managers' barriers collide across processes (the end-of-run hang this module's
  first test caught about one run in two). Same directory: same prefix in every process."""
  from experiments import checkpointing  # pylint: disable=import-outside-toplevel
  directories = [tmp_path / "run" / "checkpoints", tmp_path / "run" / "best_checkpoints" /
                 "best_val", tmp_path / "run" / "best_checkpoints" / "best_test"]
  prefixes = [checkpointing.barrier_prefix(str(d)) for d in directories]
  assert len(set(prefixes)) == 3, prefixes
  assert checkpointing.barrier_prefix(str(directories[0]) + "/") == prefixes[0]
  with checkpointing.Checkpointer(str(directories[1])) as checkpointer:
    # pylint: disable-next=protected-access
    options = checkpointer._manager._options.multiprocessing_options
    assert options.barrier_sync_key_prefix == prefixes[1]


def test_a_preemption_notice_stops_every_process_at_one_step_with_a_checkpoint(tmp_path):
  """SIGTERM to one process of a pod (the notice a preempted host gets): JAX's runtime
  agrees on a step (`multihost_utils.reached_preemption_sync_point`), every process saves
  there and exits 75, and the checkpoint of that step is complete."""
  import re  # pylint: disable=import-outside-toplevel
  import signal  # pylint: disable=import-outside-toplevel
  workdir = tmp_path / "shared"
  jobs = _pair(workdir, 10**6, "preempted")
  procs, logs = {}, {}
  try:
    for name, (args, n_devices) in jobs.items():
      logs[name] = tmp_path / f"{name}.log"
      with open(logs[name], "w") as log:
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "experiments.train", *COMMON, "--config.num_epochs=30",
             *args], cwd=REPO, env=_env(n_devices), stdout=log, stderr=subprocess.STDOUT)
    first, second = procs["preempted_process0"], procs["preempted_process1"]
    deadline = time.monotonic() + TIMEOUT_S
    while "epoch 1/" not in _tail(logs["preempted_process0"], 10**6):  # training is under way
      assert first.poll() is None and time.monotonic() < deadline, _tail(logs["preempted_process0"])
      time.sleep(0.5)
    second.send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=TIMEOUT_S) for p in (first, second)]
  finally:
    for proc in procs.values():
      if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)
  texts = [_tail(logs[n], 10**6) for n in ("preempted_process0", "preempted_process1")]
  assert codes == [75, 75], "\n".join(t[-3000:] for t in texts)
  steps = [re.findall(r"Stopped by .* after step (\d+) of", t) for t in texts]
  assert len(steps[0]) == len(steps[1]) == 1 and steps[0] == steps[1], steps
  step = int(steps[0][0])
  assert step >= 9  # after the first epoch's evaluation and checkpoint
  checkpoints = workdir / "checkpoints"
  assert str(step) in os.listdir(checkpoints)
  assert os.path.isfile(checkpoints / str(step) / "commit_success.txt")
  assert os.path.isfile(checkpoints / "digests" / f"{step}-loop.json")
  assert not (workdir / "results.json").exists()
