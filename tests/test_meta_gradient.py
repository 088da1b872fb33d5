"""The meta-gradient: nested jax.grad vs finite differences vs the forward-mode oracle.

Truth here is independent of the code under test: central finite differences of
the meta-objective, and the forward-mode identity of METHOD.md (a different
computation of the same number).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import dnet_jax as dj
from dnet_jax import meta
from dnet_jax.models import CifarResNet
from tiny_models import TinyConvNet, UserMLP, make_state, random_batch

NUM_CLASSES = 3


def _problem_and_inputs(model, dtype, *, seed=0, lr=0.5, shape=(4, 4, 1)):
  state, dnet, _, _ = make_state(model, NUM_CLASSES, dtype=dtype, seed=seed, shape=shape)
  # Perturb phi away from its init so every layer of Difficulty-Net is active.
  flat, unravel = ravel_pytree(state.dnet_params)
  flat = flat + 0.3 * jnp.asarray(np.random.default_rng(seed + 7).normal(size=flat.shape), flat.dtype)
  dnet_params = unravel(flat)
  np_dtype = np.float64 if dtype == jnp.float64 else np.float32
  batch = random_batch(seed + 1, 8, NUM_CLASSES, shape=shape, dtype=np_dtype)
  meta_batch = random_batch(seed + 2, 6, NUM_CLASSES, shape=shape, dtype=np_dtype, balanced=True)
  problem = meta.MetaProblem(model=model, dnet=dnet, loss_fn=dj.cross_entropy, driver_weight=0.3)
  inputs = meta.MetaInputs(params=state.params, batch_stats=state.batch_stats,
                           class_accuracy=state.class_accuracy, batch=batch, meta_batch=meta_batch,
                           learning_rate=jnp.asarray(lr, dtype), rng=jax.random.key_data(jax.random.key(3)))
  inputs = meta.MetaInputs(**{**inputs.__dict__, "rng": jax.random.key(3)})
  return problem, inputs, dnet_params


def _rel_err(a, b):
  a, _ = ravel_pytree(a)
  b, _ = ravel_pytree(b)
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_nested_matches_central_finite_differences_float64_with_batchnorm():
  with jax.enable_x64(True):
    model = TinyConvNet(NUM_CLASSES, use_batchnorm=True, param_dtype=jnp.float64)
    problem, inputs, phi = _problem_and_inputs(model, jnp.float64)
    grads, _ = jax.jit(lambda p: meta.nested_meta_gradient(problem, p, inputs))(phi)
    reference, _ = jax.jit(lambda p: meta.reference_nested_meta_gradient(problem, p, inputs))(phi)
    flat, unravel = ravel_pytree(phi)
    objective = jax.jit(lambda f: meta.meta_objective(problem, unravel(f), inputs)[0])
    h = 1e-5
    eye = np.eye(flat.size)
    fd = np.array([(objective(flat + h * e) - objective(flat - h * e)) / (2 * h) for e in eye])
    for g in (grads, reference):  # the step's (shared-forward) form and the literal form
      g = np.asarray(ravel_pytree(g)[0])
      assert np.linalg.norm(fd - g) / np.linalg.norm(fd) < 1e-5
    # The second-order (meta cross-entropy) part is a real share of the gradient, so this test
    # would catch a meta-gradient that dropped it (as the public code does).
    driver_only, _ = meta.driver_only_meta_gradient(problem, phi, inputs)
    assert _rel_err(driver_only, grads) > 1e-2


@pytest.mark.parametrize("use_batchnorm", [True, False])
def test_forward_mode_oracle_matches_nested_float64(use_batchnorm):
  with jax.enable_x64(True):
    model = TinyConvNet(NUM_CLASSES, use_batchnorm=use_batchnorm, param_dtype=jnp.float64)
    problem, inputs, phi = _problem_and_inputs(model, jnp.float64, seed=4)
    nested, aux_n = jax.jit(lambda p: meta.nested_meta_gradient(problem, p, inputs))(phi)
    jvp, aux_j = jax.jit(lambda p: meta.jvp_meta_gradient(problem, p, inputs))(phi)
    assert _rel_err(jvp, nested) < 1e-8
    np.testing.assert_allclose(aux_j["meta_ce"], aux_n["meta_ce"], rtol=1e-12)
    reference, _ = jax.jit(lambda p: meta.reference_nested_meta_gradient(problem, p, inputs))(phi)
    assert _rel_err(jvp, reference) < 1e-8

    # The step's shared-forward forms agree too.
    def shared(mode, p):
      train_rng, _ = meta.split_step_rng(inputs.rng)
      forward = meta.train_forward(problem, inputs.params, inputs.batch_stats, inputs.batch,
                                   train_rng)
      return meta.meta_gradient(mode, problem, p, inputs, forward)[0]
    assert _rel_err(jax.jit(lambda p: shared("jvp", p))(phi), jvp) < 1e-8
    assert _rel_err(jax.jit(lambda p: shared("nested", p))(phi), jvp) < 1e-8


def test_forward_mode_oracle_matches_nested_for_a_user_mlp_float64():
  with jax.enable_x64(True):
    model = UserMLP(NUM_CLASSES, hidden=8, param_dtype=jnp.float64)
    problem, inputs, phi = _problem_and_inputs(model, jnp.float64, seed=9)
    nested, _ = meta.nested_meta_gradient(problem, phi, inputs)
    jvp, _ = meta.jvp_meta_gradient(problem, phi, inputs)
    assert _rel_err(jvp, nested) < 1e-8


def _cast_floats(tree, dtype):
  return jax.tree.map(
      lambda x: np.asarray(x).astype(dtype) if np.issubdtype(np.asarray(x).dtype, np.floating)
      else x, tree)


def test_float32_meta_gradient_agrees_with_float64_at_float32_floor():
  """A BatchNorm ResNet on random data: float32 agrees with float64 to ~1e-3 relative.

  Both runs start from the same numbers (initialised in float64, then rounded to
  float32), so the difference is float32 rounding alone.
  """
  shape = (8, 8, 3)
  make_model = lambda dtype: CifarResNet(NUM_CLASSES, blocks_per_stage=1, widths=(4, 8, 8),
                                         dtype=dtype, param_dtype=dtype)
  with jax.enable_x64(True):
    problem64, inputs64, phi64 = _problem_and_inputs(make_model(jnp.float64), jnp.float64,
                                                     seed=11, shape=shape, lr=0.1)
    run = lambda mode, problem, inputs: jax.jit(
        lambda p: meta.meta_gradient(mode, problem, p, inputs))
    reference = run("nested", problem64, inputs64)(phi64)[0]
    reference_jvp = run("jvp", problem64, inputs64)(phi64)[0]
    assert _rel_err(reference_jvp, reference) < 1e-8
    reference = _cast_floats(reference, np.float64)
  problem32 = meta.MetaProblem(model=make_model(jnp.float32),
                               dnet=problem64.dnet.clone(param_dtype=jnp.float32))
  fields = {k: _cast_floats(v, np.float32) for k, v in inputs64.__dict__.items() if k != "rng"}
  inputs32 = meta.MetaInputs(**fields, rng=inputs64.rng)
  phi32 = _cast_floats(phi64, np.float32)
  for mode in ("nested", "jvp"):
    g32 = run(mode, problem32, inputs32)(phi32)[0]
    err = _rel_err(_cast_floats(g32, np.float64), reference)
    print(f"float32 vs float64 meta-gradient ({mode}): relative error {err:.2e}")
    assert err < 5e-3, (mode, err)


def test_driver_only_is_lambda_times_driver_loss_gradient():
  model = TinyConvNet(NUM_CLASSES)
  problem, inputs, phi = _problem_and_inputs(model, jnp.float32, seed=2)
  got, _ = meta.driver_only_meta_gradient(problem, phi, inputs)
  dnet = problem.dnet
  a = inputs.class_accuracy

  def independent(p):  # L_dr written out again from METHOD.md
    d = dnet.apply({"params": p}, a)
    t = 1.0 - a / (jnp.sum(a) + 1e-12)
    return 0.3 * jnp.mean((d - t) ** 2)

  expected = jax.grad(independent)(phi)
  assert _rel_err(got, expected) < 1e-6


def test_unknown_mode_is_a_clear_error():
  model = TinyConvNet(NUM_CLASSES)
  problem, inputs, phi = _problem_and_inputs(model, jnp.float32)
  with pytest.raises(ValueError, match="nested, jvp, driver_only"):
    meta.meta_gradient("second_order", problem, phi, inputs)


def _with_rates(inputs, rates):
  return meta.MetaInputs(**{**inputs.__dict__, "learning_rate": rates})


def test_per_parameter_rates_nested_jvp_and_finite_differences_float64():
  """Parameter groups: the lookahead steps each parameter at its own rate alpha_k.

  Truth: central finite differences of the literal meta-objective with that lookahead,
  and the forward-mode identity with A = diag(alpha_k); a tree of equal rates is the
  scalar case, and unequal rates give a different gradient (the tree is used).
  """
  with jax.enable_x64(True):
    model = TinyConvNet(NUM_CLASSES, use_batchnorm=True, param_dtype=jnp.float64)
    problem, inputs, phi = _problem_and_inputs(model, jnp.float64, seed=2)
    leaves, treedef = jax.tree.flatten(inputs.params)
    rates = jax.tree.unflatten(treedef, [jnp.asarray(0.5 * 2.0 ** -(i % 3), jnp.float64)
                                         for i in range(len(leaves))])
    grouped = _with_rates(inputs, rates)
    nested, _ = jax.jit(lambda p: meta.nested_meta_gradient(problem, p, grouped))(phi)
    jvp, _ = jax.jit(lambda p: meta.jvp_meta_gradient(problem, p, grouped))(phi)
    assert _rel_err(jvp, nested) < 1e-8
    flat, unravel = ravel_pytree(phi)
    objective = jax.jit(lambda f: meta.meta_objective(problem, unravel(f), grouped)[0])
    h = 1e-5
    fd = np.array([(objective(flat + h * e) - objective(flat - h * e)) / (2 * h)
                   for e in np.eye(flat.size)])
    assert np.linalg.norm(fd - ravel_pytree(nested)[0]) / np.linalg.norm(fd) < 1e-5
    equal = _with_rates(inputs, jax.tree.map(lambda _: inputs.learning_rate, inputs.params))
    scalar, _ = meta.nested_meta_gradient(problem, phi, inputs)
    assert _rel_err(meta.nested_meta_gradient(problem, phi, equal)[0], scalar) < 1e-12
    assert _rel_err(nested, scalar) > 1e-3
