"""The command line's reliability: one run per workdir, signals at start-up, bad flags, run.log.

Every test here runs `python -m experiments.train` in child processes that stop
before compiling anything (refused, interrupted during start-up, or a bad
flag), so each costs a Python + JAX start-up, not a training run. Training
interrupted by SIGTERM / SIGINT is tested in tests/test_reliability.py
(in-process) and tests/test_resume.py (command line).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 120


def _env() -> dict:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  return env


def _command(workdir, *overrides) -> list[str]:
  return [sys.executable, "-m", "experiments.train", "--config=experiments/configs/digits_lt.py",
          f"--workdir={workdir}", "--config.progress_bar=False", *overrides]


def _start(workdir, *overrides) -> subprocess.Popen:
  return subprocess.Popen(_command(workdir, *overrides), cwd=REPO, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_lock(proc: subprocess.Popen, workdir) -> None:
  """Until `proc` holds the workdir lock (it then handles SIGTERM/SIGINT as well)."""
  path = os.path.join(workdir, "run.lock")
  deadline = time.monotonic() + TIMEOUT_S
  while time.monotonic() < deadline:
    try:
      with open(path, encoding="utf-8") as f:
        if json.load(f).get("pid") == proc.pid:
          return
    except (OSError, ValueError):
      pass
    if proc.poll() is not None:
      pytest.fail(f"exited ({proc.returncode}) before locking:\n{proc.communicate()[1][-3000:]}")
    time.sleep(0.02)
  pytest.fail("the run did not lock its workdir in time")


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
  try:
    _, err = proc.communicate(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    proc.kill()
    _, err = proc.communicate()
    pytest.fail(f"no exit within {TIMEOUT_S} s:\n{err[-3000:]}")
  return proc.returncode, err


def test_a_second_run_on_the_same_workdir_is_refused_before_compiling(tmp_path):
  workdir = tmp_path / "run"
  first = _start(workdir)
  try:
    _wait_for_lock(first, workdir)
    started = time.monotonic()
    code, err = _finish(_start(workdir, "--config.learning_rate=0.05"))
    elapsed = time.monotonic() - started
    assert code == 3, err[-3000:]
    assert f"WorkdirBusyError: workdir {workdir} is in use by another run (pid {first.pid}" in err
    assert "pass another --workdir" in err and "Traceback" not in err
    assert "Training" not in err  # refused before building or compiling anything
    assert elapsed < TIMEOUT_S
    assert first.poll() is None  # the first run was not disturbed
    assert not (workdir / "results.json").exists()
  finally:
    first.kill()
    first.wait()


def test_sigterm_twice_during_start_up_exits_75_with_a_message(tmp_path):
  workdir = tmp_path / "run"
  proc = _start(workdir)
  try:
    _wait_for_lock(proc, workdir)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    if proc.poll() is None:  # a second notice must not kill it half-way either
      proc.send_signal(signal.SIGTERM)
    code, err = _finish(proc)
  finally:
    proc.kill()
    proc.wait()
  assert code == 75, err[-3000:]
  assert "Preempted: Stopped by SIGTERM" in err
  assert "before the first training step of this run" in err
  assert "Run the same command again to continue" in err
  assert "Traceback" not in err
  assert os.path.isfile(workdir / "run.log")


def test_ctrl_c_during_start_up_exits_75_not_a_keyboard_interrupt(tmp_path):
  workdir = tmp_path / "run"
  proc = _start(workdir)
  try:
    _wait_for_lock(proc, workdir)
    proc.send_signal(signal.SIGINT)
    code, err = _finish(proc)
  finally:
    proc.kill()
    proc.wait()
  assert code == 75, err[-3000:]
  assert "Preempted: Stopped by SIGINT" in err
  assert "KeyboardInterrupt" not in err and "Traceback" not in err


def test_an_unknown_config_field_is_one_message_and_exit_2(tmp_path):
  proc = subprocess.run(_command(tmp_path / "run", "--config.nonexistent_field=1"), cwd=REPO,
                        env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines() == [
      "InvalidInputError: the command line cannot be applied. No field 'nonexistent_field' in "
      "the config: check the spelling of --config.nonexistent_field against "
      "experiments/configs/base.py (every field is documented there). Nothing was started."]
