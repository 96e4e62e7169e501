"""Deprecated: nearest-centroid assignment moved to :mod:`fastssl.assign`.

``fastssl.kmeans.assign`` (and ``assign_grouped``, ``assign_topk``, ``resolved_engine``,
``METRICS``, ``IMPLS``, ``AUTO_DEVICE_ENGINE``) keep working for one release and warn
with a DeprecationWarning on access; import them from ``fastssl.assign`` instead. The
k-means loop is fastssl.curation.kmeans, the float64 oracle fastssl.reference.kmeans.
"""
from __future__ import annotations

import warnings
from typing import Any

_MOVED = ("assign", "assign_grouped", "assign_topk", "resolved_engine", "METRICS", "IMPLS",
          "AUTO_DEVICE_ENGINE")

__all__ = list(_MOVED)


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module 'fastssl.kmeans' has no attribute {name!r}")
    warnings.warn(f"fastssl.kmeans.{name} moved to fastssl.assign.{name}; fastssl.kmeans "
                  "will be removed in the next release", DeprecationWarning, stacklevel=2)
    import fastssl.assign

    return getattr(fastssl.assign, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MOVED))
