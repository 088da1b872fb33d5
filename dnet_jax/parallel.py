"""Compiled entry points: `jax.jit` on one device, `jax.pmap` across local devices.

The pmapped steps are the pure steps of `dnet_jax.steps` with `axis_name` set,
so gradients are averaged and counts summed over devices. State is replicated
(a leading device axis on every leaf) and batches are sharded along their
leading axis with `shard_batch`. Since jax 0.10, `pmap` lowers to jit +
shard_map with pmap's own collective semantics; the equivalence with one device
is tested in tests/test_parallel.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dnet_jax import steps

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


def jit_train_step(donate: bool = True, **kwargs):
  """`jax.jit` of `steps.train_step` with its networks/optimizers bound by keyword.

  Example:
    step = jit_train_step(model=model, dnet=dnet, tx=tx, dnet_tx=dnet_tx, learning_rate=sched)
    state, metrics = step(state, batch, meta_batch)
  """
  return jax.jit(functools.partial(steps.train_step, **kwargs),
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
  return jax.jit(functools.partial(steps.baseline_step, **kwargs),
                 donate_argnums=(0,) if donate else ())


def jit_eval_step(**kwargs):
  """`jax.jit` of `steps.eval_step` with the model bound by keyword."""
  return jax.jit(functools.partial(steps.eval_step, **kwargs))


def pmap_train_step(donate: bool = True, **kwargs):
  """`jax.pmap` of `steps.train_step` over local devices (state replicated, batches sharded)."""
  return jax.pmap(functools.partial(steps.train_step, axis_name=AXIS_NAME, **kwargs),
                  axis_name=AXIS_NAME, donate_argnums=(0,) if donate else ())


def pmap_baseline_step(donate: bool = True, **kwargs):
  """`jax.pmap` of `steps.baseline_step` over local devices."""
  return jax.pmap(functools.partial(steps.baseline_step, axis_name=AXIS_NAME, **kwargs),
                  axis_name=AXIS_NAME, donate_argnums=(0,) if donate else ())


def pmap_eval_step(**kwargs):
  """`jax.pmap` of `steps.eval_step`; counts come back summed over devices (same on each)."""
  return jax.pmap(functools.partial(steps.eval_step, axis_name=AXIS_NAME, **kwargs),
                  axis_name=AXIS_NAME)


def pmap_step(step_fn, donate: bool = True):
  """`jax.pmap` over local devices of any per-device `step_fn(state, *batches)`.

  For steps composed from `dnet_jax.steps` with `axis_name=AXIS_NAME` (e.g. with
  on-device preprocessing in front); the state (argument 0) is donated unless
  `donate` is False (evaluation steps).
  """
  return jax.pmap(step_fn, axis_name=AXIS_NAME, donate_argnums=(0,) if donate else ())
