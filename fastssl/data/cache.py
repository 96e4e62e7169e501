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
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from fastssl.data.mimic import (
    CHEXPERT_LABELS,
    FRONTAL_VIEWS,
    LATERAL_VIEWS,
    LABEL_POLICIES,
    StudyTable,
    find_csv,
    load_mimic_csv,
    scan_dicom_tree,
)
from fastssl.errors import DataError

__all__ = [
    "prepare_cache", "read_index", "read_manifest", "open_shard", "fit_square", "CacheIndex",
    "INDEX_COLUMNS", "FORMAT_VERSION",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DTYPES = {"uint8": 255, "uint16": 65535}
RESIZE_MODES = ("pad", "crop")
INDEX_COLUMNS = ["row", "shard", "offset", "study_id", "subject_id", "dicom_id", "view",
                 "view_position", "split", *CHEXPERT_LABELS, "path"]
# Settings that change the bytes of a shard or the rows of the index: a rerun must match.
_CONFIG_KEYS = ("format_version", "size", "dtype", "resize", "shard_size", "voi", "uncertain",
                "blank", "label_source", "frontal_order", "lateral_views", "n_images", "n_shards",
                "plan_sha256")
# Test hook: SIGKILL this process after writing that many shards (simulates a killed job).
_KILL_ENV = "FASTSSL_PREPARE_KILL_AFTER_SHARDS"


def shard_name(k: int) -> str:
    return f"shard_{k:05d}.npy"


# ---------------------------------------------------------------- atomic writers

def _replace_atomically(path: str, write) -> None:
    """Write via ``write(handle)`` to a temporary sibling, fsync, then rename over path."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_json(path: str, data: Any) -> None:
    _replace_atomically(path, lambda h: h.write(json.dumps(data, indent=1, sort_keys=True).encode()))


def _write_csv(path: str, header: Sequence[str], rows) -> None:
    def write(handle):
        text = io.TextIOWrapper(handle, encoding="utf-8", newline="")
        writer = csv.writer(text)
        writer.writerow(header)
        writer.writerows(rows)
        text.flush()
        text.detach()  # leave the binary handle open for the fsync

    _replace_atomically(path, write)


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


def _convert(task: tuple[str, int, str, str, str]) -> tuple[np.ndarray | None, str, float, float]:
    """Pool worker: path -> (quantised (S, S) image or None, reject reason, sum, sum of
    squares of the [0, 1] values). Never raises: a failure is a reason string."""
    from fastssl.data.dicom import read_dicom

    path, size, dtype, resize, voi = task
    try:
        image, _ = read_dicom(path, voi=voi)
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
    """(absolute path, index fields) for every image, in cache order."""
    plan = []
    for _, study in enumerate(table.studies):
        labels = [int(v) for v in study.labels]
        for rec in study.images():
            fields = dict(study_id=study.study_id, subject_id=study.subject_id, dicom_id=rec.dicom_id,
                          view=rec.view, view_position=rec.view_position, split=study.split,
                          labels=labels, path=rec.path)
            plan.append((os.path.join(table.root, rec.path), fields))
    return plan


def _plan_sha(plan: list[tuple[str, dict]]) -> str:
    digest = hashlib.sha256()
    for _, fields in plan:
        digest.update(json.dumps(fields, sort_keys=True).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def _clear(out: str) -> None:
    for name in os.listdir(out):
        full = os.path.join(out, name)
        if name.startswith("shard_") or name in ("index.csv", "rejects.csv", "manifest.json") or ".tmp" in name:
            os.remove(full)
    shutil.rmtree(os.path.join(out, "parts"), ignore_errors=True)


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


def prepare_cache(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    size: int = 256,
    dtype: str = "uint8",
    resize: str = "pad",
    shard_size: int = 1024,
    workers: int | None = None,
    voi: str = "auto",
    uncertain: str = "zeros",
    blank: str = "zeros",
    label_source: str = "chexpert",
    frontal_order: Sequence[str] = FRONTAL_VIEWS,
    lateral_views: Sequence[str] = LATERAL_VIEWS,
    scan: bool | None = None,
    overwrite: bool = False,
    progress: bool = True,
    table: StudyTable | None = None,
) -> dict[str, Any]:
    """Convert every image of a MIMIC-CXR-shaped dataset once into a shard cache.

    Args:
        source: dataset root: the MIMIC-CXR CSVs + ``files/`` (read with
            :func:`load_mimic_csv`), or any DICOM tree (headers scanned).
        out: cache directory (created).
        size: side S of the stored square images.
        dtype: "uint8" or "uint16" (the [0, 1] image times 255 or 65535, rounded).
        resize: "pad" (keep the whole film, black bars) or "crop" (centred square).
        shard_size: images per ``shard_XXXXX.npy`` (n, S, S).
        workers: conversion processes (default: all cores; 0 or 1: in this process).
        voi: passed to :func:`read_dicom` ("auto" | "none" | "minmax").
        uncertain, blank, label_source, frontal_order, lateral_views: study table options.
        scan: force (True) or forbid (False) the header scan; default: scan when no
            metadata CSV is in ``source``.
        overwrite: replace a cache built with other settings (else a ValueError).
        progress: a tqdm bar (only when stderr is a terminal).
        table: a ready StudyTable (then source is only recorded).
    Returns:
        Summary dict: images, written, rejects, shards, shards_skipped, seconds,
        images_per_s, pixel_mean, pixel_std, out.
    Raises:
        ValueError: a bad argument, or an existing cache with other settings.
        DataError: unreadable CSVs.
    """
    source, out = os.fspath(source), os.fspath(out)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {sorted(DTYPES)}")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize={resize!r}; expected one of {RESIZE_MODES}")
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size={size!r}; expected an int >= 8")
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size={shard_size!r}; expected an int >= 1")
    from fastssl.data.dicom import VOI_MODES

    if voi not in VOI_MODES:
        raise ValueError(f"voi={voi!r}; expected one of {VOI_MODES}")
    for name, value in (("uncertain", uncertain), ("blank", blank)):
        if value not in LABEL_POLICIES:
            raise ValueError(f"{name}={value!r}; expected one of {sorted(LABEL_POLICIES)}")
    workers = (os.cpu_count() or 1) if workers is None else int(workers)
    start = time.perf_counter()

    if table is None:
        if not os.path.isdir(source):
            raise ValueError(f"source={source!r} is not a directory")
        use_scan = scan if scan is not None else find_csv(source, "metadata") is None
        if use_scan:
            log.info("%s: no metadata CSV, scanning DICOM headers", source)
            table = scan_dicom_tree(source, workers=workers, frontal_order=frontal_order,
                                    lateral_views=lateral_views, blank=blank)
        else:
            table = load_mimic_csv(source, label_source=label_source, frontal_order=frontal_order,
                                   lateral_views=lateral_views, uncertain=uncertain, blank=blank)
    log.info("study table: %s", table.format_summary().replace("\n", "; "))
    if not table.studies:   # an empty cache would "succeed" and fail later, far from the cause
        raise ValueError(f"{table.root}: no usable DICOM study ({len(table.rejects)} files rejected); nothing to prepare")
    plan = _plan(table)
    n_shards = (len(plan) + shard_size - 1) // shard_size
    config = dict(
        format_version=FORMAT_VERSION, size=size, dtype=dtype, resize=resize, shard_size=shard_size,
        voi=voi, uncertain=uncertain, blank=blank, label_source=label_source,
        frontal_order=[v.upper() for v in frontal_order], lateral_views=[v.upper() for v in lateral_views],
        n_images=len(plan), n_shards=n_shards, plan_sha256=_plan_sha(plan),
    )

    os.makedirs(os.path.join(out, "parts"), exist_ok=True)
    manifest_path = os.path.join(out, "manifest.json")
    if os.path.isfile(manifest_path):
        old = read_manifest(out)
        diff = {k: (old.get(k), config[k]) for k in _CONFIG_KEYS if old.get(k) != config[k]}
        if diff:
            if not overwrite:
                lines = ", ".join(f"{k}: cache has {a!r}, asked {b!r}" for k, (a, b) in diff.items())
                raise ValueError(f"{out} holds a cache built with other settings ({lines}); "
                                 "pass overwrite=True (--overwrite) or choose another output directory")
            log.warning("%s: overwriting a cache built with other settings (%s)", out, sorted(diff))
            _clear(out)
            os.makedirs(os.path.join(out, "parts"), exist_ok=True)
    for name in os.listdir(out):  # temporaries of a killed run
        if ".tmp" in name:
            os.remove(os.path.join(out, name))
    _write_json(manifest_path, dict(config, source=os.path.abspath(table.root), complete=False))

    bounds = [(k * shard_size, min(len(plan), (k + 1) * shard_size)) for k in range(n_shards)]
    todo = [k for k, (a, b) in enumerate(bounds) if not _shard_done(out, k, b - a, config)]
    skipped = n_shards - len(todo)
    if skipped:
        log.info("%s: %d of %d shards already done, skipped", out, skipped, n_shards)
    tasks = [(plan[i][0], size, dtype, resize, voi) for k in todo for i in range(*bounds[k])]
    kill_after = int(os.environ.get(_KILL_ENV, "0") or 0)

    from tqdm import tqdm

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
                rows.append([k, i - a, fields["study_id"], fields["subject_id"], fields["dicom_id"],
                             fields["view"], fields["view_position"], fields["split"], *fields["labels"],
                             fields["path"]])
                s1, s2 = s1 + t1, s2 + t2
            _replace_atomically(os.path.join(out, shard_name(k)), lambda h, arr=shard: np.save(h, arr))
            # The part file is written last: its presence marks the shard finished.
            _write_json(os.path.join(out, "parts", f"shard_{k:05d}.json"), dict(
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

    # Merge the parts (all shards are done now) into the index and the rejects table.
    index_rows, reject_rows, s1, s2, n_ok = [], [], 0.0, 0.0, 0
    for k in range(n_shards):
        with open(os.path.join(out, "parts", f"shard_{k:05d}.json"), encoding="utf-8") as handle:
            part = json.load(handle)
        for row in part["rows"]:
            index_rows.append([len(index_rows), *row])
        reject_rows.extend(part["rejects"])
        s1, s2 = s1 + part["pixel_sum"], s2 + part["pixel_sumsq"]
    reject_rows = [list(r) for r in table.rejects] + reject_rows
    _write_csv(os.path.join(out, "index.csv"), INDEX_COLUMNS, index_rows)
    _write_csv(os.path.join(out, "rejects.csv"), ["path", "reason"], reject_rows)
    n_px = max(1, len(index_rows)) * size * size
    mean = s1 / n_px
    std = float(np.sqrt(max(0.0, s2 / n_px - mean * mean)))
    seconds = time.perf_counter() - start
    n_done = len(tasks)
    summary = dict(
        out=out, images=len(plan), written=len(index_rows), rejects=len(reject_rows), shards=n_shards,
        shards_skipped=skipped, seconds=round(seconds, 3),
        images_per_s=round(n_done / seconds, 1) if seconds > 0 else 0.0,
        pixel_mean=round(mean, 6), pixel_std=round(std, 6), workers=workers,
    )
    _write_json(manifest_path, dict(config, source=os.path.abspath(table.root), complete=True,
                                     written=len(index_rows), rejects=len(reject_rows),
                                     pixel_mean=summary["pixel_mean"], pixel_std=summary["pixel_std"]))
    return summary


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


@dataclass
class CacheIndex:
    """index.csv as arrays (one entry per stored image, in index order).

    shard, offset: (n,) int32; labels: (n, 14) int8; the string columns are numpy
    unicode arrays (fixed width, never pickled objects).
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

    def __len__(self) -> int:
        return int(self.shard.size)


def read_index(cache_dir: str | os.PathLike) -> CacheIndex:
    """Load a complete cache's index; DataError when the cache is missing or unfinished."""
    cache_dir = os.fspath(cache_dir)
    manifest = read_manifest(cache_dir)
    path = os.path.join(cache_dir, "index.csv")
    if not manifest.get("complete") or not os.path.isfile(path):
        raise DataError(cache_dir, "cache is not complete; rerun `fastssl prepare` with the same settings")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(cache_dir, f"cache format {manifest.get('format_version')}, this fastssl reads {FORMAT_VERSION}")
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header != INDEX_COLUMNS:
            raise DataError(path, f"unexpected columns {header}; expected {INDEX_COLUMNS}")
        rows = list(reader)
    col = {name: i for i, name in enumerate(INDEX_COLUMNS)}
    lab = [col[name] for name in CHEXPERT_LABELS]

    def strings(name):
        return np.array([r[col[name]] for r in rows], dtype=str) if rows else np.zeros(0, dtype="<U1")

    return CacheIndex(
        cache_dir=cache_dir, manifest=manifest,
        shard=np.array([int(r[col["shard"]]) for r in rows], dtype=np.int32),
        offset=np.array([int(r[col["offset"]]) for r in rows], dtype=np.int32),
        study_id=strings("study_id"), subject_id=strings("subject_id"), dicom_id=strings("dicom_id"),
        view=strings("view"), view_position=strings("view_position"), split=strings("split"),
        labels=np.array([[int(r[i]) for i in lab] for r in rows], dtype=np.int8).reshape(len(rows), len(lab)),
        path=strings("path"),
    )


def open_shard(cache_dir: str | os.PathLike, k: int) -> np.ndarray:
    """Shard k memory-mapped read-only: (n, S, S)."""
    path = os.path.join(os.fspath(cache_dir), shard_name(k))
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise DataError(path, f"cannot open shard ({exc})") from None


# ---------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, help="dataset root: MIMIC-CXR CSVs + files/, or any DICOM tree")
    parser.add_argument("--out", required=True, help="cache directory (created; rerun to resume)")
    parser.add_argument("--size", type=int, default=256, help="side of the stored square images")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="uint8", help="stored pixel type")
    parser.add_argument("--resize", choices=RESIZE_MODES, default="pad",
                        help="keep the aspect ratio by padding (whole film) or by a centred square crop")
    parser.add_argument("--shard-size", type=int, default=1024, help="images per .npy shard")
    parser.add_argument("--workers", type=int, default=None, help="conversion processes (default: all cores)")
    parser.add_argument("--voi", choices=("auto", "none", "minmax"), default="auto",
                        help="VOI: LUT/window from the file (auto), full stored range (none), image min..max")
    parser.add_argument("--uncertain", choices=sorted(LABEL_POLICIES), default="zeros",
                        help="uncertain (-1) CheXpert labels become 0, 1 or -1 (ignore)")
    parser.add_argument("--blank", choices=sorted(LABEL_POLICIES), default="zeros",
                        help="blank CheXpert labels become 0, 1 or -1 (ignore)")
    parser.add_argument("--labels", dest="label_source", choices=("chexpert", "negbio"), default="chexpert",
                        help="which labels CSV to read")
    parser.add_argument("--frontal-order", default=",".join(FRONTAL_VIEWS),
                        help="frontal ViewPositions, preferred first (comma-separated)")
    parser.add_argument("--lateral-views", default=",".join(LATERAL_VIEWS),
                        help="lateral ViewPositions (comma-separated)")
    parser.add_argument("--scan", action="store_true", help="ignore the CSVs and pair by scanning DICOM headers")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a cache in --out that was built with other settings")


def _as_list(value) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def run(args: argparse.Namespace) -> int:
    try:
        summary = prepare_cache(
            args.source, args.out, size=args.size, dtype=args.dtype, resize=args.resize,
            shard_size=args.shard_size, workers=args.workers, voi=args.voi, uncertain=args.uncertain,
            blank=args.blank, label_source=args.label_source, frontal_order=_as_list(args.frontal_order),
            lateral_views=_as_list(args.lateral_views), scan=True if args.scan else None,
            overwrite=args.overwrite, progress=not args.quiet,
        )
    except (ValueError, DataError) as exc:
        log.error("%s", exc)
        return 2
    print(
        f"prepare: {summary['written']} of {summary['images']} images in {summary['shards']} shards "
        f"({summary['shards_skipped']} already done), {summary['rejects']} rejected (rejects.csv)\n"
        f"         {summary['seconds']:.1f} s, {summary['images_per_s']:.1f} images/s with "
        f"{summary['workers']} workers; pixel mean {summary['pixel_mean']:.4f} std {summary['pixel_std']:.4f}\n"
        f"         -> {summary['out']}"
    )
    return 0
