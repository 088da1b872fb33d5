r"""Difficulty-Net on CIFAR-10-LT with ResNet-32: the SHORT recipe (200 epochs), for quick runs.

This is not what the public code runs (that is cifar10_lt_public.py: 12,800
epochs, AutoAugment + Cutout, wd 1e-4). It is the common 200-epoch step
schedule of the LDAM-DRW line of work as METHOD.md states it (values below come
from METHOD.md and experiments/configs/base.py); the paper's own text was not
checked. Meta batches are augmented like training batches here (augment_meta;
the public code uses the test transform for them).

Command (TFDS data prepared beforehand with `tfds build cifar10 --data_dir=DIR`
on a machine with internet access):

  python -m experiments.train --config=experiments/configs/cifar10_lt.py \
    --workdir=runs/cifar10_lt_rho100 --config.data.data_dir=DIR

or, from the original python pickles (cifar-10-python.tar.gz extracted in DIR):

  ... --config.data.source=cifar_pickle --config.data.data_dir=DIR

Other imbalance factors: --config.data.imbalance_factor=50 (10, 20, 50, 100, 200).
Baselines: --config.method=ce (or class_balanced, cdb, focal, balanced_softmax);
the public code's meta-gradient: --config.meta_grad=driver_only. Cosine
learning rate instead of steps: --config.lr_schedule=cosine.

Run time: 200 epochs of about 93 steps (11,9k train images at rho=100, batch
128); each Difficulty-Net step costs about three forward/backward passes of
ResNet-32 (lookahead, meta pass, real update). Estimated (not measured here)
at roughly 20-40 minutes on one modern GPU; impractically slow on CPU.

Values (METHOD.md; base.py): SGD lr 0.1, momentum 0.9, weight decay 2e-4, batch 128,
5 warm-up epochs then x0.1 at epochs 160 and 180; Difficulty-Net hidden
(128, 128) without biases, Adam lr 1e-5, weight decay 1e-4; lambda = 0.3;
meta set = last 25 images per class; meta batch 100; crop + flip.
"""

from experiments.configs import base


def get_config():
  config = base.get_config()
  config.data.source = "tfds"
  config.data.name = "cifar10"
  config.data.imbalance_factor = 100.0
  return config
