"""Loads the native extension ``fastssl._C`` once, lazily.

``import fastssl`` never imports the extension; the first op that needs it does. When it
is missing (a source checkout that was never built, a broken wheel) the op raises
:class:`~fastssl.errors.MissingDependencyError` naming what to do, and ``impl="auto"``
falls back to the PyTorch reference.
"""
from __future__ import annotations

import functools
from types import ModuleType

from fastssl.errors import MissingDependencyError


@functools.lru_cache(maxsize=None)
def _load() -> tuple[ModuleType | None, str]:
    try:
        from fastssl import _C  # type: ignore[attr-defined]
    except ImportError as exc:  # not built, or built for another Python
        return None, str(exc)
    return _C, ""


def native() -> ModuleType:
    """The extension module, or a MissingDependencyError saying how to build it."""
    module, why = _load()
    if module is None:
        raise MissingDependencyError(
            "the native extension fastssl._C is not available "
            f"({why}); build it with `pip install --no-build-isolation -e .`"
        )
    return module


def has_cpu_ext() -> bool:
    """True when fastssl._C imported (its CPU path is always compiled)."""
    return _load()[0] is not None


def has_cuda_ext() -> bool:
    """True when fastssl._C was compiled with its CUDA kernels."""
    module = _load()[0]
    return module is not None and bool(module.has_cuda())


def build_info() -> dict:
    """What the extension was built with (compiler, ISA paths, CUDA archs); {} if absent."""
    module = _load()[0]
    return dict(module.build_info()) if module is not None else {}
