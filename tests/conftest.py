"""Shared pytest fixtures."""

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
