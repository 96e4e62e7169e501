"""Sampling from a hierarchical k-means tree.

``hierarchical_sample``
    Balanced subset of a target size (Vo et al. 2024): water-filling from the top level
    down, then random / closest / furthest points inside each level-1 cluster.
``ClusterStratifiedBatchSampler``
    Paper 2's batch stratification: every global batch split as evenly as possible
    across the clusters of one level, least-seen items first inside a cluster.

Both are vectorised with numpy: Python loops run over tree levels (a handful), never
over clusters or points.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from fastssl import distributed as fdist

_STRATEGIES = ("random", "closest", "furthest")


# --------------------------------------------------------------------------- helpers
def _ragged_positions(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(starts[i], starts[i] + lengths[i]) over i, without a loop.

    starts, lengths: (m,) int64, lengths >= 0. Returns (lengths.sum(),) int64.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    # Each output element = its segment's start + (its global position - segment's first
    # global position); np.repeat spreads the per-segment shift.
    seg_first = np.cumsum(lengths) - lengths
    shift = np.asarray(starts, dtype=np.int64) - seg_first
    return np.repeat(shift, lengths) + np.arange(total, dtype=np.int64)


def _waterfill(
    sizes: np.ndarray,
    group: np.ndarray,
    targets: np.ndarray,
    priority: np.ndarray,
) -> np.ndarray:
    """Per-child quotas min(t_g, size) that sum exactly to each group's target.

    For every group g the integer water level t_g is the largest with
    sum_i min(t_g, sizes_i) <= targets[g]; the remainder (< number of children larger
    than t_g) goes, one each, to the children larger than t_g with the smallest
    ``priority``. So within a group two quotas differ by at most one unless the smaller
    child is exhausted (quota == size).

    Args:
        sizes: (m,) int64 capacity of each child (>= 0).
        group: (m,) int64 group of each child, in [0, n_groups).
        targets: (n_groups,) int64, 0 <= targets[g] <= sum of its children's sizes.
        priority: (m,) float64 tie-break keys for the remainder (e.g. seeded uniforms).
    Returns:
        (m,) int64 quotas, 0 <= quota <= size.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    group = np.asarray(group, dtype=np.int64)
    targets = np.asarray(targets, dtype=np.int64)
    m, n_groups = sizes.shape[0], targets.shape[0]
    if m == 0:
        return np.zeros(0, dtype=np.int64)
    gcount = np.bincount(group, minlength=n_groups).astype(np.int64)
    gstart = np.cumsum(gcount) - gcount

    order = np.lexsort((sizes, group))  # by group, then size ascending
    s, g = sizes[order], group[order]
    local = np.arange(m, dtype=np.int64) - gstart[g]
    excl = np.cumsum(s) - s  # exclusive prefix sum over the whole array
    prefix = excl - excl[gstart[g]]  # ... restarted at each group
    # Total taken if the water level sits exactly at s: the smaller children are full,
    # this one and the larger ones give s each. Non-decreasing within a group.
    level_total = prefix + (gcount[g] - local) * s
    full = level_total <= targets[g]
    n_full = np.bincount(g[full], minlength=n_groups).astype(np.int64)
    taken_full = np.zeros(n_groups, dtype=np.int64)
    np.add.at(taken_full, g[full], s[full])
    free = gcount - n_full
    rest = targets - taken_full
    t = np.where(free > 0, rest // np.maximum(free, 1), 0)
    remainder = rest - t * free

    quotas = np.empty(m, dtype=np.int64)
    quotas[order] = np.where(full, s, t[g])
    full_orig = np.empty(m, dtype=bool)
    full_orig[order] = full
    # Remainder: within each group the non-full children (False sorts first) by priority.
    order2 = np.lexsort((priority, full_orig, group))
    local2 = np.arange(m, dtype=np.int64) - gstart[group[order2]]
    quotas[order2] += (local2 < remainder[group[order2]]).astype(np.int64)
    return quotas


def _level_point_counts(tree) -> list[np.ndarray]:
    """[(k_l,) int64 points under each cluster of level l] for l = 1..L."""
    counts = [np.diff(np.asarray(tree.levels[0].offsets)).astype(np.int64)]
    for level in tree.levels[1:]:
        counts.append(
            np.bincount(np.asarray(level.assignments), weights=counts[-1], minlength=level.k)
            .round()
            .astype(np.int64)
        )
    return counts


# --------------------------------------------------------------------------- subset
def _pick_in_leaves(level1, q: np.ndarray, sizes: np.ndarray, strategy: str,
                    rng: np.random.Generator) -> np.ndarray:
    """q[c] members of every level-1 cluster c: the closest, the furthest or a random
    subset (members are stored closest first). Returns (q.sum(),) int64 point indices."""
    offsets = np.asarray(level1.offsets, dtype=np.int64)
    if strategy == "closest":
        return np.asarray(level1.members[_ragged_positions(offsets[:-1], q)], dtype=np.int64)
    if strategy == "furthest":
        return np.asarray(level1.members[_ragged_positions(offsets[1:] - q, q)], dtype=np.int64)
    # Clusters taken whole need no randomness; for the partial ones sort random keys
    # within each cluster (key = cluster rank + U[0,1)) and keep each cluster's first q.
    whole = q == sizes
    partial = np.flatnonzero((q > 0) & ~whole)
    whole_pos = _ragged_positions(offsets[:-1][whole], sizes[whole])
    part_sizes = sizes[partial]
    part_pos = _ragged_positions(offsets[partial], part_sizes)
    keys = np.repeat(np.arange(partial.shape[0], dtype=np.float64), part_sizes)
    keys += rng.random(keys.shape[0])
    shuffled = part_pos[np.argsort(keys)]  # keys are distinct (a.s.), any sort is exact
    seg_start = np.cumsum(part_sizes) - part_sizes
    chosen = shuffled[_ragged_positions(seg_start, q[partial])]
    positions = np.concatenate([whole_pos, chosen])
    return np.asarray(level1.members[np.sort(positions)], dtype=np.int64)


def hierarchical_sample(
    tree,
    target_size: int,
    strategy: str = "random",
    seed: int = 0,
    *,
    return_quotas: bool = False,
):
    """Balanced subset of ``target_size`` points from a hierarchical tree.

    At the top level every cluster gets min(t, points under it), with the integer water
    level t and a seeded distribution of the remainder chosen so that the quotas sum to
    the target exactly; each cluster's quota is then split over its children the same
    way, down to level 1, where ``strategy`` picks the points: "random" (a seeded random
    subset), "closest" / "furthest" (the members nearest to / farthest from the level-1
    centroid; members are stored closest first).

    Args:
        tree: a :class:`fastssl.curation.tree.HierarchicalTree` (arrays may be memmaps).
        target_size: number of points wanted (>= 0); all points when >= n_points.
        strategy: "random" | "closest" | "furthest".
        seed: seeds the remainder distribution and the "random" pick.
        return_quotas: also return the per-level quotas.
    Returns:
        (min(target_size, n_points),) int64 point indices, sorted ascending (sorted so that
        reading the rows of a memory-mapped embedding file goes forward). With
        ``return_quotas``: ``(indices, quotas)`` where quotas[l - 1] is the (k_l,) int64
        number of points taken under each cluster of level l.
    """
    if isinstance(target_size, bool) or not isinstance(target_size, (int, np.integer)):
        raise TypeError(f"target_size must be an int, got {type(target_size).__name__}")
    target_size = int(target_size)
    if target_size < 0:
        raise ValueError(f"target_size must be >= 0, got {target_size}")
    if strategy not in _STRATEGIES:
        raise ValueError(f"strategy must be one of {_STRATEGIES}, got {strategy!r}")
    if not getattr(tree, "levels", None):
        raise ValueError("tree has no levels")

    n = tree.n_points
    counts = _level_point_counts(tree)
    rng = np.random.default_rng(seed)
    target = min(target_size, n)

    # Top level: one group holding all its clusters; then each level's quotas become the
    # targets of the groups one level down (a level-l cluster's children are the
    # level-(l-1) clusters assigned to it).
    top = counts[-1]
    quotas = [None] * len(tree.levels)
    quotas[-1] = _waterfill(
        top, np.zeros(top.shape[0], np.int64), np.array([target]), rng.random(top.shape[0])
    )
    for depth in range(len(tree.levels) - 1, 0, -1):  # 0-based index of the parent level
        parent_assign = np.asarray(tree.levels[depth].assignments)
        child_sizes = counts[depth - 1]
        quotas[depth - 1] = _waterfill(
            child_sizes, parent_assign, quotas[depth], rng.random(child_sizes.shape[0])
        )

    if target == n:
        indices = np.arange(n, dtype=np.int64)
    else:
        indices = _pick_in_leaves(tree.levels[0], quotas[0], counts[0], strategy, rng)
    indices = np.sort(indices)
    if return_quotas:
        return indices, quotas
    return indices


# --------------------------------------------------------------------------- batches
def _dataset_rows(indices, n: int) -> np.ndarray:
    """(n,) int64 dataset rows of the sampler's items; required (see the class doc)."""
    if indices is None:
        raise TypeError(
            "indices= is required: the dataset row of every labelled item, i.e. the "
            "curated subset (hierarchical_sample(...)), or np.arange(len(labels)) when the "
            "labels cover the whole dataset; see ClusterStratifiedBatchSampler.from_tree")
    indices = np.asarray(indices)
    if indices.shape != (n,) or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"indices must be integers of shape ({n},) like labels, got "
                         f"{indices.dtype} {indices.shape}")
    return indices.astype(np.int64)


