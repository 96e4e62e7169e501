"""GPU k-means assignment: correctness once, then timings in hardware units.

Imported by bench/gpu_check.py, which calls ``run(report)``; ``report.context`` carries
the measured bf16 GEMM rate and copy bandwidth of the card.

Problems (scaled to fit the check's time budget; each row says what it ran):
  plain    n = 4M, d = 1024, k = 16k and 100k, bf16; n = 1M fp32 (tf32, 3xtf32).
           Baseline: torch chunked addmm (||c||^2 - 2 x c^T) + argmin, bf16 / tf32.
           Goals: >= 1.3x torch, >= 70% of the measured bf16 GEMM rate.
  grouped  d = 1024 bf16: 2,000 groups x 3,500 rows x 35 centroids (the curation shape,
           7M rows instead of 350M) and 20,000 groups x 350 rows x 35 centroids.
           Baseline: a Python loop over groups (addmm + argmin per group), timed on a
           subset of groups and extrapolated. Goal: >= 10x the loop.
"""
from __future__ import annotations

import time
import traceback

import numpy as np
import torch

GIB = 2**30


def _events_ms(fn, warmup: int = 1, reps: int = 3) -> float:
    """Median wall time on the device of fn(), CUDA events; fewer reps when it is slow."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    budget = time.perf_counter() + 20.0
    for i in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
        if time.perf_counter() > budget:
            break
    times.sort()
    return times[len(times) // 2]


def _torch_assign(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The baseline: chunked addmm(||c||^2, x, c^T, alpha=-2) + argmin, scores <= 1 GiB."""
    csq = c.float().square().sum(1).to(x.dtype)[None]
    labels = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    chunk = max(1024, GIB // (c.shape[0] * x.element_size()))
    ct = c.T
    for s in range(0, x.shape[0], chunk):
        labels[s : s + chunk] = torch.addmm(csq, x[s : s + chunk], ct, alpha=-2).argmin(1)
    return labels


def _ours(x, c, precision=None, groups=None):
    from fastssl import _cuda_assign

    return _cuda_assign.run("assign" if groups is None else "assign_grouped", x, "torch", c,
                            "l2", False, groups, precision=precision)


# -------------------------------------------------------------------- correctness
def _check_medium(report) -> None:
    from fastssl.kmeans import assign, assign_grouped

    gen = torch.Generator(device="cuda").manual_seed(0)
    n, d, k = 20000, 256, 1000
    x32 = torch.randn(n, d, device="cuda", generator=gen)
    c32 = torch.randn(k, d, device="cuda", generator=gen)
    cases = [("bf16", torch.bfloat16, None), ("fp16", torch.float16, None),
             ("fp32-3xtf32", torch.float32, "3xtf32"), ("fp32-tf32", torch.float32, "tf32")]
    for metric in ("l2", "ip"):
        for label, dtype, prec in cases:
            x, c = x32.to(dtype), c32.to(dtype)
            if prec is None:
                lab, dist = assign(x, c, metric=metric, impl="cuda")
            else:
                from fastssl import _cuda_assign

                lab, dist = _cuda_assign.run("assign", x, "torch", c, metric, True, None,
                                             precision=prec)
            xd, cd = x.double(), c.double()
            dots = xd @ cd.T
            if metric == "l2":
                xsq = (xd * xd).sum(1, keepdim=True)
                scores = xsq - 2 * dots + (cd * cd).sum(1)
                scale = xsq[:, 0] + (cd * cd).sum(1).max()
                want = scores.min(1).values.clamp_min(0)
            else:
                scores = -dots
                scale = xd.norm(dim=1) * cd.norm(dim=1).max()
                want = dots.max(1).values
            best = scores.min(1).values
            chosen = scores.gather(1, lab[:, None])[:, 0]
            regret = float(((chosen - best) / scale).max())
            dist_err = float(((dist.double() - want).abs() / scale).max())
            agree = float((lab == scores.argmin(1)).double().mean())
            limit = 5e-3 if prec == "tf32" else 1e-4
            ok = regret <= limit and dist_err <= limit and agree > 0.98
            report(f"check assign {metric} {label} n={n} d={d} k={k}",
                   status="ok" if ok else "FAILED", max_rel_regret=regret,
                   max_rel_dist_err=dist_err, label_agreement=agree)

    # grouped: 300 groups of <= 100 rows x <= 40 centroids, a few empty
    rng = np.random.default_rng(1)
    rows = rng.integers(0, 101, 300)
    ks = rng.integers(1, 41, 300)
    xo = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
    co = np.concatenate([[0], np.cumsum(ks)]).astype(np.int64)
    x = torch.randn(int(xo[-1]), d, device="cuda", generator=gen).bfloat16()
    c = torch.randn(int(co[-1]), d, device="cuda", generator=gen).bfloat16()
    lab, dist = assign_grouped(x, xo, c, co, impl="cuda")
    scores = torch.full((x.shape[0], c.shape[0]), float("inf"), dtype=torch.float64, device="cuda")
    xd, cd = x.double(), c.double()
    for g in range(300):
        a, b, p, q = int(xo[g]), int(xo[g + 1]), int(co[g]), int(co[g + 1])
        if a < b:
            xs = xd[a:b]
            scores[a:b, p:q] = (xs * xs).sum(1, keepdim=True) - 2 * xs @ cd[p:q].T + (cd[p:q] ** 2).sum(1)
    best = scores.min(1).values
    chosen = scores.gather(1, lab[:, None])[:, 0]
    scale = (xd * xd).sum(1) + (cd * cd).sum(1).max()
    regret = float(((chosen - best) / scale).max())
    agree = float((lab == scores.argmin(1)).double().mean())
    ok = regret <= 1e-4 and agree > 0.98
    report("check assign_grouped l2 bf16 300 groups d=256", status="ok" if ok else "FAILED",
           max_rel_regret=regret, label_agreement=agree)


# ------------------------------------------------------------------------ timings
def _time_plain(report, n, d, k, dtype, precision, label) -> None:
    gemm = report.context.get("bf16_gemm_tflops")
    x = torch.randn(n, d, device="cuda", dtype=dtype)
    c = torch.randn(k, d, device="cuda", dtype=dtype)
    flops = 2.0 * n * k * d
    ours_labels = _ours(x[:8192], c, precision)[0]
    ms = _events_ms(lambda: _ours(x, c, precision))
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 baseline is torch's tf32
    try:
        ref_labels = _torch_assign(x[:8192], c)
        torch_ms = _events_ms(lambda: _torch_assign(x, c))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    tflops = flops / (ms * 1e-3) / 1e12
    speedup = torch_ms / ms
    agree = float((ours_labels == ref_labels).double().mean())
    frac = tflops / gemm if gemm else float("nan")
    goal_ok = speedup >= 1.3 and (frac >= 0.7 if dtype != torch.float32 else True)
    report(f"assign l2 {label} n={n // 2**20}M d={d} k={k}", status="ok",
           ms=ms, tflops=tflops, torch_ms=torch_ms, speedup_vs_torch=speedup,
           frac_bf16_gemm=frac, label_agree_vs_torch_8k=agree,
           goal=">=1.3x torch, >=70% GEMM (bf16)" + (" MET" if goal_ok else " not met"))
    del x, c
    torch.cuda.empty_cache()


def _time_grouped(report, groups, rows, kg, d, loop_groups) -> None:
    from fastssl.kmeans import assign_grouped

    copy = report.context.get("copy_gbps")
    n, k = groups * rows, groups * kg
    xo = np.arange(groups + 1, dtype=np.int64) * rows
    co = np.arange(groups + 1, dtype=np.int64) * kg
    x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    c = torch.randn(k, d, device="cuda", dtype=torch.bfloat16)
    run = lambda: assign_grouped(x, xo, c, co, impl="cuda", check_finite=False)  # noqa: E731
    labels = run()[0]
    ms = _events_ms(run)

    csq = c.float().square().sum(1).bfloat16()

    def loop():
        out = []
        for g in range(loop_groups):
            a, b, p, q = g * rows, (g + 1) * rows, g * kg, (g + 1) * kg
            out.append(torch.addmm(csq[None, p:q], x[a:b], c[p:q].T, alpha=-2).argmin(1) + p)
        return torch.cat(out)

    loop_labels = loop()
    loop_ms = _events_ms(loop) * groups / loop_groups
    agree = float((labels[: loop_groups * rows] == loop_labels).double().mean())
    gbps = n * d * 2 / (ms * 1e-3) / 1e9
    speedup = loop_ms / ms
    report(f"assign_grouped l2 bf16 {groups}x{rows} rows x{kg} c d={d}", status="ok",
           ms=ms, x_read_gbps=gbps, frac_copy_bw=(gbps / copy if copy else float("nan")),
           tflops=2.0 * n * kg * d / (ms * 1e-3) / 1e12,
           loop_ms_extrapolated=loop_ms, speedup_vs_loop=speedup,
           label_agree_vs_loop=agree,
           goal=">=10x loop" + (" MET" if speedup >= 10 else " not met"),
           note=f"scaled from 100k groups x 3.5k rows; loop timed on {loop_groups} groups")
    del x, c
    torch.cuda.empty_cache()


def run(report) -> None:
    from fastssl import _native

    if not _native.has_cuda_ext():
        report("gpu_kmeans", status="FAILED", error="fastssl._C built without CUDA")
        return
    free = torch.cuda.mem_get_info()[0]
    steps = [
        ("correctness (medium)", lambda: _check_medium(report)),
        ("plain bf16 k=16k", lambda: _time_plain(report, 4 << 20, 1024, 16384, torch.bfloat16, None, "bf16")),
        ("plain bf16 k=100k", lambda: _time_plain(report, 4 << 20, 1024, 100_000, torch.bfloat16, None, "bf16")),
        ("plain fp32 tf32 k=16k", lambda: _time_plain(report, 1 << 20, 1024, 16384, torch.float32, "tf32", "fp32-tf32 (n scaled to 1M)")),
        ("plain fp32 3xtf32 k=16k", lambda: _time_plain(report, 1 << 20, 1024, 16384, torch.float32, "3xtf32", "fp32-3xtf32 (n scaled to 1M)")),
        ("grouped 2000x3500x35", lambda: _time_grouped(report, 2000, 3500, 35, 1024, 40)),
        ("grouped 20000x350x35", lambda: _time_grouped(report, 20000, 350, 35, 1024, 200)),
    ]
    if free < 40 * GIB:
        report("gpu_kmeans", status="note", error=f"only {free / GIB:.0f} GiB free: sizes may OOM")
    for name, step in steps:
        t0 = time.perf_counter()
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - one failure must not stop the rest
            traceback.print_exc()
            report(f"gpu_kmeans: {name}", status="FAILED", error=f"{type(exc).__name__}: {exc}"[:300])
            torch.cuda.empty_cache()
        print(f"  [{name}: {time.perf_counter() - t0:.1f} s]", flush=True)
