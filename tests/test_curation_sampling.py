"""hierarchical_sample and ClusterStratifiedBatchSampler: exact sizes, water-filling
balance at every level, strategies, determinism, least-seen order, group cap, resume,
sharding."""
from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fastssl.curation import ClusterStratifiedBatchSampler, hierarchical_kmeans, hierarchical_sample
from fastssl.curation.tree import HierarchicalTree, TreeLevel


def make_tree(rng: np.random.Generator, n: int, ks: list[int], skew: float = 0.0) -> HierarchicalTree:
    """Random tree: level sizes ks (finest first); skew > 0 makes cluster sizes uneven."""
    levels, n_inputs = [], n
    for k in ks:
        k = min(k, n_inputs)
        p = rng.random(k) ** (1.0 + 4.0 * skew)
        assignments = rng.choice(k, size=n_inputs, p=p / p.sum())
        assignments[:k] = np.arange(k)  # no empty cluster unless n_inputs < k
        distances = rng.random(n_inputs).astype(np.float32)
        levels.append(TreeLevel.from_assignments(np.zeros((k, 2), np.float32), assignments, distances))
        n_inputs = k
    tree = HierarchicalTree(levels)
    tree.validate()
    return tree


def assert_waterfilled(tree: HierarchicalTree, chosen: np.ndarray) -> None:
    """At every level, within each parent (all top clusters for the top level): no child
    gets more than another + 1 unless the other is exhausted."""
    depth_count = len(tree.levels)
    for level in range(1, depth_count + 1):
        labels = tree.point_assignments(level)
        k = tree.levels[level - 1].k
        taken = np.bincount(labels[chosen], minlength=k)
        size = np.bincount(labels, minlength=k)
        assert (taken <= size).all()
        if level == depth_count:
            parent = np.zeros(k, dtype=np.int64)
        else:
            parent = np.asarray(tree.levels[level].assignments)
        for g in np.unique(parent):
            kids = np.flatnonzero(parent == g)
            t, s = taken[kids], size[kids]
            open_ = t < s  # not exhausted
            if open_.any():
                assert t.max() <= t[open_].min() + 1, (level, g, t, s)


@pytest.mark.parametrize("strategy", ["random", "closest", "furthest"])
def test_exact_size_balance_and_uniqueness(rng, strategy):
    tree = make_tree(rng, 2000, [60, 9, 3], skew=1.0)
    for target in (0, 1, 7, 500, 1999):
        idx = hierarchical_sample(tree, target, strategy=strategy, seed=3)
        assert idx.dtype == np.int64 and idx.shape == (target,)
        assert (np.diff(idx) > 0).all()  # sorted, distinct
        assert_waterfilled(tree, idx)


def test_all_points_when_target_covers_everything(rng):
    tree = make_tree(rng, 300, [20, 4])
    for target in (300, 301, 10**9):
        np.testing.assert_array_equal(hierarchical_sample(tree, target), np.arange(300))


def test_quotas_hit_target_at_every_level(rng):
    tree = make_tree(rng, 1000, [40, 8, 2], skew=0.8)
    idx, quotas = hierarchical_sample(tree, 333, return_quotas=True, seed=1)
    for level, q in enumerate(quotas, start=1):
        assert q.sum() == 333
        np.testing.assert_array_equal(q, np.bincount(tree.point_assignments(level)[idx], minlength=q.size))


def test_water_level_on_a_known_case():
    # One level, sizes 1, 2, 10, 10: target 15 -> 1, 2, 6, 6; target 16 -> 1, 2, 6/7, 7/6.
    assignments = np.repeat(np.arange(4), [1, 2, 10, 10])
    level = TreeLevel.from_assignments(np.zeros((4, 1), np.float32), assignments,
                                       np.zeros(23, np.float32))
    tree = HierarchicalTree([level])
    _, (q,) = hierarchical_sample(tree, 15, return_quotas=True)
    np.testing.assert_array_equal(q, [1, 2, 6, 6])
    _, (q,) = hierarchical_sample(tree, 16, return_quotas=True)
    assert q[:2].tolist() == [1, 2] and sorted(q[2:].tolist()) == [6, 7]


def test_closest_and_furthest_pick_the_right_ends(rng):
    tree = make_tree(rng, 800, [25, 5])
    level1 = tree.levels[0]
    for strategy in ("closest", "furthest"):
        idx, quotas = hierarchical_sample(tree, 200, strategy=strategy, return_quotas=True)
        chosen = set(idx.tolist())
        for c in range(level1.k):
            members = level1.members_of(c)
            q = int(quotas[0][c])
            want = members[:q] if strategy == "closest" else members[len(members) - q :]
            assert set(want.tolist()) <= chosen
        # The chosen points are the nearest / farthest of their clusters by distance.
        d = level1.distances
        for c in range(level1.k):
            m = level1.members_of(c)
            inside = np.isin(m, idx)
            if inside.any() and (~inside).any():
                if strategy == "closest":
                    assert d[m[inside]].max() <= d[m[~inside]].min()
                else:
                    assert d[m[inside]].min() >= d[m[~inside]].max()


