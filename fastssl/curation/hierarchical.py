"""Hierarchical k-means (Vo et al. 2024): the tree behind balanced data curation.

Level 1 clusters the points; level l > 1 clusters the centroids of level l - 1. Optional
steps, in order, inside a level:

    kmeans        Lloyd iterations from a k-means++ (or random) initialisation
    split         level 1 only: every cluster is split into ``split_k`` sub-clusters by a
                  k-means inside it; each Lloyd step of all groups together is ONE
                  ``fastssl.kmeans.assign_grouped`` call over the points sorted by parent
                  (per memory-budget batch of whole groups). The non-empty sub-clusters
                  become the level-1 clusters.
    resample_i    take ``sample_size`` inputs per cluster ("closest" to the centroid or
                  "random"), re-run k-means on that subset only, initialised from the
                  current centroids, then reassign every input (clusters re-sorted by
                  distance). Moves centroids from dense modes to an even cover.

Every finished step is checkpointed under ``output_dir/work`` and recorded in
``output_dir/progress.json`` (atomic writes), so a killed job rerun with the same config
resumes after its last finished step and produces the same tree; a different config is
refused unless ``overwrite=True``. The result is a :class:`HierarchicalTree` saved in
``output_dir`` (see fastssl.curation.tree), loaded memory-mapped.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from fastssl import distributed as dist
from fastssl.curation._source import PointSource
from fastssl.curation.kmeans import (KMeans, KMeansConfig, _one_thread, _progress_enabled,
                                     _scatter_add)
from fastssl.curation.tree import HierarchicalTree, TreeLevel, save_npy_atomic, write_text_atomic

log = logging.getLogger(__name__)

__all__ = ["hierarchical_kmeans", "HierarchicalConfig", "LevelConfig", "split_clusters",
           "grouped_lloyd", "FAIL_ENV"]

# Raise after this many checkpoints written by this process (tests/drills of resume).
FAIL_ENV = "FASTSSL_CURATE_FAIL_AFTER"
_STATE = ("centroids", "labels", "distances")


@dataclass
class LevelConfig:
    """One level; None fields take the HierarchicalConfig default.

    Attributes:
        k: clusters at this level (level 1 before the split).
        iterations: Lloyd iterations of the initial k-means and of each resampling step.
        resampling_steps: number of resampling steps (default: HierarchicalConfig's for
            levels 2+, 0 for level 1 unless resample_level1).
        sample_size: inputs taken per cluster by a resampling step (None: half the mean
            cluster size, at least 1).
        sampling_strategy: "closest" | "random".
    """

    k: int
    iterations: int | None = None
    resampling_steps: int | None = None
    sample_size: int | None = None
    sampling_strategy: str | None = None


@dataclass
class HierarchicalConfig:
    """Settings of a tree (defaults documented; all JSON-serialisable).

    Attributes:
        levels: one LevelConfig per level, finest first (ints are accepted).
        iterations: default Lloyd iterations per k-means run (the papers use 50).
        resampling_steps: default resampling steps of levels 2+ (the paper uses 10).
        resample_level1: also run resampling steps at level 1 (on the points).
        sample_size: default per-cluster sample of a resampling step (None: half mean size).
        sampling_strategy: default "random" | "closest".
        split_k: level 1 only: split each cluster into this many sub-clusters (None: no split).
        split_iterations: Lloyd iterations of the split (None: iterations).
        init: "kmeans++" | "random" initialisation of each level's first k-means.
        init_sample_size, init_candidates, fp64_accumulate, memory_budget_mb, impl,
        nonfinite: passed to KMeansConfig (see there).
        seed: every step derives its own seed from (seed, level, step).
        progress: tqdm bars (None: only on a TTY).
    """

    levels: list[LevelConfig]
    iterations: int = 20
    resampling_steps: int = 0
    resample_level1: bool = False
    sample_size: int | None = None
    sampling_strategy: str = "random"
    split_k: int | None = None
    split_iterations: int | None = None
    init: str = "kmeans++"
    init_sample_size: int | None = None
    init_candidates: int | None = None
    fp64_accumulate: bool = True
    memory_budget_mb: float = 512.0
    impl: str = "auto"
    nonfinite: str = "raise"
    seed: int = 0
    progress: bool | None = None

    def __post_init__(self) -> None:
        lv = []
        for item in self.levels:
            if isinstance(item, LevelConfig):
                lv.append(item)
            elif isinstance(item, dict):
                lv.append(LevelConfig(**item))
            elif isinstance(item, (int, np.integer)) and not isinstance(item, bool):
                lv.append(LevelConfig(k=int(item)))
            else:
                raise TypeError(f"levels entries must be ints, dicts or LevelConfig, got {item!r}")
        self.levels = lv

    def validate(self) -> None:
        if not self.levels:
            raise ValueError("levels is empty: give at least one cluster count")
        for depth, level in enumerate(self.levels, start=1):
            if int(level.k) < 1:
                raise ValueError(f"level {depth}: k must be >= 1, got {level.k}")
            if depth > 1 and level.k > self.levels[depth - 2].k and not (depth == 2 and self.split_k):
                raise ValueError(f"level {depth} asks for k={level.k} clusters but level "
                                 f"{depth - 1} has only {self.levels[depth - 2].k} clusters")
            strategy = level.sampling_strategy or self.sampling_strategy
            if strategy not in ("closest", "random"):
                raise ValueError(f"level {depth}: sampling_strategy={strategy!r}; expected "
                                 "'closest' or 'random'")
            if level.sample_size is not None and level.sample_size < 1:
                raise ValueError(f"level {depth}: sample_size must be >= 1")
        if self.split_k is not None and int(self.split_k) < 1:
            raise ValueError(f"split_k must be >= 1, got {self.split_k}")
        KMeansConfig(k=1, init=self.init, nonfinite=self.nonfinite,
                     memory_budget_mb=self.memory_budget_mb).validate()

    def steps(self, depth: int) -> list[str]:
        level = self.levels[depth - 1]
        out = ["kmeans"]
        if depth == 1 and self.split_k:
            out.append("split")
        default = self.resampling_steps if (depth > 1 or self.resample_level1) else 0
        n = level.resampling_steps if level.resampling_steps is not None else default
        out += [f"resample_{i}" for i in range(1, int(n) + 1)]
        return out

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("progress")
        return d


# ------------------------------------------------------------------ grouped split
def grouped_lloyd(x: np.ndarray, x_offsets: np.ndarray, centroids: np.ndarray,
                  c_offsets: np.ndarray, iterations: int, *, impl: str = "auto",
                  fp64_accumulate: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Independent k-means inside every group, all groups advanced together.

    Args:
        x: (m, d) rows sorted by group; x_offsets (G+1,) CSR offsets into them.
        centroids: (K, d) initial centroids, group g owning c_offsets[g]:c_offsets[g+1].
        iterations: Lloyd steps; each is ONE assign_grouped call + one scatter-add.
    Returns:
        centroids (K, d) float32 (empty ones kept), labels (m,) int64 into them, and
        distances (m,) float32 from a final assignment.
    """
    import torch

    from fastssl.kmeans import assign_grouped

    from fastssl.curation.kmeans import assign_device

    K, d = centroids.shape
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    slab = torch.empty((4096, d), dtype=torch.float64) if fp64_accumulate else None
    device = assign_device(impl)
    # On a GPU the batch of groups goes up once; each step sends centroids up and labels
    # back, and the scatter-add stays on the host copy.
    x_assign = torch.from_numpy(np.ascontiguousarray(x)).to(device) if device is not None else x
    run_impl = "cuda" if device is not None else impl

    def assign_all(centroids_now):
        cc = torch.from_numpy(centroids_now).to(device) if device is not None else centroids_now
        lab, dd = assign_grouped(x_assign, x_offsets, cc, c_offsets, impl=run_impl,
                                 check_finite=False)
        if device is not None:
            lab, dd = lab.cpu().numpy(), dd.cpu().numpy()
        return lab, dd

    for _ in range(int(iterations)):
        labels, _ = assign_all(c)
        sums = torch.zeros((K, d), dtype=torch.float64 if fp64_accumulate else torch.float32)
        counts = torch.zeros(K, dtype=torch.int64)
        with _one_thread():
            _scatter_add(sums, counts, x, np.asarray(labels, dtype=np.int64), slab)
        nonempty = (counts > 0).numpy()
        new = (sums / counts.clamp_min(1)[:, None].to(sums.dtype)).float().numpy()
        c = np.where(nonempty[:, None], new, c).astype(np.float32)
    labels, dists = assign_all(c)
    return c, np.asarray(labels, dtype=np.int64), np.asarray(dists, dtype=np.float32)


