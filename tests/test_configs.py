"""Every experiment config loads, validates, and its classifier and Difficulty-Net initialise."""

from __future__ import annotations

import glob
import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dnet_jax.models import build_classifier, build_difficulty_net
from experiments import experiment
from experiments import methods

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "experiments", "configs")
CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
                      if not os.path.basename(p).startswith("_"))

# Input shape and number of classes of each data set a config may name.
_DATA_SHAPES = {"digits": ((8, 8, 1), 10), "cifar10": ((32, 32, 3), 10),
                "cifar100": ((32, 32, 3), 100), "imagenet_lt": ((224, 224, 3), 1000),
                "places_lt": ((224, 224, 3), 365),
                "split_list_lt": ((224, 224, 3), 10)}  # its classes come from the lists


def load_config(path):
  """Loads a config file by path and calls its get_config(), as `--config=path` does."""
  spec = importlib.util.spec_from_file_location(f"config_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_the_expected_configs_exist():
  names = {os.path.basename(p) for p in CONFIG_FILES}
  assert {"base.py", "digits_lt.py", "cifar10_lt.py", "cifar100_lt.py"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_config_loads_and_builds(path):
  config = load_config(path)
  methods.validate_config(config)
  assert config.method in methods.METHODS
  if os.path.basename(path) != "base.py":  # base.py only holds the defaults
    module_doc = open(path, encoding="utf-8").read()
    assert "python -m experiments.train --config=experiments/configs/" in module_doc, (
        "each config's docstring gives the exact command to run it")
  shape, num_classes = _DATA_SHAPES[config.data.name]
  model = build_classifier(config.model, num_classes, dtype=jnp.dtype(config.dtype),
                           **experiment.model_options(config))
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((2,) + shape), train=False))
  logits = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2,) + shape), train=False),
                          variables)
  assert logits.shape == (2, num_classes)

  dnet = build_difficulty_net(num_classes, kind=config.dnet.kind, hidden=tuple(config.dnet.hidden),
                              use_bias=config.dnet.use_bias)
  accuracy = jnp.linspace(0.0, 1.0, num_classes)
  dnet_params = dnet.init(jax.random.key(1), accuracy)
  difficulty = dnet.apply(dnet_params, accuracy)
  assert difficulty.shape == (num_classes,)
  assert bool(jnp.all((difficulty > 0) & (difficulty < 1)))


def test_resnet32_initialises_for_real():
  """ResNet-32 of the CIFAR configs initialises with concrete arrays on CPU (not just shapes)."""
  config = load_config(os.path.join(CONFIG_DIR, "cifar100_lt.py"))
  model = build_classifier(config.model, 100)
  variables = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                         train=False))()
  num_params = sum(x.size for x in jax.tree.leaves(variables["params"]))
  assert 0.4e6 < num_params < 0.5e6  # ResNet-32 for CIFAR-100: about 0.47M parameters


def test_paper_hyperparameters_in_cifar_configs():
  for name in ("cifar10_lt.py", "cifar100_lt.py"):
    c = load_config(os.path.join(CONFIG_DIR, name))
    assert (c.model, c.learning_rate, c.momentum, c.weight_decay, c.batch_size) == (
        "resnet32", 0.1, 0.9, 2e-4, 128)
    assert (c.num_epochs, c.warmup_epochs, tuple(c.lr_decay_epochs), c.lr_decay_factor) == (
        200, 5, (160, 180), 0.1)
    assert (tuple(c.dnet.hidden), c.dnet.use_bias, c.dnet.lr, c.dnet.weight_decay) == (
        (128, 128), False, 1e-5, 1e-4)
    assert (c.driver_weight, c.meta_batch_size, c.meta_grad, c.data.meta_per_class) == (
        0.3, 100, "nested", 25)
    assert (c.many_threshold, c.few_threshold) == (100, 20)


@pytest.mark.parametrize("field,value,match", [
    ("method", "mixup", "difficulty_net, difficulty_net_bs, ce"),
    ("meta_grad", "fd", "nested, jvp, driver_only"),
    ("lr_schedule", "poly", "step, cosine, cosine_epoch, constant"),
    ("model", "vit", "resnet32"),
])
def test_validate_config_lists_valid_choices(field, value, match):
  config = load_config(os.path.join(CONFIG_DIR, "digits_lt.py"))
  config[field] = value
  with pytest.raises(ValueError, match=match):
    methods.validate_config(config)


def test_cdb_tau_accepts_numbers_and_dynamic():
  assert methods.parse_cdb_tau("dynamic") == "dynamic"
  assert methods.parse_cdb_tau("1.5") == 1.5
  assert methods.parse_cdb_tau(2) == 2.0
  with pytest.raises(ValueError, match="cdb_tau"):
    methods.parse_cdb_tau("fast")


