r"""Stage 2 (label-aware smoothing) on top of a digits_lt stage-1 run.

Command (first stage 1, then stage 2 from its workdir):

  python -m experiments.train --config=experiments/configs/digits_lt.py --workdir=/tmp/digits_lt
  python -m experiments.train --config=experiments/configs/digits_lt_stage2.py \
    --config.stage1_workdir=/tmp/digits_lt --workdir=/tmp/digits_lt_las

cRT or LWS instead of LAS: --config.stage2.method=crt (or lws). The model and
data fields must be those of the stage-1 run (e.g. pass the same
--config.data.imbalance_factor); the run stops with a clear error otherwise.

Run time: a few seconds on 2 CPU cores (10 epochs of 9 steps at rho = 50,
JAX compilation included).

Recipe: MiSLAS's stage 2 (10 epochs, SGD momentum 0.9, cosine schedule, class-
balanced sampling, stage-1 head at 0.2 x the rate of the logit scales) with the
digits stage-1 rates: lr 0.05 and weight decay 5e-4 at batch 32, not tuned.
LAS smoothing from the imbalance factor with the CIFAR rule of METHOD.md
(rho = 10: (0.2, 0.0), 50: (0.3, 0.0), 100: (0.4, 0.1)). BatchNorm stays frozen.
"""

from experiments.configs import _stage2
from experiments.configs import digits_lt


def get_config():
  config = _stage2.add_stage2_fields(digits_lt.get_config())
  config.stage2.batch_size = 32
  config.stage2.learning_rate = 0.05
  config.stage2.weight_decay = 5e-4
  return config
