"""hierarchical_kmeans: tree structure, grouped split, resampling, resume, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fastssl.curation import HierarchicalTree, KMeans, hierarchical_kmeans
from fastssl.curation.hierarchical import HierarchicalConfig
from fastssl.curation.hierarchical import FAIL_ENV, grouped_lloyd, resample_rows, split_clusters
from fastssl.curation._source import PointSource
from fastssl.curation.tree import TreeLevel


def mixture(rng, n=3000, d=8, comps=30):
    centers = rng.standard_normal((comps, d)) * 6
    weights = 1.0 / np.arange(1, comps + 1) ** 1.1
    lab = rng.choice(comps, n, p=weights / weights.sum())
    return (centers[lab] + rng.standard_normal((n, d))).astype(np.float32), lab


# level 1: kmeans + split; levels 2+: kmeans + 2 resampled (split and resampling never
# share a level, as SDC)
KW = dict(iterations=4, resampling_steps=3, split_k=3, progress=False)


def assert_trees_equal(a: HierarchicalTree, b: HierarchicalTree):
    assert len(a.levels) == len(b.levels)
    for la, lb in zip(a.levels, b.levels):
        for name in ("centroids", "assignments", "distances", "offsets", "members"):
            np.testing.assert_array_equal(np.asarray(getattr(la, name)), np.asarray(getattr(lb, name)))


def test_tree_structure_and_round_trip(rng, tmp_path):
    x, _ = mixture(rng)
    mem = hierarchical_kmeans(x, [40, 10, 3], **KW)
    mem.validate()
    assert [lvl.n_inputs for lvl in mem.levels] == [3000, mem.levels[0].k, 10]
    assert 40 < mem.levels[0].k <= 120  # split into <= 3 sub-clusters each
    # level 2 clusters the level-1 centroids: its assignments are their nearest centroids
    l2 = mem.levels[1]
    lab, _ = KMeans(k=10).predict(mem.levels[0].centroids, centroids=l2.centroids)
    np.testing.assert_array_equal(lab, l2.assignments)
    disk = hierarchical_kmeans(x, [40, 10, 3], output_dir=tmp_path / "t", **KW)
    assert_trees_equal(mem, disk)
    assert isinstance(disk.levels[0].members, np.memmap)
    assert_trees_equal(disk, HierarchicalTree.load(tmp_path / "t"))
    assert not (tmp_path / "t" / "work").exists()
    assert json.loads((tmp_path / "t" / "progress.json").read_text())["complete"]


def test_grouped_split_equals_per_group_kmeans(rng):
    sizes = [40, 1, 75, 13]
    ks = [3, 1, 5, 2]
    x = rng.standard_normal((sum(sizes), 6)).astype(np.float32)
    xo = np.concatenate([[0], np.cumsum(sizes)])
    co = np.concatenate([[0], np.cumsum(ks)])
    c0 = np.concatenate([x[xo[g] : xo[g] + ks[g]] + 0.01 for g in range(4)])
    c, labels, dists = grouped_lloyd(x, xo, c0, co, iterations=6)
    for g in range(4):
        km = KMeans(k=ks[g], iterations=6, empty="keep", progress=False)
        km.fit(x[xo[g] : xo[g + 1]], init_centroids=c0[co[g] : co[g + 1]])
        np.testing.assert_allclose(c[co[g] : co[g + 1]], km.centroids_, rtol=1e-5, atol=1e-5)
        lab, dd = km.predict()
        np.testing.assert_array_equal(labels[xo[g] : xo[g + 1]] - co[g], lab)
        np.testing.assert_allclose(dists[xo[g] : xo[g + 1]], dd, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_split_clusters_covers_every_point(rng, init):
    x, _ = mixture(rng, n=800)
    parents = rng.integers(0, 7, 800)
    parents[parents == 3] = 2  # an empty parent
    c, lab, dd = split_clusters(PointSource.from_data(x), parents, 4, 3, init=init,
                                memory_budget_mb=0.02)  # several batches
    assert lab.min() == 0 and lab.max() == c.shape[0] - 1
    for child in range(c.shape[0]):  # every sub-cluster stays inside one parent
        assert np.unique(parents[lab == child]).size == 1
    np.testing.assert_allclose(dd, ((x - c[lab]) ** 2).sum(1), rtol=1e-4, atol=1e-4)


def test_resample_rows(rng):
    c = rng.standard_normal((3, 2)).astype(np.float32)
    lab = rng.integers(0, 3, 50)
    d = rng.random(50).astype(np.float32)
    level = TreeLevel.from_assignments(c, lab, d)
    rows = resample_rows(level, 4, "closest", rng)
    expect = np.concatenate([np.flatnonzero(lab == j)[np.argsort(d[lab == j])][:4] for j in range(3)])
    np.testing.assert_array_equal(rows, np.sort(expect))
    rows = resample_rows(level, 4, "random", rng)
    assert rows.size == 12 and (np.bincount(lab[rows], minlength=3) == 4).all()


def test_resume_after_injected_failure(rng, tmp_path, monkeypatch):
    x, _ = mixture(rng, n=1500)
    ref = hierarchical_kmeans(x, [20, 6, 2], output_dir=tmp_path / "ref", **KW)
    out = tmp_path / "run"
    seen = []
    monkeypatch.setenv(FAIL_ENV, "3")  # dies after the 3rd step (level 2 kmeans)
    with pytest.raises(RuntimeError, match="injected failure"):
        hierarchical_kmeans(x, [20, 6, 2], output_dir=out, **KW)
    monkeypatch.delenv(FAIL_ENV)

    def boom(level, step):
        seen.append((level, step))
        if (level, step) == (2, "resample_1"):
            raise KeyboardInterrupt  # killed in the middle of level 2
    with pytest.raises(KeyboardInterrupt):
        hierarchical_kmeans(x, [20, 6, 2], output_dir=out, callback=boom, **KW)
    assert seen[0] == (2, "resample_1")  # the three finished steps were skipped
    mark = len(seen)
    again = hierarchical_kmeans(x, [20, 6, 2], output_dir=out,
                                callback=lambda lv, st: seen.append((lv, st)), **KW)
    assert seen[mark] == (2, "resample_2")  # resumed inside level 2, nothing redone
    assert_trees_equal(ref, again)


def test_different_config_refused_unless_overwrite(rng, tmp_path):
    x, _ = mixture(rng, n=600)
    hierarchical_kmeans(x, [8, 2], output_dir=tmp_path, iterations=2, progress=False)
    with pytest.raises(ValueError, match="different config"):
        hierarchical_kmeans(x, [9, 2], output_dir=tmp_path, iterations=2, progress=False)
    tree = hierarchical_kmeans(x, [9, 2], output_dir=tmp_path, iterations=2, overwrite=True,
                               progress=True)
    assert tree.levels[0].k == 9


def test_bad_levels(rng):
    x, _ = mixture(rng, n=100)
    with pytest.raises(ValueError, match="level 2 asks for k=20 clusters but level 1 has only 10"):
        hierarchical_kmeans(x, [10, 20])
    with pytest.raises(ValueError, match="level 1 asks for k=200 clusters but there are only 100"):
        hierarchical_kmeans(x, [200, 10])
    with pytest.raises(ValueError, match="sampling_strategy"):
        hierarchical_kmeans(x, [10], sampling_strategy="furthest")
    with pytest.raises(ValueError, match="levels is empty"):
        hierarchical_kmeans(x, [])


def test_nonfinite_rows_skipped(rng, tmp_path):
    x, _ = mixture(rng, n=500)
    x[[3, 77]] = np.nan
    with pytest.raises(ValueError, match="row 3"):
        hierarchical_kmeans(x, [5], progress=False)
    tree = hierarchical_kmeans(x, [5, 2], output_dir=tmp_path, nonfinite="skip", progress=False)
    assert tree.n_points == 498 and tree.meta["skipped_rows"] == 2
    ids = np.load(tmp_path / tree.meta["point_ids"])
    assert ids.shape == (498,) and 3 not in ids and 77 not in ids


# ---------------------------------------------------------------- SDC's resampling, wiring
def _oracle_level(x, k, iterations, seed, strategy, init, sample_size):
    """One level with one resampling step, rebuilt from the parts (KMeans, resample_rows)."""
    from fastssl.curation import KMeansConfig
    from fastssl.curation.hierarchical import _step_seed

    s0, s1 = _step_seed(seed, 1, 0), _step_seed(seed, 1, 1)
    first = KMeans(KMeansConfig(k=k, iterations=iterations, seed=s0, progress=False)).fit(x)
    labels, dists = first.predict()
    level = TreeLevel.from_assignments(first.centroids_, labels, dists)
    rows = resample_rows(level, sample_size, strategy, np.random.default_rng(s1))
    second = KMeans(KMeansConfig(k=k, iterations=iterations, seed=s1, progress=False))
    second.fit(x[rows], init_centroids=first.centroids_ if init == "warm" else None)
    return second.centroids_, second.predict(x)[0]


@pytest.mark.parametrize("strategy", ["closest", "random"])
@pytest.mark.parametrize("init", ["fresh", "warm"])
def test_resampling_step_equals_its_parts(rng, strategy, init):
    """resampling_steps=2 = the first k-means + one resampled (SDC's count); the step uses
    the level's sampling_strategy and resampling_init (15.7: an ignored strategy fails)."""
    x, _ = mixture(rng, n=900, comps=12)
    tree = hierarchical_kmeans(x, [12], iterations=5, resampling_steps=2, resample_level1=True,
                               sample_size=20, sampling_strategy=strategy, resampling_init=init,
                               seed=3, progress=False)
    assert [s["step"] for s in tree.meta["steps"]] == ["kmeans", "resample_1"]
    c, lab = _oracle_level(x, 12, 5, 3, strategy, init, 20)
    np.testing.assert_allclose(tree.levels[0].centroids, c, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(tree.levels[0].assignments, lab)
    other = "random" if strategy == "closest" else "closest"
    c_other, _ = _oracle_level(x, 12, 5, 3, other, init, 20)
    assert np.abs(c_other - c).max() > 1e-3  # the strategy changes the result


def test_per_level_settings_reach_their_level(rng):
    x, _ = mixture(rng, n=1200, comps=20)
    tree = hierarchical_kmeans(x, [{"k": 40, "resampling_steps": 1},
                                   {"k": 10, "resampling_steps": 3, "iterations": 2},
                                   {"k": 3, "resampling_steps": 1}],
                               iterations=4, progress=False)
    steps = [(s["level"], s["step"]) for s in tree.meta["steps"]]
    assert steps == [(1, "kmeans"), (2, "kmeans"), (2, "resample_1"), (2, "resample_2"),
                     (3, "kmeans")]


def test_fp64_accumulate_is_used(rng):
    """15.6: 200k rows around 1e4; float64 sums give the float64 mean, float32 sums do not."""
    n, d = 200_000, 4
    x = (1e4 + rng.standard_normal((n, d))).astype(np.float32)
    x[: n // 2, 0] += 8.0  # two clusters along the first axis
    init = x[[0, n - 1]].copy()
    truth_labels = KMeans(k=2).predict(x, centroids=init)[0]
    truth = np.stack([x[truth_labels == j].astype(np.float64).mean(0) for j in range(2)])
    from fastssl.curation.hierarchical import _step_seed

    errs, trees = {}, {}
    for fp64 in (True, False):
        km = KMeans(k=2, iterations=1, fp64_accumulate=fp64, progress=False).fit(x, init)
        errs[fp64] = np.abs(km.centroids_ - truth).max()
        # the tree passes the setting to its k-means: same as KMeans with that setting
        tree = hierarchical_kmeans(x, [2], iterations=2, fp64_accumulate=fp64, init="random",
                                   resampling_steps=1, progress=False)
        same = KMeans(k=2, iterations=2, fp64_accumulate=fp64, init="random",
                      seed=_step_seed(0, 1, 0), progress=False).fit(x)
        np.testing.assert_array_equal(tree.levels[0].centroids, same.centroids_)
        trees[fp64] = np.asarray(tree.levels[0].centroids)
    assert errs[True] <= 2e-3 < 0.05 < errs[False]
    assert np.abs(trees[True] - trees[False]).max() > 1e-3


# ---------------------------------------------------------------- SDC's split
def test_split_best_of_n_equals_min_over_runs(rng):
    """Per parent, the kept run is the one with the lowest inertia among the greedy
    k-means++ runs (computed here run by run)."""
    from fastssl.curation.hierarchical import _grouped_init, split_batch

    sizes = np.array([60, 3, 45, 80, 1])
    x = np.concatenate([rng.standard_normal((s, 5)) * (1 + g) + 7 * g
                        for g, s in enumerate(sizes)]).astype(np.float32)
    xo = np.concatenate([[0], np.cumsum(sizes)])
    co = np.concatenate([[0], np.cumsum(np.minimum(sizes, 4))])
    parents = np.array([10, 11, 12, 13, 14])
    seg = np.repeat(np.arange(5), sizes)
    runs = []
    for run in range(4):
        c0 = _grouped_init(x, xo, co, 5, parents, run, "kmeans++")
        c, lab, dd = grouped_lloyd(x, xo, c0, co, 3)
        runs.append((c, lab, dd, np.bincount(seg, weights=dd.astype(np.float64), minlength=5)))
    best = np.argmin(np.stack([r[3] for r in runs]), axis=0)
    c, lab, dd = split_batch(x, xo, co, parents, 3, seed=5, n_init=4)
    for g in range(5):
        r = runs[best[g]]
        np.testing.assert_array_equal(lab[xo[g] : xo[g + 1]], r[1][xo[g] : xo[g + 1]])
        np.testing.assert_array_equal(c[co[g] : co[g + 1]], r[0][co[g] : co[g + 1]])
    assert len({tuple(r[3]) for r in runs}) > 1  # the runs do differ


def test_greedy_init_lowers_the_initial_potential(rng):
    """Greedy k-means++ (2 + ln k candidates, the best kept) against plain (1 candidate),
    summed over many parents."""
    from fastssl.curation.hierarchical import _grouped_init

    G, size, k = 200, 40, 6
    x = np.concatenate([rng.standard_normal((size, 4)) + rng.standard_normal((size, 4)) *
                        (rng.random() * 5) for _ in range(G)]).astype(np.float32)
    xo = np.arange(G + 1) * size
    co = np.arange(G + 1) * k
    pots = {}
    for cand in (1, None):
        c0 = _grouped_init(x, xo, co, 0, np.arange(G), 0, "kmeans++", candidates=cand)
        _, _, dd = grouped_lloyd(x, xo, c0, co, 0)
        pots[cand] = float(dd.astype(np.float64).sum())
    assert pots[None] < 0.95 * pots[1]


def test_split_independent_of_memory_budget(rng, tmp_path):
    """Draws keyed per parent: one batch, many batches, and parts on disk agree exactly."""
    x, _ = mixture(rng, n=1500)
    parents = rng.integers(0, 25, 1500)
    src = PointSource.from_data(x)
    one = split_clusters(src, parents, 4, 3, seed=2, n_init=2)
    many = split_clusters(src, parents, 4, 3, seed=2, n_init=2, memory_budget_mb=0.01)
    disk = split_clusters(src, parents, 4, 3, seed=2, n_init=2, memory_budget_mb=0.01,
                          parts_dir=tmp_path / "parts")
    assert len(list((tmp_path / "parts").glob("part_*.npz"))) > 3
    for a, b, c in zip(one, many, disk):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    t1 = hierarchical_kmeans(x, [30, 5], split_k=3, iterations=3, progress=False)
    t2 = hierarchical_kmeans(x, [30, 5], split_k=3, iterations=3, memory_budget_mb=0.01,
                             progress=False)
    assert_trees_equal(t1, t2)


def test_repr_is_a_summary_not_the_arrays(rng):
    """12.12: print(tree) shows sizes, not arrays."""
    x, _ = mixture(rng, n=300)
    tree = hierarchical_kmeans(x, [9, 3], iterations=2, progress=False)
    assert repr(tree) == "HierarchicalTree(n_points=300, dim=8, k per level=[9, 3])"
    assert repr(tree.levels[1]) == "TreeLevel(k=3, n_inputs=9, d=8)"


def test_grouped_init_on_a_device_equals_the_host(rng):
    """The split's greedy init runs where the split assigns (a GPU in practice); the picks
    do not depend on it (here the device is the CPU, the code path the same)."""
    import torch

    from fastssl.curation.hierarchical import _grouped_init

    x = rng.standard_normal((300, 5)).astype(np.float32)
    xo, co = np.array([0, 120, 121, 300]), np.array([0, 4, 5, 9])
    host = _grouped_init(x, xo, co, 1, np.arange(3), 0, "kmeans++")
    dev = _grouped_init(x, xo, co, 1, np.arange(3), 0, "kmeans++", device=torch.device("cpu"))
    np.testing.assert_array_equal(host, dev)


def _scaled_parents(rng, G=60, d=16):
    """G parents whose scales fall from 2^10 to 2^-10 (about 10^+-3, issue 21 §4; the tiny
    parents come after the huge ones in a batch), sizes 20..199, rows sorted by parent.

    Small integers times a power of two: every squared distance and every sum of them is
    exact in float32 and float64, so a transcription cannot differ by rounding."""
    sizes = rng.integers(20, 200, G)
    scales = 2.0 ** np.round(np.linspace(10, -10, G))
    x = np.concatenate([(rng.integers(-12, 13, (s, d)) + rng.integers(-8, 9, d)) * sc
                        for s, sc in zip(sizes, scales)]).astype(np.float32)
    return x, np.repeat(np.arange(G), sizes), sizes


def _greedy_picks_one_parent(xg, k, seed, parent, run, trials):
    """Greedy k-means++ inside one parent, transcribed without batching: float64
    distances, one cumulative sum over this parent's rows only, keyed draws."""
    from fastssl.curation.hierarchical import keyed_uniform

    xg = xg.astype(np.float64)
    size = xg.shape[0]
    u0 = float(keyed_uniform(seed, parent, run, 0, 0))
    picks = [min(int(u0 * size), size - 1)]
    D = ((xg - xg[picks[0]]) ** 2).sum(1)
    for r in range(1, k):
        cum = np.cumsum(D)
        best = (np.inf, None, None)
        for j in range(trials):
            u = float(keyed_uniform(seed, parent, run, r, j + 1))
            cand = min(int(np.searchsorted(cum, u * cum[-1], side="right")), size - 1)
            d_new = np.minimum(D, ((xg - xg[cand]) ** 2).sum(1))
            if d_new.sum() < best[0]:
                best = (d_new.sum(), cand, d_new)
        picks.append(best[1])
        D = best[2]
    return picks


def test_split_draw_per_parent_whatever_the_budget(rng):
    """21 §4: the greedy draw uses per-parent cumulative sums, so with cluster scales
    spanning 10^+-3 a budget holding every parent and one cutting them into ~10 batches
    give the same split, and each parent's k-means++ picks equal a per-parent
    transcription (with the batch-wide running sum, parent 56 picked its 11th centre one
    row off)."""
    from fastssl.curation.hierarchical import _grouped_init

    x, parents, sizes = _scaled_parents(rng)
    src = PointSource.from_data(x)
    k = 12
    runs = [split_clusters(src, parents, k, 1, seed=3, memory_budget_mb=mb)
            for mb in (512.0, 0.5)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            np.testing.assert_array_equal(a, b)
    xo = np.concatenate([[0], np.cumsum(sizes)])
    co = np.arange(sizes.shape[0] + 1) * k
    trials = 2 + int(np.floor(np.log(k)))
    centres = _grouped_init(x, xo, co, 3, np.arange(sizes.shape[0]), 1, "kmeans++")
    for g in range(sizes.shape[0]):
        xg = x[xo[g] : xo[g + 1]]
        expected = xg[_greedy_picks_one_parent(xg, k, 3, g, 1, trials)]
        np.testing.assert_array_equal(centres[co[g] : co[g + 1]], expected, err_msg=f"parent {g}")


def test_split_and_resampling_on_one_level_refused():
    """21 §4, as SDC's launcher: a level either splits or resamples, never both."""
    for extra in (dict(resample_level1=True), dict(levels=[dict(k=10, resampling_steps=2), 3])):
        kw = dict(levels=[10, 3], split_k=3, resampling_steps=4) | extra
        with pytest.raises(ValueError, match="^level 1: split_k and resampling") as err:
            HierarchicalConfig(**kw).validate()
        assert "\n" not in str(err.value)
    HierarchicalConfig(levels=[10, 3], split_k=3, resampling_steps=4).validate()  # levels 2+ resample
    HierarchicalConfig(levels=[10, 3], split_k=1, resample_level1=True).validate()  # no real split


def test_empty_keep_reaches_every_kmeans_of_the_tree(rng, monkeypatch):
    """empty="keep" (SDC) is passed to the k-means of every level; the behaviour itself is
    checked by hand in test_curation_kmeans."""
    import fastssl.curation.hierarchical as hk

    seen = []
    real = hk.KMeans

    def spy(config, **kw):
        seen.append(config.empty)
        return real(config, **kw)

    monkeypatch.setattr(hk, "KMeans", spy)
    x, _ = mixture(rng, n=400)
    for empty in ("keep", "reseed"):
        seen.clear()
        hierarchical_kmeans(x, [12, 3], iterations=2, resampling_steps=2, empty=empty, progress=False)
        assert seen == [empty] * 3  # level 1 kmeans, level 2 kmeans + 1 resampled
    with pytest.raises(ValueError, match="empty='drop'"):
        HierarchicalConfig(levels=[4], empty="drop").validate()


def test_tree_resumes_inside_the_kmeanspp_start(rng, tmp_path, monkeypatch):
    """21 §4: a job killed during a level's k-means++ start resumes from the centres it
    checkpointed and builds the same tree; the finished step removes the checkpoint."""
    import functools

    import fastssl.curation.hierarchical as hk
    from fastssl.curation.kmeans import KmppCheckpoint

    x, _ = mixture(rng, n=900)
    settings = dict(iterations=3, resampling_steps=2, progress=False)
    ref = hierarchical_kmeans(x, [30, 5], output_dir=tmp_path / "ref", **settings)
    monkeypatch.setattr(hk, "KmppCheckpoint", functools.partial(KmppCheckpoint, every_s=0))
    real = KmppCheckpoint.maybe_save
    saved = []  # centres held by every level-1 start checkpoint, in order

    def killed_at_12(self, chosen, *args, **kwargs):
        real(self, chosen, *args, **kwargs)
        if self.path.parent.name == "level_1" and self.path.name == "kmeans.kmpp.npz":
            saved.append(len(chosen))
            if saved == list(range(1, 13)):
                raise KeyboardInterrupt  # dies with 12 centres checkpointed

    monkeypatch.setattr(KmppCheckpoint, "maybe_save", killed_at_12)
    with pytest.raises(KeyboardInterrupt):
        hierarchical_kmeans(x, [30, 5], output_dir=tmp_path / "run", **settings)
    assert (tmp_path / "run" / "work" / "level_1" / "kmeans.kmpp.npz").exists()
    again = hierarchical_kmeans(x, [30, 5], output_dir=tmp_path / "run", **settings)
    assert saved[12] == 12 and saved[13] == 13  # the rerun started at centre 12
    assert_trees_equal(ref, again)
    assert not list((tmp_path / "run").rglob("*.kmpp.npz"))
