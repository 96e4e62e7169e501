"""fastssl.distributed: launcher parsing, single-process identity, 2-rank gloo k-means."""
from __future__ import annotations

import os
import socket

import numpy as np
import pytest

from fastssl import distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("nodelist, host", [
    ("gpu[03-05,9],cpu1", "gpu03"), ("node17", "node17"), ("a[1,3]", "a1"),
    ("n-[007-009]", "n-007"),
])
def test_first_host(nodelist, host):
    assert dist.first_host(nodelist) == host


def test_alone_without_launcher(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    info = dist.init()
    assert (info.rank, info.world_size, info.backend) == (0, 1, "")
    assert dist.rank() == 0 and dist.world_size() == 1 and dist.is_main()
    x = np.arange(6.0)
    assert dist.all_reduce_sum(x) is x
    assert dist.all_gather_arrays(x)[0] is x
    assert dist.rank_slice(10, 1, 3) == (3, 6)
    dist.barrier()


def test_slurm_env_parsing(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NODELIST", "gpu[12-13]")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert dist._launch_env() == ("slurm", 3, 8, 1, "gpu12", 29500 + 4242)
    monkeypatch.setenv("RANK", "x")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="RANK='x'"):
        dist._launch_env()


def _worker(rank: int, world: int, port: int, data: str, out: str, k: int, seed: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(1)
    from fastssl.curation import KMeans

    info = dist.init(backend="gloo")
    assert info.world_size == world and dist.rank() == rank
    parts = dist.all_gather_arrays(np.arange(rank + 2, dtype=np.int64))  # variable sizes
    assert [p.tolist() for p in parts] == [list(range(r + 2)) for r in range(world)]
    assert float(dist.all_reduce_sum(torch.ones(3))[0]) == world
    assert int(dist.broadcast(np.array([rank + 5]), src=1)[0]) == 6
    for dst in (0, 1):  # only dst receives, variable sizes, trailing shape kept
        got = dist.gather_arrays(np.full((rank + 1, 2), rank, np.float16), dst=dst)
        assert (got is None) == (rank != dst)
        if got is not None:
            assert [g.tolist() for g in got] == [[[r, r]] * (r + 1) for r in range(world)]
    km = KMeans(k=k, iterations=6, seed=seed, chunk_size=97, progress=False)
    labels, dists = km.fit_predict(data)
    # float16 data: the k-means++ sample travels in float16, the centroids in float32
    km16 = KMeans(k=k, iterations=4, seed=seed, chunk_size=97, progress=False)
    labels16, _ = km16.fit_predict(data.replace(".npy", "16.npy"))
    main_only = km.predict(gather="main")
    if dist.is_main():
        np.testing.assert_array_equal(main_only[0], labels)
        np.testing.assert_array_equal(main_only[1], dists)
    else:
        assert main_only == (None, None)
    from fastssl.curation import hierarchical_kmeans

    # A checkpointed tree: the k-means++ sample, labels and distances go to the main rank
    # only (the others reload the written state); nothing per-point is all-gathered.
    all_gathered = []
    all_gather = dist.all_gather_arrays

    def audited(x):
        all_gathered.append(np.asarray(x).nbytes)
        return all_gather(x)

    dist.all_gather_arrays = audited
    hierarchical_kmeans(data, [12, 4], output_dir=os.path.join(out, "tree2"), iterations=3,
                        split_k=2, resampling_steps=1, memory_budget_mb=0.03, progress=False)
    dist.all_gather_arrays = all_gather
    n_points = np.load(data, mmap_mode="r").shape[0]
    assert all_gathered and max(all_gathered) < n_points // world, all_gathered
    if dist.is_main():
        np.save(os.path.join(out, "centroids.npy"), km.centroids_)
        np.save(os.path.join(out, "labels.npy"), labels)
        np.save(os.path.join(out, "labels16.npy"), labels16)
        np.save(os.path.join(out, "objectives.npy"), [s.objective for s in km.stats_])
    dist.barrier()
    dist.shutdown()


def test_one_process_equals_two_gloo_processes(tmp_path, rng):
    import torch.multiprocessing as mp

    from fastssl.curation import KMeans

    centers = rng.standard_normal((8, 16)) * 5
    x = (centers[rng.integers(0, 8, 1001)] + rng.standard_normal((1001, 16))).astype(np.float32)
    x[::7] += rng.standard_normal((143, 16)).astype(np.float32)  # uneven clusters
    path = tmp_path / "x.npy"
    np.save(path, x)
    np.save(tmp_path / "x16.npy", x.astype(np.float16))
    single = KMeans(k=8, iterations=6, seed=5, progress=False)
    labels1, _ = single.fit_predict(str(path))
    mp.start_processes(_worker, args=(2, _free_port(), str(path), str(tmp_path), 8, 5),
                       nprocs=2, join=True, start_method="spawn")
    c2 = np.load(tmp_path / "centroids.npy")
    obj2 = np.load(tmp_path / "objectives.npy")
    np.testing.assert_allclose(obj2, [s.objective for s in single.stats_], rtol=1e-6)
    np.testing.assert_allclose(c2, single.centroids_, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.load(tmp_path / "labels.npy"), labels1)
    labels16, _ = KMeans(k=8, iterations=4, seed=5, progress=False).fit_predict(
        str(tmp_path / "x16.npy"))
    np.testing.assert_array_equal(np.load(tmp_path / "labels16.npy"), labels16)
    # the whole tree (grouped split batches shared across ranks, resampling) agrees too
    from fastssl.curation import HierarchicalTree, hierarchical_kmeans

    tree1 = hierarchical_kmeans(str(path), [12, 4], iterations=3, split_k=2, resampling_steps=1,
                                memory_budget_mb=0.03, progress=False)
    tree2 = HierarchicalTree.load(tmp_path / "tree2")
    for a, b in zip(tree1.levels, tree2.levels):
        np.testing.assert_allclose(np.asarray(b.centroids), a.centroids, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(b.assignments), a.assignments)


# Paper 2's stratified batches under 2 gloo ranks: cluster sizes 2, 30, 40, 50, 60 and a
# global batch of 24. By hand (water-filling): the 2-item cluster gives both items, the
# other 22 go 5, 5, 6, 6 over the four large clusters (water level 5, remainder 2).
_SAMPLER_SIZES = (2, 30, 40, 50, 60)
_SAMPLER_COUNTS = [2, 5, 5, 6, 6]


def _sampler_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from fastssl.curation import ClusterStratifiedBatchSampler

    dist.init(backend="gloo")
    labels = np.repeat(np.arange(len(_SAMPLER_SIZES)), _SAMPLER_SIZES)
    # rank and world_size come from fastssl.distributed, as in a real job
    sampler = ClusterStratifiedBatchSampler(labels, global_batch_size=24,
                                            indices=np.arange(labels.size) + 1000,
                                            pseudo_epoch_size=24 * 6, seed=7)
    assert (sampler.rank, sampler.world_size, sampler.batch_size) == (rank, world, 12)
    np.save(os.path.join(out, f"batches_{rank}.npy"), np.array(list(sampler)))
    dist.barrier()
    dist.shutdown()


@pytest.mark.slow
def test_stratified_batches_over_two_gloo_ranks(tmp_path):
    """21 §3: global_batch_size is the whole job's batch; two ranks' shares are disjoint,
    their union is the one-process global batch, and every global batch holds the
    hand-computed per-cluster counts."""
    import torch.multiprocessing as mp

    from fastssl.curation import ClusterStratifiedBatchSampler

    mp.start_processes(_sampler_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    labels = np.repeat(np.arange(len(_SAMPLER_SIZES)), _SAMPLER_SIZES)
    single = ClusterStratifiedBatchSampler(labels, global_batch_size=24,
                                           indices=np.arange(labels.size) + 1000,
                                           pseudo_epoch_size=24 * 6, seed=7, rank=0,
                                           world_size=1)
    ranks = [np.load(tmp_path / f"batches_{r}.npy") for r in range(2)]
    wholes = list(single)
    assert len(wholes) == 6 and ranks[0].shape == ranks[1].shape == (6, 12)
    for whole, a, b in zip(wholes, ranks[0], ranks[1]):
        assert np.intersect1d(a, b).size == 0
        np.testing.assert_array_equal(np.sort(np.concatenate([a, b])), np.sort(whole))
        counts = np.bincount(labels[np.asarray(whole) - 1000], minlength=5)
        assert sorted(counts.tolist()) == _SAMPLER_COUNTS and counts[0] == 2


class _FakeCuda:
    """torch.cuda as seen on a 4-GPU node (records set_device)."""

    def __init__(self, available: bool):
        self.available, self.current, self.set = available, 0, []

    def install(self, monkeypatch):
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: self.available)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "set_device", lambda i: (self.set.append(i), setattr(self, "current", i)))


def test_pick_device_without_cuda(monkeypatch):
    import torch

    _FakeCuda(False).install(monkeypatch)
    assert dist.pick_device("auto", 3) == torch.device("cpu")
    assert dist.pick_device("cpu") == torch.device("cpu")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=f"device='{name}' but no CUDA device is visible"):
            dist.pick_device(name)
    assert dist.rank_world() == (0, 1)


