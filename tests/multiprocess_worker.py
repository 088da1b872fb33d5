"""One process of tests/test_multiprocess.py: a few Difficulty-Net steps under `jax.pmap`.

Run by the test, never by hand in the test process itself: JAX must see the
device count (XLA_FLAGS) and x64 (JAX_ENABLE_X64) in the environment before it
is imported, and `jax.distributed.initialize` can run once per process.

    multiprocess_worker.py --out DIR --num_processes 2 --process_id I --port P
        one of 2 processes (4 CPU devices each) joined by the distributed runtime;
        each feeds its local part of the same global batches.
    multiprocess_worker.py --out DIR --num_processes 1
        the reference: one process with all 8 devices, plus a single-device
        `jax.jit` step on the whole global batch.

Each process also runs the same steps with `jax.jit` over a mesh of all devices
(`parallel.sharded_train_step`, fed its local part) and refreshes the accuracy
vector from the mesh evaluation.

Writes DIR/process{I}.npz (final classifier and Difficulty-Net parameters; _mesh.npz
for the mesh path),
DIR/process{I}.json (checks made here) and, in reference mode only, DIR/jit.npz
(after the single-device jit steps) and DIR/init.npz (the initial parameters).
Everything runs in float64 so the comparison can be tight (see the test).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

NUM_CLASSES = 4
GLOBAL_BATCH = 16  # 2 examples on each of 8 devices
META_BATCH = 8  # 1 meta example per device
IMAGE_SHAPE = (4, 4, 1)
NUM_STEPS = 3
TIMEOUT_S = 60


def main() -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", required=True)
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--port", type=int, default=0)
  args = parser.parse_args()

  import jax  # pylint: disable=g-import-not-at-top

  from dnet_jax import distributed  # pylint: disable=g-import-not-at-top

  if args.num_processes > 1:
    distributed.initialize(f"localhost:{args.port}", args.num_processes, args.process_id,
                           initialization_timeout=TIMEOUT_S, heartbeat_timeout_seconds=TIMEOUT_S,
                           shutdown_timeout_seconds=TIMEOUT_S)

  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top

  import dnet_jax  # pylint: disable=g-import-not-at-top
  from dnet_jax import parallel  # pylint: disable=g-import-not-at-top
  from dnet_jax.models import DifficultyNet  # pylint: disable=g-import-not-at-top
  from dnet_jax.models.pretrained import flatten_variables  # pylint: disable=g-import-not-at-top

  assert jax.config.jax_enable_x64, "the test must set JAX_ENABLE_X64=1"
  checks = {
      "process_index": jax.process_index(),
      "process_count": jax.process_count(),
      "device_count": jax.device_count(),
      "local_device_count": jax.local_device_count(),
      "is_main_process": distributed.is_main_process(),
  }
  n_local = jax.local_device_count()

  # The pmapped axis index of each local device: processes in order, local devices in order
  # (the layout `distributed.global_batch_to_local` relies on).
  axis_index = jax.pmap(lambda x: jax.lax.axis_index("i") + 0 * x, axis_name="i")(
      np.zeros(n_local, np.int32))
  checks["axis_index"] = np.asarray(axis_index).tolist()
  checks["sum_across_processes"] = distributed.sum_across_processes(
      {"x": np.array([jax.process_index() + 1.0, 1.0])})["x"].tolist()

  class TinyMLP(nn.Module):
    """Flatten, dense(16), ReLU, dense(C); all float64, no BatchNorm."""
    num_classes: int

    @nn.compact
    def __call__(self, x, train: bool = False):
      del train
      x = x.reshape((x.shape[0], -1))
      x = nn.relu(nn.Dense(16, param_dtype=jnp.float64, dtype=jnp.float64)(x))
      return nn.Dense(self.num_classes, param_dtype=jnp.float64, dtype=jnp.float64)(x)

  model = TinyMLP(NUM_CLASSES)
  dnet = DifficultyNet(NUM_CLASSES, hidden=(8, 8), use_bias=True, param_dtype=jnp.float64)
  tx = dnet_jax.classifier_optimizer(0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
  dnet_tx = dnet_jax.dnet_optimizer(1e-2)
  hyper = dict(model=model, dnet=dnet, tx=tx, dnet_tx=dnet_tx, learning_rate=0.1)

  # Identical in every process: the same seeds give the same initial state and batches.
  data_rng = np.random.default_rng(123)
  accuracy = data_rng.uniform(0.1, 0.9, NUM_CLASSES)
  batches = []
  for _ in range(NUM_STEPS):
    batches.append((
        {"image": data_rng.normal(size=(GLOBAL_BATCH,) + IMAGE_SHAPE),
         "label": data_rng.integers(0, NUM_CLASSES, GLOBAL_BATCH).astype(np.int32)},
        {"image": data_rng.normal(size=(META_BATCH,) + IMAGE_SHAPE),
         "label": data_rng.integers(0, NUM_CLASSES, META_BATCH).astype(np.int32)}))
  state = dnet_jax.create_train_state(
      jax.random.key(0), model, tx, np.zeros((1,) + IMAGE_SHAPE), NUM_CLASSES, dnet=dnet,
      dnet_tx=dnet_tx, class_accuracy=accuracy)

  step = parallel.pmap_train_step(donate=False, **hyper)
  replicated = parallel.replicate(state)
  losses = []
  for batch, meta_batch in batches:
    local_batch = distributed.global_batch_to_local(batch)
    local_meta = distributed.global_batch_to_local(meta_batch)
    replicated, metrics = step(replicated, parallel.shard_batch(local_batch),
                               parallel.shard_batch(local_meta))
    losses.append(float(np.asarray(metrics["train_loss"])[0]))
  final = jax.device_get(parallel.unreplicate(replicated))
  checks["train_loss"] = losses
  # All local replicas must agree (they are updated by the same all-reduced gradients).
  leaves = jax.tree.leaves(jax.device_get(replicated.params))
  checks["replicas_identical"] = all(bool(np.all(x == x[:1])) for x in leaves)

  out = os.path.join(args.out, f"process{args.process_id}")
  np.savez(out + ".npz", **flatten_variables(
      {"params": final.params, "dnet_params": final.dnet_params}))

  # The mesh path: jax.jit + NamedSharding over all devices of all processes, each process
  # feeding its local part; then the accuracy refresh from the mesh evaluation.
  mesh = parallel.data_mesh()
  mesh_step = parallel.sharded_train_step(mesh, donate=False, **hyper)
  on_mesh = parallel.replicate_on_mesh(state, mesh)
  for batch, meta_batch in batches:
    on_mesh, _ = mesh_step(
        on_mesh, parallel.shard_global_batch(distributed.global_batch_to_local(batch), mesh),
        parallel.shard_global_batch(distributed.global_batch_to_local(meta_batch), mesh))
  counts = parallel.sharded_eval_step(mesh, model=model)(
      on_mesh, parallel.shard_global_batch(distributed.global_batch_to_local(batches[0][0]), mesh))
  on_mesh = dnet_jax.with_class_accuracy(on_mesh, counts["correct"], counts["total"])
  local = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), on_mesh)
  checks["mesh_class_accuracy"] = local.class_accuracy.tolist()
  np.savez(out + "_mesh.npz", **flatten_variables(
      {"params": local.params, "dnet_params": local.dnet_params}))

  if args.num_processes == 1:  # reference: one device, whole global batch, plain jit
    np.savez(os.path.join(args.out, "init.npz"), **flatten_variables(
        {"params": state.params, "dnet_params": state.dnet_params}))
    jit_step = parallel.jit_train_step(donate=False, **hyper)
    single = state
    for batch, meta_batch in batches:
      single, _ = jit_step(single, batch, meta_batch)
    single = jax.device_get(single)
    counts = parallel.jit_eval_step(model=model)(single, batches[0][0])
    checks["jit_class_accuracy"] = (np.asarray(counts["correct"]) /
                                    np.maximum(np.asarray(counts["total"]), 1)).tolist()
    np.savez(os.path.join(args.out, "jit.npz"), **flatten_variables(
        {"params": single.params, "dnet_params": single.dnet_params}))

  if args.num_processes > 1:
    distributed.barrier("worker_done", timeout_s=TIMEOUT_S)
  with open(out + ".json", "w") as f:
    json.dump(checks, f)
  if args.num_processes > 1:
    distributed.shutdown()
  return 0


if __name__ == "__main__":
  sys.exit(main())
