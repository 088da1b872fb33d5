"""dnet_jax.schedules against the public code's per-epoch formulas written out by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dnet_jax import schedules


def c1_formula(e):
  """C1:48 (RECIPES.md): (0.1 + 0.1 e/400 [e<=400] + 0.1 [e>400]) 0.1^[e>=6400] 0.1^[e>=9600]."""
  return ((0.1 + (0.1 * e / 400) * int(e <= 400) + 0.1 * int(e > 400))
          * (0.1 ** int(e >= 6400)) * (0.1 ** int(e >= 9600)))


EPOCHS = [0, 1, 399, 400, 401, 6399, 6400, 9599, 9600, 12799]


def test_stage1_hand_values():
  assert [round(c1_formula(e), 12) for e in (0, 200, 400, 6400, 9600)] == [
      0.1, 0.15, 0.2, 0.02, 0.002]


@pytest.mark.parametrize("epoch", EPOCHS)
def test_stage1_python_equals_formula(epoch):
  assert schedules.public_cifar_stage1_lr(epoch) == pytest.approx(c1_formula(epoch), rel=1e-12)


def test_stage1_schedule_jitted_per_step():
  steps_per_epoch = 81
  schedule = jax.jit(schedules.public_cifar_stage1_schedule(steps_per_epoch))
  for epoch in EPOCHS:
    for step in (epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch - 1):
      assert float(schedule(jnp.int32(step))) == pytest.approx(c1_formula(epoch), rel=1e-6)


def test_stage2_cosine():
  def c2_formula(e):  # C2:67
    return 0.5 * (0.05 - 0) * (1 + math.cos(e / 50 * 3.1415926535))

  schedule = jax.jit(schedules.per_epoch_cosine_schedule(10, base_lr=0.05, epochs=50))
  for epoch in (0, 1, 25, 49):
    assert schedules.per_epoch_cosine_lr(epoch) == pytest.approx(c2_formula(epoch), rel=1e-9)
    for step in (10 * epoch, 10 * epoch + 9):
      assert float(schedule(step)) == pytest.approx(c2_formula(epoch), rel=1e-6)
  assert float(schedule(250)) == pytest.approx(0.025, rel=1e-6)


def test_usable_as_optax_learning_rate():
  tx = optax.sgd(schedules.public_cifar_stage1_schedule(2), momentum=0.9)
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  updates, _ = tx.update({"w": jnp.ones(3)}, state, params)
  np.testing.assert_allclose(updates["w"], -0.1 * np.ones(3), rtol=1e-6)


def test_bad_arguments():
  with pytest.raises(ValueError, match="steps_per_epoch"):
    schedules.public_cifar_stage1_schedule(0)
  with pytest.raises(ValueError, match="epochs"):
    schedules.per_epoch_cosine_schedule(10, epochs=0)
