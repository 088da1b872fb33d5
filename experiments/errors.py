"""The errors a run reports to its user, and the exit codes of `python -m experiments.train`.

Each is raised with a message that says what went wrong and what to change;
the entry point prints the message (no traceback; the full trace is appended
to `<workdir>/run.log`) and exits with the code:

  code  exception          meaning
  0     -                  finished (or was already finished: results reported again)
  1     any other          a bug or an unexpected failure (traceback printed)
  2     InvalidInputError  the config or the data cannot be trained on; fix the named setting
                           (also an unknown --config.<field>: nothing was started)
  3     CheckpointError    a checkpoint or the workdir is the problem: a checkpoint is corrupt
                           or belongs to another experiment, the workdir is in use by another
                           run (WorkdirBusyError), is not writable, or a save failed (full
                           disk, read-only directory); nothing already saved was deleted
  4     NonFiniteError     a loss, gradient or the state became NaN/Inf; the newest checkpoint
                           on disk is the last good state
  75    Preempted          stopped by SIGTERM or SIGINT (Ctrl-C): after saving a checkpoint,
                           or before training started; rerun the same command to continue
                           (75 is EX_TEMPFAIL of sysexits.h, "try again")

A scheduler that requeues preempted jobs should requeue on 75 (and may on
1); 2, 3 and 4 need a person (3 includes a full disk: requeueing would loop).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INVALID_INPUT = 2
EXIT_CHECKPOINT = 3
EXIT_NON_FINITE = 4
EXIT_PREEMPTED = 75


class RunError(Exception):
  """A failure the user can act on; `exit_code` is what the entry point exits with."""
  exit_code = 1


class InvalidInputError(RunError, ValueError):
  """The config or the data set is invalid; raised before anything is compiled."""
  exit_code = EXIT_INVALID_INPUT


class CheckpointError(RunError):
  """A checkpoint cannot be resumed from (corrupt, another experiment's) or written (full
  disk, read-only), or the workdir cannot be used."""
  exit_code = EXIT_CHECKPOINT


class NonFiniteError(RunError, FloatingPointError):
  """A training quantity became NaN or Inf; the bad state was not saved."""
  exit_code = EXIT_NON_FINITE


class Preempted(RunError):
  """The run stopped on request (SIGTERM, SIGINT) after saving a checkpoint; rerun to continue.

  Attributes:
    step: the step of the checkpoint that was saved (None: stopped before training started).
    checkpoint: its directory (None likewise).
  """
  exit_code = EXIT_PREEMPTED

  def __init__(self, message: str, step: int | None, checkpoint: str | None):
    super().__init__(message)
    self.step = step
    self.checkpoint = checkpoint
