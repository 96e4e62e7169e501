"""fastssl: self-supervised pretraining on structured medical images.

Two workflows share this package: multi-view masked autoencoding for paired chest
radiographs, and hierarchical k-means curation of pathology tile embeddings.

Importing fastssl is cheap and safe anywhere: it touches no GPU, compiles nothing and
works without Triton or the native extension. Submodules load on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module that defines it; resolved on first attribute access.
_LAZY = {
    "assign_grouped": "fastssl.assign",
    "DataError": "fastssl.errors",
    "MissingDependencyError": "fastssl.errors",
}
_SUBMODULES = {
    "assign", "kmeans", "ops", "reference", "data", "models", "curation", "train", "eval",
    "distributed", "cli", "errors", "kernels", "profiling", "demo",
}

# "assign" is the assignment package, callable as the function fastssl.assign.assign.
__all__ = sorted(set(_LAZY) | {"assign"}) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        module = importlib.import_module(f"fastssl.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'fastssl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)
