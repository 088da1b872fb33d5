"""Property tests (hypothesis) of the pure functions on random accuracies and logits."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import dnet_jax as dj

SETTINGS = settings(max_examples=25, deadline=None)
accuracies = st.integers(2, 40).flatmap(
    lambda c: hnp.arrays(np.float32, c, elements=st.floats(0, 1, width=32)))
difficulties = st.integers(2, 40).flatmap(
    lambda c: hnp.arrays(np.float32, c, elements=st.floats(2.0 ** -20, 1, width=32)))


@SETTINGS
@given(difficulties)
def test_class_weights_finite_positive_mean_one(d):
  w = np.asarray(dj.class_weights_from_difficulty(jnp.asarray(d)))
  assert np.all(np.isfinite(w)) and np.all(w > 0)
  np.testing.assert_allclose(w.mean(), 1.0, rtol=1e-5)


@SETTINGS
@given(accuracies)
def test_difficulty_net_weights_from_any_accuracy(a):
  dnet = dj.DifficultyNet(a.shape[0], hidden=(16, 16), use_bias=True)
  params = dnet.init(jax.random.key(int(a.shape[0])), jnp.asarray(a))["params"]
  d = dnet.apply({"params": params}, jnp.asarray(a))
  w = np.asarray(dj.class_weights_from_difficulty(d))
  assert np.all(np.isfinite(w)) and np.all(w > 0)
  np.testing.assert_allclose(w.mean(), 1.0, rtol=1e-5)


@SETTINGS
@given(accuracies)
def test_driver_target_in_unit_interval_and_loss_finite(a):
  t = np.asarray(dj.driver_target(jnp.asarray(a)))
  assert np.all(t >= 0) and np.all(t <= 1)
  loss = float(dj.driver_loss(jnp.full(a.shape, 0.5), jnp.asarray(a)))
  assert np.isfinite(loss) and 0 <= loss <= 1


@SETTINGS
@given(accuracies, st.sampled_from([0.0, 0.5, 1.0, 2.0, "dynamic"]))
def test_cdb_weights_finite_nonnegative_mean_one(a, tau):
  w = np.asarray(dj.cdb_weights(jnp.asarray(a), tau))
  assert np.all(np.isfinite(w)) and np.all(w >= 0)
  np.testing.assert_allclose(w.mean(), 1.0, rtol=1e-4)


@SETTINGS
@given(st.integers(2, 30).flatmap(
    lambda c: hnp.arrays(np.int64, c, elements=st.integers(1, 100000))))
def test_class_balanced_weights_finite_positive_mean_one(counts):
  w = np.asarray(dj.class_balanced_weights(jnp.asarray(counts)))
  assert np.all(np.isfinite(w)) and np.all(w > 0)
  np.testing.assert_allclose(w.mean(), 1.0, rtol=1e-4)


@SETTINGS
@given(st.integers(1, 8), st.integers(2, 12), st.data())
def test_losses_finite_and_nonnegative(batch, classes, data):
  logits = data.draw(hnp.arrays(np.float32, (batch, classes),
                                elements=st.floats(-60, 60, width=32)))
  labels = data.draw(hnp.arrays(np.int32, batch, elements=st.integers(0, classes - 1)))
  counts = data.draw(hnp.arrays(np.int64, classes, elements=st.integers(1, 5000)))
  for loss_fn in (dj.make_loss_fn("ce"), dj.make_loss_fn("focal", focal_gamma=2.0),
                  dj.make_loss_fn("balanced_softmax", class_counts=counts)):
    values = np.asarray(loss_fn(jnp.asarray(logits), jnp.asarray(labels)))
    assert values.shape == (batch,)
    assert np.all(np.isfinite(values)) and np.all(values >= -1e-6)
