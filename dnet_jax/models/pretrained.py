"""Pretrained backbone weights from a local file (Places-LT: ImageNet-pretrained ResNet-152).

File format
-----------
A NumPy `.npz` archive with one array per variable. Each key is the '/'-joined
path of the variable in the Flax variables dict, collection first:

    params/conv_init/kernel                     (7, 7, 3, 64)   HWIO conv kernel
    params/bn_init/scale, params/bn_init/bias   (64,)
    batch_stats/bn_init/mean, .../var           (64,)
    params/stage1_block1/conv1/kernel           ...
    params/classifier/kernel, .../bias          (2048, 1000), (1000,)

`save_variables_npz` writes this format from any variables dict and
`load_variables_npz` reads it back, so a converted checkpoint round-trips. The
format is plain arrays (no pickled objects): `np.load(..., allow_pickle=False)`
is safe on files from elsewhere.

Loading into a model
--------------------
`load_pretrained(path, params, batch_stats)` takes the freshly initialised
`params` / `batch_stats` of the model (e.g. `state.params`) and returns them with
every variable replaced by the file's, after checking that every key exists and
every shape matches. The classifier head (`head_names`, default "classifier")
is kept at its fresh initialisation when its shape differs, which is the usual
case (1000 ImageNet classes -> 365 Places-LT classes); any other missing or
mismatched variable is an error that lists the offending keys.

From torchvision
----------------
torchvision's ResNets use the same layout as `dnet_jax.models.resnet_imagenet`
(stride on the 3x3 conv of the bottleneck). Dump a state dict to `.npz` with
PyTorch (not a dependency of this package), then convert:

    # with torch installed, once:
    import numpy as np, torchvision
    sd = torchvision.models.resnet152(weights="IMAGENET1K_V1").state_dict()
    np.savez("resnet152_torch.npz", **{k: v.numpy() for k, v in sd.items()})

    # here:
    from dnet_jax.models import pretrained
    pretrained.convert_torchvision_npz("resnet152_torch.npz", "resnet152_imagenet.npz")
    params, batch_stats, report = pretrained.load_pretrained(
        "resnet152_imagenet.npz", state.params, state.batch_stats)

For the Places-LT model (`resnet_imagenet.resnet152_places`: layer4's last block
dropped, a new block added) pass `dropped_names=("stage4_block3",)` and
`new_names=("extra_block",)`: the report lists what was loaded, which head and
new-block variables kept their initialisation, and which file keys were dropped.

Conv kernels are transposed OIHW -> HWIO and linear weights (out, in) ->
(in, out); BatchNorm `weight`/`bias`/`running_mean`/`running_var` become
`scale`/`bias`/`mean`/`var`; `num_batches_tracked` is dropped; a `module.`
prefix (from `nn.DataParallel`) is stripped. Caffe-converted ResNets (as in
some OLTR releases) put the stride on the first 1x1 conv instead: build the
model with `stride_in_1x1=True` to use those.
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Any, Iterable, Mapping, NamedTuple

import numpy as np

SEPARATOR = "/"


def _flat_leaves(variables: Mapping[str, Any]) -> dict[str, Any]:
  """'/'-joined path -> leaf (unconverted), in the tree's own key order."""
  flat = {}

  def visit(prefix: str, node):
    if isinstance(node, Mapping):
      for key, child in node.items():
        if SEPARATOR in str(key):
          raise ValueError(f"Variable name {key!r} under {prefix!r} contains {SEPARATOR!r}; "
                           "it cannot be stored as a path.")
        visit(f"{prefix}{SEPARATOR}{key}" if prefix else str(key), child)
    else:
      flat[prefix] = node

  visit("", variables)
  return flat


def flatten_variables(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """{"params": {"conv": {"kernel": x}}} -> {"params/conv/kernel": np.asarray(x)}."""
  return {key: np.asarray(leaf) for key, leaf in _flat_leaves(variables).items()}


def unflatten_variables(flat: Mapping[str, Any]) -> dict:
  """The inverse of `flatten_variables` (nested plain dicts)."""
  tree: dict = {}
  for path, value in flat.items():
    *parents, leaf = path.split(SEPARATOR)
    node = tree
    for name in parents:
      node = node.setdefault(name, {})
      if not isinstance(node, dict):
        raise ValueError(f"Key {path!r} nests under a variable, not a module.")
    node[leaf] = value
  return tree


def save_variables_npz(path: str | os.PathLike, variables: Mapping[str, Any]) -> None:
  """Writes a variables dict ({"params": ..., "batch_stats": ...}) as a '/'-keyed `.npz`.

  The file is written to a temporary name and renamed, so a crash never leaves
  a truncated file under `path`.
  """
  flat = flatten_variables(variables)
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(suffix=".npz", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **flat)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All arrays of a `.npz` file, by key (no pickled objects allowed)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"Pretrained weights file {os.fspath(path)!r} does not exist.")
  with np.load(path, allow_pickle=False) as archive:
    return {key: archive[key] for key in archive.files}