def test_deterministic_under_seed(rng):
    tree = make_tree(rng, 1500, [50, 6])
    a = hierarchical_sample(tree, 400, seed=11)
    np.testing.assert_array_equal(a, hierarchical_sample(tree, 400, seed=11))
    assert not np.array_equal(a, hierarchical_sample(tree, 400, seed=12))


def test_works_on_a_saved_memmapped_tree(rng, tmp_path):
    tree = make_tree(rng, 500, [20, 4])
    tree.save(tmp_path / "tree")
    loaded = HierarchicalTree.load(tmp_path / "tree")
    np.testing.assert_array_equal(hierarchical_sample(tree, 123, seed=5),
                                  hierarchical_sample(loaded, 123, seed=5))


def test_bad_arguments(rng):
    tree = make_tree(rng, 50, [5])
    with pytest.raises(ValueError, match="target_size"):
        hierarchical_sample(tree, -1)
    with pytest.raises(TypeError, match="target_size"):
        hierarchical_sample(tree, 2.5)
    with pytest.raises(ValueError, match="strategy"):
        hierarchical_sample(tree, 5, strategy="nearest")


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 400),
    ks=st.lists(st.integers(1, 40), min_size=1, max_size=3).map(lambda v: sorted(v, reverse=True)),
    frac=st.floats(0.0, 1.2),
    strategy=st.sampled_from(["random", "closest", "furthest"]),
    skew=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_random_trees(n, ks, frac, strategy, skew, seed):
    tree = make_tree(np.random.default_rng(seed), n, ks, skew)
    target = int(frac * n)
    idx = hierarchical_sample(tree, target, strategy=strategy, seed=seed)
    assert idx.shape == (min(target, n),)
    assert np.unique(idx).size == idx.size and (idx >= 0).all() and (idx < n).all()
    assert_waterfilled(tree, idx)


# ------------------------------------------------------------------ batch sampler
def batches_of(sampler, count=None):
    out = []
    for i, batch in enumerate(sampler):
        out.append(np.asarray(batch))
        if count is not None and i + 1 == count:
            break
    return out


def stratified(labels, **kwargs):
    """ClusterStratifiedBatchSampler over a whole dataset (items 0..n-1)."""
    kwargs.setdefault("indices", np.arange(np.asarray(labels).shape[0]))
    return ClusterStratifiedBatchSampler(labels, **kwargs)




def test_batches_split_evenly_over_clusters(rng):
    labels = rng.integers(0, 7, size=700)
    sampler = stratified(labels, global_batch_size=40, seed=0)
    got = batches_of(sampler)
    assert len(got) == len(sampler) == 18  # ceil(700 / 40)
    for batch in got[:-1]:
        assert batch.size == 40 and np.unique(batch).size == 40
        per_cluster = np.bincount(labels[batch], minlength=7)
        assert per_cluster.max() - per_cluster.min() <= 1
    assert got[-1].size == 700 - 17 * 40


def test_small_batches_visit_random_subsets_of_clusters(rng):
    labels = np.repeat(np.arange(50), 4)
    sampler = stratified(labels, global_batch_size=8, pseudo_epoch_size=800, seed=2)
    hits = np.zeros(50, dtype=int)
    for batch in sampler:
        per_cluster = np.bincount(labels[batch], minlength=50)
        assert per_cluster.max() == 1
        hits += per_cluster
    assert hits.min() >= 8  # every cluster visited, not always the same 8


def test_exhausted_cluster_gives_all_and_others_fill(rng):
    labels = np.concatenate([np.zeros(2, int), np.ones(100, int), np.full(100, 2)])
    sampler = stratified(labels, global_batch_size=30, seed=0)
    for batch in batches_of(sampler, 5):
        per_cluster = np.bincount(labels[batch], minlength=3)
        assert per_cluster[0] == 2 and sorted(per_cluster[1:]) == [14, 14]


def test_least_seen_first(rng):
    # A small cluster: every item is seen once before any is seen twice, and so on;
    # in every cluster seen counts never differ by more than one.
    labels = np.concatenate([np.zeros(5, int), np.ones(60, int), np.full(37, 2)])
    sampler = stratified(labels, global_batch_size=9, pseudo_epoch_size=900, seed=4)
    seen = np.zeros(labels.size, int)
    orders = []
    for batch in sampler:
        seen[batch] += 1
        for c in range(3):
            s = seen[labels == c]
            assert s.max() - s.min() <= 1
        orders.append([i for i in batch if labels[i] == 0])
    # The visiting order of the small cluster changes from round to round.
    flat = [i for o in orders for i in o]
    rounds = {tuple(flat[j : j + 5]) for j in range(0, 50, 5)}
    assert len(rounds) > 1


