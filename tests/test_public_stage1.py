"""Stage 1 of the public ImageNet-LT / Places-LT recipes: pipeline, builder, kill and resume.

On generated JPEG split lists (tests/split_list_data.py, 4 classes, 32x32 crops):
  * the runner's training batches are the library's augmentation chain
    (`color_randaugment.train_augment` on the decoded file, seeded by (seed, epoch,
    list index)), recomputed here eagerly outside tf.data, and a stream started at
    a later step gives the same batches; meta batches get the test transform and
    come from the seeded per-class subset of the validation list;
  * parameter groups through the experiment builder: after one SGD step each group
    moved by its own learning rate x the gradient, computed here with `jax.grad`;
  * each public config killed with SIGKILL after a checkpoint and rerun gives the
    results and final arrays of an uninterrupted run, bit for bit (child processes,
    the pattern of tests/test_resume.py), with narrowed ResNet-10s (base width 8)
    to keep compilation short: Places with its new block, cosine head and
    parameter groups from a generated "pretrained" .npz (ResNet-10 has no block
    to drop: the dropped block's loading is checked in tests/test_large_configs.py).
"""

from __future__ import annotations

import importlib.util
import signal
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dnet_jax import losses
from dnet_jax import parallel
from dnet_jax import steps
from dnet_jax.data import batching
from dnet_jax.data import split_lists
from dnet_jax.data import tf_images
from dnet_jax.models import build_classifier
from dnet_jax.models import pretrained
from experiments import experiment
from experiments import sampling
from experiments import streaming
from experiments import validation
from experiments.configs import base
from experiments.configs import imagenet_lt_public
from experiments.errors import InvalidInputError
from tests import split_list_data
from tests.test_large_configs import random_variables
from tests.test_resume import COMPARED, Child, final_arrays, read_results

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                                reason="tensorflow is not installed")

NUM_CLASSES = 4
TRAIN_COUNTS = [10, 6, 4, 3]  # 23 images: 5 batches of 4 per epoch
META_PER_CLASS, TEST_PER_CLASS = 3, 2
KEPT_PER_CLASS = 2  # data.meta_per_class: a real subset of the 3 per class
IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def lists(tmp_path_factory):
  return split_list_data.write_split_lists(tmp_path_factory.mktemp("public_lists"),
                                           TRAIN_COUNTS, META_PER_CLASS, TEST_PER_CLASS)


def tiny_public_imagenet(lists):
  config = imagenet_lt_public.get_config()
  split_list_data.apply_to_config(config, lists, num_classes=NUM_CLASSES, image_size=IMAGE_SIZE)
  config.data.meta_per_class = KEPT_PER_CLASS
  config.batch_size, config.meta_batch_size, config.eval_batch_size = 4, 4, 8
  config.many_threshold, config.few_threshold = 5, 4
  return config


# ---------------------------------------------------------------------------- the pipeline


def _eager_train_image(lists, split, index, seed, epoch):
  """The public ImageNet chain on one file, eagerly: decode, augment, normalise."""
  from dnet_jax.data import color_randaugment  # pylint: disable=import-outside-toplevel

  tf = tf_images.tf_module()
  with open(f"{lists['image_root']}/{split.paths[index]}", "rb") as f:
    image = split_lists.decode_image(f.read())
  seed = tf.constant([split_lists.augmentation_seed(seed, epoch), index], tf.int64)
  image = color_randaugment.train_augment(image, seed, image_size=IMAGE_SIZE)
  image = tf.cast(image, tf.float32) / 255.0
  return ((image.numpy() - np.asarray(split_lists.IMAGENET_MEAN))
          / np.asarray(split_lists.IMAGENET_STD))


