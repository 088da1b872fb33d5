"""dnet_jax.data.class_aware: the public class-aware sampler's structure and stream."""

import numpy as np
import pytest

from dnet_jax.data import class_aware as ca
from dnet_jax.data import long_tail


def small_labels():
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(3), [5, 3, 2])
  return labels[rng.permutation(len(labels))]  # classes interleaved in file order


def stream_reference(labels, seed, epochs, k=4):
  """Walks the public generator (S:31-49) sample by sample from epoch 0.

  Iterators cycle through the seeded permutations the module docstring names;
  each epoch yields max n_c x C samples in groups of k drawn from one class.
  """
  num_classes = labels.max() + 1
  members = [np.flatnonzero(labels == c) for c in range(num_classes)]

  def cycle(size, key):
    j = 0
    while True:
      yield from np.random.default_rng(key + [j]).permutation(size)
      j += 1

  class_iter = cycle(num_classes, [seed, 4])
  item_iters = [cycle(len(m), [seed, 5, c]) for c, m in enumerate(members)]
  n = max(len(m) for m in members) * num_classes
  out = []
  for _ in range(epochs):
    epoch = []
    while len(epoch) < n:
      c = next(class_iter)
      group = [members[c][next(item_iters[c])] for _ in range(k)]  # all k consumed
      epoch += group[:n - len(epoch)]
    out.append(np.array(epoch))
  return out


def test_epochs_equal_the_continued_stream():
  labels = small_labels()  # n = 5 x 3 = 15: the last group of 4 is cut to 3
  reference = stream_reference(labels, seed=7, epochs=5)
  for epoch in range(5):
    np.testing.assert_array_equal(ca.class_aware_epoch(labels, 7, epoch), reference[epoch])


def test_groups_of_four_and_epoch_length():
  labels = small_labels()
  order = ca.class_aware_epoch(labels, 0, 2)
  assert len(order) == ca.class_aware_epoch_length(labels) == 15
  groups = labels[order][:12].reshape(-1, 4)
  assert (groups == groups[:, :1]).all()


def test_cycles_cover_classes_and_images():
  """Across epochs: every C class draws are a permutation; each class's images cycle."""
  labels = np.repeat(np.arange(4), [9, 5, 3, 1])
  orders = [ca.class_aware_epoch(labels, 3, e) for e in range(6)]  # 36 samples = 9 groups
  stream = np.concatenate(orders)
  group_classes = labels[stream].reshape(-1, 4)[:, 0]
  for j in range(len(group_classes) // 4):
    assert sorted(group_classes[4 * j:4 * j + 4]) == [0, 1, 2, 3]
  for c in range(4):
    mine = stream[labels[stream] == c]
    size = (labels == c).sum()
    for j in range(len(mine) // size):
      assert sorted(mine[j * size:(j + 1) * size]) == sorted(np.flatnonzero(labels == c))


def test_cifar100_rho100_epoch():
  counts = long_tail.long_tailed_counts(100, 475, 100)
  labels = np.repeat(np.arange(100), counts)
  order = ca.class_aware_epoch(labels, 0, 1)
  assert len(order) == max(counts) * 100 == 47_500
  groups = labels[order].reshape(-1, 4)
  assert (groups == groups[:, :1]).all()
  batches = list(ca.class_aware_batches(labels, 128, seed=0, epoch=1))
  assert len(batches) == 372 and len(batches[-1]) == 47_500 - 371 * 128
  np.testing.assert_array_equal(np.concatenate(batches), order)
  assert len(list(ca.class_aware_batches(labels, 128, seed=0, epoch=1,
                                         drop_remainder=True))) == 371


def test_deterministic_and_seed_dependent():
  labels = small_labels()
  np.testing.assert_array_equal(ca.class_aware_epoch(labels, 1, 3),
                                ca.class_aware_epoch(labels, 1, 3))
  assert not np.array_equal(ca.class_aware_epoch(labels, 1, 3), ca.class_aware_epoch(labels, 2, 3))


def test_bad_labels():
  with pytest.raises(ValueError, match="at least one image"):
    ca.class_aware_epoch(np.array([0, 0, 2]), 0, 0)
  with pytest.raises(ValueError, match="1-D integer"):
    ca.class_aware_epoch(np.array([0.0, 1.0]), 0, 0)
  with pytest.raises(ValueError, match="out of range"):
    ca.class_aware_epoch(np.array([0, 1, 2]), 0, 0, num_classes=2)


# ---------------------------------------------------------------------------- through the Dataset


def _in_memory(counts, batch_size):
  from dnet_jax.data import long_tail
  from experiments import datasets

  labels = np.repeat(np.arange(len(counts)), counts).astype(np.int32)
  # Image i carries its index, so a batch says which rows it read.
  images = np.zeros((len(labels), 2, 2, 1), np.uint8) + np.arange(len(labels))[:, None, None, None]
  data = long_tail.LongTailedData(images, labels, images[:3], labels[:3], images[:3], labels[:3],
                                  len(counts), np.asarray(counts), "toy")
  return datasets.InMemoryDataset(data, batch_size=batch_size, meta_batch_size=0,
                                  eval_batch_size=4, seed=3, preprocessors=None), labels


@pytest.mark.parametrize("iterations", [0, 5])
def test_in_memory_class_aware_batches_are_4_per_class_and_an_epoch_is_max_count_x_classes(
    iterations):
  from experiments import sampling

  counts, batch = [13, 7, 3, 1], 8  # max n_c x C = 52 samples: 6 full batches of 8
  data, labels = _in_memory(counts, batch)
  sampler = sampling.Sampler("class_aware", 4, iterations)
  per_epoch = iterations or 52 // 8
  assert data.steps_for(sampler) == per_epoch
  items = list(data.train_batches(0, 2 * per_epoch, with_meta=False, sampler=sampler))
  rows = np.concatenate([b["image"][:, 0, 0, 0] for _, b, _ in items]).astype(np.int64)
  np.testing.assert_array_equal(np.concatenate([b["label"] for _, b, _ in items]), labels[rows])
  groups = labels[rows].reshape(-1, 4)
  assert (groups == groups[:, :1]).all()  # 4 consecutive images of one class
  # Classes come in cycles: each run of C groups holds every class once.
  for cycle in groups[:, 0][:len(groups) // 4 * 4].reshape(-1, 4):
    assert sorted(cycle) == [0, 1, 2, 3]
  # A resumed read gives the same batches (a pure function of seed, epoch, index).
  again = list(data.train_batches(per_epoch + 1, per_epoch + 2, with_meta=False, sampler=sampler))
  np.testing.assert_array_equal(again[0][1]["image"], items[per_epoch + 1][1]["image"])
