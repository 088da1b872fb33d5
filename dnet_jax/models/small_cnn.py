"""A small CNN for 8x8 digit images (scikit-learn's `load_digits`), the embedded default."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from dnet_jax.models.layers import batch_norm, kaiming_normal, torch_linear_init


class SmallCNN(nn.Module):
  """conv(32)-BN-ReLU, conv(64, stride 2)-BN-ReLU, conv(64)-BN-ReLU, mean-pool, dense.

  On 8x8 inputs the feature maps are 8x8 then 4x4; about 56k parameters.
  `use_batchnorm=False` gives the same network without BatchNorm.
  """
  num_classes: int
  widths: tuple[int, int, int] = (32, 64, 64)
  use_batchnorm: bool = True
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(self.dtype)
    for i, (width, stride) in enumerate(zip(self.widths, (1, 2, 1))):
      x = nn.Conv(width, (3, 3), strides=(stride, stride), padding="SAME",
                  use_bias=not self.use_batchnorm, kernel_init=kaiming_normal,
                  dtype=self.dtype, param_dtype=self.param_dtype, name=f"conv{i + 1}")(x)
      if self.use_batchnorm:
        x = batch_norm(train, self.bn_axis_name, self.dtype, f"bn{i + 1}", self.param_dtype)(x)
      x = nn.relu(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, kernel_init=torch_linear_init, dtype=self.dtype,
                 param_dtype=self.param_dtype, name="classifier")(x)
    return x.astype(jnp.promote_types(self.dtype, jnp.float32))
