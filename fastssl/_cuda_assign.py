"""The "cuda" implementation of :func:`fastssl.kmeans.assign` / ``assign_grouped``.

Hands device pointers to the native CUDA engine (``fastssl._C.assign_cuda``): a fused
tensor-core x.c + running argmin that never builds the n x k score matrix. Everything
here is preparation: torch views of the inputs (cupy through DLPack, zero-copy), the
centroids moved to x's device and cast to x's dtype, 16-byte aligned row strides,
||c||^2, the outputs, and the caller's current stream.

float32 inputs multiply on the tensor cores in split-tf32 ("3xtf32", about float32
accuracy) by default; ``FASTSSL_CUDA_FP32=tf32`` (read once) or ``run(..., precision=
"tf32")`` selects single tf32 products (faster, ~1e-3 relative error in x.c).
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Any

import numpy as np

from fastssl import _arrays
from fastssl._native import native

PRECISIONS = {"3xtf32": 2, "tf32": 1}
_DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}
_METRIC_CODES = {"l2": 0, "ip": 1, "cos": 1}
_COS_EPS = 1e-12

__all__ = ["run", "PRECISIONS", "default_precision"]


@functools.lru_cache(maxsize=None)
def default_precision() -> str:
    """float32 tensor-core mode: FASTSSL_CUDA_FP32 ("3xtf32" | "tf32"), read once."""
    value = os.environ.get("FASTSSL_CUDA_FP32", "3xtf32").strip().lower() or "3xtf32"
    if value not in PRECISIONS:
        raise ValueError(f"FASTSSL_CUDA_FP32={value!r}; expected one of {tuple(PRECISIONS)}")
    return value


def _dtype_name(t) -> str:
    return str(t.dtype).replace("torch.", "")


def _to_device_tensor(a: Any, device):
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


def _kernel_view(t):
    """(tensor, ld): rows contiguous, 16-byte aligned start and row stride (copies if not)."""
    import torch

    n, d = t.shape
    if d > 1 and t.stride(1) != 1:
        t = t.contiguous()
    align = 16 // t.element_size()
    padded = -(-d // align) * align
    ld = t.stride(0) if n > 1 else padded  # a single row: the stride is never used
    if ld >= d and ld % align == 0 and t.data_ptr() % 16 == 0:
        return t, ld
    buf = torch.empty((n, padded), dtype=t.dtype, device=t.device)
    buf[:, :d].copy_(t)
    return buf[:, :d], padded


def _stream_context(kind: str, device):
    """(context, stream pointer): the caller's current stream (cupy's for cupy input)."""
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


def run(
    op: str,
    x: Any,
    kind: str,
    centroids: Any,
    metric: str,
    check_finite: bool,
    groups: tuple[np.ndarray, np.ndarray] | None,
    *,
    precision: str | None = None,
) -> tuple[Any, Any]:
    """Assign rows of a device array on the GPU that holds it.

    Args:
        op: "assign" or "assign_grouped" (for messages).
        x: (n, d) torch CUDA tensor or cupy array, float32 | float16 | bfloat16 (float64
            is computed in float32).
        kind: "torch" or "cupy" (fastssl._arrays).
        centroids: (k, d) any supported array; moved to x's device, cast to x's dtype
            (for "cos" normalised in float32 first).
        metric: "l2" | "ip" | "cos".
        check_finite: raise ValueError naming the first row of x with NaN/inf.
        groups: None, or validated host int64 (x_offsets, c_offsets), each (G+1,).
        precision: float32 tensor-core mode ("3xtf32" | "tf32"); None = default_precision().
    Returns:
        labels (n,) int64, distances (n,) float32, as torch tensors (torch input) or cupy
        arrays (cupy input) on x's device.
    """
    import torch

    from fastssl.kmeans import _check_finite

    ext = native()
    if not hasattr(ext, "assign_cuda"):
        raise RuntimeError(f"{op}: fastssl._C was built without CUDA")
    name = default_precision() if precision is None else precision
    if name not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; expected one of {tuple(PRECISIONS)}")
    prec = PRECISIONS[name]

    if kind == _arrays.CUPY:
        import cupy

        device = torch.device("cuda", int(x.device.id))
    else:
        device = x.device
    stream_ctx, stream_ptr = _stream_context(kind, device)

    with torch.cuda.device(device), stream_ctx:
        xt = torch.from_dlpack(x) if kind == _arrays.CUPY else x.detach()
        if xt.dtype == torch.float64:
            xt = xt.float()
        compute = xt.dtype
        dtype_code = _DTYPE_CODES.get(_dtype_name(xt))
        if dtype_code is None:
            raise TypeError(f"{op}: x has dtype {xt.dtype}; expected float32, float16 or bfloat16")
        xt, ldx = _kernel_view(xt)
        if check_finite:
            _check_finite(xt, "x")

        c = _to_device_tensor(centroids, device)
        if metric == "cos":
            c = torch.nn.functional.normalize(c.float(), dim=1, eps=_COS_EPS)
        c = c.to(compute)
        c, ldc = _kernel_view(c)
        c_sqnorm = c.float().square().sum(1) if metric == "l2" else None

        n, d = xt.shape
        k = c.shape[0]
        labels = torch.empty(n, dtype=torch.int64, device=device)
        distances = torch.empty(n, dtype=torch.float32, device=device)
        x_sqnorm = torch.empty(n, dtype=torch.float32, device=device) if metric == "cos" else None
        common = dict(
            dtype=dtype_code,
            metric=_METRIC_CODES[metric],
            c_sqnorm_ptr=c_sqnorm.data_ptr() if c_sqnorm is not None else 0,
            labels_ptr=labels.data_ptr(),
            dist_ptr=distances.data_ptr(),
            x_sqnorm_ptr=x_sqnorm.data_ptr() if x_sqnorm is not None else 0,
            precision=prec,
            stream_ptr=stream_ptr,
            device=device.index,
        )
        if groups is None:
            ext.assign_cuda(xt.data_ptr(), n, d, ldx, c.data_ptr(), k, ldc, **common)
        else:
            xo, co = groups
            ext.assign_grouped_cuda(xt.data_ptr(), n, d, ldx,
                                    np.ascontiguousarray(xo, dtype=np.int64),
                                    c.data_ptr(), k, ldc,
                                    np.ascontiguousarray(co, dtype=np.int64), **common)
        if x_sqnorm is not None:
            distances.div_(x_sqnorm.sqrt().clamp_min(_COS_EPS))

        if kind == _arrays.CUPY:
            return cupy.from_dlpack(labels), cupy.from_dlpack(distances)
        return labels, distances
