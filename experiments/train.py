r"""Entry point: train and evaluate one experiment config.

  python -m experiments.train --config=experiments/configs/digits_lt.py --workdir=/tmp/digits

Any config field can be overridden, e.g. `--config.method=ce`,
`--config.data.imbalance_factor=50`, `--config.dnet.hidden="(64, 64)"`.
Rerunning the same command resumes from the newest checkpoint in
`<workdir>/checkpoints` (a finished run only reports its results).
This is the only module that reads flags; the work is done by
`experiments.trainer.train_and_evaluate(config, workdir)`, or for a stage-2
config (`stage = 2`, e.g. experiments/configs/digits_lt_stage2.py) by
`experiments.stage2.train_stage2(config, workdir)`.

Several processes (hosts): start the same command in every process with
`--jax_distributed`, which calls `jax.distributed.initialize` first: on a
Cloud TPU pod slice (and Slurm, ...) it detects the cluster itself; elsewhere
add `--coordinator_address=host:port --num_processes=N --process_id=I`.
Every process reads its own shard of the data and checkpoints together (the
workdir must be on storage all of them see); only process 0 writes results,
logs and plots. The large-scale configs' docstrings give the TPU commands.

One run per workdir: process 0 takes an exclusive lock on `<workdir>/run.lock`
(experiments/workdir_lock.py) from start-up to the last write; a second run
on the same workdir is refused at once (exit 3), naming the process that holds
it. SIGTERM and SIGINT (Ctrl-C) are handled from start-up to the last write
(experiments/preemption.py): during training a checkpoint is saved, before
training nothing is started, and a signal during the final write lets it finish.

Exit codes (experiments/errors.py): 0 finished; 2 invalid config or data
(an unknown --config field included); 3 a checkpoint or the workdir is the
problem (corrupt or foreign checkpoint, workdir in use by another run, not
writable, full disk; nothing saved is deleted); 4 a loss, gradient or the
state became NaN/Inf (the newest checkpoint is the last good state); 75
stopped by SIGTERM or SIGINT, so rerun the same command to continue; 1
anything else (with a traceback). Errors 2, 3, 4 and 75 print one message
saying what to do; their full traceback goes to `<workdir>/run.log`.
"""

