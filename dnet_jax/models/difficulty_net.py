"""Difficulty-Net g_phi: class accuracies -> class difficulties in (0, 1).

Sinha & Ohashi (WACV 2023), section 3: the *relative* network is an MLP
R^C -> (0, 1)^C whose input is the whole accuracy vector a, so that the
difficulty of a class is judged against all others. Paper settings: CIFAR hidden
(128, 128) without biases; ImageNet-LT (1024, 1024) and Places-LT (512, 512)
with biases. ReLU between layers, sigmoid output.

The *absolute* variant (the paper's ablation) applies one small MLP R -> (0, 1)
to each a_c separately, shared across classes, as Meta-Weight-Net (Shu et al.,
NeurIPS 2019) does for per-sample losses.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
from flax import linen as nn

from dnet_jax.models.layers import torch_linear_init


class DifficultyNet(nn.Module):
  """Relative Difficulty-Net: d = sigmoid(MLP(a)), a in [0, 1]^C -> d in (0, 1)^C."""
  num_classes: int
  hidden: Sequence[int] = (128, 128)
  use_bias: bool = False
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, class_accuracy):
    h = class_accuracy.astype(self.param_dtype)
    for i, width in enumerate(self.hidden):
      h = nn.relu(nn.Dense(width, use_bias=self.use_bias, kernel_init=torch_linear_init,
                           param_dtype=self.param_dtype, name=f"hidden{i + 1}")(h))
    h = nn.Dense(self.num_classes, use_bias=self.use_bias, kernel_init=torch_linear_init,
                 param_dtype=self.param_dtype, name="out")(h)
    return nn.sigmoid(h)


class AbsoluteDifficultyNet(nn.Module):
  """Absolute variant: d_c = sigmoid(MLP(a_c)), one MLP R -> (0, 1) shared by all classes."""
  num_classes: int
  hidden: Sequence[int] = (128, 128)
  use_bias: bool = True
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, class_accuracy):
    h = class_accuracy.astype(self.param_dtype)[..., None]
    for i, width in enumerate(self.hidden):
      h = nn.relu(nn.Dense(width, use_bias=self.use_bias, kernel_init=torch_linear_init,
                           param_dtype=self.param_dtype, name=f"hidden{i + 1}")(h))
    h = nn.Dense(1, use_bias=self.use_bias, kernel_init=torch_linear_init,
                 param_dtype=self.param_dtype, name="out")(h)
    return nn.sigmoid(h[..., 0])


def build_difficulty_net(num_classes: int, kind: str = "relative", hidden: Sequence[int] = (128, 128),
                         use_bias: bool = False, param_dtype: Any = jnp.float32) -> nn.Module:
  """Difficulty-Net by kind: "relative" (the paper's method) or "absolute" (ablation)."""
  if kind == "relative":
    return DifficultyNet(num_classes, tuple(hidden), use_bias, param_dtype)
  if kind == "absolute":
    return AbsoluteDifficultyNet(num_classes, tuple(hidden), use_bias, param_dtype)
  raise ValueError(f"Unknown Difficulty-Net kind {kind!r}; choose 'relative' or 'absolute'.")
