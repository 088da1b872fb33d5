"""Pretrained weights: the '/'-keyed .npz format, loading checks, torchvision names."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dnet_jax.models import pretrained
from dnet_jax.models.resnet_imagenet import ImageNetResNet, _conv

IMAGES = jnp.zeros((1, 32, 32, 3), jnp.float32)


def _tiny(num_classes: int, block: str = "basic", width: int = 4) -> ImageNetResNet:
  return ImageNetResNet(num_classes=num_classes, stage_sizes=(1, 1, 1, 1), block=block,
                        width=width)


def _variables(num_classes: int, seed: int, **kwargs):
  """Variables of the right shapes filled with random numbers (no compilation needed)."""
  model = _tiny(num_classes, **kwargs)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), IMAGES, train=False))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes)


def _assert_same(a, b):
  flat_a, flat_b = pretrained.flatten_variables(a), pretrained.flatten_variables(b)
  assert sorted(flat_a) == sorted(flat_b)
  for key in flat_a:
    np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=key)


def test_round_trip_save_and_load(tmp_path):
  source = _variables(10, seed=0)
  path = tmp_path / "weights.npz"
  pretrained.save_variables_npz(path, source)
  keys = set(np.load(path).files)
  assert "params/conv_init/kernel" in keys and "batch_stats/bn_init/mean" in keys
  assert "params/stage2_block1/downsample_conv/kernel" in keys
  _assert_same(pretrained.load_variables_npz(path), source)

  fresh = _variables(10, seed=1)
  params, batch_stats, report = pretrained.load_pretrained(path, fresh["params"],
                                                           fresh["batch_stats"])
  _assert_same({"params": params, "batch_stats": batch_stats}, source)
  assert report.skipped_head == () and report.unused == ()
  assert len(report.loaded) == len(pretrained.flatten_variables(source))
  # The loaded tree is a drop-in replacement: same structure, shapes and dtypes.
  assert jax.tree.structure(params) == jax.tree.structure(fresh["params"])
  assert all(a.dtype == b.dtype for a, b in zip(jax.tree.leaves(params),
                                                jax.tree.leaves(fresh["params"])))


def test_head_is_skipped_when_the_number_of_classes_differs(tmp_path):
  path = tmp_path / "imagenet.npz"
  source = _variables(10, seed=0)
  pretrained.save_variables_npz(path, source)
  target = _variables(7, seed=1)
  params, batch_stats, report = pretrained.load_pretrained(path, target["params"],
                                                           target["batch_stats"])
  assert set(report.skipped_head) == {"params/classifier/kernel", "params/classifier/bias"}
  np.testing.assert_array_equal(params["classifier"]["kernel"],
                                target["params"]["classifier"]["kernel"])  # kept at init
  np.testing.assert_array_equal(params["conv_init"]["kernel"],
                                source["params"]["conv_init"]["kernel"])
  np.testing.assert_array_equal(batch_stats["bn_init"]["var"],
                                source["batch_stats"]["bn_init"]["var"])
  # A differently named head is not skipped: its mismatch is an error.
  with pytest.raises(ValueError, match=r"shape mismatch.*params/classifier/kernel: file "
                     r"\(32, 10\) vs model \(32, 7\)"):
    pretrained.load_pretrained(path, target["params"], target["batch_stats"], head_names=("fc",))


def test_missing_mismatched_and_unused_keys_are_named(tmp_path):
  source = pretrained.flatten_variables(_variables(10, seed=0))
  target = _variables(10, seed=1)

  missing = dict(source)
  del missing["params/stage3_block1/conv2/kernel"]
  del missing["batch_stats/bn_init/mean"]
  path = tmp_path / "missing.npz"
  np.savez(path, **missing)
  with pytest.raises(ValueError, match=r"2 missing key\(s\): batch_stats/bn_init/mean, "
                     r"params/stage3_block1/conv2/kernel|2 missing key\(s\): "
                     r"params/stage3_block1/conv2/kernel, batch_stats/bn_init/mean"):
    pretrained.load_pretrained(path, target["params"], target["batch_stats"])

  extra = dict(source, **{"params/projection/kernel": np.zeros(3)})
  path = tmp_path / "extra.npz"
  np.savez(path, **extra)
  with pytest.raises(ValueError, match=r"1 unused key\(s\) in the file .*params/projection/kernel"):
    pretrained.load_pretrained(path, target["params"], target["batch_stats"])
  _, _, report = pretrained.load_pretrained(path, target["params"], target["batch_stats"],
                                            allow_unused=True)
  assert report.unused == ("params/projection/kernel",)

  wider = tmp_path / "wider.npz"
  pretrained.save_variables_npz(wider, _variables(10, seed=0, width=8))
  with pytest.raises(ValueError, match=r"shape mismatch.*params/conv_init/kernel: file "
                     r"\(7, 7, 3, 8\) vs model \(7, 7, 3, 4\)"):
    pretrained.load_pretrained(wider, target["params"], target["batch_stats"])

  with pytest.raises(FileNotFoundError, match="does not exist"):
    pretrained.load_pretrained(tmp_path / "none.npz", target["params"])


def _to_torchvision(variables) -> dict[str, np.ndarray]:
  """Our variables under torchvision's names and layouts, written out by hand."""
  flat = pretrained.flatten_variables(variables)
  torch_sd = {"module.conv1.weight": flat["params/conv_init/kernel"].transpose(3, 2, 0, 1)}
  bn_fields = {"weight": "params/{}/scale", "bias": "params/{}/bias",
               "running_mean": "batch_stats/{}/mean", "running_var": "batch_stats/{}/var"}

  def add_bn(torch_name, ours):
    for field, key in bn_fields.items():
      torch_sd[f"module.{torch_name}.{field}"] = flat[key.format(ours)]
    torch_sd[f"module.{torch_name}.num_batches_tracked"] = np.array(7)

  add_bn("bn1", "bn_init")
  for layer in range(1, 5):
    ours = f"stage{layer}_block1"
    for k in (1, 2, 3):
      key = f"params/{ours}/conv{k}/kernel"
      if key in flat:
        torch_sd[f"module.layer{layer}.0.conv{k}.weight"] = flat[key].transpose(3, 2, 0, 1)
        add_bn(f"layer{layer}.0.bn{k}", f"{ours}/bn{k}")
    if f"params/{ours}/downsample_conv/kernel" in flat:
      torch_sd[f"module.layer{layer}.0.downsample.0.weight"] = (
          flat[f"params/{ours}/downsample_conv/kernel"].transpose(3, 2, 0, 1))
      add_bn(f"layer{layer}.0.downsample.1", f"{ours}/downsample_bn")
  torch_sd["module.fc.weight"] = flat["params/classifier/kernel"].T
  torch_sd["module.fc.bias"] = flat["params/classifier/bias"]
  return torch_sd


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_torchvision_state_dict_conversion(tmp_path, block):
  variables = _variables(10, seed=0, block=block)
  torch_sd = _to_torchvision(variables)
  assert len(torch_sd) > 20
  converted = pretrained.from_torchvision_state_dict(torch_sd)
  expected = pretrained.flatten_variables(variables)
  assert sorted(converted) == sorted(expected)
  for key in expected:
    np.testing.assert_array_equal(converted[key], expected[key], err_msg=key)

  source, target = tmp_path / "torch.npz", tmp_path / "flax.npz"
  np.savez(source, **torch_sd)
  pretrained.convert_torchvision_npz(source, target)
  fresh = _variables(10, seed=1, block=block)
  params, _, _ = pretrained.load_pretrained(target, fresh["params"], fresh["batch_stats"])
  np.testing.assert_array_equal(params["classifier"]["kernel"],
                                variables["params"]["classifier"]["kernel"])


