"""Clear errors at the API boundary, asserted on their text; and the step under chex.variants."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import dnet_jax as dj
from tiny_models import UserMLP, random_batch

C = 3


class TrainingFlagNet(nn.Module):
  """A user's model whose switch is `training=`, with BatchNorm."""
  @nn.compact
  def __call__(self, x, training: bool = False):
    x = nn.Dense(4)(x.reshape((x.shape[0], -1)))
    x = nn.BatchNorm(use_running_average=not training, momentum=0.5)(x)
    return nn.Dense(C)(x)


class NoisyNet(nn.Module):
  """Draws from an rng stream called "noise" in training mode."""
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(C)(x.reshape((x.shape[0], -1)))
    if train:
      x = x + 0.01 * jax.random.normal(self.make_rng("noise"), x.shape)
    return x


def _tools(num_classes=C):
  return dj.DifficultyNet(num_classes, hidden=(4,)), optax.sgd(0.1), optax.adam(1e-3)


def _step(model, state, **kwargs):
  dnet, tx, dnet_tx = _tools()
  step = dj.jit_train_step(donate=False, model=model, dnet=dnet, tx=tx, dnet_tx=dnet_tx,
                           learning_rate=0.1, **kwargs)
  return step(state, random_batch(0, 6, C), random_batch(1, 6, C, balanced=True))


def _state(model, num_classes=C):
  dnet, tx, dnet_tx = _tools(num_classes)
  return dj.create_train_state(jax.random.key(0), model, tx, jnp.zeros((2, 4, 4, 1)), num_classes,
                               dnet=dnet, dnet_tx=dnet_tx)


def test_model_without_an_apply_function():
  with pytest.raises(TypeError, match="has no apply function dnet_jax knows how to call"):
    dj.as_classifier(object())
  def logits_fn(params, images):
    return images @ params
  with pytest.raises(TypeError, match=r"the function 'logits_fn'.*dj.function_classifier"):
    _state(logits_fn)


def test_train_flag_mismatch_names_the_fix_and_the_fix_works():
  with pytest.raises(ValueError, match=r"takes 'training', not 'train'.*"
                     r"dj.linen_classifier\(model, train_arg='training'\)"):
    _state(TrainingFlagNet())
  model = dj.linen_classifier(TrainingFlagNet(), train_arg="training")
  state = _state(model)
  new_state, _ = _step(model, state)
  # the flag reached the model: BatchNorm ran in training mode and moved its statistics
  assert np.max(np.abs(np.asarray(new_state.batch_stats["BatchNorm_0"]["mean"]))) > 1e-4
  with pytest.raises(ValueError, match="has no parameter 'is_training'"):
    dj.linen_classifier(TrainingFlagNet(), train_arg="is_training")


def test_missing_rng_stream_names_the_fix_and_the_fix_works():
  state = _state(NoisyNet())
  with pytest.raises(ValueError, match=r"rng stream dnet_jax does not feed.*rng_streams="):
    _step(NoisyNet(), state)
  model = dj.linen_classifier(NoisyNet(), rng_streams=("dropout", "noise"))
  _, metrics = _step(model, state)
  assert np.isfinite(float(metrics["meta_ce"]))
  with pytest.raises(ValueError, match="no rng was given"):
    model.apply(state.params, state.batch_stats, jnp.zeros((2, 4, 4, 1)), train=True, rng=None)


def test_logits_that_do_not_fit_the_state():
  state = _state(UserMLP(C))
  four_classes = state.replace(class_accuracy=jnp.zeros((4,), jnp.float32))
  with pytest.raises(ValueError, match=r"UserMLP returned logits of shape \(6, 3\), expected .* "
                     r"= \(6, 4\)"):
    _step(UserMLP(C), four_classes)


def test_accuracy_vector_whose_layout_does_not_fit():
  state = _state(UserMLP(C))
  replicated_by_hand = state.replace(class_accuracy=state.class_accuracy[None])  # [1, C] in jit
  with pytest.raises(ValueError, match=r"class_accuracy has shape \(1, 3\) inside the step.*"
                     "dj.replicate"):
    _step(UserMLP(C), replicated_by_hand)
  with pytest.raises(ValueError, match=r"counts of shape \(4,\) do not fit .* shape \(3,\)"):
    dj.with_class_accuracy(state, np.ones(4), np.ones(4))
  refreshed = dj.with_class_accuracy(state, np.array([1, 2, 0]), np.array([2, 4, 0]))
  np.testing.assert_allclose(refreshed.class_accuracy, [0.5, 0.5, 0.0])
  assert refreshed.class_accuracy.sharding == state.class_accuracy.sharding


def test_batches_as_pairs_and_bad_batches():
  state = _state(UserMLP(C))
  b, m = random_batch(0, 6, C), random_batch(1, 6, C, balanced=True)
  dnet, tx, dnet_tx = _tools()
  kwargs = dict(model=UserMLP(C), dnet=dnet, tx=tx, dnet_tx=dnet_tx, learning_rate=0.1)
  s1, _ = dj.train_step(state, b, m, **kwargs)
  s2, _ = dj.train_step(state, (b["image"], b["label"]), (m["image"], m["label"]), **kwargs)
  chex.assert_trees_all_equal(s1.params, s2.params)
  with pytest.raises(TypeError, match=r"dict with 'image' and 'label'.*keys \['x', 'y'\]"):
    dj.train_step(state, {"x": 1, "y": 2}, m, **kwargs)


def test_focal_loss_rejects_negative_gamma():
  with pytest.raises(ValueError, match="gamma must be >= 0"):
    dj.focal_loss(jnp.zeros((1, 3)), jnp.zeros((1,), jnp.int32), -0.5)


class TrainStepVariantsTest(chex.TestCase):
  """One test body, run jitted, un-jitted and pmapped (chex.variants)."""

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  def test_classifier_update_is_sgd_on_the_weighted_loss_of_the_new_weights(self):
    model, (dnet, _, dnet_tx) = UserMLP(C), _tools()
    tx = optax.sgd(0.1)
    state = dj.create_train_state(jax.random.key(0), model, tx, jnp.zeros((2, 4, 4, 1)), C,
                                  dnet=dnet, dnet_tx=dnet_tx,
                                  class_accuracy=jnp.asarray([0.1, 0.6, 0.9]))
    batch, meta_batch = random_batch(0, 6, C), random_batch(1, 6, C, balanced=True)
    step = self.variant(functools.partial(dj.train_step, model=model, dnet=dnet, tx=tx,
                                          dnet_tx=dnet_tx, learning_rate=0.1))
    new_state, metrics = step(state, batch, meta_batch)
    # Independent reference (METHOD.md step 4): jax.grad of the literal weighted loss, with
    # the weights of the UPDATED Difficulty-Net, then a plain SGD step.
    weights = dj.class_weights(dnet, new_state.dnet_params, state.class_accuracy)

    def weighted_loss(params):
      logits = model.apply({"params": params}, batch["image"])
      return jnp.mean(weights[batch["label"]] * dj.cross_entropy(logits, batch["label"]))

    grads = jax.grad(weighted_loss)(state.params)
    expected = jax.tree.map(lambda p, g: p - 0.1 * g, state.params, grads)
    chex.assert_trees_all_close(new_state.params, expected, rtol=1e-5, atol=1e-6)
    assert int(new_state.step) == 1 and float(metrics["meta_updated"]) == 1.0
    assert not np.allclose(np.asarray(jax.tree.leaves(new_state.dnet_params)[0]),
                           np.asarray(jax.tree.leaves(state.dnet_params)[0]))
