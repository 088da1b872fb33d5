"""Whole runs of the experiment runner on tiny settings: digits, mocked TFDS CIFAR-10, CLI.

In-process tests see one CPU device. The multi-device test runs the entry point
in a subprocess, because XLA_FLAGS must be set before JAX is imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import metric_writers
from experiments import reporting
from experiments import trainer
from experiments.configs import cifar10_lt
from experiments.configs import digits_lt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RESULT_KEYS = {
    "config", "data", "final_test", "best_val_test", "best_val_epoch", "per_class_test_accuracy",
    "class_counts", "history", "steps", "start_step", "devices", "wall_time_s",
    "wall_time_this_run_s", "metric_writer", "plots",
}
HISTORY_KEYS = {"epoch", "step", "train_loss", "learning_rate", "val_accuracy", "val_per_class",
                "test_accuracy", "test_many", "test_medium", "test_few", "difficulty",
                "class_weights"}


pytestmark = pytest.mark.usefixtures("fast_compilation")


def tiny_digits_config(**overrides):
  """digits_lt for 2 epochs of 9 steps (314 images / batch 32)."""
  config = digits_lt.get_config()
  config.num_epochs = 2
  config.progress_bar = False
  config.log_every_steps = 4
  for key, value in overrides.items():
    config[key] = value
  return config


def read_results(workdir):
  with open(os.path.join(workdir, reporting.RESULTS_FILE), encoding="utf-8") as f:
    return json.load(f)


def test_digits_run_writes_results_plots_checkpoints_and_resumes(tmp_path):
  workdir = str(tmp_path / "digits")
  # 1) Stop inside the second epoch: one full epoch (9 steps) + 2 steps.
  results = trainer.train_and_evaluate(tiny_digits_config(max_steps=11), workdir)
  on_disk = read_results(workdir)
  assert RESULT_KEYS <= set(on_disk)
  assert HISTORY_KEYS <= set(on_disk["history"])
  assert on_disk["steps"] == results["steps"] == 11 and on_disk["start_step"] == 0
  assert on_disk["devices"] == 1
  assert on_disk["history"]["epoch"][0] == 1 and on_disk["history"]["partial_epoch"] == [False, True]
  assert len(on_disk["class_counts"]) == 10 and sum(on_disk["class_counts"]) == 314
  assert len(on_disk["per_class_test_accuracy"]) == 10
  for block in (on_disk["final_test"], on_disk["best_val_test"]):
    assert {"overall", "many", "medium", "few", "per_class", "epoch"} <= set(block)
    assert 0.0 <= block["overall"] <= 1.0
  assert len(on_disk["history"]["difficulty"][0]) == 10
  np.testing.assert_allclose(np.mean(on_disk["history"]["class_weights"][0]), 1.0, rtol=1e-5)
  for path in on_disk["plots"].values():
    assert os.path.isfile(path) and os.path.getsize(path) > 1000, path
  assert os.path.getsize(os.path.join(workdir, metric_writers.METRICS_FILE)) > 0
  checkpoints = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  assert "9" in checkpoints and "11" in checkpoints, checkpoints

  # 2) The same command again: the run is finished, so it only reports.
  again = trainer.train_and_evaluate(tiny_digits_config(max_steps=11), workdir)
  assert again["start_step"] == 11 and again["steps"] == 11
  assert again["final_test"] == on_disk["final_test"]

  # 3) A longer budget continues from step 11 (no retraining from scratch) to the end of epoch 2.
  resumed = trainer.train_and_evaluate(tiny_digits_config(max_steps=0), workdir)
  assert resumed["start_step"] == 11 and resumed["steps"] == 18
  assert resumed["history"]["epoch"] == [1, 2]
  assert resumed["history"]["partial_epoch"] == [False, False]
  assert resumed["history"]["val_accuracy"][0] == on_disk["history"]["val_accuracy"][0]

  # 4) An uninterrupted run to the same step gives bit-identical results.
  straight = trainer.train_and_evaluate(tiny_digits_config(compare_with=workdir),
                                        str(tmp_path / "straight"))
  assert straight["steps"] == 18
  for key in ("train_loss", "val_accuracy", "val_per_class", "test_accuracy", "difficulty",
              "class_weights"):
    assert straight["history"][key] == resumed["history"][key], key
  assert straight["final_test"] == resumed["final_test"]


def test_mocked_tfds_cifar10_run(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  config = cifar10_lt.get_config()
  config.model = "small_cnn"
  config.data.data_dir = str(tmp_path / "tfds")
  os.makedirs(config.data.data_dir)
  config.data.meta_per_class = 2
  config.data.n_max = 4
  config.data.imbalance_factor = 2.0
  config.batch_size = 8
  config.meta_batch_size = 10
  config.eval_batch_size = 64
  config.num_epochs = 1
  config.max_steps = 2
  config.log_every_steps = 1
  config.progress_bar = False
  config.cutout_size = 8  # exercise crop + flip + Cutout on device
  config.meta_grad = "driver_only"  # the cheapest meta-gradient to compile
  workdir = str(tmp_path / "run")
  with tfds.testing.mock_data(num_examples=160):
    results = trainer.train_and_evaluate(config, workdir)
  assert results["steps"] == 2
  assert results["data"]["name"] == "cifar10"
  assert results["data"]["num_meta"] == 20 and results["data"]["num_test"] == 160
  assert len(results["per_class_test_accuracy"]) == 10
  assert os.path.isfile(os.path.join(workdir, reporting.RESULTS_FILE))
  assert os.listdir(os.path.join(workdir, "checkpoints"))


@pytest.mark.parametrize("method", ["ce", "cdb", "difficulty_net_bs"])
def test_other_methods_run(tmp_path, method):
  config = tiny_digits_config(method=method, max_steps=3, cdb_tau="1.5")
  if method == "difficulty_net_bs":
    config.meta_grad = "jvp"
    config.dnet.kind = "absolute"
    config.dnet.use_bias = True
    config.dnet.hidden = (8,)
  results = trainer.train_and_evaluate(config, str(tmp_path / method))
  assert results["steps"] == 3
  weights = results["history"]["class_weights"][-1]
  if method == "ce":
    assert weights == [1.0] * 10
  assert np.isfinite(results["history"]["train_loss"][-1])


def test_non_finite_loss_stops_the_run(tmp_path):
  config = tiny_digits_config(method="ce", learning_rate=1e30, max_steps=6, log_every_steps=1)
  with pytest.raises(FloatingPointError, match="Non-finite training loss"):
    trainer.train_and_evaluate(config, str(tmp_path / "nan"))


@pytest.mark.parametrize("field,value", [("method", "mixup"), ("meta_grad", "fd")])
def test_unknown_names_fail_before_compiling(tmp_path, monkeypatch, field, value):
  def no_compiling(*args, **kwargs):
    raise AssertionError("compiled before validating the config")

  monkeypatch.setattr(jax, "pmap", no_compiling)
  monkeypatch.setattr(jax, "jit", no_compiling)
  config = tiny_digits_config(**{field: value})
  with pytest.raises(ValueError, match=f"Unknown {field} '{value}'; choose one of: .*"):
    trainer.train_and_evaluate(config, str(tmp_path / "bad"))
  assert not os.path.exists(tmp_path / "bad" / "checkpoints")


def test_entry_point_on_two_devices(tmp_path):
  """`python -m experiments.train` with flag overrides, the global batch split over 2 CPU devices."""
  workdir = tmp_path / "cli"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="true")
  command = [sys.executable, "-m", "experiments.train",
             "--config=experiments/configs/digits_lt.py", f"--workdir={workdir}",
             "--config.max_steps=3", "--config.num_epochs=1", "--config.progress_bar=False",
             "--config.dnet.hidden=(16,16)"]
  proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "test, final epoch" in proc.stdout
  results = read_results(workdir)
  assert results["devices"] == 2 and results["steps"] == 3
  assert results["config"]["dnet"]["hidden"] == [16, 16]
