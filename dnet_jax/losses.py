"""Per-example classification losses and the class-weighted reduction.

As in optax, each loss returns one value per example and the caller reduces:
this keeps the per-class weighting of Difficulty-Net explicit
(`weighted_mean(per_example, class_weights, labels)`).

`make_loss_fn(name, ...)` builds a `loss_fn(logits, labels) -> [B]` from a name,
which is how configs choose a loss.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

LossFn = Callable[[jax.Array, jax.Array], jax.Array]

LOSS_NAMES = ("ce", "balanced_softmax", "focal")


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy: CE_i = logsumexp(z_i) - z_{i, y_i}."""
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]


def balanced_softmax_cross_entropy(logits: jax.Array, labels: jax.Array,
                                   log_prior: jax.Array) -> jax.Array:
  """Balanced Softmax (Ren et al., NeurIPS 2020): CE on z_i + log pi.

    BSCE_i = -log( n_{y_i} exp(z_{i,y_i}) / sum_j n_j exp(z_{ij}) )
           = CE(z_i + log pi, y_i),   pi_c = n_c / sum_j n_j.

  The prior enters only the training loss; predictions use the raw logits.
  """
  return cross_entropy(logits + log_prior, labels)


def focal_loss(logits: jax.Array, labels: jax.Array, gamma: float = 1.0) -> jax.Array:
  """Focal loss (Lin et al., ICCV 2017): FL_i = -(1 - p_{i,y_i})^gamma log p_{i,y_i}.

  gamma = 0 is plain cross-entropy (values and gradients). The modulating factor
  is computed in log space, (1 - p_y)^gamma = exp(gamma log(1 - p_y)) with
  log(1 - p_y) = logsumexp_{j != y} log_softmax(z)_j, which stays accurate (and
  its gradient finite) when p_y rounds to 1: the naive (1 - p)^gamma has an
  infinite derivative at 1 - p = 0 for gamma < 1, which made the gradient NaN
  (e.g. logits [17, 0, 0] in float32). A gamma < 0 raises a ValueError.
  """
  if isinstance(gamma, (int, float)) and gamma < 0:
    raise ValueError(f"focal_loss: gamma must be >= 0 (gamma = 0 is cross-entropy), got {gamma}.")
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  log_p = jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
  if isinstance(gamma, (int, float)) and gamma == 0:
    return -log_p
  is_label = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
  log_one_minus_p = jax.nn.logsumexp(jnp.where(is_label, -jnp.inf, log_probs), axis=-1)
  return -jnp.exp(gamma * log_one_minus_p) * log_p


def weighted_mean(per_example: jax.Array, class_weights: jax.Array, labels: jax.Array,
                  mask: jax.Array | None = None) -> jax.Array:
  """Class-weighted mean: L = (1/B) sum_i w_{y_i} l_i.

  This is the reduction of Difficulty-Net (METHOD.md step 1) and of the
  fixed-weight baselines: a plain mean over the B examples of the batch, each
  scaled by its class's weight (not divided by the sum of weights, so the loss
  scale follows the weights, which average 1 over classes). With a 0/1 `mask`,
  B counts only the unmasked examples.
  """
  sample_weights = class_weights[labels]
  if mask is None:
    return jnp.mean(sample_weights * per_example)
  mask = mask.astype(per_example.dtype)
  return jnp.sum(mask * sample_weights * per_example) / jnp.maximum(jnp.sum(mask), 1.0)


def log_prior_from_counts(class_counts) -> np.ndarray:
  """log pi_c = log(n_c / sum_j n_j); a class with no examples gets log(1e-12)."""
  counts = np.asarray(class_counts, np.float64)
  if counts.ndim != 1 or np.any(counts < 0) or counts.sum() <= 0:
    raise ValueError(
        "class_counts must be a 1-D array of non-negative training-image counts with a "
        f"positive sum, got {counts!r}.")
  return np.log(np.maximum(counts / counts.sum(), 1e-12)).astype(np.float32)


def make_loss_fn(name: str, *, class_counts=None, focal_gamma: float = 1.0) -> LossFn:
  """Builds `loss_fn(logits, labels) -> [B]` by name: "ce", "balanced_softmax", "focal".

  "balanced_softmax" needs the training `class_counts` (for the log prior).
  """
  if name == "ce":
    return cross_entropy
  if name == "focal":
    if focal_gamma < 0:
      raise ValueError(f"focal_gamma must be >= 0, got {focal_gamma}.")

    def focal(logits, labels):
      return focal_loss(logits, labels, focal_gamma)

    return focal
  if name == "balanced_softmax":
    if class_counts is None:
      raise ValueError("The 'balanced_softmax' loss needs class_counts (training images per class).")
    log_prior = jnp.asarray(log_prior_from_counts(class_counts))

    def balanced_softmax(logits, labels):
      return balanced_softmax_cross_entropy(logits, labels, log_prior.astype(logits.dtype))

    return balanced_softmax
  raise ValueError(f"Unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}.")
