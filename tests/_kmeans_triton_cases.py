"""fastssl.kmeans.assign(impl="triton") under TRITON_INTERPRET=1, against float64.

Not collected by a plain ``pytest`` (the name does not start with test_): the interpreter
must be on before Triton is first imported, so tests/test_kmeans_triton.py runs this
file in a child process. By hand:

    TRITON_INTERPRET=1 python -m pytest tests/_kmeans_triton_cases.py -q

The oracle multiplies, in float64, the very values the kernel multiplies: x rounded to
its dtype and the centroids as the engine prepares them (cast to x's dtype; for cos
normalised in float64 and rounded once). The interpreter accumulates in float32, so
every dtype is held to float32-accumulation accuracy. Shapes are small and odd (n, k, d
not multiples of the tiles, k = 1, d = 1): each program instance costs ~1 ms here.
"""
from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 set before Triton is imported "
                "(tests/test_kmeans_triton.py runs this file that way)", allow_module_level=True)

from fastssl import assign as kmeans  # noqa: E402
from fastssl.assign import triton_engine as _triton_assign  # noqa: E402
from fastssl.kernels import assign as kernel  # noqa: E402

import _kmeans_oracle as oracle  # noqa: E402

pytestmark = pytest.mark.triton_interpret

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [  # (n, k, d)
    (1, 1, 1), (37, 1, 5), (7, 3, 1), (45, 70, 33), (130, 150, 70), (3, 40, 8),
]
RTOL = 2e-5  # of the row's score scale: float32 accumulation over d <= 70
SMALL_TILES = kernel.AssignConfig(16, 16, 16, 4, 1)  # many tiles even at these sizes
RESIDENT = kernel.AssignConfig(16, 16, 0, 4, 1, resident=True)  # x tile loaded once


def _random(gen, shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(shape, generator=gen) * scale + 0.3).to(dtype)


def check_against_float64(x, c_used, metric, labels, distances):
    return oracle.check_against_float64(x, c_used, metric, labels, distances, RTOL)


