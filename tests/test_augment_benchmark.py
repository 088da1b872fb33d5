"""experiments.augment_benchmark: the throughput numbers are produced for every stage."""

from experiments import augment_benchmark


def test_augment_throughput_reports_every_stage():
  results = augment_benchmark.augment_throughput(batch_size=4, batches=1, image_size=32)
  assert set(results) == {"crop_flip", "autoaugment", "cutout", "public_train_transform"}
  assert all(rate > 0 for rate in results.values())
