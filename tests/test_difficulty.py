"""Per-class counts, weights, driver target/loss and baseline weights against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dnet_jax as dj
from dnet_jax import difficulty as dmath


def test_per_class_counts_with_mask():
  logits = jnp.array([[2., 0., 0.], [0., 2., 0.], [0., 2., 0.], [0., 0., 2.], [2., 0., 0.]])
  labels = jnp.array([0, 1, 0, 2, 2])
  correct, total = dj.per_class_counts(logits, labels, 3)
  np.testing.assert_array_equal(correct, [1, 1, 1])
  np.testing.assert_array_equal(total, [2, 1, 2])
  # The fourth example is masked out (padding): it must not count.
  correct, total = dj.per_class_counts(logits, labels, 3, mask=jnp.array([1, 1, 1, 0, 1]))
  np.testing.assert_array_equal(correct, [1, 1, 0])
  np.testing.assert_array_equal(total, [2, 1, 1])
  np.testing.assert_allclose(dj.accuracy_from_counts(correct, total), [0.5, 1.0, 0.0])


def test_accuracy_from_counts_empty_class_is_zero():
  np.testing.assert_allclose(dj.accuracy_from_counts(jnp.array([0., 3.]), jnp.array([0., 4.])),
                             [0.0, 0.75])


def test_counts_sum_across_batches_equals_whole():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(40, 5)).astype(np.float32)
  labels = rng.integers(0, 5, 40)
  whole = dj.per_class_counts(logits, labels, 5)
  parts = [dj.per_class_counts(logits[i:i + 10], labels[i:i + 10], 5) for i in range(0, 40, 10)]
  np.testing.assert_array_equal(sum(p[0] for p in parts), whole[0])
  np.testing.assert_array_equal(sum(p[1] for p in parts), whole[1])


def test_class_weights_from_difficulty_hand_values():
  w = dj.class_weights_from_difficulty(jnp.array([0.2, 0.3, 0.5]))
  np.testing.assert_allclose(w, [0.6, 0.9, 1.5], rtol=1e-6)
  rng = np.random.default_rng(1)
  w = dj.class_weights_from_difficulty(jnp.asarray(rng.uniform(0.01, 1, 100)))
  assert abs(float(jnp.mean(w)) - 1.0) < 1e-6


@pytest.mark.parametrize("acc, expected", [
    ([0.2, 0.3, 0.5], [0.8, 0.7, 0.5]),
    ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0]),        # start of training: every target is 1
    ([1.0, 0.0, 0.0], [0.0, 1.0, 1.0]),        # one class at 100%, the others at 0
    ([1.0, 1.0, 1.0, 1.0], [0.75] * 4),
])
def test_driver_target_hand_values(acc, expected):
  np.testing.assert_allclose(dj.driver_target(jnp.array(acc)), expected, rtol=1e-6, atol=1e-7)


def test_driver_loss_hand_value():
  d = jnp.array([0.5, 0.5, 0.5])
  a = jnp.array([0.2, 0.3, 0.5])  # targets 0.8, 0.7, 0.5
  expected = ((0.5 - 0.8) ** 2 + (0.5 - 0.7) ** 2 + 0.0) / 3
  np.testing.assert_allclose(dj.driver_loss(d, a), expected, rtol=1e-6)


def test_driver_target_has_no_gradient():
  g = jax.grad(lambda a: dj.driver_loss(jnp.full(3, 0.5), a))(jnp.array([0.2, 0.3, 0.5]))
  np.testing.assert_array_equal(g, 0.0)


def test_class_balanced_weights_hand_values():
  counts = [100, 10, 1]
  beta = 0.9
  inv = [(1 - beta) / (1 - beta ** n) for n in counts]
  expected = [3 * v / sum(inv) for v in inv]
  np.testing.assert_allclose(dj.class_balanced_weights(jnp.array(counts), beta), expected, rtol=1e-5)
  # beta -> 0 gives uniform weights; the default beta=0.9999 is close to 1/n for small n.
  np.testing.assert_allclose(dj.class_balanced_weights(jnp.array(counts), 1e-9), [1, 1, 1], rtol=1e-5)
  w = dj.class_balanced_weights(jnp.array([400, 100]))
  np.testing.assert_allclose(w[1] / w[0], (1 - 0.9999 ** 400) / (1 - 0.9999 ** 100), rtol=1e-4)


@pytest.mark.parametrize("acc, tau, expected", [
    ([0.5, 0.75, 1.0], 2.0, [2.4, 0.6, 0.0]),     # (1-a)^2 = .25, .0625, 0; sum .3125
    ([0.5, 0.75, 1.0], 1.0, [2.0, 1.0, 0.0]),     # one class at 100%: weight 0
    ([0.0, 0.0, 0.0], 1.0, [1.0, 1.0, 1.0]),      # all accuracies zero: uniform
    ([1.0, 1.0, 1.0], 1.0, [1.0, 1.0, 1.0]),      # all at 100%: uniform, not NaN
    ([0.2, 0.6], 0.0, [1.0, 1.0]),                # tau = 0: uniform
])
def test_cdb_weights_hand_values(acc, tau, expected):
  np.testing.assert_allclose(dj.cdb_weights(jnp.array(acc), tau), expected, rtol=1e-6, atol=1e-7)


def test_cdb_dynamic_tau():
  acc = jnp.array([0.2, 0.8])
  tau = 2 / (1 + math.exp(-(0.8 / (0.2 + 0.01) - 1)))
  np.testing.assert_allclose(dmath.cdb_dynamic_tau(acc), tau, rtol=1e-6)
  raw = np.array([0.8, 0.2]) ** tau
  np.testing.assert_allclose(dj.cdb_weights(acc, "dynamic"), 2 * raw / raw.sum(), rtol=1e-5)
  with pytest.raises(ValueError, match="dynamic"):
    dj.cdb_weights(acc, "adaptive")