def test_least_seen_after_uneven_history(rng):
    # Seen counts made uneven on purpose: the sampler must catch the low ones up first.
    labels = np.zeros(6, int)
    sampler = stratified(labels, global_batch_size=2, pseudo_epoch_size=2, seed=0)
    state = sampler.state_dict()
    state["seen"] = np.array([5, 0, 3, 0, 1, 5])
    state["built_epoch"] = -1  # re-sort from these counts
    sampler.load_state_dict(state)
    first = sorted(batches_of(sampler)[0])
    assert first == [1, 3]
    # Next pseudo-epoch: counts 5, 1, 3, 1, 1, 5 -> drawn from the three at 1.
    assert set(batches_of(sampler)[0].tolist()) <= {1, 3, 4}


def test_group_cap(rng):
    labels = rng.integers(0, 5, size=600)
    groups = rng.integers(0, 20, size=600)
    sampler = stratified(labels, global_batch_size=32, pseudo_epoch_size=320,
                                            groups=groups, max_groups_per_epoch=3, seed=1)
    seen_sets = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        used = np.unique(groups[np.concatenate(batches_of(sampler))])
        assert used.size <= 3
        np.testing.assert_array_equal(used, np.unique(groups)[sampler.allowed_groups(epoch)])
        seen_sets.append(tuple(used))
    assert len(set(seen_sets)) > 1


@pytest.mark.parametrize("through_torch", [False, True])
def test_resume_gives_identical_continuation(rng, through_torch):
    labels = rng.integers(0, 6, size=300)
    groups = rng.integers(0, 8, size=300)
    kwargs = dict(global_batch_size=16, pseudo_epoch_size=160, seed=9, groups=groups, max_groups_per_epoch=4)
    ref = stratified(labels, **kwargs)
    expected = []
    for _ in range(3):
        expected += batches_of(ref)
    run = stratified(labels, **kwargs)
    got = batches_of(run)
    it = iter(run)
    got += [np.asarray(next(it)) for _ in range(4)]  # stop mid pseudo-epoch
    state = run.state_dict()
    if through_torch:
        import torch

        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        state = torch.load(buf, weights_only=True)
    fresh = stratified(labels, **kwargs)
    fresh.load_state_dict(state)
    fresh.set_epoch(1)  # the same pseudo-epoch: keeps the position
    got += batches_of(fresh)
    got += batches_of(fresh)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


def test_two_ranks_share_the_global_batch(rng):
    labels = rng.integers(0, 9, size=500)
    single = stratified(labels, global_batch_size=24, seed=3, rank=0, world_size=1)
    ranks = [stratified(labels, global_batch_size=24, seed=3, rank=r, world_size=2)
             for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1])
    for whole, a, b in zip(batches_of(single), batches_of(ranks[0]), batches_of(ranks[1])):
        assert abs(a.size - b.size) == 0
        assert np.intersect1d(a, b).size == 0
        np.testing.assert_array_equal(np.sort(np.concatenate([a, b])), np.sort(whole))
        # Each rank's share is itself near-even over the clusters.
        if whole.size == 24:
            for share in (a, b):
                counts = np.bincount(labels[share], minlength=9)
                assert counts.max() - counts.min() <= 2


def test_drop_last_and_padding(rng):
    labels = rng.integers(0, 3, size=100)
    keep = stratified(labels, global_batch_size=30, rank=1, world_size=2)
    sizes = [len(b) for b in keep]
    assert sizes == [15, 15, 15, 5]  # 100 = 3 * 30 + 10 -> 5 per rank
    drop = stratified(labels, global_batch_size=30, rank=1, world_size=2, drop_last=True)
    assert [len(b) for b in drop] == [15, 15, 15] and len(drop) == 3


def test_batch_larger_than_data_repeats(rng):
    labels = np.array([0, 0, 1, 2, 2, 2])
    sampler = stratified(labels, global_batch_size=14, pseudo_epoch_size=14)
    (batch,) = batches_of(sampler)
    assert batch.size == 14
    counts = np.bincount(batch, minlength=6)
    assert counts.min() == 2 and counts.max() == 3


def test_indices_are_yielded(rng):
    labels = rng.integers(0, 4, size=50)
    curated = np.sort(rng.choice(10_000, size=50, replace=False))
    sampler = ClusterStratifiedBatchSampler(labels, global_batch_size=10, indices=curated)
    assert set(np.concatenate(batches_of(sampler)).tolist()) <= set(curated.tolist())


