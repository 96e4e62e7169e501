"""The on-disk hierarchical clustering tree: plain .npy arrays and one JSON file.

Layout of a tree directory::

    tree.json                 {"format": 1, "n_points": N, "dim": d, "levels": [{"k": k_l}, ...], ...}
    level_1/centroids.npy     (k_1, d) float32
    level_1/assignments.npy   (N,) int32     cluster of every point
    level_1/distances.npy     (N,) float32   squared distance of every point to its centroid
    level_1/offsets.npy       (k_1 + 1,) int64   CSR offsets into members
    level_1/members.npy       (N,) int64     point indices grouped by cluster, each cluster
                                             sorted by distance to its centroid (closest first)
    level_2/...               the same, with the k_1 centroids of level 1 as the inputs
                              (assignments (k_1,), members index level-1 clusters)

Level l > 1 clusters the centroids of level l - 1, so following members down the levels
reaches the points. Every array loads memory-mapped; no pickled objects anywhere.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastssl.atomic import atomic_save_npy, atomic_write_text

FORMAT_VERSION = 1
_ARRAYS = ("centroids", "assignments", "distances", "offsets", "members")


@dataclass
class TreeLevel:
    """One level of the tree.

    Attributes:
        centroids: (k, d) float32.
        assignments: (n_inputs,) int32, cluster of each input of this level (points for
            level 1, level l-1 clusters above).
        distances: (n_inputs,) float32, squared distance of each input to its centroid.
        offsets: (k + 1,) int64 CSR offsets into members.
        members: (n_inputs,) int64 inputs grouped by cluster, closest first.
    """

    centroids: np.ndarray
    assignments: np.ndarray
    distances: np.ndarray
    offsets: np.ndarray
    members: np.ndarray

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    def __repr__(self) -> str:  # the arrays can hold hundreds of millions of entries
        return (f"TreeLevel(k={self.k}, n_inputs={self.n_inputs}, "
                f"d={int(self.centroids.shape[1])})")

    @property
    def n_inputs(self) -> int:
        return int(self.assignments.shape[0])

    def sizes(self) -> np.ndarray:
        """(k,) int64 number of inputs in each cluster."""
        return np.diff(np.asarray(self.offsets))

    def members_of(self, cluster: int) -> np.ndarray:
        """Inputs of one cluster, closest to its centroid first."""
        return self.members[self.offsets[cluster] : self.offsets[cluster + 1]]

    @classmethod
    def from_assignments(
        cls, centroids: np.ndarray, assignments: np.ndarray, distances: np.ndarray
    ) -> "TreeLevel":
        """Builds the CSR member lists (sorted by cluster, then distance) from assignments."""
        assignments = np.asarray(assignments)
        distances = np.asarray(distances, dtype=np.float32)
        k = int(centroids.shape[0])
        if assignments.shape != distances.shape or assignments.ndim != 1:
            raise ValueError(
                f"assignments {assignments.shape} and distances {distances.shape} must be "
                "1-D of the same length"
            )
        if assignments.size and (assignments.min() < 0 or assignments.max() >= k):
            raise ValueError(f"assignments must lie in [0, {k}) for {k} centroids")
        order = np.lexsort((distances, assignments))  # by cluster, then distance
        offsets = np.zeros(k + 1, dtype=np.int64)
        np.cumsum(np.bincount(assignments, minlength=k), out=offsets[1:])
        return cls(
            centroids=np.ascontiguousarray(centroids, dtype=np.float32),
            assignments=assignments.astype(np.int32),
            distances=distances,
            offsets=offsets,
            members=order.astype(np.int64),
        )


@dataclass
class HierarchicalTree:
    """Levels from the finest (level 1, over points) to the coarsest.

    Attributes:
        levels: levels[0] is level 1.
        meta: free-form JSON-serialisable information (config, timings, source files).
    """

    levels: list[TreeLevel]
    meta: dict = field(default_factory=dict)

    @property
    def n_points(self) -> int:
        return self.levels[0].n_inputs

    def __repr__(self) -> str:
        ks = [level.k for level in self.levels]
        return f"HierarchicalTree(n_points={self.n_points}, dim={self.dim}, k per level={ks})"

    @property
    def dim(self) -> int:
        return int(self.levels[0].centroids.shape[1])

    def validate(self) -> None:
        """Raises ValueError when levels do not chain (level l inputs = level l-1 clusters)."""
        for depth, level in enumerate(self.levels, start=1):
            if level.offsets.shape != (level.k + 1,) or level.members.shape != (level.n_inputs,):
                raise ValueError(f"level {depth}: offsets/members shapes do not match k and inputs")
            if int(level.offsets[-1]) != level.n_inputs:
                raise ValueError(f"level {depth}: offsets end at {int(level.offsets[-1])}, "
                                 f"expected {level.n_inputs}")
            if depth > 1 and level.n_inputs != self.levels[depth - 2].k:
                raise ValueError(
                    f"level {depth} has {level.n_inputs} inputs but level {depth - 1} has "
                    f"{self.levels[depth - 2].k} clusters"
                )

    def point_assignments(self, level: int) -> np.ndarray:
        """(n_points,) cluster of every point at `level` (1-based), following the tree."""
        labels = np.asarray(self.levels[0].assignments)
        for depth in range(2, level + 1):
            labels = np.asarray(self.levels[depth - 1].assignments)[labels]
        return labels

    def cluster_point_counts(self, level: int) -> np.ndarray:
        """(k_level,) number of points under each cluster of `level`."""
        return np.bincount(self.point_assignments(level), minlength=self.levels[level - 1].k)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """Writes the tree; each file goes to a temporary name first, then is renamed."""
        self.validate()
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        for depth, level in enumerate(self.levels, start=1):
            sub = root / f"level_{depth}"
            sub.mkdir(exist_ok=True)
            for name in _ARRAYS:
                atomic_save_npy(sub / f"{name}.npy", np.asarray(getattr(level, name)))
        info = {
            "format": FORMAT_VERSION,
            "n_points": self.n_points,
            "dim": self.dim,
            "levels": [{"k": level.k, "n_inputs": level.n_inputs} for level in self.levels],
            "meta": self.meta,
        }
        atomic_write_text(root / "tree.json", json.dumps(info, indent=2, sort_keys=True))
        return root

    @classmethod
    def load(cls, directory: str | os.PathLike, *, mmap: bool = True) -> "HierarchicalTree":
        """Reads a tree written by :meth:`save`; arrays are memory-mapped unless mmap=False."""
        from fastssl.errors import DataError

        root = Path(directory)
        info_path = root / "tree.json"
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(info_path, "no tree here (tree.json is missing)") from None
        except json.JSONDecodeError as exc:
            raise DataError(info_path, f"not valid JSON ({exc})") from None
        if info.get("format") != FORMAT_VERSION:
            raise DataError(info_path, f"tree format {info.get('format')!r}, expected {FORMAT_VERSION}")
        levels = []
        for depth in range(1, len(info["levels"]) + 1):
            arrays = {}
            for name in _ARRAYS:
                path = root / f"level_{depth}" / f"{name}.npy"
                try:
                    arrays[name] = np.load(path, mmap_mode="r" if mmap else None)
                except (OSError, ValueError) as exc:
                    raise DataError(path, f"cannot load ({exc})") from None
            levels.append(TreeLevel(**arrays))
        tree = cls(levels=levels, meta=info.get("meta", {}))
        try:
            tree.validate()
        except ValueError as exc:
            raise DataError(root, str(exc)) from None
        return tree


def __getattr__(name: str):
    # the atomic writers moved to fastssl.atomic; the old names work for one more release
    moved = {"save_npy_atomic": "atomic_save_npy", "write_text_atomic": "atomic_write_text"}
    if name in moved:
        import warnings

        from fastssl import atomic

        warnings.warn(f"fastssl.curation.tree.{name} moved to fastssl.atomic.{moved[name]}; the old name "
                      "goes in the next release", DeprecationWarning, stacklevel=2)
        return getattr(atomic, moved[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
