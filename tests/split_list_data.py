"""Generated "split list + image root" data sets of tiny JPEGs for the streaming tests.

Every image is one solid colour that encodes its class (red channel) and its
line in its list (green channel), so a decoded, cropped, resized or flipped
batch still says which example it is (cf. tests/test_split_lists.py).
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


def colour(label: int, index: int) -> tuple[int, int, int]:
  return (30 + 40 * label, 10 + 4 * (index % 60), 128)


def decode(images: np.ndarray, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)) -> np.ndarray:
  """Labels encoded in normalised float images (JPEG rounding allows a few levels)."""
  raw = images * np.asarray(std) + np.asarray(mean)
  red = raw.mean(axis=(1, 2))[:, 0] * 255.0
  return np.rint((red - 30) / 40).astype(int)


def write_split_lists(root, train_counts, meta_per_class: int, test_per_class: int,
                      size: tuple[int, int] = (40, 36)) -> dict[str, str]:
  """Writes JPEGs under root/{train,val,test}/class_c/ and the three lists in root.

  Returns {"image_root", "train_list", "meta_list", "test_list"} (paths as str).
  """
  root = os.fspath(root)
  lists = {}
  for split, per_class in (("train", list(train_counts)),
                           ("val", [meta_per_class] * len(train_counts)),
                           ("test", [test_per_class] * len(train_counts))):
    lines = []
    for label, count in enumerate(per_class):
      folder = os.path.join(root, split, f"class_{label}")
      os.makedirs(folder, exist_ok=True)
      for i in range(count):
        rel = f"{split}/class_{label}/img_{i:04d}.jpg"
        Image.new("RGB", size, colour(label, len(lines))).save(
            os.path.join(root, rel), quality=95, subsampling=0)
        lines.append(f"{rel} {label}")
    path = os.path.join(root, f"{split}_list.txt")
    with open(path, "w", encoding="utf-8") as f:
      f.write("\n".join(lines) + "\n")
    lists[split] = path
  return {"image_root": root, "train_list": lists["train"], "meta_list": lists["val"],
          "test_list": lists["test"]}


def apply_to_config(config, paths: dict[str, str], *, num_classes: int, image_size: int = 32):
  """Points a streamed config at generated lists, with tiny images and one decode thread."""
  for key, value in paths.items():
    config.data[key] = value
  config.data.num_classes = num_classes
  config.data.image_size = image_size
  config.data.resize_size = image_size + image_size // 8
  config.data.decode_threads = 1
  return config
