"""Nearest-centroid assignment, the inner loop of k-means: the public API.

``assign`` and ``assign_grouped`` are the contract the curation code and users rely on.
They take numpy arrays (np.memmap streamed in row chunks), torch tensors on the CPU or
a GPU, or cupy arrays (zero-copy through DLPack), and return the caller's array type.

Implementations (``impl=``), each an :class:`~fastssl.assign.engines.Engine` behind one
seam (fastssl.assign.engines):
    "cpu"    the native C++ engine (fused distance + running argmin, AVX-512/AVX2/AMX)
    "cuda"   the native CUDA engine (tensor cores), for CUDA tensors and cupy arrays;
             the only device engine of ``assign_grouped``
    "triton" the fused Triton kernel (fastssl.kernels.assign: wgmma/TMA on sm_90, mma on
             sm_80), ``assign`` only, CUDA tensors and cupy arrays
    "torch"  the PyTorch reference in fastssl.reference (chunked matmul + argmin)
    "auto"   decided in one place, fastssl.assign.dispatch (also for KMeans and the
             curation jobs, through :func:`engine_for`): host arrays "cpu" ("torch"
             without the extension); device arrays AUTO_DEVICE_ENGINE's measured entry
             for the architecture if any, else for assign "triton" where the kernel is
             compiled for the device (sm_80, sm_90), else "cuda", else "torch";
             assign_grouped "cuda", else "torch"; assign_topk "torch".
             :func:`resolved_engine` says which; the choice is logged once per process.
             FASTSSL_IMPL overrides "auto".

Layout: ``checks`` (argument checks), ``dispatch`` (the "auto" rule), ``engines`` (the
seam) over ``cpu_engine``, ``cuda_engine``, ``triton_engine``, ``torch_engine``;
``common`` (what the engines share: centroid rounding, finiteness, device operands) and
``arrays`` (numpy/torch/cupy conversion, memmap chunks) below them. The float64 oracle
is fastssl.reference.kmeans.

The package is callable: ``fastssl.assign(x, c)`` is :func:`assign` (the name was a
function before it was a package, and both spellings keep working).
"""
from __future__ import annotations

import sys
import types
from typing import Any

import numpy as np

from fastssl._dispatch import resolve_impl
from fastssl._native import has_cpu_ext, has_cuda_ext
from fastssl.assign import arrays as _arrays
from fastssl.assign.checks import check_offsets, check_pair
from fastssl.assign.common import (CENTROID_PRECISIONS, METRICS, centroid_dtype,
                                   check_finite as _check_finite)
from fastssl.assign.dispatch import AUTO_DEVICE_ENGINE, auto_engine, device_of_array
from fastssl.assign.engines import ENGINES, IMPLS, Engine

__all__ = ["assign", "assign_grouped", "assign_topk", "resolved_engine", "engine_for",
           "Engine", "METRICS", "IMPLS", "CENTROID_PRECISIONS", "AUTO_DEVICE_ENGINE"]


# -------------------------------------------------------------------------- dispatch
def _unavailable(op: str, name: str, x: Any, kind: str) -> str | None:
    """Why engine ``name`` cannot run ``op`` here (placement, op, then the build), or None."""
    why = ENGINES[name].unavailable(op, x, kind)
    needs = ENGINES[name].needs
    if why is None and needs == "cpu" and not has_cpu_ext():
        return "the native extension fastssl._C is not built"
    if why is None and needs == "cuda" and not has_cuda_ext():
        return "fastssl._C was built without CUDA"
    return why


def _resolve(op: str, impl: str, x: Any, kind: str) -> str:
    return resolve_impl(op, impl, choices=IMPLS,
                        auto=lambda: auto_engine(op, device_of_array(x, kind)),
                        available=lambda name: _unavailable(op, name, x, kind))


def _run(op, x, centroids, metric, chunk_size, impl, check_finite, groups, precision,
         topk=None):
    kind = check_pair(x, centroids, metric)
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
    return ENGINES[chosen].run(op, x, kind, centroids, metric=metric, chunk_rows=chunk_rows,
                               check_finite=check_finite, groups=groups, precision=precision,
                               topk=topk)


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


def engine_for(where: Any, *, op: str = "assign", impl: str = "auto") -> Engine:
    """The :class:`~fastssl.assign.engines.Engine` that ``op`` runs with for inputs like
    ``where``, by :func:`resolved_engine`'s rule; resolve once, then call its
    ``assign`` / ``assign_grouped`` (what KMeans and the curation jobs do)."""
    return ENGINES[resolved_engine(where, op=op, impl=impl)]


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
    check_pair(x, centroids, metric)
    groups = check_offsets(x_offsets, c_offsets, x.shape[0], centroids.shape[0])
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


class _CallableModule(types.ModuleType):
    """``fastssl.assign`` names both this package and its main function: calling the
    package calls :func:`assign`, so code written against either keeps working."""

    def __call__(self, x: Any, centroids: Any, **kwargs) -> tuple[Any, Any]:
        return assign(x, centroids, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
