"""pmap over 8 fake CPU devices equals one device on the same global batch (float64)."""

import numpy as np
import pytest

import dnet_jax as dj
from dnet_jax import parallel


@pytest.fixture(scope="module")
def pmap_results(eight_device_results):
  """pmap_equivalence_worker.py's results (one process with test_mesh.py's: tests/conftest.py;
  the synchronised-BatchNorm cases come from mesh_equivalence_worker.equivalence)."""
  return eight_device_results["pmap"]


@pytest.mark.parametrize("case", ["no_batchnorm/nested", "no_batchnorm/jvp",
                                  "synced_batchnorm/nested", "synced_batchnorm/jvp"])
def test_pmap_step_equals_single_device_step(pmap_results, case):
  r = pmap_results[case]
  assert r["devices"] == 8
  assert r["dnet_moved"] > 1e-6  # the comparison covers a real Difficulty-Net update
  for key in ("params", "dnet_params", "batch_stats", "metrics"):
    assert r[key] < 1e-12, (key, r[key])
  assert r["eval_counts"] == 0.0


def test_per_device_batchnorm_is_a_different_model(pmap_results):
  """Negative control: without synchronised BatchNorm the pmapped step differs."""
  r = pmap_results["per_device_batchnorm/nested"]
  assert r["params"] > 1e-6 and r["dnet_params"] > 1e-6


def test_shard_batch_rejects_indivisible_batch():
  with pytest.raises(ValueError, match="divisible by 1|evenly"):
    # One device here, so use a scalar leaf to trigger the same check.
    parallel.shard_batch({"label": np.int32(3)})


def test_shard_and_replicate_shapes():
  batch = {"image": np.zeros((4, 2, 2, 1), np.float32), "label": np.arange(4, dtype=np.int32)}
  sharded = parallel.shard_batch(batch)
  n = len(parallel.local_devices())
  assert sharded["image"].shape == (n, 4 // n, 2, 2, 1)
  rep = parallel.replicate({"a": np.ones(3)})
  assert rep["a"].shape == (n, 3)
  np.testing.assert_array_equal(parallel.unreplicate(rep)["a"], np.ones(3))