def _grouped_init(x: np.ndarray, x_offsets: np.ndarray, c_offsets: np.ndarray,
                  rng: np.random.Generator, init: str) -> np.ndarray:
    """k_g starting centres inside every group, vectorised over groups.

    "random": k_g distinct members per group. "kmeans++": D^2 sampling with one
    candidate per round (plain k-means++), every group advanced in the same round; a
    round costs O(rows of the groups still growing * d).
    """
    import torch

    sizes = np.diff(x_offsets)
    ks = np.diff(c_offsets)
    G = sizes.shape[0]
    if init == "random":
        keys = rng.random(x.shape[0])
        order = np.lexsort((keys, np.repeat(np.arange(G), sizes)))  # shuffled per group
        grp = np.flatnonzero(ks > 0)
        return np.ascontiguousarray(x[order[_ranges(x_offsets[grp], ks[grp])]], dtype=np.float32)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    picks = np.empty(int(c_offsets[-1]), dtype=np.int64)
    active = np.flatnonzero(ks > 0)
    first = x_offsets[active] + (rng.random(active.size) * sizes[active]).astype(np.int64)
    picks[c_offsets[active]] = first
    centre_of_group = np.zeros(G, dtype=np.int64)
    centre_of_group[active] = first
    row_centre = torch.from_numpy(np.repeat(centre_of_group, sizes))
    D = ((xt - xt[row_centre]) ** 2).sum(1).double().numpy()
    for r in range(1, int(ks.max(initial=0))):
        grp = np.flatnonzero(ks > r)
        cum = np.cumsum(D)
        lo, hi = x_offsets[grp], x_offsets[grp + 1]
        before = np.where(lo > 0, cum[np.maximum(lo - 1, 0)], 0.0)
        total = cum[hi - 1] - before
        idx = np.searchsorted(cum, before + rng.random(grp.size) * total, side="right")
        zero = total <= 0  # all rows coincide with a centre: any row will do
        idx[zero] = lo[zero] + (rng.random(int(zero.sum())) * sizes[grp[zero]]).astype(np.int64)
        idx = np.clip(idx, lo, hi - 1)
        picks[c_offsets[grp] + r] = idx
        rows = _ranges(lo, sizes[grp])
        new_c = torch.from_numpy(np.repeat(idx, sizes[grp]))
        d_new = ((xt[torch.from_numpy(rows)] - xt[new_c]) ** 2).sum(1).double().numpy()
        D[rows] = np.minimum(D[rows], d_new)
    return np.ascontiguousarray(x[picks], dtype=np.float32)


