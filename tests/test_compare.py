"""experiments.compare: method specs, aggregation by hand, and a tiny grid end to end whose
table.md numbers are recomputed here from the runs' own results.json files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from experiments import compare
from experiments import methods
from experiments.configs import digits_lt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

REQUIRED_LABELS = {
    "CE", "class-balanced", "focal", "Balanced Softmax", "CDB-CE tau = 1", "CDB-CE dynamic tau",
    "Difficulty-Net (paper, nested)", "Difficulty-Net driver_only (public code)",
    "Difficulty-Net absolute variant", "Difficulty-Net lambda = 0",
    "Difficulty-Net + Balanced Softmax", "CE + LAS (stage 2)",
    "Difficulty-Net (paper, nested) + LAS (stage 2)", "Balanced Softmax + LAS (stage 2)",
    "Difficulty-Net + Balanced Softmax + LAS (stage 2)"}


def test_default_methods_map_to_valid_runner_configs():
  specs = [compare.method_spec(k) for k in compare.DEFAULT_METHODS]
  assert {s.label for s in specs} == REQUIRED_LABELS
  base = digits_lt.get_config()
  for spec in specs:
    if spec.stage1:
      assert spec.stage2_method == "las" and spec.stage1 in compare.STAGE1_METHODS
      continue
    config = compare.stage1_config(base, spec, 10, 2)
    methods.validate_config(config)
    assert config.data.imbalance_factor == 10.0 and config.seed == 2
  by_key = {s.key: compare.stage1_config(base, s, 50, 0) for s in specs if not s.stage1}
  assert by_key["dnet"].meta_grad == "nested" and by_key["dnet_driver_only"].meta_grad == "driver_only"
  assert by_key["dnet_lambda0"].driver_weight == 0.0 and by_key["dnet_absolute"].dnet.kind == "absolute"
  assert (by_key["cdb_tau1"].method, by_key["cdb_tau1"].cdb_tau) == ("cdb", "1")
  assert by_key["dnet_bs"].method == "difficulty_net_bs"
  assert compare.method_spec("dnet_bs+crt").label == "Difficulty-Net + Balanced Softmax + cRT (stage 2)"
  with pytest.raises(ValueError, match="Unknown method 'mixup'"):
    compare.method_spec("mixup")


def test_plan_runs_stage1_dependencies_first_and_scales_epochs(tmp_path):
  base = digits_lt.get_config()
  execute, table = compare.plan_grid(base, str(tmp_path), ["dnet+las"], [0, 1], [10],
                                     num_epochs=15, stage2_epochs=4)
  assert [(r.spec.key, r.seed) for r in execute] == [("dnet", 0), ("dnet", 1), ("dnet+las", 0),
                                                      ("dnet+las", 1)]
  assert [r.spec.key for r in table] == ["dnet+las", "dnet+las"]
  stage2_run = execute[2]
  assert stage2_run.config.stage1_workdir == execute[0].directory
  assert stage2_run.config.stage2.num_epochs == 4 and stage2_run.config.method == "difficulty_net"
  first = execute[0].config
  assert (first.num_epochs, first.warmup_epochs, tuple(first.lr_decay_epochs)) == (15, 1, (10, 13))


def test_aggregate_mean_and_sample_std_by_hand():
  spec = compare.method_spec("ce")
  runs = [compare.Run(spec, 10.0, s, f"d{s}", None) for s in range(3)]
  block = lambda x: {"overall": x, "many": 1.0, "medium": None, "few": x / 2}  # noqa: E731
  results = {f"d{s}": {"final_test": block(v), "best_val_test": block(v)}
             for s, v in enumerate((0.5, 0.6, 0.8))}
  (row,) = compare.aggregate(runs, results)
  mean, std = row["final"]["overall"]
  assert mean == pytest.approx(63.333333, abs=1e-5)
  # sample std (n - 1): deviations -13.33, -3.33, 16.67 -> sqrt(466.67 / 2) = 15.2753
  assert std == pytest.approx(15.275252, abs=1e-5)
  assert row["final"]["medium"] is None and row["final"]["many"] == (100.0, 0.0)
  text = compare.format_tables([row], "# t")
  assert "| 10 | CE | 3 | 63.33 ± 15.28 | 100.00 ± 0.00 | n/a | 31.67 ± 7.64 |" in text


def _parse_tables(text: str) -> dict[str, dict[tuple[float, str], dict[str, float | None]]]:
  """{"final"|"best_val": {(imbalance, label): {group: mean}}} from table.md."""
  tables, current = {}, None
  for line in text.splitlines():
    if line.startswith("## "):
      current = "best_val" if "best-validation" in line else "final"
      tables[current] = {}
      continue
    if current and line.startswith("| ") and not line.startswith("| imbalance"):
      cells = [c.strip() for c in line.strip("|").split("|")]
      means = {}
      for group, cell in zip(compare.GROUPS, cells[3:]):
        means[group] = None if cell == "n/a" else float(re.match(r"[-\d.]+", cell).group())
      tables[current][(float(cells[0]), cells[1])] = means
  return tables


def test_compare_command_end_to_end_table_equals_the_runs_results(tmp_path):
  workdir = tmp_path / "grid"
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="true")
  command = [sys.executable, "-m", "experiments.compare",
             "--config=experiments/configs/digits_lt.py", f"--workdir={workdir}",
             "--methods=ce,ce+las", "--seeds=0", "--imbalance=50", "--max_steps=3"]
  proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "[2/2]" in proc.stdout and "timing:" in proc.stdout

  table_text = (workdir / compare.TABLE_FILE).read_text(encoding="utf-8")
  tables = _parse_tables(table_text)
  expected_labels = {"CE", "CE + LAS (stage 2)"}
  for name, block in (("final", "final_test"), ("best_val", "best_val_test")):
    assert {label for _, label in tables[name]} == expected_labels
    for key, label in (("ce", "CE"), ("ce+las", "CE + LAS (stage 2)")):
      results = json.loads((workdir / "rho50" / key / "seed0" / "results.json").read_text())
      assert results["steps"] == 3
      for group in compare.GROUPS:
        value = results[block][group]
        shown = tables[name][(50.0, label)][group]
        if value is None:
          assert shown is None
        else:
          assert shown == pytest.approx(100 * value, abs=0.005001), (name, label, group)
  stage2_results = json.loads((workdir / "rho50" / "ce+las" / "seed0" / "results.json").read_text())
  assert stage2_results["stage1"]["workdir"] == str(workdir / "rho50" / "ce" / "seed0")
  grid = json.loads((workdir / compare.GRID_FILE).read_text())
  assert len(grid["runs"]) == 2 and grid["estimate"]["full_grid_s"] > 0
  assert os.path.getsize(workdir / compare.ACCURACY_PLOT) > 1000

  # Resumable: the same command skips both finished runs and rewrites the same table.
  again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count("finished, skipped") == 2
  assert (workdir / compare.TABLE_FILE).read_text(encoding="utf-8") == table_text


def test_a_directory_with_other_settings_stops_the_grid(tmp_path):
  spec = compare.method_spec("ce")
  config = compare.stage1_config(digits_lt.get_config(), spec, 50, 0)
  run = compare.Run(spec, 50.0, 0, str(tmp_path), config)
  assert compare.run_status(run) == "new"
  saved = json.loads(json.dumps(config.to_dict()))
  saved["learning_rate"] = 0.1
  (tmp_path / "results.json").write_text(json.dumps({"config": saved, "steps": 1, "total_steps": 1}))
  with pytest.raises(ValueError, match="learning_rate: 0.1 there, 0.05 here"):
    compare.run_status(run)
  saved["learning_rate"] = 0.05
  saved["progress_bar"] = True  # run-only fields may differ
  (tmp_path / "results.json").write_text(json.dumps({"config": saved, "steps": 1, "total_steps": 1}))
  assert compare.run_status(run) == "finished"


def test_class_weights_plot_from_results(tmp_path):
  spec_d, spec_c = compare.method_spec("dnet"), compare.method_spec("cdb_dynamic")
  runs, results = [], {}
  rng = np.random.default_rng(0)
  for spec in (spec_d, spec_c):
    for seed in (0, 1):
      d = f"{spec.key}{seed}"
      runs.append(compare.Run(spec, 50.0, seed, d, None))
      results[d] = {"class_counts": [50, 20, 5], "history": {
          "class_weights": [list(rng.uniform(0.5, 1.5, 3))],
          "val_per_class": [list(rng.uniform(0, 1, 3))]}}
  path = str(tmp_path / "w.png")
  assert compare.plot_class_weights(path, runs, results)
  assert os.path.getsize(path) > 1000
  assert not compare.plot_class_weights(path, [compare.Run(compare.method_spec("ce"), 50.0, 0,
                                                           "x", None)], {})


def test_main_imported_names_what_it_needs():
  """`compare.main` from an import: a usage error naming define_flags, not a NameError."""
  from absl import app
  with pytest.raises(app.UsageError, match=r"call experiments\.compare\.define_flags\(\)"):
    compare.main([])
