"""Nearest-centroid assignment, the inner loop of k-means.

``assign`` and ``assign_grouped`` are the contract the curation code and users rely on.
They take numpy arrays (np.memmap streamed in row chunks), torch tensors on the CPU or
a GPU, or cupy arrays (zero-copy through DLPack), and return the caller's array type.

Implementations (``impl=``):
    "cpu"   the native C++ engine (fused distance + running argmin, AVX-512/AVX2)
    "cuda"  the native CUDA engine (tensor cores), for CUDA tensors and cupy arrays
    "torch" the PyTorch reference in fastssl.reference (chunked matmul + argmin)
    "auto"  "cuda" for device arrays, "cpu" for host arrays, "torch" when the extension
            is missing; FASTSSL_IMPL overrides "auto".
"""
from __future__ import annotations

from typing import Any

import numpy as np

from fastssl import _arrays
from fastssl._dispatch import resolve_impl
from fastssl._native import has_cpu_ext, has_cuda_ext, native

METRICS = {"l2": 0, "ip": 1, "cos": 1}
IMPLS = ("cpu", "cuda", "torch")
_FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
_COS_EPS = 1e-12  # as torch.nn.functional.normalize

__all__ = ["assign", "assign_grouped", "METRICS", "IMPLS"]


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


def _first_nonfinite_row(a: Any) -> int | None:
    """Index of the first row holding NaN or inf, or None. Any supported array type."""
    if isinstance(a, np.ndarray):
        finite = np.isfinite(a.astype(np.float32) if a.dtype.kind != "f" else a).all(axis=1)
        bad = np.flatnonzero(~finite)
        return int(bad[0]) if bad.size else None
    import torch

    if not isinstance(a, torch.Tensor):  # cupy
        a = torch.from_dlpack(a)
    bad = torch.nonzero(~torch.isfinite(a).all(dim=1))
    return int(bad[0, 0]) if bad.numel() else None


def _check_finite(a: Any, name: str, offset: int = 0) -> None:
    row = _first_nonfinite_row(a)
    if row is not None:
        raise ValueError(
            f"{name} row {offset + row} holds NaN or inf (pass check_finite=False to skip "
            "this check)"
        )


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

    def auto() -> str:
        if on_cuda:
            return "cuda" if has_cuda_ext() else "torch"
        return "cpu" if has_cpu_ext() else "torch"

    def available(name: str) -> str | None:
        if name == "cpu":
            if on_cuda:
                return "x is on a CUDA device; impl='cpu' needs host memory"
            return None if has_cpu_ext() else "the native extension fastssl._C is not built"
        if name == "cuda":
            if not on_cuda:
                return "x is in host memory; impl='cuda' needs a CUDA tensor or cupy array"
            return None if has_cuda_ext() else "fastssl._C was built without CUDA"
        return None  # torch runs everywhere

    return resolve_impl(op, impl, choices=IMPLS, auto=auto, available=available)


# ------------------------------------------------------------------------ host paths
def _host_centroids(centroids: Any, metric: str) -> tuple[np.ndarray, bool]:
    """Centroids as a host array the native engine reads (normalised for cos)."""
    if not isinstance(centroids, np.ndarray):
        kind = _arrays.array_kind(centroids, "centroids")
        if kind == _arrays.CUPY:
            centroids = centroids.get()
        else:
            centroids = centroids.detach().cpu()
            if metric == "cos" or str(centroids.dtype) == "torch.float64":
                centroids = centroids.float()
            words, is_bf16 = _arrays.torch_to_host_words(centroids)
            if metric != "cos":
                return np.ascontiguousarray(words), is_bf16
            centroids = words
    if metric == "cos" or centroids.dtype == np.float64:
        centroids = np.asarray(centroids, dtype=np.float32)
    if metric == "cos":
        norms = np.linalg.norm(centroids.astype(np.float64), axis=1, keepdims=True)
        centroids = (centroids / np.maximum(norms, _COS_EPS)).astype(np.float32)
    words, is_bf16 = _arrays.host_words(np.ascontiguousarray(centroids))
    return words, is_bf16


