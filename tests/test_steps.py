"""train_step / baseline_step / eval_step: the update equations, any user module, one trace."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import dnet_jax as dj
from dnet_jax import meta
from tiny_models import TinyConvNet, UserMLP, make_state, random_batch

C = 3


def _max_abs_diff(a, b):
  return float(jnp.max(jnp.abs(ravel_pytree(a)[0] - ravel_pytree(b)[0])))


def test_train_step_follows_method_steps_1_to_4():
  """phi moves by the meta-gradient; theta then moves on the loss weighted by the NEW phi."""
  with jax.enable_x64(True):
    model = TinyConvNet(C, param_dtype=jnp.float64)
    state, dnet, _, _ = make_state(model, C, dtype=jnp.float64, seed=1)
    lr, eta = 0.3, 0.5
    tx, dnet_tx = optax.sgd(lr), optax.sgd(eta)
    state = state.replace(opt_state=tx.init(state.params), dnet_opt_state=dnet_tx.init(state.dnet_params))
    batch = random_batch(3, 8, C, dtype=np.float64)
    meta_batch = random_batch(4, 6, C, dtype=np.float64, balanced=True)
    new_state, metrics = jax.jit(lambda s: dj.train_step(
        s, batch, meta_batch, model=model, dnet=dnet, tx=tx, dnet_tx=dnet_tx,
        learning_rate=lr))(state)

    # Independent expectation: meta-gradient by the forward-mode oracle, then plain SGD.
    problem = meta.MetaProblem(model=model, dnet=dnet)
    inputs = meta.MetaInputs(state.params, state.batch_stats, state.class_accuracy, batch,
                             meta_batch, jnp.asarray(lr), state.step_key())
    g_meta, _ = meta.jvp_meta_gradient(problem, state.dnet_params, inputs)
    phi_new = jax.tree.map(lambda p, g: p - eta * g, state.dnet_params, g_meta)
    d_new = dnet.apply({"params": phi_new}, state.class_accuracy)
    w_new = C * d_new / jnp.sum(d_new)

    def loss(params):
      logits, upd = model.apply({"params": params, "batch_stats": state.batch_stats},
                                batch["image"], train=True, mutable=["batch_stats"])
      log_p = jax.nn.log_softmax(logits)
      ce = -log_p[jnp.arange(8), batch["label"]]
      return jnp.mean(w_new[batch["label"]] * ce), upd["batch_stats"]

    grads, stats = jax.grad(loss, has_aux=True)(state.params)
    theta_new = jax.tree.map(lambda p, g: p - lr * g, state.params, grads)
    assert _max_abs_diff(new_state.dnet_params, phi_new) < 1e-12
    assert _max_abs_diff(new_state.params, theta_new) < 1e-12
    assert _max_abs_diff(new_state.batch_stats, stats) < 1e-12
    assert int(new_state.step) == 1
    # The old phi would give a different update: the test can tell the two apart.
    d_old = dnet.apply({"params": state.dnet_params}, state.class_accuracy)
    assert float(jnp.max(jnp.abs(d_old - d_new))) > 1e-4
    assert set(metrics) >= {"train_loss", "ce", "meta_ce", "driver_loss", "dnet_grad_norm",
                            "grad_norm", "learning_rate", "batch_accuracy"}


def _user_mlp_setup(seed=0):
  model = UserMLP(C, hidden=32)
  state, dnet, tx, dnet_tx = make_state(model, C, shape=(6,), lr=0.1, seed=seed)
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(C, 6)) * 2.0
  def sample(n, balanced=False):
    y = np.arange(n) % C if balanced else rng.choice(C, n, p=[0.7, 0.2, 0.1])
    x = centers[y] + rng.normal(size=(n, 6))
    return {"image": x.astype(np.float32), "label": y.astype(np.int32)}
  return model, state, dnet, tx, dnet_tx, sample


def test_user_mlp_without_batchnorm_trains():
  model, state, dnet, tx, dnet_tx, sample = _user_mlp_setup()
  step = dj.jit_train_step(model=model, dnet=dnet, tx=tx, dnet_tx=dnet_tx, learning_rate=0.1)
  losses = []
  for _ in range(50):
    state, metrics = step(state, sample(32), sample(12, balanced=True))
    losses.append(metrics["ce"])
  losses = np.asarray(jax.device_get(losses))
  assert np.all(np.isfinite(losses))
  assert losses[-5:].mean() < 0.5 * losses[:5].mean()


def test_jitted_step_traces_once():
  model, state, dnet, tx, dnet_tx, sample = _user_mlp_setup(1)
  traces = []

  def counted(s, b, m):
    traces.append(1)
    return dj.train_step(s, b, m, model=model, dnet=dnet, tx=tx, dnet_tx=dnet_tx,
                         learning_rate=dj.warmup_step_schedule(0.1, 5))

  step = jax.jit(counted, donate_argnums=0)
  for _ in range(4):
    state, _ = step(state, sample(16), sample(6, balanced=True))
  assert len(traces) == 1
  # The step counter advanced on device, and the schedule followed it without retracing.
  assert int(state.step) == 4


@pytest.mark.parametrize("method", ["ce", "class_balanced", "cdb", "focal", "balanced_softmax"])
def test_baseline_step_is_sgd_on_the_weighted_loss(method):
  model = UserMLP(C, hidden=8)
  state, _, _, _ = make_state(model, C, shape=(6,))
  lr = 0.5
  tx = optax.sgd(lr)
  state = state.replace(opt_state=tx.init(state.params))
  batch = random_batch(7, 10, C, shape=(6,))
  counts = np.array([50, 10, 2])
  acc = np.asarray(state.class_accuracy)
  loss_fn, weights_fn, w = dj.cross_entropy, None, np.ones(C)
  if method == "class_balanced":
    weights_fn = lambda a: dj.class_balanced_weights(counts, 0.99)
    inv = (1 - 0.99) / (1 - 0.99 ** counts)
    w = C * inv / inv.sum()
  elif method == "cdb":
    weights_fn = lambda a: dj.cdb_weights(a, 2.0)
    raw = (1 - acc) ** 2
    w = C * raw / raw.sum()
  elif method == "focal":
    loss_fn = dj.make_loss_fn("focal", focal_gamma=2.0)
  elif method == "balanced_softmax":
    loss_fn = dj.make_loss_fn("balanced_softmax", class_counts=counts)

  new_state, metrics = dj.baseline_step(state, batch, model=model, tx=tx, class_weights_fn=weights_fn,
                                        loss_fn=loss_fn)

  def expected_loss(params):
    z = model.apply({"params": params}, batch["image"])
    y = batch["label"]
    if method == "balanced_softmax":
      z = z + jnp.log(counts / counts.sum())
    log_p = jax.nn.log_softmax(z)[jnp.arange(10), y]
    per = -log_p if method != "focal" else -((1 - jnp.exp(log_p)) ** 2) * log_p
    return jnp.mean(jnp.asarray(w, jnp.float32)[y] * per)

  grads = jax.grad(expected_loss)(state.params)
  expected = jax.tree.map(lambda p, g: p - lr * g, state.params, grads)
  assert _max_abs_diff(new_state.params, expected) < 1e-5
  np.testing.assert_allclose(metrics["train_loss"], expected_loss(state.params), rtol=1e-5)
  assert new_state.dnet_params == state.dnet_params  # untouched


def test_eval_step_counts_ignore_padding():
  model = TinyConvNet(C)
  state, *_ = make_state(model, C)
  batch = random_batch(2, 6, C)
  logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, batch["image"])
  mask = np.array([1, 1, 1, 1, 0, 0], np.float32)
  counts = dj.eval_step(state, {**batch, "mask": mask}, model=model)
  pred = np.argmax(np.asarray(logits), -1)
  for c in range(C):
    sel = (batch["label"] == c) & (mask > 0)
    assert counts["total"][c] == sel.sum()
    assert counts["correct"][c] == (pred[sel] == c).sum()
  refreshed = dj.with_class_accuracy(state, counts["correct"], counts["total"])
  np.testing.assert_allclose(refreshed.class_accuracy,
                             dj.accuracy_from_counts(counts["correct"], counts["total"]))


def test_create_train_state_checks_num_classes_and_dnet_optimizer():
  model = UserMLP(5)
  with pytest.raises(ValueError, match="outputs 5 logits but num_classes=3"):
    dj.create_train_state(jax.random.key(0), model, optax.sgd(0.1), jnp.zeros((1, 6)), 3)
  with pytest.raises(ValueError, match="dnet_tx"):
    dj.create_train_state(jax.random.key(0), model, optax.sgd(0.1), jnp.zeros((1, 6)), 5,
                          dnet=dj.DifficultyNet(5))


def test_state_holds_everything_and_rng_is_raw_key_data():
  model = TinyConvNet(C)
  state, *_ = make_state(model, C)
  assert state.rng.dtype == jnp.uint32
  assert state.batch_stats and state.dnet_params and state.opt_state and state.dnet_opt_state
  np.testing.assert_array_equal(jax.random.key_data(state.key), state.rng)
