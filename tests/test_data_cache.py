"""The shard cache: round trip, rejects, settings guard, resume after a kill."""
from __future__ import annotations

import csv
import filecmp
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dicom_factory import make_mimic
from fastssl.data.cache import fit_square, open_shard, prepare_cache, read_index
from fastssl.data.dicom import read_dicom
from fastssl.errors import DataError

STUDIES = [
    ("10000001", "50000001", ["PA", "LATERAL"]),
    ("10000001", "50000002", ["AP", "PA", "LL"]),
    ("10000002", "50000003", ["AP"]),
    ("10000003", "50000004", ["LATERAL"]),
    ("10000004", "50000005", [None, "PA"]),
    ("11000006", "50000007", ["PA", "LATERAL", None]),
]
N_IMAGES = 12
CORRUPT = ("50000002-02",)  # a truncated lateral


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("mimic")
    make_mimic(root, STUDIES, size=24, corrupt=CORRUPT, splits={"50000003": "test"})
    return str(root)


def cache_files(out):
    names = sorted(n for n in os.listdir(out) if n.endswith((".npy", ".csv")))
    return names


def test_fit_square_pad_and_crop():
    image = np.ones((20, 40), dtype=np.float32)
    padded = fit_square(image, 16, "pad")
    assert padded.shape == (16, 16) and padded.dtype == np.float32
    assert np.all(padded[:4] == 0) and np.all(padded[-4:] == 0) and np.allclose(padded[4:12], 1)
    assert np.allclose(fit_square(image, 16, "crop"), 1)
    ramp = np.tile(np.linspace(0, 1, 40, dtype=np.float32), (20, 1))
    crop = fit_square(ramp, 10, "crop")  # the centred 20x20 square holds 0.25..0.75
    assert 0.2 < crop.min() and crop.max() < 0.8