@pytest.mark.parametrize("metric", ["l2", "ip", "cos"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("n, k, d", SHAPES)
def test_matches_float64(n, k, d, dtype, metric):
    gen = torch.Generator().manual_seed(n * 7919 + k * 31 + d)
    x, c = _random(gen, (n, d), dtype), _random(gen, (k, d))
    labels, distances = kmeans.assign(x, c, metric=metric, impl="triton")
    check_against_float64(x, oracle.as_multiplied(x, c, metric), metric, labels, distances)


@pytest.mark.parametrize("precision", ["3xtf32", "tf32"])
@pytest.mark.parametrize("splits", [1, 3])
def test_small_tiles_and_splits(precision, splits):
    """Several row tiles, centroid tiles and depth steps, and several centroid splits
    (the reduction across splits), at shapes that are no multiple of a tile."""
    gen = torch.Generator().manual_seed(splits)
    x, c = _random(gen, (53, 37)), _random(gen, (71, 37))
    labels, distances = _triton_assign.run("assign", x, "torch", c, "l2", True,
                                           precision=precision, config=SMALL_TILES,
                                           splits=splits)
    check_against_float64(x, c, "l2", labels, distances)


@pytest.mark.parametrize("use_tma", [False, True])
@pytest.mark.parametrize("metric", ["l2", "ip", "cos"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_resident_x_tile(dtype, metric, use_tma):
    """The small-d variant: the whole (padded) row in one depth block, several centroid
    tiles and two splits; d = 40 (pointer loads) and 64 (16-byte rows: TMA)."""
    gen = torch.Generator().manual_seed(9)
    d = 64 if use_tma else 40
    x, c = _random(gen, (45, d), dtype), _random(gen, (71, d))
    labels, distances = _triton_assign.run("assign", x, "torch", c, metric, True,
                                           config=RESIDENT, splits=2, use_tma=use_tma)
    check_against_float64(x, oracle.as_multiplied(x, c, metric), metric, labels, distances)


SCHEDULE_SHAPES = [  # (n, k, d): three depth steps at d = 33, one at d = 16, k = 1
    (21, 40, 33), (17, 35, 16), (5, 1, 33),
]


@pytest.mark.parametrize("resident", [False, True], ids=["streamed", "resident"])
@pytest.mark.parametrize("schedule", kernel.SCHEDULES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_schedules_match_float64(dtype, schedule, resident, monkeypatch):
    """Each schedule on both kernel loops, launched as on a one-SM GPU (so persistent
    programs walk several work items: one program for "serial", two for "two_per_sm"),
    over several row and centroid tiles and two splits, n, k, d no multiple of a tile."""
    grids = []

    def one_sm(device, items, per_sm=1):
        grids.append(min(items, per_sm))
        return grids[-1]

    monkeypatch.setattr(kernel, "_program_count", one_sm)
    gen = torch.Generator().manual_seed(len(schedule) + 2 * resident)
    cfg = replace(RESIDENT if resident else SMALL_TILES, schedule=schedule)
    for n, k, d in SCHEDULE_SHAPES:
        x, c = _random(gen, (n, d), dtype), _random(gen, (k, d))
        for metric in ("l2", "ip"):
            labels, distances = _triton_assign.run("assign", x, "torch", c, metric, True,
                                                   config=cfg, splits=2)
            check_against_float64(x, oracle.as_multiplied(x, c, metric), metric, labels,
                                  distances)
    assert grids[0] == (2 if schedule == "two_per_sm" else 1)


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="schedule='pingpong'"):
        kernel.AssignConfig(16, 16, 16, 4, 1, schedule="pingpong")


def test_resident_config_refuses_wide_rows():
    with pytest.raises(ValueError, match="d=300 > 256"):
        RESIDENT.for_width(300)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_tensor_descriptor_path(dtype):
    """The TMA path (taken on sm_90 when strides are 16-byte aligned) through the
    interpreter's tensor descriptors; out-of-range rows and columns read as zeros."""
    gen = torch.Generator().manual_seed(5)
    x, c = _random(gen, (45, 64), dtype), _random(gen, (23, 64))
    for metric in ("l2", "ip"):
        labels, distances = _triton_assign.run("assign", x, "torch", c, metric, True,
                                               config=SMALL_TILES, use_tma=True)
        check_against_float64(x, oracle.as_multiplied(x, c, metric), metric, labels, distances)


@pytest.mark.parametrize("schedule", kernel.SCHEDULES)
@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_ties_go_to_the_lowest_index(metric, splits, schedule):
    """Equal centroids in different tiles and splits: the first one wins, always."""
    gen = torch.Generator().manual_seed(11)
    base = _random(gen, (5, 24))
    c = torch.cat([_random(gen, (9, 24), scale=0.01) + 50, base, base, base])  # 9 far away
    x = base.repeat(3, 1)  # every row equals centroid 9 + (row % 5)
    labels, _ = _triton_assign.run("assign", x, "torch", c, metric, True,
                                   config=replace(SMALL_TILES, schedule=schedule),
                                   splits=splits)
    expected = 9 + torch.arange(15) % 5
    if metric == "l2":
        assert torch.equal(labels, expected)
    else:  # ip ties too, and the lowest index among equal scores is still chosen
        dots = x.double() @ c.double().T
        assert torch.equal(labels, torch.tensor([int(np.flatnonzero(r == r.max())[0])
                                                 for r in dots.numpy()]))


def test_float64_and_strided_input():
    gen = torch.Generator().manual_seed(3)
    wide = _random(gen, (40, 66), torch.float64)
    x = wide[:, ::2]  # d = 33, inner stride 2
    c = _random(gen, (19, 33), torch.float64)
    labels, distances = kmeans.assign(x, c, impl="triton")
    check_against_float64(x.float(), c.float(), "l2", labels, distances)


def test_nonfinite_row_is_named():
    x = torch.randn(20, 8)
    x[13, 2] = float("nan")
    with pytest.raises(ValueError, match="x row 13"):
        kmeans.assign(x, torch.randn(3, 8), impl="triton")


def test_gpu_benchmark_rows_run_on_the_cpu(monkeypatch):
    """bench/gpu_kmeans.py's sweep and Lloyd rows at a tiny size (the GPU session runs
    them once, at full size: a bug found there costs its device time)."""
    import importlib.util
    import pathlib
    import sys

    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "gpu_kmeans.py"
    spec = importlib.util.spec_from_file_location("gpu_kmeans_under_test", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "_compiled_chunk_fn", lambda: bench._addmm_argmin)  # no C++ build
    rows = []

    def report(name, **columns):
        rows.append((name, columns))

    report.context = {}
    plan = bench.Plan.make(dry_run=True)
    bench._sweep_row(report, plan, 70, 24, 33, torch.bfloat16, None)
    bench._lloyd_row(report, plan, 70, 24, 9)
    (sweep_name, sweep), (lloyd_name, lloyd) = rows
    assert sweep["status"] == "ok" and isinstance(sweep["triton_ms"], float), sweep
    assert sweep["torch_agree"] >= 0.9 and sweep["compiled_agree"] >= 0.9, sweep
    assert sweep["cuda_ms"].startswith("skipped") and sweep["flash_ms"].startswith("skipped")
    assert isinstance(lloyd["triton_fp32_ms"], float) and isinstance(lloyd["triton_fp64_ms"], float)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(50, 8, generator=gen)
    c = x[:5].clone()
    new, labels = bench.lloyd_step(x, c, torch.float64, bench.triton_assign)
    for j in range(5):  # each new centroid is the mean of its members (or unchanged)
        members = x[labels == j].double()
        want = members.mean(0) if len(members) else c[j].double()
        assert torch.allclose(new[j].double(), want, atol=1e-6)
