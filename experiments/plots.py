"""The PNG plots of a run (class counts, difficulty and weights, per-class accuracy, curves).

matplotlib's object-oriented API with the Agg canvas (`figure`): no pyplot, so
no global backend is changed in the caller's process.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
from absl import logging

from experiments.reporting import RESULTS_FILE

PLOT_FILES = {
    "class_counts": "class_counts.png",
    "difficulty_weights": "difficulty_and_weights.png",
    "per_class_accuracy": "per_class_accuracy.png",
    "curves": "training_curves.png",
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


def figure(width=7.0, height=4.0, nrows=1, ncols=1):
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(width, height), dpi=100)
  FigureCanvasAgg(fig)
  axes = fig.subplots(nrows, ncols, squeeze=False)
  return fig, axes


_GROUP_COLORS = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}


def plot_class_counts(path: str, class_counts, groups, thresholds: tuple[int, int]):
  counts = np.asarray(class_counts)
  fig, axes = figure()
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
  fig, axes = figure(11.0, 4.0, 1, 2)
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
  fig, axes = figure()
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
  fig, axes = figure(11.0, 4.0, 1, 2)
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
