r"""A measured comparison: methods x seeds x imbalance factors, one table and two plots.

Full digits grid (the defaults: 11 stage-1 methods and stage-2 LAS on top of CE,
Difficulty-Net, Balanced Softmax and Difficulty-Net + Balanced Softmax; seeds
0,1,2; imbalance factors 10,50,100; 135 runs):

  python -m experiments.compare --config=experiments/configs/digits_lt.py \
    --workdir=runs/compare_digits

Run time on 2 CPU cores, rho = 50, with the compilation cache: 6-9 s per
30-epoch baseline run, about 10 s per Difficulty-Net run (14-25 s for the first
run of a method, which compiles its step), 3 s per 10-epoch stage-2 run; about
20 minutes for the default grid. Every method keeps the config's settings
(30 epochs; stage 2: 10 epochs); `--num_epochs` shortens all of them alike.

What it does:
  * every (imbalance factor, method, seed) is a run of the ordinary runner
    (`experiments.trainer.train_and_evaluate`, or `experiments.stage2.train_stage2`
    for "<stage-1 method>+las|crt|lws") in its own directory
    `<workdir>/rho<rho>/<method>/seed<seed>`; the runs go one after the other in
    this one process, and JAX's persistent compilation cache
    (`<workdir>/jax_cache`, --compilation_cache) lets identical computations
    compile once;
  * a finished run (results.json with all its steps, same settings) is skipped,
    an interrupted one resumes from its checkpoint; a directory that holds a run
    with other settings stops the grid with an error (use a new --workdir);
  * `table.md`: mean ± sample standard deviation over seeds of the test top-1
    (overall / many / medium / few, %) at the final epoch, and a second table at
    the best-validation epoch; every number is computed from the runs' own
    results.json files. `grid.json`: the same numbers, the runs and their wall
    times. `class_weights.png`: the class weights of Difficulty-Net and CDB at
    the end of training against class frequency and against per-class
    validation accuracy. `accuracy.png`: overall and few-shot accuracy by method.

No hyperparameter is tuned here, on the test split or otherwise: all methods
use the config's settings, and each method's own constants are the published
ones (focal gamma 1, CDB tau 1 or dynamic, class-balanced beta 0.9999, lambda
0.3, LAS smoothing by METHOD.md's CIFAR rule).

Method keys (--methods, comma-separated; labels as in the table):
  ce                 CE
  class_balanced     class-balanced (effective number, beta 0.9999)
  focal              focal (gamma 1)
  balanced_softmax   Balanced Softmax
  cdb_tau1           CDB-CE tau = 1
  cdb_dynamic        CDB-CE dynamic tau
  dnet               Difficulty-Net (paper, nested)
  dnet_driver_only   Difficulty-Net driver_only (public code)
  dnet_absolute      Difficulty-Net absolute variant
  dnet_lambda0       Difficulty-Net lambda = 0
  dnet_bs            Difficulty-Net + Balanced Softmax
  <key>+las          stage 2 with LAS on the stage-1 runs of <key> (also +crt, +lws);
                     defaults ce+las, dnet+las, balanced_softmax+las, dnet_bs+las
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import json
import os
import time
from typing import Any, Iterable, Sequence

import ml_collections
import numpy as np

from experiments import plots
from experiments import reporting

RESULTS_FILE = reporting.RESULTS_FILE
TABLE_FILE = "table.md"
GRID_FILE = "grid.json"
WEIGHTS_PLOT = "class_weights.png"
ACCURACY_PLOT = "accuracy.png"
GROUPS = ("overall", "many", "medium", "few")


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """A method of the table: config overrides of the runner, or a stage 2 on another method."""
  key: str
  label: str
  overrides: tuple[tuple[str, Any], ...] = ()
  stage1: str | None = None   # stage-2 methods: the key of the stage-1 method
  stage2_method: str | None = None


STAGE1_METHODS = {spec.key: spec for spec in (
    MethodSpec("ce", "CE", (("method", "ce"),)),
    MethodSpec("class_balanced", "class-balanced", (("method", "class_balanced"),)),
    MethodSpec("focal", "focal", (("method", "focal"),)),
    MethodSpec("balanced_softmax", "Balanced Softmax", (("method", "balanced_softmax"),)),
    MethodSpec("cdb_tau1", "CDB-CE tau = 1", (("method", "cdb"), ("cdb_tau", "1"))),
    MethodSpec("cdb_dynamic", "CDB-CE dynamic tau", (("method", "cdb"), ("cdb_tau", "dynamic"))),
    MethodSpec("dnet", "Difficulty-Net (paper, nested)",
               (("method", "difficulty_net"), ("meta_grad", "nested"))),
    MethodSpec("dnet_driver_only", "Difficulty-Net driver_only (public code)",
               (("method", "difficulty_net"), ("meta_grad", "driver_only"))),
    # Shared MLP R -> (0, 1) per class with biases, as Meta-Weight-Net (without
    # biases a ReLU MLP of one input is sigmoid(k a_c): a single slope).
    MethodSpec("dnet_absolute", "Difficulty-Net absolute variant",
               (("method", "difficulty_net"), ("meta_grad", "nested"), ("dnet.kind", "absolute"),
                ("dnet.use_bias", True))),
    MethodSpec("dnet_lambda0", "Difficulty-Net lambda = 0",
               (("method", "difficulty_net"), ("meta_grad", "nested"), ("driver_weight", 0.0))),
    MethodSpec("dnet_bs", "Difficulty-Net + Balanced Softmax",
               (("method", "difficulty_net_bs"), ("meta_grad", "nested"))),
)}
# The stage-1 config file as it is (no method overrides): the method its recipe sets, e.g. the
# ImageNet-LT / Places-LT public recipes of experiments.reproduce. Not in the default grid.
CONFIG_AS_IS = "public_config"
STAGE1_METHODS[CONFIG_AS_IS] = MethodSpec(
    CONFIG_AS_IS, "Difficulty-Net as the public code runs it (config file unchanged)")
STAGE2_LABELS = {"las": "LAS", "crt": "cRT", "lws": "LWS"}
# Stage 2 (LAS) on CE and Difficulty-Net, as asked, and on the two strongest stage-1 methods by
# *validation* accuracy in a pilot (2 seeds, rho = 50: Balanced Softmax and Difficulty-Net +
# Balanced Softmax, both 86.5 % final validation accuracy; the next is CDB dynamic, 84.5 %).
DEFAULT_METHODS = tuple(k for k in STAGE1_METHODS if k != CONFIG_AS_IS) + (
    "ce+las", "dnet+las", "balanced_softmax+las", "dnet_bs+las")
# Methods whose class weights are plotted (in this order, those in the grid).
WEIGHT_PLOT_METHODS = ("dnet", "dnet_driver_only", "dnet_bs", "cdb_tau1", "cdb_dynamic")

# Fields that may differ between a finished run and the grid's request without
# changing what was trained (where it was run from, how it logged).
_RUN_ONLY_FIELDS = ("progress_bar", "log_every_steps", "checkpoint_every_epochs",
                    "checkpoint_every_steps", "max_checkpoints_to_keep", "eval_batch_size",
                    "compare_with", "data.data_dir", "stage1_workdir")


def method_spec(key: str) -> MethodSpec:
  """The spec of a method key: a stage-1 key or "<stage-1 key>+las|crt|lws"."""
  if key in STAGE1_METHODS:
    return STAGE1_METHODS[key]
  base, sep, stage2 = key.partition("+")
  if sep and base in STAGE1_METHODS and stage2 in STAGE2_LABELS:
    return MethodSpec(key, f"{STAGE1_METHODS[base].label} + {STAGE2_LABELS[stage2]} (stage 2)",
                      stage1=base, stage2_method=stage2)
  raise ValueError(f"Unknown method {key!r}; choose from {', '.join(STAGE1_METHODS)}, or "
                   "'<one of those>+las' (+crt, +lws) for stage 2 on its run.")


# ---------------------------------------------------------------------------- the grid


@dataclasses.dataclass
class Run:
  spec: MethodSpec
  imbalance: float
  seed: int
  directory: str
  config: ml_collections.ConfigDict

  @property
  def stage(self) -> int:
    return 2 if self.spec.stage1 else 1


def run_directory(workdir: str, key: str, imbalance: float, seed: int) -> str:
  return os.path.join(workdir, f"rho{imbalance:g}", key, f"seed{seed}")


def _set(config, dotted: str, value) -> None:
  node = config
  *parents, leaf = dotted.split(".")
  for name in parents:
    node = node[name]
  node[leaf] = value


def scale_epochs(config, num_epochs: int) -> None:
  """Sets num_epochs and scales warm-up and decay epochs alike (the same for every method)."""
  old = int(config.num_epochs)
  if num_epochs <= 0 or num_epochs == old:
    return
  factor = num_epochs / old
  config.num_epochs = int(num_epochs)
  config.warmup_epochs = int(round(int(config.warmup_epochs) * factor))
  config.lr_decay_epochs = tuple(max(1, int(round(e * factor))) for e in config.lr_decay_epochs)


def stage1_config(base, spec: MethodSpec, imbalance: float, seed: int, *, max_steps: int = 0):
  config = copy.deepcopy(base)
  with config.unlocked():
    for field, value in spec.overrides:
      _set(config, field, value)
    config.data.imbalance_factor = float(imbalance)
    config.seed = int(seed)
    config.max_steps = int(max_steps)
    config.progress_bar = False
  return config


def stage2_config(stage1: ml_collections.ConfigDict, stage2_section, stage2_method: str,
                  stage1_workdir: str, *, max_steps: int = 0):
  """The stage-1 run's own config plus the stage-2 fields: model and data match by construction."""
  from experiments.configs import _stage2  # pylint: disable=g-import-not-at-top
  config = copy.deepcopy(stage1)
  with config.unlocked():
    _stage2.add_stage2_fields(config, copy.deepcopy(stage2_section))
    config.stage1_workdir = stage1_workdir
    config.stage2.method = stage2_method
    config.stage2.max_steps = int(max_steps)
  return config


