"""`fastssl tile`: whole-slide images -> a tile index at a physical resolution.

Output directory (no tile images: `fastssl embed TILES` reads each tile from its slide)::

    tiles.csv      tile,slide,level,x,y,size,mpp   tile = "<slide>/<x>_<y>" (unique); x, y = the
                   tile's top-left corner in level-0 pixels; level = the pyramid level read;
                   size = output side in pixels; mpp = output microns per pixel
    slides.csv     slide,path,mpp,width,height,tiles   (mpp, width, height of level 0)
    rejects.csv    slide,reason                   slides that could not be read (the job goes on)
    parts/         one finished slide = <id>.csv (its tiles) + <id>.json (its slides.csv row)
    job.json       the run's fingerprint (fastssl.jobs): settings + the slide names and sizes

A slide's id is its path relative to SLIDES_DIR without the suffix ("case1/a.svs" -> "case1/a").
The level read is the coarsest whose resolution is not coarser than --mpp (2% slack for
scanners that report 0.2527 for 0.25 µm/px); its region is resampled to --size pixels (PIL,
bilinear with antialiasing), so every tile covers size * mpp microns. Tiles form a grid from
the slide's origin; a tile is kept when the tissue mask covers at least --min-tissue of it.

Tissue mask: Otsu's threshold on the HSV saturation of a thumbnail (longer side
--thumbnail-size pixels), median filtered 7 x 7 first, as CLAM does: background glass is grey
or white, stained tissue is coloured. The threshold is max(Otsu, --min-saturation), so a blank
slide (where Otsu splits noise) gives no tiles.

Resumable per slide: a slide counts as finished when its parts/<id>.json exists (its .csv is
written first, both atomically), so a rerun after a kill redoes only unfinished slides;
rejected slides are retried. Reader: tiffslide (tifffile + zarr, pip-installable on any
platform; SVS, generic pyramidal TIFF, NDPI, SCN, BIF): ``pip install "fastssl[slides]"``.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from fastssl import jobs
from fastssl.config import FRACTION, POSITIVE, SIDE, Range, check_settings, setting
from fastssl.errors import DataError, MissingDependencyError

log = logging.getLogger(__name__)

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif")
TILES_HEADER = ("tile", "slide", "level", "x", "y", "size", "mpp")
SLIDES_HEADER = ("slide", "path", "mpp", "width", "height", "tiles")
LEVEL_SLACK = 1.02  # a level up to 2% coarser than --mpp still counts as "not coarser"


# --------------------------------------------------------------------------- slide reading
def slide_reader():
    """The tiffslide module; MissingDependencyError saying how to install it."""
    try:
        import tiffslide
    except ImportError:
        raise MissingDependencyError("reading whole-slide images needs tiffslide: "
                                     'pip install "fastssl[slides]" (or pip install tiffslide)') from None
    return tiffslide


def open_slide(path: str | os.PathLike):
    """A tiffslide.TiffSlide of ``path``; DataError naming the file when it cannot be read."""
    tiffslide = slide_reader()
    try:
        return tiffslide.TiffSlide(os.fspath(path))
    except Exception as exc:  # tifffile raises many types on a damaged or foreign file
        raise DataError(path, f"cannot open as a slide ({type(exc).__name__}: {exc})") from None


def slide_mpp(slide, path) -> float:
    """Microns per pixel of level 0 (the mean of x and y), from the file's metadata."""
    props = slide.properties
    values = [props.get("tiffslide.mpp-x"), props.get("tiffslide.mpp-y")]
    values = [float(v) for v in values if v is not None]
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise DataError(path, "no microns-per-pixel metadata (mpp-x / resolution tags)")
    return sum(values) / len(values)


def choose_level(mpp0: float, downsamples: Sequence[float], target_mpp: float) -> int:
    """The coarsest pyramid level whose mpp (mpp0 * downsample) is not coarser than
    ``target_mpp`` (LEVEL_SLACK allowed); ValueError if even level 0 is coarser."""
    fitting = [lvl for lvl, ds in enumerate(downsamples) if mpp0 * ds <= target_mpp * LEVEL_SLACK]
    if not fitting:
        raise ValueError(f"level 0 is {mpp0:g} µm/px, coarser than the requested {target_mpp:g}")
    return max(fitting, key=lambda lvl: downsamples[lvl])


def read_tile(slide, level: int, x: int, y: int, size: int, mpp: float, mpp0: float) -> np.ndarray:
    """(size, size, 3) uint8 RGB: the square of side size * mpp microns whose top-left corner
    is level-0 pixel (x, y), read at ``level`` and resampled to ``size`` pixels."""
    from PIL import Image

    side = max(1, round(size * mpp / (mpp0 * float(slide.level_downsamples[level]))))
    region = np.asarray(slide.read_region((int(x), int(y)), int(level), (side, side), as_array=True))
    if region.ndim == 2:
        region = np.repeat(region[:, :, None], 3, axis=2)
    region = np.ascontiguousarray(region[:, :, :3])
    if side != size:
        region = np.asarray(Image.fromarray(region).resize((size, size), Image.Resampling.BILINEAR))
    return region


