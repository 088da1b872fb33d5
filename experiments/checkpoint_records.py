"""What a checkpoint records beside its arrays, and the checks made with it.

  * the meta record: the run's identity (model, number of classes, method,
    image shape: `IDENTITY_FIELDS`) and the name, shape and dtype of every state
    array with their fingerprint (`run_identity`); `compatibility_problems` says,
    field by field, why a checkpoint cannot be resumed by a run;
  * digests: the SHA-256 of every array's dtype, shape and bytes
    (`state_digests`) and of the loop record as canonical JSON (`loop_digest`);
  * `non_finite_arrays`: the arrays holding a NaN or an Inf (a state that must not
    be saved).
`experiments/checkpointing.py` writes and verifies them.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

FORMAT_VERSION = 3
# The fields of the meta record that must equal the resuming run's.
IDENTITY_FIELDS = ("model", "num_classes", "method", "image_shape")


def _leaves_with_names(tree) -> list[tuple[str, Any]]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(jax.tree_util.keystr(path, simple=True, separator="/"), leaf) for path, leaf in leaves]


def state_shapes(tree) -> list[list]:
  """[[name, shape, dtype], ...] of every array of a state (arrays or ShapeDtypeStructs)."""
  return [[name, [int(d) for d in np.shape(leaf)], str(np.dtype(leaf.dtype))]
          for name, leaf in _leaves_with_names(tree)]


def shapes_fingerprint(shapes: Sequence[Sequence]) -> str:
  """A short hash of `state_shapes`: equal iff the two states have the same arrays."""
  return hashlib.sha256(json.dumps(list(shapes)).encode()).hexdigest()[:16]


def _array_digest(x: np.ndarray) -> str:
  x = np.ascontiguousarray(x)
  h = hashlib.sha256(f"{x.dtype.str}{x.shape}".encode())
  h.update(x.tobytes())
  return h.hexdigest()


def state_digests(host_state) -> dict[str, str]:
  """{array name: SHA-256 of its dtype, shape and bytes} of a state already on the host."""
  return {name: _array_digest(np.asarray(leaf)) for name, leaf in _leaves_with_names(host_state)}


@jax.jit
def _non_finite_flags(tree):
  def flags(x):
    if not jnp.issubdtype(x.dtype, jnp.inexact):
      return jnp.zeros((2,), bool)
    return jnp.stack([jnp.any(jnp.isnan(x)), jnp.any(jnp.isinf(x))])
  return jax.tree.map(flags, tree)


def non_finite_arrays(state) -> list[str]:
  """Names of the floating-point arrays of a state that hold a NaN or an Inf (checked on
  the device: one small transfer)."""
  flags = jax.device_get(_non_finite_flags(state))
  bad = []
  for name, (nan, inf) in _leaves_with_names(flags):
    kinds = [k for k, f in (("nan", nan), ("inf", inf)) if f]
    if kinds:
      bad.append(f"{name} ({' and '.join(kinds)})")
  return bad


def run_identity(*, model: str, num_classes: int, method: str, image_shape, abstract_state) -> dict:
  """What a checkpoint must match to be resumed by a run: the fields of `IDENTITY_FIELDS`
  and the shapes of the state's arrays (`abstract_state`: e.g. from `jax.eval_shape`)."""
  shapes = state_shapes(abstract_state)
  return {"model": str(model), "num_classes": int(num_classes), "method": str(method),
          "image_shape": [int(d) for d in image_shape], "state_shapes": shapes,
          "state_fingerprint": shapes_fingerprint(shapes)}


def compatibility_problems(saved: dict, expected: dict) -> list[str]:
  """Human-readable differences between a checkpoint's meta record and a run's identity."""
  problems = []
  if saved.get("format") != FORMAT_VERSION:
    problems.append(f"checkpoint format {saved.get('format')!r} (this runner reads "
                    f"{FORMAT_VERSION})")
  for field in IDENTITY_FIELDS:
    if field in expected and saved.get(field) != expected[field]:
      problems.append(f"{field}: {saved.get(field)!r} in the checkpoint, {expected[field]!r} now")
  if (not problems and "state_fingerprint" in expected
      and saved.get("state_fingerprint") != expected["state_fingerprint"]):
    old = {name: (shape, dtype) for name, shape, dtype in saved.get("state_shapes", [])}
    new = {name: (shape, dtype) for name, shape, dtype in expected["state_shapes"]}
    diffs = [f"{name}: {old[name][0]} {old[name][1]} -> {new[name][0]} {new[name][1]}"
             for name in new if name in old and old[name] != new[name]]
    diffs += [f"{name} is new" for name in new if name not in old]
    diffs += [f"{name} is gone" for name in old if name not in new]
    problems.append("the state's arrays differ (" + "; ".join(diffs[:5])
                    + ("; ..." if len(diffs) > 5 else "") + ")")
  return problems


def loop_digest(loop: dict) -> str:
  """SHA-256 of a loop record as JSON with sorted keys (what orbax's JsonSave round-trips)."""
  canonical = json.dumps(json.loads(json.dumps(loop)), sort_keys=True, allow_nan=True)
  return hashlib.sha256(canonical.encode()).hexdigest()
