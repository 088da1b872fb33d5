"""The split-list image pipeline: parsing, errors, labels, sharding, determinism.

Every generated JPEG is one solid colour that encodes its label (red) and its
line in the list (green), so the pipeline's output can be checked pixel-wise:
cropping, resizing and flipping a solid image leave its colour unchanged.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dnet_jax.data import split_lists

# The pipeline runs on tf.data (the optional "tf" extra); list parsing does not need it.
needs_tf = pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                              reason="tensorflow is not installed")

NUM_CLASSES = 3
LABELS = [0] * 10 + [1] * 6 + [2] * 4  # long-tailed: 10, 6, 4
IMAGE_SIZE = 16


def _colour(label: int, index: int) -> tuple[int, int, int]:
  return (40 + 60 * label, 20 + 10 * index, 128)


def _decode(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(label, index) from the mean colour of unnormalised [0, 1] images."""
  mean = images.mean(axis=(1, 2)) * 255.0
  # Every pixel must be the image's colour (JPEG rounding allows a few levels).
  assert np.all(np.abs(images * 255.0 - mean[:, None, None, :]) < 6)
  return np.rint((mean[:, 0] - 40) / 60).astype(int), np.rint((mean[:, 1] - 20) / 10).astype(int)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp("images")
  lines = []
  for index, label in enumerate(LABELS):
    rel = f"train/class_{label}/part{index % 2}/img_{index:03d}.jpg"  # nested folders
    os.makedirs(root / os.path.dirname(rel), exist_ok=True)
    size = (20 + 3 * index, 24 + (index % 5) * 4)  # varied shapes and aspect ratios
    Image.new("RGB", size, _colour(label, index)).save(root / rel, quality=95, subsampling=0)
    lines.append(f"{rel} {label}")
  list_path = root / "train_list.txt"
  list_path.write_text("\n".join(lines) + "\n")
  return root, list_path


def _collect(split, root, **kwargs):
  kwargs = dict(batch_size=4, image_size=IMAGE_SIZE, resize_size=18, mean=(0.0, 0.0, 0.0),
                std=(1.0, 1.0, 1.0), process_index=0, process_count=1) | kwargs
  out = list(split_lists.batches(split, root, **kwargs))
  return {k: np.concatenate([b[k] for b in out]) for k in out[0]}, len(out)


def test_reads_list_and_counts_classes(dataset):
  root, list_path = dataset
  split = split_lists.read_split_list(list_path, NUM_CLASSES, image_root=root)
  assert len(split) == len(LABELS)
  np.testing.assert_array_equal(split.labels, LABELS)
  assert split.labels.dtype == np.int32
  np.testing.assert_array_equal(split.class_counts(), [10, 6, 4])
  np.testing.assert_array_equal(split_lists.class_counts(split, 4), [10, 6, 4, 0])
  assert split_lists.read_split_list(list_path).num_classes == 3  # inferred


@needs_tf
def test_eval_pipeline_labels_pixels_and_determinism(dataset):
  root, list_path = dataset
  split = split_lists.read_split_list(list_path, NUM_CLASSES, image_root=root)
  first, n_batches = _collect(split, root, train=False)
  assert n_batches == 5  # 20 examples in batches of 4
  assert first["image"].shape == (20, IMAGE_SIZE, IMAGE_SIZE, 3)
  assert first["image"].dtype == np.float32 and first["label"].dtype == np.int32
  np.testing.assert_array_equal(first["mask"], np.ones(20))
  labels, index = _decode(first["image"])
  np.testing.assert_array_equal(index, np.arange(20))  # list order
  np.testing.assert_array_equal(labels, LABELS)
  np.testing.assert_array_equal(first["label"], LABELS)
  second, _ = _collect(split, root, train=False)
  for key in first:
    np.testing.assert_array_equal(first[key], second[key])


@needs_tf
def test_normalisation_uses_mean_and_std(dataset):
  root, list_path = dataset
  split = split_lists.read_split_list(list_path, NUM_CLASSES)
  raw, _ = _collect(split, root, train=False)
  normalised, _ = _collect(split, root, train=False, mean=split_lists.IMAGENET_MEAN,
                           std=split_lists.IMAGENET_STD)
  expected = (raw["image"] - np.array(split_lists.IMAGENET_MEAN)) / np.array(
      split_lists.IMAGENET_STD)
  np.testing.assert_allclose(normalised["image"], expected, atol=1e-5)


