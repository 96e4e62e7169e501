"""Hierarchical k-means (Vo et al. 2024): the tree behind balanced data curation.

Level 1 clusters the points; level l > 1 clusters the centroids of level l - 1. Steps, in
order, inside a level:

    kmeans        Lloyd iterations from a greedy k-means++ (or random) initialisation
    split         level 1 only: every cluster is split into ``split_k`` sub-clusters by a
                  k-means inside it (greedy k-means++, best of ``split_inits`` runs, as
                  SDC); each Lloyd step of all groups together is ONE
                  ``fastssl.assign.assign_grouped`` call over the points sorted by parent
                  (per memory-budget batch of whole groups). The non-empty sub-clusters
                  become the level-1 clusters.
    resample_i    take ``sample_size`` inputs per cluster ("closest" to the centroid or
                  "random"), run k-means on that subset only, then reassign every input
                  (clusters re-sorted by distance). Moves centroids from dense modes to an
                  even cover. ``resampling_init="fresh"`` (SDC) starts each of these from a
                  new greedy k-means++ on the subset; "warm" restarts Lloyd from the
                  current centroids.

Steps are counted as SDC and paper 2 count them: ``resampling_steps`` is the number of
k-means runs of a level, the first k-means included ("10 steps" = the first k-means + 9
resampled ones; 1 = no resampling).

Every finished step is checkpointed under ``output_dir/work`` and recorded in
``output_dir/progress.json`` (atomic writes); inside a step the k-means++ start is
checkpointed every minute and when it ends (as SDC does), the Lloyd centroids every
``checkpoint_every`` iterations and the split every batch of parents.
So a killed job rerun with the same config resumes where it stopped and produces the same
tree; a different config is refused unless ``overwrite=True``. Randomness of the split is
keyed per parent cluster, so the tree does not depend on the memory budget, the number of
ranks or the chunk size. The result is a :class:`HierarchicalTree` saved in
``output_dir`` (see fastssl.curation.tree), loaded memory-mapped.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from fastssl import distributed as dist
from fastssl.config import (COUNT, NONNEG, SEED, Range, check_ranges, declared_choices, declared_ranges, flag_name,
                            setting, setting_of)
from fastssl.curation._source import PointSource
from fastssl.curation.kmeans import (KMeans, KMeansConfig, KmppCheckpoint, _one_thread, _progress_enabled,
                                     _scatter_add, assign_device)
from fastssl.atomic import atomic_save_npy, atomic_savez, atomic_write_text
from fastssl.curation.tree import HierarchicalTree, TreeLevel

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
        iterations: Lloyd iterations of the first k-means and of each resampling step.
        resampling_steps: k-means runs of this level, the first included (SDC's count:
            1 = no resampling; default: HierarchicalConfig's for levels 2+, 1 for level 1
            unless resample_level1).
        sample_size: inputs taken per cluster by a resampling step (None: half the mean
            cluster size, at least 1).
        sampling_strategy: "closest" | "random".
    """

    k: int = setting(range=COUNT)
    iterations: int | None = None
    resampling_steps: int | None = None
    sample_size: int | None = None
    sampling_strategy: str | None = None


# The settings a level may override (LevelConfig's fields but k): a level's value is checked
# against the declaration of the HierarchicalConfig field of the same name (its default too).
PER_LEVEL = tuple(f.name for f in fields(LevelConfig) if f.name != "k")
_STRATEGY_CHOICES = ("closest", "random")
_RESAMPLING_INITS = ("fresh", "warm")
# Settings that do not change the tree: left out of the resume record.
_NOT_IN_RECORD = ("progress", "checkpoint_every", "memory_budget_mb")


