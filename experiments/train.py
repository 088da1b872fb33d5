r"""Entry point: train and evaluate one experiment config.

  python -m experiments.train --config=experiments/configs/digits_lt.py --workdir=/tmp/digits

Any config field can be overridden, e.g. `--config.method=ce`,
`--config.data.imbalance_factor=50`, `--config.dnet.hidden="(64, 64)"`.
Rerunning the same command resumes from the newest checkpoint in
`<workdir>/checkpoints` (a finished run only reports its results).
This is the only module that reads flags; the work is done by
`experiments.trainer.train_and_evaluate(config, workdir)`.
"""

import logging as py_logging
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, results and plots.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to an experiment config file (experiments/configs/*.py).",
    lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


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
  from experiments import trainer  # pylint: disable=g-import-not-at-top

  logging.info("JAX process %d of %d; local devices: %s", jax.process_index(),
               jax.process_count(), jax.local_devices())
  trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
