"""ImageNet-layout ResNets (He et al., CVPR 2016): ResNet-10, ResNet-50, ResNet-152.

The layout is torchvision's, which the ImageNet-LT / Places-LT code of OLTR
(Liu et al., CVPR 2019), Decoupling (Kang et al., ICLR 2020) and Difficulty-Net
build on, so that torchvision's ImageNet-pretrained weights map one-to-one onto
these parameters (see `dnet_jax.models.pretrained`):

  stem:   7x7 conv, 64, stride 2 -> BN -> ReLU -> 3x3 max-pool, stride 2
  stages: 4 stages of widths 64, 128, 256, 512 (x expansion); the first block of stages 2-4
          halves the resolution
  head:   global average pool -> classifier ("linear": dense; "cosine": 30 x cosine
          similarity, `layers.CosineClassifier`, the public Difficulty-Net head)

Blocks:
  basic      (ResNet-10/18/34): conv3x3-BN-ReLU-conv3x3-BN, expansion 1.
  bottleneck (ResNet-50/101/152): conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1-BN,
             expansion 4; the stride sits on the 3x3 conv (torchvision's
             "ResNet v1.5"; the parameter count is the same as v1's).
Shortcuts are "option B": identity where the shape is unchanged, otherwise a
projection (1x1 conv with the block's stride, then BN). The residual sum is
followed by ReLU.

Parameter counts at 1000 classes (conv kernels have no bias; BatchNorm scale
and bias are parameters, its running statistics are not): ResNet-50
25,557,032 and ResNet-152 60,192,808, as torchvision reports; ResNet-10
(basic blocks [1, 1, 1, 1]) 5,418,792. tests/test_resnet_imagenet.py checks
them against an independent formula.

Places-LT surgery (RECIPES.md "Places-LT"; the public Difficulty-Net code,
ImageNet_Places-LT/models/resnet_places.py lines 353-375, where `_resnet_fe` deletes
`layer4.2` from the pretrained state dict, and train_stage1.py:169, which builds the new
`Bottleneck(2048, 512)`): `drop_last_blocks=1` removes the last block of the last stage
(torchvision's `layer4.2`, whose pretrained weights are then not loaded) and
`extra_block=True` appends a new randomly initialised block of the last stage's width
after the last stage (for ResNet-152 a bottleneck 2048 -> 512 -> 2048 with an identity
shortcut), named `extra_block`, before the average pool. Its convs get this module's
He fan-out init; the public code's standalone block keeps PyTorch's default Conv2d
init. `resnet152_places` builds that model with a cosine head.

Initialisation follows torchvision: convs He-normal with fan-out, BatchNorm
scale 1 and bias 0, the classifier PyTorch's default Linear init.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
from flax import linen as nn

from dnet_jax.models.layers import batch_norm, classifier_head

# torchvision's `kaiming_normal_(mode="fan_out", nonlinearity="relu")` for the convs.
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# Stage widths are (1, 2, 4, 8) x the base width (64 in every published ResNet).
STAGE_MULTIPLIERS = (1, 2, 4, 8)


def _conv(features: int, kernel: int, stride: int, dtype, param_dtype, name: str) -> nn.Conv:
  # Symmetric padding as PyTorch; "SAME" would pad asymmetrically for stride 2 on even sizes.
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=False,
                 kernel_init=kaiming_normal_fan_out, dtype=dtype, param_dtype=param_dtype,
                 name=name)


class _Block(nn.Module):
  """Common fields and the option-B shortcut of both block kinds."""
  features: int
  stride: int = 1
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  stride_in_1x1: bool = False  # bottleneck only: ResNet v1 / Caffe layout

  expansion = 1

  def shortcut(self, x, train: bool):
    out_features = self.features * self.expansion
    if self.stride == 1 and x.shape[-1] == out_features:
      return x
    x = _conv(out_features, 1, self.stride, self.dtype, self.param_dtype, "downsample_conv")(x)
    return batch_norm(train, self.bn_axis_name, self.dtype, "downsample_bn")(x)


class BasicBlock(_Block):
  """conv3x3-BN-ReLU-conv3x3-BN + shortcut, then ReLU (expansion 1)."""
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool):
    bn = lambda name: batch_norm(train, self.bn_axis_name, self.dtype, name)
    y = _conv(self.features, 3, self.stride, self.dtype, self.param_dtype, "conv1")(x)
    y = nn.relu(bn("bn1")(y))
    y = _conv(self.features, 3, 1, self.dtype, self.param_dtype, "conv2")(y)
    y = bn("bn2")(y)
    return nn.relu(y + self.shortcut(x, train))


class BottleneckBlock(_Block):
  """conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1(4x)-BN + shortcut, then ReLU.

  With `stride_in_1x1` the stride moves to the first 1x1 conv (the original
  ResNet v1 and the Caffe models; same parameters, different network).
  """
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool):
    bn = lambda name: batch_norm(train, self.bn_axis_name, self.dtype, name)
    stride_1x1, stride_3x3 = (self.stride, 1) if self.stride_in_1x1 else (1, self.stride)
    y = _conv(self.features, 1, stride_1x1, self.dtype, self.param_dtype, "conv1")(x)
    y = nn.relu(bn("bn1")(y))
    y = _conv(self.features, 3, stride_3x3, self.dtype, self.param_dtype, "conv2")(y)
    y = nn.relu(bn("bn2")(y))
    y = _conv(self.features * self.expansion, 1, 1, self.dtype, self.param_dtype, "conv3")(y)
    y = bn("bn3")(y)
    return nn.relu(y + self.shortcut(x, train))


BLOCKS = {"basic": BasicBlock, "bottleneck": BottleneckBlock}


class ImageNetResNet(nn.Module):
  """ResNet with the ImageNet stem, four stages and option-B shortcuts.

  Call as `model.apply(variables, images, train=...)` with images [B, H, W, 3];
  returns float32 logits [B, num_classes]. Parameter names: `conv_init`,
  `bn_init`, `stage{s}_block{b}/{conv1,bn1,...,downsample_conv,downsample_bn}`
  (s, b from 1), `classifier`; `pretrained.from_torchvision_state_dict` maps torchvision's.

  Attributes:
    num_classes: size of the classifier.
    stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
    block: "basic" or "bottleneck".
    bn_axis_name: pmap axis for synchronised BatchNorm (None: per-device statistics).
    dtype: compute dtype (e.g. bfloat16); logits are cast back to float32.
    param_dtype: parameter dtype.
    stride_in_1x1: bottleneck blocks stride on their first 1x1 conv (ResNet v1 /
      Caffe-converted weights) instead of the 3x3 conv (torchvision, the default).
    width: base width: the stem has `width` channels and stage s has
      `width * 2**(s-1)` (times the expansion); 64 is the standard ResNet, smaller
      values give the same depth cheaply (tests).
    head: "linear" (default) or "cosine" (`layers.CosineClassifier`).
    cosine_scale, cosine_bias: the cosine head's scale s and whether it has a bias.
    drop_last_blocks: number of blocks removed from the end of the last stage
      (0 <= drop_last_blocks < its size; Places-LT: 1).
    extra_block: append a new block of the last stage's width (`extra_block`) after
      the last stage (Places-LT: True).
  """
  num_classes: int
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  block: str = "bottleneck"
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  stride_in_1x1: bool = False
  width: int = 64
  head: str = "linear"
  cosine_scale: float = 30.0
  cosine_bias: bool = False
  drop_last_blocks: int = 0
  extra_block: bool = False

  def _stage_sizes(self) -> tuple[int, ...]:
    sizes = tuple(int(n) for n in self.stage_sizes)
    if not 1 <= len(sizes) <= len(STAGE_MULTIPLIERS):
      raise ValueError(f"stage_sizes must have 1 to {len(STAGE_MULTIPLIERS)} entries, "
                       f"got {sizes}.")
    if not 0 <= self.drop_last_blocks < sizes[-1]:
      raise ValueError(f"drop_last_blocks must be in [0, {sizes[-1]}) for a last stage of "
                       f"{sizes[-1]} blocks (one block must remain), got {self.drop_last_blocks}.")
    return sizes[:-1] + (sizes[-1] - self.drop_last_blocks,)

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.block not in BLOCKS:
      raise ValueError(f"Unknown block {self.block!r}; choose one of {sorted(BLOCKS)}.")
    stage_sizes = self._stage_sizes()
    block_cls = BLOCKS[self.block]
    x = x.astype(self.dtype)
    x = _conv(self.width, 7, 2, self.dtype, self.param_dtype, "conv_init")(x)
    x = nn.relu(batch_norm(train, self.bn_axis_name, self.dtype, "bn_init")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, n_blocks in enumerate(stage_sizes):
      width = self.width * STAGE_MULTIPLIERS[stage]
      for b in range(n_blocks):
        stride = 2 if stage > 0 and b == 0 else 1
        x = block_cls(width, stride, self.bn_axis_name, self.dtype, self.param_dtype,
                      self.stride_in_1x1, name=f"stage{stage + 1}_block{b + 1}")(x, train)
    if self.extra_block:
      x = block_cls(self.width * STAGE_MULTIPLIERS[len(stage_sizes) - 1], 1, self.bn_axis_name,
                    self.dtype, self.param_dtype, self.stride_in_1x1, name="extra_block")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    x = classifier_head(self.head, self.num_classes, cosine_scale=self.cosine_scale,
                        cosine_bias=self.cosine_bias, dtype=self.dtype,
                        param_dtype=self.param_dtype)(x)
    # Logits in float32 even under bf16 compute: the loss and its weights stay exact.
    return x.astype(jnp.float32)


def resnet10(num_classes: int, **kwargs) -> ImageNetResNet:
  """ResNet-10: basic blocks [1, 1, 1, 1] (the ImageNet-LT backbone of OLTR / Decoupling)."""
  return ImageNetResNet(num_classes=num_classes, stage_sizes=(1, 1, 1, 1), block="basic", **kwargs)


def resnet50(num_classes: int, **kwargs) -> ImageNetResNet:
  """ResNet-50: bottleneck blocks [3, 4, 6, 3]."""
  return ImageNetResNet(num_classes=num_classes, stage_sizes=(3, 4, 6, 3), block="bottleneck",
                        **kwargs)


def resnet152(num_classes: int, **kwargs) -> ImageNetResNet:
  """ResNet-152: bottleneck blocks [3, 8, 36, 3] (Places-LT, ImageNet-pretrained)."""
  return ImageNetResNet(num_classes=num_classes, stage_sizes=(3, 8, 36, 3), block="bottleneck",
                        **kwargs)


def resnet152_places(num_classes: int, **kwargs) -> ImageNetResNet:
  """ResNet-152 as the public code runs it on Places-LT: layer4's last block dropped, a new
  bottleneck block (2048 -> 512 -> 2048) added, cosine head (scale 30, no bias)."""
  options = dict(head="cosine", drop_last_blocks=1, extra_block=True)
  options.update(kwargs)
  return ImageNetResNet(num_classes=num_classes, stage_sizes=(3, 8, 36, 3), block="bottleneck",
                        **options)