@dataclass
class HierarchicalConfig:
    """Settings of a tree (defaults documented; all JSON-serialisable).

    Attributes:
        levels: one LevelConfig per level, finest first (ints are accepted).
        iterations: default Lloyd iterations per k-means run (50, as SDC and paper 2).
        resampling_steps: default k-means runs of levels 2+, the first included (SDC and
            paper 2 count this way; paper 2 uses 10 = 1 + 9 resampled).
        resample_level1: also run resampling steps at level 1 (on the points).
        sample_size: default per-cluster sample of a resampling step (None: half mean size).
        sampling_strategy: default "closest" (SDC, paper 2) | "random".
        resampling_init: "fresh": each resampling step runs a new greedy k-means++ on the
            sampled subset (SDC); "warm": Lloyd restarts from the current centroids.
        split_k: level 1 only: split each cluster into this many sub-clusters (None: no split).
        split_iterations: Lloyd iterations of the split (None: iterations).
        split_inits: greedy k-means++ runs per parent in the split; the run with the
            lowest within-parent inertia is kept (SDC: 10).
        init: "kmeans++" | "random" initialisation of each k-means (and of the split).
        empty: what a Lloyd iteration does with a cluster that received no input:
            "reseed" (the inputs farthest from their centroids become its centre) or
            "keep" (it keeps its centroid, as SDC). The split always keeps (as SDC).
        init_sample_size, init_sample_per_centroid, init_candidates, fp64_accumulate,
        memory_budget_mb, impl, precision, nonfinite: passed to KMeansConfig (see there).
        checkpoint_every: Lloyd iterations between checkpoints inside a step (0: only at
            the end of a step); the split checkpoints every batch of parents.
        seed: every step derives its own seed from (seed, level, step); the split keys
            its random draws by (seed, parent cluster).
        progress: tqdm bars (None: only on a TTY).
    """

    # The trailing comments are `fastssl curate`'s --help (fastssl.config); the ranges are the
    # curate CLI's and validate()'s, and a level's own values (PER_LEVEL) are checked against
    # them too. A setting passed through to every k-means takes its default and allowed values
    # from KMeansConfig (setting_of), so the two cannot drift.
    levels: list[LevelConfig]
    iterations: int = setting(50, range=COUNT)  # Lloyd iterations per k-means run (SDC and paper 2: 50)
    resampling_steps: int = setting(10, range=COUNT)  # k-means runs per level COUNTING THE FIRST, as SDC and paper 2 count them (10 = the first k-means + 9 resampled; 1 = no resampling); one value applies to levels 2+ (level 1 runs once unless --resample-level1)
    resample_level1: bool = False  # a single --resampling-steps value applies to level 1 too
    sample_size: int | None = setting(None, range=COUNT)  # inputs per cluster in a resampling step (default: half the mean cluster size; null in a list: that level's default)
    sampling_strategy: str = setting("closest", choices=_STRATEGY_CHOICES)  # which inputs a resampling step takes per cluster (SDC, paper 2: closest)
    resampling_init: str = setting("fresh", choices=_RESAMPLING_INITS)  # each resampling k-means starts from a new greedy k-means++ on the sampled subset (fresh, SDC) or from the current centroids (warm)
    split_k: int | None = setting(None, range=COUNT)  # split every level-1 cluster into this many sub-clusters
    split_iterations: int | None = setting(None, range=COUNT)  # Lloyd iterations of the split (default: level 1's --iterations)
    split_inits: int = setting(10, range=COUNT)  # greedy k-means++ runs per parent in the split; the best is kept (SDC: 10)
    init: str = setting_of(KMeansConfig, "init")  # initialisation of each k-means (greedy k-means++ or random points)
    empty: str = setting_of(KMeansConfig, "empty")  # a cluster left empty by a Lloyd iteration: reseed (the points farthest from their centroids become its centre) or keep (it keeps its centroid, as SDC and paper 2)
    init_sample_size: int | None = setting_of(KMeansConfig, "init_sample_size")  # points the k-means++ initialisation runs on (default max(per-centroid x k, 16384))
    init_sample_per_centroid: int = setting_of(KMeansConfig, "init_sample_per_centroid")  # k-means++ candidate sample per centroid when --init-sample-size is not given (the sample grows with k)
    init_candidates: int | None = None   # API only (no flag, so no declared range): KMeansConfig checks it
    fp64_accumulate: bool = setting_of(KMeansConfig, "fp64_accumulate")  # accumulate centroid sums in float64
    memory_budget_mb: float = setting_of(KMeansConfig, "memory_budget_mb")  # RAM for one streamed block of rows
    impl: str = setting_of(KMeansConfig, "impl")  # assignment engine (fastssl.assign.assign)
    precision: str = setting_of(KMeansConfig, "precision")  # what centroids are rounded to when points are assigned: data (the points' own precision; the same tree on AMX, other CPUs and GPUs up to ties) | bf16 (opt-in: faster on AMX CPUs, another tree)
    nonfinite: str = setting_of(KMeansConfig, "nonfinite")  # rows with NaN/inf: stop with an error, or leave them out
    checkpoint_every: int = setting(5, range=NONNEG)  # Lloyd iterations between checkpoints inside a step (0: per step)
    seed: int = setting(0, range=SEED)  # seed of every random choice
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
            self._validate_level(depth, level)
        self._validate_ranges()
        for name, allowed in declared_choices(type(self)).items():
            _check_value(name, getattr(self, name), allowed)
        if self.split_k is not None and self.split_k > 1 and self.level_value(1, "resampling_steps") > 1:
            raise ValueError("level 1: split_k and resampling cannot both run on one level (as "
                             "SDC refuses); drop resample_level1 / level 1's resampling_steps "
                             "or split_k")
        KMeansConfig(k=1, init=self.init, empty=self.empty, nonfinite=self.nonfinite,
                     memory_budget_mb=self.memory_budget_mb, precision=self.precision,
                     init_sample_size=self.init_sample_size,
                     init_sample_per_centroid=self.init_sample_per_centroid,
                     init_candidates=self.init_candidates, impl=self.impl)

    def _validate_ranges(self) -> None:
        """The declared ranges (the curate CLI's; iterations >= 1: 0 would leave the k-means++
        seeds); a whole number must be an int, as the tree's record stores it."""
        ranges = declared_ranges(type(self))
        check_ranges(self, ranges)
        for name, allowed in ranges.items():
            value = getattr(self, name)
            if allowed.integer and value is not None and (isinstance(value, bool)
                                                          or not isinstance(value, (int, np.integer))):
                raise ValueError(f"{flag_name(name)}: got {value!r}; allowed: {allowed}")

    def _validate_level(self, depth: int, level: LevelConfig) -> None:
        where = f"level {depth}: "
        _check_value(where + "k", level.k, declared_ranges(LevelConfig)["k"])
        if depth > 1 and level.k > self.levels[depth - 2].k and not (depth == 2 and self.split_k):
            raise ValueError(f"level {depth} asks for k={level.k} clusters but level "
                             f"{depth - 1} has only {self.levels[depth - 2].k} clusters")
        allowed = {**declared_ranges(HierarchicalConfig), **declared_choices(HierarchicalConfig)}
        for name in PER_LEVEL:   # None: the config's value, checked by validate()
            if getattr(level, name) is not None:
                _check_value(where + name, getattr(level, name), allowed[name])

    def level_value(self, depth: int, name: str):
        """A per-level setting of level `depth` (1-based), or the config's default."""
        value = getattr(self.levels[depth - 1], name)
        if value is not None:
            return value
        if name == "resampling_steps" and depth == 1 and not self.resample_level1:
            return 1
        return getattr(self, name)

    def steps(self, depth: int) -> list[str]:
        out = ["kmeans"]
        if depth == 1 and self.split_k:
            out.append("split")
        n = int(self.level_value(depth, "resampling_steps"))
        return out + [f"resample_{i}" for i in range(1, n)]

    def to_json(self) -> dict:
        """The settings that determine the tree (the resume record)."""
        d = asdict(self)
        for name in _NOT_IN_RECORD:
            d.pop(name)
        return d


