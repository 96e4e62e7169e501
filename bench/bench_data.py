"""Radiograph data speed: DICOM -> cache conversion, and reading pairs from the cache.

    python -m pytest bench/bench_data.py                    # 24 films, 2,048-study cache
    python -m pytest bench/bench_data.py --bench-size=full  # 96 films, 8,192-study cache

[dicom_to_cache] images/s (and per core) converting 2,500 x 2,048 12-bit films with a
window to 256 x 256 uint8: a plain pydicom + PIL loop (the baseline, one process) vs
`prepare_cache` with 1 and with all workers.

[cache_read] pairs/s reading (frontal, lateral) pairs of 256 px uint8 from the shards,
batch 256: the gather alone (one process), gather + BatchAugment to 224 px on this
machine's CPU with one thread (on a GPU the augmentation is off the loader's critical
path), and `make_loader` with 2 workers. The goal is >= 3,000 pairs/s per core.
"""
from __future__ import annotations

import csv
import json
import os
import sys

import numpy as np
import pytest
import torch

from fastssl.data.augment import BatchAugment
from fastssl.data.cache import FORMAT_VERSION, INDEX_COLUMNS, prepare_cache, shard_name
from fastssl.data.datasets import PairedViewDataset, make_loader
from fastssl.data.mimic import CHEXPERT_LABELS

# the DICOM writer of the tests (bench/ and tests/ are siblings, neither is a package)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from dicom_factory import make_dicom  # noqa: E402

GROUP_PREP, GROUP_READ = "dicom_to_cache", "cache_read"
FILM = (2500, 2048)
BATCH = 256


@pytest.fixture(scope="module")
def films(tmp_path_factory, bench_size):
    n = 96 if bench_size == "full" else 24
    root = tmp_path_factory.mktemp("films")
    rng = np.random.default_rng(0)
    base = rng.integers(0, 4096, size=FILM)
    paths = []
    for i in range(n):
        # a smooth-ish film plus noise, 12 bits stored, windowed, MONOCHROME1 half the time
        pixels = (base + 37 * i) % 4096
        paths.append(make_dicom(root / f"{i:04d}.dcm", pixels, window=(2048, 3000), rescale=(1.0, 0.0),
                                photometric="MONOCHROME1" if i % 2 else "MONOCHROME2",
                                view_position="PA" if i % 2 == 0 else "LATERAL",
                                patient_id=f"1{i // 2:07d}", study_uid=f"1.2.3.{i // 2}"))
    return root, paths


def _baseline_loop(paths, size=256):
    """The plain way: pydicom's LUT functions, PIL resize, one process."""
    import pydicom
    from PIL import Image
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    out = np.empty((len(paths), size, size), dtype=np.uint8)
    for i, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        x = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float32)
        x = (x - x.min()) / max(1e-6, float(x.max() - x.min()))
        if ds.PhotometricInterpretation == "MONOCHROME1":
            x = 1 - x
        img = Image.fromarray(x, mode="F").resize((size, size), Image.Resampling.BILINEAR)
        out[i] = np.clip(np.rint(np.asarray(img) * 255), 0, 255).astype(np.uint8)
    return out


def test_baseline_pydicom_pil(benchmark, films, record):
    _, paths = films
    benchmark.pedantic(lambda: _baseline_loop(paths), rounds=1, iterations=1, warmup_rounds=1)
    s = float(benchmark.stats.stats.median)
    record(GROUP_PREP, "pydicom+PIL loop (1 proc)", s, baseline=True, images=len(paths),
           images_per_s=round(len(paths) / s, 1), per_core=round(len(paths) / s, 1))


