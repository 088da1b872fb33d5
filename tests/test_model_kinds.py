"""Every model kind (linen, NNX, Equinox, plain function) gives the linen reference's step.

Same weights, same batches, float64: one `train_step` must give the same new classifier
parameters and the same Difficulty-Net update (plain SGD with lr 1 on phi, so the update
is the meta-gradient itself) as the linen model, and a few dozen steps must lower the loss.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import dnet_jax as dj
from model_kinds import (HIDDEN, EqxMLP, IN, LinenMLP, NnxMLP, eqx_from_linen, eqx_to_linen,
                         nnx_from_linen, nnx_to_linen, plain_mlp)
from tiny_models import random_batch

C = 3
LR = 0.2


def _max_rel_diff(a, b):
  """max |a - b| / max |b| over the whole tree (a bias before BatchNorm has a zero gradient, so
  per-leaf ratios would compare rounding noise with 0)."""
  a, b = ravel_pytree(a)[0], ravel_pytree(b)[0]
  return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-300))


def _learnable_batch(seed, size, balanced=False):
  """Labels a fixed linear function of the inputs, so a few steps can fit them."""
  batch = random_batch(seed, size, C, shape=(IN,), dtype=np.float64, balanced=balanced)
  w = np.random.default_rng(99).normal(size=(IN, C))
  if not balanced:
    batch["label"] = np.argmax(batch["image"] @ w, axis=-1).astype(np.int32)
  return batch


def _tools():
  dnet = dj.DifficultyNet(C, hidden=(5,), use_bias=True, param_dtype=jnp.float64)
  return dnet, optax.sgd(LR, momentum=0.9), optax.sgd(1.0)


def _state(model, dnet, tx, dnet_tx):
  accuracy = jnp.asarray([0.2, 0.5, 0.9], jnp.float32)
  return dj.create_train_state(jax.random.key(0), model, tx, jnp.zeros((2, IN), jnp.float64), C,
                               dnet=dnet, dnet_tx=dnet_tx, class_accuracy=accuracy)


def _kind(kind, reference_state, use_batchnorm):
  """(model, state with the reference's weights, map of params to the linen layout)."""
  dnet, tx, dnet_tx = _tools()
  if kind == "linen":
    return LinenMLP(C, use_batchnorm), reference_state, lambda p: p
  if kind == "nnx":
    model = NnxMLP(C)
    state = _state(model, dnet, tx, dnet_tx)
    params = nnx_from_linen(reference_state.params)
    stats = jax.tree.map(lambda x, like: jnp.asarray(x, like.dtype),
                         {"bn": reference_state.batch_stats["BatchNorm_0"]}, state.batch_stats)
    assert jax.tree.structure(params) == jax.tree.structure(state.params)
    return model, state.replace(params=params, batch_stats=stats, opt_state=tx.init(params),
                                dnet_params=reference_state.dnet_params), nnx_to_linen
  if kind == "equinox":
    import equinox as eqx
    module, eqx_state = eqx.nn.make_with_state(EqxMLP)(C, jax.random.key(1))
    model = dj.equinox_classifier(module, eqx_state)
    state = _state(model, dnet, tx, dnet_tx)
    params = eqx_from_linen(state.params, reference_state.params)
    return model, state.replace(params=params, opt_state=tx.init(params),
                                dnet_params=reference_state.dnet_params), eqx_to_linen
  assert kind == "function" and not use_batchnorm
  model = dj.function_classifier(plain_mlp, params=reference_state.params)
  state = _state(model, dnet, tx, dnet_tx)
  return model, state.replace(dnet_params=reference_state.dnet_params), lambda p: p


@pytest.mark.parametrize("kind", ["nnx", "equinox", "function"])
def test_each_model_kind_matches_the_linen_reference_and_learns(kind):
  use_batchnorm = kind != "function"
  with jax.enable_x64(True):
    dnet, tx, dnet_tx = _tools()
    reference_model = LinenMLP(C, use_batchnorm)
    reference_state = _state(reference_model, dnet, tx, dnet_tx)
    model, state, to_linen = _kind(kind, reference_state, use_batchnorm)
    batch, meta_batch = _learnable_batch(1, 12), _learnable_batch(2, 9, balanced=True)
    kwargs = dict(dnet=dnet, tx=tx, dnet_tx=dnet_tx, learning_rate=LR)
    reference_step = dj.jit_train_step(donate=False, model=reference_model, **kwargs)
    step = dj.jit_train_step(donate=False, model=model, **kwargs)

    expected, expected_metrics = reference_step(reference_state, batch, meta_batch)
    got, metrics = step(state, batch, meta_batch)
    assert _max_rel_diff(to_linen(got.params), expected.params) < 1e-10
    assert _max_rel_diff(got.dnet_params, expected.dnet_params) < 1e-10
    moved = _max_rel_diff(expected.dnet_params, reference_state.dnet_params)
    assert moved > 1e-8  # the Difficulty-Net update (= its gradient) is really compared
    for name in ("train_loss", "meta_ce", "driver_loss"):
      np.testing.assert_allclose(metrics[name], expected_metrics[name], rtol=1e-10)
    if kind == "nnx":
      assert _max_rel_diff({"BatchNorm_0": got.batch_stats["bn"]}, expected.batch_stats) < 1e-6
    if kind == "equinox":  # "batch" mode keeps the momentum-averaged batch mean, as linen does
      leaves = [np.asarray(x) for x in jax.tree.leaves(got.batch_stats) if np.shape(x) == (HIDDEN,)]
      reference_mean = np.asarray(expected.batch_stats["BatchNorm_0"]["mean"])
      assert any(np.allclose(x, reference_mean, rtol=1e-10, atol=0) for x in leaves)

    first = float(metrics["ce"])
    for _ in range(30):
      got, metrics = step(got, batch, meta_batch)
    assert float(metrics["ce"]) < 0.6 * first, (first, float(metrics["ce"]))
    counts = dj.jit_eval_step(model=model)(got, batch)
    assert float(np.sum(counts["correct"])) / len(batch["label"]) > 0.8


def test_nnx_state_is_pure_and_dropout_follows_the_step_key():
  with jax.enable_x64(True):
    dnet, tx, dnet_tx = _tools()
    model = NnxMLP(C, dropout=0.5)
    state = _state(model, dnet, tx, dnet_tx)
    assert isinstance(state.params, dict) and isinstance(state.batch_stats, dict)
    apply = dj.as_classifier(model).apply
    x = _learnable_batch(3, 6)["image"]
    a, _ = apply(state.params, state.batch_stats, x, train=True, rng=jax.random.key(1))
    b, _ = apply(state.params, state.batch_stats, x, train=True, rng=jax.random.key(1))
    c, _ = apply(state.params, state.batch_stats, x, train=True, rng=jax.random.key(2))
    np.testing.assert_array_equal(a, b)  # a pure function of its inputs
    assert np.any(np.asarray(a) != np.asarray(c))
    e1, s1 = apply(state.params, state.batch_stats, x, train=False, rng=None)
    assert s1 is state.batch_stats  # evaluation leaves the state as it was
    initial_kernel = np.array(state.params["l1"]["kernel"])
    step = dj.jit_train_step(model=model, dnet=dnet, tx=tx, dnet_tx=dnet_tx, learning_rate=LR)
    new_state, metrics = step(state, _learnable_batch(1, 12), _learnable_batch(2, 9, True))
    assert np.isfinite(float(metrics["meta_ce"]))
    # the donated state did not own the module's arrays: the module is intact and unchanged
    np.testing.assert_array_equal(model.l1.kernel[...], initial_kernel)
    assert np.any(np.asarray(new_state.params["l1"]["kernel"]) != initial_kernel)


def test_bf16_model_gets_float32_losses_and_metrics():
  model = LinenMLP(C, use_batchnorm=True, dtype=jnp.bfloat16)
  dnet = dj.DifficultyNet(C, hidden=(5,))
  tx, dnet_tx = optax.sgd(LR), optax.adam(1e-3)
  state = dj.create_train_state(jax.random.key(0), model, tx, jnp.zeros((2, IN)), C, dnet=dnet,
                                dnet_tx=dnet_tx)
  logits, _ = dj.as_classifier(model).apply(state.params, state.batch_stats,
                                            jnp.zeros((2, IN)), train=False)
  assert logits.dtype == jnp.bfloat16  # the model itself computes in bf16
  batch = _learnable_batch(1, 12)
  batch = {"image": batch["image"].astype(np.float32), "label": batch["label"]}
  meta_batch = _learnable_batch(2, 9, True)
  meta_batch = {"image": meta_batch["image"].astype(np.float32), "label": meta_batch["label"]}
  _, metrics = dj.jit_train_step(donate=False, model=model, dnet=dnet, tx=tx, dnet_tx=dnet_tx,
                                 learning_rate=LR)(state, batch, meta_batch)
  for name in ("train_loss", "ce", "meta_ce", "batch_accuracy", "weight_min", "driver_loss"):
    assert metrics[name].dtype == jnp.float32, (name, metrics[name].dtype)
  result = jax.jit(lambda phi, inputs: dj.meta_gradients(
      lambda p, b: dj.cross_entropy(model.apply({"params": p, "batch_stats": state.batch_stats},
                                                b["image"], train=False), b["label"]),
      lambda p, m: jnp.mean(dj.cross_entropy(
          model.apply({"params": p, "batch_stats": state.batch_stats}, m["image"]), m["label"])),
      dnet, phi, inputs))(
          state.dnet_params,
          dj.MetaInputs(params=state.params, batch_stats=None, class_accuracy=state.class_accuracy,
                        batch=batch, meta_batch=meta_batch, learning_rate=jnp.float32(LR)))
  assert result.train_loss.dtype == jnp.float32 and result.metrics["meta_ce"].dtype == jnp.float32