def _bf16_words_to_float32(words: np.ndarray) -> np.ndarray:
    return (words.astype(np.uint32) << 16).view(np.float32)


def _finish_cos(distances: np.ndarray, x_sqnorm: np.ndarray) -> None:
    distances /= np.maximum(np.sqrt(x_sqnorm), _COS_EPS)


def _run_native_host(
    x: np.ndarray,
    x_bf16: bool,
    centroids: Any,
    metric: str,
    chunk_rows: int | None,
    check_finite: bool,
    groups: tuple[np.ndarray, np.ndarray] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """The "cpu" impl over host rows (float32/float16, float64, or bf16 as uint16 words)."""
    n = x.shape[0]
    labels = np.empty(n, dtype=np.int64)
    distances = np.empty(n, dtype=np.float32)
    x_sqnorm = np.empty(n, dtype=np.float32) if metric == "cos" else None
    c_words, c_bf16 = _host_centroids(centroids, metric)
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


def _run_torch_reference(x, centroids, metric, chunk_rows, check_finite, groups):
    """The "torch" impl over numpy or torch input (any device), in row chunks."""
    import torch

    from fastssl.reference.kmeans import assign_grouped_reference, assign_reference

    def as_tensor(a):
        if isinstance(a, np.ndarray):
            if _arrays.dtype_name(a) == "bfloat16":
                return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
            return torch.from_numpy(_arrays.host_rows(a))
        if not isinstance(a, torch.Tensor):
            return torch.from_dlpack(a)
        return a

    c = as_tensor(centroids)
    first = as_tensor(x[:1])
    labels = torch.empty(x.shape[0], dtype=torch.int64, device=first.device)
    distances = torch.empty(x.shape[0], dtype=torch.float32, device=first.device)
    for start, stop in _arrays.row_chunks(x.shape[0], chunk_rows):
        chunk = as_tensor(x[start:stop])
        if check_finite:
            _check_finite(chunk, "x", start)
        if groups is None:
            lab, dist = assign_reference(chunk, c, metric=metric)
        else:
            xo, co, c_first = _local_groups(groups, start, stop)
            lab, dist = assign_grouped_reference(
                chunk, torch.from_numpy(xo), c[c_first : c_first + int(co[-1])],
                torch.from_numpy(co), metric=metric)
            lab += c_first
        labels[start:stop] = lab
        distances[start:stop] = dist
    return labels, distances


def _run(op, x, centroids, metric, chunk_size, impl, check_finite, groups):
    kind = _check_pair(x, centroids, metric)
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

        return _cuda_assign.run(op, x, kind, centroids, metric, check_finite, groups)
    if chosen == "torch":
        labels, distances = _run_torch_reference(x, centroids, metric, chunk_rows,
                                                 check_finite, groups)
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
                                             check_finite, groups)
        return torch.from_numpy(labels), torch.from_numpy(distances)
    is_bf16 = _arrays.dtype_name(x) == "bfloat16"
    host = x.view(np.uint16) if is_bf16 else x
    return _run_native_host(host, is_bf16, centroids, metric, chunk_rows, check_finite, groups)


# ---------------------------------------------------------------------------- public
def assign(
    x: Any,
    centroids: Any,
    *,
    metric: str = "l2",
    chunk_size: int | None = None,
    impl: str = "auto",
    check_finite: bool = True,
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
        impl: "auto" | "cpu" | "cuda" | "torch" (see the module docstring).
        check_finite: raise ValueError naming the first row with NaN or inf.
    Returns:
        labels: (n,) int64 index of the chosen centroid (ties: the lowest index).
        distances: (n,) float32: squared distance (l2), inner product (ip) or cosine
            (cos) at the chosen centroid. Same array type and device as ``x``.
    """
    return _run("assign", x, centroids, metric, chunk_size, impl, check_finite, None)


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
    Returns:
        labels (n,) int64, global indices into ``centroids``; distances (n,) float32.
    """
    _check_pair(x, centroids, metric)
    groups = _check_offsets(x_offsets, c_offsets, x.shape[0], centroids.shape[0])
    return _run("assign_grouped", x, centroids, metric, chunk_size, impl, check_finite, groups)
