"""Every field of an experiment, with the paper's CIFAR-LT defaults.

Not meant to be run directly: the dataset configs (`digits_lt.py`,
`cifar10_lt.py`, `cifar100_lt.py`) start from `get_config()` here and change
what differs. Any field can be overridden on the command line, e.g.

  python -m experiments.train --config=experiments/configs/cifar100_lt.py \
    --workdir=runs/c100 --config.method=ce --config.data.imbalance_factor=50

Field reference (see METHOD.md for the maths; C1 = the public code's
CIFAR-LT/cifar_train_exaugment.py, T1 = its ImageNet_Places-LT/train_stage1.py):

  method            difficulty_net | difficulty_net_bs | ce | class_balanced |
                    cdb | focal | balanced_softmax  (experiments/methods.py)
  meta_grad         nested (paper, default) | jvp (same value, forward mode) |
                    driver_only (the public code: Difficulty-Net trained by the
                    driver loss alone)
  driver_weight     lambda of the driver loss (0.3)
  meta_interval     update Difficulty-Net every k-th step only (1 = every step,
                    the exact method; larger k trades fidelity for speed)
  remat             rematerialise the classifier passes of the meta-gradient
                    (jax.checkpoint: less memory, more compute)
  dnet.*            Difficulty-Net: kind relative|absolute, hidden widths,
                    use_bias, Adam lr and L2 weight decay
  cdb_tau           CDB loss exponent: "dynamic" or a number ("1.5" on the
                    command line; the field is a string)
  focal_gamma       focal loss gamma
  cb_beta           class-balanced (effective number) beta
  model, dtype      classifier by name (dnet_jax.models.MODEL_NAMES) and its
                    compute dtype (float32 | bfloat16)
  model_kwargs      options of the classifier (ResNets): head ("linear" |
                    "cosine"), cosine_scale, cosine_bias; ImageNet ResNets also
                    drop_last_blocks, extra_block (the Places-LT surgery), width
  pretrained_path   .npz of backbone weights loaded before the first step of a
                    new run ("" = random init; experiments/pretrained_init.py);
                    a head of another shape is re-initialised, a new block
                    (extra_block) keeps its init, dropped blocks are not loaded
  sync_batchnorm    average BatchNorm batch statistics over devices, so that
                    n devices behave like one device with the global batch
  data.*            dnet_jax.data.load_long_tailed's config: source, name,
                    data_dir, imbalance_factor, protocol, meta_per_class,
                    n_max (0 = automatic), seed, digits_test_per_class;
                    streamed sources (split_list, imagenet_lt: image lists
                    read from disk with tf.data) have other fields, see
                    experiments/configs/_streaming.py
  many_threshold,   shot groups: many-shot n_c > many_threshold, few-shot
  few_threshold     n_c < few_threshold, medium the rest (train counts)
  num_epochs, batch_size, meta_batch_size, eval_batch_size
                    global batch sizes (split over the local devices)
  learning_rate, momentum, nesterov, weight_decay
                    classifier SGD
  param_groups      {name: (patterns, lr multiplier)}: parameters whose '/'-joined
                    path matches one of the regular expressions (first group
                    first) train at multiplier x the schedule's rate; the rest
                    at the schedule's rate ({} = one group; dnet_jax.optim)
  loss_weighting    per_example (mean_i w_{y_i} l_i, the method) | batch_mean
                    (mean_i l_i x mean_i w_{y_i}: the public code's Balanced
                    Softmax, whose (B, 1) loss broadcasts against the (B,)
                    weights, C1:62-71 and 242; driver_only meta-gradient only)
  refresh_at        epoch_end (a from the validation set after every epoch; the
                    first epoch uses a = 0) | epoch_start (also before the first
                    step, from the initial network: the public ImageNet/Places
                    code, T1:290-304)
  lr_schedule       step (warm-up, then x lr_decay_factor at lr_decay_epochs)
                    | cosine (warm-up, cosine to 0) | constant | public_cifar
                    (the public CIFAR stage 1, C1:46-51: learning_rate x (1 +
                    min(e / 400, 1)), x lr_decay_factor at each of
                    lr_decay_epochs; dnet_jax.schedules)
  augment           4-pixel padded random crop + horizontal flip (on device)
  augment_meta      augment the meta batches too with the training transform.
                    The public code does NOT: its meta batches use the test
                    transform (C1:457-466); the public recipes set False
  cutout_size       Cutout square size (0 = off): after crop/flip on the device
                    (black fill) with augment, or the host transform's Cutout
  host_transform    "" (none) | public_cifar: the public CIFAR train transform
                    on the host (double-padded crop, flip, AutoAugment CIFAR-10
                    policy, Cutout with the image-mean fill;
                    dnet_jax.data.public_cifar); needs augment=False
  cutout_public_typo
                    public_cifar: AA:266's `left = 0 if left < 0 else top`
                    (True in the public recipe)
  host_workers      threads computing host-transformed batches ahead (0 = inline)
  normalize_stats   "" (the data set's own mean/std) | cifar100 (the public CIFAR
                    code normalises CIFAR-10 with CIFAR-100's, C1:417-418)
  seed              initialisation, data order, meta batches, augmentation
  max_steps         stop after this many steps in total (0 = no limit; tests)
  log_every_steps   how often metrics are fetched from the device and written
  checkpoint_every_epochs, max_checkpoints_to_keep
                    checkpoints at epoch ends (every k-th epoch) and how many
                    to keep (orbax deletes the oldest beyond that)
  checkpoint_every_steps
                    also checkpoint every k steps, inside epochs too (0 = off):
                    a long epoch then loses at most k steps to a kill. SIGTERM
                    always checkpoints at the next step and exits with code 75
                    (experiments/errors.py); rerunning the command resumes.
  compare_with      a CE run's workdir (or its results.json) to plot the
                    per-class test accuracy against
  progress_bar      tqdm progress bar on the terminal
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """The paper's CIFAR-LT recipe on CIFAR-10-LT, rho = 100 (ResNet-32, 200 epochs)."""
  config = ml_collections.ConfigDict()

  # Method.
  config.method = "difficulty_net"
  config.meta_grad = "nested"
  config.driver_weight = 0.3
  config.meta_interval = 1
  config.remat = False
  config.dnet = ml_collections.ConfigDict()
  config.dnet.kind = "relative"
  config.dnet.hidden = (128, 128)
  config.dnet.use_bias = False
  config.dnet.lr = 1e-5
  config.dnet.weight_decay = 1e-4
  config.cdb_tau = "dynamic"
  config.focal_gamma = 1.0
  config.cb_beta = 0.9999

  # Model.
  config.model = "resnet32"
  config.dtype = "float32"
  config.model_kwargs = ml_collections.ConfigDict()
  config.pretrained_path = ""
  config.sync_batchnorm = True

  # Data.
  config.data = ml_collections.ConfigDict()
  config.data.source = "tfds"
  config.data.name = "cifar10"
  config.data.data_dir = ""
  config.data.imbalance_factor = 100.0
  config.data.protocol = "public"
  config.data.meta_per_class = 25
  config.data.n_max = 0
  config.data.seed = 0
  config.data.digits_test_per_class = 50
  config.many_threshold = 100
  config.few_threshold = 20

  # Optimisation.
  config.num_epochs = 200
  config.batch_size = 128
  config.meta_batch_size = 100
  config.eval_batch_size = 500
  config.learning_rate = 0.1
  config.momentum = 0.9
  config.nesterov = False
  config.weight_decay = 2e-4
  config.lr_schedule = "step"
  config.warmup_epochs = 5
  config.lr_decay_epochs = (160, 180)
  config.lr_decay_factor = 0.1
  config.param_groups = ml_collections.ConfigDict()
  config.loss_weighting = "per_example"
  config.refresh_at = "epoch_end"
  config.augment = True
  config.augment_meta = True
  config.cutout_size = 0
  config.host_transform = ""
  config.cutout_public_typo = True
  config.host_workers = 0
  config.normalize_stats = ""

  # Run.
  config.seed = 0
  config.max_steps = 0
  config.log_every_steps = 50
  config.checkpoint_every_epochs = 1
  config.checkpoint_every_steps = 0
  config.max_checkpoints_to_keep = 3
  config.compare_with = ""
  config.progress_bar = True
  return config
