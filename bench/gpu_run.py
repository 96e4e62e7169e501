#!/usr/bin/env python
"""The one script a GPU session runs: one deadline, every row written as it finishes.

The device call (one; carry [".whl"]; timeout_s 560 leaves the start and the transfers
room, and a second call fits the 15 minutes only if the first stays short):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site || exit; timeout 540 python3 bench/gpu_run.py --deadline 480 2>&1 | tee $OUT/run.log

Wheels (here, in the repository root; /.whl/ is git-ignored): ``python3 bench/gpu_run.py
--wheels`` prints the download line for the packages the GPU image lacks (flash-kmeans
0.3.1 for the assignment baseline, pydicom for fastssl's imports).

Nothing is built on the device: the script imports fastssl from this source tree
(``fastssl.kernels`` = ./kernels), so the Triton kernels and the plain-PyTorch paths run;
the CUDA C++ engine (fastssl._C built with CUDA, several minutes of nvcc) is optional and
its columns read "skipped" without it. To measure it too, a session first runs
``pip install --no-build-isolation --no-deps -e . -C cmake.define.FASTSSL_CUDA=ON``.

Sections, in priority order (``--sections`` picks some, e.g. ``c,d`` for a rerun):

  0  environment, the wheels seen, the card's ceilings (bf16 GEMM 8192^3, 1 GiB copy).
  a  k-means assignment: the Triton kernel (and the CUDA engine if built) against float64
     first; then bf16 rows d=1024 k=16k (n=4M), d=1024 k=100k (n=1M), d=128 k=16k (n=4M),
     each against cuBLAS alone on the same shape, torch eager, torch.compile and
     flash-kmeans ("not importable" when its wheel is not carried)
     (bench/gpu_kmeans.py).
  b  mae_loss, gather_tokens and unshuffle: every op and gradient against float64, then
     fwd+bwd against torch.compile and the measured copy bandwidth (bench/gpu_triton.py).
  c  the paired training step at ViT-B/16 and ViT-L/16 (224 px, mask 0.75, 256 images,
     bf16): first the fastssl step's loss and every gradient against the same model in
     float64 with the plain-PyTorch ops; then 4 columns: fastssl (compiled, the default),
     plain PyTorch eager, plain PyTorch compiled, and the ratio row (images/s, MFU; goals
     >= 1.0x compiled, >= 1.5x eager); then the step improvements that exist as options
     (CUDA graphs); the others are rows that say why there is nothing to time
     (bench/gpu_pretrain.py).
  d  tuning and the rest: the assign kernel's candidate tiles (gpu_kmeans._candidates;
     rows print the TUNED entries to record), the remaining op shapes, the mask 0.93 step,
     one Lloyd iteration against flash-kmeans, and ``pytest -m gpu`` with the time left.

Rows: each is printed (flushed) and appended as one JSON line to OUT/gpu_run_rows.jsonl
(OUT = --out, else $OUT, else ./gpu_run_out), flushed and fsynced, the moment it is
measured: a call stopped at its timeout still returns every finished row. The deadline
(--deadline, default 480 s from the start) is checked before each unit; a unit that would
start too late becomes a "skipped (deadline)" row, and each unit runs under a per-unit
cap (--unit-cap, default 150 s, never past the deadline) enforced by SIGALRM: a unit
stuck inside one long C call stops at its next return to Python, and the outer
``timeout`` is the backstop. The markdown table (OUT/gpu_run.md) is written last.

``--dry-run`` runs every section on the CPU at tiny shapes (TRITON_INTERPRET=1 is set
before Triton loads; the torch baselines run on the CPU; CUDA-only engines are skipped
rows): it checks the plumbing, not speed (tests/test_gpu_run.py).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")

# Packages the GPU image lacks (its list: /work/.library/device/KINDS.md), as wheels.
WHEELS = {"flash_kmeans": "flash-kmeans==0.3.1", "pydicom": "pydicom==3.0.2"}
SECTIONS = ("0", "a", "b", "c", "d")


class UnitTimeout(BaseException):
    """Raised by SIGALRM inside a unit past its cap. A BaseException, so that the
    benchmark modules' ``except Exception`` (one failing engine must not hide the rest)
    does not swallow it."""


# ------------------------------------------------------------------------ the rows
class RowFile:
    """``report(name, **columns)``: prints the row and appends it to the JSON-lines file
    at once; ``context`` carries the deadline and the measured ceilings to the modules."""

    def __init__(self, out_dir: str, deadline_s: float):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "gpu_run_rows.jsonl")
        self.t0 = time.perf_counter()
        self.context: dict = {"deadline": self.t0 + deadline_s}
        self.section = "0"
        self.rows: list[dict] = []

    def __call__(self, name: str, **columns) -> None:
        row = {"section": self.section, "name": name,
               "t_s": round(time.perf_counter() - self.t0, 1), **columns}
        line = json.dumps(row, default=str)
        with open(self.path, "a") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.rows.append(row)
        print("row:", line, flush=True)

    def left_s(self) -> float:
        return self.context["deadline"] - time.perf_counter()


@contextlib.contextmanager
def _alarm(seconds: float):
    """UnitTimeout in the main thread after ``seconds`` (SIGALRM; no-op where absent)."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def fire(signum, frame):
        raise UnitTimeout()
    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_unit(report: RowFile, name: str, fn, cap_s: float, need_s: float = 1.0) -> None:
    """fn() under min(cap_s, time left); a "skipped" row when less than need_s is left,
    a TIMEOUT or FAILED row (with the error) when it does not finish; never raises."""
    left = report.left_s()
    if left < need_s:
        report(name, status=f"skipped (deadline: {left:.0f} s left, needs ~{need_s:.0f} s)")
        return
    limit = min(cap_s, left)
    t0 = time.perf_counter()
    print(f"--- {name} (cap {limit:.0f} s)", flush=True)
    try:
        with _alarm(limit):
            fn()
    except UnitTimeout:
        report(name, status=f"TIMEOUT after {time.perf_counter() - t0:.0f} s (cap {limit:.0f} s)")
    except Exception as exc:  # noqa: BLE001 - one unit failing must not stop the rest
        traceback.print_exc()
        report(name, status="FAILED", error=" ".join(f"{type(exc).__name__}: {exc}".split())[:300])
    try:
        _free_device_memory()
    except Exception as exc:  # noqa: BLE001 - e.g. a sticky CUDA error: say so, go on
        report(f"{name} (cleanup)", status="FAILED", error=f"{type(exc).__name__}: {exc}"[:300])
    print(f"--- {name}: {time.perf_counter() - t0:.1f} s", flush=True)


