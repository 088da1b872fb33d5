r"""Difficulty-Net on CIFAR-100-LT with ResNet-32: the SHORT recipe (200 epochs), for quick runs.

This is not what the public code runs (that is cifar100_lt_public.py: 12,800
epochs, AutoAugment + Cutout, wd 1e-4). It is the common 200-epoch step
schedule of the LDAM-DRW line of work as METHOD.md states it (values below come
from METHOD.md and experiments/configs/base.py); the paper's own text was not
checked. Meta batches are augmented like training batches here (augment_meta;
the public code uses the test transform for them).

Command (TFDS data prepared beforehand with `tfds build cifar100 --data_dir=DIR`
on a machine with internet access):

  python -m experiments.train --config=experiments/configs/cifar100_lt.py \
    --workdir=runs/cifar100_lt_rho100 --config.data.data_dir=DIR

or, from the original python pickles (cifar-100-python.tar.gz extracted in DIR):

  ... --config.data.source=cifar_pickle --config.data.data_dir=DIR

The paper reports 52.96 % top-1 at rho=100 (56.90 at 50, 65.22 at 10) with the
public recipe and two stages, not with this one; plain CE reaches about 38 %. Other imbalance factors:
--config.data.imbalance_factor=50. Baselines: --config.method=ce, etc.
To plot per-class accuracy against a finished CE run:
--config.compare_with=runs/cifar100_lt_ce.

Run time: 200 epochs of about 80 steps (10,302 train images at rho=100, batch
128); each Difficulty-Net step costs about three forward/backward passes of
ResNet-32. Estimated (not measured here) at roughly 20-40 minutes on one
modern GPU; impractically slow on CPU.

Values (METHOD.md; base.py): as cifar10_lt.py (SGD lr 0.1, momentum 0.9, wd 2e-4,
batch 128, warm-up 5, x0.1 at 160/180; Difficulty-Net (128, 128) no bias,
Adam 1e-5, wd 1e-4; lambda 0.3; meta batch 100).
"""

from experiments.configs import base


def get_config():
  config = base.get_config()
  config.data.source = "tfds"
  config.data.name = "cifar100"
  config.data.imbalance_factor = 100.0
  return config
