"""experiments.augment_benchmark: the throughput numbers are produced for every stage."""

from experiments import augment_benchmark


def test_augment_throughput_reports_every_stage():
  results = augment_benchmark.augment_throughput(batch_size=4, batches=1, image_size=32)
  assert set(results) == {"crop_flip", "autoaugment", "cutout", "public_train_transform"}
  assert all(rate > 0 for rate in results.values())


def test_step_benchmark_prints_host_transform_rate_and_cores_next_to_each_step():
  from experiments import benchmark_report as benchmark

  rate = benchmark.host_transform_rate(batch_size=4, image_size=32, batches=1)
  assert rate > 0
  rows = [{"variant": "ce", "compile_s": 1.0, "step_s": 0.01, "process_cpu_s": 0.02,
           "images_per_s": 4 * rate, "ratio_to_ce": 1.0, "gflop": None, "peak_memory_gib": None}]
  table = benchmark.format_table(rows, "header", host_rate=rate)
  header, line = table.splitlines()[1:3]
  assert "aug img/s/core" in header and "cores" in header
  assert line.split()[-1] == "4.0"  # a step at 4x the per-core rate needs 4 cores
  assert "aug" not in benchmark.format_table(rows, "header")
