"""The streamed data path of the runner (experiments/streaming.py) on generated JPEG lists.

What each process reads, in which order, with which padding; then stage 1 and
stage 2 (LAS, cRT, LWS) of the runner on these lists with a small CNN. The
large-scale configs are run on them in tests/test_large_configs.py.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from dnet_jax.data import split_lists
from experiments import datasets
from experiments import stage2
from experiments import sampling
from experiments import streaming
from experiments import trainer
from experiments.configs import _stage2
from experiments.configs import imagenet_lt_stage2
from experiments.configs import places_lt_stage2
from experiments.configs import split_list_lt
from experiments.errors import InvalidInputError
from tests import split_list_data

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                                reason="tensorflow is not installed")

TRAIN_COUNTS = [12, 6, 3]  # 21 images: 5 full batches of 4 per epoch
META_PER_CLASS, TEST_PER_CLASS = 2, 3


@pytest.fixture(scope="module")
def lists(tmp_path_factory):
  return split_list_data.write_split_lists(tmp_path_factory.mktemp("lists"), TRAIN_COUNTS,
                                           META_PER_CLASS, TEST_PER_CLASS)


def tiny_config(lists, **overrides):
  config = split_list_lt.get_config()
  split_list_data.apply_to_config(config, lists, num_classes=0)  # inferred from the lists
  config.batch_size, config.meta_batch_size, config.eval_batch_size = 4, 4, 4
  config.many_threshold, config.few_threshold = 5, 4
  for key, value in overrides.items():
    config[key] = value
  return config


def load(config, process_index=0, process_count=1):
  return streaming.load(config, process_index=process_index, process_count=process_count)


def collect(data, start, end):
  return list(data.train_batches(start, end, with_meta=True))


def test_counts_groups_and_sizes_come_from_the_lists(lists):
  data = load(tiny_config(lists))
  assert data.num_classes == 3
  np.testing.assert_array_equal(data.class_counts, TRAIN_COUNTS)
  assert (data.num_train, data.num_meta, data.num_test) == (21, 6, 9)
  assert data.steps_per_epoch == 5 and data.image_shape == (32, 32, 3)
  groups = data.shot_groups(5, 4)
  assert groups["many"].tolist() == [True, True, False]
  assert groups["few"].tolist() == [False, False, True]
  assert "streamed" in data.summary()


def test_global_batches_do_not_depend_on_the_process_count(lists):
  """Two processes read disjoint halves of exactly the batches one process reads."""
  config = tiny_config(lists)
  single = collect(load(config), 0, 7)  # crosses into the second epoch
  halves = [collect(load(config, p, 2), 0, 7) for p in range(2)]
  for step, (s, batch, meta) in enumerate(single):
    assert s == step == halves[0][step][0] == halves[1][step][0]
    for whole, parts in ((batch, [h[step][1] for h in halves]),
                         (meta, [h[step][2] for h in halves])):
      assert whole["image"].shape == (4, 32, 32, 3) and whole["image"].dtype == np.float32
      assert parts[0]["image"].shape[0] == 2
      for key in ("image", "label"):
        np.testing.assert_array_equal(whole[key], np.concatenate([p[key] for p in parts]))
      # Every image is the colour of its own class: the labels travel with the files.
      mean, std = np.array((0.485, 0.456, 0.406)), np.array((0.229, 0.224, 0.225))
      np.testing.assert_array_equal(split_list_data.decode(whole["image"], mean, std),
                                    whole["label"])
  # An epoch visits distinct training images; the next epoch reorders them.
  first_epoch = np.concatenate([b["label"] for _, b, _ in single[:5]])
  assert sorted(np.bincount(first_epoch, minlength=3)) <= sorted(TRAIN_COUNTS)
  assert not np.array_equal(single[0][1]["image"], single[5][1]["image"])


def test_a_resumed_stream_reads_what_the_uninterrupted_one_read(lists):
  data = load(tiny_config(lists))
  full = collect(data, 0, 9)
  resumed = collect(data, 3, 9)  # inside epoch 0, across the epoch boundary at 5
  assert [s for s, _, _ in resumed] == list(range(3, 9))
  for (s, batch, meta), (s2, batch2, meta2) in zip(full[3:], resumed):
    assert s == s2
    for key in ("image", "label"):
      np.testing.assert_array_equal(batch[key], batch2[key])
      np.testing.assert_array_equal(meta[key], meta2[key])


def test_without_meta_batches(lists):
  items = list(load(tiny_config(lists)).train_batches(0, 2, with_meta=False))
  assert [meta for _, _, meta in items] == [None, None]


@pytest.mark.parametrize("split,per_class", [("meta", META_PER_CLASS), ("test", TEST_PER_CLASS)])
def test_evaluation_shards_cover_each_split_once(lists, split, per_class):
  config = tiny_config(lists)
  labels, batches_per_process = [], []
  for process in range(2):
    out = list(load(config, process, 2).eval_batches(split))
    batches_per_process.append(len(out))
    for batch in out:
      assert batch["image"].shape == (2, 32, 32, 3)  # eval_batch_size 4 over 2 processes
      labels.append(batch["label"][batch["mask"] == 1])
  assert batches_per_process[0] == batches_per_process[1]  # the collectives stay in step
  np.testing.assert_array_equal(np.bincount(np.concatenate(labels), minlength=3),
                                [per_class] * 3)


def test_invalid_settings_are_clear_errors(lists, tmp_path):
  config = tiny_config(lists)
  config.data.meta_list = ""
  with pytest.raises(InvalidInputError, match=r"needs data\.meta_list"):
    load(config)
  with pytest.raises(InvalidInputError, match=r"meta_batch_size=8 exceeds the meta"):
    load(tiny_config(lists, meta_batch_size=8))
  with pytest.raises(InvalidInputError, match=r"no full batch"):
    load(tiny_config(lists, batch_size=24))
  config = tiny_config(lists)
  config.data.num_classes = 4
  with pytest.raises(InvalidInputError, match=r"1 class\(es\) have no training example \(3\)"):
    load(config)
  config = tiny_config(lists)
  config.data.image_size = 16
  with pytest.raises(InvalidInputError, match=r"image_size=16 is too small for model='resnet10'"):
    load(config)
  config = tiny_config(lists)
  missing = tmp_path / "missing.txt"
  missing.write_text("train/class_0/nope.jpg 0\n")
  config.data.test_list = str(missing)
  with pytest.raises(InvalidInputError, match=r"missing\.txt, line 1: image .*nope\.jpg"):
    load(config)


def test_tfds_imagenet_lt_source(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  config = tiny_config({}, batch_size=2, meta_batch_size=2, eval_batch_size=4)
  config.data.source = "imagenet_lt"
  config.data.data_dir = str(tmp_path)
  config.data.num_classes = 1000
  config.many_threshold, config.few_threshold = 100, 20
  with tfds.testing.mock_data(num_examples=6):
    data = load(config)
    assert (data.num_train, data.num_meta, data.num_test) == (6, 6, 6)
    assert data.num_classes == 1000 and data.class_counts.sum() == 6
    assert data.steps_per_epoch == 3
    items = collect(data, 2, 5)  # resumes inside epoch 0, crosses into epoch 1
    evaluation = list(data.eval_batches("test"))
  assert [s for s, _, _ in items] == [2, 3, 4]
  for _, batch, meta in items:
    assert batch["image"].shape == meta["image"].shape == (2, 32, 32, 3)
  np.testing.assert_array_equal(np.concatenate([b["mask"] for b in evaluation]), [1] * 6 + [0] * 2)


def test_class_balanced_sampler_reads_the_rows_of_its_draw(lists):
  data = load(tiny_config(lists))
  labels = split_lists.read_split_list(lists["train_list"]).labels
  order = sampling.epoch_order("class_balanced", labels, 0, 1, 5 * 4)  # epoch 1, 5 batches of 4
  items = list(data.train_batches(5, 7, with_meta=False, sampler="class_balanced"))
  for (step, batch, _), rows in zip(items, order.reshape(5, 4)):
    np.testing.assert_array_equal(batch["label"], labels[rows])
    np.testing.assert_array_equal(split_list_data.decode(batch["image"], (0.485, 0.456, 0.406),
                                                         (0.229, 0.224, 0.225)), labels[rows])


@pytest.mark.parametrize("iterations", [0, 3])
def test_class_aware_sampler_reads_4_per_class_and_its_epoch_length(lists, iterations):
  data = load(tiny_config(lists))
  labels = split_lists.read_split_list(lists["train_list"]).labels
  sampler = sampling.Sampler("class_aware", 4, iterations)
  per_epoch = iterations or (12 * 3) // 4  # max n_c x C samples, full batches of 4
  assert data.steps_for(sampler) == per_epoch
  items = list(data.train_batches(per_epoch - 1, per_epoch + 2, with_meta=False,
                                  sampler=sampler))
  assert [step for step, _, _ in items] == list(range(per_epoch - 1, per_epoch + 2))
  for _, batch, _ in items:  # batch of 4 = one group of 4 consecutive images of one class
    decoded = split_list_data.decode(batch["image"], (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    np.testing.assert_array_equal(decoded, batch["label"])
    assert len(set(batch["label"].tolist())) == 1


@pytest.mark.usefixtures("fast_compilation")
def test_stage2_on_split_lists_runs_las_crt_lws(lists, tmp_path):
  """Stage 1 (2 steps) then each stage-2 method (2 steps) on the streamed JPEG lists."""
  config = tiny_config(lists, model="small_cnn", method="ce", num_epochs=1, max_steps=2,
                       progress_bar=False, augment=False)
  stage1_results = trainer.train_and_evaluate(config, str(tmp_path / "stage1"))
  for method in ("las", "crt", "lws"):
    config2 = _stage2.add_stage2_fields(tiny_config(lists, model="small_cnn", method="ce",
                                                    progress_bar=False, augment=False))
    config2.stage1_workdir = str(tmp_path / "stage1")
    config2.stage2.method, config2.stage2.max_steps, config2.stage2.batch_size = method, 2, 4
    results = stage2.train_stage2(config2, str(tmp_path / method))
    assert results["steps"] == 2 and results["stage2"]["method"] == method
    assert results["data"]["class_counts"] == TRAIN_COUNTS
    # The stage-1 network, restored and evaluated through the stage-2 steps, reproduces
    # stage 1's own test accuracy (read from the same JPEGs).
    assert (results["stage1"]["restored_test"]["overall"]
            == stage1_results["final_test"]["overall"])
    assert (results["stage2"]["logit_scales"] is None) == (method == "crt")
  # The public ImageNet-LT / Places-LT stage 2 (their configs' sections, shrunk): LWS scales
  # only on the LAS loss, class-aware sampling with a fixed epoch, shifted BN (all layers /
  # one layer: the small CNN has no `extra_block`), the best-test stage-1 state.
  for name, section in (("imagenet", imagenet_lt_stage2.public_stage2_section()),
                        ("places", places_lt_stage2.public_stage2_section())):
    config2 = _stage2.add_stage2_fields(tiny_config(lists, model="small_cnn", method="ce",
                                                    progress_bar=False, augment=False), section)
    config2.stage1_workdir = str(tmp_path / "stage1")
    s = config2.stage2
    s.iterations_per_epoch, s.num_epochs, s.batch_size, s.learning_rate = 2, 2, 4, 0.1
    if s.shift_bn_only:
      s.shift_bn_only = "bn3"
    results = stage2.train_stage2(config2, str(tmp_path / name))
    assert results["steps"] == 4 and results["steps_per_epoch"] == 2
    assert results["stage2"]["trainable"] == ["scales"]
    assert results["stage2"]["init_checkpoint"] == "best_test"
    assert results["stage2"]["las_eps_head"] == {"imagenet": 0.3, "places": 0.4}[name]
    # per-epoch cosine: 0.05 (1 + cos(pi e / 2)) in epoch e
    assert results["history"]["learning_rate"] == pytest.approx([0.1, 0.05])
