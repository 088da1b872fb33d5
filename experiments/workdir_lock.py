"""One run per workdir: an exclusive advisory lock held for the life of the process.

Two runs writing one workdir overwrite each other's checkpoints and results
(orbax's temporary-directory cleanup of one run deletes the other's save in
flight). `hold(workdir)` takes `fcntl.flock(LOCK_EX | LOCK_NB)` on
`<workdir>/run.lock` and writes who holds it (pid, host, start time, command)
into that file:

  * a second run is refused at once with `WorkdirBusyError` (exit 3) naming the
    process that holds the lock;
  * the kernel drops a flock when its process dies, however it dies (SIGKILL
    included), so a lock left by a killed run never blocks the next one; the
    file itself stays and is simply locked again;
  * in a multi-process run only process 0 takes the lock, and its answer is
    broadcast so that every process of the run stops together when it is held
    elsewhere.

Advisory locks work on local file systems and on NFSv4; on storage without
lock support (some FUSE mounts) acquiring raises `WorkdirBusyError` naming the
OS error, so a user learns it rather than running unprotected.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from typing import Callable, Iterator

from experiments import errors

LOCK_NAME = "run.lock"


class WorkdirBusyError(errors.RunError):
  """The workdir is in use by another run (or cannot be locked); exit 3."""
  exit_code = errors.EXIT_CHECKPOINT


def _holder_text(path: str) -> str:
  try:
    with open(path, encoding="utf-8") as f:
      info = json.load(f)
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["started"])))
    return f"pid {info['pid']} on {info['host']}, started {started}: {info['command']}"
  except (OSError, ValueError, KeyError, TypeError):
    return "a process that has not written its details yet"


def _write_holder(fd: int) -> None:
  info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
          "command": " ".join(sys.argv)}
  os.ftruncate(fd, 0)
  os.pwrite(fd, json.dumps(info).encode(), 0)
  os.fsync(fd)


def acquire(workdir: str) -> int:
  """Takes the lock of `workdir` (created if missing); returns the open descriptor holding it."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_NAME)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    os.close(fd)
    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      raise WorkdirBusyError(
          f"workdir {workdir} is in use by another run ({_holder_text(path)}). Wait for it to "
          "finish or stop it, or pass another --workdir.") from None
    raise WorkdirBusyError(
        f"cannot lock {path}: {e.strerror}. The file system of the workdir does not support "
        "file locks; put the workdir on storage that does.") from None
  _write_holder(fd)
  return fd


def release(fd: int) -> None:
  """Drops the lock (the file stays: deleting it would race with a run locking it)."""
  with contextlib.suppress(OSError):
    fcntl.flock(fd, fcntl.LOCK_UN)
  with contextlib.suppress(OSError):
    os.close(fd)


def _agree(ok: bool) -> bool:
  """Process 0's answer, seen by every process of a multi-process run."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


@contextlib.contextmanager
def hold(workdir: str, *, process_index: int = 0,
         check: Callable[[], None] | None = None) -> Iterator[None]:
  """Holds the workdir lock for the body; process 0 locks, every process learns the outcome.

  `check` (e.g. the workdir's writability) runs in process 0 before it locks; its RunError
  stops every process of the run together, like a lock held elsewhere.
  """
  fd, failure = None, None
  if process_index == 0:
    try:
      if check is not None:
        check()
      fd = acquire(workdir)
    except errors.RunError as e:
      failure = e
  if not _agree(failure is None):
    raise failure or WorkdirBusyError(
        f"workdir {workdir} cannot be used: process 0 of this run could not check or lock it "
        "(its message says why).")
  try:
    yield
  finally:
    if fd is not None:
      release(fd)
