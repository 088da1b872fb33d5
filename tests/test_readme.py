"""Runs README's "Use Difficulty-Net in your own code" block verbatim on the digits data."""

import os
import re

import numpy as np
from sklearn.datasets import load_digits

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def _snippet() -> str:
  text = open(README).read()
  section = text.split("## Use Difficulty-Net in your own code", 1)[1]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def readme_blocks(heading: str) -> list[str]:
  """The python blocks of the README section that starts with `heading`."""
  section = open(README).read().split(heading + "\n", 1)[1].split("\n#", 1)[0]
  return re.findall(r"```python\n(.*?)```", section, re.S)


def _digits(num_meta=10):
  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  y = digits.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(y))
  meta_idx = np.concatenate([order[y[order] == c][:num_meta] for c in range(10)])
  return x, y, np.setdiff1d(order, meta_idx), meta_idx


def _tools_namespace():
  import jax
  import jax.numpy as jnp
  import dnet_jax as dj
  from flax import linen as nn

  class MyNet(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(10)(nn.relu(nn.Dense(64)(x.reshape(x.shape[0], -1))))

  return {"jax": jax, "jnp": jnp, "dj": dj, "MyNet": MyNet,
          "dnet": dj.DifficultyNet(num_classes=10, hidden=(16,)),
          "tx": dj.classifier_optimizer(0.1, weight_decay=2e-4), "dnet_tx": dj.dnet_optimizer(1e-3)}


def test_readme_snippet_trains_on_digits():
  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  y = digits.target.astype(np.int32)
  rng = np.random.default_rng(0)
  order = rng.permutation(len(y))
  meta_idx = np.concatenate([order[y[order] == c][:10] for c in range(10)])
  train_idx = np.setdiff1d(order, meta_idx)

  def my_batches(epoch):
    perm = np.random.default_rng(epoch).permutation(train_idx)[:320]
    for i in range(0, 320, 64):
      b = perm[i:i + 64]
      m = rng.choice(meta_idx, 20, replace=False)
      yield {"image": x[b], "label": y[b]}, {"image": x[m], "label": y[m]}

  def my_meta_set():
    return {"image": x[meta_idx], "label": y[meta_idx]}

  namespace = {"my_batches": my_batches, "my_meta_set": my_meta_set}
  exec(compile(_snippet(), "README.md", "exec"), namespace)
  state = namespace["state"]
  assert int(state.step) == 20 * 5
  # The accuracy vector was refreshed from the meta set, and the model learned.
  acc = np.asarray(state.class_accuracy)
  assert acc.shape == (10,) and np.all((acc >= 0) & (acc <= 1))
  assert acc.mean() > 0.8, acc
  assert np.isfinite(float(namespace["metrics"]["meta_ce"]))


def test_readme_model_kind_blocks_train():
  import jax
  import jax.numpy as jnp
  x, y, train_idx, meta_idx = _digits()
  batch = {"image": x[train_idx[:64]], "label": y[train_idx[:64]]}
  meta_batch = {"image": x[meta_idx[::5]], "label": y[meta_idx[::5]]}
  blocks = readme_blocks("### Any model: linen, NNX, Equinox, a plain function")
  assert len(blocks) == 3
  for block in blocks:
    ns = _tools_namespace()
    exec(compile(block, "README.md", "exec"), ns)
    dj, model = ns["dj"], ns["model"]
    state = dj.create_train_state(jax.random.key(0), model, ns["tx"], jnp.zeros((1, 8, 8, 1)), 10,
                                  dnet=ns["dnet"], dnet_tx=ns["dnet_tx"])
    step = dj.jit_train_step(model=model, dnet=ns["dnet"], tx=ns["tx"], dnet_tx=ns["dnet_tx"],
                             learning_rate=0.1)
    first = None
    for _ in range(5):
      state, metrics = step(state, batch, meta_batch)
      first = float(metrics["ce"]) if first is None else first
    assert float(metrics["ce"]) < first, block[:40]
    counts = dj.jit_eval_step(model=model)(state, meta_batch)
    assert float(np.sum(counts["total"])) == len(meta_batch["label"])


def test_readme_meta_gradient_only_step_equals_train_step():
  import jax
  import jax.numpy as jnp
  (block,) = readme_blocks("### Use only the meta-gradient")
  ns = _tools_namespace()
  exec(compile(block, "README.md", "exec"), ns)
  dj, model, dnet, tx, dnet_tx = ns["dj"], ns["MyNet"](), ns["dnet"], ns["tx"], ns["dnet_tx"]
  x, y, train_idx, meta_idx = _digits()
  batch = {"image": x[train_idx[:32]], "label": y[train_idx[:32]]}
  meta_batch = {"image": x[meta_idx[::5]], "label": y[meta_idx[::5]]}
  accuracy = jnp.asarray(np.linspace(0.1, 0.9, 10), jnp.float32)
  state = dj.create_train_state(jax.random.key(0), model, tx, jnp.zeros((1, 8, 8, 1)), 10,
                                dnet=dnet, dnet_tx=dnet_tx, class_accuracy=accuracy)
  mine = ns["my_step"](state.params, state.opt_state, state.dnet_params, state.dnet_opt_state,
                       accuracy, batch, meta_batch)
  expected, _ = dj.jit_train_step(donate=False, model=model, dnet=dnet, tx=tx, dnet_tx=dnet_tx,
                                  learning_rate=0.1)(state, batch, meta_batch)
  import chex
  chex.assert_trees_all_close(mine[0], expected.params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(mine[2], expected.dnet_params, rtol=1e-5, atol=1e-7)
  assert not np.allclose(jax.tree.leaves(mine[2])[0], jax.tree.leaves(state.dnet_params)[0])
