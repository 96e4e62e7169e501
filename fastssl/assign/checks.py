"""Input checks of the public assignment API: one-line ValueError/TypeError naming the
argument, the shape or dtype seen and what was expected."""
from __future__ import annotations

from typing import Any

import numpy as np

from fastssl.assign import arrays as _arrays
from fastssl.assign.common import METRICS

_FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")

__all__ = ["check_matrix", "check_pair", "check_offsets"]


def check_matrix(a: Any, name: str) -> str:
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


def check_pair(x: Any, centroids: Any, metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}; expected one of {tuple(METRICS)}")
    kind = check_matrix(x, "x")
    check_matrix(centroids, "centroids")
    if x.shape[1] != centroids.shape[1]:
        raise ValueError(
            f"x has shape {tuple(x.shape)} and centroids {tuple(centroids.shape)}: "
            "their second dimensions (d) must match"
        )
    return kind


def check_offsets(x_offsets: Any, c_offsets: Any, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
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
