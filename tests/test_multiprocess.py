"""Two JAX processes x 4 CPU devices train exactly as one process x 8 devices.

The test starts three fresh Python processes running tests/multiprocess_worker.py:
two joined by `dnet_jax.distributed.initialize` on a localhost coordinator (CPU
collectives over gloo), each feeding its local part of the same global batches
to `dnet_jax.parallel.pmap_train_step`; and one reference process with 8 CPU
devices that runs the same pmapped steps and also a single-device `jax.jit`
step on the whole global batch. All in float64.

Tolerance: the three runs compute the same function; they differ only in the
order of the 8-way gradient sums (gloo's all-reduce vs XLA's in-process one vs
a single-device batch mean). Each reordering perturbs a float64 sum by a few
ulps (~1e-16 relative); three SGD/Adam steps with the second-order
meta-gradient amplify that by at most a few orders of magnitude, so 1e-10 is
loose for rounding yet far below any real discrepancy (a wrong shard order
or a missing process changes parameters at ~1e-3).

Every wait has a timeout; on timeout or failure the children are killed and
their stderr is shown.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multiprocess_worker.py")
TIMEOUT_S = 150
RTOL, ATOL = 1e-10, 1e-12


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _child_env(n_devices: int) -> dict:
  env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}  # gRPC to localhost
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_ENABLE_X64"] = "1"
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  return env


def _tail(path: str, n: int = 4000) -> str:
  with open(path, errors="replace") as f:
    return f.read()[-n:]


def _run_workers(tmp_path):
  port = _free_port()
  jobs = {
      "process0": ([ "--num_processes", "2", "--process_id", "0", "--port", str(port)], 4),
      "process1": (["--num_processes", "2", "--process_id", "1", "--port", str(port)], 4),
      "reference": (["--num_processes", "1"], 8),
  }
  procs = {}
  for name, (args, n_devices) in jobs.items():
    out_dir = tmp_path / name
    out_dir.mkdir()
    log = open(out_dir / "log.txt", "w")
    procs[name] = (subprocess.Popen(
        [sys.executable, WORKER, "--out", str(out_dir)] + args, env=_child_env(n_devices),
        stdout=log, stderr=subprocess.STDOUT), log, out_dir)
  deadline = time.monotonic() + TIMEOUT_S
  failure = None
  try:
    for name, (proc, _, _) in procs.items():
      try:
        rc = proc.wait(timeout=max(deadline - time.monotonic(), 1))
      except subprocess.TimeoutExpired:
        failure = f"{name} did not finish within {TIMEOUT_S} s"
        break
      if rc != 0:
        failure = f"{name} exited with status {rc}"
        break
  finally:
    for proc, log, _ in procs.values():
      if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)
      log.close()
  if failure:
    logs = "\n".join(f"--- {n} ---\n{_tail(str(d / 'log.txt'))}" for n, (_, _, d) in procs.items())
    pytest.fail(f"{failure}.\n{logs}")
  return {name: out_dir for name, (_, _, out_dir) in procs.items()}


@pytest.fixture(scope="module")
def worker_outputs(tmp_path_factory):
  return _run_workers(tmp_path_factory.mktemp("multiprocess"))


def _load(path):
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def _assert_trees_close(actual, expected, what):
  assert sorted(actual) == sorted(expected), what
  for key in expected:
    np.testing.assert_allclose(actual[key], expected[key], rtol=RTOL, atol=ATOL,
                               err_msg=f"{what}: {key}")


def test_processes_see_the_global_device_layout(worker_outputs):
  for pid in (0, 1):
    with open(worker_outputs[f"process{pid}"] / f"process{pid}.json") as f:
      checks = json.load(f)
    assert checks["process_index"] == pid
    assert checks["process_count"] == 2
    assert checks["device_count"] == 8
    assert checks["local_device_count"] == 4
    assert checks["is_main_process"] == (pid == 0)
    # pmap's axis runs over process 0's devices, then process 1's.
    assert checks["axis_index"] == list(range(4 * pid, 4 * pid + 4))
    assert checks["sum_across_processes"] == [3.0, 2.0]
    assert checks["replicas_identical"]


def test_two_processes_match_one_process_with_eight_devices(worker_outputs):
  p0 = _load(worker_outputs["process0"] / "process0.npz")
  p1 = _load(worker_outputs["process1"] / "process1.npz")
  reference = _load(worker_outputs["reference"] / "process0.npz")
  single_device = _load(worker_outputs["reference"] / "jit.npz")
  for key in p0:  # both processes hold the same replicated state
    np.testing.assert_array_equal(p0[key], p1[key], err_msg=key)
  _assert_trees_close(p0, reference, "2 processes x 4 devices vs 1 x 8")
  _assert_trees_close(reference, single_device, "pmap over 8 devices vs jit on 1 device")
  assert all(v.dtype == np.float64 for v in p0.values())
  # The steps moved every classifier and Difficulty-Net tensor far beyond the tolerance,
  # so the comparison is not vacuous (the meta-gradient reached phi, too).
  initial = _load(worker_outputs["reference"] / "init.npz")
  for key in initial:
    assert np.max(np.abs(p0[key] - initial[key])) > 1e-6, key
  with open(worker_outputs["process0"] / "process0.json") as f:
    losses = json.load(f)["train_loss"]
  assert len(losses) == 3 and all(np.isfinite(losses))


def test_mesh_path_over_two_processes_matches_one_device(worker_outputs):
  """jax.jit + NamedSharding over both processes' 8 devices equals the single-device jit steps,
  and the accuracy refresh on the mesh state gives the single device's per-class accuracy."""
  single_device = _load(worker_outputs["reference"] / "jit.npz")
  with open(worker_outputs["reference"] / "process0.json") as f:
    reference_accuracy = json.load(f)["jit_class_accuracy"]
  for pid in (0, 1):
    _assert_trees_close(_load(worker_outputs[f"process{pid}"] / f"process{pid}_mesh.npz"),
                        single_device, f"mesh over 2 processes (process {pid}) vs jit on 1 device")
    with open(worker_outputs[f"process{pid}"] / f"process{pid}.json") as f:
      np.testing.assert_allclose(json.load(f)["mesh_class_accuracy"], reference_accuracy,
                                 rtol=1e-6)
  _assert_trees_close(_load(worker_outputs["reference"] / "process0_mesh.npz"), single_device,
                      "mesh over 8 devices of one process vs jit on 1 device")
