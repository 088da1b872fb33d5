"""Optimizers and learning-rate schedules of the paper's recipes, as optax objects."""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import jax
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


DEFAULT_GROUP = "default"


def _path_string(path) -> str:
  """A key path of `jax.tree` as '/'-joined names, e.g. 'stage4_block1/conv1/kernel'."""
  parts = []
  for entry in path:
    for attribute in ("key", "name", "idx"):
      if hasattr(entry, attribute):
        parts.append(str(getattr(entry, attribute)))
        break
    else:
      parts.append(str(entry))
  return "/".join(parts)


def parameter_group_labels(params, patterns: Mapping[str, Sequence[str]],
                           default_group: str | None = DEFAULT_GROUP):
  """The group name of every parameter: a pytree of strings shaped like `params`.

  Each parameter's path ('/'-joined, e.g. 'extra_block/conv1/kernel') is matched
  against the regular expressions of each group with `re.search`, groups in the
  order of `patterns` and patterns in their order; the first match wins. A
  parameter that no pattern matches belongs to `default_group`.

  Raises:
    ValueError: a pattern that matches no parameter (likely misspelt; the message
      lists some paths), an invalid regular expression, a group named like the
      default group, or parameters left without a group when `default_group` is None.
  """
  if default_group is not None and default_group in patterns:
    raise ValueError(f"Group name {default_group!r} is reserved for unmatched parameters; "
                     "rename the group.")
  compiled = []
  for group, group_patterns in patterns.items():
    if isinstance(group_patterns, str):
      raise ValueError(f"Group {group!r}: give a list of patterns, not the string "
                       f"{group_patterns!r}.")
    for pattern in group_patterns:
      try:
        compiled.append((group, pattern, re.compile(pattern)))
      except re.error as error:
        raise ValueError(f"Group {group!r}: invalid pattern {pattern!r} ({error}).") from None
  leaves, treedef = jax.tree.flatten_with_path(params)
  paths = [_path_string(path) for path, _ in leaves]
  used, labels, unmatched = set(), [], []
  for path in paths:
    label = next(((group, pattern) for group, pattern, regex in compiled if regex.search(path)),
                 None)
    if label is None:
      unmatched.append(path)
      labels.append(default_group)
    else:
      used.add(label)
      labels.append(label[0])
  unused = [f"{group}: {pattern!r}" for group, pattern, _ in compiled if (group, pattern) not in used]
  if unused:
    raise ValueError(f"Parameter-group pattern(s) that match no parameter (first match wins, "
                     f"so an earlier pattern may take them all): {', '.join(unused)}. "
                     f"Parameter paths look like: {', '.join(paths[:5])}.")
  if unmatched and default_group is None:
    raise ValueError(f"{len(unmatched)} parameter(s) match no group and there is no default "
                     f"group: {', '.join(unmatched[:10])}.")
  return jax.tree.unflatten(treedef, labels)


def parameter_group_multipliers(params, groups: Mapping[str, tuple[Sequence[str], float]],
                                default: float = 1.0):
  """Each parameter's learning-rate multiplier: a pytree of floats shaped like `params`.

  `groups` = {name: (patterns, multiplier)} (patterns as in `parameter_group_labels`);
  unmatched parameters get `default`. With the optimizer of
  {name: (patterns, multiplier x schedule)} and `default_learning_rate=schedule`, this
  is the `lookahead_scale` of `steps.train_step` that gives its lookahead the same
  per-group rates.
  """
  labels = parameter_group_labels(params, {name: patterns for name, (patterns, _) in
                                           groups.items()})
  factors = {name: float(multiplier) for name, (_, multiplier) in groups.items()}
  return jax.tree.map(lambda label: factors.get(label, float(default)), labels)


def parameter_group_optimizer(groups: Mapping[str, tuple[Sequence[str], Any]],
                              default_learning_rate=None, momentum: float = 0.9,
                              weight_decay: float = 2e-4,
                              nesterov: bool = False) -> optax.GradientTransformation:
  """`classifier_optimizer` with its own learning rate per group of parameters.

  Args:
    groups: {name: (patterns, learning_rate)}: regular expressions searched in the
      '/'-joined parameter paths (first match wins, in this order; see
      `parameter_group_labels`) and a float or an optax schedule. The Places-LT
      recipe (RECIPES.md "Places-LT"): {"new": (["^extra_block/", "^classifier/"],
      0.01)} with `default_learning_rate=0.001` for the pretrained backbone.
    default_learning_rate: learning rate (or schedule) of the parameters no pattern
      matches (group "default"); None makes such parameters an error.
    momentum, weight_decay, nesterov: as `classifier_optimizer`, the same in every group.

  Every group is SGD with momentum and L2 weight decay added to the gradient, as a
  torch.optim.SGD parameter group: for a parameter p of group g,
  v <- momentum v + (grad + weight_decay p), p <- p - lr_g(step) v.
  The labels are computed from the parameters at `init`, so a pattern matching
  nothing raises there (a ValueError naming it).
  """
  if not groups:
    raise ValueError("parameter_group_optimizer needs at least one group; use "
                     "classifier_optimizer for a single learning rate.")
  transforms = {name: classifier_optimizer(lr, momentum, weight_decay, nesterov)
                for name, (_, lr) in groups.items()}
  default_group = None
  if default_learning_rate is not None:
    default_group = DEFAULT_GROUP
    transforms[DEFAULT_GROUP] = classifier_optimizer(default_learning_rate, momentum,
                                                     weight_decay, nesterov)
  patterns = {name: patterns for name, (patterns, _) in groups.items()}
  return optax.multi_transform(
      transforms, lambda params: parameter_group_labels(params, patterns, default_group))
