"""Worker for test_parallel.py and test_mesh.py: one process with 8 fake CPU devices, x64.

Runs pmap_equivalence_worker.py's cases and mesh_equivalence_worker.py's checks after
one JAX start-up. pmap with synchronised BatchNorm against one device (both
meta-gradient modes) is run once, inside the mesh comparison, and reported under
test_parallel.py's keys. Prints one line "RESULTS {json}": {"pmap": ..., "mesh": ...}.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import mesh_equivalence_worker  # noqa: E402  (asserts the 8 devices, enables x64)
import pmap_equivalence_worker  # noqa: E402

if __name__ == "__main__":
  mesh = mesh_equivalence_worker.all_results()
  pmap = pmap_equivalence_worker.all_results(cases=("no_batchnorm",))
  for mode in ("nested", "jvp"):
    pmap[f"synced_batchnorm/{mode}"] = mesh[f"equivalence/{mode}"].pop("pmap_vs_single")
  print("RESULTS " + json.dumps({"pmap": pmap, "mesh": mesh}))
