r"""Stage 2 on Places-LT as the public code runs it (RECIPES.md "Places-LT", stage 2).

  python -m experiments.train --config=experiments/configs/places_lt_stage2.py \
    --workdir=runs/places_lt_public_r152_stage2 --config.data.image_root=PLACES365 \
    --config.stage1_workdir=runs/places_lt_public_r152

The stage-1 fields (model, data) must be those of the stage-1 run.

Values, from hitachi-rd-cv/Difficulty_Net ImageNet_Places-LT/train_stage2.py
(T2) and config/Places_LT/*.yaml, as RECIPES.md records them; the paper's own
text was not checked:
  trained             per-class LWS scales only      las, las_head=False
  loss                LAS (eps_head, eps_tail) = (0.4, 0.1), explicit (the
                      imbalance-factor rules cannot give it)
  shifted BN          only the new block's BatchNorm in training mode
                      (shift_bn_only matches the module `extra_block` that
                      ImageNetResNet(extra_block=True) adds)
  sampler             class-aware, 4 per class, 246 iterations per epoch
  optimisation        20 epochs, lr 0.1 at batch 256, cosine per epoch, SGD
                      momentum 0.9, L2 5e-4 on the scales
  transform           the stage-1 training transform
  start               the best-TEST stage-1 checkpoint (the public habit,
                      labelled so in results.json); best_val is the honest one.

The stage-1 fields come from `places_lt_public.py` (layer4's last block
dropped, the new block `extra_block`, cosine head, public transform), so they
match its runs and shift_bn_only matches the new block's three BatchNorm layers
(extra_block/bn1, bn2, bn3; the block keeps its width, so it has no downsample
BatchNorm). On a model without the new block (places_lt.py) the pattern matches
no BatchNorm and stage 2 stops with an error naming the layers.

Time: 20 epochs x 246 steps of batch 256 = 1.26M images through ResNet-152
(forward and backward), about 1/7 of stage 1's images.
"""

from experiments.configs import _stage2
from experiments.configs import places_lt_public


def public_stage2_section():
  """The public Places-LT stage 2 (T2) as `config.stage2`."""
  s = _stage2.stage2_section()
  s.method, s.las_head, s.las_scales = "las", False, True
  s.las_eps_head, s.las_eps_tail = 0.4, 0.1
  s.shift_bn, s.shift_bn_only = True, "(^|/)extra_block/"
  s.sampler, s.samples_per_class, s.iterations_per_epoch = "class_aware", 4, 246
  s.num_epochs, s.batch_size, s.learning_rate = 20, 256, 0.1
  s.lr_schedule, s.momentum = "per_epoch_cosine", 0.9
  s.weight_decay, s.scales_weight_decay = 5e-4, 5e-4
  s.init_checkpoint, s.train_transform = "best_test", "stage1"
  return s


def get_config():
  return _stage2.add_stage2_fields(places_lt_public.get_config(), public_stage2_section())