def test_torch_conv_layout_and_padding_match_the_stem():
  """A PyTorch conv (NCHW input, OIHW weight, padding 3, stride 2) = our stem conv, converted."""
  rng = np.random.default_rng(0)
  weight = rng.normal(size=(4, 3, 7, 7)).astype(np.float32)  # torch OIHW
  x = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)  # torch NCHW
  torch_out = jax.lax.conv_general_dilated(
      x, weight, window_strides=(2, 2), padding=((3, 3), (3, 3)),
      dimension_numbers=("NCHW", "OIHW", "NCHW"))
  kernel = pretrained.from_torchvision_state_dict({"conv1.weight": weight})[
      "params/conv_init/kernel"]
  stem_conv = _conv(4, 7, 2, jnp.float32, jnp.float32, "conv_init")  # as the model builds it
  ours = stem_conv.apply({"params": {"kernel": kernel}}, np.transpose(x, (0, 2, 3, 1)))
  np.testing.assert_allclose(np.transpose(ours, (0, 3, 1, 2)), torch_out, rtol=1e-4, atol=1e-4)


def test_places_block_surgery_loads_the_rest_of_the_backbone(tmp_path):
  """Places-LT: a pretrained 2-block last stage + linear head -> last block dropped, a new
  block and a cosine head kept at their initialisation, everything else loaded."""
  images = jnp.zeros((1, 32, 32, 3), jnp.float32)
  imagenet = ImageNetResNet(num_classes=10, stage_sizes=(1, 1, 1, 2), block="bottleneck", width=4)
  places = ImageNetResNet(num_classes=5, stage_sizes=(1, 1, 1, 2), block="bottleneck", width=4,
                          head="cosine", drop_last_blocks=1, extra_block=True)
  rng = np.random.default_rng(0)
  random_like = lambda model: jax.tree.map(  # no compilation: shapes, then random values
      lambda s: rng.normal(size=s.shape).astype(s.dtype),
      jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False)))
  source = random_like(imagenet)
  path = tmp_path / "imagenet.npz"
  pretrained.save_variables_npz(path, source)
  fresh = random_like(places)
  assert "stage4_block2" not in fresh["params"]
  # The new block: 128 -> 32 -> 128 channels (2048 -> 512 -> 2048 at width 64), no projection.
  assert fresh["params"]["extra_block"]["conv1"]["kernel"].shape == (1, 1, 128, 32)
  assert fresh["params"]["extra_block"]["conv3"]["kernel"].shape == (1, 1, 32, 128)
  assert "downsample_conv" not in fresh["params"]["extra_block"]

  with pytest.raises(ValueError, match="missing key.*extra_block"):
    pretrained.load_pretrained(path, fresh["params"], fresh["batch_stats"])
  with pytest.raises(ValueError, match=r"dropped_names \['stage4_block9'\] match no variable"):
    pretrained.load_pretrained(path, fresh["params"], fresh["batch_stats"],
                               new_names=("extra_block",), dropped_names=("stage4_block9",))
  params, batch_stats, report = pretrained.load_pretrained(
      path, fresh["params"], fresh["batch_stats"], new_names=("extra_block",),
      dropped_names=("stage4_block2",))

  flat_source = pretrained.flatten_variables(source)
  flat_fresh = pretrained.flatten_variables(fresh)
  flat_new = pretrained.flatten_variables({"params": params, "batch_stats": batch_stats})
  new_block = {k for k in flat_fresh if k.split("/")[1] == "extra_block"}
  assert set(report.kept_new) == new_block and len(new_block) == 3 + 3 * 4  # 3 conv kernels, 3 BNs
  assert report.skipped_head == ("params/classifier/kernel",)  # (128, 10) in the file, (128, 5)
  assert set(report.dropped) == ({k for k in flat_source if k.split("/")[1] == "stage4_block2"}
                                 | {"params/classifier/bias"})
  assert report.unused == ()
  assert set(report.loaded) == set(flat_fresh) - new_block - {"params/classifier/kernel"}
  for key in flat_new:
    expected = flat_source[key] if key in report.loaded else flat_fresh[key]
    np.testing.assert_array_equal(flat_new[key], expected, err_msg=key)


def test_places_options_are_checked_and_resnet152_places_has_the_public_shape():
  images = jnp.zeros((1, 32, 32, 3), jnp.float32)
  bad = ImageNetResNet(num_classes=5, stage_sizes=(1, 2), width=4, drop_last_blocks=2)
  with pytest.raises(ValueError, match=r"drop_last_blocks must be in \[0, 2\)"):
    jax.eval_shape(lambda: bad.init(jax.random.key(0), images, train=False))
  from dnet_jax.models.registry import build_classifier  # pylint: disable=import-outside-toplevel
  shapes = jax.eval_shape(lambda: build_classifier("resnet152_places", 365).init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))["params"]
  assert "stage4_block3" not in shapes and "stage4_block2" in shapes
  assert shapes["extra_block"]["conv1"]["kernel"].shape == (1, 1, 2048, 512)
  assert shapes["extra_block"]["conv3"]["kernel"].shape == (1, 1, 512, 2048)
  assert {k: v.shape for k, v in shapes["classifier"].items()} == {"kernel": (2048, 365)}