def _free_device_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _load(name: str):
    """bench/<name>.py as a module (dataclasses look their module up in sys.modules)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _use_source_tree() -> None:
    """fastssl from this checkout, fastssl.kernels = ./kernels when not installed."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    import fastssl

    if importlib.util.find_spec("fastssl.kernels") is None:
        fastssl.__path__.append(ROOT)


# ------------------------------------------------------------------- section 0
def wheels_line() -> str:
    names = " ".join(WHEELS.values())
    return ("python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 "
            "--implementation cp --platform manylinux_2_28_x86_64 --platform "
            f"manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl {names}")


def environment(report: RowFile) -> None:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError as exc:
        info["triton"] = f"missing ({exc})"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1))
    else:
        info["gpu"] = "none visible"
    from fastssl import _native

    info["fastssl_cuda_engine"] = _native.has_cuda_ext()
    report.context["device"] = info["gpu"]
    report("environment", status="ok", **info)
    missing = [spec for mod, spec in WHEELS.items() if importlib.util.find_spec(mod) is None]
    report("wheels", status="ok" if not missing else "note",
           missing=" ".join(missing) or "none", carry=wheels_line())


def ceilings(report: RowFile, dry: bool) -> None:
    """The card's measured bf16 GEMM rate and copy bandwidth (the rows' denominators)."""
    import torch

    gpu_triton = _load("gpu_triton")
    device = torch.device("cpu" if dry else "cuda")
    n = 256 if dry else 8192
    dtype = torch.float32 if dry else torch.bfloat16
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    ms = gpu_triton.median_ms(lambda: a @ b, device, 3 if dry else 10)
    tflops = 2 * n**3 / (ms * 1e-3) / 1e12
    report.context["bf16_gemm_tflops"] = tflops
    report(f"ceiling: GEMM {n}^3 {str(dtype)[6:]} (torch.matmul)", status="ok",
           ms=round(ms, 3), tflops=round(tflops, 1))
    gbps = gpu_triton.copy_bandwidth_gbps(device, (8 << 20) if dry else (1 << 30), 3 if dry else 20)
    report.context["copy_gbps"] = gbps
    report("ceiling: device copy (read + write)", status="ok", gbps=round(gbps, 1))


