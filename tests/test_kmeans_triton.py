"""assign(impl="triton"): dispatch rules here, the kernel under the interpreter in a child
process (tests/_kmeans_triton_cases.py), and GPU checks at realistic shapes.

TRITON_INTERPRET must be set before Triton is first imported, and this pytest process
may already have imported it, so the interpreter cases run in a child pytest.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastssl import assign as kmeans
from fastssl.errors import MissingDependencyError

import _kmeans_oracle as oracle

HERE = pathlib.Path(__file__).resolve().parent
HAS_TRITON = importlib.util.find_spec("triton") is not None
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device; none is visible on this machine")


@pytest.mark.slow  # ~1 min of CPU: 104 interpreted cases
@pytest.mark.triton_interpret
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_kernel_cases_under_interpreter():
    cases = HERE / "_kmeans_triton_cases.py"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("FASTSSL_IMPL", None)
    cmd = [sys.executable, "-m", "pytest", str(cases), "-q", "-p", "no:cacheprovider",
           "-o", "addopts=", "--tb=short", "-rfEs"]
    done = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True,
                          timeout=600)
    tail = (done.stdout + done.stderr)[-10000:]
    assert done.returncode == 0, f"TRITON_INTERPRET=1 {' '.join(cmd[1:])} failed:\n{tail}"
    assert " passed" in tail and "skipped" not in tail.splitlines()[-1], tail


# --------------------------------------------------------------------- dispatch (CPU)
def test_triton_refuses_what_it_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = np.ones((4, 3), np.float32)
    with pytest.raises(MissingDependencyError, match="impl='triton'.*numpy"):
        kmeans.assign(x, x, impl="triton")
    with pytest.raises(MissingDependencyError, match="assign_grouped runs with impl='cuda'"):
        kmeans.assign_grouped(x, [0, 4], x, [0, 4], impl="triton")
    if HAS_TRITON:
        with pytest.raises(MissingDependencyError, match="host memory.*TRITON_INTERPRET"):
            kmeans.assign(torch.ones(4, 3), torch.ones(2, 3), impl="triton")


def test_no_measured_engine_table_yet():
    """No architecture has a measured entry yet (the table is filled from a device run of
    bench/gpu_kmeans.py); until then "auto" follows the rule that test_kmeans_engine.py
    checks branch by branch."""
    assert all(v in ("cuda", "triton") for v in kmeans.AUTO_DEVICE_ENGINE.values())
    assert kmeans.AUTO_DEVICE_ENGINE == {}, "update this test with the measured table"


def test_recorded_configs_cover_every_architecture_dtype_and_width():
    assign_kernels = pytest.importorskip("fastssl.kernels.assign")
    for major in (8, 9):
        for dtype in ("float32", "float16", "bfloat16"):
            for bucket in assign_kernels.D_BUCKETS:
                cfg = assign_kernels.TUNED[(major, dtype, bucket)]
                assert cfg.block_m >= 16 and cfg.block_n >= 16 and cfg.block_k >= 16
                size = 4 if dtype == "float32" else 2
                per_stage = (cfg.block_m + cfg.block_n) * cfg.block_k * size
                limit = (227 if major == 9 else 163) * 1024
                assert per_stage * cfg.num_stages <= limit, (major, dtype, bucket, cfg)


# --------------------------------------------------------------------------- GPU
GPU_CASES = [  # (label, dtype, precision, relative tolerance of the score scale)
    ("bf16", torch.bfloat16, None, 3e-5), ("fp16", torch.float16, None, 3e-5),
    ("fp32-3xtf32", torch.float32, "3xtf32", 3e-5), ("fp32-tf32", torch.float32, "tf32", 3e-3),
]


def _gpu_check(n, k, d, metric, dtype, precision, rtol):
    from fastssl.assign import triton_engine as _triton_assign

    gen = torch.Generator(device="cuda").manual_seed(n + k + d)
    x = torch.randn(n, d, device="cuda", generator=gen).to(dtype)
    c = torch.randn(k, d, device="cuda", generator=gen)
    labels, distances = _triton_assign.run("assign", x, "torch", c, metric, True,
                                           precision=precision)
    oracle.check_against_float64(x, oracle.as_multiplied(x, c, metric), metric, labels,
                                 distances, rtol)


@gpu
@needs_cuda
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("metric, label, dtype, precision, rtol", [
    (metric, *case) for case in GPU_CASES for metric in ("l2", "ip", "cos")
    if metric == "l2" or case[0] in ("bf16", "fp32-3xtf32")], ids=str)
def test_gpu_matches_float64(metric, label, dtype, precision, rtol):
    """Several row and centroid tiles, TMA (d = 1024). Every metric for bf16 and fp32
    (3xtf32), l2 for the others: each combination is one more compilation."""
    _gpu_check(4099, 4097, 1024, metric, dtype, precision, rtol)


@gpu
@needs_cuda
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("n, k, d, metric", [(1, 300, 7, "l2"), (3000, 70, 33, "cos"),
                                             (65536, 1, 128, "l2")])
def test_gpu_odd_shapes_bf16(n, k, d, metric):
    """One row, one centroid, d not a multiple of 8 (pointer loads instead of TMA)."""
    _gpu_check(n, k, d, metric, torch.bfloat16, None, 3e-5)


@gpu
@needs_cuda
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_gpu_tma_and_pointer_paths_agree_and_ties_pick_the_lowest_index():
    from fastssl.assign import triton_engine as _triton_assign

    gen = torch.Generator(device="cuda").manual_seed(1)
    base = torch.randn(300, 256, device="cuda", generator=gen).bfloat16()
    c = torch.cat([base, base, base])  # equal centroids in three different tiles
    x = base[torch.randperm(300, device="cuda", generator=gen)]
    runs = [_triton_assign.run("assign", x, "torch", c, "l2", True, use_tma=t, splits=s)
            for t in (False, True) for s in (None, 3)]
    exact = torch.nonzero((x[:, None, :] == base[None]).all(-1))[:, 1]
    for labels, _ in runs:
        assert torch.equal(labels, exact)


@gpu
@needs_cuda
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_gpu_runs_on_the_callers_stream():
    x = torch.randn(50000, 128, device="cuda").bfloat16()
    c = torch.randn(2000, 128, device="cuda")
    want = kmeans.assign(x, c, impl="triton")[0]
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        x2 = x * 1  # produced on the side stream: the kernel must wait for it there
        labels = kmeans.assign(x2, c, impl="triton", check_finite=False)[0]
    side.synchronize()
    assert torch.equal(labels, want)


# ------------------------------------------------- offline compile for the GPU targets
def _compile_offline(capability: int, dtype: str, use_tma: bool, cfg, precision="tf32",
                     d: int = 1024):
    """triton.compile of the assignment kernel for an sm_<capability> target, on a
    machine without a GPU, specialised as a launch with 16-byte aligned pointers and
    strides would be (Triton's JIT gives such arguments the same divisibility hint)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastssl.kernels import assign as kernel

    cfg = cfg.for_width(d)
    constexprs = {"METRIC": kernel.METRIC_L2, "PRECISION": precision, "USE_TMA": use_tma,
                  "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
                  "NUM_STAGES": cfg.num_stages, "UPCAST": False, "RESIDENT": cfg.resident}
    x_type = (f"tensordesc<{dtype}[{cfg.block_m}, {cfg.block_k}]>" if use_tma else f"*{dtype}")
    c_type = (f"tensordesc<{dtype}[{cfg.block_n}, {cfg.block_k}]>" if use_tma else f"*{dtype}")
    types = {"x_src": x_type, "c_src": c_type, "csq_ptr": "*fp32", "best_ptr": "*fp32",
             "idx_ptr": "*i64"}
    names = kernel._assign_kernel.arg_names
    signature = {a: "constexpr" if a in constexprs else types.get(a, "i32") for a in names}
    aligned = {"csq_ptr", "best_ptr", "idx_ptr", "stride_x", "stride_c", "d"}
    aligned |= set() if use_tma else {"x_src", "c_src"}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(names) if a in aligned}
    src = ASTSource(fn=kernel._assign_kernel, signature=signature, constexprs=constexprs,
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


@pytest.mark.slow  # ~15 s: four compilations through ptxas
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                    reason="the interpreter replaces triton.compile's GPU pipeline")
def test_recorded_configs_lower_to_wgmma_tma_and_a_pipeline_without_a_gpu():
    """What a Hopper run would execute, checked on the CPU: the recorded bf16 and fp32
    configs compile for sm_90a to wgmma fed by TMA (or, for unaligned strides, cp.async)
    with more than one stage of shared memory; on sm_80 the same kernel uses mma.sync."""
    from fastssl.kernels import assign as kernel

    bf16 = kernel.TUNED[(9, "bfloat16", 1 << 30)]
    tma = _compile_offline(90, "bf16", True, bf16)
    stage_bytes = (bf16.block_m + bf16.block_n) * bf16.block_k * 2
    assert "wgmma.mma_async" in tma.asm["ptx"] and "cp.async.bulk.tensor" in tma.asm["ptx"]
    assert tma.metadata.shared >= 2 * stage_bytes, "the mainloop is not pipelined"
    pointers = _compile_offline(90, "fp32", False, kernel.TUNED[(9, "float32", 1 << 30)],
                                precision="tf32x3")
    assert "wgmma.mma_async" in pointers.asm["ptx"] and "cp.async" in pointers.asm["ptx"]
    ampere = _compile_offline(80, "bf16", False, kernel.TUNED[(8, "bfloat16", 1 << 30)])
    assert "mma.sync" in ampere.asm["ptx"] and "wgmma" not in ampere.asm["ptx"]
    resident = kernel.AssignConfig(128, 256, 0, 8, 2, resident=True)  # the largest tried
    small_d = _compile_offline(90, "bf16", True, resident, d=128)
    assert "wgmma.mma_async" in small_d.asm["ptx"]
    assert small_d.metadata.shared <= 227 * 1024


