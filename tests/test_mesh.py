"""On 8 fake CPU devices (one subprocess, shared with test_parallel.py): jit + NamedSharding
equals one device and pmap with synchronised BatchNorm (float64); the README's pmap and mesh
recipes run as written; the chex.variants step test runs its pmap variant. Plus
single-process checks of pad_batch."""

import numpy as np
import pytest

import dnet_jax as dj


@pytest.fixture(scope="module")
def results(eight_device_results):
  """mesh_equivalence_worker.py's results (run with test_parallel.py's: tests/conftest.py)."""
  return eight_device_results["mesh"]


@pytest.mark.parametrize("mode", ["nested", "jvp"])
def test_mesh_step_equals_one_device_and_pmap(results, mode):
  r = results[f"equivalence/{mode}"]
  assert r["devices"] == 8 and r["params_sharding_replicated"]
  assert r["dnet_moved"] > 1e-6
  for other in ("mesh_vs_single", "mesh_vs_pmap"):
    for key, value in r[other].items():
      assert value < 1e-12, (other, key, value)


@pytest.mark.parametrize("recipe,shape", [("readme_pmap", [8, 10]), ("readme_mesh", [10])])
def test_readme_multi_device_recipes_run_as_written(results, recipe, shape):
  r = results[recipe]
  assert r["accuracy_shape"] == shape  # the refresh kept the state's layout
  assert r["rows_equal"] and r["meta_ce_finite"]
  assert r["step"] == 3 * 4
  assert 0.0 < r["accuracy_mean"] <= 1.0  # refreshed from the (padded) meta set


def test_chex_variants_pmap_ran(results):
  r = results["chex_variants"]  # its jit and un-jitted variants run in tests/test_model_errors.py
  assert r == {"run": 1, "failures": 0, "skipped": 0, "names": [
      "test_classifier_update_is_sgd_on_the_weighted_loss_of_the_new_weights__with_pmap"]}, r


def test_equinox_on_devices(results):
  r = results["equinox"]
  assert r["mesh_vs_single"] < 1e-12, r
  assert r["pmap_finite"] and r["pmap_accuracy_shape"] == [8, 3]


def test_pad_batch_masks_padding():
  batch = {"image": np.arange(5 * 2, dtype=np.float32).reshape(5, 2), "label": np.arange(5)}
  padded = dj.pad_batch(batch, 4)
  assert padded["image"].shape == (8, 2)
  np.testing.assert_array_equal(padded["mask"], [1, 1, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(padded["label"][5:], [4, 4, 4])
  again = dj.pad_batch(dict(padded), 3)  # an existing mask is kept and extended
  np.testing.assert_array_equal(again["mask"], [1, 1, 1, 1, 1, 0, 0, 0, 0])
  with pytest.raises(ValueError, match="same leading size 5"):
    dj.pad_batch({"image": np.zeros((4, 1)), "label": np.zeros(5)}, 2)


def test_masked_meta_batch_equals_the_unpadded_one():
  """Padding the meta batch changes neither the meta cross-entropy nor the meta-gradient."""
  import jax
  import jax.numpy as jnp
  from tiny_models import UserMLP, make_state, random_batch
  state, dnet, _, _ = make_state(UserMLP(3), 3)
  batch, meta_batch = random_batch(0, 6, 3), random_batch(1, 5, 3, balanced=True)
  problem = dj.MetaProblem(model=UserMLP(3), dnet=dnet)
  inputs = dj.MetaInputs(params=state.params, batch_stats={}, class_accuracy=state.class_accuracy,
                         batch=batch, meta_batch=meta_batch, learning_rate=jnp.float32(0.3))
  gradient = jax.jit(lambda i: dj.meta_gradient("nested", problem, state.dnet_params, i))
  plain = gradient(inputs)
  padded = gradient(inputs.replace(meta_batch=dj.pad_batch(meta_batch, 4)))
  np.testing.assert_allclose(padded[1]["meta_ce"], plain[1]["meta_ce"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8), padded[0],
               plain[0])