@needs_tf
def test_eval_shards_cover_the_list_once_with_padding(dataset):
  root, list_path = dataset
  split = split_lists.read_split_list(list_path, NUM_CLASSES)
  seen = []
  for process in range(2):
    out, n_batches = _collect(split, root, train=False, batch_size=3, process_index=process,
                              process_count=2)
    assert n_batches == 4  # 10 examples each, padded to 12
    real = out["mask"] == 1
    assert real.sum() == 10
    labels, index = _decode(out["image"][real])
    np.testing.assert_array_equal(labels, out["label"][real])
    seen.append(index)
  assert not set(seen[0]) & set(seen[1])
  np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(20))


@needs_tf
def test_train_shards_are_disjoint_deterministic_and_reshuffled(dataset):
  root, list_path = dataset
  split = split_lists.read_split_list(list_path, NUM_CLASSES)
  kwargs = dict(train=True, batch_size=2, seed=7, process_count=2)
  shards = []
  for process in range(2):
    out, n_batches = _collect(split, root, process_index=process, epoch=0, **kwargs)
    assert n_batches == 5 and "mask" not in out
    labels, index = _decode(out["image"])
    np.testing.assert_array_equal(labels, out["label"])  # every image keeps its label
    np.testing.assert_array_equal(labels, np.asarray(LABELS)[index])
    shards.append(index)
    again, _ = _collect(split, root, process_index=process, epoch=0, **kwargs)
    np.testing.assert_array_equal(out["image"], again["image"])  # same seed and epoch
  assert not set(shards[0]) & set(shards[1])
  np.testing.assert_array_equal(np.sort(np.concatenate(shards)), np.arange(20))
  assert not np.array_equal(shards[0], np.arange(10))  # shuffled
  next_epoch, _ = _collect(split, root, process_index=0, epoch=1, **kwargs)
  assert not np.array_equal(_decode(next_epoch["image"])[1], shards[0])


@needs_tf
def test_random_crops_differ_between_epochs(dataset):
  root, _ = dataset
  # A two-colour image shows the crop: different epochs give different crops of it.
  rel = "two_colour.jpg"
  image = np.zeros((40, 40, 3), np.uint8)
  image[:, :20] = 255
  Image.fromarray(image).save(root / rel, quality=95)
  list_path = root / "two_colour.txt"
  list_path.write_text(f"{rel} 0\n" * 4)
  split = split_lists.read_split_list(list_path, 1, image_root=root)
  crops = [_collect(split, root, train=True, batch_size=4, epoch=e)[0]["image"]
           for e in range(2)]
  assert not np.allclose(crops[0], crops[1])
  # The same example gets different crops within an epoch, too (its seed has its index).
  assert not np.allclose(crops[0][0], crops[0][1])


def test_shard_indices_partition_for_uneven_sizes():
  for n in (21, 22, 23):
    train = [split_lists.shard_indices(n, 2, train=True, seed=1, epoch=3, process_index=p,
                                        process_count=3)[0] for p in range(3)]
    assert len({len(t) for t in train}) == 1  # same number of steps everywhere
    flat = np.concatenate(train)
    assert len(np.unique(flat)) == len(flat)
    evals = [split_lists.shard_indices(n, 4, train=False, process_index=p, process_count=3)
             for p in range(3)]
    assert len({len(i) for i, _ in evals}) == 1
    real = np.concatenate([i[m == 1] for i, m in evals])
    np.testing.assert_array_equal(np.sort(real), np.arange(n))


def _write(tmp_path, text):
  path = tmp_path / "bad_list.txt"
  path.write_text(text)
  return path


def test_malformed_line_names_file_and_line(dataset, tmp_path):
  root, _ = dataset
  good = "train/class_0/part0/img_000.jpg 0\n"
  path = _write(tmp_path, good + "\n" + "train/class_0/part1/img_001.jpg\n")
  with pytest.raises(ValueError, match=r"bad_list\.txt, line 3: expected 'relative/path\.jpg "
                     r"label'"):
    split_lists.read_split_list(path, NUM_CLASSES)
  path = _write(tmp_path, good + "train/class_0/part1/img_001.jpg one\n")
  with pytest.raises(ValueError, match=r"bad_list\.txt, line 2: expected"):
    split_lists.read_split_list(path, NUM_CLASSES)


