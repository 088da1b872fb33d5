"""experiments.reproduce end to end on mocked TFDS CIFAR-100 with tiny settings."""

from __future__ import annotations

import os

import pytest

from experiments import reproduce

pytestmark = pytest.mark.usefixtures("fast_compilation")


def test_reproduce_writes_the_paper_number_beside_ours(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  tiny = {"model": "small_cnn", "batch_size": 16, "meta_batch_size": 10, "eval_batch_size": 1000,
          "data.meta_per_class": 2, "dnet.hidden": (8, 8), "host_workers": 2,
          "log_every_steps": 1}
  (tmp_path / "tfds").mkdir()
  with tfds.testing.mock_data(num_examples=2500):
    payload = reproduce.run_reproduce(
        "cifar100", str(tmp_path / "grid"), data_dir=str(tmp_path / "tfds"), seeds=(0,),
        imbalance_factors=(10,), num_epochs=1, stage2_epochs=1, max_steps=2, overrides=tiny,
        compilation_cache=None, log=lambda line: None)  # no global JAX cache change
  rows = {(r["key"], r["imbalance"]): r for r in payload["rows"]}
  assert set(rows) == {(k, 10.0) for k in ("ce", "dnet_driver_only", "dnet", "ce+las",
                                           "dnet_driver_only+las", "dnet+las")}
  for row in rows.values():
    for block in ("final", "best_val", "max_test"):
      assert 0.0 <= row[block]["overall"][0] <= 100.0
    assert row["max_test"]["overall"][0] >= row["final"]["overall"][0]
  table = open(os.path.join(tmp_path / "grid", reproduce.TABLE_FILE), encoding="utf-8").read()
  lines = {line.split("|")[2].strip(): line for line in table.splitlines()
           if line.startswith("| 10 |")}
  assert set(lines) == {label for _, label in reproduce.METHODS}
  public = [c.strip() for c in lines["Difficulty-Net as the public code runs it"].split("|")[1:-1]]
  ours = rows[("dnet_driver_only+las", 10.0)]
  assert public[2] == "65.22"  # the paper's rho = 10 number first, then ours
  assert public[6] == f"{ours['final']['overall'][0]:.2f}"
  assert public[8] == f"{ours['max_test']['overall'][0]:.2f}"
  assert [c.strip() for c in lines["CE"].split("|")[1:-1]][2] == "n/r"
  # The stage-2 runs used the public stage-2 recipe (class-aware sampler, best-val start).
  results = __import__("json").load(open(os.path.join(
      tmp_path / "grid", "rho10", "dnet+las", "seed0", "results.json"), encoding="utf-8"))
  assert results["stage2"]["sampler"] == "class_aware"
  assert results["stage2"]["init_checkpoint"] == "best_val"
  assert results["config"]["host_transform"] == "public_cifar"