def test_pick_device_binds_the_local_rank(monkeypatch):
    import torch

    cuda = _FakeCuda(True)
    cuda.install(monkeypatch)
    assert dist.pick_device("auto", 5) == torch.device("cuda", 1) and cuda.set == [1]  # 5 % 4 GPUs
    assert dist.pick_device("cuda", 2) == torch.device("cuda", 2) and cuda.set == [1, 2]
    assert dist.pick_device("cuda") == torch.device("cuda", 2) and cuda.set == [1, 2]  # no rank: the current one
    assert dist.pick_device("cuda:3", 0) == torch.device("cuda", 3) and cuda.set == [1, 2]  # explicit index wins
    with pytest.raises(ValueError, match=r"device='cuda:4' but 4 CUDA device\(s\) are visible"):
        dist.pick_device("cuda:4")   # torch would accept it and fail at the first tensor


@pytest.mark.parametrize("available", [False, True])
@pytest.mark.parametrize("name", ["gpu", "cuda:x", "", "mps", "cuda:", "Cuda", " cpu", "cuda:-1", None])
def test_pick_device_refuses_a_malformed_name_as_a_user_error(monkeypatch, available, name):
    """torch.device('gpu') is a RuntimeError, which the router shows as a traceback; the one
    rule says ValueError naming --device (with or without a GPU), before any CUDA call."""
    cuda = _FakeCuda(available)
    cuda.install(monkeypatch)
    with pytest.raises(ValueError, match=r"^--device: .* is not one of auto, cpu, cuda, cuda:N$"):
        dist.pick_device(name, 1)
    assert cuda.set == []


def test_usable_cores_follows_the_affinity(monkeypatch):
    """The cores this process may use (a batch job's share), not the machine's count."""
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {2, 5}, raising=False)
    assert dist.usable_cores() == 2
    monkeypatch.delattr(os, "sched_getaffinity")   # macOS, Windows: no affinity to read
    assert dist.usable_cores() == 64
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert dist.usable_cores() == 1
