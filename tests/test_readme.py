"""Runs README's "Use Difficulty-Net in your own code" block verbatim on the digits data."""

import os
import re

import numpy as np
from sklearn.datasets import load_digits

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def _snippet() -> str:
  text = open(README).read()
  section = text.split("## Use Difficulty-Net in your own code", 1)[1]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_snippet_trains_on_digits():
  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  y = digits.target.astype(np.int32)
  rng = np.random.default_rng(0)
  order = rng.permutation(len(y))
  meta_idx = np.concatenate([order[y[order] == c][:10] for c in range(10)])
  train_idx = np.setdiff1d(order, meta_idx)

  def my_batches(epoch):
    perm = np.random.default_rng(epoch).permutation(train_idx)[:320]
    for i in range(0, 320, 64):
      b = perm[i:i + 64]
      m = rng.choice(meta_idx, 20, replace=False)
      yield {"image": x[b], "label": y[b]}, {"image": x[m], "label": y[m]}

  def my_meta_set():
    return {"image": x[meta_idx], "label": y[meta_idx]}

  namespace = {"my_batches": my_batches, "my_meta_set": my_meta_set}
  exec(compile(_snippet(), "README.md", "exec"), namespace)
  state = namespace["state"]
  assert int(state.step) == 20 * 5
  # The accuracy vector was refreshed from the meta set, and the model learned.
  acc = np.asarray(state.class_accuracy)
  assert acc.shape == (10,) and np.all((acc >= 0) & (acc <= 1))
  assert acc.mean() > 0.8, acc
  assert np.isfinite(float(namespace["metrics"]["meta_ce"]))
