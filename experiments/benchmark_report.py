"""The step benchmark's table and the host-transform rate (no flags: importable anywhere).

`python -m experiments.benchmark` prints `format_table`; with a host transform
it adds that transform's images/s per core (`host_transform_rate`) and the cores
needed to feed each step.
"""

from __future__ import annotations

import time


def host_transform_rate(batch_size: int, image_size: int, batches: int = 5, seed: int = 0) -> float:
  """Images/s of the public CIFAR host transform on one thread (= per core), uint8 batches."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dnet_jax.data import public_cifar  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(batch_size, image_size, image_size, 3), dtype=np.uint8)
  public_cifar.public_train_transform(images, public_cifar.transform_rng(seed, 0, 0))  # warm up
  start = time.process_time()
  for b in range(batches):
    public_cifar.public_train_transform(images, public_cifar.transform_rng(seed, 0, b + 1))
  return batches * batch_size / max(time.process_time() - start, 1e-9)



def format_table(results, header: str, host_rate: float | None = None) -> str:
  """The table; with `host_rate` (host-transform images/s per core) two more columns: that
  rate and the cores the host transform needs to feed each step."""
  extra = f"{'aug img/s/core':>16}{'cores':>7}" if host_rate else ""
  lines = [header,
           f"{'variant':<22}{'compile s':>10}{'step s':>10}{'cpu s':>8}{'img/s':>10}{'x CE':>7}{'GFLOP':>9}{'peak GiB':>10}" + extra]
  for r in results:
    fmt = lambda v, f: (f % v) if v is not None else "-"
    line = (f"{r['variant']:<22}{r['compile_s']:>10.1f}{r['step_s']:>10.3f}{r['process_cpu_s']:>8.2f}"
            f"{r['images_per_s']:>10.0f}{fmt(r['ratio_to_ce'], '%.2f'):>7}"
            f"{fmt(r['gflop'], '%.1f'):>9}{fmt(r['peak_memory_gib'], '%.2f'):>10}")
    if host_rate:
      line += f"{host_rate:>16.0f}{r['images_per_s'] / host_rate:>7.1f}"
    lines.append(line)
  return "\n".join(lines)
