"""NVTX ranges: a no-op without a backend, named ranges through the nvtx package."""
from __future__ import annotations

import contextlib
import sys
import types

import numpy as np

from fastssl import profiling


def test_annotate_without_backend_is_a_noop(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvtx", None)  # not installed
    profiling._backend.cache_clear()
    try:
        with profiling.annotate("anything"):
            pass
    finally:
        profiling._backend.cache_clear()


def test_kmeans_iterations_are_annotated(monkeypatch, rng):
    seen = []
    fake = types.ModuleType("nvtx")

    @contextlib.contextmanager
    def annotate(name, domain=None):
        seen.append((domain, name))
        yield

    fake.annotate = annotate
    monkeypatch.setitem(sys.modules, "nvtx", fake)
    profiling._backend.cache_clear()
    try:
        from fastssl.curation import KMeans, KMeansConfig

        x = rng.standard_normal((400, 8)).astype(np.float32)
        KMeans(KMeansConfig(k=4, iterations=2, chunk_size=100, progress=False)).fit(x)
    finally:
        profiling._backend.cache_clear()
    names = [n for d, n in seen if d == "fastssl"]
    assert names.count("kmeans/assign") == 8  # 4 chunks x 2 iterations
    assert names.count("kmeans/update") == 8 and names.count("kmeans/all_reduce") == 2