@pytest.mark.parametrize("workers", [1, os.cpu_count() or 1])
def test_prepare_cache(benchmark, films, record, tmp_path, workers):
    root, paths = films
    runs = iter(range(100))

    def run():
        out = tmp_path / f"cache{next(runs)}"  # a fresh cache each round (no resume)
        return prepare_cache(root, out, workers=workers, scan=True, progress=False, shard_size=1024)

    summary = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=1)
    assert summary["written"] == len(paths)
    s = float(benchmark.stats.stats.median)
    record(GROUP_PREP, f"prepare_cache workers={workers}", s, images=len(paths),
           images_per_s=round(len(paths) / s, 1), per_core=round(len(paths) / s / workers, 1))


def _fake_cache(root, studies: int, size: int = 256, shard_size: int = 1024) -> str:
    """A cache in the real format written directly (two views per study, random pixels)."""
    rng = np.random.default_rng(1)
    n = 2 * studies
    n_shards = (n + shard_size - 1) // shard_size
    rows = []
    for k in range(n_shards):
        m = min(shard_size, n - k * shard_size)
        np.save(os.path.join(root, shard_name(k)), rng.integers(0, 256, (m, size, size), dtype=np.uint8))
        for o in range(m):
            i = k * shard_size + o
            rows.append([i, k, o, "mimic-cxr", f"s{i // 2}", f"p{i // 4}", f"d{i}",
                         "frontal" if i % 2 == 0 else "lateral", "PA" if i % 2 == 0 else "LATERAL", "ViewPosition",
                         "train", *([0] * len(CHEXPERT_LABELS)), "", f"f{i}.dcm"])
    with open(os.path.join(root, "index.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(INDEX_COLUMNS)
        writer.writerows(rows)
    with open(os.path.join(root, "manifest.json"), "w") as handle:
        json.dump(dict(format_version=FORMAT_VERSION, size=size, dtype="uint8", complete=True,
                       n_shards=n_shards, shard_size=shard_size), handle)
    return str(root)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, bench_size):
    return _fake_cache(tmp_path_factory.mktemp("cache"), 8192 if bench_size == "full" else 2048)


def _epoch_batches(ds, rng):
    order = rng.permutation(len(ds))
    return [order[s:s + BATCH] for s in range(0, len(order) - BATCH + 1, BATCH)]


def test_read_pairs_gather(benchmark, cache, record):
    ds = PairedViewDataset(cache)
    batches = _epoch_batches(ds, np.random.default_rng(0))

    def run():
        for b in batches:
            ds.get_batch(b)

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    s = float(benchmark.stats.stats.median)
    pairs = len(batches) * BATCH
    record(GROUP_READ, "gather (1 proc)", s, baseline=True, pairs=pairs, pairs_per_s=round(pairs / s),
           per_core=round(pairs / s))


def test_read_pairs_gather_augment_cpu(benchmark, cache, record):
    ds = PairedViewDataset(cache)
    batches = _epoch_batches(ds, np.random.default_rng(0))[:4]
    aug = BatchAugment(out_size=224)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        def run():
            for b in batches:
                f, l, _, _ = ds.get_batch(b)
                aug(torch.cat([f, l]))  # both views in one grid_sample call

        benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    finally:
        torch.set_num_threads(threads)
    s = float(benchmark.stats.stats.median)
    pairs = len(batches) * BATCH
    record(GROUP_READ, "gather + BatchAugment 224 on CPU (1 thread)", s, pairs=pairs,
           pairs_per_s=round(pairs / s), per_core=round(pairs / s))


def test_read_pairs_loader_workers(benchmark, cache, record):
    ds = PairedViewDataset(cache)
    workers = 2
    # persistent workers: the timed epochs measure steady-state reading, not process start-up
    loader = make_loader(ds, BATCH, num_workers=workers, prefetch_factor=4, persistent_workers=True)

    def run():
        n = 0
        for f, _, _, _ in loader:
            n += f.shape[0]
        return n

    pairs = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    s = float(benchmark.stats.stats.median)
    record(GROUP_READ, f"make_loader num_workers={workers}", s, pairs=pairs, pairs_per_s=round(pairs / s),
           per_core=round(pairs / s / workers))
