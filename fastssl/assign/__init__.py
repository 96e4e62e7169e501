"""Nearest-centroid assignment, the inner loop of k-means.

``assign`` and ``assign_grouped`` are the contract the curation code and users rely on.
They take numpy arrays (np.memmap streamed in row chunks), torch tensors on the CPU or
a GPU, or cupy arrays (zero-copy through DLPack), and return the caller's array type.

Implementations (``impl=``):
    "cpu"    the native C++ engine (fused distance + running argmin, AVX-512/AVX2/AMX)
    "cuda"   the native CUDA engine (tensor cores), for CUDA tensors and cupy arrays;
             the only device engine of ``assign_grouped``
    "triton" the fused Triton kernel (fastssl.kernels.assign: wgmma/TMA on sm_90, mma on
             sm_80), ``assign`` only, CUDA tensors and cupy arrays
    "torch"  the PyTorch reference in fastssl.reference (chunked matmul + argmin)
    "auto"   decided in one place, fastssl._assign_engine (also for KMeans and the
             curation jobs): host arrays "cpu" ("torch" without the extension); device
             arrays AUTO_DEVICE_ENGINE's measured entry for the architecture if any, else
             for assign "triton" where the kernel is compiled for the device (sm_80,
             sm_90), else "cuda", else "torch"; assign_grouped "cuda", else "torch";
             assign_topk "torch". :func:`resolved_engine` says which; the choice is
             logged once per process. FASTSSL_IMPL overrides "auto".
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from fastssl import _arrays
from fastssl._assign_common import check_finite as _check_finite
from fastssl._assign_common import (COS_EPS, centroid_dtype, device_of,
                                    multiplied_centroids)
from fastssl._assign_engine import AUTO_DEVICE_ENGINE, auto_engine, device_of_array
from fastssl._dispatch import resolve_impl
from fastssl._native import has_cpu_ext, has_cuda_ext, native

METRICS = {"l2": 0, "ip": 1, "cos": 1}
IMPLS = ("cpu", "cuda", "triton", "torch")
_FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")

__all__ = ["assign", "assign_grouped", "assign_topk", "resolved_engine", "METRICS", "IMPLS",
           "AUTO_DEVICE_ENGINE"]


# ----------------------------------------------------------------------------- checks
def _check_matrix(a: Any, name: str) -> str:
    kind = _arrays.array_kind(a, name)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows, d), got shape {tuple(a.shape)}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(a.shape)}")
    dt = _arrays.dtype_name(a)
    if dt not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} has dtype {dt}; expected float32, float16 or bfloat16 (float64 is "
            "computed in float32)"
        )
    return kind


def _check_pair(x: Any, centroids: Any, metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}; expected one of {tuple(METRICS)}")
    kind = _check_matrix(x, "x")
    _check_matrix(centroids, "centroids")
    if x.shape[1] != centroids.shape[1]:
        raise ValueError(
            f"x has shape {tuple(x.shape)} and centroids {tuple(centroids.shape)}: "
            "their second dimensions (d) must match"
        )
    return kind


def _check_offsets(x_offsets: Any, c_offsets: Any, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    def as_host(o: Any, name: str) -> np.ndarray:
        if not isinstance(o, np.ndarray):
            kind = _arrays.array_kind(o, name) if not isinstance(o, (list, tuple)) else None
            if kind == _arrays.TORCH:
                o = o.detach().cpu().numpy()
            elif kind == _arrays.CUPY:
                o = o.get()
            else:
                o = np.asarray(o)
        if o.ndim != 1 or o.shape[0] < 2:
            raise ValueError(f"{name} must be 1-D with G+1 >= 2 entries, got shape {o.shape}")
        if o.dtype.kind not in "iu":
            raise TypeError(f"{name} must hold integers, got dtype {o.dtype}")
        return o.astype(np.int64)

    xo, co = as_host(x_offsets, "x_offsets"), as_host(c_offsets, "c_offsets")
    if xo.shape != co.shape:
        raise ValueError(
            f"x_offsets has {xo.shape[0]} entries and c_offsets {co.shape[0]}: both must be G+1"
        )
    for o, name, total, what in ((xo, "x_offsets", n, "n"), (co, "c_offsets", k, "k")):
        if o[0] != 0 or o[-1] != total:
            raise ValueError(
                f"{name} must start at 0 and end at {what}={total}, got {o[0]} .. {o[-1]}"
            )
        step = np.diff(o)
        if (step < 0).any():
            g = int(np.flatnonzero(step < 0)[0])
            raise ValueError(f"{name} must be non-decreasing; it drops at group {g}")
    empty = (np.diff(xo) > 0) & (np.diff(co) == 0)
    if empty.any():
        g = int(np.flatnonzero(empty)[0])
        raise ValueError(
            f"group {g} has {int(xo[g + 1] - xo[g])} rows but no centroids "
            f"(c_offsets[{g}] == c_offsets[{g + 1}] == {int(co[g])})"
        )
    return xo, co


# -------------------------------------------------------------------------- dispatch
def _on_cuda(a: Any, kind: str) -> bool:
    return kind == _arrays.CUPY or (kind == _arrays.TORCH and a.device.type == "cuda")


def _resolve(op: str, impl: str, x: Any, kind: str) -> str:
    on_cuda = _on_cuda(x, kind)
    if op == "assign_topk":
        return _resolve_topk(impl, x, kind)

    def available(name: str) -> str | None:
        if name == "cpu":
            if on_cuda:
                return "x is on a CUDA device; impl='cpu' needs host memory"
            return None if has_cpu_ext() else "the native extension fastssl._C is not built"
        if name == "cuda":
            if not on_cuda:
                return "x is in host memory; impl='cuda' needs a CUDA tensor or cupy array"
            return None if has_cuda_ext() else "fastssl._C was built without CUDA"
        if name == "triton":
            return _triton_unavailable(op, x, kind)
        return None  # torch runs everywhere

    return resolve_impl(op, impl, choices=IMPLS,
                        auto=lambda: auto_engine(op, device_of_array(x, kind)),
                        available=available)


def _triton_unavailable(op: str, x: Any, kind: str) -> str | None:
    from fastssl import _triton_assign

    if op != "assign":
        return "the Triton kernel does plain assignment; assign_grouped runs with impl='cuda'"
    if kind == _arrays.NUMPY:
        return "x is a numpy array; impl='triton' needs a CUDA tensor or cupy array"
    return _triton_assign.unavailable(device_of(x, kind))


def _resolve_topk(impl: str, x: Any, kind: str) -> str:
    def available(name: str) -> str | None:
        return None if name == "torch" else (
            "only the PyTorch path computes top-k (impl='torch', on any device); the "
            "fused engines keep one centroid per row")

    return resolve_impl("assign_topk", impl, choices=IMPLS,
                        auto=lambda: auto_engine("assign_topk", device_of_array(x, kind)),
                        available=available)


# ------------------------------------------------------------------------ host paths
def _host_centroids(centroids: Any, metric: str, x_dtype: str,
                    precision: str) -> tuple[np.ndarray, bool]:
    """Centroids as the native engine reads them: rounded by ``multiplied_centroids``
    (normalised for cos), as bf16 words when they were rounded to bf16 (the AMX engine
    multiplies float16 rows with those on the tile unit), else float32."""
    import torch

    if not isinstance(centroids, np.ndarray):
        if _arrays.array_kind(centroids, "centroids") == _arrays.CUPY:
            centroids = centroids.get()
        else:
            centroids = centroids.detach().cpu()
    c = multiplied_centroids(centroids, x_dtype, metric, precision)
    if centroid_dtype(x_dtype, precision) == "bfloat16":
        return _arrays.torch_to_host_words(c.to(torch.bfloat16))
    return np.ascontiguousarray(c.numpy()), False


def _bf16_words_to_float32(words: np.ndarray) -> np.ndarray:
    return (words.astype(np.uint32) << 16).view(np.float32)


def _finish_cos(distances: np.ndarray, x_sqnorm: np.ndarray) -> None:
    distances /= np.maximum(np.sqrt(x_sqnorm), COS_EPS)


def _run_native_host(
    x: np.ndarray,
    x_bf16: bool,
    centroids: Any,
    metric: str,
    chunk_rows: int | None,
    check_finite: bool,
    groups: tuple[np.ndarray, np.ndarray] | None,
    precision: str,
) -> tuple[np.ndarray, np.ndarray]:
    """The "cpu" impl over host rows (float32/float16, float64, or bf16 as uint16 words)."""
    n = x.shape[0]
    labels = np.empty(n, dtype=np.int64)
    distances = np.empty(n, dtype=np.float32)
    x_sqnorm = np.empty(n, dtype=np.float32) if metric == "cos" else None
    x_dtype = "bfloat16" if x_bf16 else _arrays.dtype_name(x)
    c_words, c_bf16 = _host_centroids(centroids, metric, x_dtype, precision)
    ext = native()
    for start, stop in _arrays.row_chunks(n, chunk_rows):
        chunk = x[start:stop]
        if chunk.dtype == np.float64:
            chunk = chunk.astype(np.float32)
        elif chunk_rows:
            chunk = _arrays.host_rows(chunk, copy=True)  # the read of a memmap chunk happens here
        if check_finite:
            _check_finite(_bf16_words_to_float32(chunk) if x_bf16 else chunk, "x", start)
        sq = x_sqnorm[start:stop] if x_sqnorm is not None else None
        if groups is None:
            ext.assign_cpu(chunk, x_bf16, c_words, c_bf16, METRICS[metric],
                           labels[start:stop], distances[start:stop], sq)
        else:
            xo, co, c_first = _local_groups(groups, start, stop)
            c_last = int(co[-1]) + c_first
            ext.assign_grouped_cpu(chunk, x_bf16, xo, c_words[c_first:c_last], c_bf16,
                                   co, METRICS[metric], labels[start:stop],
                                   distances[start:stop], sq)
            labels[start:stop] += c_first
    if x_sqnorm is not None:
        _finish_cos(distances, x_sqnorm)
    return labels, distances


def _local_groups(groups: tuple[np.ndarray, np.ndarray], start: int, stop: int):
    """Offsets of the groups overlapping rows [start, stop), relative to the chunk.

    Returns (x_offsets, c_offsets, first centroid): the chunk's rows see only the
    centroids of the groups they belong to, so a group cut by a chunk boundary is
    assigned exactly as if it were whole.
    """
    xo, co = groups
    g0 = int(np.searchsorted(xo, start, side="right")) - 1
    g1 = int(np.searchsorted(xo, stop, side="left"))
    local_x = np.clip(xo[g0 : g1 + 1], start, stop) - start
    local_c = co[g0 : g1 + 1] - co[g0]
    return local_x.astype(np.int64), local_c.astype(np.int64), int(co[g0])


def _run_torch_reference(x, centroids, metric, chunk_rows, check_finite, groups, precision,
                         topk=None):
    """The "torch" impl over numpy or torch input (any device), in row chunks; (n,)
    outputs, or (n, topk) when topk is given."""
    import torch

    from fastssl.reference.kmeans import (assign_grouped_reference, assign_reference,
                                          assign_topk_reference)

    def as_tensor(a):
        if isinstance(a, np.ndarray):
            if _arrays.dtype_name(a) == "bfloat16":
                return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
            with warnings.catch_warnings():  # read-only memmap chunks: torch only reads
                warnings.simplefilter("ignore", UserWarning)
                return torch.from_numpy(_arrays.host_rows(a))
        if not isinstance(a, torch.Tensor):
            return torch.from_dlpack(a)
        return a

    first = as_tensor(x[:1])
    c = multiplied_centroids(as_tensor(centroids), _arrays.dtype_name(first), metric, precision)
    ready = dict(metric=metric, normalized=True)
    shape = (x.shape[0],) if topk is None else (x.shape[0], topk)
    labels = torch.empty(shape, dtype=torch.int64, device=first.device)
    distances = torch.empty(shape, dtype=torch.float32, device=first.device)
    for start, stop in _arrays.row_chunks(x.shape[0], chunk_rows):
        chunk = as_tensor(x[start:stop])
        if check_finite:
            _check_finite(chunk, "x", start)
        if topk is not None:
            lab, dist = assign_topk_reference(chunk, c, topk, **ready)
        elif groups is None:
            lab, dist = assign_reference(chunk, c, **ready)
        else:
            xo, co, c_first = _local_groups(groups, start, stop)
            lab, dist = assign_grouped_reference(
                chunk, torch.from_numpy(xo), c[c_first : c_first + int(co[-1])],
                torch.from_numpy(co), **ready)
            lab += c_first
        labels[start:stop] = lab
        distances[start:stop] = dist
    return labels, distances


def _run(op, x, centroids, metric, chunk_size, impl, check_finite, groups, precision,
         topk=None):
    kind = _check_pair(x, centroids, metric)
    centroid_dtype(_arrays.dtype_name(x), precision)  # ValueError for an unknown precision
    x, centroids = _arrays.native_layout(x), _arrays.native_layout(centroids)  # byte order, strides
    chosen = _resolve(op, impl, x, kind)
    if check_finite:
        _check_finite(centroids, "centroids")
    chunk_rows = chunk_size
    if chunk_rows is not None and int(chunk_rows) < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    if chunk_rows is None and kind == _arrays.NUMPY and _arrays.is_memmap(x):
        chunk_rows = _arrays.default_chunk_rows(x, x.shape[1] * x.itemsize)

    if chosen == "cuda":
        from fastssl import _cuda_assign

        return _cuda_assign.run(op, x, kind, centroids, metric, check_finite, groups,
                                centroid_precision=precision)
    if chosen == "triton":
        from fastssl import _triton_assign

        return _triton_assign.run(op, x, kind, centroids, metric, check_finite,
                                  centroid_precision=precision)
    if chosen == "torch":
        labels, distances = _run_torch_reference(x, centroids, metric, chunk_rows,
                                                 check_finite, groups, precision, topk)
        if kind == _arrays.NUMPY:
            return labels.numpy(), distances.numpy()
        if kind == _arrays.CUPY:
            import cupy

            return cupy.from_dlpack(labels), cupy.from_dlpack(distances)
        return labels, distances

    # "cpu": native engine over host memory
    if kind == _arrays.TORCH:
        import torch

        words, is_bf16 = _arrays.torch_to_host_words(x.detach())
        labels, distances = _run_native_host(words, is_bf16, centroids, metric, chunk_rows,
                                             check_finite, groups, precision)
        return torch.from_numpy(labels), torch.from_numpy(distances)
    is_bf16 = _arrays.dtype_name(x) == "bfloat16"
    host = x.view(np.uint16) if is_bf16 else x
    return _run_native_host(host, is_bf16, centroids, metric, chunk_rows, check_finite, groups,
                            precision)


# ---------------------------------------------------------------------------- public
def resolved_engine(where: Any, *, op: str = "assign", impl: str = "auto") -> str:
    """The engine ``op`` runs with for inputs like ``where`` ("cpu" | "cuda" | "triton" |
    "torch"), by the very rule the op applies (FASTSSL_IMPL and the measured table
    included); raises as the op would when an explicit ``impl`` cannot run there.

    Args:
        where: an input array (numpy, torch, cupy) or a device ("cuda:0", torch.device).
        op: "assign" | "assign_grouped" | "assign_topk".
        impl: as the op's ``impl``.
    """
    if op not in ("assign", "assign_grouped", "assign_topk"):
        raise ValueError(f"op={op!r}; expected 'assign', 'assign_grouped' or 'assign_topk'")
    if isinstance(where, str) or type(where).__name__ == "device":
        import torch

        where = torch.empty((0, 1), device=torch.device(where))  # no memory, only a place
    return _resolve(op, impl, where, _arrays.array_kind(where, "where"))


def assign(
    x: Any,
    centroids: Any,
    *,
    metric: str = "l2",
    chunk_size: int | None = None,
    impl: str = "auto",
    check_finite: bool = True,
    precision: str = "data",
) -> tuple[Any, Any]:
    """Nearest centroid of every row of ``x``.

    Args:
        x: (n, d) float32 | float16 | bfloat16 (float64 is computed in float32). numpy
            array (an ``np.memmap`` is streamed in chunks), torch tensor (CPU or CUDA) or
            cupy array.
        centroids: (k, d), any of the same types; moved to x's device if needed.
        metric: "l2" squared L2 distance (smallest wins), "ip" inner product (largest
            wins), "cos" cosine similarity (largest wins).
        chunk_size: rows per chunk for host inputs; None streams a memmap in ~64 MiB
            chunks and hands an in-memory array over whole.
        impl: "auto" | "cpu" | "cuda" | "triton" | "torch" (see the module docstring).
        check_finite: raise ValueError naming the first row with NaN or inf.
        precision: what the centroids are rounded to before they are multiplied:
            "data" (default) x's own precision (float16 rows: float16 centroids; float32
            and float64 rows: float32), with float32 accumulation on every engine, so
            the result does not depend on the machine (AMX or not, GPU or not) up to
            ties; "bf16" (opt-in, for speed) bfloat16 centroids on every engine, which
            lets AMX CPUs multiply float16 rows on the tile unit.
    Returns:
        labels: (n,) int64 index of the chosen centroid (ties: the lowest index).
        distances: (n,) float32: squared distance (l2), inner product (ip) or cosine
            (cos) at the chosen centroid. Same array type and device as ``x``.
    """
    return _run("assign", x, centroids, metric, chunk_size, impl, check_finite, None, precision)


def assign_grouped(
    x: Any,
    x_offsets: Any,
    centroids: Any,
    c_offsets: Any,
    *,
    metric: str = "l2",
    chunk_size: int | None = None,
    impl: str = "auto",
    check_finite: bool = True,
    precision: str = "data",
) -> tuple[Any, Any]:
    """Nearest centroid within each group (CSR): the per-parent split of hierarchical k-means.

    Rows ``x[x_offsets[g]:x_offsets[g+1]]`` are assigned only among
    ``centroids[c_offsets[g]:c_offsets[g+1]]``, all groups in one native call.

    Args:
        x: (n, d), as for :func:`assign`.
        x_offsets: (G+1,) int, non-decreasing from 0 to n.
        centroids: (k, d).
        c_offsets: (G+1,) int, non-decreasing from 0 to k; a group with rows must have
            at least one centroid.
        metric, chunk_size, impl, check_finite, precision: as for :func:`assign`.
    Returns:
        labels (n,) int64, global indices into ``centroids``; distances (n,) float32.
    """
    _check_pair(x, centroids, metric)
    groups = _check_offsets(x_offsets, c_offsets, x.shape[0], centroids.shape[0])
    return _run("assign_grouped", x, centroids, metric, chunk_size, impl, check_finite, groups,
                precision)


def assign_topk(
    x: Any,
    centroids: Any,
    topk: int,
    *,
    metric: str = "l2",
    chunk_size: int | None = None,
    impl: str = "auto",
    check_finite: bool = True,
    precision: str = "data",
) -> tuple[Any, Any]:
    """The ``topk`` nearest centroids of every row of ``x``, nearest first.

    Runs the PyTorch path (``impl="torch"``, which "auto" picks) on x's device, in row
    chunks (a memmap is streamed); the fused engines keep only one centroid per row.

    Args:
        x: (n, d), as for :func:`assign`.
        centroids: (k, d).
        topk: 1 <= topk <= k.
        metric, chunk_size, check_finite, precision: as for :func:`assign`.
    Returns:
        labels (n, topk) int64 and distances (n, topk) float32, best first; equal scores
        keep index order (ties go to the lowest index). Same array type as ``x``.
    """
    if isinstance(topk, bool) or not isinstance(topk, (int, np.integer)):
        raise TypeError(f"topk must be an int, got {type(topk).__name__}")
    k = centroids.shape[0] if hasattr(centroids, "shape") else None
    if topk < 1 or (k is not None and topk > k):
        raise ValueError(f"topk={topk}; expected 1 <= topk <= k={k} (the number of centroids)")
    return _run("assign_topk", x, centroids, metric, chunk_size, impl, check_finite, None,
                precision, int(topk))