def _ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenation of arange(starts[i], starts[i] + lens[i]), vectorised."""
    lens = np.asarray(lens, dtype=np.int64)
    shift = np.repeat(np.asarray(starts, dtype=np.int64) - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
    return shift + np.arange(int(lens.sum()), dtype=np.int64)


def split_clusters(src: PointSource, labels: np.ndarray, split_k: int, iterations: int, *,
                   seed: int = 0, init: str = "kmeans++", impl: str = "auto",
                   memory_budget_mb: float = 512.0, fp64_accumulate: bool = True,
                   progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Splits every cluster into min(split_k, size) sub-clusters by a local k-means.

    Points are sorted by parent; whole groups are batched to fit the memory budget (one
    batch when everything fits), each batch is read once and advanced with
    :func:`grouped_lloyd`. Batches are shared round-robin among ranks.

    Args:
        src: the points (n, d). labels: (n,) int parent cluster of every point.
    Returns:
        centroids (K', d) float32 of the non-empty sub-clusters, labels (n,) int64 into
        them, distances (n,) float32.
    """
    from tqdm import tqdm

    n = src.n
    labels = np.asarray(labels, dtype=np.int64)
    G = int(labels.max()) + 1 if n else 0
    order = np.argsort(labels, kind="stable")
    sizes = np.bincount(labels, minlength=G)
    x_offsets = np.zeros(G + 1, dtype=np.int64)
    np.cumsum(sizes, out=x_offsets[1:])
    ks = np.minimum(sizes, int(split_k))
    c_offsets = np.zeros(G + 1, dtype=np.int64)
    np.cumsum(ks, out=c_offsets[1:])
    budget_rows = max(1, int(memory_budget_mb * (1 << 20)) // (src.row_bytes + 4 * src.d + 24))
    # batches of whole groups: [g0, g1) with at most budget_rows rows (or one big group)
    bounds = [0]
    while bounds[-1] < G:
        g0 = bounds[-1]
        limit = x_offsets[g0] + budget_rows
        g1 = int(np.searchsorted(x_offsets, limit, side="right")) - 1
        bounds.append(max(g1, g0 + 1))
    K = int(c_offsets[-1])
    cent = np.zeros((K, src.d), dtype=np.float32)
    out_labels = np.zeros(n, dtype=np.int64)
    out_dists = np.zeros(n, dtype=np.float32)
    rank, world = dist.rank(), dist.world_size()
    batches = list(zip(bounds[:-1], bounds[1:]))
    rng_seq = np.random.SeedSequence([seed, 7])
    rngs = [np.random.default_rng(s) for s in rng_seq.spawn(len(batches))]
    with tqdm(total=n, desc="split", unit="pt", unit_scale=True, leave=False,
              disable=not (progress and dist.is_main())) as bar:
        for b, (g0, g1) in enumerate(batches):
            if b % world != rank:
                continue
            r0, r1 = int(x_offsets[g0]), int(x_offsets[g1])
            rows = order[r0:r1]
            x = src.take(rows)
            xo = x_offsets[g0 : g1 + 1] - r0
            co = c_offsets[g0 : g1 + 1] - c_offsets[g0]
            c0 = _grouped_init(x, xo, co, rngs[b], init)
            c, lab, dd = grouped_lloyd(x, xo, c0, co, iterations, impl=impl,
                                       fp64_accumulate=fp64_accumulate)
            cent[c_offsets[g0] : c_offsets[g1]] = c
            out_labels[rows] = lab + c_offsets[g0]
            out_dists[rows] = dd
            bar.update(r1 - r0)
    if dist.is_initialized():  # every entry was written by exactly one rank
        cent = dist.all_reduce_sum(cent)
        out_labels = dist.all_reduce_sum(out_labels)
        out_dists = dist.all_reduce_sum(out_dists)
    used = np.bincount(out_labels, minlength=K) > 0
    remap = np.cumsum(used) - 1
    return np.ascontiguousarray(cent[used]), remap[out_labels], out_dists


# ------------------------------------------------------------------ resampling
def resample_rows(level: TreeLevel, sample_size: int, strategy: str,
                  rng: np.random.Generator) -> np.ndarray:
    """min(sample_size, size) inputs of every cluster: the closest, or a random subset.

    Returns sorted (m,) int64 input indices.
    """
    offsets = np.asarray(level.offsets)
    members = np.asarray(level.members)
    sizes = np.diff(offsets)
    take = np.minimum(sizes, int(sample_size))
    k = sizes.shape[0]
    if strategy == "random":
        cluster = np.repeat(np.arange(k), sizes)
        order = np.lexsort((rng.random(members.shape[0]), cluster))
        members = members[order]
    return np.sort(members[_ranges(offsets[:-1], take)])


# ------------------------------------------------------------------ checkpoints
class _Progress:
    """progress.json + work/level_<l>/<step>/ arrays; main rank writes, all ranks read."""

    def __init__(self, root: Path | None, record: dict, overwrite: bool):
        self.root = root
        self.done: list[str] = []
        self.written = 0
        self.complete = False
        self.fail_after = int(os.environ.get(FAIL_ENV, "0") or 0)
        if root is None:
            return
        path = root / "progress.json"
        if path.exists():
            old = json.loads(path.read_text(encoding="utf-8"))
            if old.get("record") != record:
                if not overwrite:
                    diff = sorted(k for k in set(old.get("record", {})) | set(record)
                                  if old.get("record", {}).get(k) != record.get(k))
                    raise ValueError(
                        f"{root} holds a hierarchical k-means run with a different config "
                        f"(differs in {diff}); use another output directory or overwrite=True")
                if dist.is_main():
                    self._clear()
            else:
                self.done = list(old.get("done", []))
                self.complete = bool(old.get("complete")) and (root / "tree.json").exists()
        dist.barrier()
        if dist.is_main():
            root.mkdir(parents=True, exist_ok=True)
        self.record = record
        if not self.complete:
            self._write()

    def _clear(self) -> None:
        root = self.root
        for name in ("progress.json", "tree.json"):
            (root / name).unlink(missing_ok=True)
        for sub in list(root.glob("level_*")) + [root / "work"]:
            if sub.is_dir():
                shutil.rmtree(sub)

    def _write(self, complete: bool = False) -> None:
        if self.root is None or not dist.is_main():
            return
        body = {"record": self.record, "done": self.done, "complete": complete}
        write_text_atomic(self.root / "progress.json", json.dumps(body, indent=1))

    def step_dir(self, depth: int, step: str) -> Path:
        return self.root / "work" / f"level_{depth}" / step

    def has(self, depth: int, step: str) -> bool:
        return f"{depth}/{step}" in self.done

    def load(self, depth: int, step: str) -> tuple[np.ndarray, ...]:
        sub = self.step_dir(depth, step)
        return tuple(np.load(sub / f"{name}.npy") for name in _STATE)

    def save(self, depth: int, step: str, state: tuple[np.ndarray, ...], prev: str | None,
             callback: Callable[[int, str], None] | None) -> None:
        if self.root is not None:
            if dist.is_main():
                sub = self.step_dir(depth, step)
                sub.mkdir(parents=True, exist_ok=True)
                for name, arr in zip(_STATE, state):
                    save_npy_atomic(sub / f"{name}.npy", np.asarray(arr))
                self.done.append(f"{depth}/{step}")
                self._write()
                if prev is not None:  # only the latest state of a level is needed
                    shutil.rmtree(self.step_dir(depth, prev), ignore_errors=True)
            else:
                self.done.append(f"{depth}/{step}")
            dist.barrier()
        self.written += 1
        if callback is not None:
            callback(depth, step)
        if self.fail_after and self.written >= self.fail_after:
            raise RuntimeError(f"{FAIL_ENV}={self.fail_after}: injected failure after "
                               f"level {depth} step {step}")

    def finish(self) -> None:
        self._write(complete=True)
        if self.root is not None and dist.is_main():
            shutil.rmtree(self.root / "work", ignore_errors=True)


# ------------------------------------------------------------------ the job
def _step_seed(seed: int, depth: int, step_index: int) -> int:
    return int(np.random.SeedSequence([seed, depth, step_index]).generate_state(1)[0])


def hierarchical_kmeans(
    data: Any,
    levels: Sequence[int | dict | LevelConfig] | None = None,
    *,
    config: HierarchicalConfig | None = None,
    output_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    callback: Callable[[int, str], None] | None = None,
    **kwargs: Any,
) -> HierarchicalTree:
    """Builds (or resumes) a hierarchical k-means tree.

    Args:
        data: (n, d) array / memmap / CPU tensor, or .npy shard paths (see KMeans.fit).
        levels: cluster counts finest first, e.g. [10000, 1000, 100, 10] (or LevelConfig).
        config: a HierarchicalConfig instead of levels + keyword fields.
        output_dir: where the tree, progress.json and checkpoints go (None: in memory,
            no resume).
        overwrite: discard a run of a different config found in output_dir.
        callback: called as callback(level, step) after each checkpoint.
        **kwargs: HierarchicalConfig fields (iterations, resampling_steps, split_k, ...).
    Returns:
        the HierarchicalTree (memory-mapped from output_dir when given). With
        nonfinite="skip", the tree covers the finite rows only and
        ``tree.meta["point_ids"]`` names the file mapping tree points to data rows.
    """
    if config is None:
        if levels is None:
            raise TypeError("give levels=[k1, k2, ...] or config=HierarchicalConfig(...)")
        config = HierarchicalConfig(levels=list(levels), **kwargs)
    elif levels is not None or kwargs:
        raise TypeError("pass either config or levels + keyword fields, not both")
    config.validate()
    src = PointSource.from_data(data)
    root = Path(output_dir) if output_dir is not None else None
    record = {"config": config.to_json(), "data": src.fingerprint()}
    record = json.loads(json.dumps(record))  # normalise tuples etc. for comparison
    prog = _Progress(root, record, overwrite)
    if prog.complete:
        log.info("hierarchical k-means: %s is complete; loading it", root)
        return HierarchicalTree.load(root)

    show = config.progress
    meta: dict = {"config": record["config"], "data": record["data"], "steps": []}
    point_ids = None
    if config.nonfinite == "skip":
        km = KMeans(KMeansConfig(k=1, nonfinite="skip", memory_budget_mb=config.memory_budget_mb))
        start, stop = dist.rank_slice(src.n)
        bad = np.concatenate(dist.all_gather_arrays(
            km._scan_nonfinite(src, start, stop, km._chunk_rows(src))))
        if bad.size:
            keep = np.ones(src.n, dtype=bool)
            keep[bad] = False
            point_ids = np.flatnonzero(keep).astype(np.int64)
            src = src.subset(point_ids)
            meta["skipped_rows"] = int(bad.size)
            log.warning("hierarchical k-means: %d non-finite rows left out", bad.size)

    tree_levels: list[TreeLevel] = []
    inputs: PointSource = src
    for depth in range(1, len(config.levels) + 1):
        lc = config.levels[depth - 1]
        if lc.k > inputs.n:
            what = "points" if depth == 1 else f"level {depth - 1} clusters"
            raise ValueError(f"level {depth} asks for k={lc.k} clusters but there are only "
                             f"{inputs.n} {what}")
        iters = lc.iterations if lc.iterations is not None else config.iterations
        state = None
        prev = None
        for si, step in enumerate(config.steps(depth)):
            if prog.has(depth, step):
                prev = step
                continue
            if state is None and prev is not None:
                state = prog.load(depth, prev)
            t0 = time.perf_counter()
            seed = _step_seed(config.seed, depth, si)
            state = _run_step(config, lc, depth, step, iters, seed, inputs, state, show)
            secs = time.perf_counter() - t0
            meta["steps"].append({"level": depth, "step": step, "seconds": round(secs, 3)})
            log.info("level %d %s: k=%d, %.1fs (%.3g inputs/s)", depth, step,
                     state[0].shape[0], secs, inputs.n / max(secs, 1e-9))
            prog.save(depth, step, state, prev, callback)
            prev = step
        if state is None:
            state = prog.load(depth, prev)
        centroids, labels, dists = state
        tree_levels.append(TreeLevel.from_assignments(centroids, labels.astype(np.int64), dists))
        inputs = PointSource.from_data(np.ascontiguousarray(centroids, dtype=np.float32))
        if depth < len(config.levels) and config.levels[depth].k > centroids.shape[0]:
            raise ValueError(f"level {depth + 1} asks for k={config.levels[depth].k} clusters "
                             f"but level {depth} has only {centroids.shape[0]} clusters")

    tree = HierarchicalTree(levels=tree_levels, meta=meta)
    if root is None:
        return tree
    if dist.is_main():
        if point_ids is not None:
            save_npy_atomic(root / "point_ids.npy", point_ids)
            tree.meta["point_ids"] = "point_ids.npy"
        tree.save(root)
        prog.finish()
    dist.barrier()
    return HierarchicalTree.load(root)


def _kmeans_config(config: HierarchicalConfig, k: int, iters: int, seed: int, show,
                   nonfinite: str = "raise") -> KMeansConfig:
    return KMeansConfig(
        k=k, iterations=iters, init=config.init, init_sample_size=config.init_sample_size,
        init_candidates=config.init_candidates, seed=seed,
        memory_budget_mb=config.memory_budget_mb, fp64_accumulate=config.fp64_accumulate,
        impl=config.impl, nonfinite=nonfinite, progress=show)


def _run_step(config: HierarchicalConfig, lc: LevelConfig, depth: int, step: str, iters: int,
              seed: int, inputs: PointSource, state, show):
    if step == "kmeans":
        km = KMeans(_kmeans_config(config, lc.k, iters, seed, show))
        labels, dists = km.fit_predict(inputs)
        return km.centroids_, labels, dists
    centroids, labels, dists = state
    if step == "split":
        iters_split = config.split_iterations if config.split_iterations is not None else iters
        c, lab, dd = split_clusters(inputs, labels, int(config.split_k), iters_split, seed=seed,
                                    init=config.init, impl=config.impl,
                                    memory_budget_mb=config.memory_budget_mb,
                                    fp64_accumulate=config.fp64_accumulate,
                                    progress=_progress_enabled(show))
        return c, lab, dd
    # resample_i
    k = centroids.shape[0]
    level = TreeLevel.from_assignments(centroids, labels.astype(np.int64), dists)
    sample_size = lc.sample_size or config.sample_size or max(1, int(round(inputs.n / (2 * k))))
    strategy = lc.sampling_strategy or config.sampling_strategy
    rows = resample_rows(level, sample_size, strategy, np.random.default_rng(seed))
    if rows.shape[0] < k:
        log.warning("level %d %s: %d sampled inputs for %d clusters; step skipped",
                    depth, step, rows.shape[0], k)
        return centroids, labels, dists
    km = KMeans(_kmeans_config(config, k, iters, seed, show))
    km.fit(inputs.subset(rows), init_centroids=centroids)
    new_labels, new_dists = km.predict(inputs)
    return km.centroids_, new_labels, new_dists
