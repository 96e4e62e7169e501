"""What the assignment engines share, below all of them.

``fastssl.assign.engines`` (the engine seam) imports the engines (``cpu_engine``,
``cuda_engine``, ``triton_engine``, ``torch_engine``); the engines import this module and
nothing from the public API in ``fastssl/assign/__init__.py``.
The cosine normalisation lives below this package, in ``fastssl.cosine``, because the
reference (``fastssl.reference.kmeans``) uses it too and must load no engine: the test
oracle and every engine multiply the very same rounded centroids.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Any

import numpy as np

from fastssl.assign import arrays as _arrays
from fastssl.cosine import COS_EPS, normalized_centroids  # the rule the oracle shares

# metric -> the native engines' code (0: squared L2, smallest wins; 1: inner product,
# largest wins; cos is the inner product with normalised centroids, divided by ||x||)
METRICS = {"l2": 0, "ip": 1, "cos": 1}
FP32_PRECISIONS = ("3xtf32", "tf32")
# What centroids are rounded to before any engine multiplies them (see centroid_dtype).
CENTROID_PRECISIONS = ("data", "bf16")

__all__ = ["COS_EPS", "METRICS", "FP32_PRECISIONS", "CENTROID_PRECISIONS", "centroid_dtype",
           "local_groups", "multiplied_centroids", "default_fp32_precision", "normalized_centroids",
           "first_nonfinite_row", "check_finite", "to_device_tensor", "stream_context",
           "device_of", "device_operands", "as_callers_arrays"]


@functools.lru_cache(maxsize=None)
def default_fp32_precision() -> str:
    """float32 tensor-core mode of the device engines: FASTSSL_CUDA_FP32 ("3xtf32", split
    tf32 products, about float32 accuracy, the default | "tf32", one product, ~1e-3
    relative error in x.c), read once."""
    value = os.environ.get("FASTSSL_CUDA_FP32", "3xtf32").strip().lower() or "3xtf32"
    if value not in FP32_PRECISIONS:
        raise ValueError(f"FASTSSL_CUDA_FP32={value!r}; expected one of {FP32_PRECISIONS}")
    return value


def centroid_dtype(x_dtype: str, precision: str = "data") -> str:
    """The dtype every engine rounds the centroids to before multiplying them with x.

    "data" (the default) never rounds below the data's precision: float16 rows meet
    float16 centroids, bfloat16 rows bfloat16 ones, float32/float64 rows float32 ones,
    and the products accumulate in float32 on every engine (CPU of any instruction set,
    CUDA, Triton, torch), so one job gives one tree on any machine up to ties. "bf16"
    (opt-in, for speed) rounds the centroids to bfloat16 whatever x is: AMX CPUs then
    multiply float16 rows on the tile unit, and every other engine uses the same
    rounded centroids, so results stay machine-independent in that mode too.
    """
    if precision not in CENTROID_PRECISIONS:
        raise ValueError(f"precision={precision!r}; expected one of {CENTROID_PRECISIONS}")
    if precision == "bf16":
        return "bfloat16"
    return x_dtype if x_dtype in ("float16", "bfloat16") else "float32"


def multiplied_centroids(c: Any, x_dtype: str, metric: str, precision: str = "data"):
    """The centroids exactly as every engine multiplies them with rows of dtype x_dtype.

    For "cos" normalised in float64 (:func:`normalized_centroids`); then rounded to
    float32 and from there to :func:`centroid_dtype` (the same two round-to-nearest-even
    steps on every device), and returned in float32, which holds those values exactly.

    Args:
        c: (k, d) torch tensor, numpy array or cupy array, any float dtype.
        x_dtype: the rows' dtype name ("float32", "float16", "bfloat16", "float64").
        metric: "l2" | "ip" | "cos".
        precision: "data" | "bf16" (see :func:`centroid_dtype`).
    Returns:
        (k, d) float32 torch tensor on c's device (a CPU tensor for numpy input).
    """
    import torch

    target = getattr(torch, centroid_dtype(x_dtype, precision))
    if isinstance(c, np.ndarray):
        c = to_device_tensor(c, "cpu")
    elif not isinstance(c, torch.Tensor):  # cupy
        c = torch.from_dlpack(c)
    c = normalized_centroids(c, torch.float32) if metric == "cos" else c.detach().float()
    if target == torch.float32:
        return c
    rounded = c.to(target)
    if target == torch.float16 and not bool(torch.isfinite(rounded).all()):
        row = first_nonfinite_row(rounded)
        raise ValueError(f"centroids row {row} does not fit float16 (|value| > 65504), the "
                         "precision of x: pass x as float32")
    return rounded.float()


def first_nonfinite_row(a: Any) -> int | None:
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


def check_finite(a: Any, name: str, offset: int = 0) -> None:
    """ValueError naming the first row of ``a`` (numbered from ``offset``) with NaN/inf."""
    row = first_nonfinite_row(a)
    if row is not None:
        raise ValueError(
            f"{name} row {offset + row} holds NaN or inf (pass check_finite=False to skip "
            "this check)"
        )


def to_device_tensor(a: Any, device):
    """Any supported array as a torch tensor on ``device`` (no copy when already there)."""
    import torch

    if isinstance(a, torch.Tensor):
        t = a.detach()
    elif isinstance(a, np.ndarray):
        host = np.ascontiguousarray(a)
        if _arrays.dtype_name(a) == "bfloat16":
            t = torch.from_numpy(host.view(np.int16)).view(torch.bfloat16)
        else:
            t = torch.from_numpy(host)
    else:  # cupy
        t = torch.from_dlpack(a)
    return t.to(device=device, non_blocking=False)


def stream_context(kind: str, device):
    """(context, stream pointer): the caller's current stream (cupy's for cupy input).

    Inside the context torch's current stream is the caller's, so torch ops and Triton
    launches (which use torch's current stream) run on it.
    """
    import torch

    torch_stream = torch.cuda.current_stream(device)
    if kind != _arrays.CUPY:
        return contextlib.nullcontext(), int(torch_stream.cuda_stream)
    import cupy

    with cupy.cuda.Device(device.index):
        ptr = int(cupy.cuda.get_current_stream().ptr)
    if ptr == int(torch_stream.cuda_stream):
        return contextlib.nullcontext(), ptr
    return torch.cuda.stream(torch.cuda.ExternalStream(ptr, device=device)), ptr


def device_of(x: Any, kind: str):
    """The torch.device of a CUDA tensor or cupy array."""
    import torch

    if kind == _arrays.CUPY:
        return torch.device("cuda", int(x.device.id))
    return x.device


def device_operands(op: str, x: Any, kind: str, centroids: Any, metric: str,
                    check_finite_x: bool, centroid_precision: str = "data"):
    """x and centroids as the engines multiply them, on x's device and current stream.

    Args:
        x: (n, d) torch tensor or cupy array, float32 | float16 | bfloat16 | float64
            (float64 is computed in float32).
        centroids: (k, d) any supported array; moved to x's device, rounded by
            :func:`multiplied_centroids` and held in x's compute dtype (exactly: "bf16"
            centroids fit float16 but for magnitudes below 2**-14).
        centroid_precision: "data" | "bf16" (see :func:`centroid_dtype`).
    Returns:
        xt (n, d) torch tensor, c (k, d) torch tensor of xt's dtype, and c_sqnorm (k,)
        float32 for "l2" (None otherwise).
    """
    import torch

    xt = torch.from_dlpack(x) if kind == _arrays.CUPY else x.detach()
    if xt.dtype == torch.float64:
        xt = xt.float()
    if xt.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{op}: x has dtype {xt.dtype}; expected float32, float16 or bfloat16")
    if check_finite_x:
        check_finite(xt, "x")
    c = to_device_tensor(centroids, xt.device)
    c = multiplied_centroids(c, _arrays.dtype_name(xt), metric, centroid_precision).to(xt.dtype)
    c_sqnorm = c.float().square().sum(1) if metric == "l2" else None
    return xt, c, c_sqnorm


def as_callers_arrays(kind: str, labels, distances):
    """torch results as cupy arrays for cupy callers (zero-copy), else unchanged."""
    if kind == _arrays.CUPY:
        import cupy

        return cupy.from_dlpack(labels), cupy.from_dlpack(distances)
    return labels, distances


def local_groups(groups: tuple[np.ndarray, np.ndarray], start: int, stop: int):
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
