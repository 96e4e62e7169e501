"""One level of k-means at scale: streamed Lloyd iterations over arrays, memmaps or shards.

The loop is device-agnostic and sits behind a seam: an *assigner* (by default
:func:`fastssl.assign.assign`, the fused native engine) labels each chunk, and the
centroid update is a scatter-add of the chunk into float64 (or float32) accumulators with
``torch.index_add_`` -- never a Python loop over clusters. Each rank of a
``torch.distributed`` job owns a contiguous slice of rows; sums, counts and the objective
are all-reduced every iteration, so one process and several give the same centroids.

Initialisation: greedy k-means++ (each new centre draws ``2 + floor(ln k)`` candidates by
D^2 sampling and keeps the one that lowers the potential most) on a uniform subsample, or
``k`` distinct random points. Empty clusters are re-seeded from the points farthest from
their centroids, or kept.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fastssl import distributed as dist
from fastssl.assign import CENTROID_PRECISIONS
from fastssl.config import COUNT, NONNEG, POSITIVE, declared_choices, declared_ranges, setting
from fastssl.curation._source import PointSource
from fastssl.profiling import annotate

log = logging.getLogger(__name__)

__all__ = ["KMeans", "KMeansConfig", "IterationStats", "KmppCheckpoint", "kmeans_plusplus"]

Assigner = Callable[[np.ndarray, np.ndarray], "tuple[np.ndarray, np.ndarray]"]

# Rows converted to float64 per index_add_ call: converting a cache-sized slab is ~4x
# faster than converting a whole 100k-row chunk at once (measured on the dev box).
_F64_SLAB = 4096
# At most this many "farthest point" candidates are kept per pass for empty clusters.
_MAX_RESEED = 4096


# The engines a k-means run may name (fastssl.assign's impl; "auto" picks by device).
KMEANS_IMPLS = ("auto", "cpu", "cuda", "torch")


@dataclass
class KMeansConfig:
    """Settings of one k-means run (every default documented here).

    Attributes:
        k: number of clusters (>= 1, <= number of finite points).
        iterations: Lloyd iterations (50, as SDC and both papers).
        init: "kmeans++" (greedy k-means++ on a subsample) or "random" (k distinct points).
        init_sample_size: points the k-means++ initialisation runs on; None =
            min(n, max(init_sample_per_centroid * k, 16384)). Its cost is
            2 * k * sample * (2 + floor(ln k)) * d flops: at k = 100k, 20 per centroid
            (2M rows), 13 candidates and d = 1024, 2 * 1e5 * 2e6 * 13 * 1024 = 5.3e15,
            minutes on one GPU (bounded by reading the sample once per centre).
        init_sample_per_centroid: default candidate sample per centroid (the sample
            grows with k). Keep 20: 2 measured +7.5 to +14.7% objective (issue 21).
        init_candidates: D^2 candidates per new centre; None = 2 + floor(ln k) (greedy
            k-means++); 1 is plain k-means++.
        seed: seeds every random choice (initial sample, candidates, re-seeding).
        chunk_size: rows per streamed block; None derives it from memory_budget_mb.
        memory_budget_mb: RAM for one block of rows plus its working copies.
        fp64_accumulate: accumulate centroid sums in float64 (order-insensitive enough
            that 1 and N ranks agree); False uses float32.
        empty: "reseed" (farthest points become the centres of empty clusters) or "keep".
        nonfinite: "raise" (error naming the first NaN/inf row) or "skip" (rows are left
            out and counted; they get label -1).
        metric: "l2" (squared Euclidean), the only metric Lloyd's update minimises.
        impl: passed to fastssl.assign.assign ("auto" | "cpu" | "cuda" | "torch"). With
            "auto" and a visible GPU each streamed chunk is copied to this rank's GPU and
            assigned there by the engine fastssl.assign.resolved_engine names for it
            (Triton, the CUDA engine or torch); the update stays on the host.
        precision: what the centroids are rounded to when assigned (fastssl.assign.assign):
            "data" (x's own precision; the same tree on every machine up to ties) or
            "bf16" (opt-in for speed on AMX CPUs).
        tol: stop early when the objective falls by less than tol (relative); 0 = never.
        progress: tqdm bars with points/s; None = only when stderr is a TTY.
    """

    # Allowed values declared once (fastssl.config.setting): validate() checks them, and the
    # tree settings passed through to every k-means (HierarchicalConfig, the curate flags)
    # declare themselves as these fields (setting_of), so the two cannot drift.
    k: int = setting(range=COUNT)
    iterations: int = setting(50, range=NONNEG)   # 0: the initialisation only (a tree asks >= 1)
    init: str = setting("kmeans++", choices=("kmeans++", "random"))
    init_sample_size: int | None = setting(None, range=COUNT)
    init_sample_per_centroid: int = setting(20, range=COUNT)
    init_candidates: int | None = setting(None, range=COUNT)
    seed: int = 0
    chunk_size: int | None = setting(None, range=COUNT)
    memory_budget_mb: float = setting(512.0, range=POSITIVE)
    fp64_accumulate: bool = True
    empty: str = setting("reseed", choices=("reseed", "keep"))
    nonfinite: str = setting("raise", choices=("raise", "skip"))
    metric: str = setting("l2", choices=("l2",))
    impl: str = setting("auto", choices=KMEANS_IMPLS)
    precision: str = setting("data", choices=CENTROID_PRECISIONS)
    tol: float = 0.0
    progress: bool | None = None

    def __post_init__(self) -> None:
        self.validate()   # a bad setting fails here, not at the first assignment after k-means++

    def validate(self) -> None:
        """ValueError naming the first field outside its declared range (``k must be an integer
        >= 1, got 0``; None passes) or choices (``init='bogus'; expected one of (...)``)."""
        for name, allowed in declared_ranges(KMeansConfig).items():
            value = getattr(self, name)
            if isinstance(value, np.generic):   # a numpy count (a tree's k) is a count
                value = value.item()
            if value is not None and value not in allowed:
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")
        for name, allowed in declared_choices(KMeansConfig).items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {allowed}")


@dataclass
class IterationStats:
    """One Lloyd iteration.

    Attributes:
        iteration: 0-based.
        objective: mean squared distance of the (finite) points to the centroids they
            were assigned to in this pass (the centroids *before* this update).
        inertia: the same as a sum.
        n_empty: clusters that received no point.
        n_reseeded: empty clusters given a new centre (farthest points).
        seconds: wall time of the pass and the update.
        points_per_s: points assigned per second.
    """

    iteration: int
    objective: float
    inertia: float
    n_empty: int
    n_reseeded: int
    seconds: float
    points_per_s: float


def _progress_enabled(flag: bool | None) -> bool:
    if flag is None:
        return sys.stderr.isatty()
    return bool(flag)


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="pt", unit_scale=True, disable=not enabled,
                leave=False, dynamic_ncols=True)


def assign_device(impl: str):
    """The CUDA device that host chunks are assigned on, or None for the host engine.

    The device is fastssl.distributed.pick_device("auto")'s (this rank's current GPU when
    one is visible), and whether an engine can run there is fastssl.assign's answer
    (resolved_engine), never a probe of its own: "auto" assigns on the GPU when the engine
    it resolves there (Triton, the CUDA engine or torch, or FASTSSL_IMPL) runs on it;
    "cuda" requires that GPU and the CUDA engine (MissingDependencyError otherwise); "cpu"
    and "torch" stay on the host.
    """
    if impl not in ("auto", "cuda"):
        return None
    from fastssl.assign import resolved_engine
    from fastssl.errors import MissingDependencyError

    device = dist.pick_device("auto")
    if device.type != "cuda":
        if impl == "cuda":
            raise MissingDependencyError("impl='cuda': k-means needs a visible CUDA device and fastssl._C "
                                         "built with CUDA; no CUDA device is visible")
        return None
    try:
        resolved_engine(device, impl=impl)
    except MissingDependencyError:
        if impl == "cuda":   # the GPU is there, the CUDA engine is not: say so, as before
            raise
        return None  # FASTSSL_IMPL names a host engine: the chunks stay on the host
    return device


class DeviceAssigner:
    """Assigns host chunks on a device: each chunk is copied up once, the centroids once
    per array object (Lloyd passes one array for a whole iteration and makes a new one
    for the next, so arrays must not be changed in place between calls), and only labels
    and distances come back.

    Args:
        device: a torch device (a GPU in practice; any device works, which the tests use).
        impl: resolved once, on the first use, by fastssl.assign.engine_for into the
            engine that runs every chunk (so a bad impl fails where it did before: at
            the first assignment); "auto" is decided there, by the same rule as every
            assignment (fastssl.assign.dispatch), never here.
        precision: passed to the engine's assign ("data" | "bf16").
    """

    def __init__(self, device, impl: str = "auto", precision: str = "data"):
        self.device = device
        self.impl = impl
        self.precision = precision
        self._engine = None  # the fastssl.assign Engine, resolved on first use
        self.uploads = 0  # centroid uploads so far (observable by tests)
        self._host_c: np.ndarray | None = None
        self._device_c = None

    @property
    def engine(self) -> str:
        """The engine that assigns this device's chunks ("triton" | "cuda" | "torch" |
        "cpu"), as fastssl.assign.engine_for resolves it."""
        return self._resolved().name

    def _resolved(self):
        from fastssl.assign import engine_for

        if self._engine is None:
            self._engine = engine_for(self.device, impl=self.impl)
        return self._engine

    def centroids(self, c: np.ndarray):
        import torch

        if c is not self._host_c:
            self._device_c = torch.from_numpy(np.ascontiguousarray(c)).to(self.device)
            self._host_c = c  # held, so that its id cannot be reused by a new array
            self.uploads += 1
        return self._device_c

    def __call__(self, x: np.ndarray, c: np.ndarray):
        import torch

        with warnings.catch_warnings():  # memmap chunks are read-only; torch only reads
            warnings.simplefilter("ignore", UserWarning)
            xt = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        labels, dists = self._resolved().assign(xt, self.centroids(c), metric="l2",
                                                check_finite=False, precision=self.precision)
        self._last = (xt, labels)  # for scatter_add: the chunk is not copied up twice
        return labels.cpu().numpy(), dists.cpu().numpy()

    # Rows per conversion to the accumulator dtype: bounds the temporary (a 256k x 1024
    # chunk in float64 would be 2 GiB).
    _SLAB = 32768

    def scatter_add(self, sums, counts) -> None:
        """sums[label] += row and counts[label] += 1 for the last chunk, on the device.

        sums: (k, d) float64|float32 and counts: (k,) int64 tensors on ``self.device``.
        """
        import torch

        xt, labels = self._last
        for a in range(0, labels.shape[0], self._SLAB):
            b = min(labels.shape[0], a + self._SLAB)
            sums.index_add_(0, labels[a:b], xt[a:b].to(sums.dtype))
        counts += torch.bincount(labels, minlength=counts.shape[0])


def default_assigner(impl: str = "auto", precision: str = "data") -> Assigner:
    """fastssl.assign's engine on this rank's GPU when there is one (see assign_device),
    else on the host; the engine is resolved once, at the first chunk."""
    from fastssl.assign import engine_for

    device = assign_device(impl)
    if device is not None:
        return DeviceAssigner(device, impl, precision)
    engine = None

    def run(x: np.ndarray, c: np.ndarray):
        nonlocal engine
        if engine is None:
            engine = engine_for(x, impl=impl)
        return engine.assign(x, c, metric="l2", check_finite=False, precision=precision)

    return run


# ---------------------------------------------------------------------- k-means++
class KmppCheckpoint:
    """Where a greedy k-means++ start saves its progress, so that a killed start resumes
    (as SDC checkpoints its k-means++): the centres chosen so far, every sample row's
    squared distance to its nearest centre and the generator's state, written atomically
    at most every ``every_s`` seconds and when the start finishes. A resumed start gives
    the same centres, bit for bit, as an uninterrupted one.

    Args:
        path: the .npz file (its directory must exist).
        every_s: seconds between saves (0: after every centre).
    """

    def __init__(self, path: str | os.PathLike, every_s: float = 60.0):
        self.path = Path(path)
        self.every_s = float(every_s)
        self._last = time.monotonic()

    def load(self, m: int, k: int, trials: int):
        """(centres chosen, (i,) int64 rows, (m,) float32 distances, generator state) of a
        start of the same shape, or None when there is no checkpoint."""
        if not self.path.exists():
            return None
        from fastssl.errors import DataError

        try:
            with np.load(self.path, allow_pickle=False) as z:
                shape = tuple(int(v) for v in z["shape"])
                chosen, D = np.array(z["chosen"]), np.array(z["distances"])
                state = json.loads(str(z["rng_state"]))
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(self.path, f"unreadable k-means++ checkpoint ({exc})") from None
        if shape != (m, k, trials) or D.shape != (m,):
            raise DataError(self.path, f"a k-means++ checkpoint of (sample, k, candidates) "
                                       f"{shape}, this start has {(m, k, trials)}")
        return chosen.shape[0], chosen, D, state

    def maybe_save(self, chosen: np.ndarray, D, rng: np.random.Generator, k: int, trials: int,
                   force: bool = False) -> None:
        """Saves the centres chosen so far, D (m,) and the generator's state when every_s
        has passed since the last save (or when forced)."""
        now = time.monotonic()
        if not force and now - self._last < self.every_s:
            return
        from fastssl.atomic import atomic_savez

        D = D.cpu().numpy() if hasattr(D, "cpu") else np.asarray(D)
        shape = np.array([D.shape[0], k, trials], np.int64)
        atomic_savez(self.path, shape=shape, chosen=np.asarray(chosen, np.int64), distances=D,
                     rng_state=json.dumps(rng.bit_generator.state))
        self._last = now


def kmeans_plusplus(sample: np.ndarray, k: int, rng: np.random.Generator,
                    candidates: int | None = None, device=None,
                    checkpoint: KmppCheckpoint | None = None) -> np.ndarray:
    """Greedy k-means++ centres chosen among the rows of ``sample``.

    Each new centre draws ``candidates`` (default 2 + floor(ln k)) rows by D^2 sampling
    and keeps the one that lowers the potential (sum of squared distances to the nearest
    centre) most. Work per centre is one (m, d) x (d, L) product: O(m d L).

    Args:
        sample: (m, d) float16/float32 rows, m >= k.
        k: number of centres.
        rng: numpy Generator (all randomness comes from it).
        candidates: D^2 draws per centre.
        device: torch device for the products (the assigner's GPU when there is one:
            at k = 100k on 2M rows the initialisation is ~5.3e15 flops); None = the host.
        checkpoint: where progress is saved and resumed from (None: not saved).
    Returns:
        (k,) int64 indices of the chosen rows (duplicates only when the sample holds
        fewer than k distinct rows).
    """
    import torch

    m = sample.shape[0]
    if k > m:
        raise ValueError(f"k-means++ needs at least k={k} sample rows, got {m}")
    L = int(candidates) if candidates else 2 + int(math.floor(math.log(k)))
    # Small per-centre products run ~20x faster on one thread than on several (thread
    # wake-up dominates, worse on a shared machine); large ones keep every thread.
    threads = torch.get_num_threads()
    if m * sample.shape[1] * L < (1 << 24):
        torch.set_num_threads(1)
    try:
        return _greedy_kmeanspp(sample, k, rng, L, device, checkpoint)
    finally:
        torch.set_num_threads(threads)


def _greedy_kmeanspp(sample: np.ndarray, k: int, rng: np.random.Generator, L: int,
                     device=None, checkpoint: KmppCheckpoint | None = None) -> np.ndarray:
    import torch

    m = sample.shape[0]
    S = torch.from_numpy(np.ascontiguousarray(sample, dtype=np.float32))
    if device is not None:
        S = S.to(device)
    sq = (S * S).sum(1)
    chosen = np.empty(k, dtype=np.int64)
    saved = checkpoint.load(m, k, L) if checkpoint is not None else None
    if saved is not None:  # resume: the centres, distances and generator as they were
        first, chosen[: saved[0]], D, state = saved
        D = torch.from_numpy(D).to(S.device)
        rng.bit_generator.state = state
        log.info("k-means++: resuming after %d of %d centres (%s)", first, k, checkpoint.path)
    else:
        first = 1
        chosen[0] = rng.integers(m)
        c0 = S[int(chosen[0])]
        D = (sq - 2 * (S @ c0) + (c0 * c0).sum()).clamp_min_(0)
    for i in range(first, k):
        if checkpoint is not None:
            checkpoint.maybe_save(chosen[:i], D, rng, k, L)
        cum = torch.cumsum(D.double(), 0)
        total = float(cum[-1])
        if total > 0:
            u = torch.from_numpy(rng.random(L) * total).to(S.device)
            cand = torch.searchsorted(cum, u).clamp_max_(m - 1)
        else:  # every sample row coincides with a centre: any row is as good
            cand = torch.from_numpy(rng.integers(m, size=L)).to(S.device)
        C = S[cand]
        dist = sq[:, None] - 2 * (S @ C.T) + (C * C).sum(1)[None, :]
        dist.clamp_min_(0)
        torch.minimum(dist, D[:, None], out=dist)
        best = int(torch.argmin(dist.sum(0, dtype=torch.float64)))
        chosen[i] = int(cand[best])
        D = dist[:, best].contiguous()
    if checkpoint is not None:  # the finished start: a kill during Lloyd keeps it
        checkpoint.maybe_save(chosen, D, rng, k, L, force=True)
    return chosen


def _valid_rows(positions: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """Maps positions among the finite rows to row indices, given sorted bad rows."""
    if bad.size == 0:
        return positions
    # c[i] = number of finite rows before bad[i]; the j-th finite row skips every bad
    # row whose c is <= j.
    c = bad - np.arange(bad.size)
    return positions + np.searchsorted(c, positions, side="right")


# ---------------------------------------------------------------------- the model
class KMeans:
    """Streamed, optionally distributed k-means (squared L2).

    Args:
        config: a KMeansConfig, or None with its fields as keyword arguments.
        assigner: ``(chunk (m, d), centroids (k, d) float32) -> (labels (m,) int64,
            distances (m,) float32)``; default fastssl.assign.assign(impl=config.impl).

    After :meth:`fit`: ``centroids_`` (k, d) float32, ``stats_`` list of IterationStats,
    ``n_points_`` finite points used, ``skipped_rows_`` (sorted int64 rows left out).
    """

    def __init__(self, config: KMeansConfig | None = None, *, assigner: Assigner | None = None,
                 **kwargs: Any):
        if config is None:
            config = KMeansConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a KMeansConfig or keyword fields, not both")
        config.validate()
        self.config = config
        self.assigner = assigner or default_assigner(config.impl, config.precision)
        self.centroids_: np.ndarray | None = None
        self.stats_: list[IterationStats] = []
        self.skipped_rows_ = np.zeros(0, dtype=np.int64)
        self.n_points_ = 0
        self._init_checkpoint: KmppCheckpoint | None = None

    # ------------------------------------------------------------------ helpers
    def _chunk_rows(self, src: PointSource) -> int:
        if self.config.chunk_size is not None:
            return int(self.config.chunk_size)
        # a block, its float32 copy and labels/distances must fit in the budget
        per_row = src.row_bytes + 4 * src.d + 16
        return max(1, int(self.config.memory_budget_mb * (1 << 20)) // per_row)

    def _scan_nonfinite(self, src: PointSource, start: int, stop: int, chunk: int) -> np.ndarray:
        """Sorted rows (of this rank's slice) holding NaN/inf; raises in 'raise' mode.

        A pass of its own: only "skip" needs it (to know the rows before sampling); in
        "raise" mode the check rides on the first pass that reads the data."""
        bad = [self._nonfinite_rows(src, block, s) for s, block in src.chunks(start, stop, chunk)]
        bad = [rows for rows in bad if rows.size]
        return np.concatenate(bad).astype(np.int64) if bad else np.zeros(0, dtype=np.int64)

    def _nonfinite_rows(self, src: PointSource, block: np.ndarray, s: int,
                        row_ids: np.ndarray | None = None) -> np.ndarray:
        """Rows of a block holding NaN/inf (s + position, or row_ids[position]); raises in
        'raise' mode."""
        finite = np.isfinite(block).all(axis=1)
        if finite.all():
            return np.zeros(0, dtype=np.int64)
        rows = np.flatnonzero(~finite)
        rows = rows + s if row_ids is None else np.asarray(row_ids)[rows]
        if self.config.nonfinite == "raise":
            name, local = src.locate(int(src.global_index(rows[:1])[0]))
            msg = (f"row {local} (point {int(rows[0])}) holds NaN or inf; pass "
                   "nonfinite='skip' to leave such rows out")
            if name is not None:
                from fastssl.errors import DataError

                raise DataError(name, msg)
            raise ValueError(f"data {msg}")
        return rows

    def _init_centroids(self, src: PointSource, bad: np.ndarray, n_valid: int,
                        rng: np.random.Generator, start: int, stop: int) -> np.ndarray:
        cfg = self.config
        k = int(cfg.k)
        if cfg.init == "random":
            rows = _valid_rows(np.sort(rng.choice(n_valid, size=k, replace=False)), bad)
            order = rng.permutation(k)
            return src.take(rows[order]).astype(np.float32)
        m = cfg.init_sample_size or max(int(cfg.init_sample_per_centroid) * k, 16384)
        m = max(k, min(int(m), n_valid))
        positions = np.sort(rng.choice(n_valid, size=m, replace=False)) if m < n_valid \
            else np.arange(n_valid)
        rows = _valid_rows(positions, bad)
        # each rank reads the sampled rows it owns; the gathered sample is in row order,
        # so it is the same for any number of ranks
        mine = rows[(rows >= start) & (rows < stop)]
        mine_x = src.take(mine)
        if self._unchecked:  # the sample is read before the first pass: check it now
            self._nonfinite_rows(src, mine_x, 0, row_ids=mine)
        # only the main rank runs k-means++: the others send their rows and keep none
        parts = dist.gather_arrays(np.ascontiguousarray(mine_x))  # in the data's dtype
        if dist.is_main():
            sample = np.concatenate(parts)
            del parts
            picks = kmeans_plusplus(sample, k, rng, cfg.init_candidates,
                                    device=getattr(self.assigner, "device", None),
                                    checkpoint=self._init_checkpoint)
            centroids = np.ascontiguousarray(sample[picks], dtype=np.float32)
        else:
            centroids = np.empty((k, src.d), dtype=np.float32)
        return dist.broadcast(centroids, src=0)

    # ------------------------------------------------------------------ public
    def fit(self, data: Any, init_centroids: np.ndarray | None = None, *,
            resume: tuple[int, np.ndarray] | None = None,
            on_iteration: Callable[[int, np.ndarray], None] | None = None,
            init_checkpoint: KmppCheckpoint | None = None) -> "KMeans":
        """Runs initialisation and ``config.iterations`` Lloyd iterations.

        Args:
            data: (n, d) float16/float32/float64 numpy array or memmap, CPU tensor, a
                .npy path / directory / glob, or a list of .npy shard paths (opened
                memory-mapped; shards must share d).
            init_centroids: optional (k, d) starting centroids (skips initialisation).
            resume: (iterations already done, (k, d) centroids after them), from a
                checkpoint written by ``on_iteration``: skips initialisation and those
                iterations (the result equals an uninterrupted run: nothing random
                happens after the initialisation).
            on_iteration: called as on_iteration(iterations done, centroids) after every
                Lloyd iteration (e.g. to checkpoint).
            init_checkpoint: where the k-means++ start saves its progress and resumes
                from (main rank; None: not saved).
        Returns:
            self, with centroids_ and stats_ set.
        """
        cfg = self.config
        src = PointSource.from_data(data)
        self._init_checkpoint = init_checkpoint
        start, stop = dist.rank_slice(src.n, dist.rank(), dist.world_size())
        chunk = self._chunk_rows(src)
        bad, n_valid = self._finite_rows(src, start, stop, chunk)
        first_iteration = 0
        if resume is not None:
            first_iteration, init_centroids = int(resume[0]), resume[1]
        centroids = self._starting_centroids(src, bad, n_valid, start, stop, init_centroids)
        my_bad = bad[(bad >= start) & (bad < stop)]
        self.stats_ = []
        for it in range(first_iteration, int(cfg.iterations)):
            t0 = time.perf_counter()
            sums, counts, total, far = self._lloyd_pass(src, centroids, start, stop, chunk,
                                                        my_bad, it)
            centroids, n_empty, n_reseeded = self._update(src, centroids, sums, counts, far)
            secs = time.perf_counter() - t0
            objective = float(total[0]) / max(1, n_valid)
            self.stats_.append(IterationStats(it, objective, float(total[0]), n_empty,
                                              n_reseeded, secs, n_valid / max(secs, 1e-9)))
            log.debug("k-means it %d: objective %.6g empty %d (%.2fs)", it, objective, n_empty, secs)
            if on_iteration is not None:
                on_iteration(it + 1, centroids)
            if cfg.tol > 0 and len(self.stats_) > 1:
                prev = self.stats_[-2].objective
                if prev > 0 and (prev - objective) / prev < cfg.tol:
                    break
        self.centroids_ = centroids
        self._src = src
        self._bad = bad
        return self

    def _finite_rows(self, src: PointSource, start: int, stop: int, chunk: int):
        """(sorted rows left out as non-finite, number of points used); checks k."""
        k = int(self.config.k)
        # "raise": the NaN/inf check rides on the first Lloyd pass (or predict's), no pass
        # of its own; "skip" must know the rows first.
        self._unchecked = self.config.nonfinite == "raise"
        bad = np.zeros(0, np.int64) if self._unchecked else self._scan_nonfinite(
            src, start, stop, chunk)
        bad = np.concatenate(dist.all_gather_arrays(bad))
        n_valid = src.n - int(bad.size)
        if k > n_valid:
            extra = f" ({bad.size} non-finite rows skipped)" if bad.size else ""
            raise ValueError(f"k={k} clusters but the data has only {n_valid} points{extra}")
        if bad.size:
            log.info("k-means: skipping %d non-finite rows", bad.size)
        self.skipped_rows_ = src.global_index(bad)
        self.n_points_ = n_valid
        return bad, n_valid

    def _starting_centroids(self, src: PointSource, bad: np.ndarray, n_valid: int, start: int,
                            stop: int, init_centroids: np.ndarray | None) -> np.ndarray:
        """(k, d) float32: the given centroids, or the configured initialisation."""
        cfg = self.config
        k = int(cfg.k)
        if init_centroids is not None:
            c = np.asarray(init_centroids, dtype=np.float32)
            if c.shape != (k, src.d):
                raise ValueError(f"init_centroids has shape {c.shape}, expected ({k}, {src.d})")
            return np.ascontiguousarray(c)
        t0 = time.perf_counter()
        rng = np.random.default_rng(cfg.seed)
        centroids = self._init_centroids(src, bad, n_valid, rng, start, stop)
        log.info("k-means: %s init of k=%d in %.1fs", cfg.init, k, time.perf_counter() - t0)
        return centroids

    def _lloyd_pass(self, src: PointSource, centroids: np.ndarray, start: int, stop: int,
                    chunk: int, my_bad: np.ndarray, it: int):
        """One assignment pass over this rank's rows, reduced over ranks.

        Returns sums (k, d) and counts (k,) CPU tensors, the summed squared distances
        (1,) float64, and (distances, rows) of the farthest points for re-seeding (empty
        arrays with empty="keep").
        """
        import torch

        cfg = self.config
        k = int(cfg.k)
        acc_dtype = torch.float64 if cfg.fp64_accumulate else torch.float32
        slab = torch.empty((_F64_SLAB, src.d), dtype=torch.float64) if cfg.fp64_accumulate else None
        # An assigner that keeps each chunk on its device also accumulates there, so a GPU
        # run never moves rows back to the host for the update.
        on_device = hasattr(self.assigner, "scatter_add")
        acc_device = getattr(self.assigner, "device", None) if on_device else None
        sums = torch.zeros((k, src.d), dtype=acc_dtype, device=acc_device)
        counts = torch.zeros(k, dtype=torch.int64, device=acc_device)
        total = np.zeros(1, dtype=np.float64)
        far_d, far_i = np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64)
        keep_far = min(k, _MAX_RESEED) if cfg.empty == "reseed" else 0
        show = _progress_enabled(cfg.progress) and dist.is_main()
        with _bar(stop - start, f"k-means it {it + 1}/{cfg.iterations}", show) as bar:
            for s, block in src.chunks(start, stop, chunk):
                with annotate("kmeans/assign"):
                    labels, dists, block, kept = self._assign_block(block, centroids, s,
                                                                    my_bad, src)
                with annotate("kmeans/update"):
                    if on_device:
                        if block.shape[0]:
                            self.assigner.scatter_add(sums, counts)
                    else:
                        with _one_thread():
                            _scatter_add(sums, counts, block, labels, slab)
                total += dists.sum(dtype=np.float64)
                if keep_far:
                    far_d, far_i = _top_far(far_d, far_i, dists, s, keep_far, kept=kept)
                bar.update(block.shape[0])
        self._unchecked = False  # every row of this rank went through the check
        with annotate("kmeans/all_reduce"):
            sums = dist.all_reduce_sum(sums).cpu()
            counts = dist.all_reduce_sum(counts).cpu()
            total = dist.all_reduce_sum(total)
        if keep_far and dist.is_initialized():
            far_d = np.concatenate(dist.all_gather_arrays(far_d))
            far_i = np.concatenate(dist.all_gather_arrays(far_i))
            far_d, far_i = _top_far(np.zeros(0, np.float32), np.zeros(0, np.int64),
                                    far_d, 0, keep_far, idx=far_i)
        return sums, counts, total, (far_d, far_i)

    def _update(self, src: PointSource, centroids: np.ndarray, sums, counts, far):
        """New (k, d) float32 centroids = the means; an empty cluster keeps its centroid
        ("keep") or takes one of the farthest points ("reseed"). Returns (centroids,
        clusters empty, clusters re-seeded)."""
        far_d, far_i = far
        empty = counts == 0
        new = (sums / counts.clamp_min(1)[:, None].to(sums.dtype)).float().numpy()
        n_empty = int(empty.sum())
        n_reseeded = 0
        if n_empty:
            empty_idx = np.flatnonzero(empty.numpy())
            new[empty_idx] = centroids[empty_idx]  # "keep"
            if far_i.size:
                order = np.lexsort((far_i, -far_d.astype(np.float64)))
                picks = far_i[order][: empty_idx.size]
                n_reseeded = int(picks.size)
                new[empty_idx[:n_reseeded]] = src.take(picks).astype(np.float32)
        return np.ascontiguousarray(new, dtype=np.float32), n_empty, n_reseeded

    def _assign_block(self, block: np.ndarray, centroids: np.ndarray, s: int, bad: np.ndarray,
                      src: PointSource | None = None):
        """Labels and distances of one block whose first row is s.

        Non-finite rows (in the sorted ``bad``) are dropped from the block; ``kept`` gives
        the block-local positions of the rows that remain (None when none was dropped).
        With ``src`` and the data not yet checked, NaN/inf rows raise (naming the row).
        """
        if src is not None and getattr(self, "_unchecked", False):
            self._nonfinite_rows(src, block, s)
        kept = None
        lo, hi = np.searchsorted(bad, [s, s + block.shape[0]])
        if hi > lo:
            keep = np.ones(block.shape[0], dtype=bool)
            keep[bad[lo:hi] - s] = False
            kept = np.flatnonzero(keep)
            block = np.ascontiguousarray(block[keep])
        if block.shape[0] == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32), block, kept
        labels, dists = self.assigner(block, centroids)
        return (np.asarray(labels, dtype=np.int64), np.asarray(dists, dtype=np.float32),
                block, kept)

    def predict(self, data: Any = None, centroids: np.ndarray | None = None, *,
                gather: str = "all"):
        """Nearest centroid of every row (streamed; each rank assigns its slice).

        Args:
            data: as for fit; None reuses the data of the last fit.
            centroids: (k, d); default centroids_.
            gather: "all": every rank gets the full result; "main": only the main rank
                does (the others return (None, None)), for a result only it writes: at
                350M points that spares every other rank 4.2 GB.
        Returns:
            labels (n,) int64 (-1 for skipped non-finite rows) and distances (n,) float32
            (inf for skipped rows).
        """
        if gather not in ("all", "main"):
            raise ValueError(f"gather={gather!r}; expected 'all' or 'main'")
        c = self.centroids_ if centroids is None else np.ascontiguousarray(centroids, np.float32)
        if c is None:
            raise RuntimeError("call fit() first or pass centroids")
        src = self._src if data is None else PointSource.from_data(data)
        start, stop = dist.rank_slice(src.n)
        chunk = self._chunk_rows(src)
        if data is not None:  # new data: checked in this pass ("raise") or scanned ("skip")
            self._unchecked = self.config.nonfinite == "raise"
            bad = np.zeros(0, np.int64) if self._unchecked else np.concatenate(
                dist.all_gather_arrays(self._scan_nonfinite(src, start, stop, chunk)))
        else:
            bad = self._bad
        labels = np.full(stop - start, -1, dtype=np.int64)
        dists = np.full(stop - start, np.inf, dtype=np.float32)
        show = _progress_enabled(self.config.progress) and dist.is_main()
        with _bar(stop - start, "assign", show) as bar:
            for s, block in src.chunks(start, stop, chunk):
                lab, dd, _, kept = self._assign_block(block, c, s, bad, src)
                at = s - start + (np.arange(block.shape[0]) if kept is None else kept)
                labels[at] = lab
                dists[at] = dd
                bar.update(block.shape[0])
        self._unchecked = False
        if not dist.is_initialized():
            return labels, dists
        collect = dist.all_gather_arrays if gather == "all" else dist.gather_arrays
        labels, dists = collect(labels), collect(dists)
        if labels is None:
            return None, None
        return np.concatenate(labels), np.concatenate(dists)

    def fit_predict(self, data: Any, init_centroids: np.ndarray | None = None):
        """fit, then a final assignment pass with the final centroids (labels, distances)."""
        self.fit(data, init_centroids)
        labels, dists = self.predict()
        valid = labels >= 0
        self.objective_ = float(dists[valid].astype(np.float64).mean()) if valid.any() else 0.0
        return labels, dists

    def stats_dicts(self) -> list[dict]:
        return [asdict(s) for s in self.stats_]


class _one_thread:
    """Runs torch on one thread inside the block.

    The scatter-add is memory-bound: on the 2-core dev box one thread was 3-10x faster
    than two (thread wake-ups dominate, much worse when other jobs share the cores).
    """

    def __enter__(self):
        import torch

        self.threads = torch.get_num_threads()
        if self.threads != 1:
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        import torch

        if self.threads != 1:
            torch.set_num_threads(self.threads)


def _scatter_add(sums, counts, block: np.ndarray, labels: np.ndarray, slab) -> None:
    """sums[labels[i]] += block[i]; counts[labels[i]] += 1 (no loop over clusters).

    Args:
        sums: (k, d) float64 or float32 tensor accumulator.
        counts: (k,) int64 tensor.
        block: (m, d) float16/float32 rows; labels: (m,) int64.
        slab: (S, d) float64 scratch tensor for fp64 accumulation, or None. Rows are
            converted to float64 one cache-sized slab at a time (measured ~3x faster
            than converting the whole block).
    """
    import torch

    with warnings.catch_warnings():  # memmap blocks are read-only; torch only reads them
        warnings.simplefilter("ignore", UserWarning)
        x = torch.from_numpy(block)
    lab = torch.from_numpy(labels)
    if slab is None:
        sums.index_add_(0, lab, x if x.dtype == sums.dtype else x.to(sums.dtype))
    else:
        step = slab.shape[0]
        for a in range(0, lab.shape[0], step):
            b = min(lab.shape[0], a + step)
            buf = slab[: b - a]
            buf.copy_(x[a:b])
            sums.index_add_(0, lab[a:b], buf)
    counts += torch.bincount(lab, minlength=counts.shape[0])


def _top_far(far_d: np.ndarray, far_i: np.ndarray, dists: np.ndarray, offset: int, keep: int,
             idx: np.ndarray | None = None, kept: np.ndarray | None = None):
    """Merges a block's distances into the running set of the `keep` largest.

    Row of block entry j: offset + (kept[j] if kept is given else j); or idx[j] if given.
    """
    if idx is None:
        if dists.shape[0] > keep:
            part = np.argpartition(dists, dists.shape[0] - keep)[-keep:]
        else:
            part = np.arange(dists.shape[0])
        local = part if kept is None else kept[part]
        cand_d, cand_i = dists[part], local.astype(np.int64) + offset
    else:
        cand_d, cand_i = dists, idx
    all_d = np.concatenate([far_d, cand_d])
    all_i = np.concatenate([far_i, cand_i])
    if all_d.shape[0] > keep:
        sel = np.argpartition(all_d, all_d.shape[0] - keep)[-keep:]
        all_d, all_i = all_d[sel], all_i[sel]
    return all_d, all_i
