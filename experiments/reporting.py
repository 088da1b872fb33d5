"""What a run leaves behind at its end: results.json and the summary it prints.

The scalar logs and the progress bar written while it trains are
`experiments/metric_writers.py`; the PNG plots are `experiments/plots.py`.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
from absl import logging

RESULTS_FILE = "results.json"


# ---------------------------------------------------------------------------- accuracy maths


def data_info(dataset, many_threshold: int, few_threshold: int) -> dict:
  """The "data" block of results.json (the same for every kind of dataset)."""
  groups = dataset.shot_groups(many_threshold, few_threshold)
  return {"name": dataset.name, "num_classes": dataset.num_classes,
          "class_counts": [int(c) for c in dataset.class_counts],
          "num_train": dataset.num_train, "num_meta": dataset.num_meta,
          "num_test": dataset.num_test,
          "shot_groups": {k: np.flatnonzero(v).tolist() for k, v in groups.items()},
          "many_threshold": int(many_threshold), "few_threshold": int(few_threshold)}


def group_accuracies(per_class_accuracy: np.ndarray, groups: Mapping[str, np.ndarray]):
  """Mean per-class accuracy over each shot group; None for an empty group."""
  out = {}
  for name, mask in groups.items():
    mask = np.asarray(mask, bool)
    out[name] = float(np.mean(per_class_accuracy[mask])) if mask.any() else None
  return out


def accuracy_summary(correct: np.ndarray, total: np.ndarray, groups) -> dict:
  """Overall top-1 (examples), per-class accuracy, and many/medium/few (class means).

  A class without evaluation examples has no accuracy: it is None in "per_class",
  left out of its group's mean (a group with no such class left is None), listed
  under "classes_without_examples" and named in a warning.
  """
  correct = np.asarray(correct, np.float64)
  total = np.asarray(total, np.float64)
  present = total > 0
  per_class = np.where(present, correct / np.maximum(total, 1.0), 0.0)
  summary = {"overall": float(correct.sum() / max(total.sum(), 1.0))}
  summary.update(group_accuracies(per_class, {name: np.asarray(mask, bool) & present
                                              for name, mask in groups.items()}))
  summary["per_class"] = [float(a) if p else None for a, p in zip(per_class, present)]
  missing = [int(c) for c in np.flatnonzero(~present)]
  summary["classes_without_examples"] = missing
  if missing:
    logging.log_first_n(
        logging.WARNING, "Class(es) %s have no evaluation examples: they have no accuracy and "
        "are left out of the many/medium/few means (results.json: classes_without_examples).",
        1, missing)
  return summary


def select_final_and_best(history: Sequence[dict]) -> tuple[dict | None, dict | None]:
  """(final record, best-validation record) of a history of evaluations.

  The best record is the first one with the highest validation accuracy; the
  test accuracy never enters the choice.
  """
  if not history:
    return None, None
  best = history[0]
  for record in history[1:]:
    if record["val_accuracy"] > best["val_accuracy"]:
      best = record
  return history[-1], best


def select_max_test(history: Sequence[dict]) -> dict | None:
  """The first record with the highest TEST accuracy: what the public Difficulty-Net
  code reports (the maximum test accuracy over epochs, C1:284-287, C2:194-198,
  T1:308-332). It selects on the test set, so it is reported beside the honest
  final-epoch and best-validation numbers, never instead of them."""
  if not history:
    return None
  best = history[0]
  for record in history[1:]:
    if record["test"]["overall"] > best["test"]["overall"]:
      best = record
  return best


MAX_TEST_LABEL = "maximum test accuracy over epochs, as the public code reports (selected on test)"


# ---------------------------------------------------------------------------- results.json


def _test_block(record: dict | None) -> dict | None:
  if record is None:
    return None
  return {
      "epoch": record["epoch"],
      "step": record["step"],
      "val_accuracy": record["val_accuracy"],
      "overall": record["test"]["overall"],
      "many": record["test"]["many"],
      "medium": record["test"]["medium"],
      "few": record["test"]["few"],
      "per_class": record["test"]["per_class"],
      "classes_without_examples": record["test"].get("classes_without_examples", []),
  }


def _json_default(obj):
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  return str(obj)


def write_json(path: str, payload: Mapping[str, Any]) -> None:
  """Writes JSON atomically (temporary file, then rename)."""
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(payload, f, indent=1, default=_json_default, allow_nan=False)
  os.replace(tmp, path)


def build_results(*, config_dict: dict, data_info: dict, history: Sequence[dict],
                  run_info: dict) -> dict:
  """The results.json payload (see `experiments/trainer.py` for the fields' meaning)."""
  final, best = select_final_and_best(history)
  return {
      "config": config_dict,
      "data": data_info,
      "final_test": _test_block(final),
      "best_val_test": _test_block(best),
      "best_val_epoch": None if best is None else best["epoch"],
      "max_test": _test_block(select_max_test(history)),
      "max_test_note": MAX_TEST_LABEL,
      "per_class_test_accuracy": None if final is None else final["test"]["per_class"],
      "class_counts": data_info["class_counts"],
      "history": {
          "epoch": [r["epoch"] for r in history],
          "step": [r["step"] for r in history],
          "partial_epoch": [bool(r.get("partial", False)) for r in history],
          "train_loss": [r["train_loss"] for r in history],
          "learning_rate": [r["learning_rate"] for r in history],
          "val_accuracy": [r["val_accuracy"] for r in history],
          "val_per_class": [r["val_per_class"] for r in history],
          "test_accuracy": [r["test"]["overall"] for r in history],
          "test_many": [r["test"]["many"] for r in history],
          "test_medium": [r["test"]["medium"] for r in history],
          "test_few": [r["test"]["few"] for r in history],
          "difficulty": [r["difficulty"] for r in history],
          "class_weights": [r["class_weights"] for r in history],
      },
      **run_info,
  }


# ---------------------------------------------------------------------------- summary


def format_percent(value) -> str:
  return "  n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:5.2f}"


def format_epoch_line(record: dict, num_epochs: int) -> str:
  """One terminal line per evaluation: epoch, train loss, validation and test accuracy."""
  test = record["test"]
  epoch = (f"epoch {record['epoch']:d}/{num_epochs}" if not record.get("partial") else
           f"step {record['step']} (epoch {record['epoch']:.2f})")
  loss = record.get("train_loss")
  return (f"{epoch}: loss {'n/a' if loss is None else f'{loss:.4f}'}, "
          f"val {format_percent(record['val_accuracy']).strip()}%, test "
          f"{format_percent(test['overall']).strip()}% (many {format_percent(test['many']).strip()}"
          f", medium {format_percent(test['medium']).strip()}, few "
          f"{format_percent(test['few']).strip()})")


def format_summary(results: dict, workdir: str, plot_paths: Mapping[str, str]) -> str:
  """A few lines for the terminal: accuracies and where the outputs are."""
  lines = [f"Difficulty-Net experiment runner: method={results['config'].get('method')} "
           f"data={results['data']['name']} steps={results['steps']} devices={results['devices']} "
           f"wall={results['wall_time_s']:.1f}s"]
  header = f"{'':24s} {'overall':>7s} {'many':>6s} {'medium':>6s} {'few':>6s}"
  lines.append(header)
  blocks = [("test, final epoch", results["final_test"]),
            ("test, best-val epoch", results["best_val_test"])]
  if "max_test" in results:  # results.json of older runs has none
    blocks.append(("test, max (public code)", results["max_test"]))
  for label, block in blocks:
    if block is None:
      lines.append(f"{label:24s} (no evaluation)")
      continue
    lines.append(f"{label:24s} {format_percent(block['overall']):>7s} {format_percent(block['many']):>6s} "
                 f"{format_percent(block['medium']):>6s} {format_percent(block['few']):>6s}   (epoch {block['epoch']:g})")
  if results.get("max_test") is not None:
    lines.append("(max: the " + MAX_TEST_LABEL + "; the first two rows are the honest numbers)")
  lines.append(f"results: {os.path.join(workdir, RESULTS_FILE)}")
  if plot_paths:
    lines.append("plots:   " + ", ".join(sorted(plot_paths.values())))
  return "\n".join(lines)