def plan_grid(base, workdir: str, method_keys: Sequence[str], seeds: Sequence[int],
              imbalance_factors: Sequence[float], *, stage2_section=None, max_steps: int = 0,
              num_epochs: int = 0, stage2_epochs: int = 0) -> tuple[list[Run], list[Run]]:
  """(runs to execute in order, runs of the table): stage-1 runs a stage 2 needs come first."""
  from experiments.configs import _stage2  # pylint: disable=g-import-not-at-top
  base = copy.deepcopy(base)
  with base.unlocked():
    scale_epochs(base, num_epochs)
  section = copy.deepcopy(stage2_section if stage2_section is not None else _stage2.stage2_section())
  if stage2_epochs > 0:
    section.num_epochs = int(stage2_epochs)
  specs = [method_spec(k) for k in method_keys]
  if len({s.key for s in specs}) != len(specs):
    raise ValueError(f"A method is listed twice in {list(method_keys)}.")
  needed = [s.key for s in specs if not s.stage1]
  needed += [s.stage1 for s in specs if s.stage1 and s.stage1 not in needed]
  table_keys = [s.key for s in specs]
  execute, table = [], []
  for rho in imbalance_factors:
    stage1_runs = {}
    for key in needed:
      spec = STAGE1_METHODS[key]
      for seed in seeds:
        run = Run(spec, float(rho), int(seed), run_directory(workdir, key, rho, seed),
                  stage1_config(base, spec, rho, seed, max_steps=max_steps))
        stage1_runs[(key, seed)] = run
        execute.append(run)
        if key in table_keys:
          table.append(run)
    for spec in specs:
      if not spec.stage1:
        continue
      for seed in seeds:
        first = stage1_runs[(spec.stage1, seed)]
        run = Run(spec, float(rho), int(seed), run_directory(workdir, spec.key, rho, seed),
                  stage2_config(first.config, section, spec.stage2_method, first.directory,
                                max_steps=max_steps))
        execute.append(run)
        table.append(run)
  return execute, table


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      flat.update(_flatten(value, name + "."))
    else:
      flat[name] = value
  return flat


