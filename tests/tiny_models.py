"""Tiny Flax modules and data for the core-library tests (float64-capable)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

import dnet_jax as dj


class TinyConvNet(nn.Module):
  """conv(4) [-BN] - ReLU - mean-pool - dense: small enough for finite differences."""
  num_classes: int
  use_batchnorm: bool = True
  bn_axis_name: str | None = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(self.param_dtype)
    x = nn.Conv(4, (3, 3), use_bias=not self.use_batchnorm, param_dtype=self.param_dtype,
                dtype=self.param_dtype)(x)
    if self.use_batchnorm:
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, axis_name=self.bn_axis_name,
                       param_dtype=self.param_dtype, dtype=self.param_dtype)(x)
    x = nn.relu(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, param_dtype=self.param_dtype, dtype=self.param_dtype)(x)


class UserMLP(nn.Module):
  """A user's own 2-layer MLP without BatchNorm and without a `train` argument."""
  num_classes: int
  hidden: int = 32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1)).astype(self.param_dtype)
    x = nn.relu(nn.Dense(self.hidden, param_dtype=self.param_dtype, dtype=self.param_dtype)(x))
    return nn.Dense(self.num_classes, param_dtype=self.param_dtype, dtype=self.param_dtype)(x)


def random_batch(seed: int, batch_size: int, num_classes: int, shape=(4, 4, 1), dtype=np.float32,
                 balanced: bool = False) -> dict:
  rng = np.random.default_rng(seed)
  if balanced:
    labels = np.arange(batch_size) % num_classes
  else:
    labels = rng.integers(0, num_classes, batch_size)
  return {"image": rng.normal(size=(batch_size,) + tuple(shape)).astype(dtype),
          "label": labels.astype(np.int32)}


def make_state(model, num_classes, *, dtype=jnp.float32, hidden=(5,), use_bias=True, seed=0,
               shape=(4, 4, 1), lr=0.1, dnet_lr=1e-3, accuracy=None):
  """A TrainState with a Difficulty-Net, non-trivial accuracy vector, and its tools."""
  dnet = dj.DifficultyNet(num_classes, hidden=hidden, use_bias=use_bias, param_dtype=dtype)
  tx = dj.classifier_optimizer(lr)
  dnet_tx = dj.dnet_optimizer(dnet_lr)
  if accuracy is None:
    accuracy = np.random.default_rng(seed + 100).uniform(0.05, 0.95, num_classes)
  state = dj.create_train_state(jax.random.key(seed), model, tx, jnp.zeros((2,) + shape, dtype),
                                num_classes, dnet=dnet, dnet_tx=dnet_tx,
                                class_accuracy=jnp.asarray(accuracy, jnp.float32))
  return state, dnet, tx, dnet_tx
