"""Every dataset layout end to end: phantom in that layout -> prepare -> the cache's
study/view table, labels, splits and rejects equal the phantom's ground truth; the same
studies give the same pixels through DICOM, 16-bit PNG and JPEG; a pooled cache."""
from __future__ import annotations

import csv
import os

import numpy as np
import pytest

from fastssl.cli import main as cli_main
from fastssl.data.cache import open_shard, prepare_cache, read_index
from fastssl.data.datasets import PairedViewDataset, SingleViewDataset
from fastssl.data.images import read_image
from fastssl.data.mimic import CHEXPERT_LABELS
from fastssl.data.phantom import generate_phantom
from fastssl.errors import DataError

LAYOUTS = ("mimic-dicom", "mimic-jpg", "chexpert", "padchest")
SIZE = 32
POLICY = {"zeros": 0, "ones": 1, "ignore": -1}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """The same 14 studies (3 broken files, many without a view field) in every layout."""
    out = {}
    for layout in LAYOUTS:
        root = tmp_path_factory.mktemp(layout)
        generate_phantom(root, 14, seed=3, size=SIZE, corrupt=3, workers=1, progress=False, layout=layout,
                         no_view_position_fraction=0.3, split="0.5,0.25,0.25", uncertain_fraction=0.3)
        with open(root / "phantom_truth.csv", newline="") as handle:
            out[layout] = (str(root), list(csv.DictReader(handle)))
    return out


@pytest.fixture(scope="module")
def caches(phantoms, tmp_path_factory):
    out = {}
    for layout, (root, _) in phantoms.items():
        cache = tmp_path_factory.mktemp(f"cache-{layout}")
        prepare_cache(f"{layout}:{root}", cache, size=SIZE, dtype="uint16", shard_size=8, workers=1,
                      progress=False, uncertain="ignore", blank="ones")
        out[layout] = str(cache)
    return out


def _truth_labels(row, uncertain="ignore", blank="ones"):
    values = {"1.0": 1, "0.0": 0, "-1.0": POLICY[uncertain], "": POLICY[blank]}
    return [values[row[name]] for name in CHEXPERT_LABELS]


def _rejects(cache):
    with open(os.path.join(cache, "rejects.csv"), newline="") as handle:
        return {row["path"]: row["reason"] for row in csv.DictReader(handle)}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_table_labels_and_rejects_equal_the_truth(phantoms, caches, layout):
    root, truth = phantoms[layout]
    index = read_index(caches[layout])
    good = [r for r in truth if not r["corrupt"]]
    by_image = {(r["study_id"], r["dicom_id"]): r for r in good}
    got = {(s, d): i for i, (s, d) in enumerate(zip(index.study_id, index.dicom_id))}
    assert set(got) == set(by_image)
    for key, row in by_image.items():
        i = got[key]
        assert index.subject_id[i] == row["subject_id"]
        assert index.view[i] == row["expected_view"], (layout, key, row["view_position"])
        assert index.labels[i].tolist() == _truth_labels(row), (layout, key)
        assert index.other_labels[i] == row["other_findings"]
        assert index.dataset[i] == {"mimic-dicom": "mimic-cxr", "mimic-jpg": "mimic-cxr"}.get(layout, layout)
        if row["split"]:  # the dataset's official split
            assert index.split[i] == row["split"]
    assert (index.view == "unknown").any() or layout == "chexpert"  # the quirk is exercised
    stated = {row[name] for row in good for name in CHEXPERT_LABELS}  # the label quirks are exercised
    assert stated >= ({"1.0", "0.0", ""} if layout == "padchest" else {"1.0", "-1.0", ""}), stated
    # every broken file (truncated, empty, absent, undecodable) is listed with a reason, nothing else
    bad = {os.path.join(root, r["path"]) for r in truth if r["corrupt"]}
    rejects = _rejects(caches[layout])
    assert set(rejects) == bad and len(bad) == 3 and all(rejects.values())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_splits_are_patient_disjoint(caches, layout):
    index = read_index(caches[layout])
    for subject in np.unique(index.subject_id):
        assert np.unique(index.split[index.subject_id == subject]).size == 1, subject
    assert set(np.unique(index.split)) <= {"train", "validate", "test"}


