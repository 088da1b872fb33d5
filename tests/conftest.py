"""Shared pytest fixtures."""

import json
import os
import subprocess
import sys

import jax
import pytest


@pytest.fixture
def fast_compilation():
  """Whole runs are dominated by XLA compile time on CPU: skip most optimisations.

  Opt in per module with `pytestmark = pytest.mark.usefixtures("fast_compilation")`.
  The numerics tests do not use it: they check the optimised programs users run.
  """
  previous = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture(scope="session")
def eight_device_results():
  """tests/eight_device_worker.py's results, for test_parallel.py and test_mesh.py.

  One child process with 8 fake CPU devices (XLA_FLAGS must be set before JAX is
  imported, so not in this process): {"pmap": ..., "mesh": ...}.
  """
  here = os.path.dirname(__file__)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([os.path.dirname(here), here]))
  proc = subprocess.run([sys.executable, os.path.join(here, "eight_device_worker.py")],
                        env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULTS ")][-1]
  return json.loads(line[len("RESULTS "):])


@pytest.fixture(scope="session")
def child_compilation_cache(tmp_path_factory):
  """A directory for JAX's persistent compilation cache of this session's child runs
  (tests/test_resume.py `_env`): a rerun loads the programs its reference run compiled."""
  return str(tmp_path_factory.mktemp("child_jax_cache"))
