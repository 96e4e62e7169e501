"""The "cuda" implementation of :func:`fastssl.assign.assign` / ``assign_grouped``.

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

from typing import Any

import numpy as np

from fastssl.assign import common
from fastssl._native import native

PRECISIONS = {"3xtf32": 2, "tf32": 1}
_DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}
_METRIC_CODES = {"l2": 0, "ip": 1, "cos": 1}

__all__ = ["run", "PRECISIONS"]


def _dtype_name(t) -> str:
    return str(t.dtype).replace("torch.", "")


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
    centroid_precision: str = "data",
) -> tuple[Any, Any]:
    """Assign rows of a device array on the GPU that holds it.

    Args:
        op: "assign" or "assign_grouped" (for messages).
        x: (n, d) torch CUDA tensor or cupy array, float32 | float16 | bfloat16 (float64
            is computed in float32).
        kind: "torch" or "cupy" (fastssl.assign.arrays).
        centroids: (k, d) any supported array; moved to x's device, rounded as
            ``centroid_precision`` says and held in x's dtype.
        metric: "l2" | "ip" | "cos".
        check_finite: raise ValueError naming the first row of x with NaN/inf.
        groups: None, or validated host int64 (x_offsets, c_offsets), each (G+1,).
        precision: float32 tensor-core mode ("3xtf32" | "tf32"); None = FASTSSL_CUDA_FP32
            (fastssl.assign.common.default_fp32_precision).
        centroid_precision: what the centroids are rounded to, "data" | "bf16"
            (fastssl.assign.common.centroid_dtype).
    Returns:
        labels (n,) int64, distances (n,) float32, as torch tensors (torch input) or cupy
        arrays (cupy input) on x's device.
    """
    import torch

    ext = native()
    if not hasattr(ext, "assign_cuda"):
        raise RuntimeError(f"{op}: fastssl._C was built without CUDA")
    name = common.default_fp32_precision() if precision is None else precision
    if name not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; expected one of {tuple(PRECISIONS)}")

    device = common.device_of(x, kind)
    stream_ctx, stream_ptr = common.stream_context(kind, device)
    with torch.cuda.device(device), stream_ctx:
        xt, c, c_sqnorm = common.device_operands(op, x, kind, centroids, metric, check_finite,
                                                   centroid_precision)
        xt, ldx = _kernel_view(xt)
        c, ldc = _kernel_view(c)
        n, d = xt.shape
        k = c.shape[0]
        labels = torch.empty(n, dtype=torch.int64, device=device)
        distances = torch.empty(n, dtype=torch.float32, device=device)
        x_sqnorm = torch.empty(n, dtype=torch.float32, device=device) if metric == "cos" else None
        args = dict(
            dtype=_DTYPE_CODES[_dtype_name(xt)],
            metric=_METRIC_CODES[metric],
            c_sqnorm_ptr=c_sqnorm.data_ptr() if c_sqnorm is not None else 0,
            labels_ptr=labels.data_ptr(),
            dist_ptr=distances.data_ptr(),
            x_sqnorm_ptr=x_sqnorm.data_ptr() if x_sqnorm is not None else 0,
            precision=PRECISIONS[name],
            stream_ptr=stream_ptr,
            device=device.index,
        )
        if groups is None:
            ext.assign_cuda(xt.data_ptr(), n, d, ldx, c.data_ptr(), k, ldc, **args)
        else:
            xo, co = groups
            ext.assign_grouped_cuda(xt.data_ptr(), n, d, ldx,
                                    np.ascontiguousarray(xo, dtype=np.int64),
                                    c.data_ptr(), k, ldc,
                                    np.ascontiguousarray(co, dtype=np.int64), **args)
        if x_sqnorm is not None:
            distances.div_(x_sqnorm.sqrt().clamp_min(common.COS_EPS))
        return common.as_callers_arrays(kind, labels, distances)
