"""Synthetic long-tailed embeddings: the demonstration data for curation.

A few super-families, each a cloud of Gaussian components whose sizes follow a Zipf
law, so that a handful of components hold most points (like the common tissue types of
pathology tiles) and most components are rare.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fastssl.atomic import atomic_save_npy

__all__ = ["long_tailed_mixture", "zipf_sizes"]


def zipf_sizes(n: int, components: int, zipf_a: float, rng: np.random.Generator) -> np.ndarray:
    """(components,) int64 sizes summing to n, proportional to 1 / rank^a, each >= 1.

    Component order is shuffled so that size is unrelated to the component index.
    """
    if components > n:
        raise ValueError(f"components={components} exceeds n={n}: every component needs a point")
    w = 1.0 / np.arange(1, components + 1, dtype=np.float64) ** float(zipf_a)
    extra = n - components
    sizes = 1 + np.floor(w / w.sum() * extra).astype(np.int64)
    short = n - int(sizes.sum())  # largest remainders first
    frac = w / w.sum() * extra - np.floor(w / w.sum() * extra)
    sizes[np.argsort(-frac, kind="stable")[:short]] += 1
    return sizes[rng.permutation(components)]


def long_tailed_mixture(
    n: int,
    d: int,
    components: int,
    zipf_a: float = 1.1,
    families: int = 8,
    seed: int = 0,
    *,
    dtype: str | np.dtype = np.float32,
    family_scale: float = 4.0,
    component_scale: float = 1.5,
    noise: float = 0.5,
    out_dir: str | os.PathLike | None = None,
    shard_rows: int = 262_144,
):
    """Points from a Zipf-sized Gaussian mixture grouped into super-families.

    Family centres ~ N(0, family_scale^2 I); component centres = family centre +
    N(0, component_scale^2 I); points = component centre + N(0, noise^2 I). Points are in
    random order.

    Args:
        n, d: number of points and dimension.
        components: number of Gaussian components (ground-truth groups).
        zipf_a: exponent of the component-size law (1.1 in the demonstration).
        families: super-families the components are spread over (round-robin).
        seed: all randomness.
        dtype: float32 or float16 points.
        out_dir: if given, points go to ``points_00000.npy``... shards of ``shard_rows``
            rows (generated shard by shard, never all in memory) plus
            ``components.npy`` and ``families.npy``.
    Returns:
        (points (n, d), component labels (n,) int32, family labels (n,) int32); with
        out_dir, points is the list of shard paths.
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float16):
        raise TypeError(f"dtype must be float32 or float16, got {dtype}")
    if families < 1 or components < 1 or n < 1 or d < 1:
        raise ValueError("n, d, components and families must be >= 1")
    rng = np.random.default_rng(seed)
    fam_centres = rng.standard_normal((families, d)) * family_scale
    comp_family = np.arange(components) % families
    comp_centres = fam_centres[comp_family] + rng.standard_normal((components, d)) * component_scale
    sizes = zipf_sizes(n, components, zipf_a, rng)
    labels = np.repeat(np.arange(components, dtype=np.int32), sizes)
    rng.shuffle(labels)
    fam_labels = comp_family[labels].astype(np.int32)
    centres32 = comp_centres.astype(np.float32)

    def block(s: int, e: int) -> np.ndarray:
        pts = centres32[labels[s:e]] + rng.standard_normal((e - s, d), dtype=np.float32) * noise
        return pts.astype(dtype, copy=False)

    if out_dir is None:
        points = np.empty((n, d), dtype=dtype)
        for s in range(0, n, shard_rows):
            e = min(n, s + shard_rows)
            points[s:e] = block(s, e)
        return points, labels, fam_labels
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, s in enumerate(range(0, n, shard_rows)):
        path = root / f"points_{i:05d}.npy"
        atomic_save_npy(path, block(s, min(n, s + shard_rows)))
        paths.append(path)
    atomic_save_npy(root / "components.npy", labels)
    atomic_save_npy(root / "families.npy", fam_labels)
    return paths, labels, fam_labels
