r"""Stage 2 on ImageNet-LT as the public code runs it (RECIPES.md "ImageNet-LT, stage 2").

  python -m experiments.train --config=experiments/configs/imagenet_lt_stage2.py \
    --workdir=runs/imagenet_lt_public_r50_stage2 --config.data.image_root=IMAGENET \
    --config.stage1_workdir=runs/imagenet_lt_public_r50

The stage-1 fields (model, data) must be those of the stage-1 run (the runner
checks them against its results.json; pass that run's overrides too).

Values, from hitachi-rd-cv/Difficulty_Net ImageNet_Places-LT/train_stage2.py
(T2) and its config/ImageNet_LT/*.yaml, as RECIPES.md records them; the paper's
own text was not checked:
  trained             per-class LWS scales on the logits (init 1) only;
                      classifier and backbone frozen       las, las_head=False
  loss                LAS with (eps_head, eps_tail) = (0.3, 0.0)
                                                           las_eps_head/tail
  shifted BN          the whole backbone's BatchNorm in training mode
                                                           shift_bn=True
  sampler             class-aware, 4 per class, 907 iterations per epoch
  optimisation        10 epochs, lr 0.05 at batch 128, cosine per epoch,
                      SGD momentum 0.9, L2 2e-4 on the scales
  transform           the stage-1 training transform
  start               the best-TEST stage-1 checkpoint (T2:190-205 inherits
                      stage 1's max-test state): init_checkpoint="best_test",
                      labelled so in results.json; --config.stage2.
                      init_checkpoint=best_val is the honest choice.

The stage-1 fields come from `imagenet_lt_public.py` (cosine head, public
transform, 10-per-class meta set), so they match its runs; for ResNet-10 pass
--config.model=resnet10 as in stage 1.

Time: 10 epochs x 907 steps of batch 128 = 1.16M images, one forward and
backward of the backbone each (no meta step): about 1/18 of stage 1's images.
"""

from experiments.configs import _stage2
from experiments.configs import imagenet_lt_public


def public_stage2_section():
  """The public ImageNet-LT stage 2 (T2) as `config.stage2`."""
  s = _stage2.stage2_section()
  s.method, s.las_head, s.las_scales = "las", False, True
  s.las_eps_head, s.las_eps_tail = 0.3, 0.0
  s.shift_bn, s.shift_bn_only = True, ""
  s.sampler, s.samples_per_class, s.iterations_per_epoch = "class_aware", 4, 907
  s.num_epochs, s.batch_size, s.learning_rate = 10, 128, 0.05
  s.lr_schedule, s.momentum = "per_epoch_cosine", 0.9
  s.weight_decay, s.scales_weight_decay = 2e-4, 2e-4
  s.init_checkpoint, s.train_transform = "best_test", "stage1"
  return s


def get_config():
  return _stage2.add_stage2_fields(imagenet_lt_public.get_config(), public_stage2_section())
