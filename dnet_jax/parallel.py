"""Compiled entry points: `jax.jit` on one device, `jax.pmap` across local devices, and
`jax.jit` with `NamedSharding` over a 1-D device mesh (one host or several).

The pmapped steps are the pure steps of `dnet_jax.steps` with `axis_name` set,
so gradients are averaged and counts summed over devices. State is replicated
(a leading device axis on every leaf) and batches are sharded along their
leading axis with `shard_batch`. Since jax 0.10, `pmap` lowers to jit +
shard_map with pmap's own collective semantics; the equivalence with one device
is tested in tests/test_parallel.py. Inside a pmapped step the device axis is
named `AXIS_NAME` ("batch"): a model's synchronised BatchNorm must use
`axis_name=dj.AXIS_NAME` (linen `nn.BatchNorm(axis_name=...)`).

The mesh path needs no axis name at all: `data_mesh()` builds a 1-D mesh named
`AXIS_NAME`, `replicate_on_mesh` places the state on every device, and
`shard_global_batch` splits a batch along it (each process gives its own part
of the global batch). `sharded_train_step` is `jax.jit` of the ordinary step with
those shardings; XLA partitions it, so every mean (the loss, BatchNorm's batch
statistics) is over the global batch: BatchNorm is synchronised for free, and the
result equals one device (tested in float64 on 8 CPU devices).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dnet_jax import steps
from dnet_jax.classifier import as_classifier

AXIS_NAME = "batch"


@functools.lru_cache(maxsize=None)
def _pmap_identity(devices: tuple):
  # Placing arrays with pmap itself gives them exactly the sharding that pmapped
  # steps return, so a step's output can be fed back without a recompilation.
  return jax.pmap(lambda x: x, axis_name=AXIS_NAME, devices=list(devices))


def local_devices():
  """The local devices in the order `jax.pmap` uses."""
  return jax.local_devices()


def shard_batch(batch, devices=None):
  """Splits a host batch [B, ...] into [n_devices, B / n_devices, ...] placed on the devices.

  Raises a ValueError naming the batch size and the device count when B is not
  divisible, rather than letting pmap fail later.
  """
  devices = tuple(devices or local_devices())
  n = len(devices)

  def _shard(x):
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    if x.ndim == 0 or x.shape[0] % n:
      raise ValueError(
          f"Cannot split a batch of {x.shape[0] if x.ndim else 'scalar'} examples evenly across "
          f"{n} devices: choose a batch size divisible by {n} (the local device count).")
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])

  return _pmap_identity(devices)(jax.tree.map(_shard, batch))


def replicate(tree, devices=None):
  """Copies every leaf of `tree` to each device, with a leading device axis."""
  devices = tuple(devices or local_devices())
  stacked = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (len(devices),) + np.shape(x)),
                         tree)
  return _pmap_identity(devices)(stacked)


def unreplicate(tree):
  """The first (local) device's copy of every leaf of a replicated tree.

  Reads that device's buffer (`addressable_data(0)`) instead of indexing
  `x[0]`, which compiles and runs an XLA program over all the devices that
  ends in a collective (the row is replicated to every device). Under several
  processes with CPU collectives (gloo) such eager collectives, issued in a
  burst for every leaf of a state, could deadlock a process (observed in
  tests/test_multiprocess_runner.py); host-side bookkeeping needs no device
  program at all.
  """

  def first(x):
    if isinstance(x, jax.Array) and x.ndim >= 1:
      shard = x.addressable_data(0)  # the first local device's block
      if shard.shape == (1,) + x.shape[1:]:  # split over the devices (pmap's layout)
        return shard.reshape(x.shape[1:])
      if shard.shape == x.shape[1:]:  # a squeezed per-device block
        return shard
    return x[0]  # any other layout (or a host array)

  return jax.tree.map(first, tree)


def pad_batch(batch, multiple: int):
  """Pads a host batch [B, ...] to the next multiple of `multiple` examples, with a mask.

  The padding repeats the last example, and batch["mask"] (1 = real, 0 = padding;
  combined with an existing mask) tells `eval_step` not to count it and the meta
  cross-entropy not to average it. Use it to split an evaluation set or a meta
  batch over `jax.local_device_count()` (pmap) or a mesh's device count.
  """
  if multiple < 1:
    raise ValueError(f"pad_batch: multiple must be a positive integer, got {multiple}.")
  batch = steps.as_batch(batch)
  size = int(np.shape(batch["label"])[0])
  if size == 0:
    raise ValueError("pad_batch: the batch is empty.")
  pad = -size % multiple
  mask = np.ones((size,), np.float32) if "mask" not in batch else np.asarray(batch["mask"], np.float32)

  def _pad(x):
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] != size:
      raise ValueError(f"pad_batch: every entry needs the same leading size {size}; got shape {x.shape}.")
    return np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]) if pad else x

  padded = {k: _pad(v) for k, v in batch.items() if k != "mask"}
  padded["mask"] = np.concatenate([mask, np.zeros((pad,), np.float32)])
  return padded


def data_mesh(devices=None) -> Mesh:
  """A 1-D mesh over `devices` (default: all devices of all processes) named `AXIS_NAME`."""
  devices = np.asarray(devices if devices is not None else jax.devices())
  return Mesh(devices.reshape(-1), (AXIS_NAME,))


def replicate_on_mesh(tree, mesh: Mesh):
  """Places every leaf of `tree` on every device of `mesh` (fully replicated).

  Every process must pass the same values (as with `create_train_state` from the
  same key). The leaves keep their shapes: no device axis is added.
  """
  sharding = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(lambda x: _global_array(np.asarray(x), sharding, np.shape(x)), tree)


def shard_global_batch(batch, mesh: Mesh):
  """A global batch split along `mesh`'s axis from each process's local part.

  On one host the local part is the whole batch; on several, process p gives
  its own B / num_processes examples and the result is the global [B, ...]
  array. B must split evenly over the mesh's devices (`pad_batch` helps).
  """
  sharding = NamedSharding(mesh, PartitionSpec(AXIS_NAME))
  local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)

  def _shard(x):
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] % local_devices:
      raise ValueError(
          f"Cannot split a batch of {x.shape[0] if x.ndim else 'scalar'} examples evenly across "
          f"this process's {local_devices} mesh devices: choose a per-process batch size "
          f"divisible by {local_devices} (or pad it with dj.pad_batch).")
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree.map(_shard, batch)


def _global_array(x: np.ndarray, sharding, shape):
  shards = [jax.device_put(x[index], device)
            for device, index in sharding.addressable_devices_indices_map(shape).items()]
  return jax.make_array_from_single_device_arrays(shape, sharding, shards)


def _with_classifier(kwargs: dict) -> dict:
  # Build the model's adapter once, outside any trace (NNX / Equinox split the module).
  if "model" in kwargs:
    kwargs = dict(kwargs, model=as_classifier(kwargs["model"]))
  return kwargs


def _sharded_jit(fn, mesh: Mesh, num_batches: int, donate: bool, state_out: bool = True):
  replicated = NamedSharding(mesh, PartitionSpec())
  split = NamedSharding(mesh, PartitionSpec(AXIS_NAME))
  return jax.jit(fn, in_shardings=(replicated,) + (split,) * num_batches,
                 out_shardings=(replicated, replicated) if state_out else replicated,
                 donate_argnums=(0,) if donate else ())


def sharded_train_step(mesh: Mesh, donate: bool = True, **kwargs):
  """`jax.jit` of `steps.train_step` over `mesh`: state replicated, batches split.

  No `axis_name`: the step is written for one device and XLA partitions it, so
  the result equals the one-device step on the global batch (BatchNorm
  statistics included). Feed `replicate_on_mesh(state, mesh)` and
  `shard_global_batch(batch, mesh)`; keyword arguments as `jit_train_step`.
  """
  return _sharded_jit(functools.partial(steps.train_step, **_with_classifier(kwargs)), mesh, 2,
                      donate)


def sharded_baseline_step(mesh: Mesh, donate: bool = True, **kwargs):
  """`jax.jit` of `steps.baseline_step` over `mesh` (see `sharded_train_step`)."""
  return _sharded_jit(functools.partial(steps.baseline_step, **_with_classifier(kwargs)), mesh, 1,
                      donate)


def sharded_eval_step(mesh: Mesh, **kwargs):
  """`jax.jit` of `steps.eval_step` over `mesh`: global per-class counts, replicated."""
  return _sharded_jit(functools.partial(steps.eval_step, **_with_classifier(kwargs)), mesh, 1,
                      False, state_out=False)


def jit_train_step(donate: bool = True, **kwargs):
  """`jax.jit` of `steps.train_step` with its networks/optimizers bound by keyword.

  Example:
    step = jit_train_step(model=model, dnet=dnet, tx=tx, dnet_tx=dnet_tx, learning_rate=sched)
    state, metrics = step(state, batch, meta_batch)
  """
  return jax.jit(functools.partial(steps.train_step, **_with_classifier(kwargs)),
                 donate_argnums=(0,) if donate else ())


class MetaIntervalStep:
  """Updates Difficulty-Net every k-th step only: `train_step` exactly on steps with
  step % k == 0, and `train_step(update_dnet=False)` (theta on the current weights,
  no lookahead) on the others. With k = 1 it is the exact method.

  The choice is made on the host from a step counter read once from the state on
  the first call (one device sync), so both variants stay fast, separately
  compiled executables. Call `reset()` after loading a different state.
  """

  def __init__(self, meta_fn, plain_fn, interval: int):
    if interval < 1:
      raise ValueError(f"meta_interval must be a positive integer, got {interval}.")
    self.interval = interval
    self._meta_fn, self._plain_fn = meta_fn, plain_fn
    self._next_step = None

  def reset(self) -> None:
    self._next_step = None

  def uses_meta_update(self, step: int) -> bool:
    return step % self.interval == 0

  def __call__(self, state, batch, meta_batch):
    if self._next_step is None:
      self._next_step = int(np.asarray(jax.device_get(state.step)).reshape(-1)[0])
    fn = self._meta_fn if self.uses_meta_update(self._next_step) else self._plain_fn
    self._next_step += 1
    return fn(state, batch, meta_batch)


def jit_meta_interval_step(meta_interval: int, donate: bool = True, **kwargs) -> MetaIntervalStep:
  """`MetaIntervalStep` over two `jax.jit`-compiled train steps (kwargs as `jit_train_step`)."""
  return MetaIntervalStep(jit_train_step(donate, **kwargs),
                          jit_train_step(donate, update_dnet=False, **kwargs), meta_interval)


def pmap_meta_interval_step(meta_interval: int, donate: bool = True, **kwargs) -> MetaIntervalStep:
  """`MetaIntervalStep` over two `jax.pmap`-compiled train steps."""
  return MetaIntervalStep(pmap_train_step(donate, **kwargs),
                          pmap_train_step(donate, update_dnet=False, **kwargs), meta_interval)


def jit_baseline_step(donate: bool = True, **kwargs):
  """`jax.jit` of `steps.baseline_step` with model, tx and loss bound by keyword."""
  return jax.jit(functools.partial(steps.baseline_step, **_with_classifier(kwargs)),
                 donate_argnums=(0,) if donate else ())


def jit_eval_step(**kwargs):
  """`jax.jit` of `steps.eval_step` with the model bound by keyword."""
  return jax.jit(functools.partial(steps.eval_step, **_with_classifier(kwargs)))


def pmap_train_step(donate: bool = True, **kwargs):
  """`jax.pmap` of `steps.train_step` over local devices (state replicated, batches sharded)."""
  return jax.pmap(functools.partial(steps.train_step, axis_name=AXIS_NAME, **_with_classifier(kwargs)),
                  axis_name=AXIS_NAME, donate_argnums=(0,) if donate else ())


def pmap_baseline_step(donate: bool = True, **kwargs):
  """`jax.pmap` of `steps.baseline_step` over local devices."""
  return jax.pmap(functools.partial(steps.baseline_step, axis_name=AXIS_NAME, **_with_classifier(kwargs)),
                  axis_name=AXIS_NAME, donate_argnums=(0,) if donate else ())


def pmap_eval_step(**kwargs):
  """`jax.pmap` of `steps.eval_step`; counts come back summed over devices (same on each)."""
  return jax.pmap(functools.partial(steps.eval_step, axis_name=AXIS_NAME, **_with_classifier(kwargs)),
                  axis_name=AXIS_NAME)


def pmap_step(step_fn, donate: bool = True):
  """`jax.pmap` over local devices of any per-device `step_fn(state, *batches)`.

  For steps composed from `dnet_jax.steps` with `axis_name=AXIS_NAME` (e.g. with
  on-device preprocessing in front); the state (argument 0) is donated unless
  `donate` is False (evaluation steps).
  """
  return jax.pmap(step_fn, axis_name=AXIS_NAME, donate_argnums=(0,) if donate else ())
