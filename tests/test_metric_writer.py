"""TensorBoard scalars without TensorFlow in the writer: read back with TF's event reader."""

import glob
import json
import os

import pytest

from experiments import metric_writers


def test_tensorboardx_writer_events_read_back(tmp_path, monkeypatch):
  # Force the no-TensorFlow path that the quick-start install takes.
  monkeypatch.setattr(metric_writers, "tensorboard_available", lambda: False)
  writer, kind = metric_writers.create_metric_writer(str(tmp_path))
  assert "tensorboardX" in kind
  writer.write_scalars(3, {"train_loss": 1.5, "val_accuracy": 0.25})
  writer.write_scalars(7, {"train_loss": 0.5})
  writer.close()
  tf = pytest.importorskip("tensorflow")
  events = glob.glob(os.path.join(tmp_path, "events.out.tfevents.*"))
  assert len(events) == 1
  seen = {}
  for event in tf.compat.v1.train.summary_iterator(events[0]):
    for value in event.summary.value:
      seen[(value.tag, event.step)] = value.simple_value
  assert seen == {("train_loss", 3): 1.5, ("val_accuracy", 3): 0.25, ("train_loss", 7): 0.5}
  with open(tmp_path / metric_writers.METRICS_FILE) as f:
    rows = [json.loads(line) for line in f]
  assert rows[1] == {"step": 7, "train_loss": 0.5}
