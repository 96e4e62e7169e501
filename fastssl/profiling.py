"""NVTX ranges, so that `nsys profile` shows the phases of fastssl's loops by name.

The training step (forward, backward, optimizer) and each k-means iteration (assign,
update, all-reduce) are annotated. Ranges go through the `nvtx` package when it is
installed (the `profile` extra: works with or without CUDA), else torch's CUDA NVTX
bindings on a GPU machine, else nowhere (a no-op context manager).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, ContextManager


@functools.lru_cache(maxsize=None)
def _backend() -> Callable[[str], ContextManager] | None:
    try:
        import nvtx

        return lambda name: nvtx.annotate(name, domain="fastssl")
    except ImportError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.nvtx.range
    except ImportError:
        pass
    return None


def annotate(name: str) -> ContextManager:
    """A named range around a block: ``with annotate("kmeans/assign"): ...``."""
    backend = _backend()
    return backend(name) if backend is not None else contextlib.nullcontext()
