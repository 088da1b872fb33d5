r"""The `public` CIFAR-LT recipe: what hitachi-rd-cv/Difficulty_Net's CIFAR code runs
(not a runnable config itself; `cifar{10,100}_lt_public[_stage2].py` use it).

Every value below is read from the public code (file:line, as in
../shared/RECIPES.md: C1 = CIFAR-LT/cifar_train_exaugment.py, C2 =
CIFAR-LT/cifar_train_exaugment_stage2.py, AA = CIFAR-LT/auto_augment.py). The
paper's own text was not checked; where the code and METHOD.md differ, the code
is followed here and the difference is named.

Stage 1 (`apply_public_stage1`):
  num_epochs 12,800                     C1:332 (--max_epochs default; the README
                                        command keeps it)
  lr per epoch e: 0.1 (1 + min(e/400, 1)) x 0.1^[e >= 6400] x 0.1^[e >= 9600]
                                        C1:46-51 (lr_schedule="public_cifar");
                                        the lookahead uses it too, C1:185
  SGD momentum 0.9, no Nesterov, L2 1e-4 on every tensor
                                        C1:84-96 (METHOD.md: 2e-4)
  batch 128                             C1 DataLoader (the last partial batch
                                        is kept there, dropped here)
  meta_grad driver_only                 C1:163 detaches the weights, so the meta
                                        cross-entropy never reaches Difficulty-Net
  Difficulty-Net C -> 128 -> 128 -> C, no bias; Adam 1e-5, L2 1e-4; lambda 0.3
  meta batch 100 from the 25-per-class meta set, TEST transform
                                        C1:457-466 (augment_meta=False)
  train transform: reflect-pad 4, RandomCrop(32, padding=4), flip,
    AutoAugment CIFAR-10 policy, Cutout 16 with the image-mean fill and the
    AA:266 typo (`left = 0 if left < 0 else top`, cutout_public_typo=True)
                                        C1:420-433, AA:11-35, AA:251-272
                                        (host_transform="public_cifar")
  normalisation with CIFAR-100's mean/std for CIFAR-10 too
                                        C1:417-418 (normalize_stats="cifar100")
  ResNet-32 option A, Kaiming-normal conv and linear weights, torch default
    linear bias                         model="resnet32_public"
  loss: weighted CE, mean_i w_{y_i} CE_i. The public Balanced Softmax option
    weights by the batch mean of w (C1:62-71); that option is not built here
    (method=difficulty_net_bs weights per sample).

Stage 2 (`public_stage2_section`), C2:
  start: best-validation stage-1 checkpoint (C1:280-282)  init_checkpoint=best_val
  trained: fc weight, bias and per-class scales (init 1), logits (W x + b) s,
    backbone frozen, BatchNorm in eval mode               las, las_head, las_scales
  LAS: (0.4, 0.0) rho > 100; (0.4, 0.1) > 50; (0.3, 0.0) > 20; else (0.2, 0.0)
                                                          las_rule="cifar"
  class-aware sampler, 4 per class, epoch = max_c n_c x C samples
                                                          sampler="class_aware"
  50 epochs, lr 0.025 (1 + cos(pi e / 50)) per epoch (C2:63-69, 138),
    SGD momentum 0.9, L2 1e-4 on weight, bias and scales, batch 128
  transform: the stage-1 transform (AutoAugment + Cutout)  train_transform=stage1
"""

import ml_collections

from experiments.configs import _stage2


def apply_public_stage1(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` (a CIFAR config) with the public stage-1 recipe; changes it in place."""
  config.model = "resnet32_public"
  config.method = "difficulty_net"
  config.meta_grad = "driver_only"
  config.driver_weight = 0.3
  config.dnet.hidden = (128, 128)
  config.dnet.use_bias = False
  config.dnet.lr = 1e-5
  config.dnet.weight_decay = 1e-4
  config.data.protocol = "public"
  config.data.meta_per_class = 25
  config.num_epochs = 12_800
  config.batch_size = 128
  config.meta_batch_size = 100
  config.learning_rate = 0.1
  config.momentum = 0.9
  config.nesterov = False
  config.weight_decay = 1e-4
  config.lr_schedule = "public_cifar"
  config.warmup_epochs = 0
  config.lr_decay_epochs = (6400, 9600)
  config.lr_decay_factor = 0.1
  config.augment = False
  config.augment_meta = False
  config.host_transform = "public_cifar"
  config.cutout_size = 16
  config.cutout_public_typo = True
  config.host_workers = 4
  config.normalize_stats = "cifar100"
  return config


def public_stage2_section() -> ml_collections.ConfigDict:
  """The public CIFAR stage 2 (C2) as `config.stage2`."""
  s = _stage2.stage2_section()
  s.method = "las"
  s.init_checkpoint = "best_val"
  s.las_head = True
  s.las_scales = True
  s.head_lr_factor = 1.0
  s.num_epochs = 50
  s.batch_size = 128
  s.learning_rate = 0.05
  s.lr_schedule = "per_epoch_cosine"
  s.momentum = 0.9
  s.weight_decay = 1e-4
  s.scales_weight_decay = 1e-4
  s.sampler = "class_aware"
  s.samples_per_class = 4
  s.iterations_per_epoch = 0
  s.las_rule = "cifar"
  s.shift_bn = False
  s.train_transform = "stage1"
  return s