def _pixels_by_image(cache):
    index = read_index(cache)
    shards = {}
    out = {}
    for i in range(len(index)):
        k = int(index.shard[i])
        shards.setdefault(k, open_shard(cache, k))
        out[str(index.dicom_id[i])] = shards[k][index.offset[i]].astype(np.float64) / 65535
    return out


def test_dicom_png_and_jpeg_give_the_same_pixels(caches):
    """The phantom writes one display image as 12-bit DICOM (with MONOCHROME1, rescale and
    VOI LUT encodings), as a 12-bit-in-16 PNG (MONOCHROME1 stored inverted) and as an
    8-bit JPEG: each reader must recover it. Truncating the PNG to 8 bits, skipping the
    MONOCHROME1 inversion or ignoring BitsStored would break the PNG bound."""
    dicom = _pixels_by_image(caches["mimic-dicom"])
    png = _pixels_by_image(caches["padchest"])
    jpg = _pixels_by_image(caches["mimic-jpg"])
    assert set(dicom) == set(png) == set(jpg)
    png_err = max(np.abs(dicom[k] - png[k]).max() for k in dicom)
    jpg_err = np.mean([np.abs(dicom[k] - jpg[k]).mean() for k in dicom])
    assert png_err < 1.5 / 4095, png_err  # within 12-bit rounding of the two encodings
    assert jpg_err < 0.01, jpg_err  # JPEG quality 95 of an 8-bit image


def test_sixteen_bit_png_round_trip(tmp_path):
    """Stored 12-bit values 100..200 (steps finer than 8 bits) survive reading and a
    uint16 cache; BitsStored from the CSV sets the range; MONOCHROME1 inverts; the image
    is never truncated to 8 bits."""
    from PIL import Image

    stored = np.tile(np.arange(100, 201, dtype=np.uint16), (101, 1))
    folder = tmp_path / "0"
    folder.mkdir()
    Image.fromarray(stored).save(folder / "a.png")
    image = read_image(folder / "a.png", hints={"bits_stored": 12})
    assert image.dtype == np.float32 and np.allclose(image, stored / 4095.0, atol=1e-7)
    assert np.unique(image).size == 101  # an 8-bit step would leave ~7 levels
    assert np.allclose(read_image(folder / "a.png", hints={"bits_stored": 12, "monochrome1": True}),
                       1 - stored / 4095.0, atol=1e-7)
    assert np.allclose(read_image(folder / "a.png", voi="minmax"), (stored - 100) / 100.0, atol=1e-6)
    assert np.allclose(read_image(folder / "a.png"), stored / 1023.0, atol=1e-7)  # no hint: 10 bits hold the max
    assert np.allclose(read_image(folder / "a.png", voi="none"), stored / 65535.0, atol=1e-7)
    assert np.allclose(read_image(folder / "a.png", hints={"window": (150, 100)}), (stored - 100) / 100.0, atol=1e-6)
    # through prepare: a PadChest CSV naming the file, uint16 cache, no resize
    header = "ImageID,ImageDir,StudyID,PatientID,Projection,Labels,BitsStored_DICOM\n"
    (tmp_path / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv").write_text(
        header + "a.png,0,S1,P1,PA,['normal'],12\n")
    prepare_cache(f"padchest:{tmp_path}", tmp_path / "cache", size=101, dtype="uint16", workers=1, progress=False)
    cached = open_shard(tmp_path / "cache", 0)[0]
    assert np.abs(cached.astype(np.int64) - np.rint(stored / 4095.0 * 65535)).max() <= 1


