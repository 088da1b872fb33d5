"""Tests of dnet_jax.data: long-tailed splits, sources, safe pickles, batching.

Truth is computed independently in the tests (LDAM-DRW's formula and its
global-numpy-RNG draw, per-class file-order slices, explicit pixel loops).
"""

import hashlib
import itertools
import os
import pickle
import struct
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from dnet_jax import data as dd
from dnet_jax.data import sources

# ------------------------------------------------------------------ helpers


def ldam_counts(num_classes, n_max, rho):
  """LDAM-DRW's get_img_num_per_cls, written as in its code."""
  imb = 1.0 / rho
  return [int(n_max * imb ** (c / (num_classes - 1.0)))
          for c in range(num_classes)]


def encode_index(idx):
  """2x2x3 uint8 images whose pixels spell the index (base 256)."""
  idx = np.asarray(idx)
  digits = np.stack([idx // 65536, (idx // 256) % 256, idx % 256], axis=-1)
  return np.broadcast_to(digits[:, None, None, :],
                         (len(idx), 2, 2, 3)).astype(np.uint8)


def decode_index(images):
  x = images[:, 0, 0, :].astype(np.int64)
  return x[:, 0] * 65536 + x[:, 1] * 256 + x[:, 2]


def row_hashes(images):
  return [hashlib.sha1(row.tobytes()).hexdigest() for row in images]


@pytest.fixture(scope="module")
def fake_cifar100():
  """CIFAR-100-shaped train split: 500 per class in shuffled file order."""
  rng = np.random.default_rng(123)
  y_train = rng.permutation(np.repeat(np.arange(100), 500))
  x_train = encode_index(np.arange(len(y_train)))
  y_test = np.repeat(np.arange(100), 100)
  x_test = encode_index(100_000 + np.arange(len(y_test)))
  return x_train, y_train, x_test, y_test


def build(fake, **kwargs):
  x_train, y_train, x_test, y_test = fake
  args = dict(num_classes=100, imbalance_factor=100, meta_per_class=25,
              protocol="public", seed=0, name="fake-cifar100")
  args.update(kwargs)
  return dd.build_long_tailed(x_train, y_train, x_test, y_test, **args)


# ------------------------------------------------------------------- counts


@pytest.mark.parametrize("rho", [10, 50, 100, 200])
def test_counts_match_independent_formula(rho):
  got = dd.long_tailed_counts(100, 475, rho)
  assert got.tolist() == ldam_counts(100, 475, rho)
  assert got[0] == 475
  assert np.all(np.diff(got) <= 0)


def test_counts_published_totals():
  public = dd.long_tailed_counts(100, 475, 100)
  assert public.sum() == 10_302
  assert public.min() == 4
  assert dd.long_tailed_counts(100, 500, 100).sum() == 10_847
  assert dd.long_tailed_counts(10, 7, 1).tolist() == [7] * 10


@pytest.mark.parametrize("args, match", [
    ((100, 475, 0.5), "imbalance_factor must be >= 1"),
    ((1, 475, 10), "num_classes must be an integer >= 2"),
    ((10, 0, 10), "n_max .* must be an integer >= 1"),
])
def test_counts_reject_bad_arguments(args, match):
  with pytest.raises(ValueError, match=match):
    dd.long_tailed_counts(*args)


# ------------------------------------------------------------- split / LT


def test_split_meta_hand_example():
  labels = np.array([0, 1, 0, 0, 1, 1, 1])
  split = dd.split_meta(labels, 1)
  assert split.meta.tolist() == [3, 6]
  assert split.remaining.tolist() == [0, 1, 2, 4, 5]
  split2 = dd.split_meta(labels, 2)
  assert split2.meta.tolist() == [2, 3, 5, 6]


def test_split_meta_rejects_small_class():
  labels = np.array([0] * 5 + [1] * 3)
  with pytest.raises(ValueError, match="class 1 has 3 images but needs at "
                     "least meta_per_class \\+ 1 = 4"):
    dd.split_meta(labels, 3)


def test_make_long_tailed_public_and_ldam_hand_example():
  labels = np.array([1, 0, 0, 1, 0, 1, 0])
  assert dd.make_long_tailed(labels, [3, 1], "public", 0).tolist() == [
      0, 1, 2, 4]
  with pytest.raises(ValueError, match="class 1 should keep 4 images but "
                     "only 3 are available"):
    dd.make_long_tailed(labels, [1, 4], "public", 0)
  with pytest.raises(ValueError, match="unknown protocol"):
    dd.make_long_tailed(labels, [1, 1], "random", 0)


def test_public_protocol_on_fake_cifar100(fake_cifar100):
  x_train, y_train, _, _ = fake_cifar100
  data = build(fake_cifar100)
  members = [np.flatnonzero(y_train == c) for c in range(100)]
  expected_counts = ldam_counts(100, 475, 100)

  # Meta: the last 25 of each class in file order, balanced.
  meta_idx = decode_index(data.x_meta)
  assert sorted(meta_idx.tolist()) == sorted(
      np.concatenate([m[-25:] for m in members]).tolist())
  np.testing.assert_array_equal(y_train[meta_idx], data.y_meta)
  assert np.bincount(data.y_meta).tolist() == [25] * 100

  # Train: the first n_c of each class in file order; disjoint from meta.
  train_idx = decode_index(data.x_train)
  np.testing.assert_array_equal(y_train[train_idx], data.y_train)
  assert sorted(train_idx.tolist()) == sorted(np.concatenate(
      [m[:n] for m, n in zip(members, expected_counts)]).tolist())
  assert not set(train_idx.tolist()) & set(meta_idx.tolist())
  assert data.class_counts.tolist() == expected_counts
  assert len(data.y_train) == 10_302

  # Test: untouched and balanced; dtypes.
  assert np.bincount(data.y_test).tolist() == [100] * 100
  assert decode_index(data.x_test).tolist() == list(
      range(100_000, 110_000))
  assert data.x_train.dtype == np.uint8 and data.x_train.shape[1:] == (2, 2, 3)
  assert data.y_train.dtype == np.int32 and data.num_classes == 100


def test_public_protocol_ignores_seed_and_is_deterministic(fake_cifar100):
  a = build(fake_cifar100, seed=0)
  b = build(fake_cifar100, seed=7)
  np.testing.assert_array_equal(a.x_train, b.x_train)
  np.testing.assert_array_equal(a.x_meta, b.x_meta)


def test_ldam_protocol_on_fake_cifar100(fake_cifar100):
  _, y_train, _, _ = fake_cifar100
  data = build(fake_cifar100, protocol="ldam", seed=3)
  again = build(fake_cifar100, protocol="ldam", seed=3)
  other = build(fake_cifar100, protocol="ldam", seed=4)
  np.testing.assert_array_equal(data.x_train, again.x_train)
  assert not np.array_equal(decode_index(data.x_train),
                            decode_index(other.x_train))

  # n_max = 500 counts, head classes capped at their 475 pool images.
  expected = np.minimum(ldam_counts(100, 500, 100), 475)
  assert data.class_counts.tolist() == expected.tolist()
  assert data.class_counts.sum() == 10_847 - 25 - 2

  # Same meta set as the public protocol; train never touches it.
  public = build(fake_cifar100)
  np.testing.assert_array_equal(data.x_meta, public.x_meta)
  train_idx = set(decode_index(data.x_train).tolist())
  assert not train_idx & set(decode_index(data.x_meta).tolist())

  # The draw is LDAM-DRW's: np.random.seed(seed), np.random.shuffle per class
  # of the pool (file order after meta removal).
  pool = np.setdiff1d(np.arange(len(y_train)), decode_index(data.x_meta))
  state = np.random.get_state()
  try:
    np.random.seed(3)
    chosen = []
    for c in range(100):
      idx = np.where(y_train[pool] == c)[0]
      np.random.shuffle(idx)
      chosen.extend(pool[idx[:expected[c]]].tolist())
  finally:
    np.random.set_state(state)
  assert train_idx == set(chosen)


def test_build_uses_given_meta_set(fake_cifar100):
  x_train, y_train, x_test, y_test = fake_cifar100
  x_meta, y_meta = x_test[::10], y_test[::10]
  data = dd.build_long_tailed(
      x_train, y_train, x_test, y_test, num_classes=100, imbalance_factor=10,
      meta_per_class=25, protocol="public", seed=0, name="m",
      x_meta=x_meta, y_meta=y_meta)
  np.testing.assert_array_equal(data.x_meta, x_meta)
  # n_max is the largest class of the full split (nothing held out): 500.
  assert data.class_counts.tolist() == ldam_counts(100, 500, 10)


def test_build_rejects_bad_inputs(fake_cifar100):
  x_train, y_train, x_test, y_test = fake_cifar100
  bad = y_train.copy()
  bad[[5, 9]] = 100
  with pytest.raises(ValueError, match=r"2 label\(s\) outside \[0, 100\): "
                     r"100 \(x2\)"):
    build((x_train, bad, x_test, y_test))
  with pytest.raises(ValueError, match="x_train has 50000 images but y_train "
                     "has 49999 labels"):
    build((x_train, y_train[:-1], x_test, y_test))
  with pytest.raises(ValueError, match="imbalance_factor must be >= 1"):
    build(fake_cifar100, imbalance_factor=0.9)
  with pytest.raises(ValueError, match=r"meta set has no examples of "
                     r"class\(es\) 0, 1, 2"):
    build(fake_cifar100, meta_per_class=0)
  keep = y_test != 3
  with pytest.raises(ValueError, match=r"meta set has no examples of "
                     r"class\(es\) 3;"):
    build(fake_cifar100, x_meta=x_test[keep], y_meta=y_test[keep])
  keep = y_train != 42
  with pytest.raises(ValueError, match=r"train set has no examples of "
                     r"class\(es\) 42"):
    build((x_train[keep], y_train[keep], x_test, y_test))
  with pytest.raises(ValueError, match="class 0 should keep 480 images but "
                     "only 475"):
    build(fake_cifar100, n_max=480)
  with pytest.raises(ValueError, match="must be a uint8 NHWC array"):
    build((x_train.astype(np.float32), y_train, x_test, y_test))
  with pytest.raises(ValueError, match="would keep 0 train images"):
    build(fake_cifar100, n_max=3, imbalance_factor=10)


def test_shot_groups():
  counts = np.array([150, 101, 100, 20, 19, 5])
  groups = dd.shot_groups(counts)
  assert groups["many"].tolist() == [1, 1, 0, 0, 0, 0]
  assert groups["medium"].tolist() == [0, 0, 1, 1, 0, 0]
  assert groups["few"].tolist() == [0, 0, 0, 0, 1, 1]
  small = dd.shot_groups(counts, many_threshold=19, few_threshold=6)
  assert small["few"].tolist() == [0, 0, 0, 0, 0, 1]
  assert small["medium"].tolist() == [0, 0, 0, 0, 1, 0]
  with pytest.raises(ValueError, match="few_threshold"):
    dd.shot_groups(counts, many_threshold=10, few_threshold=20)


def test_long_tailed_data_shot_groups_method(fake_cifar100):
  data = build(fake_cifar100)
  groups = data.shot_groups()
  total = sum(g.astype(int) for g in groups.values())
  assert (total == 1).all()
  np.testing.assert_array_equal(groups["few"], data.class_counts < 20)
  assert "fake-cifar100" in data.summary()


# ------------------------------------------------------------------ digits


def digits_config(**overrides):
  kwargs = dict(source="digits", name="digits", data_dir="", imbalance_factor=10.0,
                protocol="public", meta_per_class=10, n_max=0, seed=0,
                digits_test_per_class=50)
  kwargs.update(overrides)
  return kwargs


def test_digits_source():
  from sklearn.datasets import load_digits
  raw = load_digits()
  data = dd.load_long_tailed(**digits_config())
  assert data.num_classes == 10
  for x in (data.x_train, data.x_meta, data.x_test):
    assert x.dtype == np.uint8 and x.shape[1:] == (8, 8, 1)
  assert data.x_train.max() == 255
  assert np.bincount(data.y_meta).tolist() == [10] * 10
  assert np.bincount(data.y_test).tolist() == [50] * 10

  # Every image is an original digit, converted as round(x * 255 / 16), with
  # its own label; train / meta / test are disjoint.
  converted = np.round(raw.images * 255 / 16).astype(np.uint8)[..., None]
  label_of = dict(zip(row_hashes(converted), raw.target.tolist()))
  splits = [(data.x_train, data.y_train), (data.x_meta, data.y_meta),
            (data.x_test, data.y_test)]
  seen = []
  for x, y in splits:
    hashes = row_hashes(x)
    assert [label_of[h] for h in hashes] == y.tolist()
    seen.append(set(hashes))
  assert not seen[0] & seen[1] and not seen[0] & seen[2]
  assert not seen[1] & seen[2]

  # n_max = smallest class pool = smallest class - 50 test - 10 meta.
  n_max = np.bincount(raw.target).min() - 60
  assert data.class_counts.tolist() == ldam_counts(10, n_max, 10)


def test_digits_deterministic_and_seeded():
  a = dd.load_long_tailed(**digits_config(seed=1))
  b = dd.load_long_tailed(**digits_config(seed=1))
  c = dd.load_long_tailed(**digits_config(seed=2))
  np.testing.assert_array_equal(a.x_train, b.x_train)
  np.testing.assert_array_equal(a.x_test, b.x_test)
  assert not np.array_equal(a.x_test, c.x_test)
  ldam = dd.load_long_tailed(**digits_config(protocol="ldam", seed=1))
  np.testing.assert_array_equal(ldam.class_counts, a.class_counts)
  np.testing.assert_array_equal(ldam.x_meta, a.x_meta)


def test_digits_does_not_import_tensorflow():
  code = ("import sys, ml_collections\n"
          "from dnet_jax.data import load_long_tailed\n"
          "print(load_long_tailed('digits', imbalance_factor=10.0).summary())\n"
          "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n"
          "assert 'tensorflow_datasets' not in sys.modules\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "digits: 10 classes" in result.stdout


def test_config_errors():
  with pytest.raises(ValueError, match="unknown data source 'mnist'"):
    dd.load_long_tailed(**digits_config(source="mnist"))
  with pytest.raises(ValueError, match="needs 'imbalance_factor'"):
    dd.load_long_tailed("digits", imbalance_factor=None)
  with pytest.raises(ValueError, match="digits class .* fewer than"):
    dd.load_long_tailed(**digits_config(digits_test_per_class=170))


# -------------------------------------------------------------------- TFDS


def test_tfds_source_with_mock_data(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  n = 600
  cfg = ml_collections.ConfigDict(dict(
      source="tfds", name="cifar10", data_dir=str(tmp_path),
      imbalance_factor=5.0, protocol="public", meta_per_class=5, n_max=0,
      seed=0))
  with tfds.testing.mock_data(num_examples=n):
    data = dd.load_long_tailed(**cfg.to_dict())
    # The mock's examples, read independently in the same (file) order.
    reference = list(tfds.as_numpy(tfds.load(
        "cifar10", split="train", data_dir=str(tmp_path), download=False,
        as_supervised=True, shuffle_files=False)))
  x_ref = np.stack([x for x, _ in reference])
  y_ref = np.array([y for _, y in reference])
  assert data.num_classes == 10
  assert data.x_train.shape[1:] == (32, 32, 3)
  assert data.x_train.dtype == np.uint8
  assert data.x_test.shape == (n, 32, 32, 3)
  assert np.bincount(data.y_meta, minlength=10).tolist() == [5] * 10

  index_of = {h: i for i, h in enumerate(row_hashes(x_ref))}
  meta_idx = sorted(index_of[h] for h in row_hashes(data.x_meta))
  expected_meta = sorted(itertools.chain.from_iterable(
      np.flatnonzero(y_ref == c)[-5:].tolist() for c in range(10)))
  assert meta_idx == expected_meta
  pool_sizes = np.bincount(y_ref, minlength=10) - 5
  expected = ldam_counts(10, pool_sizes.min(), 5)
  assert data.class_counts.tolist() == expected
  train_idx = sorted(index_of[h] for h in row_hashes(data.x_train))
  assert train_idx == sorted(itertools.chain.from_iterable(
      np.flatnonzero(y_ref == c)[:expected[c]].tolist() for c in range(10)))


def test_tfds_source_errors(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  missing = tmp_path / "nowhere"
  with pytest.raises(FileNotFoundError, match="does not exist.*tfds build "
                     "cifar100 --data_dir="):
    dd.load_tfds_source("cifar100", missing)
  with pytest.raises(FileNotFoundError, match="is not prepared in"):
    dd.load_tfds_source("cifar100", tmp_path)
  with pytest.raises(ValueError, match="needs data_dir"):
    dd.load_tfds_source("cifar100", "")


def test_tfds_original_order_from_ids():
  ids = np.array([b"train_00002", b"train_00000", b"train_00001"],
                 dtype=object)
  assert sources._original_order(ids).tolist() == [1, 2, 0]
  assert sources._original_order(np.array([b"ab cd", b"x"])) is None
  assert sources._original_order(np.array([b"t_1", b"t_5"])) is None


# ----------------------------------------------------------- CIFAR pickles


def _py2_str(b):
  if len(b) < 256:
    return b"U" + bytes([len(b)]) + b  # SHORT_BINSTRING
  return b"T" + struct.pack("<I", len(b)) + b  # BINSTRING


def _py2_int(v):
  return b"J" + struct.pack("<i", v)  # BININT


def _py2_uint8_array(a):
  """The opcodes Python 2 cPickle writes for a numpy uint8 array."""
  out = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
         b"K\x00\x85" + _py2_str(b"b") + b"\x87R")
  out += b"(K\x01(" + b"".join(_py2_int(d) for d in a.shape) + b"t"
  out += (b"cnumpy\ndtype\n" + _py2_str(b"u1") + b"K\x00K\x01\x87R(K\x03" +
          _py2_str(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
  out += b"\x89" + _py2_str(a.tobytes()) + b"tb"
  return out


def py2_pickle(d):
  """A protocol-2 pickle of a CIFAR batch dict, as Python 2 wrote them."""
  out = b"\x80\x02}("
  for key, value in d.items():
    out += _py2_str(key)
    if isinstance(value, np.ndarray):
      out += _py2_uint8_array(value)
    elif isinstance(value, list):
      out += b"](" + b"".join(_py2_int(v) for v in value) + b"e"
    else:
      out += _py2_str(value)
  return out + b"u."


def write_cifar(root, name, n_train_per_batch, n_test, seed=0):
  """Writes a fake CIFAR python directory; returns (x, y) per split (CHW)."""
  rng = np.random.default_rng(seed)
  num_classes = 10 if name == "cifar10" else 100
  if name == "cifar10":
    folder = root / "cifar-10-batches-py"
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    test_files = ["test_batch"]
    label_key = b"labels"
  else:
    folder = root / "cifar-100-python"
    train_files, test_files, label_key = ["train"], ["test"], b"fine_labels"
  folder.mkdir(parents=True)
  out = {}
  for split, files, n in (("train", train_files, n_train_per_batch),
                          ("test", test_files, n_test)):
    xs, ys = [], []
    for f in files:
      data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
      labels = (np.arange(n) % num_classes).tolist()
      rng.shuffle(labels)
      batch = {b"batch_label": f.encode(), label_key: labels, b"data": data,
               b"filenames": b"unused"}
      if name == "cifar100":
        batch[b"coarse_labels"] = [l // 5 for l in labels]
      (folder / f).write_bytes(py2_pickle(batch))
      xs.append(data)
      ys.extend(labels)
    out[split] = (np.concatenate(xs), np.array(ys))
  return folder, out


def test_cifar10_pickle_source_pixels_exact(tmp_path):
  folder, raw = write_cifar(tmp_path, "cifar10", 12, 20)
  for data_dir in (tmp_path, folder):  # parent or the directory itself
    src = dd.load_source("cifar_pickle", name="cifar10", data_dir=data_dir)
    assert src.num_classes == 10
    assert src.x_train.shape == (60, 32, 32, 3)
    assert src.x_test.shape == (20, 32, 32, 3)
    np.testing.assert_array_equal(src.y_train, raw["train"][1])
    flat = raw["train"][0]
    for n in (0, 13, 59):
      for h, w in ((0, 0), (5, 31), (31, 7)):
        for ch in range(3):
          assert src.x_train[n, h, w, ch] == flat[n, ch * 1024 + h * 32 + w]


def test_cifar100_pickle_long_tailed(tmp_path):
  folder, raw = write_cifar(tmp_path, "cifar100", 600, 200)
  cfg = ml_collections.ConfigDict(dict(
      source="cifar_pickle", name="cifar100", data_dir=str(tmp_path),
      imbalance_factor=2.0, protocol="public", meta_per_class=1, n_max=0,
      seed=0))
  data = dd.load_long_tailed(**cfg.to_dict())
  assert data.num_classes == 100
  assert np.bincount(data.y_meta).tolist() == [1] * 100
  assert data.class_counts.tolist() == ldam_counts(100, 5, 2)
  x_chw = raw["test"][0].reshape(-1, 3, 32, 32)
  np.testing.assert_array_equal(data.x_test[7, 3, 4], x_chw[7, :, 3, 4])


def test_cifar_pickle_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="expected data_batch_1 in"):
    dd.load_source("cifar_pickle", name="cifar10", data_dir=tmp_path)
  with pytest.raises(ValueError, match="supports name in"):
    dd.load_source("cifar_pickle", name="svhn", data_dir=tmp_path)
  folder, _ = write_cifar(tmp_path, "cifar10", 12, 20)
  (folder / "data_batch_3").write_bytes(py2_pickle({b"labels": [1, 2]}))
  with pytest.raises(ValueError, match="expected a dict with keys b'data'"):
    dd.load_source("cifar_pickle", name="cifar10", data_dir=tmp_path)
  (folder / "data_batch_3").write_bytes(py2_pickle(
      {b"labels": [1, 12], b"data": np.zeros((2, 3072), np.uint8)}))
  with pytest.raises(ValueError, match=r"data_batch_3': 1 label\(s\) in b'labels' outside "
                                       r"\[0, 10\): 12; the file is damaged"):
    dd.load_source("cifar_pickle", name="cifar10", data_dir=tmp_path)
  os.remove(folder / "test_batch")
  (folder / "data_batch_3").write_bytes(b"not a pickle")
  with pytest.raises(ValueError, match="not a readable CIFAR pickle"):
    dd.load_source("cifar_pickle", name="cifar10", data_dir=tmp_path)


# -------------------------------------------------------------- safe pickle


class _Exploit:

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


def test_safe_pickle_refuses_code_execution(tmp_path):
  marker = tmp_path / "pwned"
  payload = pickle.dumps({b"data": _Exploit(f"echo pwned > {marker}")})
  path = tmp_path / "data_batch_1"
  path.write_bytes(payload)
  with pytest.raises(pickle.UnpicklingError,
                     match=r"refused .* references (posix|os|nt)\.system"):
    dd.safe_load(path)
  assert not marker.exists()
  # Also through the CIFAR loader.
  folder = tmp_path / "cifar-10-batches-py"
  folder.mkdir()
  (folder / "data_batch_1").write_bytes(payload)
  with pytest.raises(pickle.UnpicklingError, match="refused"):
    dd.load_source("cifar_pickle", name="cifar10", data_dir=tmp_path)
  assert not marker.exists()
  with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
    dd.safe_loads(pickle.dumps(eval))


def test_safe_pickle_loads_cifar_batches(tmp_path):
  data = np.arange(4 * 3072, dtype=np.int64).astype(np.uint8).reshape(4, 3072)
  batch = {b"batch_label": b"training batch 1 of 5", b"labels": [3, 1, 4, 1],
           b"data": data}
  path = tmp_path / "batch"
  path.write_bytes(py2_pickle(batch))
  with open(path, "rb") as f:  # file object
    loaded = dd.safe_load(f)
  np.testing.assert_array_equal(loaded[b"data"], data)
  assert loaded[b"labels"] == [3, 1, 4, 1]
  assert loaded[b"batch_label"] == b"training batch 1 of 5"
  for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):  # re-pickled copies
    again = dd.safe_loads(pickle.dumps(batch, protocol=protocol))
    np.testing.assert_array_equal(again[b"data"], data)


# --------------------------------------------------------------------- npz


def test_npz_source(tmp_path):
  rng = np.random.default_rng(0)
  x_train = rng.random((60, 5, 5)).astype(np.float32)  # NHW floats in [0,1]
  y_train = np.arange(60) % 3
  x_test = rng.integers(0, 256, (9, 5, 5, 1), dtype=np.uint8)  # the channels of x_train
  path = tmp_path / "mine.npz"
  np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test,
           y_test=np.arange(9) % 3)
  cfg = ml_collections.ConfigDict(dict(
      source="npz", name="mine", data_dir=str(path), imbalance_factor=4.0,
      protocol="public", meta_per_class=2, n_max=0, seed=0))
  data = dd.load_long_tailed(**cfg.to_dict())
  assert data.num_classes == 3 and data.name == "mine"
  assert data.x_train.shape[1:] == (5, 5, 1) and data.x_train.dtype == np.uint8
  assert data.class_counts.tolist() == ldam_counts(3, 18, 4)
  # Class 0's first train image is x_train[0] as round(x * 255).
  np.testing.assert_array_equal(
      data.x_train[0, ..., 0], np.round(x_train[0] * 255).astype(np.uint8))
  np.testing.assert_array_equal(data.x_test, x_test)
  # A directory holding <name>.npz works too.
  cfg.data_dir = str(tmp_path)
  assert dd.load_long_tailed(**cfg.to_dict()).class_counts.tolist() == ldam_counts(3, 18, 4)

  # Given meta arrays are used as they are.
  np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test,
           y_test=np.arange(9) % 3, x_meta=x_test[:6], y_meta=np.arange(6) % 3)
  cfg.data_dir = str(path)
  data = dd.load_long_tailed(**cfg.to_dict())
  np.testing.assert_array_equal(data.x_meta, x_test[:6])
  assert data.class_counts.tolist() == ldam_counts(3, 20, 4)


def test_npz_errors(tmp_path):
  cfg = ml_collections.ConfigDict(dict(
      source="npz", name="mine", data_dir=str(tmp_path / "none.npz"),
      imbalance_factor=4.0, protocol="public", meta_per_class=1, n_max=0,
      seed=0))
  with pytest.raises(FileNotFoundError, match="none.npz' not found; expected "
                     "a .npz with arrays x_train"):
    dd.load_long_tailed(**cfg.to_dict())

  path = tmp_path / "bad.npz"
  cfg.data_dir = str(path)
  x = np.zeros((6, 4, 4, 1), np.uint8)
  y = np.arange(6) % 2
  np.savez(path, x_train=x, y_train=y, x_test=x)
  with pytest.raises(ValueError, match=r"lacks array\(s\) y_test; expected "
                     "x_train, y_train, x_test, y_test"):
    dd.load_long_tailed(**cfg.to_dict())

  np.savez(path, x_train=x.astype(np.float32) + 255, y_train=y, x_test=x,
           y_test=y)
  with pytest.raises(ValueError, match=r"floats in \[255.0, 255.0\], but "
                     r"float images must lie in \[0, 1\]"):
    dd.load_long_tailed(**cfg.to_dict())

  np.savez(path, x_train=x.astype(np.int32) - 1, y_train=y, x_test=x,
           y_test=y)
  with pytest.raises(ValueError, match=r"range \[-1, -1\]; expected uint8"):
    dd.load_long_tailed(**cfg.to_dict())

  np.savez(path, x_train=x, y_train=y - 1, x_test=x, y_test=y)
  with pytest.raises(ValueError, match=r"label\(s\) outside \[0, 2\): -1"):
    dd.load_long_tailed(**cfg.to_dict())

  np.savez(path, x_train=x, y_train=y, x_test=x, y_test=y,
           x_meta=x[:1], y_meta=y[:1])
  with pytest.raises(ValueError, match=r"meta set has no examples of "
                     r"class\(es\) 1"):
    dd.load_long_tailed(**cfg.to_dict())

  path.write_bytes(b"garbage")
  with pytest.raises(ValueError, match="is not a .npz file: it is not a zip archive"):
    dd.load_long_tailed(**cfg.to_dict())


# ---------------------------------------------------------------- batching


def test_epoch_batches_deterministic_and_complete():
  perm = dd.epoch_permutation(5, 3, 103)
  assert sorted(perm.tolist()) == list(range(103))
  np.testing.assert_array_equal(perm, dd.epoch_permutation(5, 3, 103))
  assert not np.array_equal(perm, dd.epoch_permutation(5, 4, 103))
  assert not np.array_equal(perm, dd.epoch_permutation(6, 3, 103))

  batches = list(dd.epoch_batches(103, 10, seed=5, epoch=3))
  assert len(batches) == 10 == dd.num_batches(103, 10)
  assert all(b.shape == (10,) for b in batches)
  np.testing.assert_array_equal(np.concatenate(batches), perm[:100])
  full = list(dd.epoch_batches(103, 10, seed=5, epoch=3, drop_remainder=False))
  assert len(full) == 11 and full[-1].tolist() == perm[100:].tolist()
  with pytest.raises(ValueError, match="exceeds the 5 examples"):
    list(dd.epoch_batches(5, 10, seed=0, epoch=0))


def test_meta_batches_resumable():
  first = dd.meta_batch_indices(1, 17, 100, 32)
  assert len(set(first.tolist())) == 32
  assert first.min() >= 0 and first.max() < 100
  np.testing.assert_array_equal(first, dd.meta_batch_indices(1, 17, 100, 32))
  assert not np.array_equal(first, dd.meta_batch_indices(1, 18, 100, 32))
  stream = list(itertools.islice(dd.meta_batches(1, 100, 32, start_step=17), 3))
  for i, b in enumerate(stream):
    np.testing.assert_array_equal(b, dd.meta_batch_indices(1, 17 + i, 100, 32))
  # The whole meta set when the batch is as large as it.
  assert sorted(dd.meta_batch_indices(0, 0, 8, 8).tolist()) == list(range(8))
  with pytest.raises(ValueError, match="exceeds the meta set"):
    dd.meta_batch_indices(0, 0, 8, 9)


def test_padded_batches():
  x = np.arange(10 * 2).reshape(10, 2).astype(np.float32)
  y = np.arange(10)
  batches = list(dd.padded_batches(x, y, 4))
  assert len(batches) == 3
  assert all(xb.shape == (4, 2) and yb.shape == (4,) and m.shape == (4,)
             for xb, yb, m in batches)
  assert batches[-1][2].tolist() == [1, 1, 0, 0]
  assert batches[0][2].tolist() == [1, 1, 1, 1]
  real_x = np.concatenate([xb[m > 0] for xb, _, m in batches])
  real_y = np.concatenate([yb[m > 0] for _, yb, m in batches])
  np.testing.assert_array_equal(real_x, x)
  np.testing.assert_array_equal(real_y, y)
  assert sum(m.sum() for _, _, m in batches) == 10


def test_class_balanced_indices():
  labels = np.array([0] * 1000 + [1] * 10 + [2] * 1)
  idx = dd.class_balanced_indices(labels, 30_000, seed=0)
  np.testing.assert_array_equal(idx, dd.class_balanced_indices(
      labels, 30_000, seed=0))
  assert idx.min() >= 0 and idx.max() < len(labels)
  freq = np.bincount(labels[idx], minlength=3) / len(idx)
  np.testing.assert_allclose(freq, [1 / 3] * 3, atol=0.02)
  # Within class 1 every example is drawn.
  assert set(idx[labels[idx] == 1].tolist()) == set(range(1000, 1010))
  assert not np.array_equal(idx, dd.class_balanced_indices(labels, 30_000, 0,
                                                           epoch=1))
