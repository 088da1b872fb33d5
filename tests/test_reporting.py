"""results.json's three test numbers: final epoch, best validation, and the public code's max."""

from __future__ import annotations

from experiments import reporting


def _record(epoch, val, test):
  return {"epoch": epoch, "step": 10 * epoch, "partial": False, "train_loss": 1.0,
          "learning_rate": 0.1, "val_accuracy": val, "val_per_class": [val],
          "test": {"overall": test, "many": test, "medium": None, "few": None,
                   "per_class": [test]},
          "difficulty": [0.5], "class_weights": [1.0]}


def test_max_test_is_the_first_highest_test_epoch_beside_final_and_best_val():
  history = [_record(1, 0.30, 0.20), _record(2, 0.50, 0.40), _record(3, 0.45, 0.55),
             _record(4, 0.50, 0.55), _record(5, 0.40, 0.35)]
  results = reporting.build_results(
      config_dict={"method": "ce"}, data_info={"name": "toy", "class_counts": [3]},
      history=history, run_info={"steps": 50, "devices": 1, "wall_time_s": 1.0})
  assert results["final_test"]["epoch"] == 5 and results["final_test"]["overall"] == 0.35
  assert results["best_val_test"]["epoch"] == 2 and results["best_val_test"]["overall"] == 0.40
  assert results["max_test"]["epoch"] == 3 and results["max_test"]["overall"] == 0.55
  assert "public code" in results["max_test_note"]
  text = reporting.format_summary(results, "/w", {})
  lines = text.splitlines()
  assert lines[2].startswith("test, final epoch") and "35.00" in lines[2]
  assert lines[3].startswith("test, best-val epoch") and "40.00" in lines[3]
  assert lines[4].startswith("test, max (public code)") and "55.00" in lines[4]
  assert "as the public code reports" in lines[5]
