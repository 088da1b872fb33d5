"""Layer defaults shared by the classifiers: PyTorch-equivalent BatchNorm and inits."""

from __future__ import annotations

import functools
from typing import Any

import jax
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


class CosineClassifier(nn.Module):
  """Cosine-similarity classifier: logits_c = s <x / |x|, W_c / |W_c|> (+ b_c).

  The "NormedLinear" head of the public Difficulty-Net code
  (ImageNet_Places-LT/models/resnet_places.py, class NormedLinear, lines 311-327:
  scale s = 30, its bias never enters the logits), itself the cosine classifier
  of Gidaris & Komodakis (CVPR 2018). `W` is stored as `kernel` [features, classes]
  like `nn.Dense`, so the head keeps the name and layout a linear head has.
  `eps` keeps the normalisation finite for an all-zero feature vector (as
  torch.nn.functional.normalize's 1e-12).

  Attributes:
    num_classes: number of output classes.
    scale: s, the fixed multiplier of the cosine (30 in the public code:
      ImageNet_Places-LT/models/resnet.py:318, `NormedLinear`).
    use_bias: add a learned per-class bias b (initialised to 0); off in the public code
      (its `NormedLinear.forward`, resnet.py:320-325, adds none).
  """
  num_classes: int
  scale: float = 30.0
  use_bias: bool = False
  eps: float = 1e-12
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", torch_linear_init, (x.shape[-1], self.num_classes),
                        self.param_dtype)
    # Normalise in float32 even under bf16 compute: the cosine is a ratio of small sums.
    x = x.astype(jnp.float32)
    kernel = kernel.astype(jnp.float32)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), self.eps)
    kernel = kernel / jnp.maximum(jnp.linalg.norm(kernel, axis=0, keepdims=True), self.eps)
    logits = self.scale * (x @ kernel)
    if self.use_bias:
      logits = logits + self.param("bias", nn.initializers.zeros, (self.num_classes,),
                                   self.param_dtype).astype(jnp.float32)
    return logits


HEADS = ("linear", "linear_kaiming", "cosine")


class _KaimingDense(nn.Module):
  """y = x W + b with W ~ Kaiming normal (fan-in, gain sqrt 2) and b ~ U(-1/sqrt(fan_in),
  1/sqrt(fan_in)) (torch.nn.Linear's default bias): the public Difficulty-Net CIFAR
  ResNet's `linear` (its `_weights_init` applies `kaiming_normal_` to the weights of
  Linear and Conv2d and leaves the bias at torch's default). Parameters `kernel`
  [features, classes] and `bias`, as `nn.Dense` names them."""
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1]
    bound = 1.0 / float(fan_in) ** 0.5
    kernel = self.param("kernel", kaiming_normal, (fan_in, self.features), self.param_dtype)
    bias = self.param("bias", lambda key, shape, dtype: jax.random.uniform(
        key, shape, dtype, -bound, bound), (self.features,), self.param_dtype)
    x = x.astype(self.dtype)
    return x @ kernel.astype(self.dtype) + bias.astype(self.dtype)


def classifier_head(head: str, num_classes: int, *, cosine_scale: float = 30.0,
                    cosine_bias: bool = False, dtype=jnp.float32,
                    param_dtype=jnp.float32) -> nn.Module:
  """The final layer named "classifier": "linear" (`nn.Dense`, PyTorch's default Linear
  init), "linear_kaiming" (Kaiming-normal kernel, torch's default bias: the public CIFAR
  ResNet's init) or "cosine" (`CosineClassifier` with `cosine_scale` and `cosine_bias`).

  Call inside a compact module; both heads keep the parameter name `classifier/kernel`
  ([features, classes]), so pretrained loading and head-skipping treat them alike.
  """
  if head == "linear":
    return nn.Dense(num_classes, kernel_init=torch_linear_init, dtype=dtype,
                    param_dtype=param_dtype, name="classifier")
  if head == "linear_kaiming":
    return _KaimingDense(num_classes, dtype=dtype, param_dtype=param_dtype, name="classifier")
  if head == "cosine":
    return CosineClassifier(num_classes, scale=cosine_scale, use_bias=cosine_bias,
                            dtype=dtype, param_dtype=param_dtype, name="classifier")
  raise ValueError(f"Unknown classifier head {head!r}; choose one of {', '.join(HEADS)}.")
