"""The CUDA assignment engine (fastssl._C.assign_cuda / assign_grouped_cuda) vs float64.

GPU tests are marked ``gpu`` (skipped without a device). The oracle is computed in float64
on the values the kernel actually multiplies (centroids cast to x's dtype), so 16-bit
inputs are held to float32-accumulation accuracy; only the tf32 mode rounds operands.
Labels are compared where the gap to the second-best centroid is clear; elsewhere the
score at the chosen label must equal the best score within tolerance (ties are ambiguous).
"""
from __future__ import annotations

import glob
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fastssl import _native  # noqa: E402
from fastssl.assign import assign, assign_grouped  # noqa: E402
from fastssl.assign.common import normalized_centroids  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (label, dtype, precision, rtol): rtol is relative to the row's score scale.
PRECISIONS = [
    ("fp32-3xtf32", torch.float32, "3xtf32", 3e-5),
    ("fp32-tf32", torch.float32, "tf32", 3e-3),
    ("fp16", torch.float16, None, 3e-5),
    ("bf16", torch.bfloat16, None, 3e-5),
]
SHAPES = [  # (n, d, k): odd sizes, k > n, k around the 64/128 tile widths
    (1, 1, 1),
    (1, 33, 5),
    (7, 1, 3),
    (300, 33, 1),
    (200, 64, 300),
    (257, 130, 129),
    (1000, 256, 70),
    (513, 1024, 1000),
]


# ------------------------------------------------------------------------ helpers
def _device_inputs(rng, n, d, k, dtype, scale=1.0):
    x = torch.from_numpy(rng.standard_normal((n, d), dtype=np.float32) * scale)
    c = torch.from_numpy(rng.standard_normal((k, d), dtype=np.float32) * scale)
    return x.to("cuda", dtype), c.to("cuda")


def _oracle_scores(x, c, metric, groups=None):
    """(n, k) float64 scores (smaller is better) and per-row tolerance scale."""
    xd = x.detach().double().cpu()
    cd = c.detach().to(x.dtype).double().cpu() if metric != "cos" else None
    if metric == "cos":
        # the engine's own normalisation: float64, rounded once to x's dtype
        cd = normalized_centroids(c.detach().cpu(), x.dtype).double()
        xd = torch.nn.functional.normalize(xd, dim=1)
    dots = xd @ cd.T
    if metric == "l2":
        xsq = (xd * xd).sum(1, keepdim=True)
        csq = (cd * cd).sum(1)
        scores = xsq - 2 * dots + csq
        scale = xsq[:, 0] + csq.max()
    else:
        scores = -dots
        scale = xd.norm(dim=1) * cd.norm(dim=1).max()
    if groups is not None:
        xo, co = groups
        mask = torch.ones_like(scores, dtype=torch.bool)
        for g in range(len(xo) - 1):
            mask[xo[g] : xo[g + 1], co[g] : co[g + 1]] = False
        scores = scores.masked_fill(mask, float("inf"))
    return scores, scale + 1e-30


def _check(labels, distances, x, c, metric, rtol, groups=None):
    n = x.shape[0]
    assert labels.shape == (n,) and distances.shape == (n,)
    assert labels.dtype == torch.int64 and distances.dtype == torch.float32
    assert labels.device == x.device and distances.device == x.device
    if groups is not None:
        # Group by group: one (n, k) oracle for thousands of groups would not fit in memory.
        xo, co = groups
        for g in range(len(xo) - 1):
            lo, hi = int(xo[g]), int(xo[g + 1])
            if lo == hi:
                continue
            local = labels[lo:hi] - int(co[g])
            try:
                _check(local, distances[lo:hi], x[lo:hi], c[int(co[g]) : int(co[g + 1])],
                       metric, rtol)
            except AssertionError as exc:
                raise AssertionError(f"group {g} (rows {lo}:{hi}): {exc}") from None
        return
    scores, scale = _oracle_scores(x, c, metric, groups)
    lab = labels.cpu()
    dist = distances.cpu().double()
    k = scores.shape[1]
    assert bool(((lab >= 0) & (lab < k)).all()), "label out of range (unwritten output?)"
    assert bool(torch.isfinite(dist).all()), "non-finite distance (unwritten output?)"
    tol = rtol * scale + 1e-6
    best, best_idx = scores.min(dim=1)
    chosen = scores.gather(1, lab[:, None])[:, 0]
    bad = (chosen - best) > 2 * tol
    assert not bool(bad.any()), (
        f"{int(bad.sum())} rows chose a centroid worse than the best by more than the "
        f"tolerance; first row {int(bad.nonzero()[0, 0])}"
    )
    if k > 1:
        second = scores.topk(2, dim=1, largest=False).values[:, 1]
        clear = (second - best) > 4 * tol
        mismatch = clear & (lab != best_idx)
        assert not bool(mismatch.any()), f"{int(mismatch.sum())} clear-cut labels differ"
    expected = best.clamp_min(0) if metric == "l2" else -best
    err = (dist - expected).abs()
    assert bool((err <= 2 * tol).all()), f"distance error {float(err.max()):.3g} (tol {float(tol.max()):.3g})"