@pytest.mark.parametrize("name", ["cifar10_lt_public_stage2.py", "cifar100_lt_public_stage2.py"])
def test_public_cifar_recipe_matches_recipes_md_row_by_row(name):
  from experiments import experiment  # pylint: disable=g-import-not-at-top

  c = load_config(os.path.join(CONFIG_DIR, name))
  # Stage 1 (RECIPES.md "CIFAR-10/100-LT, stage 1").
  assert (c.num_epochs, c.batch_size, c.learning_rate, c.momentum, c.nesterov, c.weight_decay) == (
      12_800, 128, 0.1, 0.9, False, 1e-4)
  assert (c.lr_schedule, tuple(c.lr_decay_epochs), c.lr_decay_factor) == (
      "public_cifar", (6400, 9600), 0.1)
  assert (c.method, c.meta_grad, c.driver_weight, c.meta_batch_size) == (
      "difficulty_net", "driver_only", 0.3, 100)
  assert (tuple(c.dnet.hidden), c.dnet.use_bias, c.dnet.lr, c.dnet.weight_decay) == (
      (128, 128), False, 1e-5, 1e-4)
  assert (c.augment, c.augment_meta, c.host_transform, c.cutout_size, c.cutout_public_typo) == (
      False, False, "public_cifar", 16, True)
  assert (c.normalize_stats, c.model, c.data.meta_per_class, c.data.protocol) == (
      "cifar100", "resnet32_public", 25, "public")
  # The schedule the runner builds, at the listed epochs (3 steps per epoch), by hand.
  schedule = experiment.learning_rate_schedule(c, 3)
  for epoch, lr in ((0, 0.1), (399, 0.1 * (1 + 399 / 400)), (400, 0.2), (6399, 0.2),
                    (6400, 0.02), (9600, 0.002), (12_799, 0.002)):
    for step in (3 * epoch, 3 * epoch + 2):
      assert float(schedule(step)) == pytest.approx(lr, rel=1e-6), (epoch, step)
  # Stage 2 (RECIPES.md "CIFAR-LT, stage 2").
  s = c.stage2
  assert (s.method, s.las_head, s.las_scales, s.head_lr_factor, s.shift_bn) == (
      "las", True, True, 1.0, False)
  assert (s.init_checkpoint, s.sampler, s.samples_per_class, s.iterations_per_epoch) == (
      "best_val", "class_aware", 4, 0)
  assert (s.num_epochs, s.batch_size, s.momentum, s.weight_decay, s.scales_weight_decay) == (
      50, 128, 0.9, 1e-4, 1e-4)
  assert (s.las_rule, s.train_transform) == ("cifar", "stage1")
  schedule2 = experiment.stage2_schedule(c, 2)
  for epoch in (0, 1, 25, 49):
    expected = 0.025 * (1 + math.cos(math.pi * epoch / 50))
    assert float(schedule2(2 * epoch + 1)) == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_resnet32_public_head_is_kaiming_normal_with_torch_default_bias():
  model = build_classifier("resnet32_public", 100)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  assert variables["params"]["classifier"]["kernel"].shape == (64, 100)
  head = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))()
  kernel = np.asarray(head["params"]["classifier"]["kernel"])
  bias = np.asarray(head["params"]["classifier"]["bias"])
  # Kaiming normal, fan-in 64: std sqrt(2 / 64); 6400 draws give the std to about 1 %.
  assert abs(kernel.std() / math.sqrt(2 / 64) - 1) < 0.04 and abs(kernel.mean()) < 0.01
  # torch's default bias: U(-1/8, 1/8).
  assert bias.min() >= -0.125 and bias.max() <= 0.125 and bias.max() - bias.min() > 0.2


@pytest.mark.parametrize("stage2,stage1", [("imagenet_lt_stage2.py", "imagenet_lt_public.py"),
                                           ("places_lt_stage2.py", "places_lt_public.py")])
def test_large_stage2_configs_sit_on_the_public_stage1_configs(stage2, stage1):
  two, one = load_config(os.path.join(CONFIG_DIR, stage2)), load_config(
      os.path.join(CONFIG_DIR, stage1))
  assert "TODO" not in open(os.path.join(CONFIG_DIR, stage2), encoding="utf-8").read()
  # Every stage-1 field is the public stage-1 config's (model surgery, head, data, recipe).
  assert two.model == one.model and two.model_kwargs.to_dict() == one.model_kwargs.to_dict()
  assert two.data.to_dict() == one.data.to_dict()
  stage2_only = ("stage", "stage1_workdir", "stage2")  # what add_stage2_fields adds
  assert {k: v for k, v in two.to_dict().items() if k not in stage2_only} == {
      k: v for k, v in one.to_dict().items() if k not in stage2_only}
  assert two.model_kwargs.head == "cosine" and two.stage2.method == "las"


def _batch_norm_paths(config, **model_kwargs):
  """'/'-joined module paths of the BatchNorm layers of config's model (shapes only)."""
  kwargs = dict(experiment.model_options(config), **model_kwargs)
  model = build_classifier(config.model, 365, **kwargs)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  return sorted({"/".join(str(k.key) for k in path[:-1]) for path, _ in
                 jax.tree_util.tree_leaves_with_path(variables["batch_stats"])})


def test_places_shift_bn_pattern_matches_only_the_new_blocks_batchnorm():
  import re  # pylint: disable=g-import-not-at-top
  from experiments import errors  # pylint: disable=g-import-not-at-top

  config = load_config(os.path.join(CONFIG_DIR, "places_lt_stage2.py"))
  pattern = config.stage2.shift_bn_only
  paths = _batch_norm_paths(config, width=4)  # width-reduced ResNet-152, same module tree
  assert len(paths) == 1 + 3 * (3 + 8 + 36 + 3 - 1) + 4 + 3  # stem, blocks, downsamples, new
  assert [p for p in paths if re.search(pattern, p)] == [
      "extra_block/bn1", "extra_block/bn2", "extra_block/bn3"]
  # The runner's check accepts it; on the model without the new block it names the layers.
  fake_stats = {p: {"mean": 0} for p in paths}
  experiment._check_shift_bn_pattern(config, fake_stats)  # pylint: disable=protected-access
  without = [p for p in _batch_norm_paths(config, width=4, extra_block=False)]
  with pytest.raises(errors.InvalidInputError, match="matches no BatchNorm.*stage1_block1"):
    experiment._check_shift_bn_pattern(  # pylint: disable=protected-access
        config, {p: {"mean": 0} for p in without})
