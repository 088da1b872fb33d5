r"""Stage 2 (label-aware smoothing, MiSLAS's recipe) on top of a cifar100_lt (short recipe) run.

Not the public Difficulty-Net stage 2 (that is cifar100_lt_public_stage2.py: 50
epochs, class-aware sampler, per-epoch cosine from 0.05, wd 1e-4 on the scales
too, best-validation start). The values below are MiSLAS's as METHOD.md states
them (experiments/configs/_stage2.py); the paper's own text was not checked.

Command:

  python -m experiments.train --config=experiments/configs/cifar100_lt_stage2.py \
    --config.stage1_workdir=runs/cifar100_lt_rho100 --workdir=runs/cifar100_lt_rho100_las \
    --config.data.data_dir=DIR

(pass the stage-1 run's data overrides too, e.g. --config.data.imbalance_factor=50).
cRT / LWS: --config.stage2.method=crt / lws.

The paper's CIFAR-100-LT numbers (52.96 % at rho = 100) come from the public
recipe's stage 2, not this one. Recipe (MiSLAS, CIFAR): 10 epochs, batch 128, SGD lr 0.1 with cosine
decay, momentum 0.9, weight decay 2e-4, class-balanced sampling, the stage-1
classifier layer at 0.2 x lr next to learnable logit scales, LAS with
(eps_head, eps_tail) from the imbalance factor (rho = 100: (0.4, 0.1); 50: (0.3,
0.0); 10: (0.2, 0.0); 200: (0.4, 0.0)). BatchNorm statistics stay frozen
(MiSLAS re-estimates them: --config.stage2.shift_bn=True).

Run time: 10 epochs of one forward/backward pass of ResNet-32 over about 80
batches: a small fraction of stage 1; not measured here.
"""

from experiments.configs import _stage2
from experiments.configs import cifar100_lt


def get_config():
  return _stage2.add_stage2_fields(cifar100_lt.get_config())
