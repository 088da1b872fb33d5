"""XLA:CPU settings, applied before JAX creates its CPU backend.

XLA reads `XLA_FLAGS` once, when the backend is created (at the first
computation, not at `import jax`), so `configure_cpu` must run before anything
touches a device. Flags the user already put in `XLA_FLAGS` win over a preset.
The presets were measured with `python -m experiments.benchmark --cpu_flags=...`
(see README, "Speed").
"""

from __future__ import annotations

import os

# name -> XLA flags. "default" is what the runner and benchmark use unless told otherwise.
CPU_PRESETS = {
    "none": (),
    # oneDNN thunks for matmul and convolution fusions.
    "onednn": ("--xla_cpu_use_onednn=true",),
    # oneDNN custom calls (convolutions) in the thunk runtime.
    "onednn_custom_call": ("--xla_cpu_experimental_onednn_custom_call=true",),
    "onednn_all": ("--xla_cpu_use_onednn=true", "--xla_cpu_experimental_onednn_custom_call=true"),
    # Greedy extraction of XNNPACK subgraphs.
    "xnn_graph": ("--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",),
    "vector512": ("--xla_cpu_prefer_vector_width=512",),
}
CPU_PRESETS["default"] = CPU_PRESETS["none"]


def configure_cpu(preset: str = "default") -> str:
  """Adds the preset's flags to XLA_FLAGS (skipping any flag the user set); returns a summary."""
  if preset not in CPU_PRESETS:
    raise ValueError(f"Unknown XLA:CPU preset {preset!r}; choose one of {', '.join(CPU_PRESETS)}.")
  current = os.environ.get("XLA_FLAGS", "")
  user_flags = {f.split("=")[0] for f in current.split()}
  added = [f for f in CPU_PRESETS[preset] if f.split("=")[0] not in user_flags]
  if added:
    os.environ["XLA_FLAGS"] = " ".join([current] + added).strip()
  return f"{preset}: {' '.join(CPU_PRESETS[preset]) or '(XLA defaults)'}"
