"""What the public ImageNet-LT and Places-LT stage-1 recipes share.

The values and the public code's lines they come from are in the tables of
imagenet_lt_public.py and places_lt_public.py (RECIPES.md "ImageNet-LT, stage 1"
and "Places-LT"): cosine head (scale 30, no bias), 10 validation images per class
with the test transform and meta batch 100, Difficulty-Net with biases trained by
Adam 1e-3 / L2 1e-4 on the driver loss alone (lambda 0.3), the accuracy vector
refreshed at the start of every epoch, batch 128, SGD momentum 0.9, L2 5e-4, no
warm-up. Not a config itself (no get_config).
"""


def apply_public_stage1(config, *, dnet_hidden) -> None:
  """Sets the shared fields on a config from `_streaming.add_streaming_fields`."""
  config.data.meta_per_class = 10
  config.model_kwargs.head = "cosine"
  config.model_kwargs.cosine_scale = 30.0
  config.model_kwargs.cosine_bias = False
  config.model_kwargs.width = 64  # the standard ResNet (smaller: cheap smoke tests)

  config.meta_grad = "driver_only"
  config.driver_weight = 0.3
  config.dnet.hidden = tuple(dnet_hidden)
  config.dnet.use_bias = True
  config.dnet.lr = 1e-3
  config.dnet.weight_decay = 1e-4
  config.refresh_at = "epoch_start"
  config.many_threshold = 100
  config.few_threshold = 20

  config.batch_size = 128
  config.meta_batch_size = 100
  config.eval_batch_size = 1000
  config.momentum = 0.9
  config.weight_decay = 5e-4
  config.warmup_epochs = 0
  config.augment = True
  config.augment_meta = False  # meta batches with the test transform
