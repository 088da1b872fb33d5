r"""Stage 2 on Places-LT: classifier re-training of a finished `places_lt.py` run.

  python -m experiments.train --config=experiments/configs/places_lt_stage2.py \
    --workdir=runs/places_lt_r152_las --config.data.image_root=PLACES365 \
    --config.stage1_workdir=runs/places_lt_r152

The stage-1 fields (model, data) must be those of the stage-1 run. Settings as
`imagenet_lt_stage2.py` (the public code's ImageNet-LT stage 2, RECIPES.md),
with LAS smoothing from the imbalance factor 996 by the ImageNet rule.
"""

from experiments.configs import _stage2
from experiments.configs import places_lt


def get_config():
  config = _stage2.add_stage2_fields(places_lt.get_config())
  s = config.stage2
  s.batch_size = 128
  s.learning_rate = 0.05
  s.las_rule = "imagenet"
  s.shift_bn = True
  return config