# --------------------------------------------------------------------------- tissue mask
def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]: the bin edge that maximises the between-class
    variance w0 w1 (m0 - m1)^2; values above it form the upper class."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation (max - min) / max of (H, W, 3) uint8 pixels, in [0, 1] (0 where black)."""
    rgb = rgb.astype(np.float32)
    high, low = rgb.max(axis=2), rgb.min(axis=2)
    return np.where(high > 0, (high - low) / np.maximum(high, 1), 0.0)


def tissue_mask(slide, thumbnail_size: int, min_saturation: float) -> tuple[np.ndarray, float]:
    """(mask (h, w) bool on a thumbnail of the slide, threshold used). Thumbnail pixel (i, j)
    covers level-0 pixels [j W/w, (j+1) W/w) x [i H/h, (i+1) H/h). The saturation is median
    filtered (7 x 7, as CLAM) before Otsu, so that noise on glass does not read as tissue."""
    from PIL import Image, ImageFilter

    thumb = np.asarray(slide.get_thumbnail((thumbnail_size, thumbnail_size)).convert("RGB"))
    sat8 = Image.fromarray(np.rint(saturation(thumb) * 255).astype(np.uint8)).filter(ImageFilter.MedianFilter(7))
    sat = np.asarray(sat8, np.float64) / 255
    threshold = max(otsu_threshold(sat.ravel()), float(min_saturation))
    return sat > threshold, threshold


