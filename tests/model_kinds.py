"""One small MLP (dense - BatchNorm - ReLU - dense) written as a linen, NNX, Equinox and
plain-function model, with maps between their parameter layouts (float64-capable)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

IN, HIDDEN = 8, 6


class LinenMLP(nn.Module):
  """The reference: linen Dense - BatchNorm (momentum 0.9, eps 1e-5) - ReLU - Dense."""
  num_classes: int
  use_batchnorm: bool = True
  dtype: jnp.dtype = jnp.float64

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape((x.shape[0], -1)).astype(self.dtype)
    x = nn.Dense(HIDDEN, dtype=self.dtype, param_dtype=self.dtype)(x)
    if self.use_batchnorm:
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                       dtype=self.dtype, param_dtype=self.dtype)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.dtype)(nn.relu(x))


class NnxMLP(nnx.Module):
  def __init__(self, num_classes: int, *, dropout: float = 0.0, dtype=jnp.float64, seed: int = 0):
    rngs = nnx.Rngs(seed, dropout=seed + 1)
    self.l1 = nnx.Linear(IN, HIDDEN, dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.bn = nnx.BatchNorm(HIDDEN, momentum=0.9, epsilon=1e-5, dtype=dtype, param_dtype=dtype,
                            rngs=rngs)
    self.drop = nnx.Dropout(dropout, rngs=rngs)
    self.l2 = nnx.Linear(HIDDEN, num_classes, dtype=dtype, param_dtype=dtype, rngs=rngs)

  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    return self.l2(self.drop(nnx.relu(self.bn(self.l1(x)))))


class EqxMLP(eqx.Module):
  """Maps ONE example to logits, as Equinox models do; BatchNorm over the vmapped batch axis."""
  l1: eqx.nn.Linear
  bn: eqx.nn.BatchNorm
  l2: eqx.nn.Linear

  def __init__(self, num_classes: int, key, dtype=jnp.float64):
    k1, k2 = jax.random.split(key)
    self.l1 = eqx.nn.Linear(IN, HIDDEN, key=k1, dtype=dtype)
    self.bn = eqx.nn.BatchNorm(HIDDEN, axis_name="batch", momentum=0.9, eps=1e-5, mode="batch",
                               dtype=dtype)
    self.l2 = eqx.nn.Linear(HIDDEN, num_classes, key=k2, dtype=dtype)

  def __call__(self, x, state, *, key=None):
    x, state = self.bn(self.l1(x.reshape(-1)), state)
    return self.l2(jax.nn.relu(x)), state


def plain_mlp(params, images):
  """The linen reference without BatchNorm, as a plain function of linen-layout params."""
  x = images.reshape((images.shape[0], -1))
  x = jax.nn.relu(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
  return x @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]


# Parameter layouts: linen {Dense_0, BatchNorm_0, Dense_1} <-> each kind's.

def nnx_from_linen(p):
  return {"l1": p["Dense_0"], "bn": p["BatchNorm_0"], "l2": p["Dense_1"]}


def nnx_to_linen(p):
  return {"Dense_0": p["l1"], "BatchNorm_0": p["bn"], "Dense_1": p["l2"]}


def _eqx_leaves(m):
  return (m.l1.weight, m.l1.bias, m.bn.weight, m.bn.bias, m.l2.weight, m.l2.bias)


def eqx_from_linen(eqx_params, p):
  values = (p["Dense_0"]["kernel"].T, p["Dense_0"]["bias"], p["BatchNorm_0"]["scale"],
            p["BatchNorm_0"]["bias"], p["Dense_1"]["kernel"].T, p["Dense_1"]["bias"])
  return eqx.tree_at(_eqx_leaves, eqx_params, values)


def eqx_to_linen(m):
  w1, b1, s, b, w2, b2 = _eqx_leaves(m)
  return {"Dense_0": {"kernel": w1.T, "bias": b1}, "BatchNorm_0": {"scale": s, "bias": b},
          "Dense_1": {"kernel": w2.T, "bias": b2}}
