"""Checkpoints of a run: the TrainState, the loop's bookkeeping and a verification record.

One checkpoint (in `<workdir>/checkpoints/<step>/`) holds three items:
  * "state": the unreplicated `TrainState` (classifier, BatchNorm statistics,
    both optimizers, Difficulty-Net, class-accuracy vector, step, raw key),
    saved with `StandardSave` and restored into an abstract target;
  * "loop": the trainer's JSON bookkeeping (position in the data order,
    per-epoch history, best-validation record, partial-epoch metric sums,
    accumulated training time);
  * "meta": what the checkpoint belongs to: model name, number of classes,
    method, image shape, the shapes and dtypes of every state array (and their
    fingerprint), the dnet_jax version.
Beside them, `digests/<step>.json` holds a SHA-256 of every state array's
bytes, computed by a background thread so that a save costs the training
thread only the copy of the state to the host; `digests/<step>-loop.json`
holds the SHA-256 of the "loop" record (canonical JSON), which every restore
checks: the bookkeeping a resume reads (history, best epoch, position) is
verified like the arrays.

Writing: `check_writable(directory)` (at start-up, and before every save)
creates and removes a probe file and checks the free space, so a read-only
or full checkpoint directory is an exit-3 message at once. Without it a save
into a read-only directory stalls: orbax 0.12.8 creates the step directory
in the background (`AsyncOptions.create_directories_asynchronously`), and
its item writers wait for that creation's completion signal up to its
coordination timeout (`multihost._DEFAULT_BARRIER_TIMEOUT`, 300 s), the
~300 s hang seen with a read-only `checkpoints/`. A save that fails anyway
(ENOSPC, EIO, ...) is turned into a `CheckpointError` (exit 3) as soon as
the background write reports it: `poll()` is called at every log step, and
every later save, wait and close checks too.
Together they are everything a resumed run needs: data order and meta batches
are functions of (seed, epoch / step), and step keys come from the state.

Atomicity (orbax-checkpoint 0.12.8 on a local or NFS file system): a save
writes `<step>.orbax-checkpoint-tmp-<n>/`, writes `_CHECKPOINT_METADATA`
(with `commit_timestamp_nsecs`) and `commit_success.txt` into it when every
item is written, then renames it to `<step>/`. A process killed during a
save therefore leaves only a tmp directory, which orbax never lists as a
step (and removes when the next manager starts: it is never a valid
checkpoint, so nothing saved is lost). But orbax lists *any* directory named
by a step number, complete or not, and restores whatever bytes it finds: a
flipped byte in an array file comes back as a silently wrong number. Hence
two more checks here:
  * complete: `commit_success.txt`, `_CHECKPOINT_METADATA` with a commit
    timestamp, and the "state" and "loop" item directories all exist. `latest_step()`
    skips a step directory that is not complete (a truncated copy, a
    directory emptied by hand) with a warning, and `set_aside_incomplete()`
    renames it to `<step>.incomplete` (never deletes it) so that the step can
    be saved again;
  * verified: `restore` recomputes every array's SHA-256 and compares it
    with `digests/<step>.json` (a checkpoint whose process died before that
    file was written is restored with a warning); `check_compatible` compares
    the meta record with the run about to resume. Either failure is a `CheckpointError` that names the
    checkpoint directory and what differs; nothing is deleted.
"""

from __future__ import annotations

import errno
import contextlib
import json
import os
import shutil
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

import dnet_jax
from experiments.checkpoint_records import (FORMAT_VERSION, compatibility_problems, loop_digest,
                                            non_finite_arrays, shapes_fingerprint,
                                            state_digests, state_shapes)
from experiments.errors import CheckpointError, NonFiniteError

_STATE = "state"
_LOOP = "loop"
_META = "meta"
_DIGESTS = "digests"  # checksums, written off the training thread: digests/<step>.json
ITEMS = (_STATE, _LOOP, _META)
# Files orbax 0.12.8 writes into a step directory just before renaming it into place.
_ORBAX_COMMIT_FILE = "commit_success.txt"
_ORBAX_STEP_METADATA = "_CHECKPOINT_METADATA"
LOOP_DIGEST_SUFFIX = "-loop.json"  # digests/<step>-loop.json: {"sha256": <the loop record's>}
# Free space a run needs at start-up (a checkpoint also needs twice its state's size: `save`).
MIN_FREE_BYTES = 64 * 2**20


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


