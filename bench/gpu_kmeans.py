"""GPU k-means assignment: correctness once, then every engine side by side, in hardware units.

bench/gpu_run.py runs its pieces (``check``, ``_sweep_row``, ``tune``, ``lloyd``) one by
one under its deadline; ``run(report)`` runs them all, alone. ``report.context`` carries
the measured bf16 GEMM rate, the copy bandwidth and the run's deadline (steps that would
start after it are reported as skipped, so the whole check stays inside its budget).

Steps, in priority order:
  check    the CUDA engine and the Triton kernel vs float64 (20k x 256 x 1000, every
           dtype, l2 and ip).
  tune     the Triton kernel's candidate tiles at n = 1M, k = 16k (bf16 at d = 128 and
           1024, fp32-tf32 at d = 1024); prints the kernels/assign.py TUNED entries to
           record, and the sweep below uses the winners (its rows say so).
  sweep    n = 4M, d in {128, 256, 1024}, k in {16k, 100k}, bf16; fp32 (to fit the
           budget) n = 1M, d in {128, 1024}, k = 16k:
             triton      fastssl's fused Triton kernel (fp32: tf32 products)
             cuda        fastssl's CUDA C++ engine (fp32: tf32)
             torch       chunked torch.addmm(||c||^2 as a 1-D bias, x, c^T, alpha=-2)
                         + argmin, scores <= 2 GiB per chunk (fp32: tf32 GEMM)
             compiled    the same chunk function through torch.compile(dynamic=True)
             flash       flash-kmeans 0.3.1 euclid_assign_triton (||x||^2 precomputed
                         outside the timing, as its own Lloyd loop does)
             cublas      torch.mm of the same chunks into one reused buffer: the GEMM
                         alone at this shape, the ceiling
           Per row: ms, TFLOP/s, fraction of same-shape cuBLAS, ratio of triton to each
           baseline, peak memory above the inputs, label agreement with triton.
  lloyd    one Lloyd iteration (assign + index_add_ update into fp32 / fp64 sums) at
           n = 4M, k = 16k, d in {128, 1024}, bf16, vs flash-kmeans batch_kmeans_Euclid
           (max_iters=1, same initial centroids).
  grouped  the CUDA engine's grouped path vs a Python loop (goal >= 10x, unchanged).
Goals (issue 9): triton >= 70% of same-shape cuBLAS at d = 1024, k = 16k bf16 (>= 60% at
k = 100k); >= 1.0x compiled torch at d = 1024, >= 1.3x at d <= 256; >= 1.0x flash-kmeans.

flash-kmeans is not on the GPU image: carry it as a wheel (pure Python, 42 KB; its
needs torch, triton, numpy and tqdm are there). Here, in the repository root:
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 -d .whl flash-kmeans==0.3.1
(/.whl/ is git-ignored), then run with carry [".whl"] and a command starting
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH || exit;

``run(report, dry_run=True)`` (and ``python bench/gpu_run.py --dry-run``) runs the same
code on the CPU at tiny shapes: the Triton kernel under TRITON_INTERPRET=1, the torch
baselines on the CPU; engines that need CUDA are reported as skipped.
"""
from __future__ import annotations

import statistics
import time
import traceback
from dataclasses import dataclass

import numpy as np
import torch

GIB = 2**30
SCORE_CHUNK_BYTES = 2 * GIB  # the torch baselines' (chunk, k) score matrix


@dataclass
class Plan:
    """Sizes and device of one run (full on the GPU, tiny on the CPU for --dry-run)."""

    device: torch.device
    dry: bool
    n16: int  # rows for 16-bit inputs
    n32: int  # rows for fp32 inputs
    ds: tuple
    ks: tuple
    ds32: tuple  # fp32 rows: fewer, to fit the check's budget
    ks32: tuple
    tune_n: int
    lloyd_ds: tuple
    reps: int

    @staticmethod
    def make(dry_run: bool) -> "Plan":
        if dry_run:
            return Plan(torch.device("cpu"), True, 300, 200, (16, 40), (37, 70), (40,), (37,),
                        200, (40,), 2)
        return Plan(torch.device("cuda"), False, 4 << 20, 1 << 20, (128, 256, 1024),
                    (16384, 100_000), (128, 1024), (16384,), 1 << 20, (128, 1024), 2)


