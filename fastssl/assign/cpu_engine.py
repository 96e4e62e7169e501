"""The "cpu" engine: the native C++ engine (``fastssl._C.assign_cpu``, fused distance +
running argmin, AVX-512/AVX2/AMX) over host memory, in row chunks.

Host rows arrive as float32/float16, float64 (computed in float32) or bf16 as uint16
words; an ``np.memmap`` is read one chunk at a time, so a file larger than memory is
assigned without loading it whole.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from fastssl._native import native
from fastssl.assign import arrays as _arrays
from fastssl.assign.common import (COS_EPS, METRICS, centroid_dtype, check_finite,
                                   local_groups, multiplied_centroids)

__all__ = ["run"]


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


def _run_host(
    x: np.ndarray,
    x_bf16: bool,
    centroids: Any,
    metric: str,
    chunk_rows: int | None,
    check_finite_x: bool,
    groups: tuple[np.ndarray, np.ndarray] | None,
    precision: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Host rows (float32/float16, float64, or bf16 as uint16 words) -> (n,) int64 labels
    and (n,) float32 distances, numpy."""
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
        if check_finite_x:
            check_finite(_bf16_words_to_float32(chunk) if x_bf16 else chunk, "x", start)
        sq = x_sqnorm[start:stop] if x_sqnorm is not None else None
        if groups is None:
            ext.assign_cpu(chunk, x_bf16, c_words, c_bf16, METRICS[metric],
                           labels[start:stop], distances[start:stop], sq)
        else:
            xo, co, c_first = local_groups(groups, start, stop)
            c_last = int(co[-1]) + c_first
            ext.assign_grouped_cpu(chunk, x_bf16, xo, c_words[c_first:c_last], c_bf16,
                                   co, METRICS[metric], labels[start:stop],
                                   distances[start:stop], sq)
            labels[start:stop] += c_first
    if x_sqnorm is not None:
        _finish_cos(distances, x_sqnorm)
    return labels, distances


def run(x: Any, kind: str, centroids: Any, metric: str, chunk_rows: int | None,
        check_finite_x: bool, groups: tuple[np.ndarray, np.ndarray] | None,
        precision: str) -> tuple[Any, Any]:
    """Assign host rows ``x`` (numpy array or CPU torch tensor, kind as
    fastssl.assign.arrays names it); results in the caller's array type."""
    if kind == _arrays.TORCH:
        import torch

        words, is_bf16 = _arrays.torch_to_host_words(x.detach())
        labels, distances = _run_host(words, is_bf16, centroids, metric, chunk_rows,
                                      check_finite_x, groups, precision)
        return torch.from_numpy(labels), torch.from_numpy(distances)
    is_bf16 = _arrays.dtype_name(x) == "bfloat16"
    host = x.view(np.uint16) if is_bf16 else x
    return _run_host(host, is_bf16, centroids, metric, chunk_rows, check_finite_x, groups,
                     precision)
