"""Reading curated tiles back: :class:`TileDataset` over a tile table, and cluster exemplar grids.

A tile table is a CSV with at least the columns ``row,source,slide,level,x,y,size,mpp``, as
`fastssl curate` writes ``curated_tiles.csv`` (row = embedding row; source = embed's index.csv
source; slide..mpp from the tile index when the embeddings came from one, empty otherwise;
then cluster_1..cluster_L). A row's pixels come from its slide region (slide set: the slide's
file and level-0 mpp from the tile index's slides.csv) or from the image file ``source``
relative to the folder that was embedded (``file.npy[i]``: row i of an array file).

Exemplar grids (what SDC's notebooks show): for each cluster of a tree level, a PNG of the
tiles closest to the cluster's centroid, closest first, in row-major order. A level's folder
(``<out>/level_L``, so that the grids of several levels live side by side) is opened by
fastssl.jobs.open_job: job.json records the settings and the fingerprints of the tree and of
the embeddings' manifest.json and index.csv; the same command redraws the same PNGs, another
run there is refused, naming the differences, unless ``overwrite``, which empties the folder.
"""
from __future__ import annotations

import csv
import logging
import math
import os
import re
from pathlib import Path
from typing import Callable, Sequence

from dataclasses import dataclass

import numpy as np

from fastssl.config import COUNT, Range, add_dataclass_arguments, check_settings, setting
from fastssl.errors import DataError

log = logging.getLogger(__name__)

TABLE_COLUMNS = ("row", "source", "slide", "level", "x", "y", "size", "mpp")
_ARRAY_ITEM = re.compile(r"^(.+\.npy)\[(\d+)\]$")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Pixels of an image file as stored: (H, W) or (H, W, C) (PNG/JPEG via PIL; .npy as is).
    Modes other than L, RGB and I;16 are converted to RGB."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        return np.load(path, allow_pickle=False)
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        if img.mode not in ("L", "RGB", "I;16"):
            img = img.convert("RGB")
        return np.asarray(img)