# ------------------------------------------------------------------- section a
def assign_check_at(report: RowFile, plan, d: int, k: int, config=None) -> None:
    """The Triton kernel at a timed row's d and k (its tile path: resident at d <= 256,
    streaming above) against float64 on a slice of rows, before that row's timing."""
    import torch

    from fastssl.assign import triton_engine as _triton_assign

    km = _load("gpu_kmeans")
    rows = plan.n16 // 2 if plan.dry else 2048  # k = 100k: a 2048 x k float64 score matrix
    gen = torch.Generator(device=plan.device).manual_seed(d * 7 + k)
    x = torch.randn(rows, d, device=plan.device, generator=gen).to(torch.bfloat16)
    c = torch.randn(k, d, device=plan.device, generator=gen).to(torch.bfloat16)
    labels, dist = _triton_assign.run("assign", x, "torch", c, "l2", True, config=config)
    regret, error, agree = km._regret_and_error(x, c, "l2", labels, dist)
    ok = regret <= 1e-4 and error <= 1e-4 and agree > 0.98
    report(f"assign check bf16 d={d} k={k} ({rows} rows vs float64)"
           + (f" config {config}" if config is not None else ""),
           status="ok" if ok else "FAILED", max_rel_regret=regret, max_rel_dist_err=error,
           label_agreement=agree)


