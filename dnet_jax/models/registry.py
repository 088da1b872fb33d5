"""Classifier construction by name, as configs ask for it."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from dnet_jax.models.resnet_cifar import resnet32
from dnet_jax.models.resnet_imagenet import resnet10, resnet50, resnet152, resnet152_places
from dnet_jax.models.small_cnn import SmallCNN

_BUILDERS = {
    "resnet32": resnet32,
    # The public Difficulty-Net CIFAR ResNet-32's init: Kaiming-normal linear weight too.
    "resnet32_public": lambda num_classes, **kw: resnet32(num_classes, head="linear_kaiming",
                                                          **kw),
    "resnet10": resnet10,
    "resnet50": resnet50,
    "resnet152": resnet152,
    "resnet152_places": resnet152_places,
    "small_cnn": lambda num_classes, **kw: SmallCNN(num_classes=num_classes, **kw),
    "small_cnn_nobn": lambda num_classes, **kw: SmallCNN(num_classes=num_classes, use_batchnorm=False, **kw),
}

MODEL_NAMES = tuple(_BUILDERS)


def register_classifier(name: str, builder) -> None:
  """Makes `builder(num_classes, **kwargs) -> nn.Module` available to configs by name."""
  _BUILDERS[name] = builder


def build_classifier(name: str, num_classes: int, *, bn_axis_name: str | None = None,
                     dtype: Any = jnp.float32, **kwargs) -> nn.Module:
  """Builds a classifier module by name (see MODEL_NAMES)."""
  if name not in _BUILDERS:
    raise ValueError(f"Unknown model {name!r}; choose one of {', '.join(sorted(_BUILDERS))}.")
  return _BUILDERS[name](num_classes, bn_axis_name=bn_axis_name, dtype=dtype, **kwargs)
