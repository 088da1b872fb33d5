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

Exit codes (experiments/errors.py): 0 finished; 2 invalid config or data;
3 a checkpoint in the workdir is corrupt or from another experiment;
4 a loss, gradient or the state became NaN/Inf (the newest checkpoint is the
last good state); 75 stopped by SIGTERM after saving a checkpoint, so rerun
the same command to continue; 1 anything else (with a traceback). Errors
2, 3, 4 and 75 print one message saying what to do, without a traceback.
"""

import logging as py_logging
import os
import sys

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


class _QuietLibraryInfo(py_logging.Filter):
  """Drops INFO records of orbax (a dozen lines per checkpoint) from the console log."""

  _NOISY = (f"{os.sep}orbax{os.sep}",)

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or not any(
        part in record.pathname for part in self._NOISY)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected command-line arguments: {' '.join(argv[1:])}")
  logging.get_absl_handler().addFilter(_QuietLibraryInfo())
  # Imported here so that `--help` and flag errors do not pay for importing JAX.
  import jax  # pylint: disable=g-import-not-at-top
  _initialize_distributed()  # before any other import or call can touch a device
  from experiments import errors  # pylint: disable=g-import-not-at-top
  from experiments import trainer  # pylint: disable=g-import-not-at-top

  logging.info("JAX process %d of %d; local devices: %s", jax.process_index(),
               jax.process_count(), jax.local_devices())
  try:
    if _CONFIG.value.get("stage", 1) == 2:  # classifier re-training (experiments/stage2.py)
      from experiments import stage2  # pylint: disable=g-import-not-at-top
      stage2.train_stage2(_CONFIG.value, _WORKDIR.value)
      return 0
    trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except errors.RunError as e:  # a message for the user, not a traceback (exit codes above)
    print(f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
    return e.exit_code
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


if __name__ == "__main__":
  app.run(main)
