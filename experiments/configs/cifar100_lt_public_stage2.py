r"""Stage 2 of the public CIFAR-100-LT recipe (C2 of hitachi-rd-cv/Difficulty_Net).

LAS on the stage-1 classifier layer (weight, bias) and per-class logit scales,
backbone frozen with BatchNorm in eval mode, class-aware sampler (4 per class,
an epoch of max_c n_c x C samples), 50 epochs at lr 0.025 (1 + cos(pi e / 50)),
weight decay 1e-4 on weight, bias and scales, batch 128, the stage-1 transform,
starting from the best-validation stage-1 checkpoint. Every value and its
file:line: experiments/configs/_cifar_public.py. The paper's own text was not
checked.

  python -m experiments.train --config=experiments/configs/cifar100_lt_public_stage2.py \
    --config.stage1_workdir=runs/cifar100_lt_public_rho100 \
    --workdir=runs/cifar100_lt_public_rho100_stage2 --config.data.data_dir=DIR

(pass the stage-1 run's data overrides too). results.json reports the final
epoch, the best-validation epoch and, labelled as such, the maximum test
accuracy over epochs that the public code reports (C2:194-198).

Run time: 50 epochs of max_c n_c x C / 128 steps (371 at CIFAR-100, rho 100)
of one ResNet-32 forward and a head backward; not measured here.
"""

from experiments.configs import _cifar_public
from experiments.configs import _stage2
from experiments.configs import cifar100_lt_public


def get_config():
  return _stage2.add_stage2_fields(cifar100_lt_public.get_config(),
                                   _cifar_public.public_stage2_section())
