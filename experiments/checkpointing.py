"""Checkpoints of a run: the TrainState plus the loop's bookkeeping, with orbax.

One checkpoint (in `<workdir>/checkpoints/<step>/`) holds two items:
  * "state": the unreplicated `TrainState` (classifier, BatchNorm statistics,
    both optimizers, Difficulty-Net, class-accuracy vector, step, raw key),
    saved with `StandardSave` and restored into an abstract target;
  * "loop": the trainer's JSON bookkeeping (per-epoch history, partial-epoch
    metric sums, accumulated training time).
Together they are everything a resumed run needs: data order and meta batches
are functions of (seed, epoch / step), and step keys come from the state.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

_STATE = "state"
_LOOP = "loop"


def abstract_like(tree):
  """ShapeDtypeStructs with shardings of a pytree (arrays or ShapeDtypeStructs).

  Leaves without a sharding are placed on the first local device: the
  trainer replicates the restored state itself.
  """
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def leaf(x):
    sharding = getattr(x, "sharding", None) or default
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  return jax.tree.map(leaf, tree)


class Checkpointer:
  """A thin wrapper around `ocp.CheckpointManager` for (state, loop) pairs.

  Saving is asynchronous (the arrays are copied to the host, then written in
  the background); orbax writes to a temporary directory and renames it when
  complete, so an interrupted save never becomes the latest checkpoint.
  Call `close()` (or use it as a context manager) before exiting.
  """

  def __init__(self, directory: str, max_to_keep: int = 3, asynchronous: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=asynchronous,
        # A save interrupted by a kill leaves a *.orbax-checkpoint-tmp directory behind;
        # it is never a valid checkpoint, and removing it lets that step be saved again.
        cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=(_STATE, _LOOP))

  def latest_step(self) -> int | None:
    """The step of the newest complete checkpoint, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, loop: dict[str, Any]) -> bool:
    """Saves (unreplicated state, JSON-able loop dict) under `step`; False if it exists."""
    if step in self._manager.all_steps():
      return False
    return self._manager.save(int(step), args=ocp.args.Composite(
        **{_STATE: ocp.args.StandardSave(state), _LOOP: ocp.args.JsonSave(loop)}))

  def restore(self, step: int, target_state) -> tuple[Any, dict[str, Any]]:
    """(state, loop) of checkpoint `step`, the state in the structure of `target_state`.

    `target_state` may be concrete arrays or ShapeDtypeStructs; only its tree
    structure, shapes, dtypes and shardings are used.
    """
    restored = self._manager.restore(int(step), args=ocp.args.Composite(
        **{_STATE: ocp.args.StandardRestore(abstract_like(target_state)),
           _LOOP: ocp.args.JsonRestore()}))
    return restored[_STATE], dict(restored[_LOOP])

  def restore_loop(self, step: int) -> dict[str, Any]:
    """Only the bookkeeping of checkpoint `step` (enough to report a finished run)."""
    restored = self._manager.restore(int(step), args=ocp.args.Composite(
        **{_LOOP: ocp.args.JsonRestore()}))
    return dict(restored[_LOOP])

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
