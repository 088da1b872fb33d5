"""Fields shared by the configs whose data is streamed from disk (experiments/streaming.py).

Not a config itself (the leading underscore keeps it out of the config list).
`add_streaming_fields(config, ...)` sets `config.data` for a "split list +
image root" data set:

  data.source         split_list (OLTR-style lists) | imagenet_lt (TFDS records)
  data.name           the data set's name in results and logs
  data.image_root     directory the list paths are relative to (split_list)
  data.train_list, data.meta_list, data.test_list
                      the lists ("relative/path.jpg label" per line); a relative
                      list path that does not exist as given is looked up in
                      image_root. meta_list is the balanced validation list: the
                      meta set of Difficulty-Net and the set that gives a and the
                      best-validation epoch. With source imagenet_lt, train_list
                      (optional) only gives the class counts without a pass over
                      the records.
  data.data_dir       TFDS data directory (source imagenet_lt)
  data.num_classes    C (0 = the largest label in the lists + 1)
  data.image_size, data.resize_size
                      training crops and evaluation centre crops are image_size
                      square; evaluation resizes the shorter side to resize_size
  data.train_augment the training transform: crop_flip (random-resized crop +
                      flip) | public_imagenet (reflect-pad 4, crop, flip,
                      ColorJitter 0.4, RandAugment rand-n2-m10-mstd0.5) |
                      public_places (the same without RandAugment)
  data.meta_per_class keep this many images per class of meta_list, drawn with
                      data.seed (0 = the whole list; the public code: 10;
                      source split_list only)
  data.check_files    check that every listed image exists before training
                      (one directory listing per folder: seconds for ImageNet)
  data.decode_threads tf.data decoding threads per process (0 = autotune)
  data.prefetch_batches
                      batches each stream prepares ahead
  data.shuffle_buffer examples in the shuffle buffer (source imagenet_lt)
  data.imbalance_factor
                      n_max / n_min of the train list (informational: the lists
                      fix the split; stage 2's smoothing rule reads it)
"""

import ml_collections


def add_streaming_fields(config: ml_collections.ConfigDict, *, name: str, num_classes: int,
                         train_list: str = "", meta_list: str = "", test_list: str = "",
                         source: str = "split_list",
                         imbalance_factor: float = 1.0) -> ml_collections.ConfigDict:
  """Replaces `config.data` with the streamed data set's fields (see the module docstring)."""
  data = ml_collections.ConfigDict()
  data.source = source
  data.name = name
  data.image_root = ""
  data.train_list = train_list
  data.meta_list = meta_list
  data.test_list = test_list
  data.data_dir = ""
  data.num_classes = num_classes
  data.image_size = 224
  data.resize_size = 256
  data.train_augment = "crop_flip"
  data.meta_per_class = 0
  data.check_files = True
  data.decode_threads = 0
  data.prefetch_batches = 2
  data.shuffle_buffer = 2048
  # n_max / n_min of the train list: informational for streamed data (the lists fix the
  # split), read by stage 2's label-aware smoothing rule.
  data.imbalance_factor = float(imbalance_factor)
  data.seed = 0
  config.data = data
  # Crops, flips and normalisation happen in tf.data (streaming.py), not on the device.
  config.cutout_size = 0
  return config