def _water_level(sizes: np.ndarray, target: int) -> tuple[np.ndarray, np.ndarray, int]:
    """One group's water level, the random remainder left to the caller.

    sizes: (k,) int64 capacities; 0 <= target <= sizes.sum().
    Returns (base, eligible, remainder): base (k,) int64 = min(t, sizes) for the largest
    integer t with base.sum() <= target; eligible = indices of sizes > t; remainder =
    target - base.sum() < len(eligible) (0 when nothing is eligible).
    """
    s = np.sort(sizes)
    k = s.shape[0]
    prefix = np.cumsum(s) - s
    full = prefix + (k - np.arange(k)) * s <= target  # a prefix of the sorted sizes
    n_full = int(full.sum())
    if n_full == k:
        t = int(s[-1]) if k else 0
    else:
        t = (target - int(s[:n_full].sum())) // (k - n_full)
    base = np.minimum(sizes, t)
    return base, np.flatnonzero(sizes > t), int(target - base.sum())


class ClusterStratifiedBatchSampler:
    """Batches spread as evenly as possible over clusters; least-seen items first.

    Paper 2's stratification: each *global* batch (``global_batch_size`` items over all
    ranks) is split over the clusters that have items this pseudo-epoch by water-filling:
    every cluster gets ``G // K`` or one more (the extra ones go to a fresh random set of
    clusters each batch; when ``G < K``, a random subset of ``G`` clusters gets one item
    each); a cluster smaller than its share gives all its items and the rest is spread
    over the others. A batch never holds an item twice unless the global batch is larger
    than all the items available.

    Inside a cluster the items with the lowest seen count come first, ties broken by a
    fresh seeded random key: each cluster keeps a visiting order (its items sorted by
    (seen, random)), batches consume the items at the minimum seen count, and when those
    are used up the order is rebuilt from the current counts. So a small cluster's items
    are all revisited before any is seen a third time, and the revisits come in a new
    random order.

    Sharding: ``global_batch_size`` is the batch of the whole job (paper 2's 2048), not
    a rank's: all ranks compute the same global batch (same seed, same state) and rank r
    yields ``global[r::world_size]``, its ``global_batch_size // world_size`` share
    (``self.batch_size``). The shares are disjoint and their union is the global batch,
    stratified as a whole; a global batch that world_size does not divide is refused.
    The global batch is laid out cluster by cluster, so dealing it round-robin gives
    every rank a near-even share of every cluster. Items in a yielded batch are grouped by
    cluster (a DataLoader does not care about order).

    Pseudo-epochs: one pass of ``__iter__`` yields ``len(self)`` batches covering
    ``pseudo_epoch_size`` samples (counted globally, over all ranks). With
    ``drop_last=True`` a final partial global batch is dropped; with ``drop_last=False``
    it is kept and rounded up to a multiple of ``world_size`` (so every rank gets a batch
    of the same size, like DistributedSampler's padding). Seen counts carry over from one
    pseudo-epoch to the next; the pseudo-epoch index advances by itself after a full pass,
    or is set with :meth:`set_epoch`.

    Group cap: with ``groups`` (e.g. slide ids) and ``max_groups_per_epoch``, at the start
    of each pseudo-epoch a seeded random set of that many groups is chosen (keyed by
    (seed, pseudo-epoch)), and only items of those groups are drawn in that pseudo-epoch;
    a cluster with no item in the chosen groups falls back to all its items (as paper 2),
    so every cluster appears in every pseudo-epoch.

    Randomness is keyed by (seed, pseudo-epoch, batch index), so there is no generator
    stream to save: :meth:`state_dict` holds the seen counts, visiting orders, cursors and
    position, and :meth:`load_state_dict` continues exactly where the state was taken. The
    state reflects the batches this sampler has *yielded*; a DataLoader with workers
    prefetches, so save it together with the number of batches consumed, or use a
    stateful loader.

    The items are the dataset rows ``indices`` (required, so that a curated subset cannot
    be forgotten: without it the positions 0..n-1 of the subset would be yielded as if
    they were dataset rows). :meth:`from_tree` builds the labels from a tree.

    Args:
        labels: (n,) integer cluster label of each item (any values; e.g.
            ``tree.point_assignments(level)[curated]``).
        global_batch_size: items per global batch, summed over all ranks (>= 1, a
            multiple of world_size); each rank yields global_batch_size // world_size.
        indices: (n,) int dataset row of each item, yielded by the batches: the curated
            subset (``hierarchical_sample(...)``), or ``np.arange(n)`` for a whole dataset.
        pseudo_epoch_size: global samples per pseudo-epoch (default n).
        seed: seeds everything random.
        groups: optional (n,) integer group of each item (e.g. slide id).
        max_groups_per_epoch: cap on distinct groups drawn per pseudo-epoch (needs groups).
        rank, world_size: default from fastssl.distributed / torch.distributed, else 0, 1.
        drop_last: see above.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        *,
        global_batch_size: int | None = None,
        indices: Sequence[int] | np.ndarray | None = None,
        pseudo_epoch_size: int | None = None,
        seed: int = 0,
        groups: Sequence[int] | np.ndarray | None = None,
        max_groups_per_epoch: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
    ):
        self._set_clusters(labels)
        self.seed = int(seed)
        self._set_batching(global_batch_size, pseudo_epoch_size, rank, world_size, drop_last)
        self._set_groups(groups, max_groups_per_epoch)
        self._indices = _dataset_rows(indices, self._n)
        self._reset_state()

    def _set_clusters(self, labels) -> None:
        """Cluster codes 0..K-1 of the items and the CSR offsets of their clusters."""
        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise ValueError(f"labels must be 1-D (n,), got shape {labels.shape}")
        if labels.shape[0] == 0:
            raise ValueError("labels is empty: nothing to sample")
        if not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(f"labels must be integers, got dtype {labels.dtype}")
        self._n = labels.shape[0]
        _, cluster = np.unique(labels, return_inverse=True)
        self._cluster = cluster.astype(np.int64).reshape(-1)
        self.num_clusters = int(self._cluster.max()) + 1
        counts = np.bincount(self._cluster, minlength=self.num_clusters)
        self._offsets = np.zeros(self.num_clusters + 1, dtype=np.int64)
        np.cumsum(counts, out=self._offsets[1:])

    def _set_batching(self, global_batch_size, pseudo_epoch_size, rank, world_size,
                      drop_last) -> None:
        """The global batch, this rank's share of it, and the pseudo-epoch length."""
        if global_batch_size is None:
            raise TypeError("global_batch_size= is required: the batch summed over all ranks "
                            "(paper 2: 2048); each rank yields global_batch_size // world_size")
        if (isinstance(global_batch_size, bool) or int(global_batch_size) != global_batch_size
                or global_batch_size < 1):
            raise ValueError(f"global_batch_size must be an int >= 1, got {global_batch_size!r}")
        if pseudo_epoch_size is None:
            pseudo_epoch_size = self._n
        if int(pseudo_epoch_size) != pseudo_epoch_size or pseudo_epoch_size < 1:
            raise ValueError(f"pseudo_epoch_size must be an int >= 1, got {pseudo_epoch_size!r}")
        if rank is None or world_size is None:
            auto_rank, auto_world = fdist.rank_world()
            rank = auto_rank if rank is None else rank
            world_size = auto_world if world_size is None else world_size
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if global_batch_size % world_size:
            raise ValueError(f"global_batch_size {global_batch_size} is not divisible by "
                             f"world_size {world_size}: every rank takes an equal share")
        self.rank, self.world_size = int(rank), int(world_size)
        self.global_batch = int(global_batch_size)
        self.batch_size = self.global_batch // self.world_size  # this rank's share
        self.pseudo_epoch_size = int(pseudo_epoch_size)
        self.drop_last = bool(drop_last)
        if self.drop_last and self.pseudo_epoch_size < self.global_batch:
            raise ValueError(
                f"pseudo_epoch_size {self.pseudo_epoch_size} < global_batch_size "
                f"{self.global_batch} with drop_last=True: no batches")

    def _set_groups(self, groups, max_groups_per_epoch) -> None:
        """Group codes of the items (e.g. slides) and the per-pseudo-epoch cap."""
        self._group = None
        self.max_groups_per_epoch = None
        if groups is not None:
            groups = np.asarray(groups)
            if groups.shape != (self._n,):
                raise ValueError(f"groups must have shape ({self._n},) like labels, got "
                                 f"{groups.shape}")
            _, gcode = np.unique(groups, return_inverse=True)
            self._group = gcode.astype(np.int64).reshape(-1)
            self.num_groups = int(self._group.max()) + 1
        if max_groups_per_epoch is not None:
            if self._group is None:
                raise ValueError("max_groups_per_epoch needs groups")
            if int(max_groups_per_epoch) < 1:
                raise ValueError(f"max_groups_per_epoch must be >= 1, got {max_groups_per_epoch!r}")
            self.max_groups_per_epoch = int(max_groups_per_epoch)

    def _reset_state(self) -> None:
        """Fresh mutable state (everything state_dict saves) and scratch arrays."""
        n = self._n
        self._seen = np.zeros(n, dtype=np.int64)
        self._order = np.argsort(self._cluster, kind="stable")  # CSR by cluster
        self._active = np.zeros(self.num_clusters, dtype=np.int64)  # active items per cluster
        self._ptr = np.zeros(self.num_clusters, dtype=np.int64)
        self._round_end = np.zeros(self.num_clusters, dtype=np.int64)
        self._epoch = 0
        self._position = 0
        self._built_epoch = -1
        # Scratch, not state.
        self._taken = np.zeros(n, dtype=bool)
        self._plans: dict[int, tuple] = {}

    @classmethod
    def from_tree(cls, tree, level: int, indices, *, global_batch_size: int, **kwargs):
        """A sampler over the points ``indices`` (e.g. the curated subset) stratified by
        their cluster at ``level`` (1-based) of a HierarchicalTree; batches yield those
        dataset rows. Other arguments as for the constructor."""
        indices = np.asarray(indices, dtype=np.int64)
        labels = np.asarray(tree.point_assignments(level))[indices]
        return cls(labels, global_batch_size=global_batch_size, indices=indices, **kwargs)

    # ------------------------------------------------------------------ sizes
    def _num_global_batches(self) -> int:
        if self.drop_last:
            return self.pseudo_epoch_size // self.global_batch
        return -(-self.pseudo_epoch_size // self.global_batch)

    def _global_size(self, b: int) -> int:
        """Items in global batch b of a pseudo-epoch (the last may be partial)."""
        if self.drop_last or (b + 1) * self.global_batch <= self.pseudo_epoch_size:
            return self.global_batch
        rest = self.pseudo_epoch_size - b * self.global_batch
        return -(-rest // self.world_size) * self.world_size

    def __len__(self) -> int:
        """Batches per pseudo-epoch on this rank."""
        return self._num_global_batches()

    def set_epoch(self, epoch: int) -> None:
        """Selects the pseudo-epoch; a new value restarts at its first batch."""
        if epoch != self._epoch:
            self._epoch = int(epoch)
            self._position = 0

    # ------------------------------------------------------------------ epochs
    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, *key]))

    def allowed_groups(self, epoch: int) -> np.ndarray | None:
        """Group codes (0..num_groups-1, in np.unique order of `groups`) drawn in `epoch`."""
        if self.max_groups_per_epoch is None or self.max_groups_per_epoch >= self.num_groups:
            return None
        rng = self._rng(epoch, 1 << 32)  # batch keys are < 2**32; this one is distinct
        return np.sort(rng.permutation(self.num_groups)[: self.max_groups_per_epoch])

    def _build_epoch(self) -> None:
        """Chooses the active items and sorts each cluster's items by (seen, random)."""
        rng = self._rng(self._epoch, (1 << 32) + 1)
        allowed = self.allowed_groups(self._epoch)
        if allowed is None:
            active = np.ones(self._n, dtype=bool)
        else:
            mask = np.zeros(self.num_groups, dtype=bool)
            mask[allowed] = True
            active = mask[self._group]
            # A cluster with no item in the drawn groups takes all its items (paper 2).
            has_active = np.bincount(self._cluster[active], minlength=self.num_clusters) > 0
            active |= ~has_active[self._cluster]
        # Per cluster: active items first (their count is the cluster's active size).
        self._order = np.lexsort((~active, self._cluster))
        self._active = np.bincount(self._cluster[active], minlength=self.num_clusters)
        self._ptr[:] = 0
        self._rebuild(np.flatnonzero(self._active), rng)
        self._built_epoch = self._epoch
        self._plans = {}

    def _rebuild(self, clusters: np.ndarray, rng: np.random.Generator) -> None:
        """Re-sorts the active items of `clusters` by (taken in this batch, seen, fresh
        random key) and sets round_end[c] = how many untaken items sit at the lowest seen
        count among c's untaken items (they now lead c's visiting order)."""
        if clusters.size == 0:
            return
        sizes = self._active[clusters]
        pos = _ragged_positions(self._offsets[clusters], sizes)
        items = self._order[pos]
        seg = np.repeat(np.arange(clusters.size, dtype=np.int64), sizes)
        seg_start = np.cumsum(sizes) - sizes
        seen = self._seen[items]
        taken = self._taken[items]
        # One float key instead of a 4-key lexsort (several times faster): segment, then
        # taken, then seen relative to the segment minimum, then U[0, 1). Exact while
        # 2 * n_segments * span < 2**40 or so, far above any real cluster count.
        rel = seen - np.minimum.reduceat(seen, seg_start)[seg]
        span = float(rel.max()) + 1.0
        key = (seg * 2 + taken) * span + rel + rng.random(items.size)
        perm = np.argsort(key)
        items, seen, taken = items[perm], seen[perm], taken[perm]
        self._order[pos] = items
        min_seen = seen[seg_start]  # first item: untaken ones sort first
        at_min = ~taken & (seen == min_seen[seg])
        self._round_end[clusters] = np.bincount(seg[at_min], minlength=clusters.size)

    def _plan(self, size: int) -> tuple:
        """(full passes, base quotas, clusters eligible for +1, remainder) for a batch size."""
        plan = self._plans.get(size)
        if plan is None:
            total = int(self._active.sum())
            reps, rest = divmod(size, total)
            base, eligible, remainder = _water_level(self._active, rest)
            plan = self._plans[size] = (reps, base, eligible, remainder)
        return plan

    # ------------------------------------------------------------------ batches
    def _global_batch(self, b: int, size: int) -> np.ndarray:
        """(size,) int64 item positions of global batch b; updates seen counts and cursors."""
        rng = self._rng(self._epoch, b)
        reps, base, eligible, remainder = self._plan(size)
        quota = base.copy()
        if remainder:
            quota[rng.choice(eligible, remainder, replace=False)] += 1
        cl = np.flatnonzero(quota)
        q = quota[cl]
        start = self._offsets[cl]
        # Phase 1: continue each cluster's current round.
        take = np.minimum(q, np.maximum(self._round_end[cl] - self._ptr[cl], 0))
        first = self._order[_ragged_positions(start + self._ptr[cl], take)]
        self._ptr[cl] += take
        need = q - take
        parts = [first]
        more = need > 0
        if more.any():
            # Phase 2: rounds used up. Re-sort those clusters by (taken in this batch,
            # seen, fresh random) so the batch never repeats an item, then continue.
            rb, rb_need = cl[more], need[more]
            self._taken[first] = True
            self._rebuild(rb, rng)
            self._taken[first] = False
            second = self._order[_ragged_positions(self._offsets[rb], rb_need)]
            self._ptr[rb] = rb_need
            parts.append(second)
        # Lay the batch out cluster by cluster, clusters in a random order, so that
        # dealing it round-robin to ranks splits every cluster evenly: scatter each
        # cluster's items into its block (no sort needed).
        block = np.empty(cl.size, dtype=np.int64)
        shuffled = rng.permutation(cl.size)
        block[shuffled] = np.cumsum(q[shuffled]) - q[shuffled]
        batch = np.empty(int(q.sum()), dtype=np.int64)
        batch[_ragged_positions(block, take)] = first
        if more.any():
            batch[_ragged_positions(block[more] + take[more], need[more])] = parts[1]
        if reps:
            everything = self._order[_ragged_positions(self._offsets[:-1], self._active)]
            batch = np.concatenate([np.tile(everything, reps), batch])
            np.add.at(self._seen, batch, 1)
        else:
            self._seen[batch] += 1  # items are distinct within a batch
        return batch

    def __iter__(self) -> Iterator[list[int]]:
        if self._built_epoch != self._epoch:
            self._build_epoch()
        n_batches = self._num_global_batches()
        while self._position < n_batches:
            b = self._position
            batch = self._global_batch(b, self._global_size(b))
            self._position += 1
            yield self._indices[batch[self.rank :: self.world_size]].tolist()
        self._epoch += 1
        self._position = 0

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Everything needed to continue exactly: plain ints and int64 torch tensors
        (so ``torch.load(..., weights_only=True)`` reads a checkpoint holding it)."""
        import torch

        return {
            "n": self._n,
            "seed": self.seed,
            "global_batch": self.global_batch,
            "epoch": self._epoch,
            "position": self._position,
            "built_epoch": self._built_epoch,
            "seen": torch.from_numpy(self._seen.copy()),
            "order": torch.from_numpy(self._order.astype(np.int64)),
            "active": torch.from_numpy(self._active.astype(np.int64)),
            "ptr": torch.from_numpy(self._ptr.copy()),
            "round_end": torch.from_numpy(self._round_end.copy()),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores a :meth:`state_dict` taken from a sampler with the same labels, seed
        and global batch (the rank may differ: every rank holds the same state)."""
        for key, mine in (("n", self._n), ("seed", self.seed), ("global_batch", self.global_batch)):
            if int(state[key]) != mine:
                raise ValueError(f"state_dict {key}={int(state[key])} does not match this sampler's {mine}")
        arrays = {}
        for key, shape in (("seen", (self._n,)), ("order", (self._n,)),
                           ("active", (self.num_clusters,)), ("ptr", (self.num_clusters,)),
                           ("round_end", (self.num_clusters,))):
            value = state[key]
            value = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
            if value.shape != shape:
                raise ValueError(f"state_dict[{key!r}] has shape {value.shape}, expected {shape}")
            arrays[key] = value.astype(np.int64, copy=True)
        self._seen, self._order, self._active = arrays["seen"], arrays["order"], arrays["active"]
        self._ptr, self._round_end = arrays["ptr"], arrays["round_end"]
        self._epoch = int(state["epoch"])
        self._position = int(state["position"])
        self._built_epoch = int(state["built_epoch"])
        self._plans = {}
