"""Every experiment config loads, validates, and its classifier and Difficulty-Net initialise."""

from __future__ import annotations

import glob
import importlib.util
import os

import jax
import jax.numpy as jnp
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
