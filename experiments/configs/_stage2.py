"""The stage-2 fields shared by the `*_stage2.py` configs (not a runnable config itself).

`add_stage2_fields(config)` adds to a stage-1 config (whose fields then
describe the stage-1 run that stage 2 starts from; the trainer checks that the
model and data fields match that run's):

  stage             2 (experiments/train.py then calls experiments.stage2.train_stage2)
  stage1_workdir    the finished stage-1 run's workdir (its checkpoints/ and results.json)
  stage2.method     las | crt | lws   (dnet_jax/stage2.py)
  stage2.init_checkpoint
                    best_val (default: the stage-1 epoch of best validation
                    accuracy) | best_test (best test accuracy: the public
                    ImageNet-LT / Places-LT habit, T2; it selects on the test
                    set) | last (the newest stage-1 checkpoint). Stage 1 keeps
                    both best states in <workdir>/best_checkpoints/.
  stage2.num_epochs, batch_size, learning_rate, momentum, weight_decay
                    SGD over the stage-2 epochs (MiSLAS: 10 epochs, lr 0.1,
                    batch 128, wd 2e-4 on CIFAR); weight_decay is on the head
  stage2.lr_schedule
                    cosine (per step, to 0 at the end) | per_epoch_cosine
                    (0.5 lr (1 + cos(pi e / epochs)), constant in an epoch: the
                    public Difficulty-Net stage 2, dnet_jax.schedules)
  stage2.scales_weight_decay
                    L2 on the LWS logit scales (0: MiSLAS; the public code 1e-4 CIFAR)
  stage2.head_lr_factor
                    las only: the stage-1 classifier layer trains at this factor
                    x the rate of the logit scales (MiSLAS: 0.2)
  stage2.sampler    class_balanced (cRT, LWS and MiSLAS) | instance | class_aware
                    (the public code's ClassAwareSampler, datasets.Sampler)
  stage2.samples_per_class
                    class_aware: consecutive images per class (public: 4)
  stage2.iterations_per_epoch
                    steps per stage-2 epoch; 0 = the sampler's own length
                    (class_aware: floor(max_c n_c x C / batch))
  stage2.las_rule   cifar | imagenet: (eps_head, eps_tail) from data.imbalance_factor
  stage2.las_eps_head, las_eps_tail
                    explicit LAS smoothing; negative = from las_rule
  stage2.las_off_target
                    uniform (q = (1-eps) onehot + eps/C, MiSLAS's code) | others
                    (eps/(C-1) on the other classes)
  stage2.las_scales train LWS logit scales next to the head in las (as MiSLAS)
  stage2.las_head   train the stage-1 classifier layer in las (False: LWS scales
                    only on the LAS loss, the public ImageNet-LT / Places-LT stage 2)
  stage2.shift_bn   False: BatchNorm frozen in eval mode (default); True: the
                    running statistics are re-estimated on class-balanced batches
                    (MiSLAS's shifted BN)
  stage2.head_name  the top-level parameter entry of the classifier layer
  stage2.max_steps  stop after this many stage-2 steps (0 = no limit; tests)
"""

import ml_collections


def stage2_section() -> ml_collections.ConfigDict:
  """MiSLAS's CIFAR stage-2 recipe."""
  s = ml_collections.ConfigDict()
  s.method = "las"
  s.init_checkpoint = "best_val"
  s.num_epochs = 10
  s.batch_size = 128
  s.learning_rate = 0.1
  s.head_lr_factor = 0.2
  s.momentum = 0.9
  s.weight_decay = 2e-4
  s.lr_schedule = "cosine"
  s.scales_weight_decay = 0.0
  s.sampler = "class_balanced"
  s.samples_per_class = 4
  s.iterations_per_epoch = 0
  s.las_rule = "cifar"
  s.las_eps_head = -1.0
  s.las_eps_tail = -1.0
  s.las_off_target = "uniform"
  s.las_scales = True
  s.las_head = True
  s.shift_bn = False
  s.shift_bn_only = ""
  s.train_transform = "stage1"
  s.head_name = "classifier"
  s.max_steps = 0
  return s


def add_stage2_fields(config: ml_collections.ConfigDict, section=None) -> ml_collections.ConfigDict:
  """`config` with the stage-2 fields (`section` or the defaults above); changes it in place."""
  config.stage = 2
  config.stage1_workdir = ""
  config.stage2 = section if section is not None else stage2_section()
  return config
