r"""Difficulty-Net on ImageNet-LT with ResNet-50 (ResNet-10 as a field): our streamed recipe.

This is NOT the public code's recipe: it is torchvision's standard ImageNet
schedule (90 epochs, lr 0.1 at batch 256, per-step cosine, crop + flip only, a
linear head, the exact nested meta-gradient, a per-example weighted loss, a
meta set of the whole validation list with training augmentation). The public
Difficulty-Net code's stage 1 (180 epochs at 0.05 / 128, cosine head,
RandAugment, 10 validation images per class, ...) is imagenet_lt_public.py,
with every setting traced to its source (RECIPES.md "ImageNet-LT").

Data. ImageNet-LT (Liu et al., OLTR, CVPR 2019) is a list-defined subset of
ImageNet 2012: 1,000 classes, 115,846 training images (1,280..5 per class),
a balanced validation list of 20 per class (20,000; Difficulty-Net's meta set)
and a test list of 50 per class (the 50,000 ImageNet validation images).
  1. Download ILSVRC2012 (https://image-net.org/download-images, registration
     required) and extract it so that IMAGENET/train/n01440764/... and
     IMAGENET/val/n01440764/... exist (the val images sorted into class folders,
     as torchvision's ImageNet layout).
  2. Get the OLTR split lists ImageNet_LT_train.txt, ImageNet_LT_val.txt and
     ImageNet_LT_test.txt: the README of https://github.com/zhmiao/OpenLongTailRecognition-OLTR
     ("Data Preparation") links the Google Drive folder that holds them
     (ImageNet_LT_open). Their paths ("train/n01440764/n01440764_190.JPEG 0")
     are relative to IMAGENET; put the lists in IMAGENET or pass full paths.
Alternatively build TFDS `imagenet_lt` (dnet_jax/data/imagenet_lt.py) and add
--config.data.source=imagenet_lt --config.data.data_dir=TFDS_DIR
(--config.data.train_list=.../ImageNet_LT_train.txt saves a pass for the counts).

Command (one host, all its accelerators):

  python -m experiments.train --config=experiments/configs/imagenet_lt.py \
    --workdir=runs/imagenet_lt_r50 --config.data.image_root=IMAGENET

ResNet-10 (paper: 44.6 % top-1): add --config.model=resnet10.
Several hosts (e.g. a Cloud TPU v4-32 pod slice: 4 hosts). The same command on
every host, with --jax_distributed (the TPU runtime tells JAX the coordinator,
the number of processes and each one's id); the data and the workdir must be
on storage every host sees at the same path (e.g. a Filestore/NFS mount, or a
bucket mounted with gcsfuse: the checkpointer uses file-system paths):

  gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command="cd dnet_jax && \
    python -m experiments.train --config=experiments/configs/imagenet_lt.py \
    --workdir=/mnt/shared/runs/imagenet_lt_r50 --config.data.image_root=/mnt/shared/IMAGENET \
    --jax_distributed"

Elsewhere (GPU clusters without auto-detection) give the cluster explicitly:
--jax_distributed --coordinator_address=HOST0:1234 --num_processes=N --process_id=I.
Batch sizes are global (split over all devices of all hosts); lr 0.1 is for
batch 256: scale it linearly with --config.batch_size (e.g. 1024 -> 0.4, and
--config.warmup_epochs=5). Each host reads and decodes only its own share.

Run time -- an ESTIMATE, not measured (no accelerator was available): 452 steps
per epoch x 90 epochs = 40.7k steps. A Difficulty-Net step with the exact
(nested) meta-gradient costs about 3-4 plain ResNet-50 training steps, plus an
evaluation of 70,000 images per epoch: roughly 3-6 hours on a Cloud TPU v4-8 or
8 A100 GPUs (float32; --config.dtype=bfloat16 is faster on TPU), if the hosts
decode about 3,000 JPEGs/s (tf.data uses every CPU core of each host).
The paper reports 54.0 % top-1 with ResNet-50 (57.4 with RandAugment) and
44.6 % with ResNet-10, all from the public code's two-stage recipe
(imagenet_lt_public.py and its stage 2), not from this one.

Recipe. Shared with the public code (METHOD.md; RECIPES.md): Difficulty-Net with
Balanced Softmax (method difficulty_net_bs), relative Difficulty-Net with hidden
widths (1024, 1024) and biases, Adam lr 1e-3, L2 1e-4, lambda 0.3; SGD momentum
0.9 Nesterov, weight decay 5e-4, cosine schedule without warm-up; evaluation
resize 256 + centre crop 224; many-shot > 100, few-shot < 20 training images.
Our own choices: classifier lr 0.1 at batch 256 for 90 epochs (torchvision's
ImageNet schedule), per-step cosine, a linear head, 224x224 random-resized crops
and flips only (data.train_augment="crop_flip"; "public_imagenet" adds the
public chain), meta batch 256 drawn per step from the whole validation list
with the training augmentation (augment_meta), METHOD.md's nested meta-gradient.
"""

from experiments.configs import _streaming
from experiments.configs import base


def get_config():
  config = base.get_config()
  _streaming.add_streaming_fields(
      config, name="imagenet_lt", num_classes=1000, train_list="ImageNet_LT_train.txt",
      meta_list="ImageNet_LT_val.txt", test_list="ImageNet_LT_test.txt",
      imbalance_factor=256.0)  # 1280 / 5
  config.model = "resnet50"  # or resnet10
  config.method = "difficulty_net_bs"
  config.dnet.hidden = (1024, 1024)
  config.dnet.use_bias = True
  config.dnet.lr = 1e-3
  config.dnet.weight_decay = 1e-4
  config.many_threshold = 100
  config.few_threshold = 20

  config.num_epochs = 90
  config.batch_size = 256
  config.meta_batch_size = 256
  config.eval_batch_size = 1024
  config.learning_rate = 0.1
  config.momentum = 0.9
  config.nesterov = True
  config.weight_decay = 5e-4
  config.lr_schedule = "cosine"
  config.warmup_epochs = 0
  config.augment = True
  config.augment_meta = True
  config.log_every_steps = 100
  return config
