"""What a run leaves behind at its end: results.json, PNG plots, a summary.

(The scalar logs and the progress bar written while it trains are
`experiments/metric_writers.py`.) Plots use matplotlib's object-oriented API with the Agg canvas (no pyplot, so
no global backend is changed in the caller's process).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
from absl import logging

RESULTS_FILE = "results.json"
PLOT_FILES = {
    "class_counts": "class_counts.png",
    "difficulty_weights": "difficulty_and_weights.png",
    "per_class_accuracy": "per_class_accuracy.png",
    "curves": "training_curves.png",
}


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


def load_comparison(path: str) -> tuple[list[float], str] | None:
  """(per-class test accuracy, label) from a run's workdir or results.json; None if absent."""
  if not path:
    return None
  file = os.path.join(path, RESULTS_FILE) if os.path.isdir(path) else path
  if not os.path.isfile(file):
    logging.warning("compare_with=%r: no %s there; plotting without comparison.", path, RESULTS_FILE)
    return None
  with open(file, encoding="utf-8") as f:
    other = json.load(f)
  per_class = other.get("per_class_test_accuracy")
  if not per_class:
    logging.warning("compare_with=%r has no per-class test accuracy; ignored.", path)
    return None
  method = other.get("config", {}).get("method", "other run")
  return per_class, f"{method} ({os.path.basename(os.path.dirname(os.path.abspath(file)))})"


# ---------------------------------------------------------------------------- plots


def _figure(width=7.0, height=4.0, nrows=1, ncols=1):
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(width, height), dpi=100)
  FigureCanvasAgg(fig)
  axes = fig.subplots(nrows, ncols, squeeze=False)
  return fig, axes


_GROUP_COLORS = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}


def plot_class_counts(path: str, class_counts, groups, thresholds: tuple[int, int]):
  counts = np.asarray(class_counts)
  fig, axes = _figure()
  ax = axes[0, 0]
  colors = ["grey"] * len(counts)
  for name, mask in groups.items():
    for c in np.flatnonzero(mask):
      colors[c] = _GROUP_COLORS[name]
  ax.bar(np.arange(len(counts)), counts, color=colors, width=1.0 if len(counts) > 30 else 0.8)
  many, few = thresholds
  ax.axhline(many, color="k", lw=0.8, ls="--", label=f"many-shot > {many}")
  ax.axhline(few, color="k", lw=0.8, ls=":", label=f"few-shot < {few}")
  for name, color in _GROUP_COLORS.items():
    ax.bar([0], [0], color=color, label=f"{name} ({int(np.sum(groups[name]))} classes)")
  ax.set_xlabel("class")
  ax.set_ylabel("training images")
  ax.set_title(f"Training set: {int(counts.sum())} images, imbalance "
               f"{counts.max() / max(counts.min(), 1):.1f}")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)


def _lines_over_epochs(ax, epochs, values, title, ylabel):
  import matplotlib  # pylint: disable=g-import-not-at-top
  from matplotlib import cm  # pylint: disable=g-import-not-at-top
  values = np.asarray(values, np.float64)  # [epochs, C]
  num_classes = values.shape[1] if values.ndim == 2 else 0
  norm = matplotlib.colors.Normalize(vmin=0, vmax=max(num_classes - 1, 1))
  cmap = matplotlib.colormaps["viridis"]
  for c in range(num_classes):
    ax.plot(epochs, values[:, c], color=cmap(norm(c)), lw=1.0, marker="." if len(epochs) < 3 else None)
  ax.set_title(title)
  ax.set_xlabel("epoch")
  ax.set_ylabel(ylabel)
  return cm.ScalarMappable(norm=norm, cmap=cmap)


def plot_difficulty_and_weights(path: str, epochs, difficulty, weights, learned: bool):
  fig, axes = _figure(11.0, 4.0, 1, 2)
  name = "learned difficulty d = g(a)" if learned else "measured difficulty 1 - a"
  if len(epochs):
    _lines_over_epochs(axes[0, 0], epochs, difficulty, name, "difficulty")
    mappable = _lines_over_epochs(axes[0, 1], epochs, weights, "class weight w", "weight")
    fig.colorbar(mappable, ax=axes[0, 1], label="class index (head -> tail)")
  else:
    for ax in axes[0]:
      ax.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=ax.transAxes)
  fig.tight_layout()
  fig.savefig(path)


def plot_per_class_accuracy(path: str, per_class, class_counts, comparison=None, label="this run"):
  fig, axes = _figure()
  ax = axes[0, 0]
  classes = np.arange(len(class_counts))
  if per_class is not None:
    # float: a class without test examples (None) is a gap in the line
    ax.plot(classes, np.asarray(per_class, float) * 100, marker="o", ms=3, lw=1.2, label=label)
  if comparison is not None:
    other, other_label = comparison
    if len(other) == len(classes):
      ax.plot(classes, np.asarray(other, float) * 100, marker="s", ms=3, lw=1.0, ls="--",
              label=other_label)
    else:
      logging.warning("compare_with has %d classes, this run %d; not plotted.", len(other),
                      len(classes))
  ax.set_xlabel("class (sorted by training images, head -> tail)")
  ax.set_ylabel("test top-1 accuracy (%)")
  ax.set_ylim(-2, 102)
  ax.set_title("Per-class test accuracy (final epoch)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)


def plot_curves(path: str, history: Sequence[dict]):
  fig, axes = _figure(11.0, 4.0, 1, 2)
  epochs = [r["epoch"] for r in history]
  ax = axes[0, 0]
  ax.plot(epochs, [r["train_loss"] for r in history], marker="." if len(epochs) < 3 else None)
  ax.set_xlabel("epoch")
  ax.set_ylabel("train loss")
  ax.set_title("Training loss (epoch mean)")
  ax = axes[0, 1]
  ax.plot(epochs, [100 * r["val_accuracy"] for r in history], label="validation (meta set)")
  ax.plot(epochs, [100 * r["test"]["overall"] for r in history], label="test")
  for group, style in (("many", ":"), ("medium", "-."), ("few", "--")):
    values = [r["test"][group] for r in history]
    if all(v is not None for v in values):
      ax.plot(epochs, [100 * v for v in values], ls=style, lw=0.8, label=f"test {group}")
  ax.set_xlabel("epoch")
  ax.set_ylabel("top-1 accuracy (%)")
  ax.set_title("Accuracy")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)


def write_plots(workdir: str, results: dict, groups, thresholds, *, learned_difficulty: bool,
                compare_with: str = "") -> dict[str, str]:
  """Writes the PNG plots; returns {plot name: path}."""
  history = results["history"]
  records = _history_records(history)
  paths = {name: os.path.join(workdir, file) for name, file in PLOT_FILES.items()}
  plot_class_counts(paths["class_counts"], results["class_counts"], groups, thresholds)
  plot_difficulty_and_weights(paths["difficulty_weights"], history["epoch"], history["difficulty"],
                              history["class_weights"], learned_difficulty)
  plot_per_class_accuracy(paths["per_class_accuracy"], results["per_class_test_accuracy"],
                          results["class_counts"], load_comparison(compare_with),
                          label=results["config"].get("method", "this run"))
  plot_curves(paths["curves"], records)
  return paths


def _history_records(history: dict) -> list[dict]:
  return [{"epoch": e, "train_loss": l, "val_accuracy": v,
           "test": {"overall": t, "many": m, "medium": md, "few": f}}
          for e, l, v, t, m, md, f in zip(history["epoch"], history["train_loss"],
                                          history["val_accuracy"], history["test_accuracy"],
                                          history["test_many"], history["test_medium"],
                                          history["test_few"])]


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
