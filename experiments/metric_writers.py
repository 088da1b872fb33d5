"""What a run logs while it trains: scalar metrics and the terminal's progress bar.

Every scalar goes to `<workdir>/metrics.jsonl` and to TensorBoard event files,
written by clu's `SummaryWriter` when tensorflow and tensorboard are
importable, else by tensorboardX; none goes to the terminal (it shows a
progress bar and one line per evaluation). Only process 0 writes.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any, Mapping, Sequence

from absl import logging

METRICS_FILE = "metrics.jsonl"



class JsonlWriter:
  """Appends `{"step": s, name: value, ...}` lines to a file (clu MetricWriter interface)."""

  def __init__(self, path: str):
    self._path = path
    self._file = open(path, "a", encoding="utf-8")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    record = {"step": int(step)}
    record.update({k: float(v) for k, v in scalars.items() if v is not None})
    self._file.write(json.dumps(record) + "\n")

  def flush(self):
    self._file.flush()

  def close(self):
    if not self._file.closed:
      self._file.close()


class FanOutWriter:
  """Writes to several writers (clu's MultiWriter, without importing clu)."""

  def __init__(self, writers: Sequence[Any]):
    self._writers = list(writers)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    for w in self._writers:
      w.write_scalars(step, scalars)

  def flush(self):
    for w in self._writers:
      w.flush()

  def close(self):
    for w in self._writers:
      w.close()


class TensorboardXWriter:
  """TensorBoard event files through tensorboardX: no TensorFlow needed.

  Used when clu's writer cannot be (clu's TensorBoard writer needs tensorflow
  and tensorboard, which the quick-start install leaves out to stay small).
  """

  def __init__(self, logdir: str):
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._writer = SummaryWriter(logdir=logdir)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    for name, value in scalars.items():
      if value is not None:
        self._writer.add_scalar(name, float(value), global_step=int(step))

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


def tensorboard_available() -> bool:
  """True if clu's TensorBoard writer can be imported (needs tensorflow and tensorboard)."""
  return all(importlib.util.find_spec(m) is not None for m in ("tensorflow", "tensorboard"))


def create_metric_writer(workdir: str, *, is_main: bool = True):
  """A metric writer for `workdir` (see the module docstring); returns (writer, description)."""
  if not is_main:
    return FanOutWriter([]), "none (not process 0)"
  os.makedirs(workdir, exist_ok=True)
  jsonl = JsonlWriter(os.path.join(workdir, METRICS_FILE))
  if tensorboard_available():
    try:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      tf.config.set_visible_devices([], "GPU")  # keep TF off the accelerators JAX uses
      from clu import metric_writers  # pylint: disable=g-import-not-at-top
      return (FanOutWriter([metric_writers.SummaryWriter(workdir), jsonl]),
              f"TensorBoard events (clu) in {workdir} + {METRICS_FILE}")
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("TensorBoard writer unavailable (%s); falling back.", e)
  if importlib.util.find_spec("tensorboardX") is not None:
    return (FanOutWriter([TensorboardXWriter(workdir), jsonl]),
            f"TensorBoard events (tensorboardX) in {workdir} + {METRICS_FILE}")
  return (FanOutWriter([jsonl]),
          f"{os.path.join(workdir, METRICS_FILE)} (no TensorBoard: install "
          "tensorboardX, or tensorflow and tensorboard for clu's writer)")


def progress_bar(total: int, initial: int, enabled: bool):
  """A tqdm bar over training steps (a disabled one when `enabled` is False)."""
  from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
  return tqdm.tqdm(total=total, initial=initial, disable=not enabled, unit="step",
                   dynamic_ncols=True, mininterval=1.0, desc="train")