# ------------------------------------------------------------------------- timing
def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn, device, reps: int, budget_s: float = 6.0, warm: bool = False) -> float:
    """Median ms of fn() after one warm-up unless ``warm`` (CUDA events on a GPU); fewer
    reps when the first ones took longer than budget_s."""
    if not warm:
        fn()
    _sync(device)
    times, stop_at = [], time.perf_counter() + budget_s
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() > stop_at:
            break
    return statistics.median(times)


def _with_peak(fn, device):
    """(fn(), GiB of device memory it allocated at its peak above what was allocated)."""
    if device.type != "cuda":
        return fn(), "-"
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    _sync(device)
    return out, round((torch.cuda.max_memory_allocated(device) - base) / GIB, 3)


def _out_of_time(report, name: str) -> bool:
    deadline = getattr(report, "context", {}).get("deadline")
    if deadline is not None and time.perf_counter() > deadline:
        report(name, status="skipped (deadline of bench/gpu_run.py passed)")
        return True
    return False


# ------------------------------------------------------------------------ engines
def _rows_per_chunk(k: int, itemsize: int, n: int) -> int:
    """Largest power of two with a (rows, k) score matrix <= SCORE_CHUNK_BYTES (a power
    of two divides n = 2^m, so every chunk has one shape and compiles once)."""
    rows = 1 << int(np.log2(max(1, SCORE_CHUNK_BYTES // (k * itemsize))))
    return max(1, min(rows, n))


def _addmm_argmin(xc, ct, c_sq):
    return torch.addmm(c_sq, xc, ct, alpha=-2).argmin(1)


_COMPILED = {}


def _compiled_chunk_fn():
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(_addmm_argmin, dynamic=True)
    return _COMPILED["fn"]


def torch_assign(x, c, chunk_fn=_addmm_argmin):
    """The honest baseline: addmm with ||c||^2 as a 1-D bias (fused into the GEMM's
    epilogue by cuBLAS) + argmin, in chunks; labels (n,) int64."""
    c_sq = c.float().square().sum(1).to(x.dtype)
    ct = c.T
    labels = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    rows = _rows_per_chunk(c.shape[0], x.element_size(), x.shape[0])
    for s in range(0, x.shape[0], rows):
        labels[s : s + rows] = chunk_fn(x[s : s + rows], ct, c_sq)
    return labels


def cublas_alone(x, c, buf):
    """The GEMM of torch_assign's chunks alone, into one reused buffer."""
    rows = buf.shape[0]
    ct = c.T
    for s in range(0, x.shape[0] - rows + 1, rows):
        torch.mm(x[s : s + rows], ct, out=buf)
    return buf


def triton_assign(x, c, precision="tf32", config=None):
    from fastssl.assign import triton_engine as _triton_assign

    return _triton_assign.run("assign", x, "torch", c, "l2", False, precision=precision,
                              config=config)[0]


def cuda_assign(x, c, precision="tf32"):
    from fastssl.assign import cuda_engine as _cuda_assign

    return _cuda_assign.run("assign", x, "torch", c, "l2", False, None, precision=precision)[0]


def flash_assign_fn(x, c):
    """flash-kmeans' assignment as a closure with ||x||^2 computed once outside it, or
    the reason it cannot run."""
    if x.device.type != "cuda":
        return "needs CUDA (flash-kmeans asserts CUDA tensors)"
    try:
        from flash_kmeans.assign_euclid_triton import euclid_assign_triton
    except Exception as exc:  # noqa: BLE001
        return f"flash-kmeans not importable ({type(exc).__name__}); carry the wheel"
    xb, cb = x[None], c[None]
    x_sq = torch.empty((1, x.shape[0]), dtype=torch.float32, device=x.device)
    for s in range(0, x.shape[0], 1 << 20):
        x_sq[0, s : s + (1 << 20)] = x[s : s + (1 << 20)].float().square().sum(1)
    return lambda: euclid_assign_triton(xb, cb, x_sq, use_heuristic=True)[0]


# -------------------------------------------------------------------- correctness
CHECK_CASES = [("bf16", torch.bfloat16, "tf32", 1e-4), ("fp16", torch.float16, "tf32", 1e-4),
               ("fp32-3xtf32", torch.float32, "3xtf32", 1e-4),
               ("fp32-tf32", torch.float32, "tf32", 5e-3)]


def _regret_and_error(x, c, metric, labels, distances):
    """Max regret and distance error relative to the row's score scale, float64."""
    xd, cd = x.double(), c.to(x.dtype).double()
    dots = xd @ cd.T
    if metric == "l2":
        xsq = (xd * xd).sum(1, keepdim=True)
        scores, scale = xsq - 2 * dots + (cd * cd).sum(1), xsq[:, 0] + (cd * cd).sum(1).max()
        want = scores.min(1).values.clamp_min(0)
    else:
        scores, scale = -dots, xd.norm(dim=1) * cd.norm(dim=1).max()
        want = dots.max(1).values
    best = scores.min(1).values
    regret = ((scores.gather(1, labels[:, None])[:, 0] - best) / scale).max().item()
    error = ((distances.double() - want).abs() / scale).max().item()
    agree = (labels == scores.argmin(1)).double().mean().item()
    return regret, error, agree


def check(report, plan: Plan) -> None:
    """Both device engines (or, in a dry run, the interpreted kernel) vs float64."""
    from fastssl import _native
    from fastssl.assign import cuda_engine as _cuda_assign
    from fastssl.assign import triton_engine as _triton_assign

    gen = torch.Generator(device=plan.device).manual_seed(0)
    n, d, k = (20000, 256, 1000) if not plan.dry else (150, 40, 70)
    x32 = torch.randn(n, d, device=plan.device, generator=gen)
    c32 = torch.randn(k, d, device=plan.device, generator=gen)
    engines = {"triton": lambda x, c, m, p: _triton_assign.run("assign", x, "torch", c, m, True,
                                                               precision=p)}
    if not plan.dry and _native.has_cuda_ext():
        engines["cuda"] = lambda x, c, m, p: _cuda_assign.run("assign", x, "torch", c, m, True,
                                                              None, precision=p)
    for name, engine in engines.items():
        for metric in ("l2", "ip"):
            for label, dtype, precision, limit in CHECK_CASES:
                x, c = x32.to(dtype), c32.to(dtype)
                labels, dist = engine(x, c, metric, precision)
                regret, error, agree = _regret_and_error(x, c, metric, labels, dist)
                ok = regret <= limit and error <= limit and agree > 0.98
                report(f"check {name} {metric} {label} n={n} d={d} k={k}",
                       status="ok" if ok else "FAILED", max_rel_regret=regret,
                       max_rel_dist_err=error, label_agreement=agree)


# --------------------------------------------------------------------------- tune
def _candidates(dtype, d: int):
    """Streaming tiles (block_k deep steps) and, for d <= 256, resident ones (the x tile
    loaded once; block_k = the padded row). All compile for sm_90a within its 227 KiB.

    The "two_per_sm" ones (two persistent programs per SM: one's argmin fold runs under
    the other's MMA) are sized so that two fit an SM's 64k registers and 228 KiB of
    shared memory; tests/test_kmeans_triton.py compiles them for sm_90a and checks it."""
    from fastssl.kernels.assign import AssignConfig

    if dtype == torch.float32:
        shapes = [(128, 128, 32, 8, 3), (128, 128, 32, 4, 4), (64, 128, 32, 4, 4)]
        two = [(128, 64, 32, 4, 3)]
    else:
        shapes = [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 4, 4),
                  (256, 128, 64, 8, 3)]
        two = [(128, 128, 64, 8, 3), (128, 128, 64, 4, 3)]
    configs = [AssignConfig(*s, measured=True) for s in shapes]
    configs += [AssignConfig(*s, measured=True, schedule="two_per_sm") for s in two]
    if d <= 256:
        configs += [AssignConfig(128, n, 0, w, st, measured=True, resident=True)
                    for n, w, st in ((128, 8, 3), (128, 4, 4), (256, 8, 2))]
    if d <= 256 and dtype != torch.float32:  # an fp32 x tile and two stages fill an SM
        m, n = (128, 128) if d <= 128 else (64, 64)
        configs.append(AssignConfig(m, n, 0, 4, 2, measured=True, resident=True,
                                    schedule="two_per_sm"))
    return configs


def tune(report, plan: Plan, chosen: dict) -> None:
    """Time each candidate config at n = tune_n, k = 16k; chosen[(dtype, d)] = winner."""
    from fastssl.kernels import assign as kernel

    if plan.dry:
        report("tune", status="skipped (dry run: the interpreter's timings mean nothing)")
        return
    major = torch.cuda.get_device_capability(plan.device)[0]
    for dtype, d in ((torch.bfloat16, 128), (torch.bfloat16, 1024), (torch.float32, 1024)):
        if _out_of_time(report, f"tune {dtype} d={d}"):
            return
        x = torch.randn(plan.tune_n, d, device=plan.device, dtype=dtype)
        c = torch.randn(16384, d, device=plan.device, dtype=dtype)
        flops = 2.0 * x.shape[0] * c.shape[0] * d
        results = []
        for cfg in _candidates(dtype, d):
            try:
                ms = _time_ms(lambda: triton_assign(x, c, config=cfg), plan.device, plan.reps)
                results.append((ms, cfg))
            except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory
                report(f"tune {str(dtype)[6:]} d={d} {cfg}", status="FAILED",
                       error=f"{type(exc).__name__}: {exc}"[:200])
        if not results:
            continue
        ms, best = min(results, key=lambda r: r[0])
        chosen[(dtype, d)] = best
        bucket = next(b for b in kernel.D_BUCKETS if d <= b)
        report(f"tune {str(dtype)[6:]} d={d} n={plan.tune_n} k=16384", status="ok",
               ms=ms, tflops=flops / (ms * 1e-3) / 1e12,
               all_ms=" ".join(f"{c.block_m}x{c.block_n}x{'row' if c.resident else c.block_k}"
                               f"/w{c.num_warps}/s{c.num_stages}"
                               f"{'/2sm' if c.schedule == 'two_per_sm' else ''}={t:.2f}"
                               for t, c in results),
               record=f"TUNED[({major}, {str(dtype)[6:]!r}, {bucket})] = {best}")
        del x, c
        torch.cuda.empty_cache()


# -------------------------------------------------------------------------- sweep
def _engines(plan: Plan, x, c, config):
    """name -> zero-argument callable returning labels, or a string: why it cannot run."""
    from fastssl import _native

    engines = {"triton": lambda: triton_assign(x, c, config=config)}
    if plan.dry or not _native.has_cuda_ext():
        engines["cuda"] = "needs CUDA and fastssl._C built with it"
    else:
        engines["cuda"] = lambda: cuda_assign(x, c)
    engines["torch"] = lambda: torch_assign(x, c)
    compiled = _compiled_chunk_fn()
    engines["compiled"] = lambda: torch_assign(x, c, compiled)
    engines["flash"] = flash_assign_fn(x, c)
    return engines


def _goal(d: int, k: int, dtype, frac: float, ratios: dict) -> str:
    """The issue's goals that apply to this row, each with met / not met."""
    parts = []
    if dtype == torch.bfloat16 and d == 1024:
        need = 0.7 if k <= 16384 else 0.6
        parts.append(f">={need:.0%} cuBLAS: " + ("met" if frac >= need else "not met"))
    need = 1.0 if d >= 1024 else 1.3
    if "compiled" in ratios:
        parts.append(f">={need}x compiled: " + ("met" if ratios["compiled"] >= need else "not met"))
    if "flash" in ratios:
        parts.append(">=1.0x flash: " + ("met" if ratios["flash"] >= 1.0 else "not met"))
    return "; ".join(parts)


def _sweep_row(report, plan: Plan, n: int, d: int, k: int, dtype, config) -> None:
    gen = torch.Generator(device=plan.device).manual_seed(d + k)
    x = torch.randn(n, d, device=plan.device, generator=gen, dtype=torch.float32).to(dtype)
    c = torch.randn(k, d, device=plan.device, generator=gen, dtype=torch.float32).to(dtype)
    flops = 2.0 * n * k * d
    rows = _rows_per_chunk(k, x.element_size(), n)
    buf = torch.empty(rows, k, device=plan.device, dtype=dtype)
    gemm_ms = _time_ms(lambda: cublas_alone(x, c, buf), plan.device, plan.reps)
    gemm_tflops = flops * (n // rows * rows) / n / (gemm_ms * 1e-3) / 1e12
    del buf
    ms, cols, mine = {}, {}, None
    for name, fn in _engines(plan, x, c, config).items():
        if isinstance(fn, str):
            cols[f"{name}_ms"] = f"skipped: {fn}"
            continue
        try:
            labels, cols[f"{name}_peak_gib"] = _with_peak(fn, plan.device)  # + warm-up
            mine = labels if name == "triton" else mine
            agree = None if mine is None else (
                labels[:65536].long() == mine[:65536]).double().mean().item()
            ms[name] = _time_ms(fn, plan.device, plan.reps, warm=True)
            cols[f"{name}_ms"] = round(ms[name], 3)
            if name != "triton":
                cols[f"{name}_agree"] = round(agree, 5) if agree is not None else "-"
            del labels
        except Exception as exc:  # noqa: BLE001 - one engine failing must not hide the rest
            traceback.print_exc()
            cols[f"{name}_ms"] = f"FAILED {type(exc).__name__}: {exc}"[:160]
    tri = ms.get("triton")
    tflops = flops / (tri * 1e-3) / 1e12 if tri else float("nan")
    frac = tflops / gemm_tflops if tri else float("nan")
    ratios = {name: t / tri for name, t in ms.items() if name != "triton" and tri}
    label = str(dtype)[6:] + ("-tf32" if dtype == torch.float32 else "")
    report(f"sweep {label} n={n} d={d} k={k}", status="ok" if tri else "FAILED",
           triton_tflops=round(tflops, 1), cublas_ms=round(gemm_ms, 3),
           cublas_tflops=round(gemm_tflops, 1), frac_cublas=round(frac, 3),
           **{f"x_vs_{name}": round(r, 3) for name, r in ratios.items()}, **cols,
           config=("tuned now" if config and config.measured else "recorded table"),
           goal="(dry run)" if plan.dry else _goal(d, k, dtype, frac, ratios))
    del x, c, mine
    if plan.device.type == "cuda":
        torch.cuda.empty_cache()


def sweep(report, plan: Plan, chosen: dict) -> None:
    tf32 = torch.backends.cuda.matmul.allow_tf32
    for dtype in (torch.bfloat16, torch.float32):
        n = plan.n16 if dtype != torch.float32 else plan.n32
        torch.backends.cuda.matmul.allow_tf32 = dtype == torch.float32  # torch fp32 = tf32
        try:
            ds, ks = (plan.ds, plan.ks) if dtype != torch.float32 else (plan.ds32, plan.ks32)
            for d in sorted(ds, key=lambda v: v != 1024):  # the goal rows first
                for k in ks:
                    if _out_of_time(report, f"sweep {str(dtype)[6:]} d={d} k={k}"):
                        return
                    _step(report, f"sweep {str(dtype)[6:]} d={d} k={k}", _sweep_row, report,
                          plan, n, d, k, dtype, chosen.get((dtype, d)))
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32


# -------------------------------------------------------------------------- Lloyd
def lloyd_step(x, c, acc_dtype, assign_fn):
    """One Lloyd iteration on the device: labels, then sums and counts by index_add_ in
    acc_dtype (float32 or float64), new centroids (empty clusters keep theirs)."""
    labels = assign_fn(x, c)
    sums = torch.zeros(c.shape, dtype=acc_dtype, device=x.device)
    slab = 1 << 15  # rows converted to acc_dtype at a time: bounds the temporary
    for s in range(0, x.shape[0], slab):
        sums.index_add_(0, labels[s : s + slab], x[s : s + slab].to(acc_dtype))
    counts = torch.bincount(labels, minlength=c.shape[0])
    filled = counts > 0
    new = c.to(acc_dtype).clone()
    new[filled] = sums[filled] / counts[filled, None].to(acc_dtype)
    return new.to(c.dtype), labels


def _flash_lloyd_fn(x, c):
    if x.device.type != "cuda":
        return "needs CUDA"
    try:
        from flash_kmeans import batch_kmeans_Euclid
    except Exception as exc:  # noqa: BLE001
        return f"flash-kmeans not importable ({type(exc).__name__}); carry the wheel"
    return lambda: batch_kmeans_Euclid(x[None], c.shape[0], max_iters=1, tol=-1.0,
                                       init_centroids=c[None].clone())


def _lloyd_row(report, plan: Plan, n: int, d: int, k: int) -> None:
    gen = torch.Generator(device=plan.device).manual_seed(7)
    x = torch.randn(n, d, device=plan.device, generator=gen).to(torch.bfloat16)
    c = x[torch.randperm(n, device=plan.device, generator=gen)[:k]].clone()
    cols, ms = {}, {}
    runs = {"triton_fp32": lambda: lloyd_step(x, c, torch.float32, triton_assign),
            "triton_fp64": lambda: lloyd_step(x, c, torch.float64, triton_assign),
            "flash": _flash_lloyd_fn(x, c)}
    for name, fn in runs.items():
        if isinstance(fn, str):
            cols[f"{name}_ms"] = f"skipped: {fn}"
            continue
        try:
            cols[f"{name}_peak_gib"] = _with_peak(fn, plan.device)[1]  # + warm-up
            ms[name] = _time_ms(fn, plan.device, plan.reps, warm=True)
            cols[f"{name}_ms"] = round(ms[name], 3)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            cols[f"{name}_ms"] = f"FAILED {type(exc).__name__}: {exc}"[:160]
    ratio = ms["flash"] / ms["triton_fp32"] if "flash" in ms and "triton_fp32" in ms else "-"
    report(f"lloyd iteration bf16 n={n} d={d} k={k}", status="ok" if ms else "FAILED",
           x_fp32_vs_flash=ratio if isinstance(ratio, str) else round(ratio, 3), **cols,
           goal="" if isinstance(ratio, str) else
           f">=1.0x flash: {'met' if ratio >= 1 else 'not met'}")
    del x, c


def lloyd(report, plan: Plan) -> None:
    k = 16384 if not plan.dry else plan.ks[0]
    for d in plan.lloyd_ds:
        if _out_of_time(report, f"lloyd d={d}"):
            return
        _step(report, f"lloyd d={d}", _lloyd_row, report, plan, plan.n16, d, k)


# ------------------------------------------------------------------------ grouped
def _time_grouped(report, plan: Plan, groups, rows, kg, d, loop_groups) -> None:
    """The CUDA engine's grouped path vs a Python loop over groups (extrapolated)."""
    from fastssl.assign import assign_grouped

    n, k = groups * rows, groups * kg
    xo = np.arange(groups + 1, dtype=np.int64) * rows
    co = np.arange(groups + 1, dtype=np.int64) * kg
    x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    c = torch.randn(k, d, device="cuda", dtype=torch.bfloat16)
    run = lambda: assign_grouped(x, xo, c, co, impl="cuda", check_finite=False)  # noqa: E731
    labels = run()[0]
    ms = _time_ms(run, plan.device, plan.reps)
    csq = c.float().square().sum(1).bfloat16()

    def loop():
        out = []
        for g in range(loop_groups):
            a, b, p, q = g * rows, (g + 1) * rows, g * kg, (g + 1) * kg
            out.append(torch.addmm(csq[p:q], x[a:b], c[p:q].T, alpha=-2).argmin(1) + p)
        return torch.cat(out)

    agree = (labels[: loop_groups * rows] == loop()).double().mean().item()
    loop_ms = _time_ms(loop, plan.device, plan.reps) * groups / loop_groups
    copy = getattr(report, "context", {}).get("copy_gbps")
    gbps = n * d * 2 / (ms * 1e-3) / 1e9
    report(f"assign_grouped l2 bf16 {groups}x{rows} rows x{kg} c d={d}", status="ok",
           ms=ms, x_read_gbps=gbps, frac_copy_bw=(gbps / copy if copy else "-"),
           loop_ms_extrapolated=loop_ms, speedup_vs_loop=loop_ms / ms,
           label_agree_vs_loop=agree,
           goal=">=10x loop: " + ("met" if loop_ms / ms >= 10 else "not met"),
           note=f"loop timed on {loop_groups} groups and extrapolated")
    del x, c
    torch.cuda.empty_cache()


def grouped(report, plan: Plan) -> None:
    from fastssl import _native

    if plan.dry or not _native.has_cuda_ext():
        report("assign_grouped (cuda engine)", status="skipped: needs CUDA and fastssl._C with it")
        return
    for groups, rows, kg, loop_groups in ((2000, 3500, 35, 40), (20000, 350, 35, 200)):
        if _out_of_time(report, f"grouped {groups}x{rows}"):
            return
        _step(report, f"grouped {groups}x{rows}", _time_grouped, report, plan, groups, rows,
              kg, 1024, loop_groups)


# ---------------------------------------------------------------------------- run
def _step(report, name: str, fn, *args) -> None:
    t0 = time.perf_counter()
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - one failure must not stop the rest
        traceback.print_exc()
        report(f"gpu_kmeans: {name}", status="FAILED", error=f"{type(exc).__name__}: {exc}"[:300])
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(f"  [{name}: {time.perf_counter() - t0:.1f} s]", flush=True)


def run(report, *, dry_run: bool = False) -> None:
    if not dry_run and not torch.cuda.is_available():
        report("gpu_kmeans", status="FAILED", error="no CUDA device (use --dry-run on a CPU)")
        return
    plan = Plan.make(dry_run)
    if dry_run:
        report("gpu_kmeans", status="note", note="dry run on the CPU: Triton interpreted, "
               "torch baselines on the CPU, CUDA-only engines skipped; timings mean nothing")
    chosen: dict = {}
    _step(report, "check", check, report, plan)
    _step(report, "tune", tune, report, plan, chosen)
    _step(report, "sweep", sweep, report, plan, chosen)
    _step(report, "lloyd", lloyd, report, plan)
    _step(report, "grouped", grouped, report, plan)