def load_variables_npz(path: str | os.PathLike) -> dict:
  """Reads a file written by `save_variables_npz` into a nested variables dict."""
  return unflatten_variables(read_npz(path))


class LoadReport(NamedTuple):
  """What `load_pretrained` did, by '/'-joined key."""
  loaded: tuple[str, ...]  # replaced by the file's values
  skipped_head: tuple[str, ...]  # head variables kept at their initialisation (shape differs)
  unused: tuple[str, ...]  # keys in the file that the model does not have
  kept_new: tuple[str, ...] = ()  # model variables of `new_names`, kept at their initialisation
  dropped: tuple[str, ...] = ()  # file keys not loaded on purpose: under `dropped_names`, or
  # head variables the model's head does not have


def _is_head(key: str, head_names: Iterable[str]) -> bool:
  """Whether `key` ("collection/module/...") lies under one of the top-level modules."""
  parts = key.split(SEPARATOR)[1:]  # drop the collection
  return bool(parts) and parts[0] in tuple(head_names)


def _listing(keys, limit: int = 20) -> str:
  keys = list(keys)
  shown = ", ".join(keys[:limit])
  return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_pretrained(path: str | os.PathLike, params: Any, batch_stats: Any = None, *,
                    head_names: Iterable[str] = ("classifier",),
                    new_names: Iterable[str] = (), dropped_names: Iterable[str] = (),
                    allow_unused: bool = False) -> tuple[Any, Any, LoadReport]:
  """Replaces `params` / `batch_stats` by the pretrained values in `path`.

  Args:
    path: a `.npz` in the format of this module (see the module docstring).
    params: the model's initialised parameters (a nested dict); they fix the
      expected keys, shapes and dtypes.
    batch_stats: its BatchNorm statistics ({} or None if it has none).
    head_names: top-level modules that form the classifier head. Where the file's
      shape differs from the model's (another number of classes), they keep their
      initial values; a head missing from the file is also kept, and head
      variables of the file that the model's head lacks (a linear head's bias
      under a cosine head) are reported as dropped.
    new_names: top-level modules that are new in this model (Places-LT: "extra_block"):
      always kept at their initialisation, whatever the file holds.
    dropped_names: top-level modules of the file that this model removed on purpose
      (Places-LT: "stage4_block3", torchvision's layer4.2): their keys are not loaded
      and not an error. A name that matches no key of the file is an error (it is
      likely misspelt).
    allow_unused: accept keys in the file that the model lacks (listed in the
      report); by default they are an error, since they usually mean the file
      belongs to another architecture.

  Returns:
    (params, batch_stats, report): new trees of the same structure, shapes and
    dtypes as the inputs (values cast to the model's dtypes), and a `LoadReport`.

  Raises:
    FileNotFoundError: no such file.
    ValueError: naming the missing keys, the shape mismatches outside the head
      and (without `allow_unused`) the unused keys (up to 20 of each, with counts).
  """
  import jax  # local: this module's file helpers need only numpy

  batch_stats = batch_stats or {}
  new_names, dropped_names = tuple(new_names), tuple(dropped_names)
  target = _flat_leaves({"params": params, "batch_stats": batch_stats})
  source = read_npz(path)
  dropped = sorted(key for key in source if _is_head(key, dropped_names))
  unmatched = [name for name in dropped_names
               if not any(_is_head(key, (name,)) for key in source)]
  if unmatched:
    raise ValueError(f"dropped_names {unmatched} match no variable of {os.fspath(path)!r}; "
                     "name top-level modules of the file (e.g. 'stage4_block3').")
  kept_new = [key for key in target if _is_head(key, new_names)]

  missing, mismatched, loaded, skipped = [], [], [], []
  for key, value in target.items():
    if _is_head(key, new_names):
      continue
    head = _is_head(key, head_names)
    if key not in source:
      (skipped if head else missing).append(key)
      continue
    if source[key].shape != np.shape(value):
      if head:
        skipped.append(key)
      else:
        mismatched.append(f"{key}: file {source[key].shape} vs model {np.shape(value)}")
      continue
    loaded.append(key)
  # A file's head variable that the model's head lacks (a linear head's bias under a cosine
  # head) is part of the replaced head, not a sign of another architecture.
  dropped += sorted(key for key in set(source) - set(target)
                    if _is_head(key, head_names) and key not in dropped)
  unused = sorted(set(source) - set(target) - set(dropped))

  problems = []
  if missing:
    problems.append(f"{len(missing)} missing key(s): {_listing(missing)}")
  if mismatched:
    problems.append(f"{len(mismatched)} shape mismatch(es): {_listing(mismatched)}")
  if unused and not allow_unused:
    problems.append(f"{len(unused)} unused key(s) in the file (pass allow_unused=True to "
                    f"ignore them): {_listing(unused)}")
  if problems:
    raise ValueError(f"Cannot load pretrained weights from {os.fspath(path)!r} into this "
                     "model: " + "; ".join(problems) + ".")

  loaded_set = set(loaded)
  new_flat = {key: jax.numpy.asarray(source[key], dtype=leaf.dtype) if key in loaded_set else leaf
              for key, leaf in target.items()}
  tree = unflatten_variables(new_flat)
  new_params = _same_structure(params, tree.get("params", {}))
  new_batch_stats = _same_structure(batch_stats, tree.get("batch_stats", {}))
  return new_params, new_batch_stats, LoadReport(tuple(loaded), tuple(skipped), tuple(unused),
                                                 tuple(kept_new), tuple(dropped))