def _as_uint8_rgb(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 of grey/RGB(A) pixels (uint16 scaled, floats taken as [0, 1])."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    pixels = pixels[:, :, :3]
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    if pixels.dtype == np.uint16:
        pixels = np.rint(pixels / 257.0)
    elif np.issubdtype(pixels.dtype, np.floating):
        pixels = np.rint(np.clip(pixels, 0, 1) * 255)
    return np.ascontiguousarray(pixels.astype(np.uint8))


def read_table(path: str | os.PathLike) -> list[dict]:
    """Rows of a tile table (dicts of strings); DataError naming a missing column."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in TABLE_COLUMNS if c not in (reader.fieldnames or ())]
            if missing:
                raise DataError(path, f"not a tile table: missing columns {missing}")
            return list(reader)
    except OSError as exc:
        raise DataError(path, f"cannot read ({exc.strerror})") from None


class TileDataset:
    """Map-style dataset over a tile table (e.g. ``<curate out>/curated_tiles.csv``).

    Args:
        table: the CSV path, or its rows as dicts (columns TABLE_COLUMNS at least).
        tiles_root: for slide rows, the tile index folder of `fastssl tile` (its slides.csv
            gives each slide's file and mpp); for file rows, the folder that was embedded
            (sources are relative to it). May be omitted for absolute file sources.
        transform: applied to the (H, W, 3) uint8 pixels (e.g. torchvision transforms after
            PIL.Image.fromarray); None returns the array.
    __getitem__(i) -> (pixels (H, W, 3) uint8 or transform(pixels), row dict with ints for
    row/level/x/y/size and the cluster columns, a float mpp).
    """

    def __init__(self, table: str | os.PathLike | Sequence[dict], tiles_root: str | os.PathLike | None = None,
                 transform: Callable | None = None):
        self.rows = read_table(table) if isinstance(table, (str, os.PathLike)) else [dict(r) for r in table]
        self.tiles_root = Path(tiles_root) if tiles_root is not None else None
        self.transform = transform
        self._slides = None  # slide id -> (path, mpp of level 0), read on first use
        from fastssl.curation.tile import SlideCache

        self._cache = SlideCache()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = _typed(self.rows[i])
        pixels = self.pixels(row)
        return (self.transform(pixels) if self.transform is not None else pixels), row

    def pixels(self, row: dict) -> np.ndarray:
        """(H, W, 3) uint8 pixels of one table row."""
        if row.get("slide"):
            return self._cache.read(self._tile_ref(row))
        source = str(row["source"])
        match = _ARRAY_ITEM.match(source)
        base = self.tiles_root if self.tiles_root is not None else Path()
        if match:
            array = np.load(base / match.group(1), mmap_mode="r", allow_pickle=False)
            return _as_uint8_rgb(np.asarray(array[int(match.group(2))]))
        return _as_uint8_rgb(read_image(base / source))

    def _tile_ref(self, row: dict):
        from fastssl.curation.tile import SLIDES_HEADER, TileRef, _read_rows

        if self._slides is None:
            if self.tiles_root is None or not (self.tiles_root / "slides.csv").is_file():
                raise ValueError("rows read from slides need tiles_root = the tile index folder of "
                                 f"`fastssl tile` (holding slides.csv); got {self.tiles_root}")
            self._slides = {r["slide"]: (r["path"], float(r["mpp"]))
                            for r in _read_rows(self.tiles_root / "slides.csv", SLIDES_HEADER)}
        if row["slide"] not in self._slides:
            raise DataError(self.tiles_root / "slides.csv", f"slide {row['slide']!r} of row {row['row']} is not listed")
        path, mpp0 = self._slides[row["slide"]]
        return TileRef(path, row["level"], row["x"], row["y"], row["size"], row["mpp"], mpp0)


def _typed(row: dict) -> dict:
    """A table row with numbers as numbers (empty slide columns stay "")."""
    out = dict(row)
    for key, value in row.items():
        if value in ("", None) or key in ("source", "slide"):
            continue
        if key == "mpp":
            out[key] = float(value)
        elif key in ("row", "level", "x", "y", "size") or key.startswith("cluster_"):
            out[key] = int(value)
    return out


# --------------------------------------------------------------------------- exemplar grids
def nearest_points(tree, level: int, cluster: int, k: int, points=None) -> np.ndarray:
    """(<= k,) tree point indices under ``cluster`` of ``level`` (1-based), closest to its
    centroid first. Level 1 uses the tree's stored distances (members are sorted by them);
    higher levels need ``points`` (a PointSource of the embeddings, tree point order) and
    compute squared L2 to the level's centroid in float64 over the points under the cluster."""
    lvl = tree.levels[level - 1]
    if not 0 <= cluster < lvl.k:
        raise ValueError(f"cluster {cluster}: level {level} has clusters 0..{lvl.k - 1}")
    if level == 1:
        return np.asarray(lvl.members_of(cluster)[:k], dtype=np.int64)
    if points is None:
        raise ValueError(f"level {level} > 1: the embeddings are needed to rank points by distance")
    under = np.flatnonzero(np.asarray(tree.point_assignments(level)) == cluster)
    centre = np.asarray(lvl.centroids[cluster], np.float64)
    dist = np.empty(under.size, np.float64)
    for start in range(0, under.size, 65536):  # chunks: a top cluster can hold millions of points
        chunk = np.asarray(points.take(under[start:start + 65536]), np.float64)
        dist[start:start + chunk.shape[0]] = ((chunk - centre) ** 2).sum(axis=1)
    order = np.lexsort((under, dist))[:k]  # ties: lower point index first
    return under[order]


def grid_image(tiles: Sequence[np.ndarray], tile_px: int, columns: int | None = None) -> np.ndarray:
    """(rows * tile_px, columns * tile_px, 3) uint8: the tiles resized to tile_px, row-major;
    empty cells white. columns defaults to ceil(sqrt(n))."""
    from PIL import Image

    n = len(tiles)
    columns = columns or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / columns))
    out = np.full((rows * tile_px, columns * tile_px, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        small = np.asarray(Image.fromarray(_as_uint8_rgb(tile)).resize((tile_px, tile_px), Image.Resampling.BILINEAR))
        r, c = divmod(i, columns)
        out[r * tile_px:(r + 1) * tile_px, c * tile_px:(c + 1) * tile_px] = small
    return out


def embedding_table(embed_dir: str | os.PathLike) -> tuple[list[dict], Path | None]:
    """Tile-table rows of every embedding row of `fastssl embed`'s output (index.csv joined
    with the tile index named in manifest.json), and the tiles_root to read them with."""
    from fastssl.curation._source import read_embed_manifest
    from fastssl.curation.tile import TILES_HEADER, _read_rows

    embed_dir = Path(embed_dir)
    manifest = read_embed_manifest(embed_dir)
    index = _read_rows(embed_dir / "index.csv", ("row", "shard", "offset", "source"))
    tile_index = manifest.get("tile_index")
    where = {}
    if tile_index:
        where = {r["tile"]: r for r in _read_rows(Path(tile_index), TILES_HEADER)}
    rows = []
    for r in index:
        t = where.get(r["source"], {})
        rows.append({"row": r["row"], "source": r["source"], **{c: t.get(c, "") for c in TABLE_COLUMNS[2:]}})
    root = Path(tile_index).parent if tile_index else Path(manifest["source"])
    if not tile_index and root.is_file():  # an array file: sources "file.npy[i]" sit beside it
        root = root.parent
    return rows, root


@dataclass(frozen=True)
class GridsConfig:
    """The settings of :func:`write_exemplar_grids` (``fastssl grids``'s flags, declared once)."""

    level: int = setting(1, range=COUNT)  # tree level whose clusters get a grid (1 = finest)
    per_cluster: int = setting(16, range=COUNT)  # tiles per grid, closest to the centroid first
    tile_px: int = setting(96, range=Range(8, 4096, integer=True))  # side of each tile in the grid, in pixels
    overwrite: bool = False  # replace a different run (other settings, tree or embeddings) found in OUT/level_L (otherwise refused)

    def __post_init__(self) -> None:
        check_settings(self)


SETTINGS = GridsConfig   # the dataclass declaring this command's settings (fastssl.config)


def write_exemplar_grids(curate_dir: str | os.PathLike, embed_dir: str | os.PathLike, level: int,
                         per_cluster: int = 16, tile_px: int = 96, out_dir: str | os.PathLike | None = None,
                         clusters: Sequence[int] | None = None, overwrite: bool = False) -> list[Path]:
    """One PNG per cluster of ``level``: its ``per_cluster`` tiles closest to the centroid.

    Reads ``<curate_dir>/tree`` (HierarchicalTree) and the embeddings + tile sources of
    ``embed_dir``; writes ``<out_dir or curate_dir/grids>/level_<L>/cluster_<c>.png``, that
    folder opened by fastssl.jobs.open_job (ResumeMismatch when it holds another run, unless
    ``overwrite``; OutputLocked when another job writes it). Returns the written paths.
    Unreadable tiles are left white and logged.
    """
    from fastssl.curation.tree import HierarchicalTree
    from fastssl.jobs import open_job

    # bad settings fail before any read
    cfg = GridsConfig(level=level, per_cluster=per_cluster, tile_px=tile_px, overwrite=overwrite)
    tree = HierarchicalTree.load(Path(curate_dir) / "tree")
    if not 1 <= level <= len(tree.levels):
        raise ValueError(f"--level {level}: the tree has levels 1..{len(tree.levels)}")
    k = tree.levels[level - 1].k
    clusters = list(range(k)) if clusters is None else [int(c) for c in clusters]
    if not all(0 <= c < k for c in clusters):   # before the folder is opened: a typo leaves no record
        raise ValueError(f"--clusters {','.join(map(str, clusters))}: level {level} has clusters 0..{k - 1}")
    out = Path(out_dir or Path(curate_dir) / "grids") / f"level_{level}"
    # "resume" redraws every PNG: the same settings, tree and embeddings give the same files
    with open_job(out, lambda: _grids_fingerprint(cfg, Path(curate_dir), Path(embed_dir), tree, clusters),
                  overwrite=overwrite):
        return _draw_grids(cfg, Path(curate_dir), Path(embed_dir), tree, clusters, out)


def _grids_fingerprint(cfg: GridsConfig, curate_dir: Path, embed_dir: Path, tree, clusters: list[int]):
    """The grids' identity (fastssl.jobs.JobFingerprint): the settings and clusters drawn, the
    tree files the level's ranking reads (tree.json, the arrays of levels 1..L, its point ids)
    and the embeddings' manifest.json and index.csv (which tile each row is)."""
    from fastssl.jobs import JobFingerprint, fingerprint_files

    root = curate_dir / "tree"
    inputs = [root / "tree.json"]
    inputs += sorted(p for lvl in range(1, cfg.level + 1) for p in (root / f"level_{lvl}").glob("*.npy"))
    if tree.meta.get("point_ids"):
        inputs.append(root / tree.meta["point_ids"])
    inputs += [embed_dir / "manifest.json", embed_dir / "index.csv"]
    settings = dict(level=cfg.level, per_cluster=cfg.per_cluster, tile_px=cfg.tile_px, clusters=clusters)
    return JobFingerprint("grids", settings, fingerprint_files(inputs))


def _draw_grids(cfg: GridsConfig, curate_dir: Path, embed_dir: Path, tree, clusters: list[int],
                out: Path) -> list[Path]:
    """The PNGs of :func:`write_exemplar_grids` into the opened folder ``out`` -> their paths."""
    from fastssl.curation._source import PointSource
    from fastssl.jobs import atomic_write_bytes

    point_ids = np.load(curate_dir / "tree" / tree.meta["point_ids"]) if tree.meta.get("point_ids") else None
    points = PointSource.from_data(str(embed_dir)) if cfg.level > 1 else None
    if points is not None and point_ids is not None:
        points = points.subset(point_ids)
    table, root = embedding_table(embed_dir)
    dataset = TileDataset(table, tiles_root=root)
    written = []
    for c in clusters:
        picked = nearest_points(tree, cfg.level, c, cfg.per_cluster, points)
        rows = picked if point_ids is None else point_ids[picked]
        tiles = [_tile_or_blank(dataset, int(r), cfg.tile_px) for r in rows]
        written.append(out / f"cluster_{c}.png")
        atomic_write_bytes(written[-1], _png_bytes(grid_image(tiles, cfg.tile_px)))
    return written


def _tile_or_blank(dataset: TileDataset, row: int, tile_px: int) -> np.ndarray:
    try:
        return dataset[row][0]
    except (DataError, OSError, ValueError) as exc:
        log.warning("embedding row %d: tile unreadable (%s); left white", row, exc)
        return np.full((tile_px, tile_px, 3), 255, np.uint8)


def _png_bytes(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------- CLI (fastssl grids)
def add_arguments(parser) -> None:
    parser.add_argument("curate_dir", help="output folder of `fastssl curate` (holding tree/)")
    parser.add_argument("--embeddings", required=True,
                        help="output folder of `fastssl embed` that the tree was built on (its index.csv, "
                             "manifest.json and shards: the tiles' sources and the points)")
    add_dataclass_arguments(parser, GridsConfig)   # --level, --per-cluster, --tile-px, --overwrite
    parser.add_argument("--clusters", default=None,
                        help="comma list of cluster ids (default: every cluster of the level)")
    parser.add_argument("--out", default=None, help="output folder (default: CURATE_DIR/grids)")


def run(args) -> int:
    clusters = None
    if args.clusters:
        try:
            clusters = [int(c) for c in str(args.clusters).split(",") if c.strip()]
        except ValueError:
            raise ValueError(f"--clusters {args.clusters!r}: expected a comma list of integers") from None
    paths = write_exemplar_grids(args.curate_dir, args.embeddings, args.level, args.per_cluster, args.tile_px,
                                 args.out, clusters, overwrite=args.overwrite)
    print(f"{len(paths)} grids ({args.per_cluster} tiles each) under {paths[0].parent if paths else args.out}")
    return 0
