"""Shared pytest fixtures."""

import json
import os
import subprocess
import sys

import jax
import pytest


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
  """JAX's persistent compilation cache in a directory of this session.

  Many whole-run tests compile the same programs (the digits config's steps, the same
  stage-1 run resumed or damaged in several tests); jit caches per function object, so
  each new run would compile them again. The cache key holds the program and the compile
  options (XLA's optimisation level included), so a hit is the same executable.
  Compilations under 0.3 s (eager ops) are not written.
  """
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  previous = {name: jax.config.values[name] for name in names}
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield
  for name, value in previous.items():
    jax.config.update(name, value)


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
