"""Stage 2 (LAS, cRT, LWS): hand-computed smoothing and loss, what trains, the frozen backbone,
and a whole stage-2 run of the runner on top of a tiny stage-1 run (with its error cases)."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.flatten_util import ravel_pytree

from dnet_jax import stage2 as s2
from dnet_jax.models import SmallCNN
from experiments import checkpointing
from experiments import datasets
from experiments import errors
from experiments import loop as loop_lib
from experiments import preemption
from experiments import reporting
from experiments import stage2
from experiments import trainer
from experiments.configs import _stage2
from experiments.configs import digits_lt
from experiments.configs import digits_lt_stage2

C = 4
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("fast_compilation")


# ---------------------------------------------------------------------------- LAS maths


@pytest.mark.parametrize("rho,expected", [
    (200, (0.4, 0.0)), (101, (0.4, 0.0)), (100, (0.4, 0.1)), (51, (0.4, 0.1)), (50, (0.3, 0.0)),
    (21, (0.3, 0.0)), (20, (0.2, 0.0)), (10, (0.2, 0.0)), (1, (0.2, 0.0))])
def test_las_smoothing_for_imbalance_cifar_rule(rho, expected):
  assert s2.las_smoothing_for_imbalance(rho, "cifar") == expected


def test_las_smoothing_imagenet_rule_and_errors():
  assert s2.las_smoothing_for_imbalance(256, "imagenet") == (0.3, 0.0)
  with pytest.raises(ValueError, match="cifar, imagenet"):
    s2.las_smoothing_for_imbalance(10, "places")
  with pytest.raises(ValueError, match=">= 1"):
    s2.las_smoothing_for_imbalance(0.5)


def test_label_aware_epsilons_by_hand():
  # counts 100, 55, 10: (n - n_min) / (n_max - n_min) = 1, 1/2, 0; sin(pi/4) = 0.70710678.
  eps = s2.label_aware_epsilons([100, 55, 10], eps_head=0.4, eps_tail=0.1)
  np.testing.assert_allclose(eps, [0.4, 0.1 + 0.3 * 0.70710678, 0.1], rtol=1e-6)
  np.testing.assert_allclose(eps, [0.4, 0.31213203, 0.1], rtol=1e-6)
  # The digits long tail at rho = 50 with the rule's (0.3, 0.0): concave, head 0.3, tail 0.
  counts = [114, 73, 47, 30, 20, 12, 8, 5, 3, 2]
  eps = s2.label_aware_epsilons(counts, *s2.las_smoothing_for_imbalance(50))
  assert eps[0] == pytest.approx(0.3) and eps[-1] == 0.0
  assert eps[1] == pytest.approx(0.3 * math.sin(math.pi / 2 * 71 / 112), rel=1e-6)
  assert np.all(np.diff(eps) < 0)
  # Equal counts: no tail, every class gets eps_head.
  np.testing.assert_allclose(s2.label_aware_epsilons([5, 5], 0.2, 0.0), [0.2, 0.2])
  with pytest.raises(ValueError, match="eps_head"):
    s2.label_aware_epsilons([5, 1], 1.2, 0.0)


def test_las_targets_and_loss_by_hand():
  logits = jnp.array([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
  labels = jnp.array([0, 2])
  eps = jnp.array([0.3, 0.2, 0.0])  # class 2 is the tail: no smoothing
  # log softmax(2, 1, 0) = (2, 1, 0) - log(e^2 + e + 1) = (2, 1, 0) - 2.40760596
  lse0 = 2.40760596
  # uniform: q = (1 - 0.3) onehot + 0.3 / 3 = (0.8, 0.1, 0.1);  class 2 with eps 0: one-hot
  q = s2.label_aware_targets(labels, eps, 3, "uniform")
  np.testing.assert_allclose(q, [[0.8, 0.1, 0.1], [0.0, 0.0, 1.0]], atol=1e-7)
  loss = s2.label_aware_smoothing_loss(logits, labels, eps, "uniform")
  lse1 = math.log(2.0 + math.exp(3.0))
  expected0 = 0.8 * (lse0 - 2) + 0.1 * (lse0 - 1) + 0.1 * lse0  # = 0.70760596
  np.testing.assert_allclose(loss, [expected0, lse1 - 3.0], rtol=1e-6)
  assert expected0 == pytest.approx(0.70760596, abs=1e-7)
  # others: q = (0.7, 0.15, 0.15)
  q = s2.label_aware_targets(labels, eps, 3, "others")
  np.testing.assert_allclose(q[0], [0.7, 0.15, 0.15], atol=1e-7)
  loss = s2.label_aware_smoothing_loss(logits, labels, eps, "others")
  assert float(loss[0]) == pytest.approx(0.7 * (lse0 - 2) + 0.15 * (lse0 - 1) + 0.15 * lse0,
                                         rel=1e-6)
  # With eps = 0 everywhere LAS is plain cross-entropy.
  ce = -jax.nn.log_softmax(logits)[jnp.arange(2), labels]
  np.testing.assert_allclose(s2.label_aware_smoothing_loss(logits, labels, jnp.zeros(3)), ce,
                             rtol=1e-6)
  loss_fn = s2.make_las_loss_fn([100, 55, 10], 0.4, 0.1)
  np.testing.assert_allclose(
      loss_fn(logits, labels),
      s2.label_aware_smoothing_loss(logits, labels, s2.label_aware_epsilons([100, 55, 10], 0.4, 0.1)))


# ---------------------------------------------------------------------------- what trains


def _tiny_setup(method, seed=0, **trainable_kw):
  model = SmallCNN(num_classes=C, widths=(4, 4, 4))
  variables = model.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 1)))
  params, batch_stats = variables["params"], variables["batch_stats"]
  # Non-trivial running statistics, so that a change in them would show.
  batch_stats = jax.tree.map(lambda x: x + 0.1, batch_stats)
  new_head = model.init(jax.random.key(seed + 1), jnp.zeros((1, 8, 8, 1)))["params"]["classifier"]
  trainable = s2.stage2_trainable(method, params, C, new_head=new_head if method == "crt" else None,
                                  **trainable_kw)
  tx = s2.stage2_optimizer(0.5, momentum=0.9, weight_decay=1e-3, head_lr_factor=0.2)
  state = s2.create_stage2_state(jax.random.key(7), params, batch_stats, trainable, tx)
  rng = np.random.default_rng(seed)
  batches = [{"image": rng.normal(size=(8, 8, 8, 1)).astype(np.float32),
              "label": rng.integers(0, C, 8).astype(np.int32)} for _ in range(3)]
  return model, tx, state, batches, new_head


def _same(a, b) -> bool:
  return bool(jnp.all(ravel_pytree(a)[0] == ravel_pytree(b)[0]))


@pytest.mark.parametrize("method,groups", [("las", {"head", "scales"}), ("crt", {"head"}),
                                           ("lws", {"scales"})])
def test_only_the_head_or_the_scales_train_and_the_backbone_stays_bit_identical(method, groups):
  model, tx, state, batches, new_head = _tiny_setup(method)
  params0 = jax.tree.map(np.array, state.params)
  stats0 = jax.tree.map(np.array, state.batch_stats)
  trainable0 = jax.tree.map(np.array, state.trainable)
  assert set(state.trainable) == groups
  if method == "crt":  # re-initialised, not the stage-1 layer
    assert _same(state.trainable["head"], new_head)
    assert not _same(state.trainable["head"], params0["classifier"])
  if method == "las":
    assert _same(state.trainable["head"], params0["classifier"])
  loss_fn = (s2.make_las_loss_fn([50, 20, 5, 2], 0.4, 0.1) if method == "las"
             else s2.make_stage2_loss_fn(method, [50, 20, 5, 2], eps_head=0, eps_tail=0))
  step = jax.jit(lambda st, b: s2.stage2_step(st, b, model=model, tx=tx, loss_fn=loss_fn))
  for batch in batches:
    state, metrics = step(state, batch)
  assert step._cache_size() == 1  # compiles once
  assert int(state.step) == 3 and np.isfinite(float(metrics["train_loss"]))
  # Frozen: every stage-1 parameter (including the stage-1 classifier layer) and BN statistics.
  assert _same(state.params, params0)
  assert _same(state.batch_stats, stats0)
  # Trained: each trainable group moved.
  for group in groups:
    assert not _same(state.trainable[group], trainable0[group]), group
  # The optimizer holds state for the trainables only (nothing for ~all other parameters).
  n_trainable = ravel_pytree(state.trainable)[0].size
  n_all = ravel_pytree(state.params)[0].size
  momentum_leaves = [x for x in jax.tree.leaves(state.opt_state) if getattr(x, "ndim", 0) > 0]
  assert sum(x.size for x in momentum_leaves) == n_trainable < n_all / 5


def test_lws_logits_are_the_stage1_logits_times_the_scales():
  model, tx, state, batches, _ = _tiny_setup("lws")
  scales = jnp.array([0.5, 1.0, 2.0, 3.0])
  state = state.replace(trainable={"scales": scales})
  images = batches[0]["image"]
  logits, _ = s2.stage2_logits(model, state.params, state.batch_stats, state.trainable, images)
  stage1 = model.apply({"params": state.params, "batch_stats": state.batch_stats}, images)
  np.testing.assert_allclose(logits, stage1 * scales, rtol=1e-6)


def test_optimizer_groups_head_rate_factor_and_no_decay_on_scales():
  model, _, state, batches, _ = _tiny_setup("las")
  tx = s2.stage2_optimizer(0.5, momentum=0.0, weight_decay=0.0, head_lr_factor=0.2)
  state = state.replace(opt_state=tx.init(state.trainable))
  loss_fn = s2.make_las_loss_fn([50, 20, 5, 2], 0.4, 0.1)

  def loss(trainable):
    logits, _ = s2.stage2_logits(model, state.params, state.batch_stats, trainable,
                                 batches[0]["image"])
    return jnp.mean(loss_fn(logits, batches[0]["label"]))

  grads = jax.grad(loss)(state.trainable)
  new_state, _ = s2.stage2_step(state, batches[0], model=model, tx=tx, loss_fn=loss_fn)
  expected = {"head": jax.tree.map(lambda p, g: p - 0.1 * g, state.trainable["head"], grads["head"]),
              "scales": state.trainable["scales"] - 0.5 * grads["scales"]}
  assert float(jnp.max(jnp.abs(ravel_pytree(new_state.trainable)[0]
                               - ravel_pytree(expected)[0]))) < 1e-6


def test_shift_bn_updates_running_statistics_but_not_parameters():
  model, tx, state, batches, _ = _tiny_setup("lws")
  params0, stats0 = jax.tree.map(np.array, (state.params, state.batch_stats))
  state, _ = s2.stage2_step(state, batches[0], model=model, tx=tx, shift_bn=True)
  assert _same(state.params, params0)
  assert not _same(state.batch_stats, stats0)


def test_shift_bn_only_re_estimates_the_matched_batchnorm_layers():
  model, tx, state, batches, _ = _tiny_setup("lws")
  stats0 = jax.tree.map(np.array, state.batch_stats)
  new, _ = s2.stage2_step(state, batches[0], model=model, tx=tx, shift_bn=True,
                          shift_bn_pattern="^bn3$")
  assert _same(new.batch_stats["bn1"], stats0["bn1"]) and _same(new.batch_stats["bn2"], stats0["bn2"])
  assert not _same(new.batch_stats["bn3"], stats0["bn3"])
  # bn1, bn2 in evaluation mode: the features entering bn3 are those of the eval-mode network,
  # so bn3's new running mean is 0.9 old + 0.1 x their batch mean (torch momentum 0.1).
  captured = {}  # the input of bn3 in the all-eval forward pass

  def grab(next_fun, args, kwargs, context):
    if context.module.name == "bn3" and context.method_name == "__call__":
      captured["x"] = args[0]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(grab):
    model.apply({"params": state.params, "batch_stats": state.batch_stats}, batches[0]["image"])
  x = np.asarray(captured["x"], np.float64).reshape(-1, captured["x"].shape[-1])
  np.testing.assert_allclose(new.batch_stats["bn3"]["mean"],
                             0.9 * stats0["bn3"]["mean"] + 0.1 * x.mean(0), rtol=1e-5, atol=1e-6)


def test_scales_weight_decay_is_l2_on_the_scales():
  model, _, state, batches, _ = _tiny_setup("lws")
  tx = s2.stage2_optimizer(0.5, momentum=0.0, weight_decay=0.0, scales_weight_decay=0.1)
  state = state.replace(trainable={"scales": jnp.array([1.0, 2.0, 0.5, 1.5])},
                        opt_state=tx.init({"scales": jnp.array([1.0, 2.0, 0.5, 1.5])}))

  def loss(trainable):
    logits, _ = s2.stage2_logits(model, state.params, state.batch_stats, trainable,
                                 batches[0]["image"])
    return jnp.mean(s2.losses.cross_entropy(logits, batches[0]["label"]))

  grads = jax.grad(loss)(state.trainable)
  new, _ = s2.stage2_step(state, batches[0], model=model, tx=tx)
  expected = state.trainable["scales"] - 0.5 * (grads["scales"] + 0.1 * state.trainable["scales"])
  np.testing.assert_allclose(new.trainable["scales"], expected, rtol=1e-6)


def test_las_without_head_trains_the_scales_only():
  _, _, state, _, _ = _tiny_setup("las", las_head=False)
  assert set(state.trainable) == {"scales"}
  with pytest.raises(ValueError, match="nothing"):
    _tiny_setup("las", las_head=False, las_scales=False)


def test_missing_head_is_a_clear_error():
  with pytest.raises(ValueError, match="no top-level parameter entry 'fc'"):
    s2.split_head({"conv": {}, "classifier": {}}, "fc")
  with pytest.raises(ValueError, match="new_head"):
    s2.stage2_trainable("crt", {"classifier": {"kernel": jnp.ones((2, 2))}}, 2)


# ---------------------------------------------------------------------------- the runner


def _stage1_config(**overrides):
  config = digits_lt.get_config()
  config.method = "ce"
  config.num_epochs = 1
  config.max_steps = 4
  config.progress_bar = False
  config.log_every_steps = 2
  for key, value in overrides.items():
    config[key] = value
  return config


def _stage2_config(stage1_workdir, method="las", max_steps=5):
  config = digits_lt_stage2.get_config()
  config.num_epochs = 1
  config.max_steps = 4
  config.progress_bar = False
  config.log_every_steps = 2
  config.method = "ce"
  config.stage1_workdir = str(stage1_workdir)
  config.stage2.method = method
  config.stage2.max_steps = max_steps
  return config


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
  previous = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  workdir = tmp_path_factory.mktemp("stage1") / "ce"
  results = trainer.train_and_evaluate(_stage1_config(), str(workdir))
  jax.config.update("jax_disable_most_optimizations", previous)
  return workdir, results


def test_stage2_run_freezes_the_backbone_and_reports_like_stage1(stage1_run, tmp_path):
  stage1_dir, stage1_results = stage1_run
  workdir = tmp_path / "las"
  config = _stage2_config(stage1_dir, "las", max_steps=12)  # 9 steps per epoch: 1 epoch + 3 steps
  results = stage2.train_stage2(config, str(workdir))
  on_disk = json.load(open(workdir / reporting.RESULTS_FILE, encoding="utf-8"))
  for key in ("final_test", "best_val_test", "per_class_test_accuracy", "history", "stage1",
              "stage2", "plots"):
    assert key in on_disk, key
  assert on_disk["steps"] == results["steps"] == 12
  assert on_disk["history"]["partial_epoch"] == [False, True]
  assert {"overall", "many", "medium", "few", "per_class"} <= set(on_disk["final_test"])
  # The restored stage-1 network reproduces stage 1's own final test accuracy.
  assert on_disk["stage1"]["restored_test"]["overall"] == stage1_results["final_test"]["overall"]
  assert on_disk["stage2"]["las_eps_head"] == 0.3 and on_disk["stage2"]["las_eps_tail"] == 0.0
  assert len(on_disk["stage2"]["logit_scales"]) == 10
  for path in on_disk["plots"].values():
    assert os.path.getsize(path) > 1000

  # Backbone bit-identical after stage 2: the saved stage-2 state against the stage-1 checkpoint.
  state = stage2.load_stage2_state(config, str(workdir))
  setup = stage2.prepare_stage2(config)
  assert int(state.step) == 12
  assert _same(state.params, setup.params1) and _same(state.batch_stats, setup.batch_stats1)
  backbone, head1 = s2.split_head(jax.device_get(setup.params1))
  assert not _same(state.trainable["head"], head1)  # ... while the head did train

  # Rerunning with a larger budget resumes at step 12 (the partial epoch is redone in the record).
  config.stage2.max_steps = 18
  resumed = stage2.train_stage2(config, str(workdir))
  assert resumed["start_step"] == 12 and resumed["steps"] == 18
  assert resumed["history"]["partial_epoch"] == [False, False]


def test_stage2_errors_are_clear(stage1_run, tmp_path):
  stage1_dir, _ = stage1_run
  with pytest.raises(errors.InvalidInputError, match="does not exist"):
    stage2.train_stage2(_stage2_config(tmp_path / "nowhere"), str(tmp_path / "a"))
  with pytest.raises(errors.InvalidInputError, match="stage1_workdir"):
    stage2.train_stage2(_stage2_config(""), str(tmp_path / "a"))
  config = _stage2_config(stage1_dir)
  config.data.imbalance_factor = 10.0
  with pytest.raises(ValueError, match="--config.data.imbalance_factor=50.0"):
    stage2.train_stage2(config, str(tmp_path / "b"))
  config = _stage2_config(stage1_dir, method="mixup")
  with pytest.raises(ValueError, match="las, crt, lws"):
    stage2.train_stage2(config, str(tmp_path / "c"))
  # A checkpoint that is not the network the config describes: a BatchNorm-free CNN.
  fake = tmp_path / "fake_stage1"
  shutil.copytree(stage1_dir, fake)
  results = json.load(open(fake / reporting.RESULTS_FILE, encoding="utf-8"))
  results["config"]["model"] = "small_cnn_nobn"
  json.dump(results, open(fake / reporting.RESULTS_FILE, "w", encoding="utf-8"))
  config = _stage2_config(fake)
  config.model = "small_cnn_nobn"
  with pytest.raises(errors.CheckpointError, match="is not the network .* model: 'small_cnn' in "
                     "the checkpoint, 'small_cnn_nobn' now"):
    stage2.train_stage2(config, str(tmp_path / "d"))
  # No best-validation state kept (an older stage-1 run), then no checkpoint at all.
  shutil.rmtree(fake / "best_checkpoints")
  with pytest.raises(errors.InvalidInputError, match="init_checkpoint=last"):
    stage2.train_stage2(config, str(tmp_path / "e"))
  config.stage2.init_checkpoint = "last"
  shutil.rmtree(fake / "checkpoints")
  with pytest.raises(errors.InvalidInputError, match="No checkpoints/"):
    stage2.train_stage2(config, str(tmp_path / "e"))


def test_crt_and_lws_runs(stage1_run, tmp_path):
  stage1_dir, _ = stage1_run
  for method in ("crt", "lws"):
    results = stage2.train_stage2(_stage2_config(stage1_dir, method, max_steps=3),
                                  str(tmp_path / method))
    assert results["steps"] == 3 and results["stage2"]["method"] == method
    assert (results["stage2"]["logit_scales"] is None) == (method == "crt")


def test_stage2_config_fields():
  config = digits_lt_stage2.get_config()
  assert config.stage == 2 and config.stage2.method == "las"
  assert set(_stage2.stage2_section()) <= set(config.stage2)
  stage2.validate_stage2_config(_stage2_config("/tmp/x"))
  config.stage2.las_eps_head, config.stage2.las_eps_tail = 0.25, 0.05
  assert stage2.las_smoothing(config) == (0.25, 0.05)


def test_entry_point_and_a_stage1_run_trained_further(stage1_run, tmp_path):
  """`python -m experiments.train` with a stage-2 config; then stage 1 moves on: a clear error."""
  stage1_dir = tmp_path / "stage1"
  shutil.copytree(stage1_run[0], stage1_dir)
  workdir = tmp_path / "las_cli"
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="true")
  command = [sys.executable, "-m", "experiments.train",
             "--config=experiments/configs/digits_lt_stage2.py",
             f"--config.stage1_workdir={stage1_dir}", f"--workdir={workdir}",
             "--config.stage2.max_steps=3", "--config.progress_bar=False"]
  proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Stage 2: las on the stage-1 ce run" in proc.stdout and "test, final epoch" in proc.stdout
  results = json.load(open(workdir / reporting.RESULTS_FILE, encoding="utf-8"))
  assert results["steps"] == 3 and results["stage1"]["step"] == 4

  trainer.train_and_evaluate(_stage1_config(max_steps=6), str(stage1_dir))
  with pytest.raises(errors.CheckpointError, match="now at step 6"):
    stage2.train_stage2(_stage2_config(stage1_dir, max_steps=5), str(workdir))


# ---------------------------------------------------------------------------- stage-2 resume


RESUME_OVERRIDES = {"stage2.num_epochs": 2, "stage2.max_steps": 0, "checkpoint_every_steps": 4}
STAGE2_STEPS = 18  # 2 epochs of 9 steps; checkpoints at 4, 8, 9, 12, 16 and 18
COMPARED = ("final_test", "best_val_test", "best_val_epoch", "history", "steps",
            "per_class_test_accuracy", "stage2")


def _resumable_stage2_config(stage1_dir):
  config = _stage2_config(stage1_dir, "las")
  for key, value in RESUME_OVERRIDES.items():
    section, _, field = key.rpartition(".")
    (config[section] if section else config)[field] = value
  return config


def _final_digests(workdir, step):
  with checkpointing.Checkpointer(os.path.join(workdir, "checkpoints")) as checkpointer:
    return checkpointer.read_digests(step)


@pytest.fixture(scope="module")
def stage2_reference(stage1_run, tmp_path_factory):
  previous = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    workdir = str(tmp_path_factory.mktemp("stage2_reference"))
    results = stage2.train_stage2(_resumable_stage2_config(stage1_run[0]), workdir)
  finally:
    jax.config.update("jax_disable_most_optimizations", previous)
  return results, _final_digests(workdir, STAGE2_STEPS)


# The child kills itself with SIGKILL while the dataset builds batch KILL_AT (steps 1..KILL_AT-1
# done, saves of checkpoints 4, 8, 9 and 12 possibly still being written).
_KILL_AT = 13
_CHILD = """
import os, runpy, signal, sys
from experiments import datasets
original = datasets.InMemoryDataset.train_batches
def train_batches(*args, **kwargs):
  for item in original(*args, **kwargs):
    if item[0] == {kill_at}:
      os.kill(os.getpid(), signal.SIGKILL)
    yield item
