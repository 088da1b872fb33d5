"""Classifiers and Difficulty-Net, as Flax linen modules."""

from dnet_jax.models.difficulty_net import AbsoluteDifficultyNet, DifficultyNet, build_difficulty_net
from dnet_jax.models.registry import MODEL_NAMES, build_classifier
from dnet_jax.models.resnet_cifar import CifarResNet, resnet32
from dnet_jax.models.small_cnn import SmallCNN
