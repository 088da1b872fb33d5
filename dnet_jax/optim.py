"""Optimizers and learning-rate schedules of the paper's recipes, as optax objects."""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import optax


def warmup_step_schedule(base_lr: float, steps_per_epoch: int, warmup_epochs: int = 5,
                         decay_epochs: Sequence[int] = (160, 180), decay_factor: float = 0.1):
  """Linear warm-up to base_lr over `warmup_epochs`, then x decay_factor at each decay epoch.

  The CIFAR-LT recipe of LDAM-DRW (Cao et al. 2019) that Difficulty-Net's CIFAR
  code follows: lr 0.1, 5 warm-up epochs, x0.1 at epochs 160 and 180 of 200.
  The warm-up counts epochs from 1, as that code does: lr = base * (epoch + 1) / warmup.
  """
  if steps_per_epoch < 1:
    raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}.")
  warmup_steps = warmup_epochs * steps_per_epoch

  def schedule(step):
    epoch = step // steps_per_epoch
    warm = base_lr * (epoch + 1) / max(warmup_epochs, 1)
    decayed = base_lr
    for boundary in decay_epochs:
      decayed = decayed * jnp.where(epoch >= boundary, decay_factor, 1.0)
    return jnp.where(step < warmup_steps, warm, decayed)

  return schedule


def cosine_schedule(base_lr: float, total_steps: int, warmup_steps: int = 0, end_lr: float = 0.0):
  """Linear warm-up then cosine decay to end_lr (the ImageNet-LT / Places-LT recipe)."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup_steps else base_lr, peak_value=base_lr,
      warmup_steps=warmup_steps, decay_steps=max(total_steps, warmup_steps + 1), end_value=end_lr)


def classifier_optimizer(learning_rate, momentum: float = 0.9, weight_decay: float = 2e-4,
                         nesterov: bool = False) -> optax.GradientTransformation:
  """SGD with momentum and L2 weight decay added to the gradient, as torch.optim.SGD does."""
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov))


def dnet_optimizer(learning_rate: float = 1e-5, weight_decay: float = 1e-4) -> optax.GradientTransformation:
  """Adam on Difficulty-Net with L2 weight decay added to the gradient (torch.optim.Adam's
  `weight_decay`; METHOD.md: lr 1e-5 on CIFAR, 1e-3 on ImageNet-LT / Places-LT)."""
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate))
