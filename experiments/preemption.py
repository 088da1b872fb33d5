"""Stopping a run cleanly when the scheduler asks: SIGTERM -> checkpoint -> exit 75.

Preemptible TPUs/GPUs and most schedulers (Kubernetes, SLURM, GCE) send
SIGTERM some seconds before they kill a job. `StopSignal` turns that signal
into a flag that the training loop reads once per step; the loop then saves
a checkpoint at that step boundary and raises `errors.Preempted`, which the
entry point turns into exit code 75. The signal handler itself only sets the
flag: no logging, no I/O, no JAX calls (none of them is safe in a handler).

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
TODO(multi-process): the multi-process path is untested here (it needs a
`jax.distributed` cluster that receives a real preemption notice); the
single-process path is tested in tests/test_resume.py and
tests/test_reliability.py.
"""

from __future__ import annotations

import signal
import threading
from typing import Iterable

import jax
from absl import logging


class StopSignal:
  """Context manager: a flag set by SIGTERM (or `signals`), read by the loop at step boundaries.

  Args:
    signals: the signals that request a stop (default SIGTERM).
    multi_process: use JAX's preemption sync point instead of a handler
      (default: when `jax.process_count() > 1`).
  """

  def __init__(self, signals: Iterable[int] = (signal.SIGTERM,), *,
               multi_process: bool | None = None):
    self._signals = tuple(signals)
    self._multi_process = (jax.process_count() > 1) if multi_process is None else multi_process
    self._previous: dict[int, object] = {}
    self._requested: int | None = None  # the signal number; written only by the handler
    self._sync_unavailable = False

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    # Only a flag: the loop does the work at the next step boundary.
    self._requested = signum

  def __enter__(self) -> "StopSignal":
    if self._multi_process:
      return self
    if threading.current_thread() is not threading.main_thread():
      # Python delivers signals to the main thread only; signal.signal would raise here.
      logging.warning("Not in the main thread: SIGTERM will not stop the run with a checkpoint.")
      return self
    for signum in self._signals:
      self._previous[signum] = signal.signal(signum, self._handler)
    return self

  def __exit__(self, *exc) -> None:
    for signum, previous in self._previous.items():
      # None: the previous handler was not installed from Python and cannot be put back.
      signal.signal(signum, signal.SIG_DFL if previous is None else previous)
    self._previous.clear()

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