def assign_units(report: RowFile, dry: bool):
    import torch

    km = _load("gpu_kmeans")
    plan = km.Plan.make(dry)
    if dry:
        shapes = [(plan.n16, plan.ds[-1], plan.ks[0]), (plan.n16 // 2, plan.ds[-1], plan.ks[1]),
                  (plan.n16, plan.ds[0], plan.ks[0])]
    else:
        shapes = [(4 << 20, 1024, 16384), (1 << 20, 1024, 100_000), (4 << 20, 128, 16384)]
    if dry:  # the same compiled path through Dynamo, without Inductor's C++ build here
        km._COMPILED["fn"] = torch.compile(km._addmm_argmin, dynamic=True, backend="eager")
    units = [("assign: check vs float64", functools.partial(km.check, report, plan), 2.0)]
    for n, d, k in shapes:
        units.append((f"assign check d={d} k={k}",
                      functools.partial(assign_check_at, report, plan, d, k), 2.0))
        units.append((f"assign bf16 n={n} d={d} k={k}",
                      functools.partial(km._sweep_row, report, plan, n, d, k, torch.bfloat16, None),
                      5.0))
    return units, plan


# ------------------------------------------------------------------- section b
def op_units(report: RowFile, dry: bool):
    tri = _load("gpu_triton")
    setup = tri.Setup.make(dry)
    copy_gbps = report.context.get("copy_gbps") or tri.copy_bandwidth_gbps(
        setup.device, (8 << 20) if dry else (1 << 30), 3)
    timed = tri.time_units(report, setup, copy_gbps)
    # First: the ViT-B/16 bf16 rows (the goals' shapes); the rest go to section d.
    first = [u for u in timed if ("vitb16" in u[0] or "tiny" in u[0]) and "float32" not in u[0]]
    rest = [u for u in timed if u not in first]
    return [(n, f, 1.0) for n, f in tri.check_units(report, setup)] + \
        [(n, f, 2.0) for n, f in first], [(n, f, 2.0) for n, f in rest]


# ------------------------------------------------------------------- section c
def check_step(report: RowFile, dry: bool) -> None:
    """One paired step of the fastssl model (fp32, Triton ops) against the same weights
    in float64 with the plain-PyTorch ops, the same masks: loss and every gradient."""
    import torch

    from fastssl.models.mvmae import MultiViewMAE, model_config

    device = torch.device("cpu" if dry else "cuda")
    torch.manual_seed(0)
    fast = MultiViewMAE(model_config("test"), impl="triton").to(device)
    slow = copy.deepcopy(fast).double()
    slow.impl = "torch"
    x = torch.randn(8, 1, 32, 32, device=device)
    results = []
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # the patch embedding's conv: fp32, not tf32
    try:
        for model, images in ((fast, x), (slow, x.double())):
            gen = torch.Generator(device=device).manual_seed(3)
            out = model(images[:4], images[4:], mask_ratio=0.75, beta=0.5, generator=gen)
            out["loss"].backward()
            results.append((out["loss"].detach(), [p.grad for p in model.parameters()]))
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    (loss, grads), (loss64, grads64) = results
    loss_err = abs(loss.double().item() - loss64.item()) / abs(loss64.item())
    # Per parameter, relative to its own norm floored at 1e-4 of the largest: some true
    # gradients are 0 (a bias of qk_norm's keys cancels in the softmax), fp32 gives ~1e-9.
    floor = 1e-4 * max(w.norm().item() for w in grads64)
    grad_err = max((g.double() - w).norm().item() / max(w.norm().item(), floor)
                   for g, w in zip(grads, grads64))
    ok = loss_err <= 1e-4 and grad_err <= 1e-3
    report("step check: fastssl (Triton ops, fp32) vs plain PyTorch float64", status="ok" if ok
           else "FAILED", loss_rel_err=f"{loss_err:.1e}", max_grad_rel_err=f"{grad_err:.1e}",
           tol="1e-4 loss, 1e-3 grad (fp32 sums)")


STEP_COLUMNS = ("fastssl", "ref_eager", "ref_compile")
STEP_NOT_TIMED = {
    "fused decoder head": "no fused decoder head exists in fastssl yet: nothing to time",
    "both views in one encoder call": "already the default: forward_studies encodes the "
                                      "B x V images of a paired batch in one call",
}


def step_column(report: RowFile, results: dict, cell, column: str, dry: bool) -> None:
    import torch

    gp = _load("gpu_pretrain")
    device = torch.device("cpu" if dry else "cuda")
    images = 4 if dry else 256
    r = gp.time_column(cell, column, device, images, 2 if dry else 10,
                       "eager" if dry else None)
    gemm = report.context.get("bf16_gemm_tflops", float("nan"))  # section 0 measures it
    r["mfu"] = r["flops"] * r["images_per_s"] / images / (gemm * 1e12)
    results[(cell.name, column)] = r
    report(f"step {cell.name} {column}", status="ok", images_per_s=r["images_per_s"],
           step_ms=round(r["step_ms"], 2), first_step_s=round(r["first_step_s"], 1),
           mfu=round(r["mfu"], 4), peak_gib=round(r["peak_gib"], 2))


def step_ratio(report: RowFile, results: dict, cell) -> None:
    """The fourth column: fastssl over the plain-PyTorch columns, and the goals."""
    got = {c: results.get((cell.name, c)) for c in STEP_COLUMNS}
    missing = [c for c, r in got.items() if r is None]
    if missing:
        report(f"step {cell.name} ratio", status=f"skipped (no {', '.join(missing)} row)")
        return
    fast = got["fastssl"]["images_per_s"]
    x_comp = fast / got["ref_compile"]["images_per_s"]
    x_eager = fast / got["ref_eager"]["images_per_s"]
    report(f"step {cell.name} ratio", status="ok", x_vs_compiled=x_comp,
           x_vs_eager=x_eager, fastssl_mfu=round(got["fastssl"]["mfu"], 4),
           goal=f">=1.0x compiled: {'met' if x_comp >= 1.0 else 'not met'}; "
                f">=1.5x eager: {'met' if x_eager >= 1.5 else 'not met'}")


def step_units(report: RowFile, dry: bool, results: dict, mask_ratio: float, models):
    gp = _load("gpu_pretrain")
    units = []
    for model in models:
        cell = gp.Cell(model, mask_ratio, "paired")
        for column in STEP_COLUMNS:
            units.append((f"step {cell.name} {column}",
                          functools.partial(step_column, report, results, cell, column, dry),
                          2.0 if column == "ref_eager" else 20.0))
        units.append((f"step {cell.name} ratio", functools.partial(step_ratio, report, results,
                                                                   cell), 0.0))
    return units


def step_candidates(report: RowFile, dry: bool, results: dict, model: str):
    gp = _load("gpu_pretrain")
    cell = gp.Cell(model, 0.75, "paired")

    def cudagraphs():
        if dry:
            report(f"step {cell.name} {gp.CUDAGRAPHS}", status="skipped (needs CUDA)")
            return
        step_column(report, results, cell, gp.CUDAGRAPHS, dry)
        base = results.get((cell.name, "fastssl"))
        if base:
            report(f"step {cell.name} CUDA graphs vs fastssl", status="ok",
                   x_vs_fastssl=round(results[(cell.name, gp.CUDAGRAPHS)]["images_per_s"]
                                      / base["images_per_s"], 3))

    def not_timed():
        for what, why in STEP_NOT_TIMED.items():
            report(f"step candidate: {what}", status="not timed", why=why)
    return [(f"step {cell.name} candidate: CUDA graphs", cudagraphs, 20.0),
            ("step candidates without a path", not_timed, 0.0)]


# ------------------------------------------------------------------- section d
def pytest_gpu(report: RowFile) -> None:
    # In a child that maps fastssl.kernels to ./kernels first, as this process does: the
    # source tree is not installed on the device.
    args = ["-m", "gpu", "-q", "-p", "no:cacheprovider", "--no-header", "-rfE", "tests/"]
    code_line = (f"import sys; sys.path.insert(0, {ROOT!r}); import fastssl, importlib.util; "
                 "importlib.util.find_spec('fastssl.kernels') or fastssl.__path__.append("
                 f"{ROOT!r}); import pytest; sys.exit(pytest.main({args!r}))")
    cmd = [sys.executable, "-c", code_line]
    left = max(report.left_s() - 5, 1)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=left)
        out, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        raw = exc.stdout or ""
        out, code = (raw.decode(errors="replace") if isinstance(raw, bytes) else raw), "timeout"
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    report("pytest -m gpu tests/", status="ok" if code == 0 else "FAILED",
           summary=(lines[-1] if lines else "(no output)")[:200],
           first_failure=(failed[0][:200] if failed else ""))