def _jsonable(config) -> dict:
  return json.loads(json.dumps(ml_collections.ConfigDict(config).to_dict()))


def run_status(run: Run) -> str:
  """'finished', 'resume' (a results.json or checkpoint exists, not complete) or 'new'.

  Raises ValueError if the directory holds a run with other training settings.
  """
  path = os.path.join(run.directory, RESULTS_FILE)
  if not os.path.isfile(path):
    return "resume" if os.path.isdir(os.path.join(run.directory, "checkpoints")) else "new"
  with open(path, encoding="utf-8") as f:
    results = json.load(f)
  saved = _flatten(results.get("config", {}))
  wanted = _flatten(_jsonable(run.config))
  changed = sorted(k for k in set(saved) | set(wanted)
                   if k not in _RUN_ONLY_FIELDS and saved.get(k) != wanted.get(k))
  limits = ("max_steps", "stage2.max_steps", "num_epochs", "stage2.num_epochs")
  if any(k not in limits for k in changed):
    raise ValueError(
        f"{run.directory} holds a run with other settings ("
        + "; ".join(f"{k}: {saved.get(k)!r} there, {wanted.get(k)!r} here" for k in changed)
        + "). Use a new --workdir for a grid with different settings.")
  if changed:  # a longer or shorter budget: the runner continues from the checkpoint
    return "resume"
  return "finished" if int(results.get("steps", -1)) >= int(results.get("total_steps", 0)) else "resume"


