"""The engine seam: every assignment engine behind one small object.

An :class:`Engine` has a ``name`` ("cpu" | "cuda" | "triton" | "torch"), says where it
cannot run (:meth:`Engine.unavailable`), runs checked inputs (:meth:`Engine.run`) and
offers the public entry points bound to itself (:meth:`Engine.assign`,
:meth:`Engine.assign_grouped`). ``fastssl.assign.engine_for`` picks one, by the one
"auto" rule of fastssl.assign.dispatch; assign, assign_grouped, assign_topk, KMeans and
the curation jobs all run through it (as faiss's index abstraction behind ``assign_to``).

Engine modules load on first use: importing this seam imports no torch, Triton or
extension. Whether fastssl._C is built is asked by fastssl.assign (``needs``), so one
probe answers for every caller.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from fastssl.assign import arrays as _arrays

__all__ = ["Engine", "ENGINES", "IMPLS"]

_TOPK_ONLY_TORCH = ("only the PyTorch path computes top-k (impl='torch', on any device); "
                    "the fused engines keep one centroid per row")


def on_cuda(a: Any, kind: str) -> bool:
    """Whether an array of fastssl.assign.arrays kind ``kind`` lives on a CUDA device."""
    return kind == _arrays.CUPY or (kind == _arrays.TORCH and a.device.type == "cuda")


class Engine(ABC):
    """One assignment engine.

    Attributes:
        name: what ``impl=`` calls it.
        needs: the part of fastssl._C it needs built ("cpu" | "cuda"), or None.
    """

    name = ""
    needs: str | None = None

    def unavailable(self, op: str, x: Any, kind: str) -> str | None:
        """None when this engine can run ``op`` on inputs like ``x`` (placement and op
        only; the build is checked by fastssl.assign), else the reason in words."""
        if op == "assign_topk":
            return _TOPK_ONLY_TORCH
        return self._placement(op, x, kind)

    def _placement(self, op: str, x: Any, kind: str) -> str | None:
        return None

    @abstractmethod
    def run(self, op: str, x: Any, kind: str, centroids: Any, *, metric: str,
            chunk_rows: int | None, check_finite: bool,
            groups: tuple[np.ndarray, np.ndarray] | None, precision: str,
            topk: int | None = None) -> tuple[Any, Any]:
        """Checked inputs -> (labels, distances) in the caller's array type: (n,) int64
        and (n,) float32, or (n, topk) for assign_topk; ``groups`` (x_offsets,
        c_offsets) int64 host arrays for assign_grouped."""

    def assign(self, x: Any, centroids: Any, **kwargs) -> tuple[Any, Any]:
        """fastssl.assign.assign with this engine (``impl=self.name``)."""
        from fastssl.assign import assign

        return assign(x, centroids, impl=self.name, **kwargs)

    def assign_grouped(self, x: Any, x_offsets: Any, centroids: Any, c_offsets: Any,
                       **kwargs) -> tuple[Any, Any]:
        """fastssl.assign.assign_grouped with this engine (``impl=self.name``)."""
        from fastssl.assign import assign_grouped

        return assign_grouped(x, x_offsets, centroids, c_offsets, impl=self.name, **kwargs)

    def __repr__(self) -> str:
        return f"Engine({self.name!r})"


class CpuEngine(Engine):
    name, needs = "cpu", "cpu"

    def _placement(self, op, x, kind):
        if on_cuda(x, kind):
            return "x is on a CUDA device; impl='cpu' needs host memory"
        return None

    def run(self, op, x, kind, centroids, *, metric, chunk_rows, check_finite, groups,
            precision, topk=None):
        from fastssl.assign import cpu_engine

        return cpu_engine.run(x, kind, centroids, metric, chunk_rows, check_finite, groups,
                              precision)


class CudaEngine(Engine):
    name, needs = "cuda", "cuda"

    def _placement(self, op, x, kind):
        if not on_cuda(x, kind):
            return "x is in host memory; impl='cuda' needs a CUDA tensor or cupy array"
        return None

    def run(self, op, x, kind, centroids, *, metric, chunk_rows, check_finite, groups,
            precision, topk=None):
        from fastssl.assign import cuda_engine

        return cuda_engine.run(op, x, kind, centroids, metric, check_finite, groups,
                               centroid_precision=precision)


class TritonEngine(Engine):
    name = "triton"

    def _placement(self, op, x, kind):
        from fastssl.assign import triton_engine
        from fastssl.assign.common import device_of

        if op != "assign":
            return "the Triton kernel does plain assignment; assign_grouped runs with impl='cuda'"
        if kind == _arrays.NUMPY:
            return "x is a numpy array; impl='triton' needs a CUDA tensor or cupy array"
        return triton_engine.unavailable(device_of(x, kind))

    def run(self, op, x, kind, centroids, *, metric, chunk_rows, check_finite, groups,
            precision, topk=None):
        from fastssl.assign import triton_engine

        return triton_engine.run(op, x, kind, centroids, metric, check_finite,
                                 centroid_precision=precision)


class TorchEngine(Engine):
    name = "torch"

    def unavailable(self, op, x, kind):
        return None  # runs everywhere, every op

    def run(self, op, x, kind, centroids, *, metric, chunk_rows, check_finite, groups,
            precision, topk=None):
        from fastssl.assign import torch_engine

        return torch_engine.run(x, kind, centroids, metric, chunk_rows, check_finite, groups,
                                precision, topk)


ENGINES: dict[str, Engine] = {e.name: e for e in (CpuEngine(), CudaEngine(), TritonEngine(),
                                                  TorchEngine())}
IMPLS = tuple(ENGINES)
