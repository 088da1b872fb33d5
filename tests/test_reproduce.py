"""experiments.reproduce end to end on mocked TFDS CIFAR-100 with tiny settings."""

from __future__ import annotations

import os

import numpy as np
import pytest

from experiments import reproduce

pytestmark = pytest.mark.usefixtures("fast_compilation")

# Mocked CIFAR-100: every class PER_CLASS[split] times. Train: 2 meta images per class, then
# a pool of 10, so n_max = 10 and rho = 10 leaves int(10 / 10) = 1 image in the tail class.
PER_CLASS = {"train": 12, "test": 1}


def _balanced_cifar100(self, split, **kwargs):
  """`FileReaderBuilder._as_dataset` for `tfds.testing.mock_data`: random images with
  balanced labels (the default mock draws labels at random, so every class of 100 needs
  ~2,500 examples per split to hold 12 of them)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  del self, kwargs
  per_class = PER_CLASS[str(split)]
  rng = np.random.default_rng(per_class)
  images = rng.integers(0, 256, (100 * per_class, 32, 32, 3), dtype=np.uint8)
  labels = np.tile(np.arange(100, dtype=np.int64), per_class)
  return tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})


def test_reproduce_writes_the_paper_number_beside_ours(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  tiny = {"model": "small_cnn", "batch_size": 16, "meta_batch_size": 10, "eval_batch_size": 200,
          "data.meta_per_class": 2, "dnet.hidden": (8, 8), "host_workers": 2,
          "log_every_steps": 1}
  (tmp_path / "tfds").mkdir()
  with tfds.testing.mock_data(as_dataset_fn=_balanced_cifar100):
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
  # The stage-1 runs trained on the long-tailed split of the mocked set.
  stage1 = __import__("json").load(open(os.path.join(
      tmp_path / "grid", "rho10", "dnet", "seed0", "results.json"), encoding="utf-8"))
  counts = stage1["data"]["class_counts"]
  assert (counts[0], counts[-1], stage1["data"]["num_test"]) == (10, 1, 100)


def _fabricated_row(key, rho, final, best_val, max_test):
  return {"key": key, "imbalance": rho, **{
      block: {"overall": (value, 0.0)} for block, value in (
          ("final", final), ("best_val", best_val), ("max_test", max_test))}}


@pytest.mark.parametrize("dataset,rho,paper,model,data_field", [
    ("imagenet_lt", 256.0, "57.40", "resnet50", "data.image_root"),
    ("imagenet_lt_r10", 256.0, "44.60", "resnet10", "data.image_root"),
    ("places_lt", 996.0, "41.70", "resnet152", "data.image_root"),
])
def test_large_presets_put_the_papers_number_beside_ours(dataset, rho, paper, model, data_field):
  preset = reproduce.PRESETS[dataset]
  assert preset.imbalance_factors == (rho,) and preset.data_field == data_field
  stage1, stage2 = preset.stage1_config(), preset.stage2_config()
  assert (preset.model or stage1.model) == model and stage1.data.source == "split_list"
  assert stage2.stage2.method == "las" and stage2.stage2.shift_bn
  (key, label), = preset.methods
  rows = [_fabricated_row(key, rho, 40.0, 41.25, 42.5),
          _fabricated_row(key + "+las", rho, 43.0, 44.125, 45.875)]
  table = reproduce.format_table(preset, rows, dataset)
  line, = [line for line in table.splitlines() if line.startswith(f"| {rho:g} |")]
  cells = [c.strip() for c in line.split("|")[1:-1]]
  assert cells == [f"{rho:g}", label, paper, "40.00", "41.25", "42.50", "43.00", "44.12", "45.88"]
  # The row trains the stage-1 config file as it is: the method key overrides nothing.
  assert reproduce.compare.method_spec(key).overrides == ()


def test_large_preset_routes_data_dir_to_the_image_root(tmp_path, monkeypatch):
  seen = {}

  def fake_grid(base, workdir, **kwargs):
    seen.update(base=base, keys=kwargs["method_keys"], section=kwargs["stage2_section"])
    return {"rows": []}

  monkeypatch.setattr(reproduce.compare, "run_grid", fake_grid)
  reproduce.run_reproduce("places_lt", str(tmp_path), data_dir="/data/places365",
                          overrides={"pretrained_path": "r152.npz"}, log=lambda line: None)
  base = seen["base"]
  assert (base.data.image_root, base.data.data_dir, base.pretrained_path) == (
      "/data/places365", "", "r152.npz")
  assert seen["keys"] == ["public_config", "public_config+las"]
  assert seen["section"].shift_bn_only == "(^|/)extra_block/"
  table = open(os.path.join(tmp_path, reproduce.TABLE_FILE), encoding="utf-8").read()
  assert "| 996 | Difficulty-Net as the public code runs it (config file unchanged) | 41.70 |" in (
      table)
