"""KMeans: Lloyd properties, fp64 reference update, streaming, bad input."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fastssl.curation import KMeans, KMeansConfig
from fastssl.errors import DataError


def blobs(rng, n=600, d=8, centers=6, spread=6.0, dtype=np.float32):
    c = rng.standard_normal((centers, d)) * spread
    lab = rng.integers(0, centers, n)
    return (c[lab] + rng.standard_normal((n, d))).astype(dtype), lab


def ref_update(x, c):
    """One Lloyd step in float64: labels by exact argmin, centroids as means."""
    x64, c64 = x.astype(np.float64), c.astype(np.float64)
    d2 = ((x64[:, None, :] - c64[None]) ** 2).sum(-1)
    lab = d2.argmin(1)
    new = c64.copy()
    for j in range(c.shape[0]):  # test oracle only: a loop is fine here
        if (lab == j).any():
            new[j] = x64[lab == j].mean(0)
    return lab, new, d2.min(1)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(8, 120), d=st.integers(1, 9), k=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_objective_never_increases(n, d, k, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, d)) * rng.uniform(0.1, 10)).astype(np.float32)
    k = min(k, n)
    km = KMeans(k=k, iterations=8, seed=seed, progress=False).fit(x)
    obj = np.array([s.objective for s in km.stats_])
    # fp32 distances: allow rounding-level increases only
    assert np.all(np.diff(obj) <= 1e-5 * obj[:-1] + 1e-6), obj


def test_update_matches_fp64_reference(rng):
    x = rng.standard_normal((500, 12)).astype(np.float32)
    c0 = x[rng.choice(500, 7, replace=False)] + 0.01
    km = KMeans(k=7, iterations=1, progress=False).fit(x, init_centroids=c0)
    lab, new, d2 = ref_update(x, c0)
    np.testing.assert_allclose(km.centroids_, new, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(km.stats_[0].objective, d2.mean(), rtol=1e-5)
    labels, dists = km.predict(x, centroids=c0)
    np.testing.assert_array_equal(labels, lab)


def test_larger_k_gives_lower_objective(rng):
    x, _ = blobs(rng)
    objs = []
    for k in (2, 6, 20):
        km = KMeans(k=k, iterations=10, seed=3, progress=False)
        km.fit_predict(x)
        objs.append(km.objective_)
    assert objs[0] > objs[1] > objs[2]


@pytest.mark.parametrize("fp64", [True, False])
def test_chunked_equals_unchunked(rng, fp64):
    x, _ = blobs(rng, n=1000)
    a = KMeans(k=9, iterations=5, seed=1, fp64_accumulate=fp64, progress=False).fit(x)
    b = KMeans(k=9, iterations=5, seed=1, chunk_size=37, fp64_accumulate=fp64,
               progress=False).fit(x)
    np.testing.assert_allclose(a.centroids_, b.centroids_, rtol=1e-5, atol=1e-5)


def test_shards_memmap_fp16_equal_array(rng, tmp_path):
    x, _ = blobs(rng, n=900, d=6)
    x16 = x.astype(np.float16)
    paths = []
    for i, (s, e) in enumerate([(0, 250), (250, 700), (700, 900)]):
        p = tmp_path / f"shard_{i}.npy"
        np.save(p, x16[s:e])
        paths.append(p)
    ref = KMeans(k=5, iterations=4, seed=2, progress=False).fit(x16.astype(np.float32))
    shard = KMeans(k=5, iterations=4, seed=2, chunk_size=100, progress=False).fit(paths)
    np.testing.assert_allclose(ref.centroids_, shard.centroids_, rtol=1e-5, atol=1e-4)
    mm = np.load(paths[1], mmap_mode="r")
    KMeans(k=3, iterations=2, progress=False).fit(mm)  # memmap input
    labels, dists = shard.predict(tmp_path)  # a directory of shards
    assert labels.shape == (900,) and dists.dtype == np.float32


def test_deterministic_under_seed(rng):
    x, _ = blobs(rng)
    a = KMeans(k=6, iterations=3, seed=11, progress=False).fit(x).centroids_
    b = KMeans(k=6, iterations=3, seed=11, progress=False).fit(x).centroids_
    c = KMeans(k=6, iterations=3, seed=12, progress=False).fit(x).centroids_
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_empty_cluster_reseeded_or_kept(rng):
    x = rng.standard_normal((300, 4)).astype(np.float32)
    c0 = np.concatenate([x[:3], np.full((1, 4), 1e3, np.float32)])  # last never wins
    km = KMeans(k=4, iterations=1, empty="reseed", progress=False).fit(x, init_centroids=c0)
    assert km.stats_[0].n_empty == 1 and km.stats_[0].n_reseeded == 1
    _, _, d2 = ref_update(x, c0[:3])
    np.testing.assert_array_equal(km.centroids_[3], x[np.argmax(d2)])
    kept = KMeans(k=4, iterations=1, empty="keep", progress=False).fit(x, init_centroids=c0)
    np.testing.assert_array_equal(kept.centroids_[3], c0[3])


def test_kmeanspp_beats_random_on_average(rng):
    x, _ = blobs(rng, n=1500, d=6, centers=15, spread=8.0)
    pp, rnd = [], []
    for seed in range(6):
        pp.append(KMeans(k=15, iterations=1, seed=seed, progress=False).fit(x).stats_[0].objective)
        rnd.append(KMeans(k=15, iterations=1, init="random", seed=seed,
                          progress=False).fit(x).stats_[0].objective)
    assert np.mean(pp) < np.mean(rnd)


def test_duplicates_are_fine(rng):
    base = rng.standard_normal((3, 5)).astype(np.float32)
    x = np.repeat(base, 40, axis=0)
    km = KMeans(k=5, iterations=3, progress=False)
    labels, dists = km.fit_predict(x)
    assert np.isfinite(km.centroids_).all()
    assert km.objective_ == pytest.approx(0.0, abs=1e-5)


def test_nonfinite_raise_and_skip(rng, tmp_path):
    x, _ = blobs(rng, n=200, d=4)
    x[57, 2] = np.nan
    x[120, 0] = np.inf
    with pytest.raises(ValueError, match="row 57"):
        KMeans(k=3, progress=False).fit(x)
    np.save(tmp_path / "a.npy", x[:100])
    np.save(tmp_path / "b.npy", x[100:])
    with pytest.raises(DataError, match=r"a\.npy.*row 57"):
        KMeans(k=3, progress=False).fit([tmp_path / "a.npy", tmp_path / "b.npy"])
    km = KMeans(k=3, iterations=3, nonfinite="skip", chunk_size=50, progress=False)
    labels, dists = km.fit_predict(x)
    np.testing.assert_array_equal(km.skipped_rows_, [57, 120])
    assert km.n_points_ == 198 and labels[57] == -1 and labels[120] == -1
    assert np.isfinite(km.centroids_).all() and (labels[np.isfinite(dists)] >= 0).all()


def test_bad_arguments(rng, tmp_path):
    x = rng.standard_normal((10, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="k=11 clusters but the data has only 10"):
        KMeans(k=11, progress=False).fit(x)
    with pytest.raises(ValueError, match="init"):
        KMeansConfig(k=2, init="bogus").validate()
    with pytest.raises(ValueError, match="2-D"):
        KMeans(k=2).fit(x[0])
    with pytest.raises(ValueError, match="init_centroids has shape"):
        KMeans(k=2).fit(x, init_centroids=x[:3])


def test_bad_shards(rng, tmp_path):
    a = tmp_path / "a.npy"
    np.save(a, rng.standard_normal((50, 4)).astype(np.float32))
    with pytest.raises(DataError, match="missing.npy: shard is missing"):
        KMeans(k=2).fit([a, tmp_path / "missing.npy"])
    b = tmp_path / "b.npy"
    np.save(b, rng.standard_normal((50, 5)).astype(np.float32))
    with pytest.raises(DataError, match=r"b\.npy: has d=5"):
        KMeans(k=2).fit([a, b])
    t = tmp_path / "t.npy"
    np.save(t, rng.standard_normal((50, 4)).astype(np.float32))
    with open(t, "r+b") as f:
        f.truncate(400)
    with pytest.raises(DataError, match=r"t\.npy: truncated"):
        KMeans(k=2).fit([a, t])


def test_device_assigner_uploads_centroids_once_per_iteration(rng):
    """The GPU path's plumbing, run on the CPU device: same fit as the host engine, one
    centroid upload per Lloyd iteration (not per chunk)."""
    import torch

    from fastssl.curation.kmeans import DeviceAssigner, KMeans, KMeansConfig

    x = rng.standard_normal((3000, 12)).astype(np.float32)
    cfg = dict(k=9, iterations=4, seed=3, chunk_size=500, progress=False)
    host = KMeans(KMeansConfig(**cfg)).fit(x)
    assigner = DeviceAssigner(torch.device("cpu"), impl="torch")
    dev = KMeans(KMeansConfig(**cfg), assigner=assigner).fit(x)
    np.testing.assert_allclose(dev.centroids_, host.centroids_, rtol=1e-4, atol=1e-4)
    assert assigner.uploads == 4  # 6 chunks per iteration, one upload each iteration


@pytest.mark.gpu
def test_kmeans_on_gpu_matches_host(rng):
    from fastssl.curation.kmeans import KMeans, KMeansConfig

    x = rng.standard_normal((20000, 64)).astype(np.float32)
    cfg = dict(k=50, iterations=5, seed=1, progress=False)
    host = KMeans(KMeansConfig(impl="cpu", **cfg)).fit(x)
    gpu = KMeans(KMeansConfig(impl="cuda", **cfg)).fit(x)
    assert abs(gpu.stats_[-1].objective - host.stats_[-1].objective) <= 1e-4 * host.stats_[-1].objective


def test_kmeans_plusplus_on_a_device_equals_the_host(rng):
    """The initialisation runs where the assigner runs (a GPU in practice); the picks do
    not depend on it (here the device is the CPU, the code path the same)."""
    import torch

    from fastssl.curation.kmeans import kmeans_plusplus

    sample = rng.standard_normal((500, 7)).astype(np.float32)
    host = kmeans_plusplus(sample, 20, np.random.default_rng(3))
    dev = kmeans_plusplus(sample, 20, np.random.default_rng(3), device=torch.device("cpu"))
    np.testing.assert_array_equal(host, dev)


def test_init_sample_grows_with_k(rng):
    """init_sample_per_centroid: the k-means++ candidate sample is per-centroid x k."""
    from fastssl.curation import KMeansConfig

    x = rng.standard_normal((40_000, 3)).astype(np.float32)
    seen = {}

    def spy(sample, k, rng_, candidates=None, device=None, checkpoint=None):
        seen["m"] = sample.shape[0]
        return np.arange(k)

    import fastssl.curation.kmeans as km_mod

    orig = km_mod.kmeans_plusplus
    km_mod.kmeans_plusplus = spy
    try:
        KMeans(KMeansConfig(k=1000, iterations=0, init_sample_per_centroid=30,
                            progress=False)).fit(x)
        assert seen["m"] == 30_000
        KMeans(KMeansConfig(k=10, iterations=0, progress=False)).fit(x)
        assert seen["m"] == 16_384  # the floor
    finally:
        km_mod.kmeans_plusplus = orig


def test_nonfinite_check_rides_on_the_first_pass(rng, monkeypatch):
    """10: in "raise" mode no pass over the data is spent only on the NaN/inf check (fit
    reads the data once per Lloyd iteration), and a bad row still raises naming it."""
    from fastssl.curation._source import PointSource

    x = rng.standard_normal((3000, 5)).astype(np.float32)
    passes = []
    orig = PointSource.chunks

    def counting(self, start, stop, chunk_rows):
        passes.append((start, stop))
        return orig(self, start, stop, chunk_rows)

    monkeypatch.setattr(PointSource, "chunks", counting)
    km = KMeans(k=4, iterations=3, progress=False).fit(x)
    assert len(passes) == 3
    km.predict()
    assert len(passes) == 4
    passes.clear()
    KMeans(k=4, iterations=3, nonfinite="skip", progress=False).fit(x)
    assert len(passes) == 4  # "skip" must know the rows before sampling: one scan
    bad = x.copy()
    bad[2711, 3] = np.inf
    with pytest.raises(ValueError, match="row 2711"):
        KMeans(k=4, iterations=2, init="random", progress=False).fit(bad)
    bad[2711, 3] = 0.0
    bad[5, 0] = np.nan  # in the k-means++ sample (all rows here): raises before any pass
    with pytest.raises(ValueError, match="row 5 "):
        KMeans(k=4, iterations=2, progress=False).fit(bad)


@pytest.mark.parametrize("empty, expected", [("keep", [2.0, 10.5, 100.0]),
                                             ("reseed", [2.0, 10.5, 5.0])])
def test_empty_cluster_by_hand(empty, expected):
    """Points 0, 1, 5, 10, 11 and centres 2, 10.5, 100: squared distances 4, 1, 9 to the
    first, 0.25, 0.25 to the second, the third gets no point. One iteration by hand: the
    means stay 2 and 10.5; "keep" (SDC) leaves 100, "reseed" takes the farthest point, 5."""
    x = np.array([[0.0], [1.0], [5.0], [10.0], [11.0]], np.float32)
    c0 = np.array([[2.0], [10.5], [100.0]], np.float32)
    km = KMeans(k=3, iterations=1, empty=empty, progress=False).fit(x, init_centroids=c0)
    np.testing.assert_array_equal(km.centroids_[:, 0], np.array(expected, np.float32))
    assert km.stats_[0].n_empty == 1 and km.stats_[0].n_reseeded == (empty == "reseed")


def test_kmeanspp_start_killed_then_resumed_equals_uninterrupted(rng, tmp_path, monkeypatch):
    """21 §4: a kill during the greedy k-means++ start loses nothing: the rerun resumes
    after the checkpointed centres (it does only the remaining ones) and its centroids
    equal an uninterrupted run's bit for bit."""
    from fastssl.curation.kmeans import KmppCheckpoint

    x, _ = blobs(rng, n=2000, d=7, centers=12, spread=6.0)
    settings = dict(k=40, iterations=3, seed=11, progress=False)
    ref = KMeans(**settings).fit(x)
    real = KmppCheckpoint.maybe_save
    calls, kills = [], []

    def killed_after_17(self, chosen, *args, **kwargs):
        real(self, chosen, *args, **kwargs)
        calls.append(len(chosen))
        if len(chosen) == 17 and not kills:
            kills.append(1)
            raise KeyboardInterrupt  # the job dies with 17 centres checkpointed

    monkeypatch.setattr(KmppCheckpoint, "maybe_save", killed_after_17)
    path = tmp_path / "start.npz"
    with pytest.raises(KeyboardInterrupt):
        KMeans(**settings).fit(x, init_checkpoint=KmppCheckpoint(path, every_s=0))
    calls.clear()
    resumed = KMeans(**settings).fit(x, init_checkpoint=KmppCheckpoint(path, every_s=0))
    assert calls[0] == 17 and calls[-2:] == [39, 40]  # resumed at centre 17, not redone
    np.testing.assert_array_equal(resumed.centroids_, ref.centroids_)
    with pytest.raises(DataError, match="start.npz: a k-means.. checkpoint of"):
        KmppCheckpoint(path).load(2000, 41, 5)  # another start's shape is refused
