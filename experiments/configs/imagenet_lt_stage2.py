r"""Stage 2 on ImageNet-LT: classifier re-training of a finished `imagenet_lt.py` run.

  python -m experiments.train --config=experiments/configs/imagenet_lt_stage2.py \
    --workdir=runs/imagenet_lt_r50_las --config.data.image_root=IMAGENET \
    --config.stage1_workdir=runs/imagenet_lt_r50

The stage-1 fields (model, data) must be those of the stage-1 run (the runner
checks them against its results.json). Settings from the public code's
ImageNet-LT stage 2 (RECIPES.md, "ImageNet-LT, stage 2"): 10 epochs, lr 0.05 at
batch 128 with a cosine schedule, SGD momentum 0.9, weight decay 2e-4,
class-balanced sampling, LAS (0.3, 0.0) from the imbalance factor 256
(`las_rule="imagenet"`), shifted BatchNorm. Time: an epoch is a pass over the
115,846 training images at stage-1 speed without the meta step.
"""

from experiments.configs import _stage2
from experiments.configs import imagenet_lt


def get_config():
  config = _stage2.add_stage2_fields(imagenet_lt.get_config())
  s = config.stage2
  s.batch_size = 128
  s.learning_rate = 0.05
  s.las_rule = "imagenet"
  s.shift_bn = True
  return config