def _stage1_moved_on(run: Run) -> bool:
  """True if the stage-1 run of a finished stage-2 run has been trained further since."""
  with open(os.path.join(run.directory, RESULTS_FILE), encoding="utf-8") as f:
    used = json.load(f).get("stage1", {}).get("step")
  with open(os.path.join(run.config.stage1_workdir, RESULTS_FILE), encoding="utf-8") as f:
    return used != json.load(f).get("steps")


def execute_run(run: Run) -> dict:
  """Trains (or resumes) one run; its summary goes to <dir>/summary.txt, not the terminal."""
  from experiments import stage2  # pylint: disable=g-import-not-at-top
  from experiments import trainer  # pylint: disable=g-import-not-at-top
  os.makedirs(run.directory, exist_ok=True)
  with open(os.path.join(run.directory, "summary.txt"), "w", encoding="utf-8") as out, \
      contextlib.redirect_stdout(out):
    if run.stage == 2:
      return stage2.train_stage2(run.config, run.directory)
    return trainer.train_and_evaluate(run.config, run.directory)


def read_results(run: Run) -> dict:
  with open(os.path.join(run.directory, RESULTS_FILE), encoding="utf-8") as f:
    return json.load(f)


# ---------------------------------------------------------------------------- the numbers


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
  """Mean and sample standard deviation (n - 1); None for one value."""
  values = np.asarray(values, np.float64)
  return float(values.mean()), (float(values.std(ddof=1)) if len(values) > 1 else None)


def aggregate(table_runs: Sequence[Run], results: dict[str, dict]) -> list[dict]:
  """One row per (imbalance factor, method): mean/std over seeds of test top-1 in %.

  `results` maps a run directory to its results.json payload. Each row:
  {"imbalance", "key", "label", "seeds", "final": {group: (mean, std)}, "best_val": ...};
  a group with no classes (None in results.json) gives None.
  """
  rows, order = {}, []
  for run in table_runs:
    row_key = (run.imbalance, run.spec.key)
    if row_key not in rows:
      rows[row_key] = {"imbalance": run.imbalance, "key": run.spec.key, "label": run.spec.label,
                       "seeds": [], "dirs": []}
      order.append(row_key)
    rows[row_key]["seeds"].append(run.seed)
    rows[row_key]["dirs"].append(run.directory)
  out = []
  for row_key in order:
    row = rows[row_key]
    for block, name in (("final_test", "final"), ("best_val_test", "best_val"),
                        ("max_test", "max_test")):
      row[name] = {}
      for group in GROUPS:
        # max_test: the public code's maximum test accuracy over epochs (older runs lack it).
        values = [(results[d].get(block) or {}).get(group) for d in row["dirs"]]
        row[name][group] = (None if any(v is None for v in values)
                            else mean_std([100.0 * v for v in values]))
    out.append(row)
  return out


