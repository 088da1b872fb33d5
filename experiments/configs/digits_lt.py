r"""Difficulty-Net on long-tailed digits: the embedded default, no download.

Command:

  python -m experiments.train --config=experiments/configs/digits_lt.py --workdir=/tmp/digits_lt

Run time: about 30 seconds on 2 CPU cores, JAX compilation included (measured
30 s wall on a shared 2-core machine; 270 steps). Prints about 80 % test top-1
(many 99, medium 98, few 54) at rho = 50; plain CE (--config.method=ce) about 80 / 52 few.

Data: scikit-learn's 8x8 digits (1,797 images, 10 classes), split per class
into 50 test, 10 meta (validation) and a train pool, which is subsampled to a
long tail n_c = int(114 * rho^(-c/9)); at rho = 50: 114, 73, 47, 30, 20, 12,
8, 5, 3, 2 (314 images). Shot groups scaled to this size: many-shot > 40
images (3 classes), few-shot < 10 (4 classes), medium the 3 others (CIFAR uses
100 / 20 with 475 images in the head class). Model: a small CNN with BatchNorm.

Differences from the CIFAR recipe, to get a meaningful result in a minute:
fewer epochs, smaller batches, no augmentation, and Difficulty-Net's Adam
learning rate 1e-3 (the paper's ImageNet value) rather than 1e-5, which would
barely move the network in a few hundred steps.
"""

from experiments.configs import base


def get_config():
  config = base.get_config()
  config.model = "small_cnn"
  config.data.source = "digits"
  config.data.name = "digits"
  config.data.imbalance_factor = 50.0
  config.data.meta_per_class = 10
  config.data.digits_test_per_class = 50
  config.many_threshold = 40
  config.few_threshold = 10

  config.num_epochs = 30
  config.batch_size = 32
  config.meta_batch_size = 50
  config.eval_batch_size = 100
  config.learning_rate = 0.05
  config.weight_decay = 5e-4
  config.warmup_epochs = 2
  config.lr_decay_epochs = (20, 26)
  config.augment = False
  config.dnet.lr = 1e-3
  config.log_every_steps = 20
  return config