def _load_bench(monkeypatch):
    import importlib.util

    path = HERE.parent / "bench" / "gpu_kmeans.py"
    spec = importlib.util.spec_from_file_location("gpu_kmeans_candidates", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # its dataclasses look it up
    spec.loader.exec_module(bench)
    return bench


def _registers(compiled) -> int:
    """Registers per thread of a compiled kernel, read from its cubin by cuobjdump (the
    one shipped with Triton): the driver, which reports it at load time, is absent."""
    import re
    import tempfile

    import triton

    tool = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        pytest.skip(f"Triton ships no cuobjdump at {tool}")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True,
                             text=True, timeout=60).stdout
    return int(re.search(r"REG:(\d+)", out).group(1))


SM90_REGISTERS = 65536  # per SM
SM90_SHARED = 228 * 1024  # per SM; each resident block also reserves 1 KiB


@pytest.mark.slow  # ~15 s: five compilations through ptxas
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                    reason="the interpreter replaces triton.compile's GPU pipeline")
def test_two_per_sm_candidates_fit_twice_on_an_sm90(monkeypatch):
    """Every "two_per_sm" tuning candidate, compiled for sm_90a, leaves room for a second
    program on the SM (else the schedule silently runs one per SM and hides nothing):
    registers, allocated per warp in units of 256, and shared memory, twice, within the
    SM's 64k registers and 228 KiB."""
    bench = _load_bench(monkeypatch)
    seen = []
    for dtype, d in ((torch.bfloat16, 128), (torch.bfloat16, 256), (torch.bfloat16, 1024),
                     (torch.float32, 1024)):
        for cfg in bench._candidates(dtype, d):
            key = (dtype, cfg, d if cfg.resident else None)  # streamed: d is a runtime value
            if cfg.schedule != "two_per_sm" or key in {s[0] for s in seen}:
                continue
            fp32 = dtype == torch.float32
            compiled = _compile_offline(90, "fp32" if fp32 else "bf16", not fp32, cfg,
                                        precision="tf32x3" if fp32 else "tf32", d=d)
            regs = _registers(compiled)
            per_warp = -(-regs * 32 // 256) * 256
            shared = compiled.metadata.shared + 1024
            seen.append((key, regs, compiled.metadata.shared))
            print(f"{key}: {regs} registers, {compiled.metadata.shared} B shared")
            assert "wgmma.mma_async" in compiled.asm["ptx"], cfg
            assert 2 * per_warp * cfg.num_warps <= SM90_REGISTERS, (d, cfg, regs)
            assert 2 * shared <= SM90_SHARED, (d, cfg, shared)
    assert len(seen) == 5, seen
