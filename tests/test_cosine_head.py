"""The cosine classifier head: logits = s <x/|x|, W_c/|W_c|> (+ b), alone and inside the ResNets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dnet_jax.models.layers import CosineClassifier, classifier_head
from dnet_jax.models.resnet_cifar import CifarResNet
from dnet_jax.models.resnet_imagenet import ImageNetResNet

pytestmark = pytest.mark.usefixtures("fast_compilation")


def _cosine_logits(x, kernel, scale, bias=None):
  """The formula in float64 numpy: scale * cos(angle between x_i and column c of W)."""
  x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
  cos = np.array([[xi @ kernel[:, c] / (np.linalg.norm(xi) * np.linalg.norm(kernel[:, c]))
                   for c in range(kernel.shape[1])] for xi in x])
  return scale * cos + (0.0 if bias is None else np.asarray(bias, np.float64))


@pytest.mark.parametrize("scale, use_bias", [(30.0, False), (16.0, True)])
def test_cosine_classifier_equals_its_formula(scale, use_bias):
  head = CosineClassifier(num_classes=5, scale=scale, use_bias=use_bias)
  x = jax.random.normal(jax.random.key(0), (4, 7)) * 3.0
  variables = head.init(jax.random.key(1), x)
  params = dict(variables["params"])
  if use_bias:  # a non-zero bias, so that adding it is checked
    params["bias"] = jnp.arange(5, dtype=jnp.float32) * 0.25
  logits = head.apply({"params": params}, x)
  np.testing.assert_allclose(logits, _cosine_logits(x, params["kernel"], scale,
                                                    params.get("bias")), rtol=1e-5, atol=1e-5)
  assert sorted(params) == (["bias", "kernel"] if use_bias else ["kernel"])
  assert float(jnp.max(jnp.abs(logits - params.get("bias", 0.0)))) <= scale * (1 + 1e-6)


def test_zero_features_give_finite_logits_and_unknown_head_is_an_error():
  head = CosineClassifier(num_classes=3)
  variables = head.init(jax.random.key(0), jnp.ones((1, 4)))
  assert np.all(head.apply(variables, jnp.zeros((2, 4))) == 0.0)
  with pytest.raises(ValueError, match="Unknown classifier head 'cos'; choose one of linear, .*cosine"):
    classifier_head("cos", 3)


def _features_and_logits(model, images):
  """The pooled features entering the head (from the last block's output) and the logits."""
  variables = model.init(jax.random.key(0), images, train=False)
  logits, state = model.apply(variables, images, train=False, capture_intermediates=True)
  blocks = sorted(k for k in state["intermediates"] if "block" in k)
  last = "extra_block" if "extra_block" in blocks else blocks[-1]
  features = jnp.mean(state["intermediates"][last]["__call__"][0], axis=(1, 2))
  return variables, features, logits


@pytest.mark.parametrize("model", [
    ImageNetResNet(num_classes=6, stage_sizes=(1, 1), block="basic", width=4, head="cosine"),
    ImageNetResNet(num_classes=6, stage_sizes=(1, 2), block="bottleneck", width=4,
                   head="cosine", cosine_scale=10.0, drop_last_blocks=1, extra_block=True),
    CifarResNet(num_classes=6, blocks_per_stage=1, widths=(4, 8, 8), head="cosine",
                cosine_bias=True),
], ids=["resnet_imagenet", "resnet_imagenet_places", "resnet_cifar"])
def test_resnets_with_a_cosine_head(model):
  images = jax.random.normal(jax.random.key(2), (3, 32, 32, 3))
  variables, features, logits = _features_and_logits(model, images)
  head = variables["params"]["classifier"]
  np.testing.assert_allclose(logits, _cosine_logits(features, head["kernel"], model.cosine_scale,
                                                    head.get("bias")), rtol=1e-4, atol=1e-4)


def test_linear_head_stays_the_default():
  model = ImageNetResNet(num_classes=6, stage_sizes=(1,), block="basic", width=4)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  assert sorted(variables["params"]["classifier"]) == ["bias", "kernel"]
  model = CifarResNet(num_classes=6, blocks_per_stage=1, widths=(4, 8, 8))
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  assert sorted(variables["params"]["classifier"]) == ["bias", "kernel"]