datasets.InMemoryDataset.train_batches = train_batches
sys.argv = ["train"] + {argv!r}
runpy.run_module("experiments.train", run_name="__main__")
"""


def _sigterm_at(monkeypatch, step_index: int):
  original = datasets.InMemoryDataset.train_batches

  def train_batches(*args, **kwargs):
    for item in original(*args, **kwargs):
      if item[0] == step_index:
        os.kill(os.getpid(), signal.SIGTERM)
      yield item

  monkeypatch.setattr(datasets.InMemoryDataset, "train_batches", train_batches)


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_stage2_resumes_exactly_after_sigterm_and_sigkill(stage1_run, stage2_reference, tmp_path,
                                                          monkeypatch, how):
  reference, reference_digests = stage2_reference
  workdir = str(tmp_path / how)
  if how == "sigterm":
    with monkeypatch.context() as patch:
      _sigterm_at(patch, 5)
      with pytest.raises(errors.Preempted, match="Stopped by SIGTERM after step 5 of 18"):
        stage2.train_stage2(_resumable_stage2_config(stage1_run[0]), workdir)
    expected_start = 5
  else:
    argv = ["--config=experiments/configs/digits_lt_stage2.py", f"--workdir={workdir}",
            f"--config.stage1_workdir={stage1_run[0]}", "--config.progress_bar=False",
            "--config.log_every_steps=2"] + [f"--config.{k}={v}" for k, v in
                                              RESUME_OVERRIDES.items()]
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="true")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", _CHILD.format(kill_at=_KILL_AT, argv=argv)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    expected_start = None
  assert not os.path.exists(os.path.join(workdir, reporting.RESULTS_FILE))
  resumed = stage2.train_stage2(_resumable_stage2_config(stage1_run[0]), workdir)
  if expected_start is None:  # the newest complete checkpoint before the kill
    assert resumed["start_step"] in (4, 8, 9, 12), resumed["start_step"]
  else:
    assert resumed["start_step"] == expected_start
  for key in COMPARED:
    assert resumed[key] == reference[key], key
  assert _final_digests(workdir, STAGE2_STEPS) == reference_digests  # bit-identical state


def test_sigterm_on_the_last_step_then_two_reruns(stage1_run, tmp_path, monkeypatch):
  """The deferred evaluation is done and saved by the first rerun; the second only reports.
  Resuming with another stage2.num_epochs (another cosine schedule) is refused."""
  workdir = str(tmp_path / "last_step")
  config = _stage2_config(stage1_run[0], "lws", max_steps=3)
  config.stage2.num_epochs = 1

  def stop_at_last_step(self, step):
    if step == 3:
      self._requested = signal.SIGTERM  # what the handler does on SIGTERM  # pylint: disable=protected-access
    return self._requested is not None  # pylint: disable=protected-access

  with monkeypatch.context() as patch:
    patch.setattr(preemption.StopSignal, "should_stop", stop_at_last_step)
    with pytest.raises(errors.Preempted, match="after step 3 of 3"):
      stage2.train_stage2(config, workdir)
  with checkpointing.Checkpointer(os.path.join(workdir, "checkpoints")) as checkpointer:
    assert checkpointer.restore_loop(3)["pending_evaluation"] is True

  evaluations = []
  original = loop_lib.eval_counts

  def counted(*args, **kwargs):
    evaluations.append(1)
    return original(*args, **kwargs)

  monkeypatch.setattr(loop_lib, "eval_counts", counted)
  first = stage2.train_stage2(config, workdir)  # evaluates (meta, test; restored network)
  assert first["steps"] == 3 and first["history"]["step"] == [3] and len(evaluations) == 3
  results_path = os.path.join(workdir, reporting.RESULTS_FILE)
  written = os.stat(results_path).st_mtime_ns
  with checkpointing.Checkpointer(os.path.join(workdir, "checkpoints")) as checkpointer:
    assert checkpointer.all_steps() == [3]
    assert checkpointer.restore_loop(3)["pending_evaluation"] is False
  # The pending version was replaced, not left beside it; the new one has its checksums.
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "digests"]
  with checkpointing.Checkpointer(os.path.join(workdir, "checkpoints")) as checkpointer:
    shapes = checkpointer.read_meta(3)["state_shapes"]
    assert set(checkpointer.read_digests(3)) == {name for name, _, _ in shapes}

  second = stage2.train_stage2(config, workdir)  # only reports
  assert len(evaluations) == 3 and os.stat(results_path).st_mtime_ns == written
  assert second["final_test"] == first["final_test"] and second["start_step"] == 3

  config.stage2.num_epochs = 3
  with pytest.raises(errors.InvalidInputError,
                     match=r"another learning-rate schedule: stage2\.num_epochs: 1 there, 3 now.*"
                           r"--config\.stage2\.num_epochs=1"):
    stage2.train_stage2(config, workdir)


def test_shift_bn_pattern_matching_no_batchnorm_is_a_clear_error(stage1_run, tmp_path):
  config = _stage2_config(stage1_run[0])
  config.stage2.shift_bn, config.stage2.shift_bn_only = True, "(^|/)extra_block/"
  with pytest.raises(errors.InvalidInputError, match="matches no BatchNorm .* bn1"):
    stage2.train_stage2(config, str(tmp_path / "x"))