def test_public_batches_are_the_library_chain_and_a_pure_function_of_the_step(lists):
  config = tiny_public_imagenet(lists)
  assert config.data.train_augment == "public_imagenet" and not config.augment_meta
  data = streaming.load(config, process_index=0, process_count=1)
  source = data.source
  assert data.num_meta == NUM_CLASSES * KEPT_PER_CLASS
  np.testing.assert_array_equal(source.splits["meta"].class_counts(), [KEPT_PER_CLASS] * 4)

  batches = list(data.train_batches(0, 7, with_meta=True))  # 5 steps of epoch 0, 2 of epoch 1
  resumed = list(data.train_batches(6, 7, with_meta=True))
  for got, want in zip(resumed[0][1:], batches[6][1:]):
    np.testing.assert_array_equal(got["image"], want["image"])

  train = source.splits["train"]
  order = sampling.epoch_order("instance", train.labels, config.seed, 1,
                               data.steps_per_epoch * 4)
  step, batch, meta = batches[6]  # epoch 1, batch 1
  for row in (0, 3):
    index = int(order[4 + row])
    assert batch["label"][row] == train.labels[index]
    np.testing.assert_allclose(batch["image"][row],
                               _eager_train_image(lists, train, index, config.seed, 1),
                               atol=1e-5)
  # The augmentation is not the plain crop + flip: RandAugment and ColorJitter act.
  plain = split_lists.preprocess(
      open(f"{lists['image_root']}/{train.paths[int(order[4])]}", "rb").read(),
      np.array([split_lists.augmentation_seed(config.seed, 1), int(order[4])], np.int64),
      train=True, image_size=IMAGE_SIZE, resize_size=IMAGE_SIZE, mean=split_lists.IMAGENET_MEAN,
      std=split_lists.IMAGENET_STD, augment="crop_flip")
  assert np.abs(np.asarray(plain) - batch["image"][0]).max() > 0.1

  # Meta batch of step 6: indices from its seed, the test transform (resize + centre crop).
  meta_split = source.splits["meta"]
  indices = batching.meta_batch_indices(config.seed, step, len(meta_split), 4)
  np.testing.assert_array_equal(meta["label"], meta_split.labels[indices])
  test_transform = split_lists.preprocess(
      open(f"{lists['image_root']}/{meta_split.paths[indices[0]]}", "rb").read(),
      np.zeros(2, np.int64), train=False, image_size=IMAGE_SIZE,
      resize_size=config.data.resize_size, mean=split_lists.IMAGENET_MEAN,
      std=split_lists.IMAGENET_STD)
  np.testing.assert_allclose(meta["image"][0], np.asarray(test_transform), atol=1e-6)


def test_the_benchmark_times_the_runners_per_example_function(tmp_path, monkeypatch):
  """stream_augment_benchmark's per-example rows map `split_lists.preprocess` (the runner's
  per-example transform, normalised per example instead of per batch)."""
  from experiments import stream_augment_benchmark  # pylint: disable=import-outside-toplevel

  seen, original = [], split_lists.preprocess

  def spy(*args, **kwargs):
    seen.append((kwargs["train"], kwargs["augment"]))
    return original(*args, **kwargs)

  monkeypatch.setattr(split_lists, "preprocess", spy)
  paths = stream_augment_benchmark.write_jpegs(str(tmp_path), 2, 40, 48)
  load = stream_augment_benchmark._load_fn("Places-LT chain", IMAGE_SIZE)  # pylint: disable=protected-access
  per_thread, per_cpu = stream_augment_benchmark.measure_throughput(paths, load, threads=1,
                                                                    repeats=1)
  assert per_thread > 0 and per_cpu > 0
  assert seen == [(True, "public_places")]  # traced once by tf.data


def test_per_class_subset_is_seeded_exact_and_checked(lists):
  split = split_lists.read_split_list(lists["meta_list"], NUM_CLASSES)
  subset = split_lists.per_class_subset(split, 2, seed=5)
  assert subset.class_counts().tolist() == [2] * NUM_CLASSES
  rows = [int(np.flatnonzero(split.paths == p)[0]) for p in subset.paths]
  assert rows == sorted(rows)  # list order kept
  np.testing.assert_array_equal(split.labels[rows], subset.labels)
  again = split_lists.per_class_subset(split, 2, seed=5)
  assert again.paths.tolist() == subset.paths.tolist()
  draws = {tuple(split_lists.per_class_subset(split, 2, seed=s).paths) for s in range(8)}
  assert len(draws) > 1  # the seed matters
  assert split_lists.per_class_subset(split, 3, seed=0).paths.tolist() == split.paths.tolist()
  with pytest.raises(ValueError, match="class 0 has 3 example.*fewer than the 4"):
    split_lists.per_class_subset(split, 4, seed=0)


# ---------------------------------------------------------------------------- options


def test_batch_mean_weights_are_the_public_broadcast_loss():
  """(B, 1) losses times (B,) weights, averaged as torch broadcasts them (T1:457)."""
  rng = np.random.default_rng(1)
  per_example = rng.uniform(0.1, 3.0, size=6).astype(np.float32)
  class_weights = rng.uniform(0.5, 1.5, size=4).astype(np.float32)
  labels = np.array([0, 3, 3, 1, 2, 3])
  public = np.mean(per_example[:, None] * class_weights[labels][None, :])  # (B, B) matrix
  weights = steps.batch_mean_weights(jnp.asarray(class_weights), jnp.asarray(labels))
  np.testing.assert_allclose(losses.weighted_mean(jnp.asarray(per_example), weights,
                                                  jnp.asarray(labels)), public, rtol=1e-6)
  np.testing.assert_allclose(weights, np.full(4, class_weights[labels].mean()), rtol=1e-6)


