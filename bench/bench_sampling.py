"""Curation sampling speed: hierarchical_sample on a big tree, batch sampler batches/s.

    python -m pytest bench/bench_sampling.py                     # tree over 1M points
    python -m pytest bench/bench_sampling.py --bench-size=full   # 10M points (the issue's)

Tree: 100k level-1 clusters -> 1k -> 10 (random assignments, uneven sizes), target =
n / 10 per strategy. Batch sampler: 2048-item global batches over 350k items in 62 and in
10k clusters (paper 2's tree T1 top level and a fine level); reports batches/s
including the conversion of each batch to a Python list (what a DataLoader consumes).
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from fastssl.curation.sampling import ClusterStratifiedBatchSampler, hierarchical_sample
from fastssl.curation.tree import HierarchicalTree, TreeLevel

GROUP_TREE = "hierarchical_sample"
GROUP_BATCH = "stratified_batches"


def _level(rng, n_inputs: int, k: int) -> TreeLevel:
    # Uneven cluster sizes (lognormal weights) so water-filling has exhausted clusters.
    weights = rng.lognormal(0.0, 1.0, k)
    cdf = np.cumsum(weights) / weights.sum()
    assignments = np.minimum(np.searchsorted(cdf, rng.random(n_inputs)), k - 1)
    assignments[:k] = np.arange(k)
    distances = rng.random(n_inputs, dtype=np.float32)
    return TreeLevel.from_assignments(np.zeros((k, 1), np.float32), assignments, distances)


@pytest.fixture(scope="module")
def tree(bench_size):
    n = 10_000_000 if bench_size == "full" else 1_000_000
    rng = np.random.default_rng(7)
    levels, n_inputs = [], n
    for k in (100_000, 1_000, 10):
        levels.append(_level(rng, n_inputs, k))
        n_inputs = k
    return HierarchicalTree(levels)


@pytest.mark.parametrize("strategy", ["closest", "random"])
def test_hierarchical_sample(benchmark, record, tree, strategy):
    target = tree.n_points // 10
    idx = hierarchical_sample(tree, target, strategy=strategy)  # correctness once
    assert idx.shape == (target,) and np.unique(idx).size == target
    benchmark.pedantic(hierarchical_sample, args=(tree, target), kwargs={"strategy": strategy},
                       rounds=3, iterations=1, warmup_rounds=0)
    seconds = benchmark.stats.stats.median
    record(GROUP_TREE, strategy, seconds, n_points=tree.n_points, target=target,
           mpoints_per_s=round(tree.n_points / seconds / 1e6, 2))


@pytest.mark.parametrize("clusters", [62, 10_000])
def test_batch_sampler(benchmark, record, clusters):
    rng = np.random.default_rng(3)
    n, batch, count = 350_000, 2048, 500
    labels = rng.integers(0, clusters, n)
    sampler = ClusterStratifiedBatchSampler(labels, global_batch_size=batch,
                                            indices=np.arange(len(labels)),
                                            pseudo_epoch_size=batch * count * 20, seed=0)
    it = iter(sampler)
    first = np.asarray(next(it))
    counts = np.bincount(labels[first], minlength=clusters)
    assert first.size == batch and counts.max() - counts.min() <= 1

    def run():
        for _ in range(count):
            next(it)

    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    seconds = benchmark.stats.stats.median / count
    record(GROUP_BATCH, f"{clusters} clusters", seconds, batch=batch, items=n,
           batches_per_s=round(1.0 / seconds, 1))
