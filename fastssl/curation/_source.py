"""Row access to the points being clustered: arrays, memmaps, or a list of .npy shards.

A :class:`PointSource` never loads all points: :meth:`chunks` yields contiguous row
blocks read from the memory map one at a time (a block never spans two shards, so each
is a plain slice), and :meth:`take` gathers a sorted set of rows. An optional row index
turns a source into a view of a subset (used by the resampling steps) without copying.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from fastssl.errors import DataError

_FLOATS = (np.float16, np.float32, np.float64)


def _open_shard(path: Path) -> np.ndarray:
    if not path.exists():
        raise DataError(path, "shard is missing")
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(path, "empty file (0 bytes): not a .npy array")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError) as exc:  # "mmap length is greater than file size", pickles
        raise DataError(path, f"truncated or not a plain .npy array ({exc})") from None
    except OSError as exc:
        raise DataError(path, f"cannot read ({exc})") from None
    if arr.ndim != 2:
        raise DataError(path, f"expected a 2-D (rows, d) array, got shape {arr.shape}")
    if arr.dtype.type not in _FLOATS:
        raise DataError(path, f"dtype {arr.dtype}; expected float16, float32 or float64")
    return arr


def expand_paths(data: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """A .npy file, a directory (an embed output directory: its shards in manifest order;
    otherwise its *.npy sorted by name), a glob, or a list of those."""
    items = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir() and (p / "manifest.json").exists():
            paths.extend(manifest_shards(p))
        elif p.is_dir():
            found = sorted(p.glob("*.npy"))
            if not found:
                raise DataError(p, "directory holds no .npy shards")
            paths.extend(found)
        elif any(ch in str(item) for ch in "*?[") and not p.exists():
            found = sorted(Path(q) for q in glob.glob(str(item)))
            if not found:
                raise DataError(p, "glob matches no file")
            paths.extend(found)
        else:
            paths.append(p)
    return paths


def read_embed_manifest(directory: str | os.PathLike, missing_ok: bool = False) -> dict | None:
    """The manifest.json of a ``fastssl embed`` output directory: the one reader of it.

    Returns None when the file is absent and ``missing_ok``; raises DataError naming the
    file when it is absent (otherwise), unreadable, or not a JSON object."""
    import json

    path = Path(directory) / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        if missing_ok:
            return None
        raise DataError(path, f"cannot read ({exc})") from None
    except (OSError, ValueError) as exc:
        raise DataError(path, f"cannot read ({exc})") from None
    if not isinstance(manifest, dict):
        raise DataError(path, f"not an embed manifest (a JSON {type(manifest).__name__}, not an object)")
    return manifest


def manifest_shards(directory: Path) -> list[Path]:
    """The shards of a ``fastssl embed`` output directory in manifest.json's order: the
    order of the rows of its index.csv (never the file names' order)."""
    path = directory / "manifest.json"
    manifest = read_embed_manifest(directory)
    try:
        files = [directory / entry["file"] for entry in manifest["shards"]]
    except (KeyError, TypeError) as exc:
        raise DataError(path, f"not an embed manifest with a 'shards' list ({exc})") from None
    if not files:
        raise DataError(path, "lists no shards")
    return files


def _content_hash(name: str | None, part: np.ndarray) -> str:
    """sha256 of sampled blocks of a shard file, or of 8 evenly spaced row blocks of an array."""
    import hashlib

    if name is not None:
        from fastssl.jobs import fingerprint_files

        return next(iter(fingerprint_files([name]).values()))["sha256"]
    digest = hashlib.sha256()
    rows = part.shape[0]
    block = max(1, min(rows, (64 * 1024) // max(1, part.itemsize * part.shape[1])))
    for start in sorted({int(i * max(0, rows - block) / 7) for i in range(8)}):
        digest.update(np.ascontiguousarray(part[start : start + block]).tobytes())
    return digest.hexdigest()


class PointSource:
    """(n, d) points over one or more 2-D arrays, optionally restricted to sorted rows.

    Args:
        parts: arrays (np.ndarray / np.memmap) of equal d, concatenated along rows.
        names: a file name per part for error messages (None for in-memory arrays).
        rows: optional sorted (m,) int64 global rows; the source then shows only those.
    """

    def __init__(self, parts: list[np.ndarray], names: list[str | None], rows: np.ndarray | None = None):
        self.parts = parts
        self.names = names
        # {file name: sampled sha256} already computed by the job that opened the output
        # (fastssl.jobs.sampled_hashes): fingerprint() reuses them instead of reading again
        self.known_hashes: dict[str, str] = {}
        sizes = np.array([p.shape[0] for p in parts], dtype=np.int64)
        self.part_offsets = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum(sizes, out=self.part_offsets[1:])
        self.d = int(parts[0].shape[1])
        self.dtype = np.result_type(*[p.dtype for p in parts])
        if self.dtype == np.float64:
            self.dtype = np.dtype(np.float32)  # the assignment engine computes in float32
        self.rows = rows
        self.total_rows = int(self.part_offsets[-1])

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_data(cls, data: Any, name: str = "data") -> "PointSource":
        if isinstance(data, PointSource):
            return data
        if isinstance(data, (str, os.PathLike)) or (
            isinstance(data, (list, tuple)) and data and isinstance(data[0], (str, os.PathLike))
        ):
            paths = expand_paths(data)
            parts = [_open_shard(p) for p in paths]
            d0 = parts[0].shape[1]
            for p, a in zip(paths, parts):
                if a.shape[1] != d0:
                    raise DataError(p, f"has d={a.shape[1]} but {paths[0]} has d={d0}; "
                                       "all shards must share the embedding dimension")
            return cls(parts, [str(p) for p in paths])
        try:
            import torch

            if isinstance(data, torch.Tensor):
                if data.device.type != "cpu":
                    raise TypeError(f"{name} is a {data.device.type} tensor; KMeans streams "
                                    "host arrays (move it to the CPU or write .npy shards)")
                data = data.detach().numpy()
        except ImportError:  # pragma: no cover
            pass
        if not isinstance(data, np.ndarray):
            raise TypeError(f"{name} must be an (n, d) numpy array/memmap, a CPU tensor or "
                            f".npy shard paths, got {type(data).__name__}")
        if data.ndim != 2 or data.shape[1] == 0:
            raise ValueError(f"{name} must be 2-D (n, d) with d > 0, got shape {data.shape}")
        if data.dtype.type not in _FLOATS:
            raise TypeError(f"{name} has dtype {data.dtype}; expected float16/32/64")
        return cls([data], [None])

    def subset(self, rows: np.ndarray) -> "PointSource":
        """A view of the given rows (indices into this source), sorted."""
        rows = np.sort(np.asarray(rows, dtype=np.int64))
        if self.rows is not None:
            rows = self.rows[rows]
        return PointSource(self.parts, self.names, rows)

    # ------------------------------------------------------------------ properties
    @property
    def n(self) -> int:
        return self.total_rows if self.rows is None else int(self.rows.shape[0])

    @property
    def row_bytes(self) -> int:
        return self.d * max(p.dtype.itemsize for p in self.parts)

    def locate(self, index: int) -> tuple[str | None, int]:
        """(file name or None, row inside it) of a global row of the underlying parts."""
        part = int(np.searchsorted(self.part_offsets, index, side="right")) - 1
        return self.names[part], index - int(self.part_offsets[part])

    def fingerprint(self) -> dict:
        """Identifies the data for resume checks: per part its name, shape, dtype and a
        sha256 of sampled blocks (files: fastssl.jobs.fingerprint_files; arrays: 8 evenly
        spaced row blocks), so re-saved shards with new values are a different run."""
        return {
            "n": self.n, "d": self.d,
            "parts": [[nm or "<array>", int(p.shape[0]), str(p.dtype),
                       self.known_hashes.get(nm) if nm in self.known_hashes else _content_hash(nm, p)]
                      for nm, p in zip(self.names, self.parts)],
            "subset": self.rows is not None,
        }

    # ------------------------------------------------------------------ reading
    def _fix(self, a: np.ndarray) -> np.ndarray:
        a = np.ascontiguousarray(a)  # a contiguous memmap slice stays a view (page cache)
        if a.dtype != self.dtype:
            a = a.astype(self.dtype)
        return a

    def chunks(self, start: int, stop: int, chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, (rows, d) block) over rows [start, stop) of this source."""
        chunk_rows = max(1, int(chunk_rows))
        if self.rows is not None:
            for s in range(start, stop, chunk_rows):
                e = min(stop, s + chunk_rows)
                yield s, self._take_global(self.rows[s:e])
            return
        for part, arr in enumerate(self.parts):
            p0, p1 = int(self.part_offsets[part]), int(self.part_offsets[part + 1])
            lo, hi = max(start, p0), min(stop, p1)
            for s in range(lo, hi, chunk_rows):
                e = min(hi, s + chunk_rows)
                yield s, self._fix(arr[s - p0 : e - p0])

    def _take_global(self, idx: np.ndarray) -> np.ndarray:
        """Rows at sorted global indices of the underlying parts."""
        out = np.empty((idx.shape[0], self.d), dtype=self.dtype)
        bounds = np.searchsorted(idx, self.part_offsets)
        for part, arr in enumerate(self.parts):
            a, b = int(bounds[part]), int(bounds[part + 1])
            if a < b:
                out[a:b] = arr[idx[a:b] - int(self.part_offsets[part])]
        return out

    def take(self, idx: np.ndarray) -> np.ndarray:
        """(len(idx), d) rows at any indices of this source, in the order given."""
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"row indices must lie in [0, {self.n})")
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        glob_idx = sorted_idx if self.rows is None else self.rows[sorted_idx]
        rows = self._take_global(glob_idx)
        out = np.empty_like(rows)
        out[order] = rows
        return out

    def global_index(self, local: np.ndarray) -> np.ndarray:
        """Indices of this view's rows in the underlying parts."""
        local = np.asarray(local, dtype=np.int64)
        return local if self.rows is None else self.rows[local]