def _nbytes(tree) -> int:
  return int(sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(tree)))


def _disk_problem(error: BaseException) -> str:
  """What a failed write means for the user (full disk, read-only, ...), from its errno."""
  while error.__cause__ is not None and not isinstance(error, OSError):
    error = error.__cause__
  code = getattr(error, "errno", None)
  if code == errno.ENOSPC or "No space left" in str(error):
    return "the disk is full: free space on it"
  if code in (errno.EROFS, errno.EACCES, errno.EPERM):
    return "the directory is read-only or not writable: fix its permissions"
  return "check the free space and permissions of the workdir"


def check_writable(directory: str, min_free_bytes: int = MIN_FREE_BYTES,
                   outcome: str = "Nothing was started and nothing was deleted.") -> None:
  """Raises CheckpointError (exit 3) unless `directory` (created if missing) can be written
  and its file system has `min_free_bytes` free; `outcome` ends the message."""
  probe = os.path.join(directory, f".write-probe-{os.getpid()}")
  try:
    os.makedirs(directory, exist_ok=True)
    with open(probe, "wb") as f:
      f.write(b"probe")
      f.flush()
      os.fsync(f.fileno())
    os.remove(probe)
  except OSError as e:
    raise CheckpointError(
        f"Cannot write to {directory} ({e.strerror or e}): {_disk_problem(e)}, or pass another "
        f"--workdir. {outcome}") from None
  free = shutil.disk_usage(directory).free
  if free < min_free_bytes:
    raise CheckpointError(
        f"Only {free / 2**20:.1f} MiB are free on the file system of {directory} (a run needs at "
        f"least {min_free_bytes / 2**20:.0f} MiB for its checkpoints and results): free space "
        "or pass another --workdir. Nothing was started.")


# ---------------------------------------------------------------------------- the checkpointer


def barrier_prefix(directory: str) -> str:
  """The prefix of the cross-process barrier names of the manager saving into `directory`.

  orbax 0.12.8 names the barriers of a save's start and of its background
  finalisation by fixed strings ("ThreadSaveMultiHostValueHolder:set_value_start"
  and "...:set_value_end", futures/synchronization.py `MultihostSynchronizedValue.set`),
  so two managers saving at the same step in a multi-process run (a run's checkpoints
  and its best-state keepers, `best_checkpoints/best_val` and `.../best_test`) enter
  barriers of the same name from different threads: the coordination service then
  pairs one process's finalisation with the other's next save ("Barrier ... is already
  ongoing" in one process, a wait without end in the other). The last two components
  of the directory name the manager the same way in every process of the run and
  differently for each manager of it.
  """
  parts = os.path.normpath(os.path.abspath(directory)).split(os.sep)
  return "dnet_jax:" + "/".join(p for p in parts[-2:] if p)