@pytest.mark.parametrize("field,value,match", [
    ("model_kwargs", {"heads": "cosine"}, r"\['heads'\] are not options of model='resnet50'"),
    ("model_kwargs", {"head": "arc"}, "head must be 'linear' or 'cosine'"),
    ("refresh_at", "epoch_middle", "refresh_at='epoch_middle'; choose one of: epoch_end"),
    ("loss_weighting", "per_class", "choose one of: per_example, batch_mean"),
    ("meta_grad", "nested", "batch_mean.*meta_grad='driver_only'"),
    ("param_groups", {"new": ("^classifier/", 10.0)}, "param_groups.new must be"),
])
def test_bad_stage1_options_are_clear_errors(field, value, match):
  config = imagenet_lt_public.get_config()
  with config.unlocked():
    config[field] = value
  with pytest.raises(InvalidInputError, match=match):
    validation.validate_config(config, 1)


def test_bad_streamed_augmentation_is_a_clear_error():
  config = imagenet_lt_public.get_config()
  config.data.train_augment = "randaugment"
  with pytest.raises(InvalidInputError, match="data.train_augment='randaugment'; choose one "
                                              "of: crop_flip, public_imagenet, public_places"):
    validation.validate_config(config, 1)


# ---------------------------------------------------------------------------- the builder


@pytest.mark.usefixtures("fast_compilation")  # tests/conftest.py
def test_parameter_groups_after_one_step_through_the_builder():
  """Backbone at 0.1 x lr, new block and head at lr: p1 = p0 - lr_g grad (plain SGD)."""
  lr, factor, num_classes = 0.5, 0.1, 3
  config = base.get_config()
  config.model, config.method = "resnet10", "ce"
  config.model_kwargs.update(width=4, head="cosine", extra_block=True)
  config.param_groups.backbone = (("^conv_init/", "^bn_init/", "^stage"), factor)
  config.learning_rate, config.lr_schedule = lr, "constant"
  config.momentum, config.weight_decay, config.batch_size = 0.0, 0.0, 4
  identity = lambda key, images: images  # noqa: E731
  dataset = types.SimpleNamespace(
      num_classes=num_classes, class_counts=np.array([3, 2, 1]), image_shape=(32, 32, 3),
      steps_per_epoch=1, preprocessors=(identity, identity, identity))
  exp = experiment.build(config, dataset)
  state = exp.init_state()
  params0 = jax.device_get(state.params)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(4, 32, 32, 3)).astype(np.float32)
  labels = np.array([0, 1, 2, 1], np.int32)
  p_state, _ = exp.train_step(parallel.replicate(state),
                              parallel.shard_batch({"image": images, "label": labels}), None)
  params1 = jax.device_get(parallel.unreplicate(p_state).params)

  model = build_classifier("resnet10", num_classes, width=4, head="cosine", extra_block=True)

  def loss(params):
    logits, _ = model.apply({"params": params, "batch_stats": state.batch_stats},
                            jnp.asarray(images), train=True, mutable=["batch_stats"])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

  grads = jax.device_get(jax.jit(jax.grad(loss))(params0))
  groups = {"backbone": 0, "new": 0}
  for (path, p0), p1, g in zip(jax.tree_util.tree_flatten_with_path(params0)[0],
                               jax.tree.leaves(params1), jax.tree.leaves(grads)):
    top = path[0].key
    group = "new" if top in ("extra_block", "classifier") else "backbone"
    groups[group] += 1
    rate = lr if group == "new" else lr * factor
    # Two compilations of the gradient agree to float32 rounding (~1e-5 of its scale);
    # the groups' rates differ 10x.
    scale = np.abs(rate * g).max()
    np.testing.assert_allclose(p0 - p1, rate * g, rtol=1e-2, atol=1e-3 * scale + 1e-7,
                               err_msg=str(path))
  assert groups["new"] >= 7 and groups["backbone"] >= 20


# ---------------------------------------------------------------------------- kill and resume


