"""The "triton" implementation of :func:`fastssl.assign.assign` (plain assignment only).

Prepares the operands (shared with the CUDA engine: ``fastssl.assign.common``), runs
the fused kernel of ``fastssl.kernels.assign`` on the caller's current stream, and
turns its per-row best score into the distance the API reports:
    l2   ||x||^2 + min_j (||c_j||^2 - 2 x.c_j), clamped at 0
    ip   max_j x.c_j
    cos  max_j x.c_j / max(||x||, 1e-12)   (centroids normalised in float64, once)
Triton is imported on the first call, never by ``import fastssl``.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from typing import Any

from fastssl.assign import common

__all__ = ["run", "unavailable", "auto_unavailable"]


def unavailable(device) -> str | None:
    """None when the Triton kernel can run on ``device``, else the reason in words."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton)"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "") == "1":
        return None
    return ("x is in host memory; impl='triton' needs a CUDA tensor or cupy array (or "
            "TRITON_INTERPRET=1, Triton's CPU interpreter, for tests)")


def auto_unavailable(device, capability: tuple[int, int]) -> str | None:
    """None when impl="auto" may pick the Triton kernel on this CUDA device: Triton
    imports and ``capability`` is one the kernel is compiled and sized for
    (fastssl.kernels.assign.ARCHS); else the reason in words. An explicit impl="triton"
    is not limited to those (see :func:`unavailable`)."""
    try:
        kernel = importlib.import_module("fastssl.kernels.assign")
    except ImportError as exc:  # not installed, or a Triton that does not import
        return f"Triton does not import ({exc})"
    if tuple(capability) not in kernel.ARCHS:
        known = ", ".join(f"sm_{a}{b}" for a, b in kernel.ARCHS)
        return (f"the Triton kernel is compiled and tuned for {known}, not "
                f"sm_{capability[0]}{capability[1]}")
    return None


def _unit_inner_stride(t):
    return t if t.stride(1) == 1 or t.shape[1] == 1 else t.contiguous()


def run(
    op: str,
    x: Any,
    kind: str,
    centroids: Any,
    metric: str,
    check_finite: bool,
    *,
    precision: str | None = None,
    centroid_precision: str = "data",
    config: Any = None,
    splits: int | None = None,
    use_tma: bool | None = None,
) -> tuple[Any, Any]:
    """Assign rows of a device array (or a CPU tensor under TRITON_INTERPRET=1).

    Args:
        op: "assign" (for messages).
        x: (n, d) torch tensor or cupy array, float32 | float16 | bfloat16 (float64 is
            computed in float32).
        kind: "torch" or "cupy" (fastssl.assign.arrays).
        centroids: (k, d) any supported array; moved to x's device, rounded as
            ``centroid_precision`` says and held in x's dtype.
        metric: "l2" | "ip" | "cos".
        check_finite: raise ValueError naming the first row of x with NaN/inf.
        precision: float32 mode, "3xtf32" | "tf32"; None = FASTSSL_CUDA_FP32.
        centroid_precision: what the centroids are rounded to, "data" | "bf16"
            (fastssl.assign.common.centroid_dtype).
        config, splits, use_tma: overrides for fastssl.kernels.assign.assign_partial
            (benchmarks and tests).
    Returns:
        labels (n,) int64 (ties: the lowest index), distances (n,) float32, in the
        caller's array type on x's device.
    """
    import torch

    kernel = importlib.import_module("fastssl.kernels.assign")
    name = common.default_fp32_precision() if precision is None else precision
    if name not in common.FP32_PRECISIONS:
        raise ValueError(f"precision={precision!r}; expected one of {common.FP32_PRECISIONS}")
    device = common.device_of(x, kind)
    on_gpu = device.type == "cuda"
    stream_ctx = common.stream_context(kind, device)[0] if on_gpu else None
    device_ctx = torch.cuda.device(device) if on_gpu else contextlib.nullcontext()
    with device_ctx, stream_ctx or contextlib.nullcontext():
        xt, c, c_sqnorm = common.device_operands(op, x, kind, centroids, metric, check_finite,
                                                   centroid_precision)
        xt, c = _unit_inner_stride(xt), _unit_inner_stride(c)
        best, idx = kernel.assign_partial(xt, c, c_sqnorm, precision=name, config=config,
                                          splits=splits, use_tma=use_tma)
        labels, score = kernel.finish(best, idx)
        return common.as_callers_arrays(kind, labels, _distances(kernel, score, xt, metric))


def _distances(kernel, score, xt, metric: str):
    """The reported distance from the kernel's best score (see the module docstring)."""
    if metric == "ip":
        return score.neg_()
    x_sq = kernel.row_sqnorms(xt)
    if metric == "l2":
        return score.add_(x_sq).clamp_min_(0.0)
    return score.neg_().div_(x_sq.sqrt_().clamp_min_(common.COS_EPS))