def late_units(report: RowFile, dry: bool, plan, results: dict, rest_ops):
    import torch

    km = _load("gpu_kmeans")
    chosen: dict = {}

    def check_tuned():
        for (dtype, d), config in chosen.items():
            if dtype == torch.bfloat16:  # the fp32 winners: covered by km.check's tf32 rows
                assign_check_at(report, plan, d, 16384, config)

    units = [("assign tuning (gpu_kmeans._candidates)",
              functools.partial(km.tune, report, plan, chosen), 10.0),
             ("assign check of the tuned configs", check_tuned, 2.0)]
    units += rest_ops
    if dry:  # the mask 0.93 cell's code is section c's: one cheap column exercises it
        gp = _load("gpu_pretrain")
        cell = gp.Cell("test", 0.93, "paired")
        units.append((f"step {cell.name} ref_eager",
                      functools.partial(step_column, report, results, cell, "ref_eager", dry), 2.0))
    else:
        units += step_units(report, dry, results, 0.93, ["vitb16"])
    units.append(("lloyd iteration vs flash-kmeans", functools.partial(km.lloyd, report, plan), 5.0))
    if not dry:
        units.append(("pytest -m gpu", functools.partial(pytest_gpu, report), 20.0))
    return units


# ------------------------------------------------------------------------ driver
def build_plan(report: RowFile, dry: bool, sections: set) -> list:
    """(section, name, fn, need_s) in priority order. need_s: the least time left at which
    the unit is worth starting."""
    plan = [("0", "environment", functools.partial(environment, report), 0.0),
            ("0", "ceilings", functools.partial(ceilings, report, dry), 2.0)]
    assign, km_plan = assign_units(report, dry)
    plan += [("a", n, f, s) for n, f, s in assign]
    ops_first, ops_rest = op_units(report, dry)
    plan += [("b", n, f, s) for n, f, s in ops_first]
    results: dict = {}
    models = ["test"] if dry else ["vitb16", "vitl16"]
    plan.append(("c", "step check vs float64", functools.partial(check_step, report, dry), 2.0))
    plan += [("c", n, f, s) for n, f, s in step_units(report, dry, results, 0.75, models)]
    plan += [("c", n, f, s) for n, f, s in step_candidates(report, dry, results, models[0])]
    plan += [("d", n, f, s) for n, f, s in late_units(report, dry, km_plan, results, ops_rest)]
    return [u for u in plan if u[0] in sections]


