"""The public Difficulty-Net CIFAR learning-rate schedules, per epoch, as optax schedules.

Both are step functions of the epoch ``e = step // steps_per_epoch`` (the
public code sets the lr once at the start of every epoch), written with
``jnp`` so they are jit-able and take an integer step, as optax expects.
``*_lr(epoch)`` gives the same value in plain Python for reports and tests.

Stage 1 (hitachi-rd-cv/Difficulty_Net, ``CIFAR-LT/cifar_train_exaugment.py``
lines 46-51, called with the integer epoch at line 140; the lookahead uses the
same expression, line 185):

  lr(e) = (0.1 + 0.1 e / 400 [e <= 400] + 0.1 [e > 400])
          x 0.1^[e >= 6400] x 0.1^[e >= 9600],

i.e. 0.1 rising linearly to 0.2 at e = 400, 0.02 from 6400, 0.002 from 9600
(of 12,800 epochs). Generalised: ``base (1 + min(e / ramp, 1)) decay^k`` with
``k`` the number of boundaries ``<= e``; the defaults are the public values.

Stage 2 (``CIFAR-LT/cifar_train_exaugment_stage2.py`` lines 63-69, called
per epoch at line 138):

  lr(e) = 0.5 x 0.05 x (1 + cos(pi e / 50)) = 0.025 (1 + cos(pi e / 50)),

generalised to ``0.5 base (1 + cos(pi e / epochs))``. (The public code writes
pi as 3.1415926535; the difference is below 1e-11 relative.)
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax.numpy as jnp

Schedule = Callable[[int], jnp.ndarray]


def _check(steps_per_epoch: int, **positive: float) -> None:
  if steps_per_epoch < 1:
    raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}.")
  for name, value in positive.items():
    if not value > 0:
      raise ValueError(f"{name} must be > 0, got {value}.")


def public_cifar_stage1_lr(epoch: int, base_lr: float = 0.1, ramp_epochs: int = 400,
                           decay_epochs: Sequence[int] = (6400, 9600),
                           decay_factor: float = 0.1) -> float:
  """``base (1 + min(e / ramp, 1)) decay^#{b <= e}`` for one integer epoch (Python)."""
  lr = base_lr * (1.0 + min(epoch / ramp_epochs, 1.0))
  return lr * decay_factor ** sum(epoch >= b for b in decay_epochs)


def public_cifar_stage1_schedule(steps_per_epoch: int, base_lr: float = 0.1,
                                 ramp_epochs: int = 400,
                                 decay_epochs: Sequence[int] = (6400, 9600),
                                 decay_factor: float = 0.1) -> Schedule:
  """``step -> public_cifar_stage1_lr(step // steps_per_epoch)`` as a jnp function."""
  _check(steps_per_epoch, base_lr=base_lr, ramp_epochs=ramp_epochs)

  def schedule(step):
    epoch = jnp.asarray(step) // steps_per_epoch
    lr = base_lr * (1.0 + jnp.minimum(epoch / ramp_epochs, 1.0))
    for boundary in decay_epochs:
      lr = lr * jnp.where(epoch >= boundary, decay_factor, 1.0)
    return lr

  return schedule


def per_epoch_cosine_lr(epoch: int, base_lr: float = 0.05, epochs: int = 50) -> float:
  """``0.5 base (1 + cos(pi e / epochs))`` for one integer epoch (Python)."""
  return 0.5 * base_lr * (1.0 + math.cos(math.pi * epoch / epochs))


def per_epoch_cosine_schedule(steps_per_epoch: int, base_lr: float = 0.05,
                              epochs: int = 50) -> Schedule:
  """``step -> per_epoch_cosine_lr(step // steps_per_epoch)`` as a jnp function.

  Constant within an epoch (unlike ``optax.cosine_decay_schedule``, which
  decays every step); the public CIFAR stage 2 is ``base_lr=0.05, epochs=50``.
  """
  _check(steps_per_epoch, base_lr=base_lr, epochs=epochs)

  def schedule(step):
    epoch = jnp.asarray(step) // steps_per_epoch
    return 0.5 * base_lr * (1.0 + jnp.cos(jnp.pi * epoch / epochs))

  return schedule