import logging as py_logging
import os
import sys
import time
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, results and plots.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to an experiment config file (experiments/configs/*.py).",
    lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])
_JAX_DISTRIBUTED = flags.DEFINE_bool(
    "jax_distributed", False,
    "Join a multi-process (multi-host) run: jax.distributed.initialize is called before "
    "anything touches a device. Without --coordinator_address, --num_processes and "
    "--process_id the cluster is detected from the environment (Cloud TPU pods, Slurm, ...).")
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "With --jax_distributed: host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "With --jax_distributed: the number of processes.", lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "With --jax_distributed: this process's index in [0, num_processes).",
    lower_bound=0)


RUN_LOG = "run.log"  # in the workdir: the full log, and the traceback of every failure


class _QuietLibraryInfo(py_logging.Filter):
  """Keeps orbax's INFO records (a dozen lines per checkpoint) off the console, and shortens
  its warnings and errors there to their first line (their tracebacks and TensorStore spec
  dumps run to hundreds of lines and would bury the run's own message); `run.log` keeps them
  whole."""

  _NOISY = (f"{os.sep}orbax{os.sep}", f"{os.sep}tensorstore{os.sep}")

  def filter(self, record):
    if not any(part in record.pathname for part in self._NOISY):
      return True
    if record.levelno < py_logging.WARNING:
      return False
    if record.exc_info or "\n" in record.getMessage() or len(record.getMessage()) > 300:
      line = record.getMessage().strip().splitlines()[0][:300] if record.getMessage() else ""
      print(f"{record.levelname[0]} orbax: {line} (full text in {RUN_LOG} of the workdir)",
            file=sys.stderr, flush=True)
      return False
    return True


def _log_to_workdir(workdir: str) -> py_logging.Handler | None:
  """Appends every log record (full, tracebacks included) to `<workdir>/run.log`."""
  try:
    os.makedirs(workdir, exist_ok=True)
    handler = py_logging.FileHandler(os.path.join(workdir, RUN_LOG), encoding="utf-8")
  except OSError:
    return None  # an unwritable workdir is reported by the start-up checks
  handler.setFormatter(py_logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
  logging.get_absl_logger().addHandler(handler)
  return handler


def _log_cleanup_errors(workdir: str) -> None:
  """Routes exceptions raised while objects are finalised ("Exception ignored in ...") to
  `<workdir>/run.log` instead of the terminal.

  After a failed restore orbax 0.12.8 leaves the reads of the other arrays behind
  as coroutines; when Python collects them (at some later garbage collection, often
  at exit) each prints its exception with a ~100-line TensorStore spec, burying the
  one-line error this entry point prints last. They add nothing to that message;
  run.log keeps them. A hook that cannot write (late in interpreter shutdown, an
  unwritable workdir) drops the record.
  """
  path = os.path.join(os.path.abspath(workdir), RUN_LOG)

  def hook(unraisable):
    try:
      text = "".join(traceback.format_exception(
          unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback))
      with open(path, "a", encoding="utf-8") as f:
        what = unraisable.err_msg or "Exception ignored in"
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {what}: {unraisable.object!r}\n{text}\n")
    except Exception:  # pylint: disable=broad-except
      pass

  sys.unraisablehook = hook


def _report(error, workdir: str, handler) -> int:
  """Prints a RunError's message (no traceback) and appends its traceback to run.log."""
  if handler is not None:
    handler.stream.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {type(error).__name__} "
                         f"(exit {error.exit_code}):\n{traceback.format_exc()}\n")
    handler.flush()
  where = (f"\n(full traceback in {os.path.join(os.path.abspath(workdir), RUN_LOG)})"
           if handler is not None else "")
  print(f"{type(error).__name__}: {error}{where}", file=sys.stderr, flush=True)
  return error.exit_code


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected command-line arguments: {' '.join(argv[1:])}")
  logging.get_absl_handler().addFilter(_QuietLibraryInfo())
  # Imported here so that `--help` and flag errors do not pay for importing JAX.
  import jax  # pylint: disable=g-import-not-at-top
  _initialize_distributed()  # before any other import or call can touch a device
  from experiments import preemption  # pylint: disable=g-import-not-at-top
  # From here on a SIGTERM / SIGINT is a flag read at safe points, not a kill (one process; with
  # several, JAX's runtime handles SIGTERM and the loop asks it). The handler stays installed
  # until the process exits, so a second notice while it shuts down (after "Preempted" was
  # printed) cannot turn exit 75 into a kill.
  stop = preemption.StopSignal().__enter__()  # pylint: disable=unnecessary-dunder-call
  return _main(jax, stop)


def _main(jax, stop) -> int:
  from experiments import checkpointing  # pylint: disable=g-import-not-at-top
  from experiments import errors  # pylint: disable=g-import-not-at-top
  from experiments import preemption  # pylint: disable=g-import-not-at-top
  from experiments import trainer  # pylint: disable=g-import-not-at-top
  from experiments import workdir_lock  # pylint: disable=g-import-not-at-top

  workdir, config = _WORKDIR.value, _CONFIG.value
  logging.info("JAX process %d of %d; local devices: %s", jax.process_index(),
               jax.process_count(), jax.local_devices())
  handler = _log_to_workdir(workdir) if jax.process_index() == 0 else None
  if handler is not None:
    _log_cleanup_errors(workdir)
  def check_writable():  # in process 0 before it locks; a failure stops every process
    checkpointing.check_writable(workdir)
    checkpointing.check_writable(os.path.join(workdir, "checkpoints"))

  try:
    with workdir_lock.hold(workdir, process_index=jax.process_index(), check=check_writable):
      preemption.raise_if_requested("during start-up")
      if config.get("stage", 1) == 2:  # classifier re-training (experiments/stage2.py)
        from experiments import stage2  # pylint: disable=g-import-not-at-top
        stage2.train_stage2(config, workdir)
      else:
        trainer.train_and_evaluate(config, workdir)
  except errors.RunError as e:  # a message for the user, not a traceback (exit codes above)
    return _report(e, workdir, handler)
  finally:
    if handler is not None:
      logging.get_absl_logger().removeHandler(handler)
      handler.close()
  if stop.requested:  # arrived during the final evaluation or write, which were completed
    print(f"{stop.signal_name} arrived while the results were written; the run finished and "
          "its results are complete.", file=sys.stderr, flush=True)
  return 0


def _initialize_distributed() -> None:
  """Starts JAX's distributed runtime for --jax_distributed (explicit cluster or detected)."""
  explicit = (_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if not _JAX_DISTRIBUTED.value:
    if any(v is not None for v in explicit):
      raise app.UsageError("--coordinator_address, --num_processes and --process_id only "
                           "apply with --jax_distributed.")
    return
  from dnet_jax import distributed  # pylint: disable=g-import-not-at-top
  try:
    distributed.initialize(*explicit)
  except ValueError as e:
    raise app.UsageError(str(e)) from e


def _parse_flags(argv):
  """absl's flag parsing, with a bad --config override as one exit-2 message, not tracebacks."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    cause = e
    while cause.__cause__ is not None or cause.__context__ is not None:
      cause = cause.__cause__ or cause.__context__
    text = str(cause)
    if isinstance(cause, (AttributeError, KeyError)):
      text = text.strip("\"'")
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    named = [o for o in overrides if text in o[len("--config."):].split(".")]
    overrides = named or overrides
    hint = (f"No field {text!r} in the config: check the spelling of {', '.join(overrides)} "
            "against experiments/configs/base.py (every field is documented there)"
            if isinstance(cause, (AttributeError, KeyError)) else
            f"{type(cause).__name__}: {text.rstrip('.')}. Check the flags (python -m experiments.train "
            "--helpfull) and the --config.<field>=<value> overrides against "
            "experiments/configs/base.py")
    print(f"InvalidInputError: the command line cannot be applied. {hint}. Nothing was "
          "started.", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