def test_pooled_cache_over_every_layout(phantoms, tmp_path, capsys):
    sources = [a for layout, (root, _) in phantoms.items() for a in ("--source", f"{layout}:{root}")]
    sources = sources[2:]  # mimic-dicom and mimic-jpg are one dataset: pool the JPG one with the others
    assert cli_main(["prepare", *sources, "--out", str(tmp_path / "pool"), "--size", "16", "--workers", "2"]) == 0
    assert "datasets: chexpert, mimic-cxr, padchest" in capsys.readouterr().out
    index = read_index(tmp_path / "pool")
    assert sorted(np.unique(index.dataset)) == ["chexpert", "mimic-cxr", "padchest"]
    for dataset in ("chexpert", "mimic-cxr", "padchest"):
        rows = index.dataset == dataset
        assert all(s.startswith(dataset + ":") for s in index.study_id[rows])
        assert all(s.startswith(dataset + ":") for s in index.subject_id[rows])
        assert rows.sum() == len(read_index(_single(phantoms, dataset, tmp_path)))
    for subject in np.unique(index.subject_id):  # no patient in two splits, across the pool
        assert np.unique(index.split[index.subject_id == subject]).size == 1
    # the datasets API restricts a pooled cache to one dataset (e.g. evaluate on MIMIC test)
    only = SingleViewDataset(tmp_path / "pool", split=None, dataset="padchest")
    assert len(only) == (index.dataset == "padchest").sum()
    assert set(index.dataset[only.rows]) == {"padchest"}
    paired = PairedViewDataset(tmp_path / "pool", split=None, dataset=["mimic-cxr"])
    assert 0 < len(paired) and all(s.startswith("mimic-cxr:") for s in paired.study_ids)
    with pytest.raises(ValueError, match="not in this cache"):
        SingleViewDataset(tmp_path / "pool", dataset="vindr")
    with pytest.raises(ValueError, match="given twice"):
        prepare_cache([f"mimic-jpg:{phantoms['mimic-jpg'][0]}", f"mimic-dicom:{phantoms['mimic-dicom'][0]}"],
                      tmp_path / "twice", size=16, workers=1, progress=False)


def _single(phantoms, dataset, tmp_path):
    layout = "mimic-jpg" if dataset == "mimic-cxr" else dataset
    out = tmp_path / f"single-{layout}"
    prepare_cache(f"{layout}:{phantoms[layout][0]}", out, size=16, workers=1, progress=False)
    return out


def test_phantom_layout_cli(tmp_path, capsys):
    assert cli_main(["phantom", "--out", str(tmp_path / "p"), "--studies", "2", "--size", "32", "--workers", "1",
                     "--layout", "padchest", "--quiet"]) == 0
    assert (tmp_path / "p" / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv").is_file()
    pngs = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "p") for f in fs if f.endswith(".png")]
    from PIL import Image

    with Image.open(pngs[0]) as img:
        assert img.mode == "I;16"


def test_missing_directory_and_unknown_kind_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown kind 'chexpret'"):
        prepare_cache("chexpret:/nowhere", tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="is not a directory"):
        prepare_cache(f"padchest:{tmp_path / 'nowhere'}", tmp_path / "c", progress=False)
    with pytest.raises(DataError, match="PADCHEST"):
        prepare_cache(f"padchest:{tmp_path}", tmp_path / "c", progress=False)


def test_resume_identity_covers_the_dataset_csvs(phantoms, tmp_path):
    """A rerun resumes (every shard skipped); an edited dataset CSV is refused, naming
    the file, even where the edit leaves the plan unchanged (a column fastssl ignores)."""
    import shutil

    from fastssl.errors import ResumeMismatch

    root = tmp_path / "chexpert"
    shutil.copytree(phantoms["chexpert"][0], root)
    out = tmp_path / "cache"
    prepare_cache(f"chexpert:{root}", out, size=16, shard_size=8, workers=1, progress=False)
    again = prepare_cache(f"chexpert:{root}", out, size=16, shard_size=8, workers=1, progress=False)
    assert again["shards_skipped"] == again["shards"] > 0
    train = root / "CheXpert-v1.0-small" / "train.csv"
    train.write_text(train.read_text().replace(",Female,", ",Male,", 1))
    with pytest.raises(ResumeMismatch, match="train.csv: size"):
        prepare_cache(f"chexpert:{root}", out, size=16, shard_size=8, workers=1, progress=False)
    redone = prepare_cache(f"chexpert:{root}", out, size=16, shard_size=8, workers=1, progress=False, overwrite=True)
    assert redone["shards_skipped"] == 0
