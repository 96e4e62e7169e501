"""Datasets over a ``fastssl prepare`` cache.

* :class:`PairedViewDataset`: one item per study with both a frontal and a lateral
  image; each epoch draws one image of each view at random (seeded by (seed, epoch,
  study), so any worker and any rerun draws the same).
* :class:`SingleViewDataset`: one item per image (all views, or e.g. frontal only), for
  the unpaired baseline and for probing.
* :class:`StudyViewsDataset`: one item per study with any image (the released MVMAE's
  "FLU" policy): up to ``max_views`` view slots filled with the study's images (a seeded
  random subset per epoch when it has more), an availability mask for the rest.

Shards are memory-mapped lazily, once per process (DataLoader workers reopen them
after fork). Batches are gathered with one fancy-index per shard: index a dataset with a
list of indices, or use :func:`make_loader`, which hands whole batches of indices to
the workers. Images stay integers (uint8/uint16) until the device; see
:mod:`fastssl.data.augment`.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from fastssl.data.cache import CacheIndex, open_shard, read_index
from fastssl.data.mimic import VIEWS

__all__ = ["PairedViewDataset", "SingleViewDataset", "StudyViewsDataset", "make_loader", "VIEW_IDS"]

# View-type ids for the model's view embedding: "other" views count as unknown.
VIEW_IDS = {"frontal": 0, "lateral": 1, "other": 2, "unknown": 2}


class _Shards:
    """Shards memory-mapped on first use, per process (a map is never pickled)."""

    def __init__(self, cache_dir: str):
        self.cache_dir = cache_dir
        self._pid = -1
        self._maps: dict[int, np.ndarray] = {}

    def __getstate__(self):
        return {"cache_dir": self.cache_dir, "_pid": -1, "_maps": {}}

    def get(self, k: int) -> np.ndarray:
        if self._pid != os.getpid():  # forked worker: the parent's maps are not ours
            self._maps, self._pid = {}, os.getpid()
        m = self._maps.get(k)
        if m is None:
            m = self._maps[k] = open_shard(self.cache_dir, k)
        return m

    def gather(self, shard: np.ndarray, offset: np.ndarray, size: int, dtype) -> np.ndarray:
        """(B,) shard ids and offsets -> (B, S, S): one fancy-index per distinct shard,
        offsets sorted within it so the reads go forward through the file."""
        out = np.empty((shard.size, size, size), dtype=dtype)
        for k in np.unique(shard):
            pos = np.flatnonzero(shard == k)
            order = np.argsort(offset[pos], kind="stable")
            pos = pos[order]
            out[pos] = self.get(int(k))[offset[pos]]
        return out


def _split_mask(index: CacheIndex, split) -> np.ndarray:
    if split is None:
        return np.ones(len(index), dtype=bool)
    splits = [split] if isinstance(split, str) else list(split)
    known = set(index.split.tolist())
    unknown = [s for s in splits if s not in known and s not in ("train", "validate", "test")]
    if unknown:
        raise ValueError(f"split={split!r}: {unknown} not in this cache (has {sorted(known)})")
    return np.isin(index.split, splits)


def _as_indices(idx, n: int) -> np.ndarray:
    arr = np.asarray(idx, dtype=np.int64).reshape(-1)
    if arr.size and (arr.min() < -n or arr.max() >= n):
        raise IndexError(f"index out of range for a dataset of {n} items: {arr.min()}..{arr.max()}")
    return arr % n if n else arr


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A counter-based hash (SplitMix64 finaliser): the same draw in every process."""
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class _CacheDataset(torch.utils.data.Dataset):
    def __init__(self, cache_dir: str | os.PathLike):
        self.cache_dir = os.fspath(cache_dir)
        self.index = read_index(self.cache_dir)
        self.size = int(self.index.manifest["size"])
        self.dtype = np.dtype(self.index.manifest["dtype"])
        self._shards = _Shards(self.cache_dir)

    def _images(self, rows: np.ndarray) -> torch.Tensor:
        """Index rows -> (B, 1, S, S) uint8|uint16 tensor."""
        arr = self._shards.gather(self.index.shard[rows], self.index.offset[rows], self.size, self.dtype)
        return torch.from_numpy(arr).unsqueeze(1)

    def __getitems__(self, indices: Sequence[int]) -> list[tuple]:
        """A batch as a list of samples (DataLoader's default collate stacks them), but
        read from the shards with one fancy-index per shard."""
        batch = self.get_batch(indices)
        return [tuple(t[i] for t in batch) for i in range(len(indices))]

    def __getitem__(self, idx):
        """An int -> one sample; a list / array of ints -> a collated batch."""
        if isinstance(idx, (int, np.integer)):
            return tuple(t[0] for t in self.get_batch([idx]))
        return self.get_batch(idx)