def tile_grid(mask: np.ndarray, width: int, height: int, step: float, min_tissue: float) -> list[tuple[int, int]]:
    """Level-0 top-left corners (x, y) of the grid tiles of side ``step`` level-0 pixels that lie
    inside the slide and whose tissue fraction (mask pixels whose centre falls in the tile) is
    at least ``min_tissue``; in row-major order. mask: (h, w) bool over the whole slide."""
    h, w = mask.shape
    nx, ny = int(width // step), int(height // step)
    # the grid cell of every mask pixel's centre (level-0 coordinates), -1 outside the grid
    cell_x = np.floor((np.arange(w) + 0.5) * width / w / step).astype(np.int64)
    cell_y = np.floor((np.arange(h) + 0.5) * height / h / step).astype(np.int64)
    cell_x[cell_x >= nx], cell_y[cell_y >= ny] = -1, -1
    cells = np.where((cell_y[:, None] >= 0) & (cell_x[None, :] >= 0), cell_y[:, None] * nx + cell_x[None, :], -1)
    inside = cells >= 0
    counts = np.bincount(cells[inside], minlength=nx * ny)
    tissue = np.bincount(cells[inside], weights=mask[inside].astype(np.float64), minlength=nx * ny)
    keep = np.flatnonzero((counts > 0) & (tissue >= min_tissue * counts))
    return [(round(int(i % nx) * step), round(int(i // nx) * step)) for i in keep]


# --------------------------------------------------------------------------- job
@dataclass
class TileConfig:
    """Settings of a tiling run (defaults are the CLI's)."""

    mpp: float = setting(0.5, range=POSITIVE)  # output resolution in microns per pixel (0.5 is about 20x)
    size: int = setting(224, range=SIDE)  # tile side in output pixels
    min_tissue: float = setting(0.5, range=FRACTION)  # least fraction of a tile the tissue mask must cover
    min_saturation: float = setting(0.05, range=FRACTION)  # floor of the Otsu saturation threshold (a blank slide gives no tiles)
    thumbnail_size: int = setting(1024, range=Range(16, 16384, integer=True))  # longer side in pixels of the thumbnail the tissue mask is computed on (its 7x7 median costs ~1.6 s at 1024, ~6 s at 2048)
    overwrite: bool = False  # replace another run (other settings or slides) found in --out
    quiet: bool = False  # no progress bar

    def __post_init__(self) -> None:
        check_settings(self)


SETTINGS = TileConfig   # the dataclass declaring this command's settings (fastssl.config)


def list_slides(slides_dir: Path) -> list[str]:
    """Slide files under ``slides_dir`` (recursive, by suffix), as sorted relative paths."""
    if not slides_dir.is_dir():
        raise DataError(slides_dir, "not a folder of slides")
    names = sorted(p.relative_to(slides_dir).as_posix() for p in slides_dir.rglob("*")
                   if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES)
    if not names:
        raise DataError(slides_dir, f"no slides ({', '.join(SLIDE_SUFFIXES)}) in this folder")
    return names


def _part_name(slide_id: str) -> str:
    """Flat, collision-free file name of a slide's part files."""
    return hashlib.sha1(slide_id.encode()).hexdigest()[:20]


def _fingerprint(cfg: TileConfig, slides_dir: Path, names: Sequence[str]) -> jobs.JobFingerprint:
    digest = hashlib.sha256()
    for name in names:
        digest.update(f"{name}\t{(slides_dir / name).stat().st_size}\n".encode())
    settings = {k: getattr(cfg, k) for k in ("mpp", "size", "min_tissue", "min_saturation", "thumbnail_size")}
    inputs = {str(slides_dir.resolve()): {"size": len(names), "sha256": digest.hexdigest(), "hashed": "names+sizes"}}
    return jobs.JobFingerprint("tile", settings, inputs)


def _check_config(cfg: TileConfig) -> None:
    check_settings(cfg)   # again: a field may have been changed after construction


def tile_slide(path: Path, slide_id: str, cfg: TileConfig) -> tuple[dict, list[list]]:
    """(slides.csv row as a dict, tiles.csv rows) of one slide; DataError when unreadable."""
    slide = open_slide(path)
    try:
        mpp0 = slide_mpp(slide, path)
        width, height = (int(v) for v in slide.dimensions)
        try:
            level = choose_level(mpp0, [float(d) for d in slide.level_downsamples], cfg.mpp)
        except ValueError as exc:
            raise DataError(path, str(exc)) from None
        mask, threshold = tissue_mask(slide, cfg.thumbnail_size, cfg.min_saturation)
    except DataError:
        raise
    except Exception as exc:  # a damaged pyramid fails on the first read
        raise DataError(path, f"cannot read ({type(exc).__name__}: {exc})") from None
    finally:
        slide.close()
    corners = tile_grid(mask, width, height, cfg.size * cfg.mpp / mpp0, cfg.min_tissue)
    rows = [[f"{slide_id}/{x}_{y}", slide_id, level, x, y, cfg.size, cfg.mpp] for x, y in corners]
    log.info("%s: level %d, saturation threshold %.3f, %d tiles", slide_id, level, threshold, len(rows))
    info = {"slide": slide_id, "path": str(path.resolve()), "mpp": mpp0, "width": width, "height": height,
            "tiles": len(rows)}
    return info, rows


def csv_text(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return text.getvalue()


def _tile_pending(slides_dir: Path, out: Path, names: Sequence[str], cfg: TileConfig) -> list[list[str]]:
    """Tiles every unfinished slide into parts/; returns this run's rejects [slide, reason]."""
    from tqdm import tqdm

    rejects = []
    todo = [n for n in names if not (out / "parts" / f"{_part_name(slide_id(n))}.json").exists()]
    log.info("tile: %d slides, %d to do, %g µm/px, %d px tiles", len(names), len(todo), cfg.mpp, cfg.size)
    for name in tqdm(todo, unit="slide", disable=cfg.quiet or not sys.stderr.isatty()):
        sid = slide_id(name)
        try:
            info, rows = tile_slide(slides_dir / name, sid, cfg)
        except DataError as exc:
            log.warning("rejected %s: %s", name, exc.reason)
            rejects.append([sid, exc.reason])
            continue
        part = out / "parts" / _part_name(sid)
        jobs.atomic_write_text(part.with_suffix(".csv"), csv_text(TILES_HEADER, rows))
        jobs.atomic_write_json(part.with_suffix(".json"), info)  # last: marks the slide finished
    return rejects


def slide_id(name: str) -> str:
    """"case1/a.svs" -> "case1/a"."""
    return name.rsplit(".", 1)[0]


def _merge(out: Path, names: Sequence[str], rejects: list[list[str]]) -> dict:
    """tiles.csv, slides.csv and rejects.csv from the finished slides' parts."""
    tiles, slides = [], []
    for name in names:
        part = out / "parts" / _part_name(slide_id(name))
        if not part.with_suffix(".json").exists():
            continue
        info = json.loads(part.with_suffix(".json").read_text(encoding="utf-8"))
        slides.append([info[k] for k in SLIDES_HEADER])
        with open(part.with_suffix(".csv"), newline="", encoding="utf-8") as handle:
            tiles += list(csv.reader(handle))[1:]
    jobs.atomic_write_text(out / "tiles.csv", csv_text(TILES_HEADER, tiles))
    jobs.atomic_write_text(out / "slides.csv", csv_text(SLIDES_HEADER, slides))
    jobs.atomic_write_text(out / "rejects.csv", csv_text(("slide", "reason"), rejects))
    return {"slides": len(slides), "tiles": len(tiles), "rejected": len(rejects)}


def tile_slides(slides_dir: str | os.PathLike, out_dir: str | os.PathLike, config: TileConfig | None = None,
                **overrides) -> dict:
    """Tiles every slide under ``slides_dir`` into the tile index ``out_dir`` (see the module doc).

    Returns {"slides": finished slides, "tiles": rows of tiles.csv, "rejected": slides rejected}.
    Raises ValueError (a setting), DataError (no slides), ResumeMismatch (out_dir holds a run of
    other settings or slides, unless ``overwrite``), OutputLocked (another job writes out_dir).
    """
    cfg = TileConfig(**{**asdict(config or TileConfig()), **overrides})
    _check_config(cfg)
    slides_dir, out = Path(slides_dir), Path(out_dir)
    names = list_slides(slides_dir)
    slide_reader()  # a missing reader stops the job, it must not reject every slide
    fingerprint = _fingerprint(cfg, slides_dir, names)
    with jobs.open_job(out, fingerprint, overwrite=cfg.overwrite, stale=("parts",)):
        (out / "parts").mkdir(exist_ok=True)
        rejects = _tile_pending(slides_dir, out, names, cfg)
        summary = _merge(out, names, rejects)
    log.info("tile: %d tiles from %d slides (%d rejected) under %s", summary["tiles"], summary["slides"],
             summary["rejected"], out)
    return summary


# --------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    from fastssl.config import add_dataclass_arguments

    parser.add_argument("slides_dir", help=f"folder of whole-slide images ({', '.join(SLIDE_SUFFIXES)}; recursive)")
    parser.add_argument("--out", required=True, help="output folder of the tile index (rerun to resume)")
    add_dataclass_arguments(parser, TileConfig, skip=("quiet",))


def run(args) -> int:
    from fastssl.config import config_from_args

    cfg = config_from_args(TileConfig, args)
    cfg.quiet = bool(getattr(args, "quiet", False))
    summary = tile_slides(args.slides_dir, args.out, cfg)
    print(f"{summary['tiles']} tiles from {summary['slides']} slides ({summary['rejected']} rejected) "
          f"into {Path(args.out) / 'tiles.csv'}")
    return 0


# --------------------------------------------------------------------------- reading an index
@dataclass(frozen=True)
class TileRef:
    """Where one tile of a tile index lies: its slide file, the level read, the level-0 corner."""

    path: str
    level: int
    x: int
    y: int
    size: int
    mpp: float
    slide_mpp: float


def tile_index_path(source: str | os.PathLike) -> Path | None:
    """tiles.csv of a tile index given as the file or its folder; None for anything else."""
    path = Path(source)
    if path.is_dir() and (path / "tiles.csv").is_file():
        return path / "tiles.csv"
    return path if path.is_file() and path.name == "tiles.csv" else None


def read_tile_index(tiles_csv: str | os.PathLike) -> tuple[list[str], list[TileRef]]:
    """(tile names, where each lies) from tiles.csv and the slides.csv beside it."""
    tiles_csv = Path(tiles_csv)
    slides = {}
    for row in _read_rows(tiles_csv.with_name("slides.csv"), SLIDES_HEADER):
        slides[row["slide"]] = (row["path"], float(row["mpp"]))
    names, refs = [], []
    for row in _read_rows(tiles_csv, TILES_HEADER):
        if row["slide"] not in slides:
            raise DataError(tiles_csv, f"tile {row['tile']}: slide {row['slide']!r} is not in slides.csv")
        path, mpp0 = slides[row["slide"]]
        names.append(row["tile"])
        refs.append(TileRef(path, int(row["level"]), int(row["x"]), int(row["y"]), int(row["size"]),
                            float(row["mpp"]), mpp0))
    return names, refs


def _read_rows(path: Path, header: Sequence[str]) -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if tuple(reader.fieldnames or ()) != tuple(header):
                raise DataError(path, f"header {reader.fieldnames} is not {','.join(header)}")
            return list(reader)
    except OSError as exc:
        raise DataError(path, f"cannot read ({exc.strerror})") from None


class SlideCache:
    """Open slides kept for the next tiles (an index is sorted by slide); at most ``keep`` open."""

    def __init__(self, keep: int = 4):
        self.keep, self.open = keep, {}

    def read(self, ref: TileRef) -> np.ndarray:
        """(size, size, 3) uint8 pixels of the tile ``ref``."""
        if ref.path not in self.open:
            if len(self.open) >= self.keep:
                self.open.pop(next(iter(self.open))).close()
            self.open[ref.path] = open_slide(ref.path)
        return read_tile(self.open[ref.path], ref.level, ref.x, ref.y, ref.size, ref.mpp, ref.slide_mpp)

    def __getstate__(self):  # DataLoader workers start with no open files
        return {"keep": self.keep, "open": {}}
