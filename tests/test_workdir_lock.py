"""The workdir lock with real processes: a second holder is refused, a killed holder does not block."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from experiments import workdir_lock

_HOLDER = textwrap.dedent("""
    import sys, time
    from experiments import workdir_lock
    with workdir_lock.hold(sys.argv[1]):
      print("locked", flush=True)
      time.sleep(600)
""")


def _start_holder(workdir):
  proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(workdir)], stdout=subprocess.PIPE,
                          text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert proc.stdout.readline().strip() == "locked"
  return proc


def test_second_process_is_refused_naming_the_holder(tmp_path):
  holder = _start_holder(tmp_path)
  try:
    with pytest.raises(workdir_lock.WorkdirBusyError) as info:
      with workdir_lock.hold(str(tmp_path)):
        pytest.fail("the lock was taken twice")
    message = str(info.value)
    assert f"pid {holder.pid}" in message and "in use by another run" in message
    assert "--workdir" in message
    assert info.value.exit_code == 3
  finally:
    holder.kill()
    holder.wait()


def test_lock_of_a_killed_run_does_not_block(tmp_path):
  holder = _start_holder(tmp_path)
  os.kill(holder.pid, signal.SIGKILL)
  holder.wait()
  with workdir_lock.hold(str(tmp_path)):
    with open(tmp_path / workdir_lock.LOCK_NAME, encoding="utf-8") as f:
      assert json.load(f)["pid"] == os.getpid()


def test_lock_is_released_after_the_body(tmp_path):
  with workdir_lock.hold(str(tmp_path)):
    pass
  with workdir_lock.hold(str(tmp_path)):  # would raise if the first hold leaked its lock
    pass


def test_other_processes_of_a_run_do_not_lock(tmp_path):
  holder = _start_holder(tmp_path)
  try:  # process_index 1 of a (single-process here) run never touches the lock file
    with workdir_lock.hold(str(tmp_path), process_index=1):
      pass
  finally:
    holder.kill()
    holder.wait()
