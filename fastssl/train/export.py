"""Deprecated location of the encoder export: it lives in :mod:`fastssl.models.export`.

Kept for one release so that ``from fastssl.train.export import load_encoder`` keeps
working; every name is forwarded with a ``DeprecationWarning``. The module moved because
evaluation and plotting need the loader and must not import the training layer.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Any

_NEW = "fastssl.models.export"


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    value = getattr(importlib.import_module(_NEW), name)
    warnings.warn(f"fastssl.train.export.{name} moved to {_NEW}.{name}; the old path goes in the next release",
                  DeprecationWarning, stacklevel=2)
    return value