def test_round_trip(tmp_path, source):
    out = tmp_path / "cache"
    summary = prepare_cache(source, out, size=16, shard_size=5, workers=1, progress=False)
    assert (summary["images"], summary["written"], summary["rejects"], summary["shards"]) == (N_IMAGES, N_IMAGES - 1, 1, 3)
    index = read_index(out)
    assert len(index) == N_IMAGES - 1 and index.labels.shape == (N_IMAGES - 1, 14)
    assert index.labels.dtype == np.int8 and set(np.unique(index.labels)) <= {0, 1}
    assert set(index.view) == {"frontal", "lateral", "unknown"}
    assert index.split[index.study_id == "50000003"].tolist() == ["test"]
    shapes = [open_shard(out, k).shape for k in range(3)]
    assert shapes == [(5, 16, 16), (5, 16, 16), (2, 16, 16)]
    for i in range(len(index)):
        stored = open_shard(out, index.shard[i])[index.offset[i]]
        image, meta = read_dicom(os.path.join(source, index.path[i]))
        expected = np.rint(fit_square(image, 16, "pad") * 255).astype(np.uint8)
        np.testing.assert_array_equal(stored, expected)
        assert meta.view_position == (index.view_position[i] or None)
    with open(out / "rejects.csv", newline="") as handle:
        rejects = list(csv.DictReader(handle))
    assert len(rejects) == 1 and rejects[0]["path"].endswith("50000002-02.dcm") and rejects[0]["reason"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["size"] == 16 and manifest["dtype"] == "uint8"
    assert manifest["n_shards"] == 3 and 0 < manifest["pixel_mean"] < 1


def test_uint16_crop(tmp_path, source):
    out = tmp_path / "c16"
    prepare_cache(source, out, size=12, dtype="uint16", resize="crop", workers=1, progress=False)
    arr = open_shard(out, 0)
    assert arr.dtype == np.uint16 and arr.shape == (N_IMAGES, 12, 12) and arr.max() > 255


def test_settings_guard(tmp_path, source):
    out = tmp_path / "cache"
    prepare_cache(source, out, size=16, shard_size=5, workers=1, progress=False)
    with pytest.raises(ValueError, match="size: 16 -> 12"):
        prepare_cache(source, out, size=12, shard_size=5, workers=1, progress=False)
    summary = prepare_cache(source, out, size=12, shard_size=5, workers=1, progress=False, overwrite=True)
    assert summary["shards_skipped"] == 0 and open_shard(out, 0).shape[1:] == (12, 12)
    with pytest.raises(ValueError, match="dtype"):
        prepare_cache(source, out, dtype="float32")
    with pytest.raises(DataError, match="manifest"):
        read_index(tmp_path / "nothing")


def run_cli(args, env=None):
    return subprocess.run([sys.executable, "-m", "fastssl", "prepare", *args], capture_output=True,
                          text=True, env=dict(os.environ, **(env or {})), timeout=120)


def test_resume_after_kill_matches_uninterrupted(tmp_path, source):
    ref, out = tmp_path / "ref", tmp_path / "killed"
    common = ["--source", source, "--size", "16", "--shard-size", "3", "--workers", "1"]
    prepare_cache(source, ref, size=16, shard_size=3, workers=1, progress=False)
    proc = run_cli([*common, "--out", str(out)], env={"FASTSSL_PREPARE_KILL_AFTER_SHARDS": "2"})
    assert proc.returncode == -9, proc.stderr  # SIGKILL after two shards
    assert cache_files(out) == ["shard_00000.npy", "shard_00001.npy"]  # no index: the run did not finish
    with pytest.raises(DataError, match="not complete"):
        read_index(out)
    (out / "shard_00002.npy.tmp999").write_bytes(b"half a shard")  # what a kill mid-write leaves
    before = [os.stat(out / f"shard_0000{k}.npy").st_mtime_ns for k in range(2)]
    proc = run_cli([*common, "--out", str(out)])
    assert proc.returncode == 0, proc.stderr
    assert "(2 already done)" in proc.stdout and "images/s" in proc.stdout
    assert [os.stat(out / f"shard_0000{k}.npy").st_mtime_ns for k in range(2)] == before
    assert cache_files(out) == cache_files(ref)
    for name in cache_files(ref):
        assert filecmp.cmp(out / name, ref / name, shallow=False), name
    assert not [n for n in os.listdir(out) if ".tmp" in n]
    # a finished cache: the rerun does nothing but rewrite the index
    summary = prepare_cache(source, out, size=16, shard_size=3, workers=1, progress=False)
    assert summary["shards_skipped"] == summary["shards"] == 4


def test_pool_and_scan_give_the_same_pixels(tmp_path, source):
    one, two = tmp_path / "one", tmp_path / "two"
    prepare_cache(source, one, size=16, shard_size=4, workers=1, progress=False)
    prepare_cache(source, two, size=16, shard_size=4, workers=2, progress=False)
    for name in cache_files(one):
        assert filecmp.cmp(one / name, two / name, shallow=False), name
    scanned = tmp_path / "scan"
    summary = prepare_cache(source, scanned, size=16, shard_size=4, workers=1, scan=True, progress=False)
    assert (summary["written"], summary["rejects"]) == (N_IMAGES - 1, 1)
    a, b = read_index(one), read_index(scanned)
    assert sorted(a.dicom_id) == sorted(b.dicom_id)


def test_phantom_cache_rejects_exactly_the_corrupt_files(tmp_path):
    phantom_mod = pytest.importorskip("fastssl.data.phantom")
    from fastssl.data.datasets import PairedViewDataset

    root = tmp_path / "phantom"
    phantom_mod.generate_phantom(root, 30, seed=11, size=48, corrupt=3, workers=1, progress=False)
    with open(root / "phantom_truth.csv", newline="") as handle:
        truth = list(csv.DictReader(handle))
    out = tmp_path / "cache"
    summary = prepare_cache(root, out, size=32, shard_size=16, workers=2, progress=False)
    corrupt = {r["dicom_id"] for r in truth if r["corrupt"]}
    assert summary["written"] == len(truth) - len(corrupt) and summary["rejects"] == len(corrupt)
    with open(out / "rejects.csv", newline="") as handle:
        rejected = {os.path.splitext(os.path.basename(r["path"]))[0]: r["reason"] for r in csv.DictReader(handle)}
    assert set(rejected) == corrupt and all(rejected.values())
    index = read_index(out)
    assert not corrupt & set(index.dicom_id.tolist())
    # pairs: studies with a readable frontal and lateral image (with ViewPosition)
    good = [r for r in truth if not r["corrupt"] and r["view_position"]]
    pairs = {st for st in {r["study_id"] for r in good}
             if {r["view"] for r in good if r["study_id"] == st} == {"frontal", "lateral"}}
    ds = PairedViewDataset(out, split=None)
    assert set(ds.study_ids.tolist()) == pairs


@pytest.mark.parametrize("manifest, mean, std, want", [
    ({"pixel_mean": 0.31, "pixel_std": 0.22}, -1.0, -1.0, (0.31, 0.22)),   # the cache's statistics
    ({"pixel_mean": 0.31, "pixel_std": 0.22}, 0.4, -1.0, (0.4, 0.22)),     # --pixel-mean only
    ({"pixel_mean": 0.31, "pixel_std": 0.22}, None, 0.3, (0.31, 0.3)),     # --pixel-std only
    ({"pixel_mean": 0.31, "pixel_std": 0.22}, 0.0, 0.1, (0.0, 0.1)),       # 0 is a valid mean
    ({}, -1.0, -1.0, (0.5, 0.25)),                                         # an old cache: the defaults
    ({"pixel_mean": 0.6, "pixel_std": 0.0}, -1.0, -1.0, (0.6, 0.25)),      # a std of 0 cannot divide
])
def test_pixel_stats_rule(manifest, mean, std, want):
    from fastssl.data.cache import pixel_stats

    assert pixel_stats(manifest, mean, std) == want


def _hand_cache(root, rows):
    from fastssl.data.cache import FORMAT_VERSION, INDEX_COLUMNS

    root.mkdir(exist_ok=True)
    (root / "manifest.json").write_text(json.dumps(dict(complete=True, format_version=FORMAT_VERSION,
                                                        size=8, dtype="uint8")))
    with open(root / "index.csv", "w", newline="") as handle:
        w = csv.writer(handle)
        w.writerow(INDEX_COLUMNS)
        for i, (study, view) in enumerate(rows):
            w.writerow([i, 0, i, "mimic-cxr", study, "p1", f"d{i}", view, "PA", "header", "train"]
                       + ["1"] * 14 + ["", f"files/d{i}.dcm"])


def test_read_index_parses_once_until_the_cache_changes(tmp_path):
    root = tmp_path / "cache"
    _hand_cache(root, [("s1", "frontal"), ("s1", "lateral"), ("s2", "frontal")])
    first = read_index(root)
    assert list(first.study_id) == ["s1", "s1", "s2"] and list(first.offset) == [0, 1, 2]
    assert read_index(str(root)) is first                  # the same parse, not a re-read
    with pytest.raises(ValueError):                        # shared arrays cannot be changed by a reader
        first.view[0] = "lateral"
    _hand_cache(root, [("s9", "lateral")])                 # rewritten (other size): parsed again
    again = read_index(root)
    assert list(again.study_id) == ["s9"] and list(again.view) == ["lateral"]
