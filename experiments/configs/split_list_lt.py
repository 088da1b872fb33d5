r"""Difficulty-Net on any long-tailed image set given as split lists + an image root.

Data: three text files with one "relative/path.jpg label" per line (labels
0..C-1; paths relative to the image root; a relative list path that does not
exist as given is looked up in the image root):
  train list  the long-tailed training set; its per-class counts give the
              many/medium/few groups (thresholds many_threshold / few_threshold:
              scale them to your data set) and the Balanced Softmax prior;
  meta list   a small *balanced* held-out set (e.g. 10-20 images per class),
              never trained on: Difficulty-Net's meta set and the validation
              set that measures the per-class accuracy a and picks the best epoch;
  test list   the test set.
ImageNet-LT and Places-LT are this format with the OLTR lists (Liu et al., CVPR
2019; the Google Drive folder linked from the "Data Preparation" section of
https://github.com/zhmiao/OpenLongTailRecognition-OLTR); their own configs are
imagenet_lt.py and places_lt.py (ours) and imagenet_lt_public.py
and places_lt_public.py (the public code's recipes).

Command:

  python -m experiments.train --config=experiments/configs/split_list_lt.py \
    --workdir=runs/my_lt --config.data.image_root=IMAGES \
    --config.data.train_list=train.txt --config.data.meta_list=val.txt \
    --config.data.test_list=test.txt --config.data.name=my_lt

Several hosts (Cloud TPU pod slice; images, lists and workdir on storage every
host sees at the same path): the same command on every host with
--jax_distributed, e.g.

  gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command="cd dnet_jax && \
    python -m experiments.train --config=experiments/configs/split_list_lt.py \
    --workdir=/mnt/shared/runs/my_lt --config.data.image_root=/mnt/shared/IMAGES \
    --config.data.train_list=train.txt --config.data.meta_list=val.txt \
    --config.data.test_list=test.txt --jax_distributed"

or --jax_distributed --coordinator_address=HOST0:1234 --num_processes=N
--process_id=I where the cluster is not detected automatically.

Run time -- an ESTIMATE: it scales with the data set; as a guide, ResNet-10
(this default) at 224x224 on one modern GPU or TPU chip runs a Difficulty-Net
step of batch 256 in very roughly 0.1-0.3 s (about 3-4 plain training steps),
i.e. (train images / 256) x epochs x that, plus one evaluation of the meta and
test lists per epoch. Useless on CPU beyond smoke tests.

Defaults (the ImageNet-LT recipe on a cheaper model): ResNet-10, relative
Difficulty-Net (512, 512) with biases, Adam 1e-3, L2 1e-4, lambda 0.3; SGD lr
0.1 at batch 256, momentum 0.9 Nesterov, weight decay 5e-4, cosine, 90 epochs;
the number of classes from the lists (data.num_classes = 0); 224x224 crops.
A pretrained backbone: --config.pretrained_path=weights.npz
(dnet_jax/models/pretrained.py).
"""

from experiments.configs import _streaming
from experiments.configs import base


def get_config():
  config = base.get_config()
  _streaming.add_streaming_fields(config, name="split_list_lt", num_classes=0)
  config.model = "resnet10"
  config.method = "difficulty_net"
  config.dnet.hidden = (512, 512)
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
