"""Per-example losses and the weighted reduction against numpy."""

import jax.numpy as jnp
import numpy as np
import pytest

import dnet_jax as dj
from dnet_jax import losses


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_cross_entropy_matches_numpy():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(6, 4)) * 3
  y = rng.integers(0, 4, 6)
  expected = -_np_log_softmax(z)[np.arange(6), y]
  np.testing.assert_allclose(dj.cross_entropy(jnp.asarray(z, jnp.float32), jnp.asarray(y)), expected,
                             rtol=1e-5)


def test_balanced_softmax_is_ce_on_prior_shifted_logits():
  counts = np.array([90, 9, 1])
  z = np.array([[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]])
  y = np.array([1, 2])
  prior = counts / counts.sum()
  expected = [-np.log(prior[c] * np.exp(z[i, c]) / (prior * np.exp(z[i])).sum()) for i, c in enumerate(y)]
  loss_fn = dj.make_loss_fn("balanced_softmax", class_counts=counts)
  np.testing.assert_allclose(loss_fn(jnp.asarray(z, jnp.float32), jnp.asarray(y)), expected, rtol=1e-5)


def test_focal_loss_hand_values():
  z = jnp.log(jnp.array([[0.25, 0.75]]))  # p_y = 0.25 for y = 0
  y = jnp.array([0])
  np.testing.assert_allclose(dj.focal_loss(z, y, gamma=2.0), [-(0.75 ** 2) * np.log(0.25)], rtol=1e-5)
  np.testing.assert_allclose(dj.focal_loss(z, y, gamma=0.0), dj.cross_entropy(z, y), rtol=1e-6)


def test_weighted_mean_hand_value_and_mask():
  per_example = jnp.array([1.0, 2.0, 3.0, 4.0])
  labels = jnp.array([0, 1, 1, 2])
  w = jnp.array([0.5, 1.0, 1.5])
  np.testing.assert_allclose(dj.weighted_mean(per_example, w, labels), (0.5 + 2 + 3 + 6) / 4)
  np.testing.assert_allclose(
      dj.weighted_mean(per_example, w, labels, mask=jnp.array([1, 1, 1, 0])), (0.5 + 2 + 3) / 3)


def test_make_loss_fn_errors_name_the_fix():
  with pytest.raises(ValueError, match="choose one of ce, balanced_softmax, focal"):
    dj.make_loss_fn("hinge")
  with pytest.raises(ValueError, match="class_counts"):
    dj.make_loss_fn("balanced_softmax")
  with pytest.raises(ValueError, match="non-negative"):
    losses.log_prior_from_counts([3, -1])


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0])
def test_focal_gradient_is_finite_and_right_at_confident_logits(gamma):
  """Issue 14 item 3: at logits [17, 0, 0] p_y rounds to 1 in float32 and the naive
  (1 - p)^gamma had a NaN gradient for gamma < 1. Reference: central differences of a
  float64 numpy focal loss (1 - p_y as the sum of the other classes' probabilities)."""
  import jax
  z = np.array([[17.0, 0.0, 0.0], [0.5, 3.0, -1.0]])
  y = np.array([0, 1])

  def np_focal(z):
    log_p = _np_log_softmax(z)[np.arange(len(y)), y]
    one_minus_p = np.array([np.exp(np.delete(_np_log_softmax(z)[i], y[i])).sum()
                            for i in range(len(y))])
    return (-(one_minus_p ** gamma) * log_p).sum()

  grad = jax.grad(lambda z: dj.focal_loss(z, jnp.asarray(y), gamma).sum())(
      jnp.asarray(z, jnp.float32))
  assert np.all(np.isfinite(np.asarray(grad)))
  h = 1e-6
  fd = np.zeros_like(z)
  for idx in np.ndindex(z.shape):
    e = np.zeros_like(z)
    e[idx] = h
    fd[idx] = (np_focal(z + e) - np_focal(z - e)) / (2 * h)
  np.testing.assert_allclose(grad, fd, rtol=1e-3, atol=1e-7)
  np.testing.assert_allclose(dj.focal_loss(jnp.asarray(z, jnp.float32), jnp.asarray(y), gamma).sum(),
                             np_focal(z), rtol=1e-5, atol=1e-7)


def test_focal_gamma_zero_is_cross_entropy_in_value_and_gradient():
  import jax
  rng = np.random.default_rng(3)
  z = jnp.asarray(np.concatenate([rng.normal(size=(4, 5)) * 4, [[17.0, 0, 0, 0, 0]]]), jnp.float32)
  y = jnp.asarray([0, 1, 2, 3, 0])
  np.testing.assert_array_equal(dj.focal_loss(z, y, 0.0), dj.cross_entropy(z, y))
  g_focal = jax.grad(lambda z: dj.focal_loss(z, y, 0.0).sum())(z)
  g_ce = jax.grad(lambda z: dj.cross_entropy(z, y).sum())(z)
  np.testing.assert_array_equal(g_focal, g_ce)
