"""Per-class accuracy, difficulty and class weights: the pure maths of Difficulty-Net.

Every function here is a pure, jit-able function of arrays. Notation follows
METHOD.md: C classes, a in [0, 1]^C the per-class accuracy on the meta/validation
set, d = g_phi(a) in (0, 1)^C the learned difficulties, w in R^C the class weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The constant in the driver target's denominator (Sinha & Ohashi 2023, eq. 4).
DRIVER_EPS = 1e-12


def per_class_counts(logits: jax.Array, labels: jax.Array, num_classes: int,
                     mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Per-class top-1 correct and total counts.

    correct_c = sum_i m_i [y_i = c] [argmax_k z_ik = y_i],
    total_c   = sum_i m_i [y_i = c],

  with m_i the optional 0/1 mask that marks padding examples. Counts are float32
  so that they can be summed across devices with `jax.lax.psum` and across
  batches on the host; the accuracy of a class is then `correct_c / total_c`
  (see `accuracy_from_counts`), which is exact however the data were split.

  Args:
    logits: [B, C] classifier outputs.
    labels: [B] integer labels in [0, C).
    num_classes: C.
    mask: optional [B] weights in {0, 1}; 0 drops an example (e.g. padding).

  Returns:
    (correct, total), each a float32 [C] array.
  """
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if mask is not None:
    one_hot = one_hot * mask.astype(jnp.float32)[:, None]
  hit = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return jnp.sum(one_hot * hit[:, None], axis=0), jnp.sum(one_hot, axis=0)


def accuracy_from_counts(correct: jax.Array, total: jax.Array) -> jax.Array:
  """Per-class accuracy a_c = correct_c / total_c (0 for a class with no examples)."""
  return jnp.where(total > 0, correct / jnp.maximum(total, 1.0), 0.0)


def class_weights_from_difficulty(difficulty: jax.Array) -> jax.Array:
  """Class weights from difficulties: w_c = C d_c / sum_j d_j.

  Sinha & Ohashi (WACV 2023), section 3.2: the weights are the difficulties
  normalised to average 1, so that the weighted loss keeps the scale of the
  unweighted one. `difficulty` is the sigmoid output of Difficulty-Net, so it is
  strictly positive and the division is safe.
  """
  num_classes = difficulty.shape[-1]
  return num_classes * difficulty / jnp.sum(difficulty, axis=-1, keepdims=True)


def driver_target(class_accuracy: jax.Array) -> jax.Array:
  """Target of the driver loss: t_c = 1 - a_c / (sum_j a_j + 1e-12).

  Sinha & Ohashi (WACV 2023), eq. 4. The target is the complement of the
  class's share of the total accuracy, so it lies in [0, 1] and is 1 for every
  class while all accuracies are 0 (at the start of training). It carries no
  gradient: it depends only on the measured accuracy.
  """
  a = jax.lax.stop_gradient(class_accuracy)
  return 1.0 - a / (jnp.sum(a, axis=-1, keepdims=True) + DRIVER_EPS)


def driver_loss(difficulty: jax.Array, class_accuracy: jax.Array) -> jax.Array:
  """Driver loss L_dr = mean_c (d_c - t_c)^2 (Sinha & Ohashi 2023, eq. 4).

  Keeps the learned difficulties tied to the measured per-class accuracy; the
  paper's ablation shows that the meta-objective alone drifts without it.
  """
  return jnp.mean(jnp.square(difficulty - driver_target(class_accuracy)))


def _normalise_to_num_classes(raw: jax.Array) -> jax.Array:
  """raw * C / sum(raw), or uniform ones where the raw weights sum to zero."""
  num_classes = raw.shape[-1]
  total = jnp.sum(raw, axis=-1, keepdims=True)
  safe_total = jnp.where(total > 0, total, 1.0)
  return jnp.where(total > 0, num_classes * raw / safe_total, jnp.ones_like(raw))


def class_balanced_weights(class_counts: jax.Array, beta: float = 0.9999) -> jax.Array:
  """Class-balanced weights by effective number (Cui et al., CVPR 2019).

    E_c = (1 - beta^{n_c}) / (1 - beta),   w_c = C (1 / E_c) / sum_j (1 / E_j).

  A class with n_c = 0 gets weight 0 (it contributes no examples anyway).
  """
  n = jnp.asarray(class_counts, jnp.float32)
  inverse_effective = jnp.where(n > 0, (1.0 - beta) / (1.0 - jnp.power(beta, jnp.maximum(n, 1.0))), 0.0)
  return _normalise_to_num_classes(inverse_effective)


def cdb_dynamic_tau(class_accuracy: jax.Array, epsilon: float = 0.01) -> jax.Array:
  """Dynamic tau of CDB loss (Sinha et al., ACCV 2020; their CIFAR-LT code).

    tau = 2 * sigmoid(max_c a_c / (min_c a_c + epsilon) - 1),   epsilon = 0.01.

  The ratio measures how biased the classifier is. A balanced classifier (all
  a_c equal and well above epsilon, ratio about 1) gets tau about 1; a strongly
  biased one gets tau close to 2, i.e. sharper emphasis on the difficult
  classes. Since the ratio is >= 0, tau lies in [2 sigmoid(-1), 2) ~ [0.54, 2).
  """
  ratio = jnp.max(class_accuracy, axis=-1) / (jnp.min(class_accuracy, axis=-1) + epsilon)
  return 2.0 * jax.nn.sigmoid(ratio - 1.0)


def cdb_weights(class_accuracy: jax.Array, tau: float | jax.Array | str = 1.0) -> jax.Array:
  """CDB class weights (Sinha et al., ACCV 2020): w_c proportional to (1 - a_c)^tau.

    w_c = C (1 - a_c)^tau / sum_j (1 - a_j)^tau.

  `tau` is a number or "dynamic" (see `cdb_dynamic_tau`). Edge cases: a class at
  100% accuracy gets weight 0; if every class is at 100% the weights are uniform.
  """
  if isinstance(tau, str):
    if tau != "dynamic":
      raise ValueError(f"cdb tau must be a number or 'dynamic', got {tau!r}.")
    tau = cdb_dynamic_tau(class_accuracy)
  difficulty = jnp.clip(1.0 - class_accuracy, 0.0, 1.0)
  return _normalise_to_num_classes(jnp.power(difficulty, tau))
