"""The ImageNet-LT, Places-LT and generic split-list configs run through the real runner.

Each config is run for one step by `trainer.train_and_evaluate` on generated
JPEG split lists (4 classes, 32x32 crops), streamed from disk as in a real
run: the config's own model depth, method, Difficulty-Net widths, optimizer
and schedule, with the global batch and the ResNet width reduced so that XLA
compiles it in seconds on CPU (the base width is the only change to the
model; depth and block type are the config's). Places-LT starts from a
generated "pretrained" .npz with another class count, so the head is
re-initialised; with learning rate 0 the checkpointed parameters after the
step must then equal the file's everywhere but in the head.
"""

from __future__ import annotations

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from dnet_jax.models import build_classifier
from dnet_jax.models import pretrained
from dnet_jax.state import create_train_state
from experiments import experiment
from experiments import pretrained_init
from experiments import trainer
from experiments.configs import imagenet_lt
from experiments.configs import places_lt
from experiments.configs import places_lt_public
from experiments.configs import split_list_lt
from experiments.errors import InvalidInputError
from tests import split_list_data

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                                 reason="tensorflow is not installed"),
              pytest.mark.usefixtures("fast_compilation")]  # tests/conftest.py

NUM_CLASSES = 4
TRAIN_COUNTS = [10, 6, 4, 3]
META_PER_CLASS, TEST_PER_CLASS = 2, 2
WIDTH = 8  # ResNet base width (64 in the real models)
IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def lists(tmp_path_factory):
  return split_list_data.write_split_lists(tmp_path_factory.mktemp("lt_lists"), TRAIN_COUNTS,
                                           META_PER_CLASS, TEST_PER_CLASS)


@pytest.fixture
def narrow_models(monkeypatch):
  """The runner builds the config's ResNet with base width WIDTH instead of 64."""
  monkeypatch.setattr(experiment, "build_classifier",
                      lambda name, n, **kw: build_classifier(name, n, **dict(kw, width=WIDTH)))


def tiny(config, lists, **overrides):
  split_list_data.apply_to_config(config, lists, num_classes=NUM_CLASSES, image_size=IMAGE_SIZE)
  config.batch_size, config.meta_batch_size, config.eval_batch_size = 4, 4, 8
  config.many_threshold, config.few_threshold = 5, 4
  config.num_epochs, config.max_steps = 1, 1
  config.log_every_steps, config.progress_bar = 1, False
  if config.data.get("meta_per_class", 0):  # the public recipes' 10 per class: all 2 here
    config.data.meta_per_class = META_PER_CLASS
  for key, value in overrides.items():
    config[key] = value
  return config


def check_results(results, config):
  assert results["steps"] == 1
  assert results["data"]["name"] == config.data.name
  assert results["data"]["class_counts"] == TRAIN_COUNTS
  assert results["data"]["num_meta"] == NUM_CLASSES * META_PER_CLASS
  assert results["data"]["num_test"] == NUM_CLASSES * TEST_PER_CLASS
  assert results["data"]["shot_groups"] == {"many": [0, 1], "medium": [2], "few": [3]}
  assert len(results["per_class_test_accuracy"]) == NUM_CLASSES
  assert np.isfinite(results["history"]["train_loss"][-1])
  assert 0.0 <= results["final_test"]["overall"] <= 1.0


