"""Array interop: numpy (including np.memmap), torch (CPU or CUDA) and cupy.

Ops accept any of them and return the caller's type. Helpers here identify the kind of
an array, describe its dtype without importing optional libraries, and cut large host
arrays into row chunks so that a memory-mapped file is streamed, never loaded whole.
"""
from __future__ import annotations

import sys
from typing import Any, Iterator

import numpy as np

NUMPY, TORCH, CUPY = "numpy", "torch", "cupy"

# Rows of a memory-mapped input read per chunk when the caller gives no chunk_size.
DEFAULT_CHUNK_BYTES = 64 << 20


def array_kind(a: Any, name: str) -> str:
    """'numpy', 'torch' or 'cupy'; TypeError naming the argument otherwise."""
    if isinstance(a, np.ndarray):
        return NUMPY
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(a, torch.Tensor):
        if a.layout != torch.strided:
            raise TypeError(f"{name} is a sparse torch tensor ({a.layout}); pass {name}.to_dense()")
        return TORCH
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(a, cupy.ndarray):
        return CUPY
    raise TypeError(
        f"{name} must be a numpy array, a torch tensor or a cupy array, got {type(a).__name__}"
    )


def dtype_name(a: Any) -> str:
    """'float32', 'float16', 'bfloat16', 'float64', ... for any supported array."""
    dt = a.dtype
    name = getattr(dt, "name", None)
    if name is None or not isinstance(name, str):  # torch.dtype has no .name
        name = str(dt).replace("torch.", "")
    return name


def is_memmap(a: Any) -> bool:
    return isinstance(a, np.memmap) or (
        isinstance(a, np.ndarray) and isinstance(getattr(a, "base", None), np.memmap)
    )


def default_chunk_rows(a: Any, row_bytes: int) -> int:
    return max(1, DEFAULT_CHUNK_BYTES // max(1, row_bytes))


def row_chunks(n: int, chunk_rows: int | None) -> Iterator[tuple[int, int]]:
    """(start, stop) pairs covering range(n) in steps of chunk_rows (all at once if None)."""
    step = n if not chunk_rows else int(chunk_rows)
    for start in range(0, n, max(step, 1)):
        yield start, min(n, start + step)


def host_words(a: np.ndarray) -> tuple[np.ndarray, bool]:
    """A numpy array the native layer reads, and whether its 2-byte words are bfloat16.

    Accepts float32, float16 and ml_dtypes' bfloat16; rows are made contiguous if needed.
    """
    is_bf16 = dtype_name(a) == "bfloat16"
    if is_bf16:
        a = a.view(np.uint16)
    if a.ndim == 2 and a.shape[1] > 0 and a.strides[1] != a.itemsize:
        a = np.ascontiguousarray(a)
    return a, is_bf16


def torch_to_host_words(t: "torch.Tensor") -> tuple[np.ndarray, bool]:
    """Zero-copy numpy view of a CPU tensor (bfloat16 viewed as uint16 words)."""
    import torch

    if t.dim() == 2 and t.stride(1) != 1:
        t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16), True
    return t.numpy(), False


def _native_rows(a: np.ndarray) -> bool:
    """True when the native engine can read ``a`` as is: native byte order, unit column
    stride, and a positive row stride of at least one row (no reversed or broadcast rows)."""
    if not a.dtype.isnative:
        return False
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        return True
    if a.shape[1] > 1 and a.strides[1] != a.itemsize:
        return False
    return a.shape[0] == 1 or a.strides[0] >= a.shape[1] * a.itemsize


def host_rows(a: np.ndarray, *, copy: bool = False) -> np.ndarray:
    """``a`` itself when the engine reads it as is (and not ``copy``), else one native-order,
    C-contiguous copy (big-endian input, ``x[::-1]``, ``np.broadcast_to`` views). For a chunk
    of a memmap (``copy=True``) this is where its rows are read."""
    if _native_rows(a) and not copy:
        return a
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("="))


def native_layout(a: Any) -> Any:
    """An (n, d) input in a layout every assignment path reads: numpy arrays are converted by
    :func:`host_rows` (one copy, and only when needed), except memory-mapped ones, whose
    chunks are converted one at a time as they are streamed; non-contiguous torch tensors
    (``expand``, transposes) become contiguous. Other arrays pass unchanged."""
    if isinstance(a, np.ndarray):
        return a if is_memmap(a) else host_rows(a)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(a, torch.Tensor) and not a.is_contiguous():
        return a.contiguous()
    return a
