"""Worker for test_mesh.py: 8 fake CPU devices, x64 enabled.

1. jax.jit + NamedSharding over a 1-D mesh (`sharded_train_step`, no axis name) equals
   one device and equals pmap with synchronised BatchNorm (float64, two steps); pmap's
   train and eval steps against one device are also reported in test_parallel.py's terms
   (its synchronised-BatchNorm cases, computed here once for both files).
2. The README's pmap and mesh recipes run as written, accuracy refresh included.
3. The pmap variant of test_model_errors.py's chex.variants step test (it needs devices).
4. An Equinox model with BatchNorm state: the mesh step equals one device; pmap runs.
Run alone it prints one line "RESULTS {json}"; tests/eight_device_worker.py runs it
together with pmap_equivalence_worker.py in one process.
"""

import json
import os
import re
import sys
import unittest

assert "xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")
import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
import dnet_jax as dj  # noqa: E402
from tiny_models import TinyConvNet, make_state, random_batch  # noqa: E402

C = 4


def max_rel_diff(a, b):
  a = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(a)])
  b = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(b)])
  return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-300))


def max_leaf_rel_diff(a, b):
  """The largest relative difference of one array of `a` from its counterpart in `b`."""
  diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))
                                          / (np.max(np.abs(np.asarray(y))) + 1e-300)), a, b)
  return max(jax.tree.leaves(diffs), default=0.0)


def max_leaf_abs_diff(a, b):
  return float(max(jax.tree.leaves(jax.tree.map(
      lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b))))


def equivalence(mode: str) -> dict:
  single_model = TinyConvNet(C, use_batchnorm=True, param_dtype=jnp.float64)
  pmap_model = TinyConvNet(C, use_batchnorm=True, param_dtype=jnp.float64,
                           bn_axis_name=dj.AXIS_NAME)
  state, dnet, tx, dnet_tx = make_state(single_model, C, dtype=jnp.float64, seed=5, lr=0.2)
  dnet_tx = optax.sgd(1.0)  # phi's update is its gradient, so it is compared in full
  state = state.replace(dnet_opt_state=dnet_tx.init(state.dnet_params))
  batch = random_batch(1, 32, C, dtype=np.float64)
  meta_batch = random_batch(2, 16, C, dtype=np.float64, balanced=True)
  kwargs = dict(dnet=dnet, tx=tx, dnet_tx=dnet_tx, learning_rate=0.2, meta_grad=mode)
  single = dj.jit_train_step(donate=False, model=single_model, **kwargs)
  mesh = dj.data_mesh()
  sharded = dj.sharded_train_step(mesh, donate=False, model=single_model, **kwargs)
  pmapped = dj.pmap_train_step(donate=False, model=pmap_model, **kwargs)
  s1, sm, sp = state, dj.replicate_on_mesh(state, mesh), dj.replicate(state)
  for _ in range(2):
    s1, m1 = single(s1, batch, meta_batch)
    sm, mm = sharded(sm, dj.shard_global_batch(batch, mesh), dj.shard_global_batch(meta_batch, mesh))
    sp, mp = pmapped(sp, dj.shard_batch(batch), dj.shard_batch(meta_batch))
  sp, mp = dj.unreplicate(sp), dj.unreplicate(mp)
  eval_single = dj.jit_eval_step(model=single_model)(s1, batch)
  eval_mesh = dj.sharded_eval_step(mesh, model=single_model)(sm, dj.shard_global_batch(batch, mesh))
  eval_pmap = dj.unreplicate(dj.pmap_eval_step(model=pmap_model)(dj.replicate(sp),
                                                                 dj.shard_batch(batch)))
  fields = ("params", "dnet_params", "batch_stats")
  return {
      # test_parallel.py's synced_batchnorm case: its keys, per-array relative differences.
      "pmap_vs_single": {f: max_leaf_rel_diff(getattr(sp, f), getattr(s1, f)) for f in fields}
                        | {"metrics": max_leaf_rel_diff(mp, m1),
                           "eval_counts": max_leaf_rel_diff(eval_pmap, eval_single),
                           "dnet_moved": max_leaf_abs_diff(s1.dnet_params, state.dnet_params),
                           "devices": jax.local_device_count()},
      "mesh_vs_single": {f: max_rel_diff(getattr(sm, f), getattr(s1, f)) for f in fields}
                        | {"metrics": max_rel_diff(mm, m1), "eval": max_rel_diff(eval_mesh, eval_single)},
      "mesh_vs_pmap": {f: max_rel_diff(getattr(sm, f), getattr(sp, f)) for f in fields}
                      | {"metrics": max_rel_diff(mm, mp)},
      "params_sharding_replicated": bool(jax.tree.leaves(sm.params)[0].sharding.is_fully_replicated),
      "dnet_moved": max_rel_diff(s1.dnet_params, state.dnet_params),
      "devices": len(mesh.devices.flat),
  }


