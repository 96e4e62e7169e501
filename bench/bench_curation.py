"""Curation at scale on the CPU: Lloyd iterations against faiss, and a 4-level tree.

    python -m pytest bench/bench_curation.py                    # n = 200k, d = 256
    python -m pytest bench/bench_curation.py --bench-size=full  # n = 1M,  d = 256

[curation_lloyd_cpu] seconds per Lloyd iteration (assignment + centroid update) at
k = 1000 from the same initial centroids: faiss.Kmeans (baseline; max_points_per_centroid
raised so that it uses every point) against fastssl KMeans with float64 and with float32
accumulation. The objectives after the same iterations are checked to agree within 1%.

[curation_tree_cpu] end to end hierarchical_kmeans: 4 levels (10,000 -> 1,000 -> 100 ->
10 at full size; 2,000 -> 200 -> 20 -> 5 quick) with 3 resampling steps at levels 2+,
data streamed from a memory-mapped .npy file.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from fastssl.curation import KMeans, hierarchical_kmeans
from fastssl.curation.synthetic import long_tailed_mixture

faiss = pytest.importorskip("faiss", reason="faiss-cpu is the baseline (pip install faiss-cpu)")

D, K, ITERS = 256, 1000, 5


@pytest.fixture(scope="module")
def points(bench_size, tmp_path_factory):
    n = 1_000_000 if bench_size == "full" else 200_000
    root = tmp_path_factory.mktemp("curation")
    paths, comp, _ = long_tailed_mixture(n, D, 1000, zipf_a=1.1, families=8, seed=0, out_dir=root)
    return paths, n


def _memmap(paths):
    return np.concatenate([np.load(p) for p in paths])  # faiss needs one array in RAM


def test_lloyd_iteration_vs_faiss(points, record):
    paths, n = points
    x = _memmap(paths)
    init = KMeans(k=K, iterations=0, seed=0, progress=False).fit(x).centroids_
    fk = faiss.Kmeans(D, K, niter=ITERS, seed=0, max_points_per_centroid=1 << 30, verbose=False)
    t0 = time.perf_counter()
    fk.train(x, init_centroids=init)
    faiss_it = (time.perf_counter() - t0) / ITERS
    rows = {}
    for fp64 in (True, False):
        km = KMeans(k=K, iterations=ITERS, fp64_accumulate=fp64, progress=False)
        t0 = time.perf_counter()
        km.fit(x, init_centroids=init)
        rows[fp64] = ((time.perf_counter() - t0) / ITERS, km)
    # same objective (final centroids, exact assignment by our engine for both)
    obj_faiss = float(KMeans(k=K).predict(x, centroids=fk.centroids)[1].astype(np.float64).mean())
    obj_ours = float(rows[True][1].predict(x)[1].astype(np.float64).mean())
    assert abs(obj_ours - obj_faiss) <= 0.01 * obj_faiss
    gflop = 2.0 * n * K * D / 1e9
    record("curation_lloyd_cpu", "faiss.Kmeans", faiss_it, baseline=True, n=n, k=K,
           gflops=round(gflop / faiss_it, 1), objective=round(obj_faiss, 4))
    for fp64, (secs, km) in rows.items():
        record("curation_lloyd_cpu", f"fastssl fp{64 if fp64 else 32} accumulate", secs, n=n, k=K,
               gflops=round(gflop / secs, 1), objective=round(obj_ours, 4))


def test_four_level_tree(points, record, bench_size, tmp_path):
    paths, n = points
    levels = [10_000, 1_000, 100, 10] if bench_size == "full" else [2_000, 200, 20, 5]
    t0 = time.perf_counter()
    tree = hierarchical_kmeans(paths, levels, iterations=10, resampling_steps=3,
                               init_sample_size=2 * levels[0], output_dir=tmp_path / "tree",
                               progress=False)
    secs = time.perf_counter() - t0
    steps = {f"{s['level']}/{s['step']}": s["seconds"] for s in tree.meta["steps"]}
    level1 = steps["1/kmeans"]
    record("curation_tree_cpu", f"{'-'.join(map(str, levels))}, 3 resampling", secs, n=n,
           level1_s=round(level1, 1), upper_levels_s=round(secs - level1, 2),
           level1_points_per_s=round(n * 11 / level1))  # 10 iterations + final pass (init included)
