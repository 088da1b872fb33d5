"""Speed/memory options of train_step match the exact step: remat, meta interval, bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import dnet_jax as dj
from dnet_jax import parallel
from dnet_jax.models import SmallCNN
from tiny_models import TinyConvNet, make_state, random_batch

C = 4


def _max_abs_diff(a, b):
  return float(jnp.max(jnp.abs(ravel_pytree(a)[0] - ravel_pytree(b)[0])))


def _setup(model=None, shape=(4, 4, 1)):
  model = model or TinyConvNet(C)
  state, dnet, tx, dnet_tx = make_state(model, C, shape=shape, dnet_lr=1e-2)
  batches = [(random_batch(10 + i, 16, C, shape=shape),
              random_batch(20 + i, 8, C, shape=shape, balanced=True)) for i in range(4)]
  kwargs = dict(model=model, dnet=dnet, tx=tx, dnet_tx=dnet_tx, learning_rate=0.1)
  return state, batches, kwargs


@pytest.mark.parametrize("mode", ["nested", "jvp"])
def test_remat_gives_the_same_step(mode):
  state, batches, kwargs = _setup()
  plain = dj.jit_train_step(donate=False, meta_grad=mode, **kwargs)
  remat = dj.jit_train_step(donate=False, meta_grad=mode, remat=True, **kwargs)
  s1, m1 = plain(state, *batches[0])
  s2, m2 = remat(state, *batches[0])
  assert _max_abs_diff(s1.params, s2.params) < 1e-6
  assert _max_abs_diff(s1.dnet_params, s2.dnet_params) < 1e-6
  assert _max_abs_diff(s1.batch_stats, s2.batch_stats) < 1e-6
  np.testing.assert_allclose(m1["meta_ce"], m2["meta_ce"], rtol=1e-6)


def test_meta_interval_matches_exact_step_where_the_meta_update_runs():
  state, batches, kwargs = _setup()
  exact = dj.jit_train_step(donate=False, **kwargs)
  every3 = parallel.jit_meta_interval_step(3, donate=False, **kwargs)
  # Step 0: both run the meta update: identical.
  e0, _ = exact(state, *batches[0])
  k0, m0 = every3(state, *batches[0])
  assert _max_abs_diff(e0.params, k0.params) < 1e-7
  assert _max_abs_diff(e0.dnet_params, k0.dnet_params) < 1e-7
  assert float(m0["meta_updated"]) == 1.0
  # Step 1: Difficulty-Net is left alone, theta trains on the current weights.
  k1, m1 = every3(k0, *batches[1])
  assert float(m1["meta_updated"]) == 0.0
  assert _max_abs_diff(k1.dnet_params, k0.dnet_params) == 0.0
  weights = dj.MetaProblem(kwargs["model"], kwargs["dnet"]).class_weights(k0.dnet_params,
                                                                         k0.class_accuracy)
  b1, _ = dj.baseline_step(k0, batches[1][0], model=kwargs["model"], tx=kwargs["tx"],
                           class_weights_fn=lambda a: weights)
  assert _max_abs_diff(k1.params, b1.params) < 1e-6
  # Step 3 runs the meta update again, exactly as the exact step would from that state.
  k2, m2 = every3(k1, *batches[2])
  assert float(m2["meta_updated"]) == 0.0
  k3, m3 = every3(k2, *batches[3])
  e3, _ = exact(k2, *batches[3])
  assert float(m3["meta_updated"]) == 1.0
  assert _max_abs_diff(k3.dnet_params, e3.dnet_params) < 1e-7
  assert _max_abs_diff(k3.dnet_params, k2.dnet_params) > 1e-6


def test_meta_interval_must_be_positive():
  state, batches, kwargs = _setup()
  with pytest.raises(ValueError, match="meta_interval must be a positive integer"):
    parallel.jit_meta_interval_step(0, **kwargs)


def test_bfloat16_compute_keeps_the_loss_within_tolerance():
  """bf16 activations with float32 master weights and loss: the losses agree to ~1%."""
  shape = (8, 8, 1)
  f32 = SmallCNN(C, widths=(8, 16, 16))
  bf16 = SmallCNN(C, widths=(8, 16, 16), dtype=jnp.bfloat16)
  state, batches, kwargs = _setup(f32, shape)
  s32, m32 = dj.jit_train_step(donate=False, **kwargs)(state, *batches[0])
  kwargs["model"] = bf16
  s16, m16 = dj.jit_train_step(donate=False, **kwargs)(state, *batches[0])
  assert jax.tree.leaves(s16.params)[0].dtype == jnp.float32  # master weights stay float32
  for key in ("train_loss", "meta_ce"):
    np.testing.assert_allclose(m16[key], m32[key], rtol=2e-2)
  # The meta-gradient points the same way.
  g32 = ravel_pytree(jax.tree.map(lambda a, b: a - b, s32.dnet_params, state.dnet_params))[0]
  g16 = ravel_pytree(jax.tree.map(lambda a, b: a - b, s16.dnet_params, state.dnet_params))[0]
  cosine = float(g32 @ g16 / (jnp.linalg.norm(g32) * jnp.linalg.norm(g16)))
  assert cosine > 0.9, cosine
