"""Layer defaults shared by the classifiers: PyTorch-equivalent BatchNorm and inits."""

from __future__ import annotations

import functools

import jax.numpy as jnp
from flax import linen as nn

# BatchNorm as torch.nn.BatchNorm2d: running average with momentum 0.1 (Flax
# counts the kept fraction, hence 0.9) and epsilon 1e-5.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# He (Kaiming) normal, fan-in, as the CIFAR ResNets of LDAM-DRW / Difficulty-Net init convs.
kaiming_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
# torch.nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), i.e. variance 1/(3 fan_in).
torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def batch_norm(train: bool, axis_name: str | None, dtype, name: str | None = None,
               param_dtype=jnp.float32):
  """BatchNorm in training (batch statistics) or evaluation (running statistics) mode.

  With `axis_name`, batch statistics are averaged over that mapped axis
  (synchronised BatchNorm under `jax.pmap`): the model then matches a single
  device running the global batch. Without it each device normalises with its
  own batch, which is a different model.
  """
  return functools.partial(
      nn.BatchNorm, use_running_average=not train, momentum=BN_MOMENTUM,
      epsilon=BN_EPSILON, axis_name=axis_name, dtype=dtype, param_dtype=param_dtype,
      name=name)()