EPOCHS = 2
RUN_TIMEOUT_S = 600  # a child compiles for minutes on a busy 2-core machine
TOTAL_STEPS = EPOCHS * (sum(TRAIN_COUNTS) // 4)  # 10


def _public_overrides(lists, workdir_name, recipe, npz_path=None):
  common = [f"--config.data.{k}={v}" for k, v in lists.items()] + [
      f"--config.data.num_classes={NUM_CLASSES}", f"--config.data.image_size={IMAGE_SIZE}",
      f"--config.data.resize_size={IMAGE_SIZE + 4}", "--config.data.decode_threads=1",
      f"--config.data.meta_per_class={KEPT_PER_CLASS}", "--config.model_kwargs.width=8",
      "--config.batch_size=4", "--config.meta_batch_size=4", "--config.eval_batch_size=8",
      "--config.many_threshold=5", "--config.few_threshold=4",
      f"--config.num_epochs={EPOCHS}", "--config.checkpoint_every_steps=2",
      "--config.log_every_steps=5", "--config.progress_bar=False",
      "--config.max_checkpoints_to_keep=2", "--config.dnet.hidden=(8,8)"]
  if recipe == "places":
    # ResNet-10's last stage has one block, which cannot be dropped: the new block, the
    # head and the parameter groups stay (the dropped block's loading: test_large_configs).
    return ["--config=experiments/configs/places_lt_public.py", "--config.model=resnet10",
            "--config.model_kwargs.drop_last_blocks=0",
            f"--config.pretrained_path={npz_path}",
            *common]
  return ["--config=experiments/configs/imagenet_lt_public.py", "--config.model=resnet10",
          *common]


class PublicChild(Child):
  """tests/test_resume.py's child process, running a public recipe instead of digits."""

  def __init__(self, workdir, name: str, arguments, compilation_cache: str = ""):
    import subprocess  # pylint: disable=import-outside-toplevel
    from tests import test_resume  # pylint: disable=import-outside-toplevel

    self.workdir = str(workdir)
    self.log_path = f"{workdir}.{name}.log"
    command = [test_resume.sys.executable, "-m", "experiments.train", f"--workdir={workdir}",
               *arguments]
    env = test_resume._env(compilation_cache)  # pylint: disable=protected-access
    with open(self.log_path, "w") as log:
      self.proc = subprocess.Popen(command, cwd=test_resume.REPO, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)


def _places_npz(path):
  # "ImageNet" weights of ResNet-10 with a 10-class linear head.
  pretrained.save_variables_npz(
      path, random_variables(build_classifier("resnet10", 10, width=8), seed=7))
  return path


# Both public recipes: Places (pretrained npz, new block, parameter groups) and ImageNet
# (RandAugment in the streamed pipeline, per-epoch cosine); ~2 min each on 2 cores.
@pytest.mark.parametrize("recipe", ["places", "imagenet"])
def test_public_recipe_killed_then_rerun_equals_an_uninterrupted_run(tmp_path, lists, recipe,
                                                                     child_compilation_cache):
  npz = _places_npz(str(tmp_path / "r10.npz")) if recipe == "places" else None
  arguments = _public_overrides(lists, "run", recipe, npz)
  # The rerun loads the reference's compiled programs (the killed child writes no cache).
  reference = PublicChild(tmp_path / "reference", "reference", arguments,
                          child_compilation_cache)
  killed = PublicChild(tmp_path / "killed", "killed", arguments)
  try:
    seen = killed.wait_for_checkpoint(min_step=2, timeout=RUN_TIMEOUT_S)
    time.sleep(0.05)
    killed.proc.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=30) == -signal.SIGKILL
    assert reference.wait(RUN_TIMEOUT_S) == 0, reference.output()[-3000:]
  finally:
    killed.kill()
    reference.kill()
  assert not (tmp_path / "killed" / "results.json").exists(), "finished before the kill"
  left = killed.checkpoints()
  assert seen <= left[-1] < TOTAL_STEPS, left

  rerun = PublicChild(tmp_path / "killed", "rerun", arguments, child_compilation_cache)
  try:
    assert rerun.wait(RUN_TIMEOUT_S) == 0, rerun.output()[-3000:]
  finally:
    rerun.kill()
  results, expected = read_results(tmp_path / "killed"), read_results(tmp_path / "reference")
  assert results["start_step"] == left[-1] and results["steps"] == TOTAL_STEPS
  for key in COMPARED:
    assert results[key] == expected[key], key
  arrays, digests = final_arrays(tmp_path / "killed", TOTAL_STEPS)
  expected_arrays, expected_digests = final_arrays(tmp_path / "reference", TOTAL_STEPS)
  assert digests == expected_digests
  for a, b in zip(jax.tree.leaves(arrays), jax.tree.leaves(expected_arrays)):
    assert a.dtype == b.dtype and np.array_equal(a, b)
  assert len(expected["history"]["train_loss"]) == EPOCHS
  assert set(arrays["params"]["classifier"]) == {"kernel"}  # the cosine head
  assert ("extra_block" in arrays["params"]) == (recipe == "places")
