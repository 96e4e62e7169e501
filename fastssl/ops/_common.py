"""Shared plumbing of fastssl.ops: implementation choice, Triton loading, input checks.

Importing this module never imports Triton: the kernels load on the first call that
resolves to impl="triton".
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from types import ModuleType

import torch

from fastssl._dispatch import resolve_impl

IMPLS = ("triton", "torch")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


@torch.compiler.assume_constant_result
def triton_installed() -> bool:
    """Whether ``import triton`` can succeed (checked without importing it)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # e.g. sys.modules["triton"] = None (blocked)
        return False


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def triton_unavailable(device: torch.device) -> str | None:
    """None when the Triton kernels can run on ``device``, else the reason in words."""
    if not triton_installed():
        return "Triton is not installed (pip install triton)"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if _interpreter_on():
            return None
        return ("the tensors are on the CPU and Triton runs there only under its "
                "interpreter: set TRITON_INTERPRET=1 in the environment before Triton is "
                "imported, or use impl='torch'")
    return f"Triton kernels do not run on device type {device.type!r}"


def resolve(op: str, impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """'triton' or 'torch' for these inputs ("auto": Triton for CUDA tensors when it is
    installed, else the PyTorch reference; float64 always takes the reference)."""

    def auto() -> str:
        if device.type == "cuda" and dtype != torch.float64 and triton_installed():
            return "triton"
        return "torch"

    def available(name: str) -> str | None:
        if name == "torch":
            return None
        return triton_unavailable(device)

    chosen = resolve_impl(op, impl, choices=IMPLS, auto=auto, available=available)
    if chosen == "triton" and dtype == torch.float64:
        raise TypeError(f"{op}: impl='triton' computes float32|float16|bfloat16; "
                        "float64 inputs run with impl='torch'")
    return chosen


def kernels(name: str) -> ModuleType:
    """fastssl.kernels.<name>, imported on first use (this is where Triton loads)."""
    return importlib.import_module(f"fastssl.kernels.{name}")


def device_ctx(t: torch.Tensor):
    """Triton launches on the tensor's own CUDA device (a no-op on the CPU)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def tuning(device: torch.device) -> dict:
    """Tile sizes: GPU-sized tiles on CUDA; under the CPU interpreter, where every
    program instance costs about a millisecond, as few and as large programs as fit."""
    if device.type == "cuda":
        return {"max_tile": 4096}
    return {"max_tile": 1 << 16}


def should_validate(validate: bool) -> bool:
    """Value checks need a host sync, impossible inside a torch.compile graph: they run
    in eager mode only (shape and dtype checks always run)."""
    return bool(validate) and not torch.compiler.is_compiling()


def check_tensor(t, name: str, ndim: int, dtypes: tuple, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {what}, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = "|".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; expected {names}")


def check_same_device(*named: tuple[str, torch.Tensor | None]) -> None:
    present = [(n, t) for n, t in named if t is not None]
    first_name, first = present[0]
    for n, t in present[1:]:
        if t.device != first.device:
            raise ValueError(f"{n} is on {t.device} but {first_name} is on {first.device}")


def index_flags(ids: torch.Tensor, upper: int, *, distinct: bool,
                permutation: bool = False) -> torch.Tensor:
    """(2,) bool on the device, no sync: (out of range, not distinct / not a permutation)
    for (B, n) ids in [0, upper)."""
    out_of_range = ((ids < 0) | (ids >= upper)).any()
    if not (distinct or permutation):
        return torch.stack([out_of_range, torch.zeros_like(out_of_range)])
    counts = torch.zeros(ids.shape[0], upper + 1, dtype=torch.int32, device=ids.device)
    safe = torch.where((ids >= 0) & (ids < upper), ids, upper).long()
    counts.scatter_add_(1, safe, torch.ones_like(safe, dtype=torch.int32))
    counts = counts[:, :upper]
    bad = (counts != 1).any() if permutation else (counts > 1).any()
    return torch.stack([out_of_range, bad])


def index_problems(ids: torch.Tensor, upper: int, *, distinct: bool,
                   permutation: bool = False) -> tuple[bool, bool]:
    """(out of range, not distinct / not a permutation) for (B, n) ids in [0, upper),
    with one host sync for both answers."""
    flags = index_flags(ids, upper, distinct=distinct, permutation=permutation).cpu()
    return bool(flags[0]), bool(flags[1])


def eager_function(forward, setup_context, backward):
    """The same op as a plain autograd.Function, for eager calls.

    The registered custom ops keep torch.compile graphs whole, but each call through the
    op dispatcher costs ~100 us of host time (measured on the 2-core box; a third of a
    small step there). Eager calls take this path instead: the same forward, the same
    setup_context and the same backward formula, called directly. Returns `apply`.
    """

    class _Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = forward(*inputs)
            setup_context(ctx, inputs, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    _Eager.__name__ = f"{getattr(forward, '__name__', 'op')}_eager"
    return _Eager.apply