def _run(x, c, metric, precision, groups=None):
    """fastssl.kmeans.assign*(impl="cuda"), or _cuda_assign.run for an explicit precision."""
    if precision is None or precision == "3xtf32":
        if groups is None:
            return assign(x, c, metric=metric, impl="cuda")
        return assign_grouped(x, groups[0], c, groups[1], metric=metric, impl="cuda")
    from fastssl.assign import cuda_engine as _cuda_assign

    g = None if groups is None else (np.asarray(groups[0], np.int64), np.asarray(groups[1], np.int64))
    return _cuda_assign.run("assign", x, "torch", c, metric, True, g, precision=precision)


def _poison_allocator(n):
    """Leave -7 / NaN in freed blocks so that an unwritten output shows up."""
    a = torch.full((max(n, 1) * 4,), -7, dtype=torch.int64, device="cuda")
    b = torch.full((max(n, 1) * 4,), float("nan"), dtype=torch.float32, device="cuda")
    del a, b


def _random_groups(rng, n_groups, max_rows, max_k, empty_every=5):
    rows = rng.integers(1, max_rows + 1, n_groups)
    ks = rng.integers(1, max_k + 1, n_groups)
    rows[::empty_every] = 0  # groups without rows (their centroids are never chosen)
    xo = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
    co = np.concatenate([[0], np.cumsum(ks)]).astype(np.int64)
    return xo, co


# ------------------------------------------------------------------ CPU-runnable
def test_cuda_compiled_in_when_nvcc_present():
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc on PATH: the extension is built without CUDA here")
    if not _native.has_cpu_ext():
        pytest.skip("the native extension is not built")
    for cache in glob.glob(os.path.join(ROOT, "build", "*", "CMakeCache.txt")):
        with open(cache) as f:
            if "FASTSSL_CUDA:BOOL=OFF" in f.read():
                pytest.skip(f"built with FASTSSL_CUDA=OFF ({cache})")
    info = _native.build_info()
    assert info.get("cuda_archs"), f"nvcc is on PATH but the build has no CUDA archs: {info}"
    assert _native.has_cuda_ext()


def test_cuda_binding_rejects_bad_pointers():
    if not _native.has_cuda_ext():
        pytest.skip("fastssl._C built without CUDA")
    ext = _native.native()
    with pytest.raises(ValueError):
        ext.assign_cuda(0, 4, 8, 8, 0, 2, 8, 0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="stride"):
        ext.assign_cuda(16, 4, 8, 3, 32, 2, 8, 0, 0, 64, 128, 256)
    with pytest.raises(ValueError, match="dtype"):
        ext.assign_cuda(16, 4, 8, 8, 32, 2, 8, 7, 0, 64, 128, 256)
    with pytest.raises(ValueError):
        ext.assign_grouped_cuda(16, 4, 8, 8, np.array([0, 4]), 32, 2, 8, np.array([0, 1]),
                                0, 0, 64, 128, 256)


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("metric", ["l2", "ip", "cos"])
@pytest.mark.parametrize("label,dtype,precision,rtol", PRECISIONS, ids=[p[0] for p in PRECISIONS])
@pytest.mark.parametrize("n,d,k", SHAPES, ids=[f"n{n}-d{d}-k{k}" for n, d, k in SHAPES])
def test_assign_matches_float64(rng, n, d, k, label, dtype, precision, rtol, metric):
    x, c = _device_inputs(rng, n, d, k, dtype)
    _poison_allocator(n)
    labels, distances = _run(x, c, metric, precision)
    _check(labels, distances, x, c, metric, rtol)


