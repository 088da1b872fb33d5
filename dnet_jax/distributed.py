"""Multi-process (multi-host) training helpers around `jax.distributed`.

A run over several processes (hosts) starts every process with the same
program. Each calls `initialize(...)` before any other JAX call, reads its own
shard of the data, and calls the `jax.pmap`-ed steps of `dnet_jax.parallel`
with arrays for its *local* devices only; the collectives inside the step
(gradient means, synchronised BatchNorm, count sums) then span the devices of
all processes, so the processes stay in lockstep with identical replicated
state.

Device order. Under multi-process `jax.pmap`, the mapped axis runs over the
devices of process 0 (in `jax.local_devices(process_index=0)` order), then
those of process 1, and so on (`jax/_src/pmap.py`, `_get_mesh_devices`; the
same order as the old pmap). `dnet_jax.parallel.shard_batch` splits a local
batch over `jax.local_devices()` in order. Hence the global batch a pmapped
step sees is the concatenation of the processes' local batches in process
order, and `global_batch_to_local` is a contiguous slice.

CPU. Cross-process collectives on CPU need an implementation; `initialize`
selects gloo (TCP) through `jax_cpu_collectives_implementation`, which jax
0.10 also uses by default (earlier versions defaulted to none, and a pmapped
psum across processes then failed). tests/test_multiprocess.py runs two CPU
processes on localhost with four devices each.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np

_DEFAULT_TIMEOUT_S = 300


def _cpu_may_be_used() -> bool:
  platforms = os.environ.get("JAX_PLATFORMS") or jax.config.values.get("jax_platforms") or ""
  return not platforms or "cpu" in platforms.split(",")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None,
               local_device_ids: int | Sequence[int] | None = None, *,
               cpu_collectives: str | None = "gloo",
               initialization_timeout: int = _DEFAULT_TIMEOUT_S,
               heartbeat_timeout_seconds: int = 100,
               shutdown_timeout_seconds: int = _DEFAULT_TIMEOUT_S) -> None:
  """Starts JAX's distributed runtime; call once per process, before any other JAX call.

  With no arguments, the cluster is detected from the environment (Cloud TPU
  pods, Slurm, Open MPI, `JAX_COORDINATOR_ADDRESS`, ...), as
  `jax.distributed.initialize()` does. Otherwise give at least the
  coordinator's "host:port" (process 0 serves it), the number of processes and
  this process's id in [0, num_processes).

  Args:
    coordinator_address: "host:port" of process 0.
    num_processes: number of processes.
    process_id: this process's index.
    local_device_ids: restrict this process to these local (GPU) devices.
    cpu_collectives: "gloo" (default) or "mpi": how CPU devices of different
      processes exchange data; None leaves JAX's setting alone. It affects only
      the CPU backend, so it is harmless on TPU/GPU.
    initialization_timeout: seconds to wait for all processes to connect;
      initialisation fails (rather than hangs) after that.
    heartbeat_timeout_seconds: a process missing heartbeats this long is
      declared dead and the others fail.
    shutdown_timeout_seconds: how long shutdown waits for the other processes.

  Does nothing when the runtime is already initialised.
  """
  if jax.distributed.is_initialized():
    return
  explicit = (coordinator_address, num_processes, process_id)
  if any(a is not None for a in explicit) and any(a is None for a in explicit):
    raise ValueError(
        "initialize: give coordinator_address, num_processes and process_id together "
        f"(got {coordinator_address!r}, {num_processes!r}, {process_id!r}), or none of "
        "them to detect the cluster from the environment.")
  if cpu_collectives is not None and _cpu_may_be_used():
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes,
      process_id=process_id, local_device_ids=local_device_ids,
      initialization_timeout=initialization_timeout,
      heartbeat_timeout_seconds=heartbeat_timeout_seconds,
      shutdown_timeout_seconds=shutdown_timeout_seconds)


def shutdown() -> None:
  """Stops the distributed runtime (no-op when it is not running)."""
  jax.distributed.shutdown()


def is_main_process() -> bool:
  """True in process 0, the one that writes logs, checkpoints' metadata and plots."""
  return jax.process_index() == 0


def process_shard(n_items: int, process_index: int | None = None,
                  process_count: int | None = None) -> range:
  """The contiguous block of `range(n_items)` that process `process_index` owns.

  Blocks are disjoint and cover `range(n_items)`; their sizes differ by at most
  one (the first `n_items % process_count` processes get one more), as
  `tfds.even_splits`. Training loops that need the same number of batches in
  every process should use `n_items // process_count` items per process.
  Defaults: this process among all processes.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}.")
  if n_items < 0:
    raise ValueError(f"n_items must be >= 0, got {n_items}.")
  base, extra = divmod(n_items, process_count)
  start = process_index * base + min(process_index, extra)
  return range(start, start + base + (process_index < extra))


def global_batch_to_local(global_batch: Any, process_index: int | None = None,
                          process_count: int | None = None) -> Any:
  """The part of a global batch that this process feeds to its local devices.

  Every leaf [B, ...] of `global_batch` (the same in all processes) is cut into
  `process_count` equal contiguous blocks and block `process_index` is
  returned: with `dnet_jax.parallel.shard_batch` on the result, device d of
  the pmapped axis (processes in order, local devices in order; see the module
  docstring) receives rows [d * b, (d + 1) * b) of the global batch, b = B / (total
  devices), exactly as a single process holding all devices would.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count

  def local(x):
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] % process_count:
      raise ValueError(
          f"Cannot split a global batch of {x.shape[0] if x.ndim else 'scalar'} examples "
          f"evenly across {process_count} processes.")
    size = x.shape[0] // process_count
    return x[process_index * size:(process_index + 1) * size]

  return jax.tree.map(local, global_batch)


def sum_across_processes(tree: Any) -> Any:
  """Sums a pytree of host arrays (same shapes in every process) over all processes.

  Every process gets the sum, as numpy arrays. Typical use: per-class
  correct/total counts of an evaluation in which each process saw its own
  shard. With one process the tree comes back as numpy arrays unchanged.
  """
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  gathered = multihost_utils.process_allgather(jax.tree.map(np.asarray, tree), tiled=False)
  return jax.tree.map(lambda x: np.sum(x, axis=0), gathered)


def barrier(name: str, timeout_s: float = _DEFAULT_TIMEOUT_S) -> None:
  """Waits until every process reaches the barrier `name`, failing after `timeout_s`.

  Uses the distributed runtime's coordination-service barrier, which (unlike
  `multihost_utils.sync_global_devices`) takes a timeout, so a crashed peer
  turns into an error instead of a hang. Each barrier name must be used once.
  No-op with one process.
  """
  if jax.process_count() == 1:
    return
  # The only timed barrier JAX exposes is on the (internal) distributed client.
  from jax._src import distributed as _distributed  # pylint: disable=g-import-not-at-top

  client = _distributed.global_state.client
  if client is None:
    raise RuntimeError("barrier: the distributed runtime is not initialised; call initialize().")
  try:
    client.wait_at_barrier(name, int(timeout_s * 1000))
  except Exception as e:  # JaxRuntimeError; its type is internal
    if "DEADLINE_EXCEEDED" in str(e):
      raise TimeoutError(f"Barrier {name!r}: not every process arrived within {timeout_s} s "
                         f"({e}).") from e
    raise RuntimeError(f"Barrier {name!r} failed: {e}") from e
