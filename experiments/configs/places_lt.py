r"""Difficulty-Net on Places-LT with an ImageNet-pretrained ResNet-152: our streamed recipe.

This is NOT the public code's recipe: every parameter trains at one rate (lr
0.1 at batch 256, cosine), with the whole pretrained ResNet-152 and a linear
head. The public Difficulty-Net code's stage 1 (layer4's last block replaced by
a new block, cosine head, backbone lr 0.001 and new block + head 0.01 at batch
128, x0.1 at epochs 10 and 20 of 30, ColorJitter, 10 validation images per
class, ...) is places_lt_public.py, with every setting traced to its source
(RECIPES.md "Places-LT").

Data. Places-LT (Liu et al., OLTR, CVPR 2019) is a list-defined subset of
Places365-Standard: 365 classes, 62,500 training images (4,980..5 per class),
a balanced validation list of 20 per class (7,300; Difficulty-Net's meta set)
and a test list of 100 per class (36,500).
  1. Download Places365-Standard, 256x256 version (http://places2.csail.mit.edu/download.html:
     the train, val and test archives of the "small images (256 * 256)" set) and
     extract them into one directory PLACES.
  2. Get the OLTR lists Places_LT_train.txt, Places_LT_val.txt and
     Places_LT_test.txt from the Google Drive folder linked in the "Data
     Preparation" section of https://github.com/zhmiao/OpenLongTailRecognition-OLTR
     (Places_LT_open). Their paths are relative to the Places365 root; check the
     first line of each list against your layout (a leading "/" is ignored).
  3. Pretrained weights: ImageNet ResNet-152 as .npz (dnet_jax/models/pretrained.py):
       # with torch installed, once:
       import numpy as np, torchvision
       sd = torchvision.models.resnet152(weights="IMAGENET1K_V1").state_dict()
       np.savez("resnet152_torch.npz", **{k: v.numpy() for k, v in sd.items()})
       # then here:
       from dnet_jax.models import pretrained
       pretrained.convert_torchvision_npz("resnet152_torch.npz", "resnet152_imagenet.npz")
     The 1000-class head is re-initialised for the 365 classes. (OLTR used
     Caffe-converted weights, which put the stride on the first 1x1 conv; those
     need a model built with stride_in_1x1=True, not wired into this config.)

Command (one host):

  python -m experiments.train --config=experiments/configs/places_lt.py \
    --workdir=runs/places_lt_r152 --config.data.image_root=PLACES \
    --config.pretrained_path=resnet152_imagenet.npz

Several hosts (Cloud TPU pod slice; data, weights file and workdir on storage
every host sees at the same path):

  gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command="cd dnet_jax && \
    python -m experiments.train --config=experiments/configs/places_lt.py \
    --workdir=/mnt/shared/runs/places_lt_r152 --config.data.image_root=/mnt/shared/PLACES \
    --config.pretrained_path=/mnt/shared/resnet152_imagenet.npz --jax_distributed"

(or --jax_distributed --coordinator_address=HOST0:1234 --num_processes=N
--process_id=I where the cluster is not detected automatically).

Run time -- an ESTIMATE, not measured (no accelerator was available): 244
steps per epoch x 30 epochs = 7.3k steps of ResNet-152 (about 2.3x the compute
of ResNet-50) with the nested meta-gradient (about 3-4 plain steps each), plus
an evaluation of 43,800 images per epoch: roughly 1-2 hours on a Cloud TPU
v4-8 or 8 A100 GPUs in float32. The paper reports 41.7 % top-1, from the public
code's two-stage recipe (places_lt_public.py and its stage 2), not from this one.

Recipe. Shared with the public code (RECIPES.md "Places-LT"): relative
Difficulty-Net, hidden widths (512, 512) with biases, Adam lr 1e-3, L2 1e-4,
lambda 0.3; classifier weight decay 5e-4, plain (not Nesterov) momentum 0.9;
ImageNet-pretrained ResNet-152; 30 epochs; weighted cross-entropy (method
difficulty_net); many-shot > 100, few-shot < 20. Our own choices: SGD lr 0.1
for every parameter at batch 256 with a per-step cosine schedule and no
warm-up, the whole pretrained network with a linear head, crop + flip only,
METHOD.md's nested meta-gradient, meta batch 256 per step from the whole
validation list with the training augmentation.
"""

from experiments.configs import _streaming
from experiments.configs import base


def get_config():
  config = base.get_config()
  _streaming.add_streaming_fields(
      config, name="places_lt", num_classes=365, train_list="Places_LT_train.txt",
      meta_list="Places_LT_val.txt", test_list="Places_LT_test.txt",
      imbalance_factor=996.0)  # 4980 / 5
  config.model = "resnet152"
  config.pretrained_path = ""  # required in practice: the ImageNet-pretrained .npz
  config.method = "difficulty_net"
  config.dnet.hidden = (512, 512)
  config.dnet.use_bias = True
  config.dnet.lr = 1e-3
  config.dnet.weight_decay = 1e-4
  config.many_threshold = 100
  config.few_threshold = 20

  config.num_epochs = 30
  config.batch_size = 256
  config.meta_batch_size = 256
  config.eval_batch_size = 1024
  config.learning_rate = 0.1
  config.momentum = 0.9
  config.nesterov = False
  config.weight_decay = 5e-4
  config.lr_schedule = "cosine"
  config.warmup_epochs = 0
  config.augment = True
  config.augment_meta = True
  config.log_every_steps = 50
  return config
