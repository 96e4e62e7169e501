"""Hierarchical k-means data curation (Vo et al. 2024, as used for pathology tiles).

    KMeans, KMeansConfig          one level of k-means over arrays, memmaps or shards
    hierarchical_kmeans           the multi-level tree with resampling steps
    HierarchicalTree, TreeLevel   the tree on disk (plain .npy, memory-mapped)
    hierarchical_sample           balanced sampling to a target size
    ClusterStratifiedBatchSampler batches spread evenly across the clusters of a level
"""
from __future__ import annotations

from fastssl._lazy import lazy_exports

_LAZY = {
    "KMeans": "fastssl.curation.kmeans",
    "KMeansConfig": "fastssl.curation.kmeans",
    "hierarchical_kmeans": "fastssl.curation.hierarchical",
    "HierarchicalTree": "fastssl.curation.tree",
    "TreeLevel": "fastssl.curation.tree",
    "hierarchical_sample": "fastssl.curation.sampling",
    "ClusterStratifiedBatchSampler": "fastssl.curation.sampling",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
