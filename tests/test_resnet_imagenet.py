"""ImageNet ResNets: parameter counts from the architecture, and one Difficulty-Net step each.

Counting uses `jax.eval_shape` (no compilation). The train steps compile the
second-order meta-gradient through the whole network, which dominates the
time: they run with XLA's optimisations off and at reduced width (the same
depth and code path; width only scales the channel counts). ResNet-152's step
differs from ResNet-50's only in the number of identical blocks and takes
one to two minutes to compile on 2 CPU cores, so it runs only with
DNET_SLOW_TESTS=1; its architecture is still checked by the parameter count.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dnet_jax
from dnet_jax.models import build_difficulty_net
from dnet_jax.models.registry import build_classifier
from dnet_jax.models.resnet_imagenet import ImageNetResNet

NUM_CLASSES = 5
SLOW = os.environ.get("DNET_SLOW_TESTS") == "1"


@pytest.fixture(autouse=True, scope="module")
def _fast_compilation():
  previous = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


def _count_from_architecture(stage_sizes, bottleneck: bool, num_classes: int) -> int:
  """He et al. (2016), Table 1, counted by hand: conv weights (no bias), BN scale + bias,
  projection shortcuts where the shape changes, and the final dense layer."""
  def conv(k, c_in, c_out):
    return k * k * c_in * c_out

  def bn(c):
    return 2 * c

  total = conv(7, 3, 64) + bn(64)
  c_in = 64
  expansion = 4 if bottleneck else 1
  for stage, n_blocks in enumerate(stage_sizes):
    width = 64 * 2**stage
    c_out = width * expansion
    for block in range(n_blocks):
      if bottleneck:
        total += conv(1, c_in, width) + bn(width) + conv(3, width, width) + bn(width)
        total += conv(1, width, c_out) + bn(c_out)
      else:
        total += conv(3, c_in, width) + bn(width) + conv(3, width, width) + bn(width)
      stride = 2 if stage > 0 and block == 0 else 1
      if stride != 1 or c_in != c_out:
        total += conv(1, c_in, c_out) + bn(c_out)
      c_in = c_out
  return total + c_in * num_classes + num_classes


def _param_shapes(model, size=224):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                                           train=False))


@pytest.mark.parametrize("name, stage_sizes, bottleneck, published", [
    ("resnet10", (1, 1, 1, 1), False, None),
    ("resnet50", (3, 4, 6, 3), True, 25_557_032),  # torchvision resnet50
    ("resnet152", (3, 8, 36, 3), True, 60_192_808),  # torchvision resnet152
])
def test_parameter_counts(name, stage_sizes, bottleneck, published):
  variables = _param_shapes(build_classifier(name, 1000))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
  assert count == _count_from_architecture(stage_sizes, bottleneck, 1000)
  if published is not None:
    assert count == published
  for stage, n_blocks in enumerate(stage_sizes, start=1):
    blocks = [k for k in variables["params"] if k.startswith(f"stage{stage}_")]
    assert len(blocks) == n_blocks
  # Option B: projections exactly where the shape changes.
  projections = sorted(k for k, v in variables["params"].items() if "downsample_conv" in v)
  expected = ["stage1_block1"] if bottleneck else []
  assert projections == expected + ["stage2_block1", "stage3_block1", "stage4_block1"]
  # BatchNorm running statistics are state, not parameters.
  assert "mean" in variables["batch_stats"]["bn_init"]


def test_resnet10_count():
  variables = _param_shapes(build_classifier("resnet10", 1000))
  assert sum(x.size for x in jax.tree.leaves(variables["params"])) == 5_418_792


def test_shapes_and_dtypes():
  model = build_classifier("resnet50", 7, dtype=jnp.bfloat16)
  variables = _param_shapes(model, size=64)
  logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables,
                          jnp.zeros((2, 64, 64, 3)))
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32  # float32 even under bf16
  assert variables["params"]["conv_init"]["kernel"].dtype == jnp.float32
  assert variables["params"]["stage1_block1"]["conv1"]["kernel"].shape == (1, 1, 64, 64)
  assert variables["params"]["classifier"]["kernel"].shape == (2048, 7)
  # 224 x 224 -> 7 x 7 before pooling: stride 2 (stem) x 2 (pool) x 2 x 2 x 2.
  features = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False, capture_intermediates=True,
                               mutable=["intermediates"])[1],
      _param_shapes(model), jnp.zeros((1, 224, 224, 3)))
  last = features["intermediates"]["stage4_block3"]["__call__"][0]
  assert last.shape == (1, 7, 7, 2048)


def _one_train_step(name: str, width: int, meta_grad: str = "nested"):
  model = build_classifier(name, NUM_CLASSES, width=width)
  dnet = build_difficulty_net(NUM_CLASSES, hidden=(8, 8), use_bias=True)
  tx = dnet_jax.classifier_optimizer(0.01, nesterov=True, weight_decay=5e-4)
  dnet_tx = dnet_jax.dnet_optimizer(1e-3)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(4, 32, 32, 3)).astype(np.float32)
  batch = {"image": images, "label": np.array([0, 1, 2, 3], np.int32)}
  meta_batch = {"image": images[::-1].copy(), "label": np.array([4, 3, 2, 1], np.int32)}
  accuracy = jnp.asarray(rng.uniform(0.1, 0.9, NUM_CLASSES), jnp.float32)
  init = jax.jit(lambda key, x: dnet_jax.create_train_state(
      key, model, tx, x, NUM_CLASSES, dnet=dnet, dnet_tx=dnet_tx, class_accuracy=accuracy))
  state = init(jax.random.key(0), images)
  step = jax.jit(functools.partial(dnet_jax.train_step, model=model, dnet=dnet, tx=tx,
                                   dnet_tx=dnet_tx, learning_rate=0.01, meta_grad=meta_grad))
  new_state, metrics = step(state, batch, meta_batch)
  metrics = jax.device_get(metrics)
  assert all(np.isfinite(v) for v in metrics.values()), metrics
  assert int(new_state.step) == 1

  def moved(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a),
                                                               jax.tree.leaves(b)))

  assert moved(new_state.params, state.params) > 0
  assert moved(new_state.batch_stats, state.batch_stats) > 0
  assert moved(new_state.dnet_params, state.dnet_params) > 0  # the meta-gradient reached phi
  return metrics


@pytest.mark.parametrize("name, width", [("resnet10", 16), ("resnet50", 8)])
def test_difficulty_net_train_step(name, width):
  metrics = _one_train_step(name, width)
  assert "meta_ce" in metrics and "driver_loss" in metrics


@pytest.mark.skipif(not SLOW, reason="ResNet-152 compiles for 1-2 min; set DNET_SLOW_TESTS=1")
def test_resnet152_train_step():
  _one_train_step("resnet152", width=8)


def test_stride_in_1x1_has_the_same_parameters():
  v1 = _param_shapes(ImageNetResNet(10, stage_sizes=(1, 1, 1, 1), stride_in_1x1=True), 64)
  v15 = _param_shapes(ImageNetResNet(10, stage_sizes=(1, 1, 1, 1)), 64)
  assert jax.tree.map(lambda x: x.shape, v1) == jax.tree.map(lambda x: x.shape, v15)