def test_label_out_of_range_names_line(dataset, tmp_path):
  path = _write(tmp_path, "a.jpg 0\nb.jpg 1\nc.jpg 3\n")
  with pytest.raises(ValueError, match=r"bad_list\.txt, line 3: label 3 is outside \[0, 3\)"):
    split_lists.read_split_list(path, NUM_CLASSES)
  path = _write(tmp_path, "a.jpg -1\n")
  with pytest.raises(ValueError, match=r"line 1: label -1 is outside"):
    split_lists.read_split_list(path)


def test_missing_image_names_line(dataset, tmp_path):
  root, _ = dataset
  path = _write(tmp_path, "train/class_0/part0/img_000.jpg 0\n"
                "train/class_0/part1/img_999.jpg 0\n"
                "no_such_dir/img.jpg 1\n")
  with pytest.raises(FileNotFoundError,
                     match=r"bad_list\.txt, line 2: image 'train/class_0/part1/img_999\.jpg' "
                     r"does not exist under .*\(2 images missing in all\)"):
    split_lists.read_split_list(path, NUM_CLASSES, image_root=root)
  with pytest.raises(FileNotFoundError, match=r"Split list .*nothing\.txt' does not exist"):
    split_lists.read_split_list(tmp_path / "nothing.txt")


# --- ImageNet-LT through TFDS (shares split_lists's transforms) ------------------------------
# tfds.testing.mock_data supports imagenet_lt: it generates random PNG images and labels from
# the builder's feature spec without the (manually downloaded) data. It ignores sub-splits
# (every split and per-process sub-split has `num_examples` examples), so the multi-process
# padding arithmetic is tested above on split_lists, and here with one process.


@needs_tf
def test_imagenet_lt_not_prepared_is_a_clear_error(tmp_path):
  from dnet_jax.data import imagenet_lt

  with pytest.raises(FileNotFoundError, match=r"not prepared in data_dir=.*manual download.*"
                     r"ILSVRC2012_img_train\.tar"):
    imagenet_lt.make_dataset("train", tmp_path, batch_size=2, train=True, process_index=0,
                             process_count=1)


@needs_tf
def test_imagenet_lt_mock_batches(tmp_path):
  import tensorflow_datasets as tfds

  from dnet_jax.data import imagenet_lt

  kwargs = dict(image_size=IMAGE_SIZE, resize_size=18, process_index=0, process_count=1)
  with tfds.testing.mock_data(num_examples=6):
    evaluation = list(imagenet_lt.batches("validation", tmp_path, batch_size=4, train=False,
                                          **kwargs))
    train = [list(imagenet_lt.batches("train", tmp_path, batch_size=2, train=True, seed=3,
                                      **kwargs)) for _ in range(2)]
  assert len(evaluation) == 2
  mask = np.concatenate([b["mask"] for b in evaluation])
  np.testing.assert_array_equal(mask, [1, 1, 1, 1, 1, 1, 0, 0])
  for batch in evaluation + train[0]:
    assert batch["image"].shape[1:] == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
    assert np.all((batch["label"] >= 0) & (batch["label"] < imagenet_lt.NUM_CLASSES))
    assert np.all(np.isfinite(batch["image"]))
  assert len(train[0]) == 3
  for first, second in zip(*train):  # same seed and epoch: the same batches
    np.testing.assert_array_equal(first["image"], second["image"])
    np.testing.assert_array_equal(first["label"], second["label"])


def test_importing_the_package_does_not_import_tensorflow():
  code = ("import sys, dnet_jax, dnet_jax.data, dnet_jax.data.split_lists, "
          "dnet_jax.data.imagenet_lt, dnet_jax.distributed, dnet_jax.models.pretrained; "
          "bad = [m for m in ('tensorflow', 'tensorflow_datasets') if m in sys.modules]; "
          "assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120,
                 env=dict(os.environ, JAX_PLATFORMS="cpu"))
