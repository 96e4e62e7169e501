"""Shared set-up of the MVMAE tests: a tiny phantom cache and one-thread torch."""
from __future__ import annotations

import os

import torch


def phantom_cache(root, studies: int = 40, size: int = 32) -> str:
    """phantom (DICOM, MIMIC-CXR layout) -> prepare_cache; returns the cache directory.
    Most studies have both views; 70/10/20 train/validate/test by subject."""
    from fastssl.data.cache import prepare_cache
    from fastssl.data.phantom import generate_phantom

    src, cache = os.path.join(root, "phantom"), os.path.join(root, "cache")
    generate_phantom(src, studies, seed=0, size=max(32, size), workers=1, both_views_fraction=0.8,
                     split=(0.7, 0.1, 0.2), progress=False)
    prepare_cache(src, cache, size=size, shard_size=64, workers=1, progress=False)
    return cache


class one_thread:
    """Tiny models on a shared 2-core machine run 5x faster on one thread (no spinning)."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)