def _same_structure(reference, nested: dict):
  """`nested` rebuilt with the container type of `reference` (dict or FrozenDict)."""
  import jax

  ref_leaves, treedef = jax.tree.flatten(reference)
  new_leaves, _ = jax.tree.flatten(nested)
  if len(ref_leaves) != len(new_leaves):  # cannot happen: same keys by construction
    raise AssertionError("internal error: variable trees differ")
  # jax.tree flattens dicts in sorted-key order on both sides, so leaves line up.
  return jax.tree.unflatten(treedef, new_leaves)


# --- torchvision names -> this package's names ---------------------------------------------

_BN_FIELDS = {"weight": ("params", "scale"), "bias": ("params", "bias"),
              "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


def _torch_module_name(name: str) -> str:
  """torchvision module path -> Flax module path (e.g. layer2.0.downsample.1 ->
  stage2_block1/downsample_bn)."""
  if name == "conv1":
    return "conv_init"
  if name == "bn1":
    return "bn_init"
  if name == "fc":
    return "classifier"
  match = re.fullmatch(r"layer(\d+)\.(\d+)\.(conv\d|bn\d|downsample\.0|downsample\.1)", name)
  if not match:
    raise ValueError(f"Unrecognised torchvision ResNet module {name!r}.")
  stage, block, inner = match.groups()
  inner = {"downsample.0": "downsample_conv", "downsample.1": "downsample_bn"}.get(inner, inner)
  return f"stage{stage}_block{int(block) + 1}{SEPARATOR}{inner}"


def from_torchvision_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """A torchvision ResNet state dict (name -> array) in this module's flat format.

  Works for every torchvision ResNet (basic and bottleneck blocks); the result
  loads into `resnet_imagenet.ImageNetResNet` of the same depth with
  `load_pretrained` (after `save_variables_npz`, or directly via
  `unflatten_variables`).
  """
  flat = {}
  for name, value in state_dict.items():
    value = np.asarray(value)
    name = name[len("module."):] if name.startswith("module.") else name
    module, _, field = name.rpartition(".")
    if field == "num_batches_tracked":
      continue
    target_module = _torch_module_name(module)
    leaf = target_module.rsplit(SEPARATOR, 1)[-1]
    if leaf.startswith("conv") or leaf == "downsample_conv":
      if field != "weight":
        raise ValueError(f"Unexpected conv field {name!r} (convs have no bias in a ResNet).")
      flat[f"params/{target_module}/kernel"] = np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO
    elif leaf == "classifier":
      if field == "weight":
        flat["params/classifier/kernel"] = value.T
      elif field == "bias":
        flat["params/classifier/bias"] = value
      else:
        raise ValueError(f"Unexpected classifier field {name!r}.")
    else:  # BatchNorm
      if field not in _BN_FIELDS:
        raise ValueError(f"Unexpected BatchNorm field {name!r}.")
      collection, flax_field = _BN_FIELDS[field]
      flat[f"{collection}/{target_module}/{flax_field}"] = value
  return flat


def convert_torchvision_npz(source: str | os.PathLike, destination: str | os.PathLike) -> None:
  """Converts a `.npz` of a torchvision ResNet state dict into this module's format."""
  flat = from_torchvision_state_dict(read_npz(source))
  save_variables_npz(destination, unflatten_variables(flat))
