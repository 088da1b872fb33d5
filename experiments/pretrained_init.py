"""Starting a run from pretrained backbone weights (`config.pretrained_path`).

Places-LT trains an ImageNet-pretrained ResNet-152 (OLTR, Liu et al. CVPR
2019; Difficulty-Net follows). The weights come from a `.npz` in the format
of `dnet_jax.models.pretrained` (convert torchvision's with
`pretrained.convert_torchvision_npz`). They replace the freshly initialised
classifier parameters and BatchNorm statistics *before* the first step, and
only for a new run: a resumed run restores its own checkpoint instead. The
classifier head keeps its fresh initialisation when its shape differs (1000
ImageNet classes -> 365 Places-LT classes). With the Places-LT surgery
(`model_kwargs` drop_last_blocks=1, extra_block=True; `surgery_names`) the dropped
block's weights are skipped and the new block keeps its initialisation, as the
public code (ImageNet_Places-LT/models/resnet_places.py:353-375, train_stage1.py:169).
The classifier optimizer state is
re-initialised from the loaded parameters, so nothing derived from the random
initialisation survives.

Multi-host: every process reads the file (the same path must exist on every
host, e.g. a shared or copied file; `np.load` cannot read gs:// paths), so
every process starts from the same state, as replicated training requires.
"""

from __future__ import annotations

import os

from absl import logging

from dnet_jax.models import pretrained
from experiments.errors import InvalidInputError


def check_path(path: str) -> None:
  """Raises InvalidInputError if `path` is set but is not a file (cheap; before compiling)."""
  if path and not os.path.isfile(path):
    raise InvalidInputError(
        f"pretrained_path={path!r} does not exist. It must be a .npz of backbone weights in "
        "the format of dnet_jax.models.pretrained (convert torchvision's ResNet weights with "
        "pretrained.convert_torchvision_npz), present on every host.")


def surgery_names(model) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(new, dropped) top-level module names of an ImageNet ResNet with the Places-LT surgery.

  `extra_block=True` adds "extra_block" (new: kept at its initialisation);
  `drop_last_blocks=k` removes the last k blocks of the last stage, e.g.
  "stage4_block3" for ResNet-152 (torchvision's layer4.2; dropped: their weights
  in the file are not loaded). Models without these fields give ((), ()).
  """
  new = ("extra_block",) if getattr(model, "extra_block", False) else ()
  k = int(getattr(model, "drop_last_blocks", 0) or 0)
  if not k:
    return new, ()
  sizes = tuple(int(n) for n in model.stage_sizes)
  stage, last = len(sizes), sizes[-1]
  return new, tuple(f"stage{stage}_block{b}" for b in range(last - k + 1, last + 1))


def load_into_state(state, path: str, tx, *, head_names=("classifier",), new_names=(),
                    dropped_names=()):
  """`state` with its classifier parameters and BatchNorm statistics from `path`.

  Args:
    state: a fresh `TrainState`.
    path: the `.npz` weights file.
    tx: the classifier's optimizer; its state is re-initialised for the new parameters.
    head_names: top-level modules that form the head (kept at their initialisation when
      their shape differs from the file's).
    new_names, dropped_names: modules the model added (kept at their initialisation) and
      removed (their weights in the file are skipped); see `surgery_names`.

  Raises:
    InvalidInputError: the file is missing or does not fit the model (the message lists
      the missing keys and shape mismatches).
  """
  check_path(path)
  try:
    params, batch_stats, report = pretrained.load_pretrained(
        path, state.params, state.batch_stats, head_names=head_names, new_names=new_names,
        dropped_names=dropped_names)
  except (ValueError, OSError) as e:
    raise InvalidInputError(f"pretrained_path: {e}") from e
  logging.info("Loaded %d pretrained arrays from %s; re-initialised head: %s; new: %s; "
               "dropped: %s.", len(report.loaded), path,
               ", ".join(report.skipped_head) or "none", ", ".join(new_names) or "none",
               ", ".join(dropped_names) or "none")
  return state.replace(params=params, batch_stats=batch_stats, opt_state=tx.init(params))
