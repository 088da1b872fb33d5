"""CIFAR ResNet-32 (He et al., CVPR 2016, section 4.2) as used by LDAM-DRW and Difficulty-Net.

Three stages of n basic blocks (n = 5 for ResNet-32, depth 6n + 2) with 16, 32 and
64 channels; the first block of stages 2 and 3 halves the resolution. Shortcuts
are "option A": identity, or, when the shape changes, spatial subsampling by 2
plus zero-padding of the new channels (no parameters).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
from flax import linen as nn

from dnet_jax.models.layers import batch_norm, classifier_head, kaiming_normal


class BasicBlockA(nn.Module):
  """conv3x3-BN-ReLU-conv3x3-BN, plus the option-A shortcut, then ReLU."""
  features: int
  stride: int = 1
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    conv = lambda f, s, name: nn.Conv(
        f, (3, 3), strides=(s, s), padding=((1, 1), (1, 1)), use_bias=False,
        kernel_init=kaiming_normal, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    y = conv(self.features, self.stride, "conv1")(x)
    y = nn.relu(batch_norm(train, self.bn_axis_name, self.dtype, "bn1", self.param_dtype)(y))
    y = conv(self.features, 1, "conv2")(y)
    y = batch_norm(train, self.bn_axis_name, self.dtype, "bn2", self.param_dtype)(y)
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = x[:, ::self.stride, ::self.stride, :]
      extra = self.features - x.shape[-1]
      shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    return nn.relu(y + shortcut)


class CifarResNet(nn.Module):
  """CIFAR ResNet with option-A shortcuts; `blocks_per_stage=5` is ResNet-32.

  Call as `model.apply(variables, images, train=...)` with images [B, H, W, C].
  `head` chooses the classifier: "linear" (default) or "cosine"
  (`layers.CosineClassifier` with `cosine_scale` and `cosine_bias`).
  """
  num_classes: int
  blocks_per_stage: int = 5
  widths: Sequence[int] = (16, 32, 64)
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  head: str = "linear"
  cosine_scale: float = 30.0
  cosine_bias: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(self.dtype)
    x = nn.Conv(self.widths[0], (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                kernel_init=kaiming_normal, dtype=self.dtype, param_dtype=self.param_dtype,
                name="conv_init")(x)
    x = nn.relu(batch_norm(train, self.bn_axis_name, self.dtype, "bn_init", self.param_dtype)(x))
    for stage, width in enumerate(self.widths):
      for block in range(self.blocks_per_stage):
        stride = 2 if stage > 0 and block == 0 else 1
        x = BasicBlockA(width, stride, self.bn_axis_name, self.dtype, self.param_dtype,
                        name=f"stage{stage + 1}_block{block + 1}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    x = classifier_head(self.head, self.num_classes, cosine_scale=self.cosine_scale,
                        cosine_bias=self.cosine_bias, dtype=self.dtype,
                        param_dtype=self.param_dtype)(x)
    # Logits in float32 even under bf16 compute: the loss and its weights stay exact.
    return x.astype(jnp.promote_types(self.dtype, jnp.float32))


def resnet32(num_classes: int, **kwargs) -> CifarResNet:
  """ResNet-32 for CIFAR: 3 stages x 5 basic blocks, widths 16/32/64."""
  return CifarResNet(num_classes=num_classes, blocks_per_stage=5, **kwargs)
