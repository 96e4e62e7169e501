"""The one place that turns ``impl="auto"`` into an assignment engine.

``fastssl.assign.assign``, ``assign_grouped``, ``assign_topk``, KMeans and the curation
jobs all ask :func:`auto_engine` (through ``fastssl.assign.engine_for`` / the ops' impl
resolution); nothing else decides which engine runs on a device.

The rule, for ``impl="auto"`` (FASTSSL_IMPL, handled by fastssl._dispatch, replaces
"auto" before this is asked; an explicit impl never reaches here and never falls back):

host memory       "cpu" (the native engine), "torch" without fastssl._C.
a CUDA device     1. AUTO_DEVICE_ENGINE's measured entry for the device's compute
                     capability major, when that engine can run here;
                  2. plain assign: "triton" when the kernel is compiled for the device
                     (Triton imports and the capability is one the kernel's configs and
                     offline compile cover: sm_80, sm_90), else
                  3. "cuda" when fastssl._C has its CUDA engine, else "torch" (on the GPU).
                  assign_grouped has no Triton kernel: "cuda", else "torch".
assign_topk       "torch" everywhere (the fused engines keep one centroid per row).

The chosen engine is logged once per process and (op, device, engine), at INFO.
"""
from __future__ import annotations

import logging
from typing import Any

from fastssl._native import has_cpu_ext, has_cuda_ext

log = logging.getLogger("fastssl.kmeans")  # the name users filter on, kept from before the move

# impl="auto" for plain assign on a device, by compute capability major, from a measured
# run of bench/gpu_kmeans.py (the engine with the higher rate at d = 128..1024, bf16).
# Nothing is recorded yet; an entry here wins over the rule above when it can run.
AUTO_DEVICE_ENGINE: dict[int, str] = {}

OPS = ("assign", "assign_grouped", "assign_topk")
_logged: set[tuple[str, str, str]] = set()

__all__ = ["AUTO_DEVICE_ENGINE", "OPS", "auto_engine", "choose"]


def _capability(device) -> tuple[int, int]:
    import torch

    return tuple(torch.cuda.get_device_capability(device))


def _triton_unready(device, capability: tuple[int, int]) -> str | None:
    """None when the Triton kernel is compiled for this device, else why not."""
    from fastssl.assign import triton_engine

    return triton_engine.auto_unavailable(device, capability)


def choose(op: str, device) -> tuple[str, str]:
    """(engine, reason in words) that "auto" picks for ``op`` on ``device`` (see module
    docstring). ``device``: a torch.device; "cuda" means a CUDA device, anything else
    host memory (including the CPU under TRITON_INTERPRET=1)."""
    if op not in OPS:
        raise ValueError(f"op={op!r}; expected one of {OPS}")
    if op == "assign_topk":
        return "torch", "only the PyTorch path computes top-k"
    if device.type != "cuda":
        if has_cpu_ext():
            return "cpu", "host memory, fastssl._C is built"
        return "torch", "host memory, fastssl._C is not built"
    capability = _capability(device)
    arch = f"sm_{capability[0]}{capability[1]}"
    triton_why = _triton_unready(device, capability) if op == "assign" else (
        "the Triton kernel does plain assignment only")
    runnable = {"triton": triton_why is None, "cuda": has_cuda_ext(), "torch": True}
    measured = AUTO_DEVICE_ENGINE.get(capability[0]) if op == "assign" else None
    if measured is not None and runnable.get(measured, False):
        return measured, f"{arch}: AUTO_DEVICE_ENGINE's measured entry"
    if runnable["triton"]:
        return "triton", f"{arch}: the Triton kernel is compiled for it"
    if runnable["cuda"]:
        return "cuda", f"{arch}: {triton_why}; fastssl._C has its CUDA engine"
    return "torch", f"{arch}: {triton_why}; fastssl._C has no CUDA engine"


def auto_engine(op: str, device) -> str:
    """The engine "auto" runs ``op`` with on ``device``; logs the choice once."""
    engine, why = choose(op, device)
    key = (op, str(device), engine)
    if key not in _logged:
        _logged.add(key)
        log.info("%s impl='auto' on %s: %s (%s)", op, device, engine, why)
    return engine


def device_of_array(a: Any, kind: str):
    """The torch.device holding an array of fastssl.assign.arrays kind ``kind`` (numpy: cpu)."""
    import torch

    from fastssl.assign import arrays as _arrays
    from fastssl.assign.common import device_of

    if kind == _arrays.NUMPY:
        return torch.device("cpu")
    return device_of(a, kind)
