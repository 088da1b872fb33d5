"""Per-group learning rates: each group moves by its own rate (exact dyadic arithmetic)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dnet_jax.optim import parameter_group_labels, parameter_group_optimizer


def _params():
  # A tiny "network": backbone, a new block and a head; all values dyadic, so every
  # update below is exact in float32.
  return {"stage1_block1": {"conv1": {"kernel": jnp.array([[1.0, 2.0], [-1.0, 0.5]])}},
          "extra_block": {"conv1": {"kernel": jnp.array([4.0, -2.0])}},
          "classifier": {"kernel": jnp.array([[0.5, 1.0]]), "bias": jnp.array([2.0])}}


# d loss / d p for every parameter of a top-level module.
GRADIENT = {"stage1_block1": 1.0, "extra_block": 2.0, "classifier": 4.0}


def _loss(params):
  return sum(GRADIENT[module] * sum(jnp.sum(leaf) for leaf in jax.tree.leaves(tree))
             for module, tree in params.items())


def _sgd_reference(p0, gradient, lr, momentum, weight_decay, nesterov, steps):
  """torch.optim.SGD (L2 added to the gradient) on one array, constant loss gradient, numpy."""
  p, v = np.asarray(p0, np.float64), np.zeros(np.shape(p0))
  for t in range(steps):
    g = gradient + weight_decay * p
    v = g if t == 0 else momentum * v + g
    p = p - lr * (g + momentum * v if nesterov else v)
  return p


@pytest.mark.parametrize("nesterov", [False, True])
def test_each_group_moves_by_its_own_learning_rate(nesterov):
  lr = {"stage1_block1": 0.125, "extra_block": 0.5, "classifier": 0.25}
  momentum, weight_decay = 0.5, 0.25
  tx = parameter_group_optimizer(
      {"new_block": (["^extra_block/"], lr["extra_block"]),
       "head": (["^classifier/"], optax.constant_schedule(lr["classifier"]))},
      default_learning_rate=lr["stage1_block1"], momentum=momentum,
      weight_decay=weight_decay, nesterov=nesterov)
  params0 = _params()
  params, opt_state = params0, tx.init(params0)
  for steps in (1, 2):  # the second step checks that each group keeps its own momentum
    updates, opt_state = tx.update(jax.grad(_loss)(params), opt_state, params)
    params = optax.apply_updates(params, updates)
    for module, tree in params.items():
      for leaf, leaf0 in zip(jax.tree.leaves(tree), jax.tree.leaves(params0[module])):
        expected = _sgd_reference(leaf0, GRADIENT[module], lr[module], momentum, weight_decay,
                                  nesterov, steps)
        np.testing.assert_array_equal(leaf, expected.astype(np.float32), err_msg=module)


def test_first_match_wins_and_the_default_group_takes_the_rest():
  labels = parameter_group_labels(_params(), {"head": ["classifier/bias", "classifier"],
                                              "kernels": ["kernel$"]})
  assert labels == {"stage1_block1": {"conv1": {"kernel": "kernels"}},
                    "extra_block": {"conv1": {"kernel": "kernels"}},
                    "classifier": {"kernel": "head", "bias": "head"}}
  labels = parameter_group_labels(_params(), {"new": ["^extra_block/"]})
  assert jax.tree.leaves(labels).count("default") == 3


def test_bad_groups_are_clear_errors():
  with pytest.raises(ValueError, match=r"match no parameter.*head: '\^fc/'.*stage1_block1/conv1"):
    parameter_group_labels(_params(), {"head": ["^classifier/", "^fc/"]})
  # An earlier pattern that takes everything leaves a later one with nothing.
  with pytest.raises(ValueError, match=r"match no parameter.*late: 'bias'"):
    parameter_group_labels(_params(), {"all": ["."], "late": ["bias"]})
  with pytest.raises(ValueError, match="2 parameter.*no default group.*stage1_block1"):
    parameter_group_labels(_params(), {"head": ["^classifier/"]}, default_group=None)
  with pytest.raises(ValueError, match="reserved"):
    parameter_group_labels(_params(), {"default": ["^classifier/"]})
  with pytest.raises(ValueError, match="list of patterns, not the string"):
    parameter_group_labels(_params(), {"head": "^classifier/"})
  with pytest.raises(ValueError, match="invalid pattern"):
    parameter_group_labels(_params(), {"head": ["(classifier"]})
  tx = parameter_group_optimizer({"head": (["^fc/"], 0.1)}, default_learning_rate=0.01)
  with pytest.raises(ValueError, match="match no parameter"):
    tx.init(_params())


def test_multipliers_give_the_lookahead_each_group_its_rate():
  from dnet_jax import meta  # pylint: disable=import-outside-toplevel
  from dnet_jax.optim import parameter_group_multipliers  # pylint: disable=import-outside-toplevel
  groups = {"new": (["^extra_block/", "^classifier/kernel"], 10.0)}
  scale = parameter_group_multipliers(_params(), groups)
  assert scale == {"stage1_block1": {"conv1": {"kernel": 1.0}},
                   "extra_block": {"conv1": {"kernel": 10.0}},
                   "classifier": {"kernel": 10.0, "bias": 1.0}}
  alpha = 0.125
  rates = jax.tree.map(lambda m: m * alpha, scale)
  grads = jax.grad(_loss)(_params())
  ahead = meta.lookahead_params(_params(), grads, rates)
  expected = {"stage1_block1": 0.125 * 1.0, "extra_block": 1.25 * 2.0}
  np.testing.assert_array_equal(ahead["stage1_block1"]["conv1"]["kernel"],
                                _params()["stage1_block1"]["conv1"]["kernel"] - expected["stage1_block1"])
  np.testing.assert_array_equal(ahead["extra_block"]["conv1"]["kernel"],
                                _params()["extra_block"]["conv1"]["kernel"] - expected["extra_block"])
  np.testing.assert_array_equal(ahead["classifier"]["kernel"],
                                _params()["classifier"]["kernel"] - 1.25 * 4.0)
  np.testing.assert_array_equal(ahead["classifier"]["bias"],
                                _params()["classifier"]["bias"] - 0.125 * 4.0)
  # A scalar alpha is the same rate for every parameter.
  plain = meta.lookahead_params(_params(), grads, alpha)
  np.testing.assert_array_equal(plain["classifier"]["kernel"],
                                _params()["classifier"]["kernel"] - 0.125 * 4.0)


def test_train_step_lookahead_scale():
  """Ones = no scale (same new state); another scale moves Difficulty-Net differently;
  a scale not shaped like the params is a clear error."""
  import dnet_jax as dj  # pylint: disable=import-outside-toplevel
  from tiny_models import TinyConvNet, make_state, random_batch  # pylint: disable=import-outside-toplevel
  model = TinyConvNet(3, use_batchnorm=True)
  state, dnet, tx, dnet_tx = make_state(model, 3)
  batch, meta_batch = random_batch(1, 8, 3), random_batch(2, 6, 3, balanced=True)

  def step(scale):
    return dj.train_step(state, batch, meta_batch, model=model, dnet=dnet, tx=tx,
                         dnet_tx=dnet_tx, learning_rate=0.5, lookahead_scale=scale)[0]

  plain = step(None)
  ones = step(jax.tree.map(lambda _: 1.0, state.params))
  for a, b in zip(jax.tree.leaves(plain.dnet_params), jax.tree.leaves(ones.dnet_params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
  leaves, treedef = jax.tree.flatten(state.params)
  scaled = step(jax.tree.unflatten(treedef, [4.0 * (i % 2) for i in range(len(leaves))]))
  assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(plain.dnet_params), jax.tree.leaves(scaled.dnet_params))) > 1e-7
  with pytest.raises(ValueError, match="lookahead_scale must be a pytree"):
    step({"not": 1.0})
