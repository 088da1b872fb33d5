"""Stopping a run cleanly when asked: SIGTERM or SIGINT -> checkpoint -> exit 75.

Preemptible TPUs/GPUs and most schedulers (Kubernetes, SLURM, GCE) send
SIGTERM some seconds before they kill a job; a person presses Ctrl-C (SIGINT).
`StopSignal` turns either into a flag that the training loop reads once per
step; the loop then saves a checkpoint at that step boundary and raises
`errors.Preempted`, which the entry point turns into exit code 75. The signal
handler itself only sets the flag: no logging, no I/O, no JAX calls (none of
them is safe in a handler).

StopSignals nest: the entry point holds one from start-up to the last write
(`experiments/train.py`), so a signal during start-up, data loading or the
final results write is recorded rather than killing the process half-way
(`raise_if_requested` stops before training starts; a signal during the final
write lets the write finish), and a second signal after the first is only
recorded again. An inner StopSignal (the training loop's) inherits a request
made before it was entered and shares the outer one's handler.

    with preemption.StopSignal() as stop:
      for step in ...:
        state = train_step(state, ...)
        if stop.should_stop(step):
          save(state); raise errors.Preempted(...)

The previous handler is restored when the `with` block ends, so a library
user's own handler (or Python's default) is back after `train_and_evaluate`.

Several processes (`jax.process_count() > 1`) must stop at the *same* step,
or their collectives deadlock and their checkpoints disagree. There JAX's
distributed runtime already listens for SIGTERM and agrees on a step with
`multihost_utils.reached_preemption_sync_point(step)`, which `should_stop`
calls every step instead of installing a Python handler (installing one
would replace the runtime's).
Tested with real processes: tests/test_multiprocess_runner.py (SIGTERM to one
of two `jax.distributed` processes: both save at the agreed step and exit 75);
the single-process path in tests/test_resume.py and tests/test_reliability.py.
"""

from __future__ import annotations

import signal
import threading
from typing import Iterable

import jax
from absl import logging


_ACTIVE: list["StopSignal"] = []  # entered StopSignals, outermost first (main thread only)


def raise_if_requested(where: str) -> None:
  """Raises `errors.Preempted` (exit 75) if a stop signal arrived before training started.

  Called between start-up and the first step, so that a signal during data loading stops
  the run before anything is compiled; nothing needs saving then.
  """
  if not _ACTIVE or not _ACTIVE[-1].requested:
    return
  from experiments import errors  # pylint: disable=g-import-not-at-top
  name = _ACTIVE[-1].signal_name
  raise errors.Preempted(
      f"Stopped by {name} {where}, before the first training step of this run; nothing new "
      f"was trained, and every checkpoint on disk is kept. Run the same command again to "
      f"continue (exit code {errors.EXIT_PREEMPTED}).", step=None, checkpoint=None)


class StopSignal:
  """Context manager: a flag set by SIGTERM (or `signals`), read by the loop at step boundaries.

  Args:
    signals: the signals that request a stop (default SIGTERM and SIGINT).
    multi_process: use JAX's preemption sync point instead of a handler
      (default: when `jax.process_count() > 1`).
  """

  def __init__(self, signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT), *,
               multi_process: bool | None = None):
    self._signals = tuple(signals)
    self._multi_process = (jax.process_count() > 1) if multi_process is None else multi_process
    self._previous: dict[int, object] = {}
    self._requested: int | None = None  # the signal number; written only by the handler
    self._sync_unavailable = False

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    # Only flags: the loop does the work at the next step boundary. Every StopSignal entered
    # since this one (the loop's, inside the entry point's) sees the request.
    for active in _ACTIVE:
      active._requested = signum  # pylint: disable=protected-access

  def __enter__(self) -> "StopSignal":
    if self._multi_process:
      return self
    if threading.current_thread() is not threading.main_thread():
      # Python delivers signals to the main thread only; signal.signal would raise here.
      logging.warning("Not in the main thread: SIGTERM will not stop the run with a checkpoint.")
      return self
    if _ACTIVE:  # an outer StopSignal listens already: share its handler and its request
      self._requested = _ACTIVE[-1]._requested  # pylint: disable=protected-access
    else:
      for signum in self._signals:
        self._previous[signum] = signal.signal(signum, self._handler)
    _ACTIVE.append(self)
    return self

  def __exit__(self, *exc) -> None:
    if self in _ACTIVE:
      _ACTIVE.remove(self)
    for signum, previous in self._previous.items():
      # None: the previous handler was not installed from Python and cannot be put back.
      signal.signal(signum, signal.SIG_DFL if previous is None else previous)
    self._previous.clear()

  @property
  def requested(self) -> bool:
    """Whether a stop signal arrived (single process; the multi-process path uses the loop)."""
    return self._requested is not None

  @property
  def signal_name(self) -> str:
    if self._requested is None:
      return "preemption notice" if self._multi_process else "none"
    return signal.Signals(self._requested).name

  def should_stop(self, step: int) -> bool:
    """True once a stop was requested; under several processes, True on the agreed step only."""
    if self._multi_process:
      # All processes must call this at every step (they do: it is in the loop).
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      if self._sync_unavailable:
        return False
      try:
        return bool(multihost_utils.reached_preemption_sync_point(int(step)))
      except RuntimeError as e:  # the runtime was started without its preemption service
        logging.warning("No preemption sync point (%s): SIGTERM will not stop the run with a "
                        "checkpoint.", e)
        self._sync_unavailable = True
        return False
    return self._requested is not None