def table(rows: list[dict]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]

    def cell(v) -> str:
        v = f"{v:.4g}" if isinstance(v, float) else v
        return str(v).replace("|", "/").replace("\n", " ")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--deadline", type=float, default=480.0,
                    help="seconds from the start after which no unit starts or runs on "
                         "(default 480: a 540 s device call keeps a minute for the table)")
    ap.add_argument("--unit-cap", type=float, default=150.0,
                    help="seconds one unit may run before it is stopped (default 150)")
    ap.add_argument("--out", default=None,
                    help="folder for gpu_run_rows.jsonl and gpu_run.md (default $OUT, else "
                         "./gpu_run_out)")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help="comma-separated sections to run, of 0,a,b,c,d (default all; 0 "
                         "measures the ceilings the others divide by)")
    ap.add_argument("--dry-run", action="store_true",
                    help="every section on the CPU at tiny shapes, Triton interpreted: "
                         "checks the script, not the GPU")
    ap.add_argument("--wheels", action="store_true",
                    help="print the wheels to carry and their download line, then exit")
    args = ap.parse_args(argv)
    bad = set(args.sections.split(",")) - set(SECTIONS)
    if bad:
        ap.error(f"--sections: unknown {sorted(bad)}; expected some of {','.join(SECTIONS)}")
    if args.deadline <= 0 or args.unit_cap <= 0:
        ap.error("--deadline and --unit-cap must be > 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.wheels:
        print("carry (.whl, git-ignored):", " ".join(WHEELS.values()))
        print(wheels_line())
        return 0
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports Triton
    out_dir = args.out or os.environ.get("OUT") or os.path.join(ROOT, "gpu_run_out")
    report = RowFile(out_dir, args.deadline)
    _use_source_tree()
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        report("gpu_run", status="FAILED", error="no CUDA device (use --dry-run on a CPU)")
        return 1
    sections = set(args.sections.split(","))
    for section, name, fn, need_s in build_plan(report, args.dry_run, sections):
        report.section = section
        run_unit(report, name, fn, args.unit_cap, need_s)
    report.section = "end"
    report("total", status="ok", seconds=round(time.perf_counter() - report.t0, 1))
    text = table(report.rows)
    print("\n" + text, flush=True)
    with open(os.path.join(out_dir, "gpu_run.md"), "w") as handle:
        handle.write(f"# gpu_run {time.strftime('%Y-%m-%d %H:%M:%S')} "
                     f"{report.context.get('device', '')}\n\n{text}\n")
    return 0 if all(r.get("status") != "FAILED" for r in report.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