class SingleViewDataset(_CacheDataset):
    """Every image of a split (optionally only some views).

    Args:
        cache_dir: a complete ``fastssl prepare`` cache.
        split: "train" | "validate" | "test", a list of them, or None for all.
        views: "all" or a subset of ("frontal", "lateral", "other", "unknown").
        dataset: only rows of this dataset (or list) of a pooled cache, e.g. "mimic-cxr".
    Items:
        image: (1, S, S) uint8|uint16; labels: (14,) int8 (-1 = ignore);
        study_index: int64 index into ``self.study_ids``; view_id: int64 (VIEW_IDS).
        A batch has the same entries with a leading B.
    """

    def __init__(self, cache_dir: str | os.PathLike, split: str | Sequence[str] | None = "train",
                 views: str | Sequence[str] = "all", dataset: str | Sequence[str] | None = None):
        super().__init__(cache_dir)
        views = VIEWS if views == "all" else ((views,) if isinstance(views, str) else tuple(views))
        bad = sorted(set(views) - set(VIEWS))
        if bad:
            raise ValueError(f"views={views!r}: {bad} not in {VIEWS} (or 'all')")
        mask = _split_mask(self.index, split) & np.isin(self.index.view, list(views))
        mask &= self.index.select(dataset=dataset)
        self.rows = np.flatnonzero(mask)
        self.study_ids, study_index = np.unique(self.index.study_id[self.rows], return_inverse=True)
        self.study_index = study_index.astype(np.int64).reshape(-1)
        self.view_ids = np.array([VIEW_IDS[v] for v in self.index.view[self.rows]], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.rows.size)

    def get_batch(self, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """indices (B,) -> image (B, 1, S, S), labels (B, 14) int8, study_index (B,), view_id (B,)."""
        i = _as_indices(indices, len(self))
        rows = self.rows[i]
        return (self._images(rows), torch.from_numpy(self.index.labels[rows]),
                torch.from_numpy(self.study_index[i]), torch.from_numpy(self.view_ids[i]))


class PairedViewDataset(_CacheDataset):
    """Studies with both a frontal and a lateral image; one random image of each view.

    Args:
        cache_dir: a complete ``fastssl prepare`` cache.
        split: "train" | "validate" | "test", a list of them, or None for all.
        seed: the draw of a study's images depends only on (seed, epoch, study).
        preferred_only: always take the preferred image of each view (PA before AP,
            as ordered in the cache) instead of a random one.
        dataset: only studies of this dataset (or list) of a pooled cache.
    Items:
        frontal, lateral: (1, S, S) uint8|uint16; labels: (14,) int8;
        study_index: int64 index into ``self.study_ids``.

    Call ``set_epoch(e)`` before each epoch's DataLoader iterator is created (workers
    copy the dataset then; with ``persistent_workers=True`` they would keep the old one).
    """

    def __init__(self, cache_dir: str | os.PathLike, split: str | Sequence[str] | None = "train",
                 seed: int = 0, preferred_only: bool = False, dataset: str | Sequence[str] | None = None):
        super().__init__(cache_dir)
        index = self.index
        rows = np.flatnonzero(_split_mask(index, split) & index.select(dataset=dataset))
        # Group rows by study, keeping index order (preferred view first within a study).
        study_ids, inverse = np.unique(index.study_id[rows], return_inverse=True)
        inverse = inverse.reshape(-1)
        order = np.argsort(inverse, kind="stable")
        rows, inverse = rows[order], inverse[order]
        is_f = index.view[rows] == "frontal"
        is_l = index.view[rows] == "lateral"
        n_f = np.bincount(inverse[is_f], minlength=study_ids.size)
        n_l = np.bincount(inverse[is_l], minlength=study_ids.size)
        keep = (n_f > 0) & (n_l > 0)
        self.study_ids = study_ids[keep]
        # CSR: frontal rows of study s are f_rows[f_ptr[s]:f_ptr[s+1]], lateral likewise.
        sel_f = is_f & keep[inverse]
        sel_l = is_l & keep[inverse]
        self.f_rows, self.l_rows = rows[sel_f], rows[sel_l]
        self.f_ptr = np.concatenate([[0], np.cumsum(n_f[keep])]).astype(np.int64)
        self.l_ptr = np.concatenate([[0], np.cumsum(n_l[keep])]).astype(np.int64)
        # Labels are per study: take them from the study's first frontal row.
        self.labels = index.labels[self.f_rows[self.f_ptr[:-1]]]
        self.seed, self.epoch, self.preferred_only = int(seed), 0, preferred_only

    def __len__(self) -> int:
        return int(self.study_ids.size)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose draw the next iteration uses."""
        self.epoch = int(epoch)

    def choose(self, studies: np.ndarray, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(B,) study indices -> (frontal index rows, lateral index rows) for that epoch."""
        epoch = self.epoch if epoch is None else epoch
        nf = self.f_ptr[studies + 1] - self.f_ptr[studies]
        nl = self.l_ptr[studies + 1] - self.l_ptr[studies]
        if self.preferred_only:
            return self.f_rows[self.f_ptr[studies]], self.l_rows[self.l_ptr[studies]]
        key = _epoch_key(self.seed, epoch)
        with np.errstate(over="ignore"):
            s2 = studies.astype(np.uint64) * np.uint64(2)
            hf = _splitmix64(key ^ _splitmix64(s2))
            hl = _splitmix64(key ^ _splitmix64(s2 + np.uint64(1)))
        pick_f = (hf % nf.astype(np.uint64)).astype(np.int64)
        pick_l = (hl % nl.astype(np.uint64)).astype(np.int64)
        return self.f_rows[self.f_ptr[studies] + pick_f], self.l_rows[self.l_ptr[studies] + pick_l]

    def get_batch(self, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """indices (B,) -> frontal (B, 1, S, S), lateral (B, 1, S, S), labels (B, 14) int8,
        study_index (B,) int64. Both views come from one gather over the shards."""
        s = _as_indices(indices, len(self))
        f, l = self.choose(s)
        both = self._images(np.concatenate([f, l]))
        return both[: s.size], both[s.size:], torch.from_numpy(self.labels[s]), torch.from_numpy(s)


def _epoch_key(seed: int, epoch: int) -> np.ndarray:
    mask = (1 << 64) - 1
    return _splitmix64(np.array([(seed & mask) * 0x100000001B3 + (epoch & mask) & mask], dtype=np.uint64))


class StudyViewsDataset(_CacheDataset):
    """Every study of a split that has an image, its images in view slots (released "FLU").

    A study with n images fills min(n, max_views) slots in cache-index order; with more
    than ``max_views`` images a random subset (seeded by (seed, epoch, study), like
    PairedViewDataset's draw) is taken each epoch. Every image of every study is thus
    reconstructed, single-image studies included; alignment covers the available pairs.

    Args:
        cache_dir: a complete ``fastssl prepare`` cache.
        split: "train" | "validate" | "test", a list of them, or None for all.
        max_views: slots per study (the released config: 3).
        seed: the draw of a study's images depends only on (seed, epoch, study).
        dataset: only studies of this dataset (or list) of a pooled cache.
    Batches (``get_batch``):
        images (B, V, 1, S, S) uint8|uint16 (missing slots are 0), available (B, V) bool,
        views (B, V) int64 (VIEW_IDS; missing slots 0), labels (B, 14) int8,
        study_index (B,) int64 into ``self.study_ids``.
    """

    def __init__(self, cache_dir: str | os.PathLike, split: str | Sequence[str] | None = "train",
                 max_views: int = 3, seed: int = 0, dataset: str | Sequence[str] | None = None):
        super().__init__(cache_dir)
        if max_views < 1:
            raise ValueError(f"max_views={max_views}; expected >= 1")
        index = self.index
        rows = np.flatnonzero(_split_mask(index, split) & index.select(dataset=dataset))
        study_ids, inverse = np.unique(index.study_id[rows], return_inverse=True)
        order = np.argsort(inverse.reshape(-1), kind="stable")  # index order within a study
        self.rows = rows[order]
        self.ptr = np.concatenate([[0], np.cumsum(np.bincount(inverse.reshape(-1),
                                                              minlength=study_ids.size))]).astype(np.int64)
        self.study_ids = study_ids
        self.view_ids = np.array([VIEW_IDS[v] for v in index.view[self.rows]], dtype=np.int64)
        self.labels = index.labels[self.rows[self.ptr[:-1]]]
        self.max_views, self.seed, self.epoch = int(max_views), int(seed), 0

    def __len__(self) -> int:
        return int(self.study_ids.size)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose draw the next iteration uses."""
        self.epoch = int(epoch)

    def slots(self, studies: np.ndarray, epoch: int | None = None) -> np.ndarray:
        """(B,) study indices -> (B, max_views) positions into ``self.rows`` (-1 = empty)."""
        epoch = self.epoch if epoch is None else epoch
        out = np.full((studies.size, self.max_views), -1, dtype=np.int64)
        key = _epoch_key(self.seed, epoch)
        for i, s in enumerate(studies.tolist()):
            lo, hi = int(self.ptr[s]), int(self.ptr[s + 1])
            pos = np.arange(lo, hi)
            if pos.size > self.max_views:
                with np.errstate(over="ignore"):
                    h = _splitmix64(key ^ _splitmix64(np.uint64(s) * np.uint64(0x9E3779B1) + pos.astype(np.uint64)))
                pos = np.sort(pos[np.argsort(h, kind="stable")[: self.max_views]])
            out[i, : pos.size] = pos
        return out

    def get_batch(self, indices):
        """indices (B,) -> images (B, V, 1, S, S), available (B, V), views (B, V), labels (B, 14),
        study_index (B,); one gather over the shards for the whole batch."""
        s = _as_indices(indices, len(self))
        pos = self.slots(s)
        available = pos >= 0
        flat = self._images(self.rows[pos[available]])                      # (N, 1, S, S)
        images = torch.zeros((s.size, self.max_views) + tuple(flat.shape[1:]), dtype=flat.dtype)
        mask = torch.from_numpy(available)
        images[mask] = flat
        views = np.where(available, self.view_ids[np.maximum(pos, 0)], 0)
        return images, mask, torch.from_numpy(views), torch.from_numpy(self.labels[s]), torch.from_numpy(s)


def make_loader(dataset: _CacheDataset, batch_size: int, *, shuffle: bool = True, drop_last: bool = True,
                num_workers: int = 0, seed: int = 0, pin_memory: bool = False,
                **kwargs) -> torch.utils.data.DataLoader:
    """A DataLoader that hands whole batches of indices to the workers, so each batch is
    one gather per shard and needs no per-sample collate. Yields the tuples of
    ``dataset.get_batch``."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; expected >= 1")
    generator = torch.Generator().manual_seed(seed)
    base = (torch.utils.data.RandomSampler(dataset, generator=generator) if shuffle
            else torch.utils.data.SequentialSampler(dataset))
    sampler = torch.utils.data.BatchSampler(base, batch_size=batch_size, drop_last=drop_last)
    return torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=num_workers,
                                       pin_memory=pin_memory, **kwargs)
