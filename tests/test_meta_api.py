"""The standalone meta API (`dj.meta_gradients`, `dj.shared_forward`,
`dj.difficulty_net_gradient`) against nested mode, finite differences of a literal
meta-objective written here, and a plain `jax.grad` of the weighted loss (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import dnet_jax as dj
from dnet_jax import meta
from tiny_models import UserMLP, random_batch

C, LR, LAMBDA = 3, 0.5, 0.3


def _setup():
  model = UserMLP(C, hidden=5, param_dtype=jnp.float64)
  dnet = dj.DifficultyNet(C, hidden=(4,), use_bias=True, param_dtype=jnp.float64)
  params = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))["params"]
  phi = dnet.init(jax.random.key(1), jnp.zeros((C,)))["params"]
  flat, unravel = ravel_pytree(phi)  # move phi off its init so every layer matters
  phi = unravel(flat + 0.3 * jnp.asarray(np.random.default_rng(2).normal(size=flat.shape)))
  batch = random_batch(3, 8, C, dtype=np.float64)
  meta_batch = random_batch(4, 6, C, dtype=np.float64, balanced=True)
  accuracy = jnp.asarray([0.2, 0.6, 0.7], jnp.float64)

  def per_example_loss(p, b):
    return dj.cross_entropy(model.apply({"params": p}, b["image"]), b["label"])

  def meta_loss(p, m):
    return jnp.mean(dj.cross_entropy(model.apply({"params": p}, m["image"]), m["label"]))

  inputs = dj.MetaInputs(params=params, batch_stats=None, class_accuracy=accuracy, batch=batch,
                         meta_batch=meta_batch, learning_rate=jnp.asarray(LR))
  return model, dnet, phi, inputs, per_example_loss, meta_loss


def _literal_meta_objective(dnet, inputs, per_example_loss, meta_loss):
  """L_meta(phi) written out from METHOD.md, independent of dnet_jax.meta."""
  a = inputs.class_accuracy
  y = inputs.batch["label"]
  target = 1.0 - a / (jnp.sum(a) + 1e-12)

  def objective(phi):
    d = dnet.apply({"params": phi}, a)
    w = C * d / jnp.sum(d)
    grads = jax.grad(lambda p: jnp.mean(w[y] * per_example_loss(p, inputs.batch)))(inputs.params)
    theta_hat = jax.tree.map(lambda p, g: p - LR * g, inputs.params, grads)
    return meta_loss(theta_hat, inputs.meta_batch) + LAMBDA * jnp.mean((d - target) ** 2)
  return objective


def _flat(tree):
  return np.asarray(ravel_pytree(tree)[0])


def test_meta_gradients_equal_nested_mode_finite_differences_and_plain_grad():
  with jax.enable_x64(True):
    model, dnet, phi, inputs, per_example_loss, meta_loss = _setup()
    result = jax.jit(lambda phi, inputs: dj.meta_gradients(
        per_example_loss, meta_loss, dnet, phi, inputs, driver_weight=LAMBDA))(phi, inputs)

    # 1. nested mode of the library's own step machinery, on the same linen model
    problem = meta.MetaProblem(model=model, dnet=dnet, driver_weight=LAMBDA)
    nested, _ = meta.nested_meta_gradient(problem, phi, inputs.replace(batch_stats={}))
    np.testing.assert_allclose(_flat(result.dnet_grads), _flat(nested), rtol=1e-10, atol=1e-14)

    # 2. central finite differences of the literal objective
    flat, unravel = ravel_pytree(phi)
    objective = jax.jit(lambda f: _literal_meta_objective(dnet, inputs, per_example_loss,
                                                          meta_loss)(unravel(f)))
    h = 1e-5
    fd = np.array([(objective(flat + h * e) - objective(flat - h * e)) / (2 * h)
                   for e in np.eye(flat.size)])
    got = _flat(result.dnet_grads)
    assert np.linalg.norm(got - fd) / np.linalg.norm(fd) < 1e-6

    # 3. the class weights and the classifier gradient of the shared forward pass
    d = dnet.apply({"params": phi}, inputs.class_accuracy)
    np.testing.assert_allclose(result.class_weights, C * d / jnp.sum(d), rtol=1e-12)
    y = inputs.batch["label"]
    plain = jax.grad(lambda p: jnp.mean(result.class_weights[y] * per_example_loss(p, inputs.batch)))(
        inputs.params)
    np.testing.assert_allclose(_flat(result.classifier_grads), _flat(plain), rtol=1e-10, atol=1e-14)
    for name in ("meta_ce", "driver_loss", "lookahead_train_loss"):
      assert np.isfinite(float(result.metrics[name]))


def test_jvp_and_driver_only_modes_and_two_call_form():
  with jax.enable_x64(True):
    _, dnet, phi, inputs, per_example_loss, meta_loss = _setup()
    nested = dj.meta_gradients(per_example_loss, meta_loss, dnet, phi, inputs)
    jvp = dj.meta_gradients(per_example_loss, meta_loss, dnet, phi, inputs, mode="jvp")
    np.testing.assert_allclose(_flat(jvp.dnet_grads), _flat(nested.dnet_grads), rtol=1e-9,
                               atol=1e-14)
    driver, _ = dj.difficulty_net_gradient(per_example_loss, meta_loss, dnet, phi, inputs,
                                           mode="driver_only")
    a = inputs.class_accuracy
    expected = jax.grad(lambda p: 0.3 * dj.driver_loss(dnet.apply({"params": p}, a), a))(phi)
    np.testing.assert_allclose(_flat(driver), _flat(expected), rtol=1e-12)
    # two-call form: one forward pass, the gradient for new weights without another
    fwd = dj.shared_forward(per_example_loss, inputs.params, inputs.batch, inputs.batch["label"])
    grads, _ = dj.difficulty_net_gradient(per_example_loss, meta_loss, dnet, phi, inputs,
                                          forward=fwd)
    np.testing.assert_allclose(_flat(grads), _flat(nested.dnet_grads), rtol=1e-12)
    w = jnp.asarray([0.5, 1.0, 1.5])
    y = inputs.batch["label"]
    plain = jax.grad(lambda p: jnp.mean(w[y] * per_example_loss(p, inputs.batch)))(inputs.params)
    np.testing.assert_allclose(_flat(fwd.gradient(w)), _flat(plain), rtol=1e-12, atol=1e-15)


def test_inputs_are_a_pytree_rng_is_optional_and_passed_when_given():
  with jax.enable_x64(True):
    _, dnet, phi, inputs, per_example_loss, meta_loss = _setup()
    assert len(jax.tree.leaves(inputs)) > 5  # MetaInputs flattens (jit / pmap / tree.map)
    seen = []

    def noisy_loss(p, b, *, rng):
      seen.append(rng)
      return per_example_loss(p, b)

    def noisy_meta(p, m, *, rng):
      seen.append(rng)
      return meta_loss(p, m)

    with_rng = inputs.replace(rng=jax.random.key(5))
    result = jax.jit(lambda phi, i: dj.meta_gradients(noisy_loss, noisy_meta, dnet, phi, i))(
        phi, with_rng)
    assert len(seen) >= 2 and all(r is not None for r in seen)
    plain = jax.jit(lambda phi, i: dj.meta_gradients(per_example_loss, meta_loss, dnet, phi, i))(
        phi, inputs)
    np.testing.assert_allclose(_flat(result.dnet_grads), _flat(plain.dnet_grads), rtol=1e-12)


def test_standalone_errors():
  with jax.enable_x64(True):
    _, dnet, phi, inputs, per_example_loss, meta_loss = _setup()
    with pytest.raises(ValueError, match="one loss per example"):
      dj.meta_gradients(lambda p, b: jnp.mean(per_example_loss(p, b)), meta_loss, dnet, phi,
                        inputs)
    with pytest.raises(ValueError, match="meta_loss must return a scalar"):
      dj.meta_gradients(per_example_loss, per_example_loss, dnet, phi, inputs)
    with pytest.raises(TypeError, match="labels must be integer"):
      dj.meta_gradients(per_example_loss, meta_loss, dnet, phi,
                        inputs.replace(labels=jnp.zeros((8,), jnp.float32)))
