"""hierarchical_kmeans: tree structure, grouped split, resampling, resume, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fastssl.curation import HierarchicalTree, KMeans, hierarchical_kmeans
from fastssl.curation.hierarchical import FAIL_ENV, grouped_lloyd, resample_rows, split_clusters
from fastssl.curation._source import PointSource
from fastssl.curation.tree import TreeLevel


def mixture(rng, n=3000, d=8, comps=30):
    centers = rng.standard_normal((comps, d)) * 6
    weights = 1.0 / np.arange(1, comps + 1) ** 1.1
    lab = rng.choice(comps, n, p=weights / weights.sum())
    return (centers[lab] + rng.standard_normal((n, d))).astype(np.float32), lab


KW = dict(iterations=4, resampling_steps=3, split_k=3, resample_level1=True, progress=False)  # 1 + 2 resampled


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
    monkeypatch.setenv(FAIL_ENV, "3")  # dies after the 3rd step (level 1 resample_1)
    with pytest.raises(RuntimeError, match="injected failure"):
        hierarchical_kmeans(x, [20, 6, 2], output_dir=out, **KW)
    monkeypatch.delenv(FAIL_ENV)

    def boom(level, step):
        seen.append((level, step))
        if (level, step) == (2, "resample_1"):
            raise KeyboardInterrupt  # killed in the middle of level 2
    with pytest.raises(KeyboardInterrupt):
        hierarchical_kmeans(x, [20, 6, 2], output_dir=out, callback=boom, **KW)
    assert seen[0] == (1, "resample_2")  # the three finished steps were skipped
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