@pytest.mark.gpu
@pytest.mark.parametrize("metric", ["l2", "ip", "cos"])
@pytest.mark.parametrize("label,dtype,precision,rtol", PRECISIONS, ids=[p[0] for p in PRECISIONS])
@pytest.mark.parametrize("max_rows,max_k", [(300, 40), (200, 150), (3, 2)])
def test_assign_grouped_matches_float64(rng, max_rows, max_k, label, dtype, precision, rtol, metric):
    xo, co = _random_groups(rng, 23, max_rows, max_k)
    n, k, d = int(xo[-1]), int(co[-1]), 97
    x, c = _device_inputs(rng, n, d, k, dtype)
    _poison_allocator(n)
    labels, distances = _run(x, c, metric, precision, groups=(xo, co))
    _check(labels, distances, x, c, metric, rtol, groups=(xo, co))


@pytest.mark.gpu
def test_grouped_many_small_groups(rng):
    """The curation shape in miniature: many groups of ~100 rows x ~35 centroids."""
    xo, co = _random_groups(rng, 2000, 200, 35, empty_every=97)
    x, c = _device_inputs(rng, int(xo[-1]), 256, int(co[-1]), torch.bfloat16)
    labels, distances = assign_grouped(x, xo, c, co, impl="cuda")
    _check(labels, distances, x, c, "l2", 3e-5, groups=(xo, co))


@pytest.mark.gpu
def test_non_contiguous_float64_and_host_centroids(rng):
    base = torch.from_numpy(rng.standard_normal((300, 80))).cuda()  # float64
    x = base[::2, 3:70]  # strided rows, odd d, float64 -> float32
    c = rng.standard_normal((45, 67)).astype(np.float32)  # numpy centroids
    labels, distances = assign(x, c, impl="cuda")
    _check(labels, distances, x.float(), torch.from_numpy(c), "l2", 3e-5)


@pytest.mark.gpu
def test_runs_on_callers_stream(rng):
    x_src, c = _device_inputs(rng, 4096, 256, 300, torch.float16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # the input below is produced late on `side`
        x = x_src * 1.0
        labels, distances = assign(x, c, impl="cuda")
    side.synchronize()
    _check(labels, distances, x_src, c, "l2", 3e-5)


@pytest.mark.gpu
def test_cupy_in_cupy_out(rng):
    cupy = pytest.importorskip("cupy")
    x = cupy.asarray(rng.standard_normal((1000, 96), dtype=np.float32))
    c = cupy.asarray(rng.standard_normal((130, 96), dtype=np.float32))
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        labels, distances = assign(x, c, impl="cuda")
        g_labels, _ = assign_grouped(x, np.array([0, 400, 1000]), c, np.array([0, 50, 130]),
                                     impl="cuda")
    stream.synchronize()
    assert isinstance(labels, cupy.ndarray) and isinstance(distances, cupy.ndarray)
    assert labels.device.id == x.device.id
    xt, ct = torch.from_dlpack(x), torch.from_dlpack(c)
    _check(torch.from_dlpack(labels), torch.from_dlpack(distances), xt, ct, "l2", 3e-5)
    g = g_labels.get()
    assert (g[:400] < 50).all() and (g[400:] >= 50).all()


@pytest.mark.gpu
def test_rejects_host_pointer_and_wrong_dtype():
    ext = _native.native()
    host = np.zeros((4, 8), dtype=np.float32)
    dev = torch.zeros(64, device="cuda")
    with pytest.raises(ValueError, match="device memory|CUDA pointer"):
        ext.assign_cuda(host.ctypes.data, 4, 8, 8, dev.data_ptr(), 2, 8, 0, 0,
                        dev.data_ptr(), dev.data_ptr(), dev.data_ptr())
    with pytest.raises(ValueError):
        ext.assign_cuda(dev.data_ptr(), 4, 8, 8, dev.data_ptr(), 2, 8, 5, 0,
                        dev.data_ptr(), dev.data_ptr(), dev.data_ptr())


@pytest.mark.gpu
def test_nan_rows_reported(rng):
    x, c = _device_inputs(rng, 50, 16, 4, torch.float32)
    x[17, 3] = float("nan")
    with pytest.raises(ValueError, match="row 17"):
        assign(x, c, impl="cuda")