def _check_value(name: str, value, allowed) -> None:
    """ValueError ``NAME must be <allowed>, got V`` unless ``value`` is in Range ``allowed`` (a
    whole number must be an int, as the tree's record stores it), or ``NAME=V; expected one of
    (...)`` unless it is one of the choices ``allowed``."""
    if isinstance(allowed, Range):
        count = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
        number = value.item() if isinstance(value, np.generic) else value
        if (allowed.integer and not count) or number not in allowed:
            raise ValueError(f"{name} must be {allowed}, got {value!r}")
    elif value not in allowed:
        raise ValueError(f"{name}={value!r}; expected one of {allowed}")


# ------------------------------------------------------------------ grouped split
def grouped_lloyd(x: np.ndarray, x_offsets: np.ndarray, centroids: np.ndarray,
                  c_offsets: np.ndarray, iterations: int, *, impl: str = "auto",
                  fp64_accumulate: bool = True,
                  precision: str = "data") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Independent k-means inside every group, all groups advanced together.

    Args:
        x: (m, d) rows sorted by group; x_offsets (G+1,) CSR offsets into them.
        centroids: (K, d) initial centroids, group g owning c_offsets[g]:c_offsets[g+1].
        iterations: Lloyd steps; each is ONE assign_grouped call + one scatter-add.
        impl: resolved once (fastssl.assign.engine_for) into the engine of every step.
        precision: passed to the engine's assign_grouped.
    Returns:
        centroids (K, d) float32 (empty ones kept), labels (m,) int64 into them, and
        distances (m,) float32 from a final assignment.
    """
    import torch

    from fastssl.assign import engine_for

    K, d = centroids.shape
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    slab = torch.empty((4096, d), dtype=torch.float64) if fp64_accumulate else None
    device = assign_device(impl)
    # On a GPU the batch of groups goes up once; each step sends centroids up and labels
    # back, and the scatter-add stays on the host copy.
    x_assign = torch.from_numpy(np.ascontiguousarray(x)).to(device) if device is not None else x
    engine = None  # resolved at the first step, where the ops themselves resolved it before

    def assign_all(centroids_now):
        nonlocal engine
        cc = torch.from_numpy(centroids_now).to(device) if device is not None else centroids_now
        if engine is None:
            engine = engine_for(x_assign, op="assign_grouped", impl=impl)
        lab, dd = engine.assign_grouped(x_assign, x_offsets, cc, c_offsets,
                                        check_finite=False, precision=precision)
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


_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 with good avalanche."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def keyed_uniform(seed: int, *keys) -> np.ndarray:
    """U[0, 1) draws that depend only on (seed, keys), element-wise over broadcast keys.

    A counter-based stream: the split's draws for a parent cluster are the same whatever
    batch, rank or memory budget the parent lands in.
    """
    with np.errstate(over="ignore"):
        z = _mix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) + np.uint64(0x9E3779B97F4A7C15))
        for key in keys:
            z = _mix64(z ^ (np.asarray(key).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _grouped_init(x: np.ndarray, x_offsets: np.ndarray, c_offsets: np.ndarray, seed: int,
                  parents: np.ndarray, run: int, init: str,
                  candidates: int | None = None, device=None) -> np.ndarray:
    """k_g starting centres inside every group, vectorised over groups.

    "random": k_g distinct members per group. "kmeans++": greedy k-means++ as SDC (each
    new centre draws 2 + floor(ln k_g) candidates by D^2 sampling, or ``candidates``, and
    keeps the one that lowers the group's potential most); all groups advance in the same
    round. Every draw is keyed by (seed, parent id, run, round, candidate).

    Args:
        x: (m, d) rows sorted by group; x_offsets (G+1,), c_offsets (G+1,) CSR offsets.
        parents: (G,) global id of each group (the key of its random draws).
        run: index of this initialisation among the split's best-of-N runs.
        device: torch device for the distance evaluations (the split's GPU when there is
            one: at T1 they read every row ~170 times per run); None = the host.
    Returns:
        (c_offsets[-1], d) float32 centres.
    """
    import torch

    sizes = np.diff(x_offsets)
    ks = np.diff(c_offsets)
    G = sizes.shape[0]
    if init == "random":
        keys = keyed_uniform(seed, np.repeat(parents, sizes), run, -1,
                             np.arange(x.shape[0]) - np.repeat(x_offsets[:-1], sizes))
        order = np.lexsort((keys, np.repeat(np.arange(G), sizes)))  # shuffled per group
        grp = np.flatnonzero(ks > 0)
        return np.ascontiguousarray(x[order[_ranges(x_offsets[grp], ks[grp])]], dtype=np.float32)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if device is not None:
        xt = xt.to(device)
    picks = np.empty(int(c_offsets[-1]), dtype=np.int64)
    active = np.flatnonzero(ks > 0)
    u0 = keyed_uniform(seed, parents[active], run, 0, 0)
    first = x_offsets[active] + np.minimum((u0 * sizes[active]).astype(np.int64), sizes[active] - 1)
    picks[c_offsets[active]] = first
    rows = _ranges(x_offsets[active], sizes[active])
    D = np.zeros(x.shape[0], dtype=np.float64)
    D[rows] = _sqdist(xt, rows, np.repeat(first, sizes[active]))
    trials = (np.full(G, int(candidates)) if candidates
              else 2 + np.floor(np.log(np.maximum(ks, 1))).astype(np.int64))
    for r in range(1, int(ks.max(initial=0))):
        grp = np.flatnonzero(ks > r)
        idx = _grouped_greedy_pick(xt, D, x_offsets, sizes, grp, trials, seed, parents, run, r)
        picks[c_offsets[grp] + r] = idx
    return np.ascontiguousarray(x[picks], dtype=np.float32)


def _sqdist(xt, rows: np.ndarray, centre_rows: np.ndarray) -> np.ndarray:
    """(len(rows),) float64 squared distances between x[rows] and x[centre_rows]."""
    import torch

    # every row (the usual case: all groups still growing): no gather of x
    a = xt if rows.shape[0] == xt.shape[0] else xt[torch.from_numpy(rows).to(xt.device)]
    diff = xt[torch.from_numpy(centre_rows).to(xt.device)]
    diff.sub_(a).pow_(2)
    return diff.sum(1).double().cpu().numpy()


def _grouped_greedy_pick(xt, D: np.ndarray, x_offsets: np.ndarray, sizes: np.ndarray,
                         grp: np.ndarray, trials: np.ndarray, seed: int, parents: np.ndarray,
                         run: int, r: int) -> np.ndarray:
    """One greedy k-means++ round in the groups ``grp``: D^2 candidates, the best kept.

    Updates D (closest squared distance of every row) in place; returns the chosen row of
    every group in ``grp``.
    """
    lo, hi = x_offsets[grp], x_offsets[grp + 1]
    rows = _ranges(lo, sizes[grp])
    seg = np.repeat(np.arange(grp.size), sizes[grp])
    cum = _GroupCumsum(D[rows], sizes[grp])
    total = cum.totals
    best_pot = np.full(grp.size, np.inf)
    best_row = lo.copy()
    best_d = None
    for j in range(int(trials[grp].max())):
        u = keyed_uniform(seed, parents[grp], run, r, j + 1)
        cand = np.clip(lo + cum.search(u * total), lo, hi - 1)
        zero = total <= 0  # every row coincides with a centre: any row will do
        cand[zero] = lo[zero] + np.minimum((u[zero] * sizes[grp][zero]).astype(np.int64),
                                           sizes[grp][zero] - 1)
        d_new = np.minimum(D[rows], _sqdist(xt, rows, np.repeat(cand, sizes[grp])))
        pot = np.bincount(seg, weights=d_new, minlength=grp.size)
        better = (pot < best_pot) & (j < trials[grp])
        best_pot[better], best_row[better] = pot[better], cand[better]
        best_d = d_new if best_d is None else np.where(better[seg], d_new, best_d)
    D[rows] = best_d
    return best_row


class _GroupCumsum:
    """Cumulative sums restarted at every group, each one computed over its group's
    values only, so a group's D^2 draw is bit-for-bit the same whatever other groups
    share its batch (a running sum over the batch loses a small-scale group's precision
    behind a large-scale one: issue 21 §4).

    Groups are bucketed by size (powers of two) and each bucket is padded into one
    (groups, width) array, at most 2x the values, cumulated along its rows.

    Args:
        values: (m,) float64, the groups' values one after another.
        sizes: (G,) int64 >= 1 values per group.
    """

    def __init__(self, values: np.ndarray, sizes: np.ndarray):
        sizes = np.asarray(sizes, dtype=np.int64)
        starts = np.cumsum(sizes) - sizes
        self.totals = np.empty(sizes.shape[0], dtype=np.float64)
        self.buckets = []
        bucket = np.frexp(sizes.astype(np.float64))[1]  # sizes in [2^(b-1), 2^b)
        for b in np.unique(bucket):
            groups = np.flatnonzero(bucket == b)
            gs = sizes[groups]
            row = np.repeat(np.arange(groups.size), gs)
            col = np.arange(int(gs.sum())) - np.repeat(np.cumsum(gs) - gs, gs)
            pad = np.zeros((groups.size, int(gs.max())), dtype=np.float64)
            pad[row, col] = values[_ranges(starts[groups], gs)]
            np.cumsum(pad, axis=1, out=pad)
            self.totals[groups] = pad[np.arange(groups.size), gs - 1]
            pad[np.arange(pad.shape[1])[None, :] >= gs[:, None]] = np.inf  # never counted
            self.buckets.append((groups, pad))

    def search(self, targets: np.ndarray) -> np.ndarray:
        """(G,) int64 position in each group of its target, as np.searchsorted(group's
        cumulative sums, target, side="right")."""
        out = np.empty(self.totals.shape[0], dtype=np.int64)
        for groups, pad in self.buckets:
            out[groups] = (pad <= targets[groups, None]).sum(1)
        return out


def _ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenation of arange(starts[i], starts[i] + lens[i]), vectorised."""
    lens = np.asarray(lens, dtype=np.int64)
    shift = np.repeat(np.asarray(starts, dtype=np.int64) - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
    return shift + np.arange(int(lens.sum()), dtype=np.int64)


def split_row_bytes(row_bytes: int, d: int) -> int:
    """Peak host bytes per row of a split batch: the rows, their float32 copy for the
    k-means++ distances, the gathered centre rows, and ~600 bytes of per-row index,
    distance and best-of-N arrays. Measured by bench/bench_split_memory.py (2026-11-30:
    10.9 KB at d = 1024 float16, 1.5 KB at d = 128, 0.6-1.1 KB at d = 16 over the rows
    themselves); the old estimate (rows + 4d + 24) let a batch take ~2x its budget."""
    return int(row_bytes) + 9 * int(d) + 600


def _split_batches(x_offsets: np.ndarray, budget_rows: int) -> list[tuple[int, int]]:
    """Batches [g0, g1) of whole groups with at most budget_rows rows (or one big group)."""
    G = x_offsets.shape[0] - 1
    bounds = [0]
    while bounds[-1] < G:
        g0 = bounds[-1]
        g1 = int(np.searchsorted(x_offsets, x_offsets[g0] + budget_rows, side="right")) - 1
        bounds.append(max(g1, g0 + 1))
    return list(zip(bounds[:-1], bounds[1:]))


def split_batch(x: np.ndarray, x_offsets: np.ndarray, c_offsets: np.ndarray,
                parents: np.ndarray, iterations: int, *, seed: int = 0, init: str = "kmeans++",
                n_init: int = 1, candidates: int | None = None, impl: str = "auto",
                fp64_accumulate: bool = True,
                precision: str = "data") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best of ``n_init`` k-means runs inside every group of one batch (SDC's split).

    Each run initialises every group (see _grouped_init) and advances all groups with
    :func:`grouped_lloyd`; per group the run with the lowest inertia (sum of squared
    distances of its rows) is kept, the earliest run on ties.

    Args:
        x: (m, d) rows sorted by group; x_offsets, c_offsets: (G+1,) CSR offsets.
        parents: (G,) global id of every group (keys its random draws).
    Returns:
        centroids (c_offsets[-1], d) float32, labels (m,) int64 into them, distances (m,).
    """
    if x.shape[0] == 0:  # a batch of empty parents (a small budget cuts them apart)
        return np.zeros((0, x.shape[1]), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32)
    sizes = np.diff(x_offsets)
    seg = np.repeat(np.arange(sizes.shape[0]), sizes)
    crow = np.repeat(np.arange(sizes.shape[0]), np.diff(c_offsets))
    device = assign_device(impl)
    best = None
    for run in range(int(n_init)):
        c0 = _grouped_init(x, x_offsets, c_offsets, seed, parents, run, init, candidates,
                           device)
        c, lab, dd = grouped_lloyd(x, x_offsets, c0, c_offsets, iterations, impl=impl,
                                   fp64_accumulate=fp64_accumulate, precision=precision)
        inertia = np.bincount(seg, weights=dd.astype(np.float64), minlength=sizes.shape[0])
        if best is None:
            best = [c, lab, dd, inertia]
            continue
        better = inertia < best[3]
        best[0] = np.where(better[crow][:, None], c, best[0])
        best[1] = np.where(better[seg], lab, best[1])
        best[2] = np.where(better[seg], dd, best[2])
        best[3] = np.where(better, inertia, best[3])
    return best[0], best[1], best[2]


def split_clusters(src: PointSource, labels: np.ndarray, split_k: int, iterations: int, *,
                   seed: int = 0, init: str = "kmeans++", n_init: int = 1,
                   candidates: int | None = None, impl: str = "auto",
                   memory_budget_mb: float = 512.0, fp64_accumulate: bool = True,
                   precision: str = "data", progress: bool = False,
                   parts_dir: Path | None = None,
                   assemble: bool = True):
    """Splits every cluster into min(split_k, size) sub-clusters by a local k-means.

    Points are sorted by parent; whole groups are batched to fit the memory budget (one
    batch when everything fits), each batch is read once and split by
    :func:`split_batch`. Batches are shared round-robin among ranks. With ``parts_dir``
    every finished batch is written there at once (atomically; a rerun skips it) and
    the result is assembled from those files; without it ranks exchange only the parts
    they computed. No rank ever reduces full-size arrays.

    Args:
        src: the points (n, d). labels: (n,) int parent cluster of every point.
        assemble: False returns None (for a rank that does not need the result).
    Returns:
        centroids (K', d) float32 of the non-empty sub-clusters, labels (n,) int64 into
        them, distances (n,) float32; or None when not assemble.
    """
    from tqdm import tqdm

    n = src.n
    labels = np.asarray(labels, dtype=np.int64)
    G = int(labels.max()) + 1 if n else 0
    order = np.argsort(labels, kind="stable")
    sizes = np.bincount(labels, minlength=G)
    x_offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    c_offsets = np.concatenate([[0], np.cumsum(np.minimum(sizes, int(split_k)))]).astype(np.int64)
    budget_rows = max(1, int(memory_budget_mb * (1 << 20)) // split_row_bytes(src.row_bytes, src.d))
    batches = _split_batches(x_offsets, budget_rows)
    rank, world = dist.rank(), dist.world_size()
    computed = {}
    if parts_dir is not None and dist.is_main():
        parts_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    with tqdm(total=n, desc="split", unit="pt", unit_scale=True, leave=False,
              disable=not (progress and dist.is_main())) as bar:
        for b, (g0, g1) in enumerate(batches):
            r0, r1 = int(x_offsets[g0]), int(x_offsets[g1])
            if b % world != rank or (parts_dir is not None and _part_path(parts_dir, g0, g1).exists()):
                continue
            part = split_batch(src.take(order[r0:r1]), x_offsets[g0 : g1 + 1] - r0,
                               c_offsets[g0 : g1 + 1] - c_offsets[g0], np.arange(g0, g1),
                               iterations, seed=seed, init=init, n_init=n_init,
                               candidates=candidates, impl=impl, fp64_accumulate=fp64_accumulate,
                               precision=precision)
            if parts_dir is not None:
                _save_part(_part_path(parts_dir, g0, g1), part)
            else:
                computed[(g0, g1)] = part
            bar.update(r1 - r0)
    if parts_dir is None and dist.is_initialized():
        computed = _exchange_parts(computed, batches, x_offsets, c_offsets, src.d)
    dist.barrier()
    if not assemble:
        return None
    return _assemble_split(batches, computed, parts_dir, order, x_offsets, c_offsets, n, src.d)


def _part_path(parts_dir: Path, g0: int, g1: int) -> Path:
    return parts_dir / f"part_{g0:09d}_{g1:09d}.npz"


def _save_part(path: Path, part) -> None:
    """One batch's (centroids, labels, distances), written to a temporary name first."""
    atomic_savez(path, centroids=part[0], labels=part[1], distances=part[2])


def _load_part(path: Path):
    with np.load(path, allow_pickle=False) as z:
        return z["centroids"], z["labels"], z["distances"]


def _exchange_parts(computed: dict, batches, x_offsets, c_offsets, d: int) -> dict:
    """Every rank's computed batches, gathered (only the parts move, not full arrays)."""
    mine = sorted(computed)
    flat = [np.concatenate([computed[key][i] for key in mine]) if mine else empty
            for i, empty in enumerate((np.zeros((0, d), np.float32), np.zeros(0, np.int64),
                                       np.zeros(0, np.float32)))]
    gathered = [dist.all_gather_arrays(np.ascontiguousarray(a)) for a in flat]
    out = {}
    world = dist.world_size()
    for r in range(world):
        c_at = r_at = 0
        for g0, g1 in batches[r::world]:
            kc = int(c_offsets[g1] - c_offsets[g0])
            kr = int(x_offsets[g1] - x_offsets[g0])
            out[(g0, g1)] = (gathered[0][r][c_at : c_at + kc], gathered[1][r][r_at : r_at + kr],
                             gathered[2][r][r_at : r_at + kr])
            c_at += kc
            r_at += kr
    return out


def _assemble_split(batches, computed: dict, parts_dir: Path | None, order: np.ndarray,
                    x_offsets: np.ndarray, c_offsets: np.ndarray, n: int, d: int):
    """The non-empty sub-clusters' centroids, labels and distances from the parts.

    Two passes over the parts (the first reads only labels), so the (K', d) centroid
    array is allocated once at its final size (at T1 scale 14 GB, not twice that).
    """
    def part(g0, g1):
        return computed[(g0, g1)] if (g0, g1) in computed else \
            _load_part(_part_path(parts_dir, g0, g1))

    K = int(c_offsets[-1])
    used = np.zeros(K, dtype=bool)
    for g0, g1 in batches:
        used[c_offsets[g0] + np.unique(part(g0, g1)[1])] = True
    remap = np.cumsum(used) - 1
    cent = np.empty((int(used.sum()), d), dtype=np.float32)
    out_labels = np.empty(n, dtype=np.int64)
    out_dists = np.empty(n, dtype=np.float32)
    for g0, g1 in batches:
        c, lab, dd = part(g0, g1)
        rows = order[x_offsets[g0] : x_offsets[g1]]
        slots = np.arange(c_offsets[g0], c_offsets[g1])
        keep = used[slots]
        cent[remap[slots[keep]]] = c[keep]
        out_labels[rows] = remap[lab + c_offsets[g0]]
        out_dists[rows] = dd
    return cent, out_labels, out_dists


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
    """progress.json + work/level_<l>/<step>/ arrays; main rank writes, all ranks read.

    ``record`` (settings + data fingerprint) is kept in progress.json and checked against a
    saved run; None when the caller keeps the job's one record (fastssl curate's job.json,
    opened by fastssl.jobs.open_job, which has already refused or emptied the folder):
    progress.json then lists the finished steps only."""

    def __init__(self, root: Path | None, record: dict | None, overwrite: bool):
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
            if record is not None and old.get("record") != record:
                if not overwrite:
                    diff = record_diff(old.get("record", {}), record)
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
        body = {"done": self.done, "complete": complete}
        if self.record is not None:
            body = {"record": self.record, **body}
        atomic_write_text(self.root / "progress.json", json.dumps(body, indent=1))

    def step_dir(self, depth: int, step: str) -> Path:
        return self.root / "work" / f"level_{depth}" / step

    def has(self, depth: int, step: str) -> bool:
        return f"{depth}/{step}" in self.done

    def load(self, depth: int, step: str) -> tuple[np.ndarray, ...]:
        """A finished step's (centroids, labels, distances), memory-mapped."""
        sub = self.step_dir(depth, step)
        return tuple(np.load(sub / f"{name}.npy", mmap_mode="r") for name in _STATE)

    # Inside a step: the Lloyd centroids every few iterations, the split's batches.
    def partial_path(self, depth: int, step: str) -> Path | None:
        if self.root is None:
            return None
        return self.root / "work" / f"level_{depth}" / f"{step}.lloyd.npz"

    def kmpp_path(self, depth: int, step: str) -> Path | None:
        """The step's k-means++ start checkpoint (main rank only: it runs the start)."""
        if self.root is None or not dist.is_main():
            return None
        sub = self.root / "work" / f"level_{depth}"
        sub.mkdir(parents=True, exist_ok=True)
        return sub / f"{step}.kmpp.npz"

    def parts_dir(self, depth: int, step: str) -> Path | None:
        if self.root is None:
            return None
        return self.root / "work" / f"level_{depth}" / f"{step}.parts"

    def load_partial(self, depth: int, step: str) -> tuple[int, np.ndarray] | None:
        """(iterations done, centroids) of an interrupted Lloyd run, or None."""
        path = self.partial_path(depth, step)
        if path is None or not path.exists():
            return None
        with np.load(path, allow_pickle=False) as z:
            return int(z["iteration"]), np.array(z["centroids"])

    def save_partial(self, depth: int, step: str, iteration: int, centroids: np.ndarray) -> None:
        path = self.partial_path(depth, step)
        if path is None or not dist.is_main():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_savez(path, iteration=np.int64(iteration), centroids=centroids)

    def save(self, depth: int, step: str, state: tuple[np.ndarray, ...], prev: str | None,
             callback: Callable[[int, str], None] | None) -> None:
        if self.root is not None:
            if dist.is_main():
                sub = self.step_dir(depth, step)
                sub.mkdir(parents=True, exist_ok=True)
                for name, arr in zip(_STATE, state):
                    atomic_save_npy(sub / f"{name}.npy", np.asarray(arr))
                self.done.append(f"{depth}/{step}")
                self._write()
                self.partial_path(depth, step).unlink(missing_ok=True)
                self.kmpp_path(depth, step).unlink(missing_ok=True)
                shutil.rmtree(self.parts_dir(depth, step), ignore_errors=True)
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


def record_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the settings that differ between two nested records."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += record_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}" if not isinstance(a, (dict, list))
                       or not isinstance(b, (dict, list)) or len(repr(a)) + len(repr(b)) < 120
                       else f"{prefix}{key}")
    return out


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
    resume_record: bool = True,
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
        resume_record: keep the run's settings and data fingerprint in progress.json and
            refuse a run of others (or clear it, with overwrite). False when the caller
            keeps the job's one resume record and has checked it (``fastssl curate``:
            job.json, through fastssl.jobs.open_job): progress.json then lists the
            finished steps only.
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
    prog = _Progress(root, record if resume_record else None, overwrite)
    prog.checkpoint_every = config.checkpoint_every
    if prog.complete:
        log.info("hierarchical k-means: %s is complete; loading it", root)
        return HierarchicalTree.load(root)

    meta: dict = {"config": record["config"], "data": record["data"], "steps": []}
    src, point_ids = _finite_points(config, src, meta)
    tree_levels: list[TreeLevel] = []
    inputs: PointSource = src
    for depth in range(1, len(config.levels) + 1):
        lc = config.levels[depth - 1]
        if lc.k > inputs.n:
            what = "points" if depth == 1 else f"level {depth - 1} clusters"
            raise ValueError(f"level {depth} asks for k={lc.k} clusters but there are only "
                             f"{inputs.n} {what}")
        state = _run_level(config, depth, inputs, prog, meta, callback)
        centroids, labels, dists = state
        tree_levels.append(TreeLevel.from_assignments(centroids, labels.astype(np.int64), dists))
        inputs = PointSource.from_data(centroids if centroids.dtype == np.float32
                                       else np.asarray(centroids, dtype=np.float32))
        if depth < len(config.levels) and config.levels[depth].k > centroids.shape[0]:
            raise ValueError(f"level {depth + 1} asks for k={config.levels[depth].k} clusters "
                             f"but level {depth} has only {centroids.shape[0]} clusters")

    tree = HierarchicalTree(levels=tree_levels, meta=meta)
    if root is None:
        return tree
    if dist.is_main():
        if point_ids is not None:
            atomic_save_npy(root / "point_ids.npy", point_ids)
            tree.meta["point_ids"] = "point_ids.npy"
        tree.save(root)
        prog.finish()
    dist.barrier()
    return HierarchicalTree.load(root)


def _finite_points(config: HierarchicalConfig, src: PointSource, meta: dict):
    """With nonfinite="skip": the finite rows only and (m,) int64 their data rows (None
    when every row is finite or with "raise", whose check rides on the first pass)."""
    if config.nonfinite != "skip":
        return src, None
    km = KMeans(KMeansConfig(k=1, nonfinite="skip", memory_budget_mb=config.memory_budget_mb))
    start, stop = dist.rank_slice(src.n)
    bad = np.concatenate(dist.all_gather_arrays(
        km._scan_nonfinite(src, start, stop, km._chunk_rows(src))))
    if not bad.size:
        return src, None
    keep = np.ones(src.n, dtype=bool)
    keep[bad] = False
    point_ids = np.flatnonzero(keep).astype(np.int64)
    meta["skipped_rows"] = int(bad.size)
    log.warning("hierarchical k-means: %d non-finite rows left out", bad.size)
    return src.subset(point_ids), point_ids


def _run_level(config: HierarchicalConfig, depth: int, inputs: PointSource, prog: _Progress,
               meta: dict, callback) -> tuple[np.ndarray, ...]:
    """Runs (or resumes) the steps of one level; returns its (centroids, labels, distances).

    With an output directory every finished step is reloaded memory-mapped from its
    checkpoint, so a rank holds no second in-memory copy of the level's arrays.
    """
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
        state = _run_step(config, depth, step, seed, inputs, state, prog)
        secs = time.perf_counter() - t0
        meta["steps"].append({"level": depth, "step": step, "seconds": round(secs, 3)})
        log.info("level %d %s: %.1fs (%.3g inputs/s)", depth, step, secs,
                 inputs.n / max(secs, 1e-9))
        prog.save(depth, step, state, prev, callback)
        if prog.root is not None:
            state = prog.load(depth, step)
        prev = step
    return state if state is not None else prog.load(depth, prev)


def _kmeans_config(config: HierarchicalConfig, k: int, iters: int, seed: int) -> KMeansConfig:
    return KMeansConfig(
        k=k, iterations=iters, init=config.init, empty=config.empty,
        init_sample_size=config.init_sample_size,
        init_sample_per_centroid=config.init_sample_per_centroid,
        init_candidates=config.init_candidates, seed=seed,
        memory_budget_mb=config.memory_budget_mb, fp64_accumulate=config.fp64_accumulate,
        impl=config.impl, precision=config.precision, nonfinite="raise",
        progress=config.progress)


def _fit_checkpointed(km: KMeans, data: PointSource, prog: _Progress, depth: int, step: str,
                      init_centroids: np.ndarray | None = None) -> KMeans:
    """KMeans.fit that resumes from, and writes, Lloyd checkpoints of this step."""
    every = int(prog.checkpoint_every)

    def on_iteration(done: int, centroids: np.ndarray) -> None:
        if every and done % every == 0 and done < km.config.iterations:
            prog.save_partial(depth, step, done, centroids)

    resume = prog.load_partial(depth, step)
    if resume is not None:
        log.info("level %d %s: resuming Lloyd after iteration %d", depth, step, resume[0])
    start = prog.kmpp_path(depth, step)
    return km.fit(data, init_centroids, resume=resume, on_iteration=on_iteration,
                  init_checkpoint=KmppCheckpoint(start) if start is not None else None)


def _run_step(config: HierarchicalConfig, depth: int, step: str, seed: int,
              inputs: PointSource, state, prog: _Progress):
    """One step of a level: "kmeans", "split" or "resample_<i>" (see the module doc)."""
    k = int(config.levels[depth - 1].k)
    iters = int(config.level_value(depth, "iterations"))
    if step == "kmeans":
        km = _fit_checkpointed(KMeans(_kmeans_config(config, k, iters, seed)), inputs, prog,
                               depth, step)
        labels, dists = km.predict(gather=_gather(prog))
        return km.centroids_, labels, dists
    centroids, labels, dists = state
    if step == "split":
        iters_split = config.split_iterations if config.split_iterations is not None else iters
        return split_clusters(inputs, labels, int(config.split_k), iters_split, seed=seed,
                              init=config.init, n_init=config.split_inits,
                              candidates=config.init_candidates, impl=config.impl,
                              memory_budget_mb=config.memory_budget_mb,
                              fp64_accumulate=config.fp64_accumulate,
                              precision=config.precision,
                              progress=_progress_enabled(config.progress),
                              parts_dir=prog.parts_dir(depth, step),
                              assemble=prog.root is None or dist.is_main())
    return _resample_step(config, depth, step, seed, inputs, state, prog)


def _resample_step(config: HierarchicalConfig, depth: int, step: str, seed: int,
                   inputs: PointSource, state, prog: _Progress):
    """k-means on sample_size inputs per cluster (fresh or warm), then every input reassigned."""
    centroids, labels, dists = state
    k = centroids.shape[0]
    level = TreeLevel.from_assignments(centroids, np.asarray(labels, dtype=np.int64), dists)
    sample_size = config.level_value(depth, "sample_size") or max(1, int(round(inputs.n / (2 * k))))
    strategy = config.level_value(depth, "sampling_strategy")
    rows = resample_rows(level, sample_size, strategy, np.random.default_rng(seed))
    if rows.shape[0] < k:
        log.warning("level %d %s: %d sampled inputs for %d clusters; step skipped",
                    depth, step, rows.shape[0], k)
        return centroids, labels, dists
    iters = int(config.level_value(depth, "iterations"))
    km = KMeans(_kmeans_config(config, k, iters, seed))
    warm = np.asarray(centroids, dtype=np.float32) if config.resampling_init == "warm" else None
    _fit_checkpointed(km, inputs.subset(rows), prog, depth, step, init_centroids=warm)
    new_labels, new_dists = km.predict(inputs, gather=_gather(prog))
    return km.centroids_, new_labels, new_dists


def _gather(prog: _Progress) -> str:
    """Where a step's labels and distances go: with an output directory only the main
    rank writes them and every rank reloads them memory-mapped (see _run_level), so the
    others need no copy; in memory every rank needs them."""
    return "all" if prog.root is None else "main"
