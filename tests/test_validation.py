"""Every invalid input is a clear InvalidInputError before anything is compiled.

Each test patches `jax.jit` and `jax.pmap` to fail, so an error that fires
only after compilation would show up as an AssertionError instead of the
expected message. Small data sets are written as .npz files (the format for
a user's own data).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import errors
from experiments import trainer
from experiments import datasets
from experiments import validation
from experiments.configs import digits_lt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def no_compiling(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError("compiled before validating the input")

  monkeypatch.setattr(jax, "pmap", fail)
  monkeypatch.setattr(jax, "jit", fail)


def config_for(**overrides):
  config = digits_lt.get_config()
  config.method = "ce"
  config.progress_bar = False
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


def expect_invalid(tmp_path, config, match):
  workdir = tmp_path / "run"
  with pytest.raises(errors.InvalidInputError, match=match) as raised:
    trainer.train_and_evaluate(config, str(workdir))
  assert raised.value.exit_code == errors.EXIT_INVALID_INPUT == 2
  assert isinstance(raised.value, ValueError)  # callers catching ValueError still do
  assert not (workdir / "checkpoints").exists()
  return raised.value


def toy_arrays(num_classes=3, per_class=(12, 8, 6), test_per_class=4, shape=(8, 8, 1), seed=0):
  """A tiny image set: {x_train, y_train, x_test, y_test} with uint8 images."""
  rng = np.random.default_rng(seed)
  y_train = np.concatenate([np.full(n, c) for c, n in enumerate(per_class)]).astype(np.int64)
  y_test = np.repeat(np.arange(num_classes), test_per_class).astype(np.int64)
  return {"x_train": rng.integers(0, 256, (len(y_train),) + shape, dtype=np.uint8),
          "y_train": y_train,
          "x_test": rng.integers(0, 256, (len(y_test),) + shape, dtype=np.uint8),
          "y_test": y_test}


def npz_config(tmp_path, arrays, **overrides):
  path = tmp_path / "toy.npz"
  np.savez(path, **arrays)
  defaults = {"data.source": "npz", "data.name": "toy", "data.data_dir": str(path),
              "data.imbalance_factor": 1.0, "data.meta_per_class": 2, "batch_size": 4,
              "eval_batch_size": 4, "meta_batch_size": 2}
  return config_for(**{**defaults, **overrides})


# ---------------------------------------------------------------------------- the config


@pytest.mark.parametrize("key,value,match", [
    ("method", "mixup", r"^Unknown method 'mixup'; choose one of: difficulty_net, "),
    ("meta_grad", "fd", r"^Unknown meta_grad 'fd'; choose one of: nested, "),
    ("model", "vgg16", r"^Unknown model 'vgg16'; choose one of: "),
    ("data.source", "csv", r"^Data set 'digits' \(source 'csv'\): unknown data source 'csv'; use "
                           r"one of \('digits', 'tfds', 'cifar_pickle', 'npz'\)"),
    ("data.imbalance_factor", 0.5, r"^data.imbalance_factor must be >= 1 \(it is n_max / n_min\), "
                                   r"got 0.5; use e.g. 10, 50, 100 or 200"),
    ("checkpoint_every_steps", -1, r"^checkpoint_every_steps must be >= 0 \(0 = only at epoch "
                                   r"ends\), got -1"),
    ("batch_size", 0, r"^batch_size must be >= 1, got 0"),
    # Nonsense values (issue 14, case 8), refused before compiling.
    ("learning_rate", -0.1, r"^learning_rate=-0.1 is out of range: it is the SGD learning rate "
                            r"\(negative would ascend the loss\), so it must be finite and >= 0\. "
                            r"Set e\.g\. --config\.learning_rate=<value> in that range"),
    ("learning_rate", float("nan"), r"^learning_rate=nan is out of range"),
    ("momentum", float("nan"), r"^momentum=nan is out of range: it is the SGD momentum, in "
                               r"\[0, 1\), so it must be finite and >= 0 and < 1"),
    ("momentum", 1.0, r"^momentum=1.0 is out of range"),
    ("dnet.lr", float("nan"), r"^dnet.lr=nan is out of range: it is the Adam learning rate of "
                              r"Difficulty-Net"),
    ("cb_beta", 1.0, r"^cb_beta=1.0 is out of range: it is the class-balanced beta, in \[0, 1\)"),
    ("driver_weight", -0.3, r"^driver_weight=-0.3 is out of range: it is lambda"),
    ("warmup_epochs", -1, r"^warmup_epochs=-1 is out of range: it is the linear warm-up"),
    ("focal_gamma", -1.0, r"^focal_gamma=-1.0 is out of range: it is the focal loss exponent "
                          r"\(0 = cross-entropy\), so it must be finite and >= 0"),
    ("cdb_tau", "nan", r"^cdb_tau='nan' must be 'dynamic' or a finite number >= 0"),
    ("dnet.hidden", (0,), r"^dnet.hidden=\(0,\) must be a tuple of positive layer widths, e\.g\. "
                          r'--config\.dnet\.hidden="\(128, 128\)"'),
    ("dnet.hidden", (-3,), r"^dnet.hidden=\(-3,\) must be a tuple of positive layer widths"),
])
def test_config_errors(tmp_path, key, value, match):
  expect_invalid(tmp_path, config_for(**{key: value}), match)


@pytest.mark.parametrize("method,key,value,nearby", [
    ("ce", "batch_size", 33, "32 or 34"),
    ("ce", "eval_batch_size", 101, "100 or 102"),
    ("difficulty_net", "meta_batch_size", 1, "2 or 2"),
])
def test_batch_sizes_must_divide_over_the_devices(tmp_path, monkeypatch, method, key, value,
                                                  nearby):
  monkeypatch.setattr(jax, "device_count", lambda *a: 2)
  expect_invalid(tmp_path, config_for(method=method, **{key: value}),
                 rf"^{key}={value} is not divisible by the 2 devices; the global batch is split "
                 rf"evenly across devices, so choose a multiple of 2 \(e.g. {nearby}\)")


# ---------------------------------------------------------------------------- the data


def test_labels_outside_the_classes(tmp_path):
  arrays = toy_arrays()
  arrays["y_train"][3] = 5
  arrays["num_classes"] = np.int64(3)
  expect_invalid(tmp_path, npz_config(tmp_path, arrays),
                 r"^Data set 'toy' \(source 'npz' in '.*toy.npz'\): y_train: 1 label\(s\) outside "
                 r"\[0, 3\): 5 \(x1\); labels must be class indices 0..2")
  arrays["y_train"][3] = -1
  expect_invalid(tmp_path, npz_config(tmp_path, arrays), r"y_train: 1 label\(s\) outside "
                                                        r"\[0, 3\): -1 \(x1\)")


def test_a_class_without_training_examples(tmp_path):
  arrays = toy_arrays()
  arrays["y_train"][arrays["y_train"] == 1] = 2  # class 1 disappears from the train split
  expect_invalid(tmp_path, npz_config(tmp_path, arrays),
                 r"the train set has no examples of class\(es\) 1; every class needs at least "
                 r"one train example")


def test_a_class_without_meta_examples(tmp_path):
  arrays = toy_arrays()
  arrays["x_meta"], arrays["y_meta"] = arrays["x_test"][:8], arrays["y_test"][:8]  # classes 0, 1
  expect_invalid(tmp_path, npz_config(tmp_path, arrays),
                 r"the meta set has no examples of class\(es\) 2; every class needs at least "
                 r"one meta example")


def test_too_few_images_for_the_meta_set(tmp_path):
  expect_invalid(tmp_path, npz_config(tmp_path, toy_arrays(), **{"data.meta_per_class": 6}),
                 r"class 2 has 6 images but needs at least meta_per_class \+ 1 = 7")


def test_float_images_outside_unit_range(tmp_path):
  arrays = toy_arrays()
  arrays["x_train"] = arrays["x_train"].astype(np.float32)  # 0..255 floats: not rescaled
  expect_invalid(tmp_path, npz_config(tmp_path, arrays),
                 r"x_train are floats in \[\d+(\.\d+)?, 255(\.0)?\], but float images must lie in "
                 r"\[0, 1\]; rescale them \(x / 255 for 0..255 data\) or store uint8")


def test_float_images_in_unit_range_become_uint8(tmp_path):
  arrays = toy_arrays()
  for key in ("x_train", "x_test"):
    arrays[key] = arrays[key].astype(np.float32) / 255.0
  data = datasets.load(npz_config(tmp_path, arrays)).data
  assert data.x_train.dtype == np.uint8 and data.x_test.dtype == np.uint8


def test_images_the_model_cannot_take(tmp_path):
  # The 8x8 grey digits into the CIFAR ResNet-32 (32x32 RGB).
  expect_invalid(tmp_path, config_for(model="resnet32"),
                 r"^model='resnet32' cannot take the train images \(8x8x1: 1 channel\(s\) instead "
                 r"of 3 and 8x8 pixels, smaller than 32x32\): resnet32 is the CIFAR ResNet-32 for "
                 r"RGB images of 32x32 .* Choose a model for these images")
  arrays = toy_arrays(shape=(32, 32, 1))
  expect_invalid(tmp_path, npz_config(tmp_path, arrays, model="resnet50"),
                 r"model='resnet50' cannot take the train images \(32x32x1: 1 channel\(s\) "
                 r"instead of 3\)")


def _npz_errors(tmp_path, arrays, match, **overrides):
  expect_invalid(tmp_path, npz_config(tmp_path, arrays, **overrides), match)


@pytest.mark.parametrize("content,match", [
    (b"", r"toy.npz' is not a .npz file: it is empty \(0 bytes; the write was probably "
          r"interrupted\)\. Write it with np\.savez\(path, x_train=\.\.\., y_train=\.\.\., "
          r"x_test=\.\.\., y_test=\.\.\.\)"),
    ("npy", r"toy.npz' is not a .npz file: it is a single .npy array saved under a .npz name "
            r"\(np.save instead of np.savez\)"),
    (b"x_train,y_train\n1,2\n", r"toy.npz' is not a .npz file: it is not a zip archive as "
                                 r"np.savez writes \(a text or other file\?\)"),
])
def test_files_that_are_not_npz_archives(tmp_path, content, match):
  config = npz_config(tmp_path, toy_arrays())
  path = tmp_path / "toy.npz"
  if content == "npy":
    with open(path, "wb") as f:
      np.save(f, toy_arrays()["x_train"])
  else:
    path.write_bytes(content)
  error = expect_invalid(tmp_path, config, match)
  assert "pickle" not in str(error)


def test_npz_contents_that_do_not_fit(tmp_path):
  arrays = toy_arrays()
  _npz_errors(tmp_path, dict(arrays, num_classes=np.array([3, 3])),
              r"num_classes must be a positive integer scalar \(np\.savez\(\.\.\., "
              r"num_classes=10\)\), got int64 of shape \(2,\) = \[3 3\]")
  rgb_test = toy_arrays(shape=(8, 8, 3))["x_test"]
  _npz_errors(tmp_path, dict(arrays, x_test=rgb_test),
              r"x_test images are 8x8 with 3 channel\(s\) but x_train images are 8x8 with 1 "
              r"channel\(s\); every split must have the size and channels of the training images")
  _npz_errors(tmp_path, dict(arrays, x_meta=rgb_test[:6], y_meta=arrays["y_test"][:6] % 3),
              r"x_meta images are 8x8 with 3 channel\(s\) but x_train images are 8x8 with 1")
  _npz_errors(tmp_path, dict(arrays, x_test=toy_arrays(shape=(6, 6, 1))["x_test"]),
              r"x_test images are 6x6 with 1 channel\(s\) but x_train images are 8x8")
  huge = arrays["y_train"].astype(np.uint64)
  huge[0] = np.iinfo(np.uint64).max
  _npz_errors(tmp_path, dict(arrays, y_train=huge),
              r"y_train holds label 18446744073709551615, larger than any class index")


def test_the_image_size_advice_never_suggests_the_model_in_use(tmp_path):
  with pytest.raises(errors.InvalidInputError, match=r"smaller than 4x4\).*\. Resize or convert "
                                                      r"the images\.$") as raised:
    validation.check_images(np.zeros((2, 3, 3, 1), np.uint8), "small_cnn")
  assert "--config.model=small_cnn" not in str(raised.value)


def test_check_images_wants_uint8_nhwc():
  validation.check_images(np.zeros((2, 32, 32, 3), np.uint8), "resnet32")
  validation.check_images(np.zeros((2, 5, 7, 2), np.uint8), "small_cnn")
  validation.check_images(np.zeros((2, 1, 1, 9), np.uint8), "my_registered_model")
  with pytest.raises(errors.InvalidInputError,
                     match=r"The images are float32, but the runner feeds uint8 images \(0..255\)"):
    validation.check_images(np.zeros((2, 32, 32, 3), np.float32), "resnet32")
  with pytest.raises(errors.InvalidInputError, match=r"must be an NHWC array .* got shape "
                                                      r"\(2, 32, 32\)"):
    validation.check_images(np.zeros((2, 32, 32), np.uint8), "resnet32")
  with pytest.raises(errors.InvalidInputError, match=r"3x3 pixels, smaller than 4x4"):
    validation.check_images(np.zeros((2, 3, 3, 1), np.uint8), "small_cnn")


def test_batch_larger_than_the_sets(tmp_path):
  expect_invalid(tmp_path, npz_config(tmp_path, toy_arrays(), batch_size=64),
                 r"^batch_size 64 is larger than the 12 training images, so an epoch would have "
                 r"no full batch; lower batch_size")
  expect_invalid(tmp_path, config_for(method="difficulty_net", meta_batch_size=200),
                 r"^meta_batch_size=200 exceeds the meta set \(100 images\); lower it or raise "
                 r"data.meta_per_class")


@pytest.mark.parametrize("source,match", [
    ("npz", r"npz file '.*missing' not found; expected a .npz with arrays x_train, y_train"),
    ("tfds", r"TFDS data_dir '.*missing' does not exist\. Prepare it on a machine with internet "
             r"access with `tfds build cifar10"),
    ("cifar_pickle", r"no cifar10 python files found: expected data_batch_1 in .*Download "
                     r"cifar-10-python.tar.gz"),
])
def test_missing_data_directory(tmp_path, source, match):
  config = config_for(**{"data.source": source, "data.name": "cifar10",
                         "data.data_dir": str(tmp_path / "missing")})
  expect_invalid(tmp_path, config, match)


class _Exploit:

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


def test_a_pickle_that_runs_code_is_refused_by_the_runner(tmp_path):
  marker = tmp_path / "pwned"
  folder = tmp_path / "cifar-10-batches-py"
  folder.mkdir()
  (folder / "data_batch_1").write_bytes(
      pickle.dumps({b"data": _Exploit(f"echo pwned > {marker}")}))
  config = config_for(**{"data.source": "cifar_pickle", "data.name": "cifar10",
                         "data.data_dir": str(tmp_path)})
  expect_invalid(tmp_path, config, r"refused to load the pickle: it references "
                                   r"(posix|os|nt)\.system")
  assert not marker.exists()


# ---------------------------------------------------------------------------- the command line


def test_command_line_exits_2_with_the_message_and_no_traceback(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.train", "--config=experiments/configs/digits_lt.py",
       f"--workdir={tmp_path / 'cli'}", "--config.data.imbalance_factor=0.5"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "InvalidInputError: data.imbalance_factor must be >= 1" in proc.stderr
  assert "Traceback" not in proc.stderr
  # The traceback goes to the workdir's log, not the terminal.
  log_path = tmp_path / "cli" / "run.log"
  assert f"(full traceback in {log_path})" in proc.stderr
  with open(log_path, encoding="utf-8") as f:
    log = f.read()
  assert "InvalidInputError (exit 2):\nTraceback (most recent call last):" in log
  assert "validation.py" in log  # where it was raised
