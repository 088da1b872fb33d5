"""The stage-2 fields shared by the `*_stage2.py` configs (not a runnable config itself).

`add_stage2_fields(config)` adds to a stage-1 config (whose fields then
describe the stage-1 run that stage 2 starts from; the trainer checks that the
model and data fields match that run's):

  stage             2 (experiments/train.py then calls experiments.stage2.train_stage2)
  stage1_workdir    the finished stage-1 run's workdir (its checkpoints/ and results.json)
  stage2.method     las | crt | lws   (dnet_jax/stage2.py)
  stage2.num_epochs, batch_size, learning_rate, momentum, weight_decay
                    SGD with a cosine schedule over the stage-2 epochs (MiSLAS:
                    10 epochs, lr 0.1, batch 128, wd 2e-4 on CIFAR)
  stage2.head_lr_factor
                    las only: the stage-1 classifier layer trains at this factor
                    x the rate of the logit scales (MiSLAS: 0.2)
  stage2.sampler    class_balanced (cRT, LWS and MiSLAS) | instance
  stage2.las_rule   cifar | imagenet: (eps_head, eps_tail) from data.imbalance_factor
  stage2.las_eps_head, las_eps_tail
                    explicit LAS smoothing; negative = from las_rule
  stage2.las_off_target
                    uniform (q = (1-eps) onehot + eps/C, MiSLAS's code) | others
                    (eps/(C-1) on the other classes)
  stage2.las_scales train LWS logit scales next to the head in las (as MiSLAS)
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
  s.num_epochs = 10
  s.batch_size = 128
  s.learning_rate = 0.1
  s.head_lr_factor = 0.2
  s.momentum = 0.9
  s.weight_decay = 2e-4
  s.sampler = "class_balanced"
  s.las_rule = "cifar"
  s.las_eps_head = -1.0
  s.las_eps_tail = -1.0
  s.las_off_target = "uniform"
  s.las_scales = True
  s.shift_bn = False
  s.head_name = "classifier"
  s.max_steps = 0
  return s


def add_stage2_fields(config: ml_collections.ConfigDict, section=None) -> ml_collections.ConfigDict:
  """`config` with the stage-2 fields (`section` or the defaults above); changes it in place."""
  config.stage = 2
  config.stage1_workdir = ""
  config.stage2 = section if section is not None else stage2_section()
  return config
