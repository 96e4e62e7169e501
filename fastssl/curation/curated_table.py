"""The per-tile table of a curated subset: ``curated_tiles.csv`` (issue 21 §3).

One line per selected tile, in embedding-row order, header exactly::

    row,source,slide,level,x,y,size,mpp,cluster_1,...,cluster_L

``row`` is the tile's row in the embeddings; ``source`` its ``source`` in the embed
``index.csv`` (empty when the embeddings have no index.csv); ``slide,level,x,y,size,mpp``
come from the tile index (``tiles.csv``, header ``tile,slide,level,x,y,size,mpp``, named by
the embed manifest's ``"tile_index"``, joined on ``tile == source``) and are empty when the
embeddings were not made from one; ``cluster_l`` is the tile's cluster at level l (1 =
finest).

Scale (350M embedded tiles, a curated tenth): index.csv is read once, skipping to the
selected lines in C (``itertools.islice``); tiles.csv is read once, in chunks, joined by a
dict over the selected tiles only (about 150 bytes per selected tile); clusters are
gathered level by level for the selected points only; the CSV is written in chunks to a
temporary name, then renamed.
"""
from __future__ import annotations

import csv
import itertools
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from fastssl.errors import DataError

log = logging.getLogger(__name__)

__all__ = ["CURATED_TABLE", "TILE_INDEX_HEADER", "selected_clusters", "write_curated_table"]

CURATED_TABLE = "curated_tiles.csv"
TILE_INDEX_HEADER = ("tile", "slide", "level", "x", "y", "size", "mpp")
_TILE_FIELDS = TILE_INDEX_HEADER[1:]
_CHUNK = 1 << 18  # lines per read or write block


def selected_clusters(tree, points: np.ndarray) -> np.ndarray:
    """(m, L) int64 cluster of every selected point at every level (column 0 = level 1).

    points: (m,) int64 tree point indices; only their labels are gathered, level by level.
    """
    labels = np.asarray(tree.levels[0].assignments[np.asarray(points, dtype=np.int64)],
                        dtype=np.int64)
    out = [labels]
    for level in tree.levels[1:]:
        labels = np.asarray(level.assignments[labels], dtype=np.int64)
        out.append(labels)
    return np.stack(out, axis=1) if out else np.zeros((len(points), 0), np.int64)


def read_sources(index_csv: Path, rows: np.ndarray) -> list[str]:
    """index.csv's ``source`` of each of the sorted ``rows`` (embed writes one line per
    row, in row order; each selected line's ``row`` field is checked against it)."""
    with open(index_csv, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header or header[0] != "row" or "source" not in header:
            raise DataError(index_csv, f"expected columns row,...,source, got {header}")
        col = header.index("source")
        out, at = [], 0
        for r in np.asarray(rows, dtype=np.int64).tolist():
            line = next(itertools.islice(reader, r - at, None), None)  # skips in C
            if line is None or not line[0].isdigit() or int(line[0]) != r:
                got = "the end of the file" if line is None else f"row {line[0]!r}"
                raise DataError(index_csv, f"line {r + 2} holds {got}, expected row {r} "
                                           "(rows must be listed in order)")
            out.append(line[col])
            at = r + 1
    return out


def tile_index_for(index_csv: Path | None) -> Path | None:
    """The tiles.csv named by the embed manifest beside index.csv (key "tile_index")."""
    if index_csv is None:
        return None
    from fastssl.curation._source import read_embed_manifest

    manifest = read_embed_manifest(index_csv.parent, missing_ok=True)
    path = manifest.get("tile_index") if manifest is not None else None
    return Path(path) if path else None


def join_tiles(tiles_csv: Path, sources: Sequence[str]) -> list[tuple[str, ...]]:
    """(slide, level, x, y, size, mpp) of every source, from tiles.csv (one pass)."""
    wanted = {s: i for i, s in enumerate(sources)}
    found: list[tuple[str, ...] | None] = [None] * len(sources)
    try:
        with open(tiles_csv, newline="", encoding="utf-8") as handle:
            header = tuple(next(csv.reader([handle.readline()]), ()))
            if header != TILE_INDEX_HEADER:
                raise DataError(tiles_csv, f"header is {','.join(header)!r}, expected "
                                           f"{','.join(TILE_INDEX_HEADER)!r}")
            # Most lines are not curated: their key is cut at the first comma and only
            # the matches (and quoted keys) go through the csv parser (~5x faster).
            while chunk := handle.readlines(1 << 24):
                for line in chunk:
                    key = line.split(",", 1)[0] if line[:1] != '"' else None
                    if key is not None and key not in wanted:
                        continue
                    fields = next(csv.reader([line]), None)
                    i = wanted.get(fields[0]) if fields else None
                    if i is not None:
                        found[i] = tuple(fields[1:7])
    except (OSError, csv.Error) as exc:
        raise DataError(tiles_csv, f"cannot read the tile index ({exc})") from None
    missing = [s for s, f in zip(sources, found) if f is None]
    if missing:
        raise DataError(tiles_csv, f"{len(missing)} of {len(sources)} curated tiles are not in "
                                   f"the tile index (first: {missing[0]!r})")
    return found  # type: ignore[return-value]


def write_curated_table(path: str | os.PathLike, rows: np.ndarray, clusters: np.ndarray,
                        sources: Sequence[str] | None = None,
                        tiles: Sequence[tuple[str, ...]] | None = None) -> Path:
    """Writes curated_tiles.csv (see the module doc) atomically, in chunks.

    Args:
        rows: (m,) int64 embedding rows, ascending. clusters: (m, L) int64.
        sources: m index.csv sources, or None (empty column).
        tiles: m (slide, level, x, y, size, mpp) string tuples, or None (empty columns).
    """
    from fastssl.atomic import atomic_writer

    rows = np.asarray(rows, dtype=np.int64)
    clusters = np.asarray(clusters, dtype=np.int64)
    if clusters.shape[0] != rows.shape[0]:
        raise ValueError(f"clusters has {clusters.shape[0]} rows for {rows.shape[0]} tiles")
    header = ["row", "source", *_TILE_FIELDS] + [f"cluster_{l + 1}" for l in range(clusters.shape[1])]
    blank = ("",) * len(_TILE_FIELDS)

    with atomic_writer(path, "w") as handle:
        out = csv.writer(handle, lineterminator="\n")
        out.writerow(header)
        for a in range(0, rows.shape[0], _CHUNK):
            b = min(rows.shape[0], a + _CHUNK)
            out.writerows(
                (r, sources[a + j] if sources is not None else "",
                 *(tiles[a + j] if tiles is not None else blank), *c)
                for j, (r, c) in enumerate(zip(rows[a:b].tolist(), clusters[a:b].tolist())))
    return Path(path)
