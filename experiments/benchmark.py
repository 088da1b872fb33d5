r"""Step-time benchmark: plain CE, a fixed-weight baseline, and Difficulty-Net in each mode.

Times every step in ONE process, on the same data and parameters, so the ratios
to the plain CE step are fair even on a noisy shared machine.

  python -m experiments.benchmark                       # ResNet-32, CIFAR-100 shapes (~3-4 min, 2 CPU cores)
  python -m experiments.benchmark --model=resnet50 --image_size=224 --batch_size=256 \
      --meta_batch_size=256 --num_classes=1000          # on an accelerator
  python -m experiments.benchmark --model=small_cnn --image_size=8 --num_classes=10 \
      --steps=2 --warmup=1 --batch_size=16 --meta_batch_size=10   # smoke test

For each step it reports: compile time, median step time after warm-up,
train images/s, ratio to the plain CE step, XLA's FLOP count, and peak device
memory where the backend reports it. With `--host_transform=public_cifar` (the
public CIFAR recipe's AutoAugment + Cutout, run on the host) it also times that
transform on one thread and prints its images/s per CPU core next to each
step's images/s, and the cores a loader needs to keep that step fed
(`host_workers` threads in the runner). `--cpu_flags` chooses XLA:CPU settings
(see `experiments.platform_flags`); the table header prints what ran.
"""

from __future__ import annotations

import json
import os
import statistics
import time

from absl import app, flags

from experiments.benchmark_report import format_table, host_transform_rate

_MODEL = flags.DEFINE_string("model", "resnet32", "Classifier: resnet32 | small_cnn | resnet50 | ...")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 100, "Number of classes.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 32, "Square image side.")
_CHANNELS = flags.DEFINE_integer("channels", 3, "Image channels.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Train batch (global).")
_META_BATCH = flags.DEFINE_integer("meta_batch_size", 100, "Meta batch (global).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per variant (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps after compiling.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_VARIANTS = flags.DEFINE_list(
    "variants", ["ce", "class_balanced", "dnet_nested", "dnet_jvp", "dnet_driver_only",
                 "dnet_nested_k5"], "Which steps to time.")
_META_INTERVAL = flags.DEFINE_integer("meta_interval", 5, "k of the dnet_*_k<k> variants.")
_CPU_FLAGS = flags.DEFINE_string("cpu_flags", "default",
                                 "XLA:CPU preset from experiments.platform_flags.CPU_PRESETS, or 'none'.")
_OUTPUT = flags.DEFINE_string("output", "", "Write the results as JSON here.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed.")
_HOST_TRANSFORM = flags.DEFINE_enum("host_transform", "none", ["none", "public_cifar"],
                                    "Also time this host transform (images/s per core).")


def _variant_kwargs(name: str, meta_interval: int):
  """(kind, extra kwargs) of a variant name such as dnet_nested_k5 or dnet_jvp_remat."""
  if name in ("ce", "class_balanced"):
    return name, {}
  if not name.startswith("dnet_"):
    raise ValueError(f"Unknown variant {name!r}: use ce, class_balanced or dnet_<mode>[_k<k>][_remat].")
  parts = name[len("dnet_"):].split("_")
  kwargs = {"remat": "remat" in parts}
  parts = [p for p in parts if p != "remat"]
  if parts and parts[-1].startswith("k") and parts[-1][1:].isdigit():
    kwargs["meta_interval"] = int(parts.pop()[1:])
  mode = "_".join(parts)
  kwargs["meta_grad"] = mode
  return "dnet", kwargs


