"""CPU assignment: fastssl against faiss-cpu IndexFlatL2 and torch matmul + argmin.

    python -m pytest bench/bench_kmeans_cpu.py                    # n = 200k
    python -m pytest bench/bench_kmeans_cpu.py --bench-size=full  # n = 1M (the issue's size)
    python -m pytest bench/bench_kmeans_cpu.py -k paired          # bf16 / fp32 only

d = 768, k = 4096. Rows report GFLOP/s (2 n k d per second) and the ratio to faiss
measured in the same run. The bf16 row also reports how many labels differ from the
fp32 labels at rows whose best and second-best distances are not near-tied. The paired
test times fastssl fp32 and bf16 rows in alternation, for machines shared with other jobs.
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from fastssl import assign as kmeans
from fastssl._native import build_info, has_cpu_ext

faiss = pytest.importorskip("faiss", reason="faiss-cpu is the baseline (pip install faiss-cpu)")

D, K = 768, 4096
ROUNDS = 3
GROUP = "kmeans_assign_cpu"


@pytest.fixture(scope="module")
def problem(bench_size):
    n = 1_000_000 if bench_size == "full" else 200_000
    rng = np.random.default_rng(1234)
    # Points scattered around the centroids, so that assignment is meaningful (not the
    # near-ties of pure noise) and the work is the same as in a k-means iteration.
    centroids = rng.standard_normal((K, D), dtype=np.float32)
    x = np.empty((n, D), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        owner = rng.integers(0, K, stop - start)
        x[start:stop] = centroids[owner] + 0.8 * rng.standard_normal((stop - start, D), dtype=np.float32)
    return x, centroids


def _time(fn) -> float:
    fn()  # warm-up: page faults, thread pools, packing buffers
    times = []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _row(record, benchmark, name, seconds, n, baseline=False, **extra):
    gflops = 2.0 * n * K * D / seconds / 1e9
    benchmark.extra_info.update(gflops=round(gflops, 1), **extra)
    record(GROUP, name, seconds, baseline=baseline, n=n, gflops=round(gflops, 1), **extra)


def _bench(benchmark, fn):
    # pytest-benchmark owns the statistics; one round per call keeps the big shapes sane.
    return benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=1)


def _median(benchmark) -> float:
    return float(benchmark.stats.stats.median)


def test_faiss_flat_l2(benchmark, problem, record):
    x, c = problem
    index = faiss.IndexFlatL2(D)
    index.add(c)
    _bench(benchmark, lambda: index.search(x, 1))
    _row(record, benchmark, "faiss IndexFlatL2 fp32", _median(benchmark), len(x), baseline=True,
         threads=faiss.omp_get_max_threads())


def test_torch_chunked_matmul_argmin(benchmark, problem, record):
    x, c = problem
    xt, ct = torch.from_numpy(x), torch.from_numpy(c)
    c_sq = (ct * ct).sum(1)

    def run():
        out = torch.empty(len(xt), dtype=torch.int64)
        for s in range(0, len(xt), 16384):
            chunk = xt[s : s + 16384]
            out[s : s + 16384] = torch.addmm(c_sq, chunk, ct.T, alpha=-2).argmin(1)
        return out

    _bench(benchmark, run)
    _row(record, benchmark, "torch addmm+argmin fp32", _median(benchmark), len(x),
         threads=torch.get_num_threads())


@pytest.mark.skipif(not has_cpu_ext(), reason="fastssl._C is not built")
def test_fastssl_fp32(benchmark, problem, record):
    x, c = problem
    labels, dist = kmeans.assign(x, c)  # checked once before timing
    index = faiss.IndexFlatL2(D)
    index.add(c)
    ref_d, ref_l = index.search(x[:20000], 1)
    np.testing.assert_allclose(dist[:20000], ref_d[:, 0], rtol=1e-3, atol=1e-2)
    _bench(benchmark, lambda: kmeans.assign(x, c, check_finite=False))
    _row(record, benchmark, "fastssl fp32", _median(benchmark), len(x),
         isa=build_info()["cpu_isa"])


@pytest.mark.skipif(not has_cpu_ext(), reason="fastssl._C is not built")
@pytest.mark.parametrize("dtype, precision", [("bfloat16", "data"), ("float16", "data"),
                                              ("float16", "bf16")])
def test_fastssl_low_precision(benchmark, problem, record, dtype, precision):
    """16-bit rows. precision="data" keeps float16 centroids for float16 rows (float32
    arithmetic, the same result on every machine); "bf16" lets AMX multiply them on the
    tile unit."""
    x, c = problem
    xt = torch.from_numpy(x).to(getattr(torch, dtype))
    labels32, dist32 = kmeans.assign(x, c)
    labels, _ = kmeans.assign(xt, c, precision=precision)
    # Near-ties (second best within 0.5% of the best) may legitimately flip.
    sample = slice(0, 20000)
    xs = torch.from_numpy(x[sample]).double()
    scores = torch.cdist(xs, torch.from_numpy(c).double()) ** 2
    top2 = scores.topk(2, dim=1, largest=False).values
    clear = ((top2[:, 1] - top2[:, 0]) > 5e-3 * top2[:, 0]).numpy()
    mismatched = int((labels[sample].numpy() != labels32[sample])[clear].sum())
    _bench(benchmark, lambda: kmeans.assign(xt, c, check_finite=False, precision=precision))
    _row(record, benchmark, f"fastssl {dtype} input, precision={precision}", _median(benchmark),
         len(x),
         isa=build_info()["cpu_isa"], label_mismatch_clear_rows=mismatched)
    assert mismatched == 0


@pytest.mark.skipif(not has_cpu_ext(), reason="fastssl._C is not built")
def test_fastssl_grouped_split(benchmark, record, bench_size):
    """The per-parent split: many small groups (~3,500 rows x 35 centroids), d = 1024."""
    groups = 200 if bench_size == "full" else 40
    rng = np.random.default_rng(7)
    sizes = rng.integers(3000, 4000, groups)
    x_off = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    c_off = np.arange(groups + 1, dtype=np.int64) * 35
    x = rng.standard_normal((int(x_off[-1]), 1024), dtype=np.float32)
    c = rng.standard_normal((groups * 35, 1024), dtype=np.float32)
    xb = torch.from_numpy(x).bfloat16()
    _bench(benchmark, lambda: kmeans.assign_grouped(xb, x_off, c, c_off, check_finite=False))
    seconds = _median(benchmark)
    flops = 2.0 * x.shape[0] * 35 * 1024
    record("kmeans_grouped_cpu", "fastssl grouped bf16", seconds, baseline=False,
           rows=x.shape[0], groups=groups, gflops=round(flops / seconds / 1e9, 1))
    xt = torch.from_numpy(x)
    ct = torch.from_numpy(c)

    def loop():  # what a user writes without assign_grouped
        for g in range(groups):
            rows = xt[x_off[g] : x_off[g + 1]]
            cg = ct[c_off[g] : c_off[g + 1]]
            torch.cdist(rows, cg).argmin(1)

    loop_seconds = _time(loop)
    record("kmeans_grouped_cpu", "python loop torch.cdist fp32", loop_seconds, baseline=True,
           rows=x.shape[0], groups=groups, gflops=round(flops / loop_seconds / 1e9, 1))


def _paired_rounds(runs: dict, rounds: int) -> dict:
    """Times each callable of ``runs`` once per round, in turn (a, b, a, b, ...), after one
    warm-up each. Returns name -> (wall seconds, process CPU seconds) per round."""
    for fn in runs.values():
        fn()
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name].append((time.perf_counter() - w0, time.process_time() - c0))
    return times


@pytest.mark.skipif(not has_cpu_ext(), reason="fastssl._C is not built")
def test_fastssl_bf16_vs_fp32_paired(problem, record):
    """bf16 rows against fp32 rows, timed in alternation so that load from other jobs on a
    shared machine falls on both alike. Reports wall GFLOP/s (median), GFLOP per CPU-second
    (process time of all threads: what the engine does while it runs), the median of the
    per-round wall ratios, each round's wall seconds, and the 1-minute load average before
    and after (issue 22)."""
    x, c = problem
    xb = torch.from_numpy(x).bfloat16()
    # Correct once before timing: bf16 labels equal the float64 oracle of the bf16-rounded
    # rows and centroids wherever the runner-up is not within float32 accumulation error.
    sample = slice(0, 5000)
    labels, _ = kmeans.assign(xb[sample], c)
    x64, c64 = xb[sample].double(), torch.from_numpy(c).bfloat16().double()
    scores = (c64 * c64).sum(1) - 2 * x64 @ c64.T
    top2 = scores.topk(2, dim=1, largest=False)
    clear = (top2.values[:, 1] - top2.values[:, 0]) > 1e-4 * (x64 * x64).sum(1)
    assert torch.equal(labels[clear], top2.indices[clear, 0])

    load_before = os.getloadavg()[0]
    times = _paired_rounds({"fp32": lambda: kmeans.assign(x, c, check_finite=False),
                            "bf16": lambda: kmeans.assign(xb, c, check_finite=False)}, ROUNDS)
    load_after = os.getloadavg()[0]
    flops = 2.0 * len(x) * K * D
    ratios = [f[0] / b[0] for f, b in zip(times["fp32"], times["bf16"])]
    for name in ("fp32", "bf16"):
        wall = float(np.median([t[0] for t in times[name]]))
        cpu = float(np.median([t[1] for t in times[name]]))
        extra = {"gflops_per_cpu_s": round(flops / cpu / 1e9, 1),
                 "rounds_s": "/".join(f"{t[0]:.2f}" for t in times[name]),
                 "load_before": round(load_before, 2), "load_after": round(load_after, 2)}
        if name == "bf16":
            extra["median_round_ratio"] = round(float(np.median(ratios)), 3)
        record("kmeans_bf16_vs_fp32_cpu", f"fastssl {name} (paired)", wall,
               baseline=name == "fp32", n=len(x), gflops=round(flops / wall / 1e9, 1),
               isa=build_info()["cpu_isa"], **extra)
