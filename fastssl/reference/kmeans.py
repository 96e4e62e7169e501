"""Reference k-means assignment: chunked matmul + argmin (or a stable sort for top-k) in
PyTorch."""
from __future__ import annotations

import torch

from fastssl.cosine import normalized_centroids

_METRICS = ("l2", "ip", "cos")


def _prepared_centroids(centroids, metric, device, dtype, normalized=False):
    if metric not in _METRICS:
        raise ValueError(f"metric={metric!r}; expected one of {_METRICS}")
    c = centroids.to(device=device)
    # cos: the library's one normalisation (float64, rounded once to dtype), unless the
    # caller already normalised and rounded them (fastssl.assign, impl="torch")
    c = normalized_centroids(c, dtype) if metric == "cos" and not normalized else c.to(dtype)
    return c, (c * c).sum(1)


def _chunk_scores(xc, c, c_sqnorm, metric):
    """(rows, k) scores, smaller is better: ||x - c||^2 (l2) or -x.c (ip, cos)."""
    if metric == "cos":
        xc = torch.nn.functional.normalize(xc, dim=1)
    dots = xc @ c.T
    if metric == "l2":
        return (xc * xc).sum(1, keepdim=True) - 2 * dots + c_sqnorm
    return -dots


def _reported(best: torch.Tensor, metric: str) -> torch.Tensor:
    """The distance the API reports for a score: clamped squared L2, or the similarity."""
    return (best.clamp_min(0) if metric == "l2" else -best).float()


def assign_reference(
    x: torch.Tensor,
    centroids: torch.Tensor,
    *,
    metric: str = "l2",
    chunk_size: int = 65536,
    dtype: torch.dtype = torch.float32,
    normalized: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every row.

    Args:
        x: (n, d) any floating dtype, any device.
        centroids: (k, d).
        metric: "l2" (squared L2, smallest wins), "ip" (inner product, largest wins) or
            "cos" (inner product of L2-normalised rows, largest wins).
        chunk_size: rows per matmul, bounding the (chunk, k) score matrix.
        dtype: compute dtype; float64 gives the exact oracle used by the tests.
        normalized: "cos" only: the centroids are already normalised (and rounded) as
            they are to be multiplied; they are used as given.
    Returns:
        labels (n,) int64 and distances (n,) float32 (the squared distance, inner
        product or cosine at the chosen centroid). Ties go to the lowest index.
    """
    c, c_sqnorm = _prepared_centroids(centroids, metric, x.device, dtype, normalized)
    labels = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    distances = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], chunk_size):
        scores = _chunk_scores(x[start : start + chunk_size].to(dtype), c, c_sqnorm, metric)
        best, idx = scores.min(dim=1)  # the first minimum on ties
        labels[start : start + chunk_size] = idx
        distances[start : start + chunk_size] = _reported(best, metric)
    return labels, distances


def assign_topk_reference(
    x: torch.Tensor,
    centroids: torch.Tensor,
    topk: int,
    *,
    metric: str = "l2",
    max_scores: int = 1 << 26,
    dtype: torch.dtype = torch.float32,
    normalized: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``topk`` nearest centroids of every row, nearest first.

    Args:
        x: (n, d) any floating dtype, any device.
        centroids: (k, d), k >= topk.
        topk: how many centroids per row.
        metric: as for :func:`assign_reference`.
        max_scores: bound on the (rows, k) score matrix of one chunk.
        dtype: compute dtype.
        normalized: as for :func:`assign_reference`.
    Returns:
        labels (n, topk) int64 and distances (n, topk) float32, best first; equal
        scores keep index order (a stable sort), so ties go to the lowest index.
    """
    c, c_sqnorm = _prepared_centroids(centroids, metric, x.device, dtype, normalized)
    labels = torch.empty((x.shape[0], topk), dtype=torch.int64, device=x.device)
    distances = torch.empty((x.shape[0], topk), dtype=torch.float32, device=x.device)
    rows = max(1, max_scores // c.shape[0])
    for start in range(0, x.shape[0], rows):
        scores = _chunk_scores(x[start : start + rows].to(dtype), c, c_sqnorm, metric)
        best, idx = torch.sort(scores, dim=1, stable=True)
        labels[start : start + rows] = idx[:, :topk]
        distances[start : start + rows] = _reported(best[:, :topk], metric)
    return labels, distances


def assign_grouped_reference(
    x: torch.Tensor,
    x_offsets: torch.Tensor,
    centroids: torch.Tensor,
    c_offsets: torch.Tensor,
    *,
    metric: str = "l2",
    dtype: torch.dtype = torch.float32,
    normalized: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group nearest centroid: a Python loop over groups (the oracle, not the fast path).

    Args:
        x: (n, d); rows x[x_offsets[g]:x_offsets[g+1]] form group g.
        x_offsets: (G+1,) int64, non-decreasing, from 0 to n.
        centroids: (k, d); group g may use centroids[c_offsets[g]:c_offsets[g+1]].
        c_offsets: (G+1,) int64, non-decreasing, from 0 to k.
        metric, dtype, normalized: as for :func:`assign_reference`.
    Returns:
        labels (n,) int64, global indices into centroids; distances (n,) float32.
    """
    labels = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    distances = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    xo = [int(v) for v in x_offsets.tolist()]
    co = [int(v) for v in c_offsets.tolist()]
    for g in range(len(xo) - 1):
        if xo[g] == xo[g + 1]:
            continue
        lab, dist = assign_reference(
            x[xo[g] : xo[g + 1]], centroids[co[g] : co[g + 1]], metric=metric, dtype=dtype,
            normalized=normalized)
        labels[xo[g] : xo[g + 1]] = lab + co[g]
        distances[xo[g] : xo[g + 1]] = dist
    return labels, distances
