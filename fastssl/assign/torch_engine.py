"""The "torch" engine: the PyTorch reference of fastssl.reference.kmeans (chunked matmul
+ argmin) on any device, over numpy, torch or cupy input; the only engine of top-k.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from fastssl.assign import arrays as _arrays
from fastssl.assign.common import check_finite, local_groups, multiplied_centroids

__all__ = ["run"]


def _as_tensor(a: Any):
    """numpy (memmap chunks included, bf16 words too), torch or cupy -> torch, no copy."""
    import torch

    if isinstance(a, np.ndarray):
        if _arrays.dtype_name(a) == "bfloat16":
            return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
        with warnings.catch_warnings():  # read-only memmap chunks: torch only reads
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(_arrays.host_rows(a))
    if not isinstance(a, torch.Tensor):
        return torch.from_dlpack(a)
    return a


def _run_chunks(x, centroids, metric, chunk_rows, check_finite_x, groups, precision,
                topk=None):
    """(n,) torch outputs on x's device, or (n, topk) when topk is given."""
    import torch

    from fastssl.reference.kmeans import (assign_grouped_reference, assign_reference,
                                          assign_topk_reference)

    first = _as_tensor(x[:1])
    c = multiplied_centroids(_as_tensor(centroids), _arrays.dtype_name(first), metric,
                             precision)
    ready = dict(metric=metric, normalized=True)
    shape = (x.shape[0],) if topk is None else (x.shape[0], topk)
    labels = torch.empty(shape, dtype=torch.int64, device=first.device)
    distances = torch.empty(shape, dtype=torch.float32, device=first.device)
    for start, stop in _arrays.row_chunks(x.shape[0], chunk_rows):
        chunk = _as_tensor(x[start:stop])
        if check_finite_x:
            check_finite(chunk, "x", start)
        if topk is not None:
            lab, dist = assign_topk_reference(chunk, c, topk, **ready)
        elif groups is None:
            lab, dist = assign_reference(chunk, c, **ready)
        else:
            xo, co, c_first = local_groups(groups, start, stop)
            lab, dist = assign_grouped_reference(
                chunk, torch.from_numpy(xo), c[c_first : c_first + int(co[-1])],
                torch.from_numpy(co), **ready)
            lab += c_first
        labels[start:stop] = lab
        distances[start:stop] = dist
    return labels, distances


def run(x: Any, kind: str, centroids: Any, metric: str, chunk_rows: int | None,
        check_finite_x: bool, groups: tuple[np.ndarray, np.ndarray] | None,
        precision: str, topk: int | None = None) -> tuple[Any, Any]:
    """Assign ``x`` (kind as fastssl.assign.arrays names it); results in the caller's
    array type on x's device."""
    labels, distances = _run_chunks(x, centroids, metric, chunk_rows, check_finite_x,
                                    groups, precision, topk)
    if kind == _arrays.NUMPY:
        return labels.numpy(), distances.numpy()
    if kind == _arrays.CUPY:
        import cupy

        return cupy.from_dlpack(labels), cupy.from_dlpack(distances)
    return labels, distances