def run_benchmark(*, model_name, num_classes, image_size, channels, batch_size, meta_batch_size,
                  steps, warmup, dtype, variants, seed=0):
  """Times each variant; returns a list of result dicts (one per variant)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  import dnet_jax as dj
  from dnet_jax import parallel
  from dnet_jax.models import build_classifier

  compute_dtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
  devices = parallel.local_devices()
  n_dev = len(devices)
  if batch_size % n_dev or meta_batch_size % n_dev:
    raise ValueError(f"batch sizes ({batch_size}, {meta_batch_size}) must be divisible by the "
                     f"{n_dev} local devices.")
  bn_axis = parallel.AXIS_NAME if n_dev > 1 else None
  model = build_classifier(model_name, num_classes, bn_axis_name=bn_axis, dtype=compute_dtype)
  dnet = dj.DifficultyNet(num_classes, hidden=(128, 128), use_bias=False)
  steps_per_epoch = 100
  schedule = dj.warmup_step_schedule(0.1, steps_per_epoch)
  tx = dj.classifier_optimizer(schedule, weight_decay=2e-4)
  dnet_tx = dj.dnet_optimizer(1e-5)
  rng = np.random.default_rng(seed)
  shape = (image_size, image_size, channels)
  batch = {"image": rng.normal(size=(batch_size,) + shape).astype(np.float32),
           "label": rng.integers(0, num_classes, batch_size).astype(np.int32)}
  meta_batch = {"image": rng.normal(size=(meta_batch_size,) + shape).astype(np.float32),
                "label": (np.arange(meta_batch_size) % num_classes).astype(np.int32)}
  state = dj.create_train_state(jax.random.key(seed), model, tx, jnp.zeros((1,) + shape), num_classes,
                                dnet=dnet, dnet_tx=dnet_tx,
                                class_accuracy=jnp.asarray(rng.uniform(0, 1, num_classes), jnp.float32))
  sharded_batch = parallel.shard_batch(batch)
  sharded_meta = parallel.shard_batch(meta_batch)
  counts = np.maximum(np.round(500 * 100.0 ** (-np.arange(num_classes) / max(num_classes - 1, 1))), 1)

  results = []
  for name in variants:
    kind, kwargs = _variant_kwargs(name, 0)
    if kind == "ce":
      fn = parallel.pmap_baseline_step(model=model, tx=tx)
      args = (sharded_batch,)
    elif kind == "class_balanced":
      weights = dj.class_balanced_weights(counts)
      fn = parallel.pmap_baseline_step(model=model, tx=tx, class_weights_fn=lambda a: weights)
      args = (sharded_batch,)
    elif "meta_interval" in kwargs:
      interval = kwargs.pop("meta_interval")
      fn = parallel.pmap_meta_interval_step(interval, model=model, dnet=dnet, tx=tx,
                                            dnet_tx=dnet_tx, learning_rate=schedule, **kwargs)
      kwargs["meta_interval"] = interval
      args = (sharded_batch, sharded_meta)
    else:
      fn = parallel.pmap_train_step(model=model, dnet=dnet, tx=tx, dnet_tx=dnet_tx,
                                    learning_rate=schedule, **kwargs)
      args = (sharded_batch, sharded_meta)
    replicated = parallel.replicate(state)
    if isinstance(fn, parallel.MetaIntervalStep):  # two executables; compiled on first use
      t0 = time.perf_counter()
      for _ in range(fn.interval):
        replicated, _ = fn(replicated, *args)
      jax.block_until_ready(replicated)
      compile_s, flops = time.perf_counter() - t0, None
    else:
      t0 = time.perf_counter()
      compiled = fn.lower(replicated, *args).compile()
      compile_s = time.perf_counter() - t0
      flops = _flops(compiled)
      fn = compiled  # call the executable we just compiled (and timed)
    current = replicated
    for _ in range(warmup):
      current, metrics = fn(current, *args)
    jax.block_until_ready(current)
    times, cpu_times = [], []
    # A meta-interval variant is timed over whole cycles of k steps, averaged per step.
    cycle = kwargs.get("meta_interval", 1)
    for _ in range(steps):
      t0, c0 = time.perf_counter(), time.process_time()
      for _ in range(cycle):
        current, metrics = fn(current, *args)
      jax.block_until_ready(current)
      times.append((time.perf_counter() - t0) / cycle)
      cpu_times.append((time.process_time() - c0) / cycle)
    loss = float(parallel.unreplicate(metrics)["train_loss"])
    if not np.isfinite(loss):
      raise FloatingPointError(f"{name}: non-finite loss {loss} in the benchmark.")
    step_s = statistics.median(times)
    results.append({
        "variant": name, "compile_s": compile_s, "step_s": step_s,
        # CPU seconds of this process per step: on a shared machine a steadier measure of work.
        "process_cpu_s": statistics.median(cpu_times),
        "images_per_s": batch_size / step_s, "gflop": flops / 1e9 if flops else None,
        "peak_memory_gib": _peak_memory_gib(devices[0]), "loss": loss,
    })
    del current, replicated
  ce = next((r["step_s"] for r in results if r["variant"] == "ce"), None)
  for r in results:
    r["ratio_to_ce"] = r["step_s"] / ce if ce else None
  return results


def _flops(compiled):
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) or None
  except Exception:  # cost analysis is best-effort and backend-dependent
    return None


def _peak_memory_gib(device):
  try:
    stats = device.memory_stats()
  except Exception:  # CPU and some backends report nothing
    return None
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return stats["peak_bytes_in_use"] / 2**30


def main(argv):
  del argv
  from experiments import platform_flags
  applied = platform_flags.configure_cpu(_CPU_FLAGS.value)  # before JAX creates its backend
  import jax

  results = run_benchmark(
      model_name=_MODEL.value, num_classes=_NUM_CLASSES.value, image_size=_IMAGE_SIZE.value,
      channels=_CHANNELS.value, batch_size=_BATCH.value, meta_batch_size=_META_BATCH.value,
      steps=_STEPS.value, warmup=_WARMUP.value, dtype=_DTYPE.value, variants=_VARIANTS.value,
      seed=_SEED.value)
  env = {
      "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
      "jax": jax.__version__, "cpu_count": os.cpu_count(),
      "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""), "cpu_preset": applied,
      "model": _MODEL.value, "num_classes": _NUM_CLASSES.value, "image_size": _IMAGE_SIZE.value,
      "batch_size": _BATCH.value, "meta_batch_size": _META_BATCH.value, "dtype": _DTYPE.value,
  }
  header = (f"backend={env['backend']} devices={len(env['devices'])} jax={env['jax']} "
            f"cpus={env['cpu_count']} preset={applied} XLA_FLAGS='{env['XLA_FLAGS']}'\n"
            f"model={env['model']} classes={env['num_classes']} image={env['image_size']} "
            f"batch={env['batch_size']} meta_batch={env['meta_batch_size']} dtype={env['dtype']}")
  host_rate = None
  if _HOST_TRANSFORM.value == "public_cifar":
    host_rate = host_transform_rate(_BATCH.value, _IMAGE_SIZE.value, seed=_SEED.value)
    env["host_transform"] = {"name": "public_cifar", "images_per_s_per_core": host_rate}
    header += f"\nhost transform public_cifar: {host_rate:.0f} images/s per core"
  print(format_table(results, header, host_rate))
  if _OUTPUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    with open(_OUTPUT.value, "w") as f:
      json.dump({"environment": env, "results": results}, f, indent=2)
    print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
