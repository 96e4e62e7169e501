"""Shared pytest setup: device markers and deterministic random inputs."""
from __future__ import annotations

import os
import zlib

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is visible on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _no_pretrain_plots(request, monkeypatch):
    """Finished pretrain runs draw their PNGs (seconds each); tests skip that unless marked
    ``plots`` (tests/test_plots.py tests the drawing itself)."""
    if "plots" in request.keywords:
        return
    from fastssl.train import pretrain

    monkeypatch.setattr(pretrain, "_write_plots", lambda cfg: None)


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A fresh generator per test, seeded from the test's name (reproducible, not zeros)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)
