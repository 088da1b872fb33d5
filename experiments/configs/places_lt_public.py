r"""Places-LT stage 1 as the public Difficulty-Net code runs it (ImageNet-pretrained ResNet-152).

Data and pretrained weights: as places_lt.py (steps 1-3 of its docstring: the
OLTR lists, Places365-Standard 256x256, torchvision's ResNet-152 IMAGENET1K_V1
weights converted to .npz). Command (one host):

  python -m experiments.train --config=experiments/configs/places_lt_public.py \
    --workdir=runs/places_lt_public_r152 --config.data.image_root=PLACES \
    --config.pretrained_path=resnet152_imagenet.npz

Several hosts: as places_lt.py (--jax_distributed). Stage 2 (LWS, LAS) starts
from this run; see the stage-2 configs that name places_lt_public.py.

Every setting below is read from the public code (hitachi-rd-cv/Difficulty_Net,
ImageNet_Places-LT/; `T1` = train_stage1.py, `RP` = models/resnet_places.py,
`DP` = datasets/places.py, yaml = config/places/places_resnet152_stage1.yaml;
RECIPES.md "Places-LT"):

  setting                 public code                               here
  backbone                torchvision ResNet-152, ImageNet weights,  model="resnet152",
                          fc and layer4.2 removed (RP:353-377)       model_kwargs.drop_last_blocks=1
  new block               Bottleneck(2048, 512), random init,        model_kwargs.extra_block=True
                          after layer4 (T1:169)                      (kept at init when loading)
  head                    cosine, scale 30, no bias (RP:329-340)     model_kwargs.head="cosine"
  parameter groups        new block and classifier lr 0.01,          learning_rate=0.01,
                          backbone lr 0.001 (T1:266-271)             param_groups.backbone x 0.1
  schedule                x0.1 at the start of 0-based epochs 9      lr_schedule="step",
                          and 19 of 30, every group (T1:565-581,     lr_decay_epochs=(9, 19)
                          `cos: False`)
  SGD                     momentum 0.9, no Nesterov, L2 5e-4 on all  momentum, nesterov, weight_decay
                          parameters, batch 128 (T1:266-271; yaml)
  loss                    weighted cross-entropy (T1:261-262)        method="difficulty_net"
  Difficulty-Net          365 -> 512 -> 512 -> 365 with biases,      dnet.*
                          Adam 1e-3, L2 1e-4, lambda 0.3 (yaml; T1:288)
  meta-gradient           detached weights: driver loss only         meta_grad="driver_only"
                          (T1:399-437)
  meta/val set            10 random images per class of              data.meta_per_class=10 (seeded
                          Places_LT_val (DP:176), test transform,    by data.seed here),
                          meta batch 100 (DP:257-259)                augment_meta=False
  per-class accuracy a    at the START of every epoch, epoch 0       refresh_at="epoch_start"
                          included (T1:291-304)
  train transform         reflect-pad 4, RandomResizedCrop 224,      data.train_augment=
                          flip, ColorJitter(0.4, 0.4, 0.4), no       "public_places"
                          RandAugment (DP:202-213)

Batches are global and split evenly over the devices: the public meta batch of
100 fits 1, 2 or 4 devices; on 8 add --config.meta_batch_size=96 (or 104).

Differences from the public code: the meta set is drawn with a seed; the new
block's convs get He fan-out init (the public block keeps PyTorch's default
Conv2d init); shot groups many > 100, few < 20 (the public index ranges [0, 131),
[131, 288), [288, 365)); the numbers reported are the honest ones, not the
maximum test accuracy over epochs.

Run time -- an ESTIMATE, not measured: 488 steps per epoch x 30 epochs = 14.6k
steps of ResNet-152 at batch 128 with the driver-only meta step (about 1.5 plain
steps), plus validation (3,650 images) and test (36,500) passes every epoch:
roughly 2-4 hours on 8 A100 GPUs or a TPU v4-8 in float32. The paper reports
41.7 % top-1 after stage 2.
"""

from experiments.configs import _large_public
from experiments.configs import _streaming
from experiments.configs import base


def get_config():
  config = base.get_config()
  _streaming.add_streaming_fields(
      config, name="places_lt", num_classes=365, train_list="Places_LT_train.txt",
      meta_list="Places_LT_val.txt", test_list="Places_LT_test.txt",
      imbalance_factor=996.0)  # 4980 / 5
  config.data.train_augment = "public_places"
  _large_public.apply_public_stage1(config, dnet_hidden=(512, 512))
  config.model = "resnet152"
  config.model_kwargs.drop_last_blocks = 1
  config.model_kwargs.extra_block = True
  config.pretrained_path = ""  # required in practice: the ImageNet-pretrained .npz
  config.method = "difficulty_net"
  config.num_epochs = 30
  # New block and head at 0.01, the pretrained backbone (stem and the four stages) at 0.001.
  config.learning_rate = 0.01
  config.param_groups.backbone = (("^conv_init/", "^bn_init/", "^stage"), 0.1)
  config.nesterov = False
  config.lr_schedule = "step"
  config.lr_decay_epochs = (9, 19)
  config.lr_decay_factor = 0.1
  config.log_every_steps = 50
  return config
