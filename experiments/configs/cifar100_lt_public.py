r"""Stage 1 of Difficulty-Net on CIFAR-100-LT as the public code runs it (the `public` recipe).

Recipe: experiments/configs/_cifar_public.py lists every value with the file and
line of hitachi-rd-cv/Difficulty_Net it comes from (12,800 epochs, lr 0.1 -> 0.2
over 400 epochs then x0.1 at 6400 and 9600, weight decay 1e-4, batch 128,
AutoAugment + Cutout on the host, meta batches with the test transform,
meta_grad="driver_only"). The paper's own text was not checked. Paper's number
it is compared with: 52.96 / 56.90 / 65.22 % at rho = 100 / 50 / 10 (two stages).

Command (TFDS cifar100 prepared in DIR):

  python -m experiments.train --config=experiments/configs/cifar100_lt_public.py \
    --workdir=runs/cifar100_lt_public_rho100 --config.data.data_dir=DIR

then stage 2: experiments/configs/cifar100_lt_public_stage2.py. Other imbalance
factors: --config.data.imbalance_factor=50. The exact meta-gradient:
--config.meta_grad=nested. Plain CE: --config.method=ce.

Run time: 12,800 epochs of about 80 steps at rho = 100 (about 1M steps); each
Difficulty-Net step is about three ResNet-32 forward/backward passes, and the
host transform (AutoAugment) needs several CPU cores per accelerator
(python -m experiments.augment_benchmark). Not measured here: expect days on
one accelerator.
"""

from experiments.configs import _cifar_public
from experiments.configs import cifar100_lt


def get_config():
  return _cifar_public.apply_public_stage1(cifar100_lt.get_config())
