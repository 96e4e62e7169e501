#!/usr/bin/env python
"""The one script a GPU session runs: build with CUDA, verify, time, print one table.

    python bench/gpu_check.py [--no-build] [--skip-tests] [--skip-bench] [--budget-s S]
    python bench/gpu_check.py --dry-run     # on a CPU: the same code at tiny shapes

Sections (each wrapped: a failure becomes a FAILED row and the rest still runs):
  (a) build the extension with CUDA (pip install --no-build-isolation --no-deps -e .),
      print GPU, torch, triton and CUDA versions;
  (b) the card's measured ceilings: bf16 GEMM (torch.matmul 8192^3) and copy bandwidth;
  (c) the gpu-marked tests (pytest -m gpu -q tests/);
  (d) bench/gpu_kmeans.py, bench/gpu_triton.py and bench/gpu_curation.py, each a
      module with run(report); gpu_curation.py runs the issue's 20M x 1024 fp16 from
      disk (k = 100k) when the budget left allows, else 8M or 4M (a row says which);
  (e) the projection of paper 2's level 1 (350M x 1024, k = 100k, 50 Lloyd iterations)
      in device-hours from the measured streamed iteration;
  (f) one markdown table on stdout, and the same table + JSON under $OUT (or
      ./gpu_check_out/).
The whole run keeps inside --budget-s (default 450 s, for an 8-minute device call):
benchmark steps that would start after the deadline become "skipped" rows.
``report(name, **columns)`` appends a row; ``report.context`` holds the measured
ceilings (bf16_gemm_tflops, copy_gbps, device) and the deadline for the modules.

flash-kmeans (compared in bench/gpu_kmeans.py) travels as a wheel: see that file's
docstring for the download line. The device call (one, ~8 minutes; carry [".whl"],
timeout_s 540):
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH || exit;
    PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --budget-s 450 2>&1 | tee $OUT/run.log

--dry-run (no GPU needed): no build, no GPU tests, no ceilings; TRITON_INTERPRET=1 is
set before Triton loads, and each benchmark module runs its dry run (tiny shapes on the
CPU: Triton interpreted, torch baselines on the CPU, CUDA-only engines reported as
skipped). It checks the plumbing and the table, not speed.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.environ.get("OUT") or os.path.join(ROOT, "gpu_check_out")


class Reporter:
    """Collects rows; callable as report(name, **columns)."""

    def __init__(self):
        self.rows: list[dict] = []
        self.context: dict = {}

    def __call__(self, name: str, **columns) -> None:
        row = {"name": name, **columns}
        self.rows.append(row)
        print("  row:", json.dumps(row, default=str), flush=True)


report = Reporter()


def section(title: str, fn, *args) -> None:
    print(f"\n=== {title}", flush=True)
    t0 = time.perf_counter()
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - every section must be survivable
        tb = traceback.format_exc()
        print(tb, flush=True)
        report(title, status="FAILED", error=f"{type(exc).__name__}: {exc}"[:300])
    print(f"=== {title}: {time.perf_counter() - t0:.1f} s", flush=True)


# ----------------------------------------------------------------------- (a) build
def build(no_build: bool) -> None:
    if no_build:
        earlier = os.environ.get("FASTSSL_GPU_CHECK_BUILD")
        if earlier:  # this process was re-executed after building
            report(**json.loads(earlier))
        else:
            report("build", status="skipped (--no-build)")
        return
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps",
           "-e", ".", "-C", "cmake.define.FASTSSL_CUDA=ON"]
    try:  # build only for this card: half the nvcc time of the default "80;90"
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            cmd += ["-C", f"cmake.define.CMAKE_CUDA_ARCHITECTURES={major}{minor}"]
    except Exception:  # noqa: BLE001
        pass
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 4))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=420, env=env)
    seconds = time.perf_counter() - t0
    with open(os.path.join(OUT, "build.log"), "w") as f:
        f.write(" ".join(cmd) + "\n" + proc.stdout + "\n" + proc.stderr)
    ok = proc.returncode == 0
    if not ok:
        print((proc.stdout + proc.stderr)[-4000:])
    report("build", status="ok" if ok else "FAILED", seconds=round(seconds, 1),
           note="" if ok else "see build.log")


def versions() -> None:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        info["triton"] = f"missing ({type(exc).__name__})"
    try:
        import cupy

        info["cupy"] = cupy.__version__
    except Exception:  # noqa: BLE001
        info["cupy"] = "missing"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = p.name
        info["capability"] = f"{p.major}.{p.minor}"
        info["sms"] = p.multi_processor_count
        info["memory_gib"] = round(p.total_memory / 2**30, 1)
        report.context["device"] = p.name
    else:
        info["gpu"] = "none visible"
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        info["driver/clock/power"] = smi.stdout.strip()
    except Exception:  # noqa: BLE001
        pass
    try:
        from fastssl import _native  # the installed build, never the source tree

        bi = _native.build_info()
        info["fastssl_cuda_archs"] = bi.get("cuda_archs", "")
        info["fastssl_cpu_isa"] = bi.get("cpu_isa", "")
        info["fastssl_has_cuda"] = _native.has_cuda_ext()
    except Exception as exc:  # noqa: BLE001
        info["fastssl"] = f"import failed: {exc}"
    for key, value in info.items():
        print(f"  {key}: {value}")
    report.context["versions"] = info
    report("environment", status="ok", **{k: info[k] for k in ("gpu", "torch", "torch_cuda", "triton") if k in info})


# --------------------------------------------------------------------- (b) ceilings
def _median_ms(fn, warmup: int, reps: int) -> float:
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    times.sort()
    return times[len(times) // 2]


def ceilings() -> None:
    import torch

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = _median_ms(lambda: torch.matmul(a, b), 3, 10)
    tflops = 2 * n**3 / (ms * 1e-3) / 1e12
    report.context["bf16_gemm_tflops"] = tflops
    report("ceiling: bf16 GEMM 8192^3 (torch.matmul)", status="ok", ms=round(ms, 3),
           tflops=round(tflops, 1))
    del a, b
    src = torch.randn(1 << 28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), 3, 10)
    gbps = 2 * src.numel() * 4 / (ms * 1e-3) / 1e9
    report.context["copy_gbps"] = gbps
    report("ceiling: device copy 1 GiB (read+write)", status="ok", ms=round(ms, 3),
           gbps=round(gbps, 1))
    del src, dst
    torch.cuda.empty_cache()


# ------------------------------------------------------------------------ (c) tests
def tests() -> None:
    # -P: keep the repository root off sys.path, so the tests import the installed build
    # (with fastssl._C and fastssl.kernels), not the bare source tree.
    cmd = [sys.executable, "-P", "-X", "faulthandler", "-m", "pytest", "-m", "gpu", "-q",
           "-p", "no:cacheprovider", "-o", "faulthandler_timeout=120",
           "--no-header", "-rfE", "tests/"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
        out, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        raw = exc.stdout or ""
        out = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        code = "timeout"
    seconds = time.perf_counter() - t0
    with open(os.path.join(OUT, "pytest_gpu.log"), "w") as f:
        f.write(out)
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    summary = lines[-1] if lines else "(no output)"
    failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    print("\n".join(failed[:40]) or "  (no failures listed)")
    print("  " + summary)
    import torch

    ran = " passed" in summary or " failed" in summary
    ok = code == 0 and (ran or not torch.cuda.is_available())
    report("pytest -m gpu tests/", status="ok" if ok else "FAILED",
           seconds=round(seconds, 1), summary=summary[:200],
           first_failure=(failed[0][:200] if failed else ""))


# --------------------------------------------------------------------- (d) modules
def bench_module(filename: str, dry_run: bool = False) -> None:
    path = os.path.join(ROOT, "bench", filename)
    if not os.path.exists(path):
        report(filename, status="FAILED", error="missing")
        return
    spec = importlib.util.spec_from_file_location(filename[:-3], path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    if dry_run:
        module.run(report, dry_run=True)
    else:
        module.run(report)


CURATION_SIZES = (20_000_000, 8_000_000, 4_000_000)  # issue 9 asks 20M x 1024 fp16
CURATION_S_PER_MROWS = 8.0  # write + cold read + one iteration (4M took < 40 s, 2026-11-27)


def curation(dry_run: bool) -> None:
    """bench/gpu_curation.py at the largest size the time left allows (20M if it can)."""
    left = report.context.get("deadline", float("inf")) - time.perf_counter()
    if not dry_run and "FASTSSL_CURATION_N" not in os.environ:
        fits = [n for n in CURATION_SIZES if n / 1e6 * CURATION_S_PER_MROWS <= left]
        if not fits:
            report("gpu_curation.py", status=f"skipped (time budget: {left:.0f} s left)")
            return
        os.environ["FASTSSL_CURATION_N"] = str(fits[0])
        if fits[0] != CURATION_SIZES[0]:
            report("curation size", status="note",
                   note=f"{left:.0f} s left: n = {fits[0]:,}, not the issue's 20M")
    bench_module("gpu_curation.py", dry_run)


# Paper 2's level 1 (lely475/ssl-data-curation, arXiv:2503.18709): 350M x 1024, k =
# 100k, 50 iterations; its implementation took 8 hours on 128 GPUs (BACKGROUND.md).
LEVEL1_ROWS, LEVEL1_ITERS, SDC_GPU_HOURS = 350_000_000, 50, 8 * 128


def projection() -> None:
    """H200-hours for paper 2's level 1 from the measured streamed Lloyd iteration."""
    rows = [r for r in report.rows if str(r["name"]).startswith("curation: Lloyd iteration")
            and r.get("status") == "ok"]
    if not rows:
        report("projection: paper 2 level 1", status="skipped (no curation row measured)")
        return
    row = rows[-1]
    n = int(str(row["name"]).split("n=")[1].split()[0].replace(",", ""))
    rows_per_s = n / float(row["seconds"])
    hours = LEVEL1_ROWS * LEVEL1_ITERS / rows_per_s / 3600
    report("projection: paper 2 level 1 (350M x 1024, k=100k, 50 it.)", status="ok",
           rows_per_s=round(rows_per_s), device_hours=round(hours, 2),
           sdc_gpu_hours=SDC_GPU_HOURS, note=f"from {row['name']}; device: "
           f"{report.context.get('device', 'cpu (dry run: meaningless)')}; SDC: 8 h x 128 GPUs")


