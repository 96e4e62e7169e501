"""One engine on the data of tests/test_kmeans_precision.py, in a child process.

FASTSSL_CPU_ISA and TRITON_INTERPRET are read once per process, so the test starts this
script once per engine and compares what each prints (JSON on stdout):

    python tests/_precision_engines.py IMPL
    -> {"isa": ..., "assign": {PRECISION: {"labels", "distances"}},
        "tree": {PRECISION: [level 1 labels, level 2 labels]}}   for PRECISION in data, bf16

IMPL is "cpu" (capped by FASTSSL_CPU_ISA), "torch", or "triton" (TRITON_INTERPRET=1:
the device engines' centroid preparation, run on the CPU; no tree, the Triton kernel
does not do the grouped split).
"""
from __future__ import annotations

import json
import sys

import numpy as np


def near_bisector_rows(seed: int = 0, n: int = 4000, k: int = 48, d: int = 64):
    """(x (n, d) float16, c (k, d) float32): every row lies within 5e-4 (relative) of the
    bisector of two centroids, so rounding the centroids to float16 or bf16 moves a
    few dozen rows to the other side, far above float32 accumulation error."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((k, d)).astype(np.float32)
    a = rng.integers(k, size=n)
    b = (a + 1 + rng.integers(k - 1, size=n)) % k
    t = (0.5 + rng.uniform(-1, 1, size=(n, 1)) * 5e-4).astype(np.float32)
    return (t * c[a] + (1 - t) * c[b]).astype(np.float16), c


def _assign(impl: str, precision: str) -> dict:
    from fastssl import assign as kmeans

    x, c = near_bisector_rows()
    if impl == "triton":
        import torch

        x = torch.from_numpy(x)
    labels, dists = kmeans.assign(x, c, impl=impl, precision=precision)
    return {"labels": np.asarray(labels).tolist(), "distances": np.asarray(dists).tolist()}


def _tree(impl: str, precision: str) -> dict:
    from fastssl.curation.hierarchical import hierarchical_kmeans
    from fastssl.curation.synthetic import long_tailed_mixture

    points = long_tailed_mixture(3000, 32, 30, seed=1, dtype=np.float16)[0]
    tree = hierarchical_kmeans(points, [40, 8], iterations=10, resampling_steps=3,
                               split_k=None, impl=impl, precision=precision, seed=5,
                               progress=False)
    return [np.asarray(level.assignments).tolist() for level in tree.levels]


if __name__ == "__main__":
    impl = sys.argv[1]
    from fastssl._native import has_cpu_ext, native

    out = {"isa": native().cpu_isa() if has_cpu_ext() else None,
           "assign": {p: _assign(impl, p) for p in ("data", "bf16")}}
    if impl != "triton":
        out["tree"] = {p: _tree(impl, p) for p in ("data", "bf16")}
    print(json.dumps(out))
