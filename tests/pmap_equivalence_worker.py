"""Worker for test_parallel.py: run in a process with 8 fake CPU devices and x64 enabled.

Runs one train step under `jax.pmap` over 8 devices on a global batch and the
same step on one device (jit) on the whole batch, and prints the largest
relative differences as JSON. tests/eight_device_worker.py runs it together with
mesh_equivalence_worker.py in one process (which computes the synchronised-BatchNorm
cases once for both).
"""

import json
import os
import sys

assert "xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")
import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import dnet_jax as dj  # noqa: E402
from dnet_jax import parallel  # noqa: E402
from tiny_models import TinyConvNet, make_state, random_batch  # noqa: E402

C = 4


def max_rel_diff(a, b):
  diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))
                                          / (np.max(np.abs(np.asarray(y))) + 1e-300)), a, b)
  return max(jax.tree.leaves(diffs), default=0.0)


def run(case: str, mode: str):
  use_bn = case != "no_batchnorm"
  single_model = TinyConvNet(C, use_batchnorm=use_bn, param_dtype=jnp.float64)
  # "per_device_batchnorm" is the negative control: each device normalises with its own
  # 4 examples, which is a different model, so it must NOT match one device.
  pmap_model = TinyConvNet(C, use_batchnorm=use_bn, param_dtype=jnp.float64,
                           bn_axis_name=parallel.AXIS_NAME if case == "synced_batchnorm" else None)
  state, dnet, tx, dnet_tx = make_state(single_model, C, dtype=jnp.float64, seed=5, lr=0.2,
                                        dnet_lr=1e-2)
  # Plain SGD on Difficulty-Net, so its parameters carry the gradient's values (Adam's
  # first steps would normalise them away).
  dnet_tx = optax.sgd(1.0)
  state = state.replace(dnet_opt_state=dnet_tx.init(state.dnet_params))
  batch = random_batch(1, 32, C, dtype=np.float64)
  meta_batch = random_batch(2, 16, C, dtype=np.float64, balanced=True)
  kwargs = dict(dnet=dnet, tx=tx, dnet_tx=dnet_tx, learning_rate=0.2, meta_grad=mode)
  single = jax.jit(lambda s, b, m: dj.train_step(s, b, m, model=single_model, **kwargs))
  multi = parallel.pmap_train_step(donate=False, model=pmap_model, **kwargs)
  s1, m1 = state, None
  sp = parallel.replicate(state)
  for _ in range(2):  # two steps: the second uses the momentum and Adam state of the first
    s1, m1 = single(s1, batch, meta_batch)
    sp, mp = multi(sp, parallel.shard_batch(batch), parallel.shard_batch(meta_batch))
  sp = parallel.unreplicate(sp)
  eval_single = jax.jit(lambda s, b: dj.eval_step(s, b, model=single_model))(s1, batch)
  eval_multi = parallel.pmap_eval_step(model=pmap_model)(
      parallel.replicate(sp), parallel.shard_batch(batch))
  return {
      "params": max_rel_diff(sp.params, s1.params),
      "dnet_params": max_rel_diff(sp.dnet_params, s1.dnet_params),
      "batch_stats": max_rel_diff(sp.batch_stats, s1.batch_stats) if use_bn else 0.0,
      "metrics": max_rel_diff(parallel.unreplicate(mp), m1),
      "eval_counts": max_rel_diff(parallel.unreplicate(eval_multi), eval_single),
      "dnet_moved": float(max(jax.tree.leaves(jax.tree.map(
          lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
          s1.dnet_params, state.dnet_params)))),
      "devices": jax.local_device_count(),
  }


def all_results(cases=("no_batchnorm", "synced_batchnorm")) -> dict:
  results = {f"{case}/{mode}": run(case, mode) for case in cases for mode in ("nested", "jvp")}
  results["per_device_batchnorm/nested"] = run("per_device_batchnorm", "nested")
  return results


if __name__ == "__main__":
  print("RESULTS " + json.dumps(all_results()))
