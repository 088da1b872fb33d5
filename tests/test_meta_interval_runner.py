"""The runner's meta_interval: Difficulty-Net updated on every k-th step only."""

import json
import os

import jax
import numpy as np
import pytest

from experiments import reporting
from experiments import trainer
from experiments.configs import digits_lt


pytestmark = pytest.mark.usefixtures("fast_compilation")


def _config(meta_interval):
  config = digits_lt.get_config()
  config.num_epochs = 1
  config.progress_bar = False
  config.meta_interval = meta_interval
  config.log_every_steps = 1
  return config


def _logged(workdir, key):
  """{step: value} of a per-step scalar in metrics.jsonl (logged every step here)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r[key] for r in rows if key in r}


def test_meta_interval_three_updates_difficulty_net_on_one_step_in_three(tmp_path):
  results = trainer.train_and_evaluate(_config(3), str(tmp_path / "k3"))
  assert results["steps"] == 9  # 314 images / batch 32
  # metrics.jsonl logs step s + 1 after running step s: steps 0, 3, 6 ran the meta update.
  updated = _logged(tmp_path / "k3", "meta_updated")
  assert [s for s in sorted(updated) if updated[s] == 1.0] == [1, 4, 7]
  meta_ce = _logged(tmp_path / "k3", "meta_ce")
  assert meta_ce[1] > 0 and meta_ce[2] == 0.0
  exact = trainer.train_and_evaluate(_config(1), str(tmp_path / "k1"))
  assert set(_logged(tmp_path / "k1", "meta_updated").values()) == {1.0}
  # Both runs start identically: the first step is the exact step in both.
  np.testing.assert_allclose(_logged(tmp_path / "k1", "train_loss")[1],
                             _logged(tmp_path / "k3", "train_loss")[1], rtol=1e-6)
  with open(os.path.join(tmp_path, "k3", reporting.RESULTS_FILE)) as f:
    assert json.load(f)["config"]["meta_interval"] == 3