class Checkpointer:
  """A wrapper around `ocp.CheckpointManager` for (state, loop) pairs, with verification.

  Saving is asynchronous (the arrays are copied to the host, then written in
  the background). Call `close()` (or use it as a context manager) before
  exiting. See the module docstring for what "complete" and "verified" mean.
  """

  def __init__(self, directory: str, max_to_keep: int = 3, asynchronous: bool = True):
    self.directory = os.path.abspath(directory)
    self._max_to_keep = max_to_keep
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=asynchronous,
        # A save interrupted by a kill leaves a *.orbax-checkpoint-tmp directory behind;
        # it is never a valid checkpoint, and removing it lets that step be saved again.
        cleanup_tmp_directories=True,
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            barrier_sync_key_prefix=barrier_prefix(self.directory)))
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
    self._warned: set[int] = set()
    self._digest_threads: list[threading.Thread] = []
    self._digest_error: tuple[int, OSError] | None = None
    self._last_saved: int | None = None  # the step of the newest save handed to orbax

  def step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(int(step)))

  def all_steps(self) -> list[int]:
    """Every step directory orbax lists (complete or not), oldest first."""
    return sorted(self._manager.all_steps())

  def incomplete_reason(self, step: int) -> str | None:
    """Why step directory `step` is not a complete checkpoint, or None if it is."""
    path = self.step_path(step)
    if not os.path.isfile(os.path.join(path, _ORBAX_COMMIT_FILE)):
      return f"no {_ORBAX_COMMIT_FILE} (the save never finished)"
    try:
      with open(os.path.join(path, _ORBAX_STEP_METADATA), encoding="utf-8") as f:
        committed = json.load(f).get("commit_timestamp_nsecs")
    except (OSError, ValueError, AttributeError) as e:
      return f"unreadable {_ORBAX_STEP_METADATA} ({e})"
    if not committed:
      return f"{_ORBAX_STEP_METADATA} has no commit timestamp"
    # A missing "meta" alone means an older runner wrote it: complete, but `read_meta` says so.
    missing = [item for item in (_STATE, _LOOP) if not os.path.isdir(os.path.join(path, item))]
    if missing:
      return f"missing item(s) {', '.join(missing)}"
    return None

  def complete_steps(self) -> list[int]:
    """Steps with a complete checkpoint, oldest first; warns once about each other one."""
    complete = []
    for step in self.all_steps():
      reason = self.incomplete_reason(step)
      if reason is None:
        complete.append(step)
      elif step not in self._warned:
        self._warned.add(step)
        logging.warning("Ignoring the incomplete checkpoint %s: %s.", self.step_path(step), reason)
    return complete

  def latest_step(self) -> int | None:
    """The step of the newest complete checkpoint, or None (waits for a save in progress)."""
    self.wait_until_finished()
    complete = self.complete_steps()
    return complete[-1] if complete else None

  def set_aside_incomplete(self) -> list[str]:
    """Renames every incomplete step directory to `<step>.incomplete[-n]`; returns the new paths.

    Nothing is deleted: the directory stays for inspection, and its step can be saved again.
    The one exception is the leftover of orbax's own `max_to_keep` removal (a process stopped
    while orbax deleted an old checkpoint): an incomplete step older than `max_to_keep`
    complete newer ones, which orbax was removing anyway; it is removed with a warning.
    """
    moved = []
    steps = self.all_steps()
    complete = [step for step in steps if self.incomplete_reason(step) is None]
    for step in steps:
      reason = self.incomplete_reason(step)
      if reason is None:
        continue
      source = self.step_path(step)
      newer = sum(1 for s in complete if s > step)
      if self._max_to_keep and newer >= self._max_to_keep:
        shutil.rmtree(source)
        logging.warning("Removed %s: a partly deleted old checkpoint (%s) that orbax was "
                        "removing because max_to_keep=%d newer checkpoints exist.", source,
                        reason, self._max_to_keep)
        moved.append(source)
        continue
      target, n = f"{source}.incomplete", 1
      while os.path.exists(target):
        n += 1
        target = f"{source}.incomplete-{n}"
      os.rename(source, target)
      logging.warning("Checkpoint %s is incomplete (%s); moved it to %s and will not use it.",
                      source, reason, target)
      moved.append(target)
    if moved:
      self._manager.reload()
    return moved

  def read_meta(self, step: int) -> dict[str, Any]:
    """The meta record of checkpoint `step` (CheckpointError if it cannot be read)."""
    if not os.path.isdir(os.path.join(self.step_path(step), _META)):
      raise CheckpointError(
          f"Checkpoint {self.step_path(step)} has no '{_META}' record (model, classes, method, "
          "checksums): it was written by an older version of this runner and cannot be verified. "
          f"{self._advice(step)}")
    try:
      restored = self._manager.restore(int(step), args=ocp.args.Composite(
          **{_META: ocp.args.JsonRestore()}))
      return dict(restored[_META])
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f"Cannot read the metadata of checkpoint {self.step_path(step)}: "
          f"{_first_line(e)}. {self._advice(step)}") from e

  def check_compatible(self, step: int, expected: dict) -> dict[str, Any]:
    """Raises CheckpointError unless checkpoint `step` belongs to a run with identity
    `expected` (`checkpoint_records.run_identity`); returns its meta record. Warns if
    dnet_jax's version differs."""
    meta = self.read_meta(step)
    problems = compatibility_problems(meta, expected)
    if problems:
      raise CheckpointError(
          f"Checkpoint {self.step_path(step)} was written by a different experiment and cannot "
          f"be resumed by this config: {'; '.join(problems)}. Use a new --workdir for this "
          "config, or rerun with the settings the checkpoint was written with. Nothing was "
          "deleted.")
    if meta.get("dnet_jax_version") != dnet_jax.__version__:
      logging.warning("Checkpoint %s was written by dnet_jax %s; this is %s.",
                      self.step_path(step), meta.get("dnet_jax_version"), dnet_jax.__version__)
    return meta

  def save(self, step: int, state, loop: dict[str, Any], identity: dict | None = None) -> bool:
    """Saves (unreplicated state, JSON-able loop dict) under `step`; False if it exists.

    Refuses (NonFiniteError) to save a state with a NaN or Inf anywhere (checked
    on the device), so the newest checkpoint is always a good state. The state is
    copied to the host once; orbax writes it in the background, and a background
    thread records the arrays' SHA-256 in `digests/<step>.json` (`restore` checks them).
    """
    if step in self._manager.all_steps():
      return False
    bad = non_finite_arrays(state)
    if bad:
      latest = self.latest_step()
      kept = (f"the newest checkpoint on disk, {self.step_path(latest)}, is the last good state"
              if latest is not None else "no checkpoint was written")
      raise NonFiniteError(
          f"step {step}: the training state has non-finite values in {', '.join(bad[:5])}"
          f"{', ...' if len(bad) > 5 else ''}; it was not saved and {kept}. Lower the learning "
          "rate or check the data.")
    # A host copy: the caller's device buffers may be donated to the next step while orbax
    # writes, and several processes cannot save host-local jax.Arrays ("Cannot serialize
    # host local jax.Array in multi-host setting"): process 0 writes it, all join the barriers.
    host_state = jax.device_get(state)
    self._check_space(step, _nbytes(host_state))
    shapes = state_shapes(host_state)
    meta = {**(identity or {}), "format": FORMAT_VERSION, "step": int(step),
            "dnet_jax_version": dnet_jax.__version__, "state_shapes": shapes,
            "state_fingerprint": shapes_fingerprint(shapes)}
    with self._writing(step):
      if self._last_saved is not None:
        # orbax would wait for the previous (background) save here anyway; a failure of it is
        # reported under that save's step.
        with self._writing(self._last_saved):
          self._manager.wait_until_finished()
      self._last_saved = int(step)
      saved = self._manager.save(int(step), args=ocp.args.Composite(
          **{_STATE: ocp.args.StandardSave(host_state), _LOOP: ocp.args.JsonSave(loop),
             _META: ocp.args.JsonSave(meta)}))
    if saved and jax.process_index() == 0:
      thread = threading.Thread(target=self._write_digests,
                                args=(int(step), host_state, loop_digest(loop)), daemon=True)
      thread.start()
      self._digest_threads.append(thread)
    return saved

  def _digests_path(self, step: int) -> str:
    return os.path.join(self.directory, _DIGESTS, f"{int(step)}.json")

  def _loop_digest_path(self, step: int) -> str:
    return os.path.join(self.directory, _DIGESTS, f"{int(step)}{LOOP_DIGEST_SUFFIX}")

  def read_loop_digest(self, step: int) -> str | None:
    """The SHA-256 of checkpoint `step`'s loop record, or None if none was recorded."""
    self._join_digest_threads()
    path = self._loop_digest_path(step)
    try:
      with open(path, encoding="utf-8") as f:
        return str(json.load(f)["sha256"])
    except FileNotFoundError:
      return None
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise CheckpointError(f"Cannot read the checksum of the bookkeeping of checkpoint "
                            f"{self.step_path(step)} ({path}): {e}. {self._advice(step)}") from e

  def _write_digests(self, step: int, host_state, loop_sha: str) -> None:
    """Background thread: the SHA-256 of every array and of the loop record, written
    atomically; a failure (full disk) is kept for `poll` / `wait_until_finished` to raise."""
    try:
      os.makedirs(os.path.join(self.directory, _DIGESTS), exist_ok=True)
      path = self._digests_path(step)
      for target, record in ((self._loop_digest_path(step), {"sha256": loop_sha}),
                             (path, state_digests(host_state))):
        with open(target + ".tmp", "w", encoding="utf-8") as f:
          json.dump(record, f)
        os.replace(target + ".tmp", target)
    except OSError as e:
      self._digest_error = (step, e)

  def _check_space(self, step: int, state_bytes: int) -> None:
    """CheckpointError unless the directory is writable and the checkpoint (twice the state,
    for orbax's temporary copy) fits. Checked before every save: orbax itself would wait out
    its 300 s coordination timeout on a directory that became read-only (module docstring)."""
    if jax.process_index() == 0:
      check_writable(self.directory, min_free_bytes=0,
                     outcome=f"Checkpoint {self.step_path(step)} was not saved; {self._kept()}.")
    needed = 2 * state_bytes + 2**20
    free = shutil.disk_usage(self.directory).free
    if free < needed:
      raise CheckpointError(
          f"Not enough free space to save checkpoint {self.step_path(step)}: {free / 2**20:.1f} "
          f"MiB free, {needed / 2**20:.1f} MiB needed. Free space and rerun the same command; "
          f"{self._kept()}.")

  def _kept(self) -> str:
    complete = [s for s in self.all_steps() if self.incomplete_reason(s) is None]
    return (f"the newest complete checkpoint, {self.step_path(complete[-1])}, is kept and the "
            "rerun resumes from it" if complete else "no checkpoint was completed")

  @contextlib.contextmanager
  def _writing(self, step: int | None):
    """Turns a failed write (orbax's, reported late by its background thread) into a
    CheckpointError (exit 3) naming the cause, instead of a page of orbax traceback."""
    try:
      yield
    except CheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      what = f"checkpoint {self.step_path(step)}" if step is not None else "a checkpoint"
      raise CheckpointError(
          f"Saving {what} in {self.directory} failed: {_first_line(e)}. {_disk_problem(e)}, "
          f"then rerun the same command; {self._kept()}.") from e
    if self._digest_error is not None:
      failed_step, error = self._digest_error
      self._digest_error = None
      raise CheckpointError(
          f"Writing the checksums of checkpoint {self.step_path(failed_step)} failed: "
          f"{error.strerror or error}. {_disk_problem(error)}, then rerun the same command; "
          f"{self._kept()}.")

  def poll(self) -> None:
    """Raises CheckpointError if a background save has failed (cheap: never waits)."""
    if not self._manager.is_saving_in_progress():
      with self._writing(self._last_saved):
        self._manager.wait_until_finished()

  def read_digests(self, step: int) -> dict[str, str] | None:
    """The SHA-256 of every array of checkpoint `step`, or None if none was recorded."""
    self._join_digest_threads()
    try:
      with open(self._digests_path(step), encoding="utf-8") as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, ValueError) as e:
      raise CheckpointError(f"Cannot read the checksums of checkpoint {self.step_path(step)} "
                            f"({self._digests_path(step)}): {e}. {self._advice(step)}") from e

  def _join_digest_threads(self) -> None:
    for thread in self._digest_threads:
      thread.join()
    self._digest_threads = []

  def replace(self, step: int, state, loop: dict[str, Any], identity: dict | None = None) -> bool:
    """Saves a newer version of checkpoint `step` (e.g. after the evaluation a SIGTERM deferred).

    The old version is renamed to `<step>.replaced` first and removed only once the new
    one is complete; `recover_replaced` puts it back if the process died in between.
    """
    self.wait_until_finished()
    old, aside = self.step_path(step), self.step_path(step) + ".replaced"
    main = jax.process_index() == 0  # on shared storage one process renames, all then save
    if main and os.path.isdir(old):
      os.rename(old, aside)
    _sync_processes("checkpoint_replace_aside")
    self._manager.reload()
    saved = self.save(step, state, loop, identity)
    self.wait_until_finished()
    if main and saved and self.incomplete_reason(step) is None and os.path.isdir(aside):
      shutil.rmtree(aside)
    return saved

  def recover_replaced(self) -> None:
    """Renames `<step>.replaced` back to `<step>` where the newer version never completed."""
    for name in os.listdir(self.directory):
      if name.endswith(".replaced") and name[:-len(".replaced")].isdigit():
        step = int(name[:-len(".replaced")])
        step_dir, aside = self.step_path(step), os.path.join(self.directory, name)
        if os.path.isdir(step_dir) and self.incomplete_reason(step) is None:
          shutil.rmtree(aside)  # the replacement is complete: the old version is obsolete
          continue
        if os.path.isdir(step_dir):
          os.rename(step_dir, step_dir + ".incomplete-replacement")
        os.rename(aside, step_dir)
        logging.warning("Restored %s: its replacement was never completed.", step_dir)
    self._manager.reload()

  def restore(self, step: int, target_state) -> tuple[Any, dict[str, Any]]:
    """(state, loop) of checkpoint `step`, the state in the structure of `target_state`.

    `target_state` may be concrete arrays or ShapeDtypeStructs; only its tree
    structure, shapes, dtypes and shardings are used. Every array is checked
    against the SHA-256 recorded when it was saved; a mismatch, or files that
    cannot be read, raise CheckpointError naming the checkpoint.
    """
    path = self.step_path(step)
    try:
      restored = self._manager.restore(int(step), args=ocp.args.Composite(
          **{_STATE: ocp.args.StandardRestore(abstract_like(target_state)),
             _LOOP: ocp.args.JsonRestore(), _META: ocp.args.JsonRestore()}))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f"Checkpoint {path} cannot be read: {_first_line(e)}. "
          f"{self._advice(step)}") from e
    state, meta = restored[_STATE], dict(restored[_META])
    recorded = self.read_digests(step)
    host_state = jax.device_get(state)
    if "state_shapes" in meta and state_shapes(host_state) != meta["state_shapes"]:
      raise CheckpointError(
          f"Checkpoint {path} holds arrays of other shapes or dtypes than the target it was "
          "restored into; check it with `check_compatible` first (the run that wrote it had "
          "another model, method or number of classes).")
    if recorded is None:  # the process stopped before the background thread wrote them
      logging.warning("Checkpoint %s has no recorded checksums; its arrays are not verified.",
                      path)
      return state, dict(restored[_LOOP])
    actual = state_digests(host_state)
    wrong = sorted(name for name in set(recorded) | set(actual)
                   if recorded.get(name) != actual.get(name))
    if wrong:
      raise CheckpointError(
          f"Checkpoint {path} is corrupt: array(s) {', '.join(wrong[:5])}"
          f"{', ...' if len(wrong) > 5 else ''} differ from the checksums recorded when it was "
          f"saved. {self._advice(step)}")
    loop = dict(restored[_LOOP])
    self._verify_loop(step, loop)
    return state, loop

  def restore_loop(self, step: int) -> dict[str, Any]:
    """Only the bookkeeping of checkpoint `step` (enough to report a finished run)."""
    try:
      restored = self._manager.restore(int(step), args=ocp.args.Composite(
          **{_LOOP: ocp.args.JsonRestore()}))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f"Checkpoint {self.step_path(step)} cannot be read: {_first_line(e)}. "
          f"{self._advice(step)}") from e
    loop = dict(restored[_LOOP])
    self._verify_loop(step, loop)
    return loop

  def _verify_loop(self, step: int, loop: dict) -> None:
    """CheckpointError if the loop record differs from the SHA-256 recorded when it was saved."""
    recorded = self.read_loop_digest(step)
    if recorded is None:  # saved before the checksums were written (the process died)
      logging.warning("Checkpoint %s has no recorded checksum of its bookkeeping; it is not "
                      "verified.", self.step_path(step))
      return
    if loop_digest(loop) != recorded:
      raise CheckpointError(
          f"Checkpoint {self.step_path(step)} is corrupt: its bookkeeping "
          f"({os.path.join(self.step_path(step), _LOOP)}: history, best-validation record, "
          "position in the data) differs from the checksum recorded when it was saved. "
          f"{self._advice(step)}")

  def _advice(self, step: int) -> str:
    older = [s for s in self.complete_steps() if s < step]
    previous = (f"to resume from the previous checkpoint (step {older[-1]}), move "
                f"{self.step_path(step)} out of {self.directory}" if older else
                f"to start afresh, move {self.step_path(step)} out of {self.directory}")
    return f"Nothing was deleted; {previous}, or use a new --workdir."

  def wait_until_finished(self) -> None:
    with self._writing(self._last_saved):
      self._manager.wait_until_finished()
      self._join_digest_threads()

  def close(self) -> None:
    try:
      self.wait_until_finished()
      self._prune_digests()
    finally:
      with contextlib.suppress(Exception):  # a failed save was reported above
        self._manager.close()

  def _prune_digests(self) -> None:
    """Removes the checksum files of steps that orbax no longer keeps."""
    directory = os.path.join(self.directory, _DIGESTS)
    if jax.process_index() != 0 or not os.path.isdir(directory):
      return
    kept = {f"{step}{suffix}" for step in self._manager.all_steps()
            for suffix in (".json", LOOP_DIGEST_SUFFIX)}
    for name in os.listdir(directory):
      if name.endswith(".json") and name not in kept:
        os.remove(os.path.join(directory, name))

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _sync_processes(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _first_line(error: BaseException) -> str:
  """The first line of the innermost cause of `error` (orbax wraps TensorStore's own error)."""
  while error.__cause__ is not None and error.__cause__ is not error:
    error = error.__cause__
  text = str(error).split(" See full TensorStore details")[0].strip()
  return text.splitlines()[0][:300] if text else type(error).__name__