def equinox_devices() -> dict:
  """An Equinox model with BatchNorm and state: mesh equals one device; pmap runs."""
  import equinox as eqx
  from model_kinds import IN, EqxMLP
  module, eqx_state = eqx.nn.make_with_state(EqxMLP)(3, jax.random.key(1))
  model = dj.equinox_classifier(module, eqx_state)
  dnet = dj.DifficultyNet(3, hidden=(4,), param_dtype=jnp.float64)
  tx, dnet_tx = optax.sgd(0.1, momentum=0.9), optax.sgd(1.0)
  state = dj.create_train_state(jax.random.key(0), model, tx, jnp.zeros((2, IN)), 3, dnet=dnet,
                                dnet_tx=dnet_tx, class_accuracy=jnp.asarray([0.2, 0.5, 0.8]))
  batch = random_batch(3, 16, 3, shape=(IN,), dtype=np.float64)
  meta_batch = random_batch(4, 8, 3, shape=(IN,), dtype=np.float64, balanced=True)
  kwargs = dict(model=model, dnet=dnet, tx=tx, dnet_tx=dnet_tx, learning_rate=0.1)
  mesh = dj.data_mesh()
  single, _ = dj.jit_train_step(donate=False, **kwargs)(state, batch, meta_batch)
  sharded, _ = dj.sharded_train_step(mesh, donate=False, **kwargs)(
      dj.replicate_on_mesh(state, mesh), dj.shard_global_batch(batch, mesh),
      dj.shard_global_batch(meta_batch, mesh))
  pmapped, metrics = dj.pmap_train_step(**kwargs)(
      dj.replicate(state), dj.shard_batch(batch), dj.shard_batch(meta_batch))
  return {"mesh_vs_single": max_rel_diff((sharded.params, sharded.dnet_params),
                                         (single.params, single.dnet_params)),
          "pmap_finite": bool(np.isfinite(np.asarray(metrics["meta_ce"])).all()),
          "pmap_accuracy_shape": list(pmapped.class_accuracy.shape)}


def readme_block(heading: str) -> str:
  text = open(os.path.join(HERE, "..", "README.md")).read()
  section = text.split(heading + "\n", 1)[1].split("\n#", 1)[0]
  (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
  return block


def readme_recipe(heading: str) -> dict:
  from flax import linen as nn
  from sklearn.datasets import load_digits

  class MyNet(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(10)(nn.relu(nn.Dense(32)(x.reshape(x.shape[0], -1))))

  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  y = digits.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(y))
  meta_idx = np.concatenate([order[y[order] == c][:10] for c in range(10)])  # 100: pads to 104
  train_idx = np.setdiff1d(order, meta_idx)

  def my_batches(epoch):
    perm = np.random.default_rng(epoch).permutation(train_idx)
    for i in range(0, 4 * 64, 64):
      m = np.random.default_rng(epoch * 10 + i).choice(meta_idx, 20, replace=False)
      yield ({"image": x[perm[i:i + 64]], "label": y[perm[i:i + 64]]},
             {"image": x[m], "label": y[m]})

  def my_meta_set():
    return {"image": x[meta_idx], "label": y[meta_idx]}

  ns = {"jax": jax, "jnp": jnp, "dj": dj, "model": MyNet(), "my_batches": my_batches,
        "my_meta_set": my_meta_set, "dnet": dj.DifficultyNet(num_classes=10, hidden=(16,)),
        "tx": dj.classifier_optimizer(0.1), "dnet_tx": dj.dnet_optimizer(1e-3)}
  exec(compile(readme_block(heading), "README.md", "exec"), ns)
  state = ns["state"]
  accuracy = np.asarray(jax.device_get(state.class_accuracy))
  rows = accuracy.reshape(-1, 10)
  return {"accuracy_shape": list(accuracy.shape), "rows_equal": bool(np.all(rows == rows[0])),
          "accuracy_mean": float(rows[0].mean()), "step": int(np.ravel(jax.device_get(state.step))[0]),
          "meta_ce_finite": bool(np.isfinite(np.ravel(jax.device_get(ns["metrics"]["meta_ce"]))[0]))}


def chex_variants() -> dict:
  """The pmap variant only: the jit and un-jitted ones run in the main pytest process, where
  the pmap one is skipped (one device)."""
  import test_model_errors
  case = test_model_errors.TrainStepVariantsTest
  names = [n for n in unittest.defaultTestLoader.getTestCaseNames(case) if n.endswith("pmap")]
  suite = unittest.TestSuite(case(n) for n in names)
  result = unittest.TextTestRunner(stream=sys.stderr, verbosity=2).run(suite)
  return {"run": result.testsRun, "failures": len(result.failures) + len(result.errors),
          "skipped": len(result.skipped), "names": names}


def all_results() -> dict:
  results = {f"equivalence/{mode}": equivalence(mode) for mode in ("nested", "jvp")}
  results["readme_pmap"] = readme_recipe("### Several devices: pmap")
  results["readme_mesh"] = readme_recipe("### Several devices or hosts: `jax.jit` over a mesh")
  results["chex_variants"] = chex_variants()
  results["equinox"] = equinox_devices()
  return results


if __name__ == "__main__":
  print("RESULTS " + json.dumps(all_results()))
