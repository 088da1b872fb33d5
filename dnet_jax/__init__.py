"""dnet_jax: Difficulty-Net (Sinha & Ohashi, WACV 2023) for long-tailed recognition in JAX/Flax."""

from dnet_jax.adapters import equinox_classifier, nnx_classifier
from dnet_jax.classifier import Classifier, as_classifier, function_classifier, linen_classifier
from dnet_jax.difficulty import (accuracy_from_counts, cdb_dynamic_tau, cdb_weights,
                                 class_balanced_weights, class_weights_from_difficulty,
                                 driver_loss, driver_target, per_class_counts)
from dnet_jax.losses import (balanced_softmax_cross_entropy, cross_entropy, focal_loss,
                             make_loss_fn, weighted_mean)
from dnet_jax.meta import META_GRAD_MODES, MetaInputs, MetaProblem, meta_gradient, meta_objective
from dnet_jax.meta_api import (MetaGradients, SharedForward, class_weights, difficulty_net_gradient,
                               meta_gradients, shared_forward)
from dnet_jax.models import AbsoluteDifficultyNet, DifficultyNet, build_difficulty_net
from dnet_jax.optim import classifier_optimizer, cosine_schedule, dnet_optimizer, warmup_step_schedule
from dnet_jax.parallel import (AXIS_NAME, MetaIntervalStep, data_mesh, jit_baseline_step, jit_eval_step,
                               jit_meta_interval_step, jit_train_step, pad_batch, pmap_baseline_step,
                               pmap_eval_step, pmap_meta_interval_step, pmap_train_step, replicate,
                               replicate_on_mesh, shard_batch, shard_global_batch,
                               sharded_baseline_step, sharded_eval_step, sharded_train_step,
                               unreplicate)
from dnet_jax.state import TrainState, create_train_state
from dnet_jax.steps import baseline_step, eval_step, train_step, with_class_accuracy

__version__ = "0.1.0"