def test_curated_subset_is_part_of_the_construction(rng):
    """12.2: forgetting the subset raises; from_tree draws only curated rows, stratified."""
    x = rng.standard_normal((600, 4)).astype(np.float32)
    tree = hierarchical_kmeans(x, [30, 6], iterations=3, resampling_steps=1, progress=False)
    subset = hierarchical_sample(tree, 120, seed=0)
    labels = tree.point_assignments(2)[subset]
    with pytest.raises(TypeError, match="indices= is required"):
        ClusterStratifiedBatchSampler(labels, global_batch_size=12)
    sampler = ClusterStratifiedBatchSampler.from_tree(tree, 2, subset, global_batch_size=12, seed=0)
    drawn = np.concatenate(batches_of(sampler))
    assert set(drawn.tolist()) == set(subset.tolist())  # every curated row, nothing else
    level2 = tree.point_assignments(2)
    for batch in batches_of(sampler):  # stratified by the rows' own clusters
        counts = np.bincount(level2[batch], minlength=6)[np.unique(labels)]
        assert counts.max() - counts.min() <= 1


def test_group_cap_keeps_every_cluster_in_every_pseudo_epoch(rng):
    """Paper 2: a cluster with no item in the drawn groups falls back to all its items."""
    n_clusters = 40
    labels = np.repeat(np.arange(n_clusters), 10)
    groups = rng.integers(0, 30, size=labels.size)  # slides; most clusters miss any 2 of them
    sampler = stratified(labels, global_batch_size=40, pseudo_epoch_size=400, groups=groups,
                         max_groups_per_epoch=2, seed=0)
    for epoch in range(5):
        sampler.set_epoch(epoch)
        drawn = np.concatenate(batches_of(sampler))
        assert np.unique(labels[drawn]).size == n_clusters
        allowed = np.unique(groups)[sampler.allowed_groups(epoch)]
        in_groups = np.isin(groups, allowed)
        covered = np.unique(labels[in_groups])
        # clusters present in the drawn groups use only those groups' items
        assert np.isin(drawn[np.isin(labels[drawn], covered)], np.flatnonzero(in_groups)).all()


def test_with_a_dataloader(rng):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    labels = rng.integers(0, 4, size=64)
    data = TensorDataset(torch.arange(64))
    loader = DataLoader(data, batch_sampler=stratified(labels, global_batch_size=8))
    assert sum(len(x) for (x,) in loader) == 64


def test_bad_arguments_batch_sampler():
    with pytest.raises(ValueError, match="labels must be 1-D"):
        stratified(np.zeros((3, 2), int), global_batch_size=2)
    with pytest.raises(ValueError, match="global_batch_size must be"):
        stratified(np.zeros(3, int), global_batch_size=0)
    with pytest.raises(ValueError, match="^global_batch_size 5 is not divisible by world_size 2"):
        stratified(np.zeros(3, int), global_batch_size=5, rank=0, world_size=2)
    with pytest.raises(TypeError, match="global_batch_size= is required"):
        stratified(np.zeros(3, int))
    with pytest.raises(TypeError, match="labels must be integers"):
        stratified(np.zeros(3), global_batch_size=1)
    with pytest.raises(ValueError, match="groups must have shape"):
        stratified(np.zeros(3, int), global_batch_size=1, groups=[1, 2])
    with pytest.raises(ValueError, match="max_groups_per_epoch needs groups"):
        stratified(np.zeros(3, int), global_batch_size=1, max_groups_per_epoch=2)
    with pytest.raises(ValueError, match="rank"):
        stratified(np.zeros(3, int), global_batch_size=1, rank=2, world_size=2)
    a = stratified(np.zeros(3, int), global_batch_size=1, seed=1)
    with pytest.raises(ValueError, match="seed"):
        stratified(np.zeros(3, int), global_batch_size=1, seed=2).load_state_dict(a.state_dict())


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 30), min_size=1, max_size=12),
    batch=st.integers(1, 40),
    world=st.integers(1, 3),
    seed=st.integers(0, 1000),
)
def test_property_balance_and_least_seen(sizes, batch, world, seed):
    labels = np.repeat(np.arange(len(sizes)), sizes)
    n = labels.size
    shares = [stratified(labels, global_batch_size=batch * world, pseudo_epoch_size=3 * n,
                                            seed=seed, rank=r, world_size=world)
              for r in range(world)]
    seen = np.zeros(n, int)
    size_arr = np.array(sizes)
    for parts in zip(*(iter(s) for s in shares)):
        whole = np.concatenate([np.asarray(p) for p in parts])
        if whole.size <= n:
            assert np.unique(whole).size == whole.size
            counts = np.bincount(labels[whole], minlength=len(sizes))
            open_ = counts < size_arr
            if open_.any():
                assert counts.max() <= counts[open_].min() + 1
        np.add.at(seen, whole, 1)
        for c in range(len(sizes)):
            s = seen[labels == c]
            assert s.max() - s.min() <= 1 or whole.size > n
