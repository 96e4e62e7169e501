"""``fastssl prepare``: convert every radiograph once into memory-mapped ``.npy`` shards.

Layout of a cache directory::

    manifest.json        size, dtype, resize, shard count, the config; "complete" at the end
    shard_00000.npy      (n, S, S) uint8|uint16, n = shard_size except in the last shard
    parts/shard_00000.json   the index rows and rejects of that shard (its "done" marker)
    index.csv            row, shard, offset, study_id, subject_id, dicom_id, view,
                         view_position, split, the 14 CheXpert labels, path
    rejects.csv          path, reason

The plan (which image goes to which shard slot) is fixed before any work, from the
sorted study table, so a shard always holds the same images: a rerun skips every shard
whose ``.npy`` and part file exist and redoes only the rest. Every file is written
under a temporary name and renamed, so a killed run loses at most the shards in
progress. A slot whose image failed stays zero and is absent from index.csv; the file
and the reason go to rejects.csv and the run goes on.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fastssl.config import NONNEG, SEED, Range, add_dataclass_arguments, check_settings, config_from_args, setting
from fastssl.data.dicom import VOI_MODES
from fastssl.data.mimic import CHEXPERT_LABELS, FRONTAL_VIEWS, LABEL_POLICIES, LATERAL_VIEWS, StudyTable
from fastssl.data.sources import (SOURCE_KINDS, SourceSpec, TableOptions, load_sources, parse_holdout, parse_source,
                                  parse_views)
from fastssl.errors import DataError
from fastssl.atomic import atomic_save_npy, atomic_write_csv, atomic_write_json

__all__ = [
    "prepare_cache", "read_index", "read_manifest", "pixel_stats", "open_shard", "fit_square", "CacheIndex",
    "INDEX_COLUMNS", "FORMAT_VERSION",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: dataset, view_source and other_labels columns (1 is still read)
DTYPES = {"uint8": 255, "uint16": 65535}
RESIZE_MODES = ("pad", "crop")
INDEX_COLUMNS = ["row", "shard", "offset", "dataset", "study_id", "subject_id", "dicom_id", "view",
                 "view_position", "view_source", "split", *CHEXPERT_LABELS, "other_labels", "path"]
# Columns a format-1 cache lacks, read as "".
_V2_COLUMNS = ("dataset", "view_source", "other_labels")
# Test hook: SIGKILL this process after writing that many shards (simulates a killed job).
_KILL_ENV = "FASTSSL_PREPARE_KILL_AFTER_SHARDS"


def shard_name(k: int) -> str:
    return f"shard_{k:05d}.npy"


# ---------------------------------------------------------------- one image

def fit_square(image: np.ndarray, size: int, mode: str = "pad") -> np.ndarray:
    """(H, W) float in [0, 1] -> (size, size) float32, aspect kept.

    mode "pad": scale the longer side to ``size`` and centre it on black (0) padding;
    mode "crop": take the centred square of side min(H, W), then scale it.
    Downscaling is antialiased (Pillow's bilinear filter widens with the scale factor).
    """
    from PIL import Image

    h, w = image.shape
    if mode == "crop":
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        image = image[top:top + side, left:left + side]
        h = w = side
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32), mode="F")
    # reducing_gap: a box pre-reduction for large factors, ~3x faster on 3000 px films
    # and indistinguishable at 256 px.
    small = np.asarray(pil.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=3.0))
    if (nh, nw) == (size, size):
        return np.clip(small, 0.0, 1.0)
    out = np.zeros((size, size), dtype=np.float32)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = np.clip(small, 0.0, 1.0)
    return out


def _convert(task: tuple) -> tuple[np.ndarray | None, str, float, float]:
    """Pool worker: (path, size, dtype, resize, voi, pixel hints) -> (quantised (S, S)
    image or None, reject reason, sum, sum of squares of the [0, 1] values). Never
    raises: a failure is a reason string."""
    from fastssl.data.images import read_image

    path, size, dtype, resize, voi, hints = task
    try:
        image = read_image(path, voi=voi, hints=hints)
        small = fit_square(image, size, resize)
        q = np.rint(small * DTYPES[dtype]).astype(dtype)
        scaled = q.astype(np.float64) / DTYPES[dtype]
        return q, "", float(scaled.sum()), float(np.square(scaled).sum())
    except DataError as exc:
        return None, exc.reason, 0.0, 0.0
    except Exception as exc:  # one bad file must not end a run over 377k files
        return None, f"{type(exc).__name__}: {exc}", 0.0, 0.0


def _worker_init() -> None:
    # The parent handles Ctrl-C; workers die with the pool instead of printing tracebacks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ---------------------------------------------------------------- the job

def _plan(table: StudyTable) -> list[tuple[str, dict]]:
    """(path to read, index fields) for every image, in cache order."""
    plan = []
    for study in table.studies:
        labels = [int(v) for v in study.labels]
        for rec in study.images():
            fields = dict(dataset=study.dataset, study_id=study.study_id, subject_id=study.subject_id,
                          dicom_id=rec.dicom_id, view=rec.view, view_position=rec.view_position,
                          view_source=rec.view_source, split=study.split, labels=labels,
                          other_labels=study.other_labels, path=rec.path, pixel=[list(h) for h in rec.pixel])
            plan.append((os.path.join(table.root, rec.path), fields))
    return plan


def _plan_sha(plan: list[tuple[str, dict]]) -> str:
    digest = hashlib.sha256()
    for _, fields in plan:
        digest.update(json.dumps(fields, sort_keys=True).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def _index_row(k: int, offset: int, fields: dict) -> list:
    return [k, offset, fields["dataset"], fields["study_id"], fields["subject_id"], fields["dicom_id"],
            fields["view"], fields["view_position"], fields["view_source"], fields["split"], *fields["labels"],
            fields["other_labels"], fields["path"]]


def _shard_done(out: str, k: int, n: int, config: dict) -> bool:
    part = os.path.join(out, "parts", f"shard_{k:05d}.json")
    npy = os.path.join(out, shard_name(k))
    if not (os.path.isfile(part) and os.path.isfile(npy)):
        return False
    try:
        with open(part, encoding="utf-8") as handle:
            meta = json.load(handle)
        arr = np.load(npy, mmap_mode="r")
    except (OSError, ValueError):
        return False  # unreadable leftovers are redone, not trusted
    return (meta.get("plan_sha256") == config["plan_sha256"] and meta.get("n") == n
            and arr.shape == (n, config["size"], config["size"]) and arr.dtype == np.dtype(config["dtype"]))


MAX_SIZE = 16384  # 16384^2 uint16 is 512 MiB per image
MAX_SHARD_SIZE = 1 << 20


@dataclass(frozen=True)
class PrepareConfig:
    """The checked settings of :func:`prepare_cache` (``fastssl prepare``'s flags; each is
    declared once here: type, default, allowed values, help)."""

    size: int = setting(256, range=Range(8, MAX_SIZE, integer=True))  # side of the stored square images
    dtype: str = setting("uint8", choices=tuple(sorted(DTYPES)))  # stored pixel type
    resize: str = setting("pad", choices=RESIZE_MODES)  # keep the aspect ratio by padding (whole film) or by a centred square crop
    shard_size: int = setting(1024, range=Range(1, MAX_SHARD_SIZE, integer=True))  # images per .npy shard
    workers: int | None = setting(None, range=NONNEG)  # conversion processes (default: all usable cores); 0 = this process (as is 1)
    voi: str = setting("auto", choices=VOI_MODES)  # VOI: LUT/window from the file or the dataset's CSV (auto), full stored range (none), image min..max
    uncertain: str = setting("zeros", choices=tuple(sorted(LABEL_POLICIES)))  # uncertain (-1) CheXpert labels become 0, 1 or -1 (ignore)
    blank: str = setting("zeros", choices=tuple(sorted(LABEL_POLICIES)))  # blank CheXpert labels become 0, 1 or -1 (ignore)
    label_source: str = setting("chexpert", choices=("chexpert", "negbio"))  # which MIMIC-CXR labels CSV to read
    seed: int | None = setting(None, range=SEED)  # seed of the patient-level hash split (default: the unseeded hash)
    labels_csv: str | None = None  # your labels for a dicom-scan (study_id + the 14 CheXpert columns) or chexpert-plus (path_to_image + the 14) source
    split_csv: str | None = None  # your split for a dicom-scan source: subject_id (or study_id) + split
    holdout: tuple[float, float] = setting((0.05, 0.05), parse=parse_holdout)  # validate,test patient fractions for datasets without an official split
    frontal_order: tuple[str, ...] = setting(FRONTAL_VIEWS, parse=parse_views)  # frontal ViewPositions, preferred first (comma-separated)
    lateral_views: tuple[str, ...] = setting(LATERAL_VIEWS, parse=parse_views)  # lateral ViewPositions (comma-separated)
    scan: bool | None = None  # scan the DICOM headers of a bare DIR, ignoring its CSVs (--no-scan: read its MIMIC-CXR CSVs; default: the CSVs when it has them)
    overwrite: bool = False  # replace a cache in --out that was built with other settings

    def __post_init__(self) -> None:
        check_settings(self)


SETTINGS = PrepareConfig   # the dataclass declaring this command's settings (fastssl.config)


def _check_settings(out: str, config: PrepareConfig) -> int:
    """--out checked before any work (the settings were, by PrepareConfig), a one-line error
    naming the flag; returns the number of workers."""
    workers = config.workers
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} is a file; expected a directory (created if missing)")
    from fastssl.distributed import usable_cores   # the one "all cores" count (CPU affinity)

    return usable_cores() if workers is None else workers


def build_table(source, options: TableOptions, scan: bool | None = None) -> StudyTable:
    """``source`` (a directory, "KIND:DIR", or a list of them) -> the (pooled) table.
    ``scan`` True/False forces a bare directory to dicom-scan / mimic-dicom."""
    specs = [source] if isinstance(source, (str, os.PathLike, SourceSpec)) else list(source)
    specs = [parse_source(s) for s in specs]
    if scan is not None:
        kind = "dicom-scan" if scan else "mimic-dicom"
        specs = [SourceSpec(kind, s.root) if s.kind == "auto" else s for s in specs]
    table = load_sources(specs, options)
    if not any(True for _ in table.images()):  # an empty cache would "succeed" and fail later, far from the cause
        what = "DICOM study" if all(s.kind in ("auto", "dicom-scan", "mimic-dicom") for s in specs) else "study"
        listed = f"; {len(table.rejects)} files or rows rejected, first: {table.rejects[0]}" if table.rejects else ""
        raise DataError(", ".join(str(s.root) for s in specs), f"no usable {what}, no images found{listed}; "
                                                                "nothing to prepare")
    return table


def prepare_cache(source, out: str | os.PathLike, config: PrepareConfig | None = None, *, progress: bool = True,
                  table: StudyTable | None = None, **overrides) -> dict[str, Any]:
    """Convert every image of one or more datasets once into a shard cache.

    Args:
        source: a dataset root, "KIND:DIR" (kinds in :mod:`fastssl.data.sources`), or a
            list of them, pooled into one cache with a ``dataset`` column. A bare
            directory is read with its MIMIC-CXR CSVs when it has them, else scanned.
        out: cache directory (created).
        config: a :class:`PrepareConfig` (every setting: its default and allowed values);
            the keyword settings below replace its fields.
        size: side S of the stored square images.
        dtype: "uint8" or "uint16" (the [0, 1] image times 255 or 65535, rounded).
        resize: "pad" (keep the whole film, black bars) or "crop" (centred square).
        shard_size: images per ``shard_XXXXX.npy`` (n, S, S).
        workers: conversion processes (default: all usable cores); 0 = this process (as is 1).
        voi: "auto" | "none" | "minmax", for DICOM (:func:`read_dicom`) and PNG/JPEG
            (:func:`fastssl.data.images.read_image`).
        uncertain, blank, label_source, frontal_order, lateral_views: study table options.
        scan: force (True) or forbid (False) the header scan of a bare directory.
        overwrite: replace a cache built with other settings (else a ValueError).
        progress: a tqdm bar (only when stderr is a terminal).
        table: a ready StudyTable (then source is only recorded).
        holdout, seed: (validate, test) patient fractions and the seed of the hash split
            for datasets without an official split.
        labels_csv, split_csv: the user's labels / split for a scanned DICOM tree.
    Returns:
        Summary dict: images, written, rejects, shards, shards_skipped, seconds,
        images_per_s, pixel_mean, pixel_std, out, datasets.
    Raises:
        ValueError: a bad argument, or an existing cache with other settings.
        DataError: unreadable CSVs, or no image at all in the sources.
    """
    cfg = PrepareConfig(**{**asdict(config or PrepareConfig()), **overrides})
    out = os.fspath(out)
    workers = _check_settings(out, cfg)
    options = TableOptions(uncertain=cfg.uncertain, blank=cfg.blank, label_source=cfg.label_source,
                           frontal_order=cfg.frontal_order, lateral_views=cfg.lateral_views, workers=workers,
                           holdout=cfg.holdout, seed=cfg.seed,
                           labels_csv=os.fspath(cfg.labels_csv) if cfg.labels_csv else None,
                           split_csv=os.fspath(cfg.split_csv) if cfg.split_csv else None)
    # The settings that change a shard's bytes or the index's rows (with the plan's hash).
    settings = dict(format_version=FORMAT_VERSION, size=cfg.size, dtype=cfg.dtype, resize=cfg.resize,
                    shard_size=cfg.shard_size, voi=cfg.voi, uncertain=cfg.uncertain, blank=cfg.blank,
                    label_source=cfg.label_source, frontal_order=list(cfg.frontal_order),
                    lateral_views=list(cfg.lateral_views))
    from fastssl.jobs import JobFingerprint, fingerprint_files, open_job

    job: dict[str, Any] = {}

    def fingerprint() -> JobFingerprint:
        # under the output lock: the study table and its plan decide the run's identity
        job["table"] = build_table(source, options, cfg.scan) if table is None else table
        job["start"] = time.perf_counter()
        log.info("study table: %s", job["table"].format_summary().replace("\n", "; "))
        job["plan"] = plan = _plan(job["table"])
        n_shards = (len(plan) + cfg.shard_size - 1) // cfg.shard_size
        job["config"] = dict(settings, n_images=len(plan), n_shards=n_shards, plan_sha256=_plan_sha(plan))
        return JobFingerprint("prepare", job["config"], fingerprint_files(sorted(set(job["table"].inputs))))

    with open_job(out, fingerprint, overwrite=cfg.overwrite, stale=("parts",)):  # resume, refuse or start
        os.makedirs(os.path.join(out, "parts"), exist_ok=True)
        sources = [str(x) for x in ([source] if isinstance(source, (str, os.PathLike)) else source)]
        return _prepare_table(job, out, sources, workers, progress)


def _prepare_table(job: dict, out: str, sources: list[str], workers: int, progress: bool) -> dict[str, Any]:
    """prepare_cache's work on an opened --out: ``job`` holds the study table, its plan, the
    settings that name the run (config) and the start time."""
    start, table, plan, config = job["start"], job["table"], job["plan"], job["config"]
    size, shard_size, n_shards = config["size"], config["shard_size"], config["n_shards"]
    datasets = sorted({st.dataset for st in table.studies})
    about = dict(source=os.path.abspath(table.root) if table.root else "", datasets=datasets, sources=sources)
    manifest_path = os.path.join(out, "manifest.json")
    atomic_write_json(manifest_path, dict(config, **about, complete=False))
    bounds = [(k * shard_size, min(len(plan), (k + 1) * shard_size)) for k in range(n_shards)]
    todo = [k for k, (a, b) in enumerate(bounds) if not _shard_done(out, k, b - a, config)]
    if n_shards - len(todo):
        log.info("%s: %d of %d shards already done, skipped", out, n_shards - len(todo), n_shards)
    tasks = [(plan[i][0], size, config["dtype"], config["resize"], config["voi"],
              tuple(map(tuple, plan[i][1]["pixel"]))) for k in todo for i in range(*bounds[k])]
    _convert_shards(out, plan, bounds, todo, tasks, config, workers, progress)
    written, rejected, mean, std = _merge_parts(out, n_shards, table.rejects, size)
    if not written:  # an empty cache would only fail later, in pretrain or probe
        raise DataError(out, f"none of the {len(plan)} images could be read; the reasons are in rejects.csv")
    seconds = time.perf_counter() - start
    summary = dict(
        out=out, images=len(plan), written=written, rejects=rejected, shards=n_shards,
        shards_skipped=n_shards - len(todo), seconds=round(seconds, 3),
        images_per_s=round(len(tasks) / seconds, 1) if seconds > 0 else 0.0,
        pixel_mean=round(mean, 6), pixel_std=round(std, 6), workers=workers, datasets=datasets,
    )
    atomic_write_json(manifest_path, dict(config, **about, complete=True, written=written, rejects=rejected,
                                          pixel_mean=summary["pixel_mean"], pixel_std=summary["pixel_std"]))
    return summary


def _convert_shards(out: str, plan: list, bounds: list, todo: list[int], tasks: list, config: dict,
                    workers: int, progress: bool) -> None:
    """Read, resize and store the images of the shards in ``todo``; each shard's part
    file (its index rows and rejects) is written last, marking it done."""
    from tqdm import tqdm

    size, dtype = config["size"], config["dtype"]
    kill_after = int(os.environ.get(_KILL_ENV, "0") or 0)
    bar = tqdm(total=len(tasks), unit="img", desc="prepare", dynamic_ncols=True,
               disable=not progress or not sys.stderr.isatty())
    written = 0
    pool = None
    try:
        if workers > 1 and len(tasks) > 1:
            pool = multiprocessing.get_context().Pool(min(workers, len(tasks)), initializer=_worker_init)
            results = pool.imap(_convert, tasks, chunksize=max(1, min(16, len(tasks) // (8 * workers))))
        else:
            results = map(_convert, tasks)
        for k in todo:  # imap keeps task order, so shards complete one after another
            a, b = bounds[k]
            shard = np.zeros((b - a, size, size), dtype=dtype)
            rows, rejects, s1, s2 = [], [], 0.0, 0.0
            for i in range(a, b):
                image, reason, t1, t2 = next(results)
                bar.update(1)
                path, fields = plan[i]
                if image is None:
                    rejects.append([path, reason])
                    continue
                shard[i - a] = image
                rows.append(_index_row(k, i - a, fields))
                s1, s2 = s1 + t1, s2 + t2
            atomic_save_npy(os.path.join(out, shard_name(k)), shard)
            atomic_write_json(os.path.join(out, "parts", f"shard_{k:05d}.json"), dict(
                plan_sha256=config["plan_sha256"], n=b - a, rows=rows, rejects=rejects,
                pixel_sum=s1, pixel_sumsq=s2))
            written += 1
            if kill_after and written >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()


def _merge_parts(out: str, n_shards: int, table_rejects: list, size: int) -> tuple[int, int, float, float]:
    """All parts -> index.csv and rejects.csv; returns (written, rejected, pixel mean, std)."""
    index_rows, reject_rows, s1, s2 = [], [list(r) for r in table_rejects], 0.0, 0.0
    for k in range(n_shards):
        with open(os.path.join(out, "parts", f"shard_{k:05d}.json"), encoding="utf-8") as handle:
            part = json.load(handle)
        for row in part["rows"]:
            index_rows.append([len(index_rows), *row])
        reject_rows.extend(part["rejects"])
        s1, s2 = s1 + part["pixel_sum"], s2 + part["pixel_sumsq"]
    atomic_write_csv(os.path.join(out, "index.csv"), INDEX_COLUMNS, index_rows)
    atomic_write_csv(os.path.join(out, "rejects.csv"), ["path", "reason"], reject_rows)
    n_px = max(1, len(index_rows)) * size * size
    mean = s1 / n_px
    return len(index_rows), len(reject_rows), mean, float(np.sqrt(max(0.0, s2 / n_px - mean * mean)))


# ---------------------------------------------------------------- reading a cache

def read_manifest(cache_dir: str | os.PathLike) -> dict:
    path = os.path.join(os.fspath(cache_dir), "manifest.json")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise DataError(path, "no manifest.json: not a fastssl cache (run `fastssl prepare`)") from None
    except (OSError, ValueError) as exc:
        raise DataError(path, f"unreadable manifest ({exc})") from None


def pixel_stats(manifest: dict, mean: float | None = -1.0, std: float | None = -1.0) -> tuple[float, float]:
    """The (mean, std) that normalise [0, 1] pixels: the one rule of pretraining, export,
    evaluation and plots. An explicit ``mean`` >= 0 / ``std`` > 0 (``--pixel-mean`` /
    ``--pixel-std``) wins; else the cache manifest's ``pixel_mean`` / ``pixel_std``; else
    0.5 / 0.25 (also for a recorded std of 0, which cannot divide)."""
    if mean is None or mean < 0:
        mean = manifest.get("pixel_mean", 0.5)
    if std is None or std <= 0:
        std = float(manifest.get("pixel_std", 0.25)) or 0.25
    return float(mean), float(std)


@dataclass
class CacheIndex:
    """index.csv as arrays (one entry per stored image, in index order).

    shard, offset: (n,) int32; labels: (n, 14) int8; the string columns are numpy
    unicode arrays (fixed width, never pickled objects). ``dataset``, ``view_source``
    and ``other_labels`` are "" in a format-1 cache.
    """

    cache_dir: str
    manifest: dict
    shard: np.ndarray
    offset: np.ndarray
    study_id: np.ndarray
    subject_id: np.ndarray
    dicom_id: np.ndarray
    view: np.ndarray
    view_position: np.ndarray
    split: np.ndarray
    labels: np.ndarray
    path: np.ndarray
    dataset: np.ndarray | None = None
    view_source: np.ndarray | None = None
    other_labels: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.shard.size)

    def select(self, split=None, dataset=None) -> np.ndarray:
        """(n,) bool: rows in ``split`` and ``dataset`` (each a name, a list of names, or
        None for all). ValueError names a dataset this cache does not hold."""
        mask = np.ones(len(self), dtype=bool)
        if split is not None:
            mask &= np.isin(self.split, [split] if isinstance(split, str) else list(split))
        if dataset is not None:
            wanted = [dataset] if isinstance(dataset, str) else list(dataset)
            have = sorted(set(self.dataset.tolist()))
            missing = [d for d in wanted if d not in have]
            if missing:
                raise ValueError(f"dataset={dataset!r}: {missing} not in this cache (has {have})")
            mask &= np.isin(self.dataset, wanted)
        return mask


_INDEX_CACHE: dict[tuple, CacheIndex] = {}
_INDEX_CACHE_SIZE = 4


def _file_key(path: str) -> tuple:
    try:
        st = os.stat(path)
    except OSError:
        return (path, None)
    return (path, st.st_mtime_ns, st.st_size, st.st_ino)


def read_index(cache_dir: str | os.PathLike) -> CacheIndex:
    """Load a complete cache's index; DataError when the cache is missing or unfinished.

    Parsed once per process and cache state: a run that opens the same cache for every
    epoch's validation (or several datasets) reuses the parsed arrays, which are made
    read-only so that no reader can change another's. A rewritten manifest.json or
    index.csv (new mtime, size or inode) is parsed again."""
    cache_dir = os.fspath(cache_dir)
    index_path = os.path.join(cache_dir, "index.csv")
    key = (os.path.abspath(cache_dir), _file_key(os.path.join(cache_dir, "manifest.json")), _file_key(index_path))
    if key not in _INDEX_CACHE:
        index = _parse_index(cache_dir)
        for value in vars(index).values():
            if isinstance(value, np.ndarray):
                value.setflags(write=False)
        while len(_INDEX_CACHE) >= _INDEX_CACHE_SIZE:
            _INDEX_CACHE.pop(next(iter(_INDEX_CACHE)))
        _INDEX_CACHE[key] = index
    return _INDEX_CACHE[key]


def _parse_index(cache_dir: str) -> CacheIndex:
    manifest = read_manifest(cache_dir)
    path = os.path.join(cache_dir, "index.csv")
    if not manifest.get("complete") or not os.path.isfile(path):
        raise DataError(cache_dir, "cache is not complete; rerun `fastssl prepare` with the same settings")
    version = manifest.get("format_version")
    if version not in (1, FORMAT_VERSION):
        raise DataError(cache_dir, f"cache format {version}, this fastssl reads 1..{FORMAT_VERSION}")
    expected = INDEX_COLUMNS if version == FORMAT_VERSION else [c for c in INDEX_COLUMNS if c not in _V2_COLUMNS]
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header != expected:
            raise DataError(path, f"unexpected columns {header}; expected {expected}")
        rows = list(reader)
    col = {name: i for i, name in enumerate(header)}
    lab = [col[name] for name in CHEXPERT_LABELS]

    def strings(name):
        if name not in col:
            return np.full(len(rows), "", dtype="<U1")
        return np.array([r[col[name]] for r in rows], dtype=str) if rows else np.zeros(0, dtype="<U1")

    return CacheIndex(
        cache_dir=cache_dir, manifest=manifest,
        shard=np.array([int(r[col["shard"]]) for r in rows], dtype=np.int32),
        offset=np.array([int(r[col["offset"]]) for r in rows], dtype=np.int32),
        study_id=strings("study_id"), subject_id=strings("subject_id"), dicom_id=strings("dicom_id"),
        view=strings("view"), view_position=strings("view_position"), split=strings("split"),
        labels=np.array([[int(r[i]) for i in lab] for r in rows], dtype=np.int8).reshape(len(rows), len(lab)),
        path=strings("path"), dataset=strings("dataset"), view_source=strings("view_source"),
        other_labels=strings("other_labels"),
    )


def open_shard(cache_dir: str | os.PathLike, k: int) -> np.ndarray:
    """Shard k memory-mapped read-only: (n, S, S)."""
    path = os.path.join(os.fspath(cache_dir), shard_name(k))
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise DataError(path, f"cannot open shard ({exc})") from None


# ---------------------------------------------------------------- CLI

class _SourcesAction(argparse.Action):
    """--source, repeatable; sources given on the command line replace those of a
    --config file (whose ``source:`` may be one string or a list)."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest, None)
        fresh = current is None or current is self.default or isinstance(current, str)
        setattr(namespace, self.dest, ([] if fresh else list(current)) + [values])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, action=_SourcesAction, metavar="[KIND:]DIR",
                        help="a dataset: KIND is one of " + ", ".join(SOURCE_KINDS) + "; a bare DIR is MIMIC-CXR "
                        "(its CSVs + files/) or any DICOM tree. Repeat to pool datasets into one cache")
    parser.add_argument("--out", required=True, help="cache directory (created; rerun to resume)")
    # --size .. --overwrite: types, defaults, choices, ranges and help from PrepareConfig
    add_dataclass_arguments(parser, PrepareConfig, flags=dict(label_source="--labels"))


def run(args: argparse.Namespace) -> int:
    sources = [args.source] if isinstance(args.source, str) else list(args.source)
    summary = prepare_cache(sources, args.out, config_from_args(PrepareConfig, args), progress=not args.quiet)
    print(
        f"prepare: {summary['written']} of {summary['images']} images in {summary['shards']} shards "
        f"({summary['shards_skipped']} already done), {summary['rejects']} rejected (rejects.csv)\n"
        f"         datasets: {', '.join(summary['datasets'])}\n"
        f"         {summary['seconds']:.1f} s, {summary['images_per_s']:.1f} images/s with "
        f"{summary['workers']} workers; pixel mean {summary['pixel_mean']:.4f} std {summary['pixel_std']:.4f}\n"
        f"         -> {summary['out']}"
    )
    return 0