def _cell(value) -> str:
  if value is None:
    return "n/a"
  mean, std = value
  return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def format_tables(rows: Sequence[dict], header: str) -> str:
  """table.md: the final-epoch table, then the best-validation-epoch table."""
  lines = [header.rstrip(), ""]
  for name, title in (("final", "Test top-1 (%) at the final epoch"),
                      ("best_val", "Test top-1 (%) at the best-validation epoch "
                                   "(epoch chosen on the meta/validation set, never on test)")):
    lines += [f"## {title}", "",
              "| imbalance | method | seeds | overall | many | medium | few |",
              "|---:|---|---:|---:|---:|---:|---:|"]
    for row in rows:
      cells = [f"{row['imbalance']:g}", row["label"], str(len(row["seeds"]))]
      cells += [_cell(row[name][g]) for g in GROUPS]
      lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
  return "\n".join(lines)


# ---------------------------------------------------------------------------- plots


def plot_class_weights(path: str, table_runs: Sequence[Run], results: dict[str, dict]) -> bool:
  """Final class weights vs training images and vs validation accuracy; False if nothing to plot."""
  keys = [k for k in WEIGHT_PLOT_METHODS if any(r.spec.key == k for r in table_runs)]
  rhos = sorted({r.imbalance for r in table_runs})
  if not keys:
    return False
  fig, axes = plots.figure(11.0, 3.6 * len(rhos), len(rhos), 2)
  colors = ("tab:blue", "tab:orange", "tab:purple", "tab:green", "tab:red")
  for i, rho in enumerate(rhos):
    ax_n, ax_a = axes[i]
    for key, color in zip(keys, colors):
      runs = [r for r in table_runs if r.spec.key == key and r.imbalance == rho]
      if not runs:
        continue
      weights = np.array([results[r.directory]["history"]["class_weights"][-1] for r in runs])
      accuracy = np.array([results[r.directory]["history"]["val_per_class"][-1] for r in runs])
      counts = np.array(results[runs[0].directory]["class_counts"], np.float64)
      label = f"{runs[0].spec.label} ({len(runs)} seeds)"
      for w, a in zip(weights, accuracy):
        ax_n.scatter(counts, w, s=10, alpha=0.35, color=color)
        ax_a.scatter(100 * a, w, s=10, alpha=0.35, color=color)
      order = np.argsort(counts)
      ax_n.plot(counts[order], weights.mean(0)[order], color=color, marker="o", ms=4, lw=1.2,
                label=label)
      ax_a.scatter(100 * accuracy.mean(0), weights.mean(0), color=color, s=30, marker="D",
                   label=label)
    for ax in (ax_n, ax_a):
      ax.axhline(1.0, color="k", lw=0.7, ls=":")
      ax.set_ylabel("class weight w_c (end of training)")
    ax_n.set_xscale("log")
    ax_n.set_xlabel("training images n_c (log)")
    ax_a.set_xlabel("validation accuracy a_c (%)")
    ax_n.set_title(f"rho = {rho:g}: weight vs class frequency")
    ax_a.set_title(f"rho = {rho:g}: weight vs validation accuracy")
    ax_n.legend(fontsize=7)
  fig.suptitle("Class weights at the end of training (dots: one seed; lines/diamonds: seed means)",
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path)
  return True