def random_variables(model, seed: int):
  """Random variables of `model` in its own tree structure, without compiling its init."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3))))
  rng = np.random.default_rng(seed)
  variables = jax.tree.map(lambda s: (0.05 * rng.normal(size=s.shape)).astype(s.dtype), shapes)
  # Positive BatchNorm variances, as a trained network has.
  variables["batch_stats"] = jax.tree.map(lambda v: 1.0 + np.abs(v), variables["batch_stats"])
  return variables


def read_loop_record(workdir, step) -> dict:
  """The `Progress` JSON saved with checkpoint `step` (experiments/loop.py)."""
  directory = os.path.join(workdir, "checkpoints", str(step), "loop")
  for root, _, files in os.walk(directory):
    for name in files:
      try:
        with open(os.path.join(root, name), encoding="utf-8") as f:
          record = json.load(f)
      except (ValueError, UnicodeDecodeError):
        continue
      if isinstance(record, dict) and "extra" in record:
        return record
  raise AssertionError(f"no Progress record under {directory}")


def read_checkpoint(workdir, step):
  with ocp.StandardCheckpointer() as reader:
    return jax.device_get(reader.restore(os.path.join(workdir, "checkpoints", str(step),
                                                      "state")))


# The deep models use the public code's driver-only meta-gradient here only because the
# nested second-order step of ResNet-50/152 takes XLA minutes to compile on CPU; the nested
# one runs on ResNet-10 (split_list_lt) and is tested against finite differences elsewhere.
# imagenet_lt_public.py runs killed and resumed in tests/test_public_stage1.py (ResNet-10).
def test_imagenet_lt_config_runs_a_step(tmp_path, lists, narrow_models):
  config = tiny(imagenet_lt.get_config(), lists, meta_grad="driver_only")
  assert (config.model, config.method, tuple(config.dnet.hidden)) == (
      "resnet50", "difficulty_net_bs", (1024, 1024))
  check_results(trainer.train_and_evaluate(config, str(tmp_path / "run")), config)


def test_split_list_config_runs_a_step(tmp_path, lists, narrow_models):
  config = tiny(split_list_lt.get_config(), lists)
  config.data.num_classes = 0  # inferred from the lists
  assert config.meta_grad == "nested" and config.model == "resnet10"
  check_results(trainer.train_and_evaluate(config, str(tmp_path / "run")), config)


# Both run at ResNet-50, which compiles 3x faster than ResNet-152; the loading is the same at
# every depth, and ResNet-152's own keys (10+ blocks per stage: stage3_block1 vs
# stage3_block10) are loaded without compiling in the test below.
@pytest.mark.parametrize("module,depth,layers", [(places_lt, "resnet50", 120),
                                                 (places_lt_public, "resnet50", 120)],
                         ids=["ours", "public"])
def test_places_lt_config_starts_from_pretrained_weights(tmp_path, lists, narrow_models, module,
                                                         depth, layers):
  # "ImageNet" weights: the same ResNet with a 10-class head, random but not the run's init.
  path = str(tmp_path / f"{depth}_pretrained.npz")
  pretrained.save_variables_npz(
      path, random_variables(build_classifier(depth, 10, width=WIDTH), seed=123))

  config = tiny(module.get_config(), lists, meta_grad="driver_only", pretrained_path=path,
                learning_rate=0.0)  # lr 0: the step leaves the parameters as loaded
  assert (config.model, tuple(config.dnet.hidden)) == ("resnet152", (512, 512))
  config.model = depth
  assert (config.method, config.meta_grad) == ("difficulty_net", "driver_only")
  workdir = str(tmp_path / "run")
  check_results(trainer.train_and_evaluate(config, workdir), config)

  saved = pretrained.flatten_variables({"params": read_checkpoint(workdir, 1)["params"]})
  loaded = pretrained.read_npz(path)
  assert saved["params/classifier/kernel"].shape == (32 * WIDTH, NUM_CLASSES)  # new head
  new = ("params/classifier/", "params/extra_block/")
  body = [k for k in saved if not k.startswith(new)]
  assert len(body) > layers  # every conv and BatchNorm of the network
  for key in body:
    np.testing.assert_array_equal(saved[key], loaded[key], err_msg=key)
  # The accuracy vector: public, refreshed from the initial network before step 0 (and not
  # again within the one step); ours, zeros until the first epoch end.
  state, extra = read_checkpoint(workdir, 1), read_loop_record(workdir, 1)["extra"]
  if module is places_lt_public:
    initial = np.asarray(extra["initial_val_per_class"], np.float32)
    np.testing.assert_array_equal(state["class_accuracy"], initial)
    assert initial.shape == (NUM_CLASSES,) and initial.sum() > 0
  else:
    assert "initial_val_per_class" not in extra and not np.any(state["class_accuracy"])
  if module is places_lt_public:  # the surgery: layer4.2 not loaded, the new block at its init
    assert not any(k.startswith("params/stage4_block3/") for k in saved)
    assert any(k.startswith("params/stage4_block3/") for k in loaded)
    assert "params/classifier/bias" not in saved  # cosine head
    for name in ("bn1", "bn2", "bn3"):
      np.testing.assert_array_equal(saved[f"params/extra_block/{name}/scale"], 1.0)
      np.testing.assert_array_equal(saved[f"params/extra_block/{name}/bias"], 0.0)
    kernel = saved["params/extra_block/conv2/kernel"]
    assert kernel.shape == loaded["params/stage4_block2/conv2/kernel"].shape
    assert not np.array_equal(kernel, loaded["params/stage4_block2/conv2/kernel"])
  else:
    assert not any(k.startswith("params/extra_block/") for k in saved)


@pytest.mark.parametrize("model,dropped", [("resnet152", ()),
                                           ("resnet152_places", ("stage4_block3",))])
def test_resnet152_pretrained_keys_load_one_to_one(tmp_path, model, dropped):
  """Every ResNet-152 array of the file lands on the array of the same name (36 blocks in
  stage 3: a prefix match of stage3_block1 against stage3_block10 would mix them up); the
  Places surgery drops layer4's last block and keeps the new block and the cosine head at
  their initial values. Eval-shaped variables, nothing compiled."""
  path = str(tmp_path / "r152.npz")
  pretrained.save_variables_npz(
      path, random_variables(build_classifier("resnet152", 10, width=WIDTH), seed=123))
  target = random_variables(build_classifier(model, NUM_CLASSES, width=WIDTH), seed=5)
  new = ("extra_block",) if model == "resnet152_places" else ()
  params, stats, _ = pretrained.load_pretrained(
      path, target["params"], target["batch_stats"], new_names=new, dropped_names=dropped)
  saved = pretrained.flatten_variables({"params": params, "batch_stats": stats})
  initial = pretrained.flatten_variables(target)
  loaded = pretrained.read_npz(path)
  kept_initial = ("params/classifier/", *[f"{c}/{n}/" for n in new
                                          for c in ("params", "batch_stats")])
  body = [k for k in saved if not k.startswith(kept_initial)]
  assert len([k for k in body if k.startswith("params/stage3_block")]) > 36 * 6
  for key in body:
    np.testing.assert_array_equal(saved[key], loaded[key], err_msg=key)
  for key in (k for k in saved if k.startswith(kept_initial)):
    np.testing.assert_array_equal(saved[key], initial[key], err_msg=key)
  assert any(k.startswith("params/extra_block/") for k in saved) == bool(new)
  if dropped:
    assert not any(k.startswith("params/stage4_block3/") for k in saved)


def test_load_into_state_reinitialises_a_head_of_another_shape(tmp_path):
  model = build_classifier("resnet10", 3, width=4)
  tx = optax.sgd(0.1, momentum=0.9)
  sample = jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3))
  state = jax.jit(lambda k: create_train_state(k, model, tx, sample, 3))(jax.random.key(0))
  path = str(tmp_path / "weights.npz")
  pretrained.save_variables_npz(path, random_variables(build_classifier("resnet10", 5, width=4),
                                                       seed=1))
  new = pretrained_init.load_into_state(state, path, tx)
  flat_new = pretrained.flatten_variables({"params": new.params})
  flat_file, flat_old = pretrained.read_npz(path), pretrained.flatten_variables(
      {"params": state.params})
  for key, value in flat_new.items():
    expected = flat_old[key] if key.startswith("params/classifier/") else flat_file[key]
    np.testing.assert_array_equal(value, expected, err_msg=key)
  momentum = jax.tree.leaves(new.opt_state)
  assert all(not np.any(np.asarray(m)) for m in momentum)  # fresh optimizer state
  with pytest.raises(InvalidInputError, match="does not exist"):
    pretrained_init.load_into_state(state, str(tmp_path / "none.npz"), tx)
  pretrained.save_variables_npz(path, random_variables(build_classifier("resnet50", 5, width=4),
                                                       seed=2))
  with pytest.raises(InvalidInputError, match=r"into this model: .*shape mismatch"):
    pretrained_init.load_into_state(state, path, tx)