# ------------------------------------------------------------------------ (e) table
def table(rows: list[dict]) -> str:
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)

    def cell(v) -> str:
        if isinstance(v, float):
            v = f"{v:.4g}"
        return str(v).replace("|", "/").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-build", action="store_true", help="use the installed extension")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="seconds for the whole run; later benchmark steps are skipped")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU only, tiny shapes: checks the script, not the GPU")
    args = parser.parse_args()
    os.makedirs(OUT, exist_ok=True)
    t0 = time.perf_counter()
    started = float(os.environ.get("FASTSSL_GPU_CHECK_T0", time.time()))
    os.environ["FASTSSL_GPU_CHECK_T0"] = str(started)  # kept across the re-exec below
    report.context["deadline"] = t0 + args.budget_s - (time.time() - started)
    if args.dry_run:
        return dry_run(t0)
    section("build", build, args.no_build)
    if not args.no_build and report.rows and report.rows[-1].get("status") == "ok":
        # An editable install made after this interpreter started is invisible to it
        # (its import hook is a .pth file read at start-up): continue in a fresh one.
        os.environ["FASTSSL_GPU_CHECK_BUILD"] = json.dumps(report.rows[-1])
        argv = [sys.executable, os.path.abspath(__file__), "--no-build"] + [
            a for a in sys.argv[1:] if a != "--no-build"]
        sys.stdout.flush()
        os.execv(sys.executable, argv)
    section("environment", versions)
    section("ceilings", ceilings)
    if not args.skip_tests:
        section("tests", tests)
    if not args.skip_bench:
        section("gpu_kmeans.py", bench_module, "gpu_kmeans.py")
        section("gpu_triton.py", bench_module, "gpu_triton.py")
        section("gpu_curation.py", curation, False)
        section("projection", projection)
    return finish(t0)


def dry_run(t0: float) -> int:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports Triton
    section("environment", versions)
    for name in ("gpu_kmeans.py", "gpu_triton.py"):
        section(name, bench_module, name, True)
    section("gpu_curation.py", curation, True)
    section("projection", projection)
    return finish(t0)


def finish(t0: float) -> int:
    total = time.perf_counter() - t0
    report("total", status="ok", seconds=round(total, 1))

    text = table(report.rows)
    print("\n" + text)
    with open(os.path.join(OUT, "gpu_check.md"), "w") as f:
        f.write(f"# gpu_check {time.strftime('%Y-%m-%d %H:%M:%S')}\n\n{text}\n")
    with open(os.path.join(OUT, "gpu_check.json"), "w") as f:
        json.dump({"rows": report.rows, "context": report.context}, f, indent=1, default=str)
    print(f"\nwritten: {OUT}/gpu_check.md, gpu_check.json, build.log, pytest_gpu.log")
    return 0 if all(r.get("status") != "FAILED" for r in report.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