def plot_accuracy(path: str, rows: Sequence[dict]) -> None:
  """Horizontal bars: final-epoch overall accuracy (± std) by method, few-shot as diamonds."""
  rhos = sorted({r["imbalance"] for r in rows})
  labels = list(dict.fromkeys(r["label"] for r in rows))
  fig, axes = plots.figure(4.2 * len(rhos) + 2.5, 0.35 * len(labels) + 1.6, 1, len(rhos))
  for j, rho in enumerate(rhos):
    ax = axes[0, j]
    by_label = {r["label"]: r for r in rows if r["imbalance"] == rho}
    y = np.arange(len(labels))
    for k, label in enumerate(labels):
      row = by_label.get(label)
      if row is None or row["final"]["overall"] is None:
        continue
      mean, std = row["final"]["overall"]
      ax.barh(k, mean, xerr=std or 0.0, color="tab:blue", alpha=0.7,
              label="overall" if k == 0 else None)
      if row["final"]["few"] is not None:
        ax.scatter(row["final"]["few"][0], k, color="tab:red", marker="D", s=18, zorder=3,
                   label="few-shot" if k == 0 else None)
    ax.set_yticks(y)
    ax.set_yticklabels(labels if j == 0 else [""] * len(labels), fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("test top-1 (%), final epoch")
    ax.set_title(f"rho = {rho:g}", loc="left")
    if j == 0:
      ax.legend(fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, frameon=False)
  fig.tight_layout()
  fig.savefig(path)


# ---------------------------------------------------------------------------- driver


def enable_compilation_cache(directory: str) -> None:
  """JAX's persistent compilation cache in `directory`, for every compilation (jax 0.10 names)."""
  import jax  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def load_config_file(path: str) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(f"compare_config_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def default_stage2_config_path(config_path: str) -> str | None:
  """<config>_stage2.py next to the stage-1 config file, if there is one."""
  candidate = config_path[:-3] + "_stage2.py" if config_path.endswith(".py") else ""
  return candidate if candidate and os.path.isfile(candidate) else None


def run_grid(base, workdir: str, *, method_keys: Sequence[str] = DEFAULT_METHODS,
             seeds: Sequence[int] = (0, 1, 2), imbalance_factors: Sequence[float] = (10, 50, 100),
             stage2_section=None, num_epochs: int = 0, stage2_epochs: int = 0, max_steps: int = 0,
             compilation_cache: str | None = "", log=print, header_note: str = "") -> dict:
  """Runs (or resumes) the grid in this process and writes table.md, grid.json and the plots.

  compilation_cache: a directory, "" for <workdir>/jax_cache, None for no cache.
  Returns grid.json's payload.
  """
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  if compilation_cache is not None:
    enable_compilation_cache(compilation_cache or os.path.join(workdir, "jax_cache"))
  execute, table_runs = plan_grid(base, workdir, method_keys, seeds, imbalance_factors,
                                  stage2_section=stage2_section, max_steps=max_steps,
                                  num_epochs=num_epochs, stage2_epochs=stage2_epochs)
  statuses = [run_status(run) for run in execute]  # fail on a mismatched directory before training
  log(f"Grid: {len(table_runs)} table runs ({len(execute)} to have), "
      f"{sum(s == 'finished' for s in statuses)} already finished; workdir {workdir}")
  timings = []
  grid_start = time.time()
  for i, (run, status) in enumerate(zip(execute, statuses), 1):
    if status == "finished" and run.stage == 2 and _stage1_moved_on(run):
      status = "resume"  # train_stage2 then stops with an error that names the directory
    if status == "finished":
      log(f"[{i}/{len(execute)}] rho={run.imbalance:g} seed={run.seed} {run.spec.label}: finished, skipped")
      continue
    start = time.time()
    results = execute_run(run)
    wall = time.time() - start
    timings.append({"directory": run.directory, "key": run.spec.key, "stage": run.stage,
                    "imbalance": run.imbalance, "seed": run.seed, "wall_s": wall,
                    "steps": results["steps"] - results["start_step"]})
    final = results["final_test"] or {}
    log(f"[{i}/{len(execute)}] rho={run.imbalance:g} seed={run.seed} {run.spec.label}: "
        f"{wall:.1f} s, {results['steps'] - results['start_step']} steps, final test "
        f"{100 * final.get('overall', float('nan')):.2f}%")
  results = {run.directory: read_results(run) for run in execute}
  rows = aggregate(table_runs, results)
  settings = _settings_text(execute, results, seeds, imbalance_factors, header_note)
  with open(os.path.join(workdir, TABLE_FILE), "w", encoding="utf-8") as f:
    f.write(format_tables(rows, settings))
  plots = {"accuracy": os.path.join(workdir, ACCURACY_PLOT)}
  plot_accuracy(plots["accuracy"], rows)
  if plot_class_weights(os.path.join(workdir, WEIGHTS_PLOT), table_runs, results):
    plots["class_weights"] = os.path.join(workdir, WEIGHTS_PLOT)
  payload = {
      "rows": [{k: v for k, v in row.items()} for row in rows],
      "runs": [{"directory": r.directory, "key": r.spec.key, "label": r.spec.label,
                "stage": r.stage, "imbalance": r.imbalance, "seed": r.seed,
                "wall_time_s": results[r.directory].get("wall_time_s")} for r in execute],
      "timings_this_invocation": timings,
      "wall_time_this_invocation_s": time.time() - grid_start,
      "estimate": estimate_grid_time(timings + [
          {"key": r.spec.key, "stage": r.stage, "wall_s": results[r.directory]["wall_time_s"]}
          for r in execute if r.directory not in {t["directory"] for t in timings}
          and results[r.directory].get("wall_time_s")]),
      "plots": plots,
      "table": os.path.join(workdir, TABLE_FILE),
  }
  with open(os.path.join(workdir, GRID_FILE), "w", encoding="utf-8") as f:
    json.dump(payload, f, indent=1)
  log(f"table: {payload['table']}\nplots: {', '.join(plots.values())}")
  if payload["estimate"]:
    log("timing: " + payload["estimate"]["text"])
  return payload


def estimate_grid_time(timings: Sequence[dict], seeds: int = 3, imbalance_factors: int = 3,
                       methods: Iterable[str] = DEFAULT_METHODS) -> dict | None:
  """Wall time of the default full grid from measured runs (None if there are none).

  `timings`: {"key", "stage", "wall_s"} of the runs of this invocation (timed
  around the call) and of the skipped ones (their results.json wall time).
  Each method's runs are costed at the median of its own runs, or of all runs
  of its stage when it has none.
  """
  if not timings:
    return None
  by_stage = {s: [t["wall_s"] for t in timings if t["stage"] == s] for s in (1, 2)}
  total = 0.0
  for key in methods:
    stage = 2 if "+" in key else 1
    own = [t["wall_s"] for t in timings if t["key"] == key]
    pool = own or by_stage[stage]
    if not pool:  # nothing of this stage ran: no estimate
      return None
    total += float(np.median(pool)) * seeds * imbalance_factors
  med1 = float(np.median(by_stage[1])) if by_stage[1] else None
  med2 = float(np.median(by_stage[2])) if by_stage[2] else None
  measured = ", ".join(f"{m:.1f} s per stage-{k} run" for k, m in ((1, med1), (2, med2))
                       if m is not None)
  text = (f"median {measured} here; the default grid ({len(tuple(methods))} methods x {seeds} "
          f"seeds x {imbalance_factors} imbalance factors) about {total / 60:.1f} min")
  return {"median_stage1_s": med1, "median_stage2_s": med2, "full_grid_s": total, "text": text}


def _settings_text(execute: Sequence[Run], results: dict, seeds, imbalance_factors, note: str) -> str:
  first = execute[0].config
  stage2_runs = [r for r in execute if r.stage == 2]
  lines = [f"# Comparison on {results[execute[0].directory]['data']['name']} (long-tailed)", "",
           f"Seeds {', '.join(str(s) for s in seeds)}; imbalance factors "
           f"{', '.join(f'{float(r):g}' for r in imbalance_factors)}. Every method: model "
           f"{first.model}, {first.num_epochs} epochs (warm-up {first.warmup_epochs}, lr x"
           f"{first.lr_decay_factor} at {tuple(first.lr_decay_epochs)}), batch {first.batch_size}, "
           f"lr {first.learning_rate}" + (f", stopped at max_steps={first.max_steps}"
                                          if int(first.max_steps) else "") + ".",
           ]
  if stage2_runs:
    s = stage2_runs[0].config.stage2
    lines.append(f"Stage 2: {s.num_epochs} epochs, batch {s.batch_size}, lr {s.learning_rate} "
                 f"(cosine), {s.sampler} sampling, BatchNorm "
                 f"{'re-estimated' if s.shift_bn else 'frozen'}, LAS rule {s.las_rule}"
                 + (f", stopped at max_steps={s.max_steps}" if int(s.max_steps) else "") + ".")
  lines += ["", "Mean ± sample standard deviation over seeds (a single seed shows the value "
            "alone); many / medium / few: mean per-class accuracy over the shot groups of the "
            "training counts. Computed from each run's results.json. A seed sets config.seed "
            "(initialisation, data order, meta batches); the data split (data.seed) is the same "
            "for all. No hyperparameter was tuned for this table (on test or on validation).",
            "", "Methods (config overrides of the runner):", ""]
  seen = set()
  for run in execute:
    if run.spec.key in seen:
      continue
    seen.add(run.spec.key)
    if run.stage == 1:
      what = ", ".join(f"{k}={v}" for k, v in run.spec.overrides)
    else:
      what = (f"stage 2 ({run.spec.stage2_method}) from the stage-1 runs of "
              f"{STAGE1_METHODS[run.spec.stage1].label}")
    lines.append(f"- {run.spec.label}: {what}")
  lines.append("")
  if note:
    lines += [note, ""]
  return "\n".join(lines)


def define_flags() -> None:
  """Defines the command-line flags that `main` reads (`python -m experiments.compare` calls it)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file(
      "config", None, "Stage-1 experiment config (experiments/configs/*.py); --config.x=y "
      "overrides apply to every run.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory of the grid (one subdirectory per run).")
  flags.DEFINE_string("methods", ",".join(DEFAULT_METHODS),
                      "Comma-separated method keys (see the module docstring).")
  flags.DEFINE_string("seeds", "0,1,2", "Comma-separated seeds (config.seed).")
  flags.DEFINE_string("imbalance", "10,50,100",
                      "Comma-separated imbalance factors (config.data.imbalance_factor).")
  flags.DEFINE_string(
      "stage2_config", "", "Config file whose stage2 section the stage-2 runs use (default: "
      "<config>_stage2.py next to --config, else experiments/configs/_stage2.py's defaults).")
  flags.DEFINE_integer("num_epochs", 0, "Stage-1 epochs for every method (0 = the config's); "
                       "warm-up and decay epochs scale alike.")
  flags.DEFINE_integer("stage2_epochs", 0, "Stage-2 epochs (0 = the config's).")
  flags.DEFINE_integer("max_steps", 0, "Stop every run (stage 1 and 2) after this many steps "
                       "(0 = no limit; for smoke tests).")
  flags.DEFINE_string("compilation_cache", "", "Persistent compilation cache directory "
                      "('' = <workdir>/jax_cache, 'none' = off).")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  """The command line: flags -> `run_grid`; a runner error prints its message and exit code."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from experiments import errors  # pylint: disable=g-import-not-at-top
  del argv
  f = flags.FLAGS
  if "methods" not in f or "stage2_epochs" not in f:
    raise app.UsageError("experiments.compare.main reads its command-line flags: call "
                         "experiments.compare.define_flags() before absl's app.run(main), or use "
                         "run_grid(...) from Python.")
  if not f["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # per-run progress is printed below instead
  config_path = config_flags.get_config_filename(f["config"])
  stage2_path = f.stage2_config or default_stage2_config_path(config_path)
  section = load_config_file(stage2_path).stage2 if stage2_path else None
  methods_list = [m.strip() for m in f.methods.split(",") if m.strip()]
  command = (f"Command: python -m experiments.compare --config={config_path} "
             f"--methods={','.join(methods_list)} --seeds={f.seeds} --imbalance={f.imbalance}"
             + (f" --stage2_config={stage2_path}" if stage2_path else ""))
  try:
    run_grid(f.config, f.workdir, method_keys=methods_list,
             seeds=[int(s) for s in f.seeds.split(",")],
             imbalance_factors=[float(r) for r in f.imbalance.split(",")],
             stage2_section=section, num_epochs=f.num_epochs, stage2_epochs=f.stage2_epochs,
             max_steps=f.max_steps,
             compilation_cache=None if f.compilation_cache == "none" else f.compilation_cache,
             log=lambda line: print(line, flush=True), header_note=command)
  except errors.RunError as e:  # the runner's message says what to do (experiments/errors.py)
    print(f"{type(e).__name__}: {e}", flush=True)
    return e.exit_code
  return 0


if __name__ == "__main__":
  from absl import app as _app
  define_flags()
  _app.run(main)
