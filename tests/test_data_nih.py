"""NIH ChestX-ray14 (``--source nih-cxr14:DIR``): its label map, its official split, one
study per image, CheXpert labels it never states kept as missing; small hand-written CSVs
and the phantom's ``--layout nih-cxr14`` end to end through prepare."""
from __future__ import annotations

import csv
import os

import numpy as np
import pytest
from PIL import Image

from fastssl.data.cache import prepare_cache, read_index
from fastssl.data.mimic import CHEXPERT_LABELS
from fastssl.data.nih import load_nih, nih_labels
from fastssl.data.phantom import generate_phantom
from fastssl.errors import DataError

HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
          "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"]
MISSING = ("Enlarged Cardiomediastinum", "Fracture", "Support Devices")  # NIH never states them


def _vector(positive=(), no_finding=0):
    """The 14 labels written out: 1 for ``positive``, -1 for MISSING, else 0."""
    out = {name: 1 if name in positive else -1 if name in MISSING else 0 for name in CHEXPERT_LABELS}
    out["No Finding"] = no_finding
    return [out[name] for name in CHEXPERT_LABELS]


def test_nih_findings_map_onto_the_14_labels():
    cases = {
        "Atelectasis|Effusion": (_vector({"Atelectasis", "Pleural Effusion"}), ""),
        "No Finding": (_vector(no_finding=1), ""),
        "Mass|Nodule|Hernia": (_vector({"Lung Lesion"}), "Hernia"),
        "Infiltration|Pleural_Thickening": (_vector({"Lung Opacity", "Pleural Other"}), ""),
        "Fibrosis|Emphysema|Fibrosis": (_vector(), "Fibrosis;Emphysema"),  # as written, once; no label set
        "Cardiomegaly|Edema|Consolidation|Pneumonia|Pneumothorax": (
            _vector({"Cardiomegaly", "Edema", "Consolidation", "Pneumonia", "Pneumothorax"}), ""),
    }
    for text, (labels, other) in cases.items():
        got, got_other = nih_labels(text)
        assert got.dtype == np.int8 and got.tolist() == labels, text
        assert got_other == other, text
    for bad, message in (("", "blank"), ("Pneumonia|Fever", "unknown"), ("No Finding|Mass", "No Finding")):
        with pytest.raises(ValueError, match=message):
            nih_labels(bad)


def _write_nih(root, rows, train_val=(), test=(), images=()):
    """A ChestX-ray14 root: the CSV, the two lists (None: not written), 8-bit PNGs."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "Data_Entry_2017.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(HEADER)
        writer.writerows(rows)
    for name, items in (("train_val_list.txt", train_val), ("test_list.txt", test)):
        if items is not None:
            (root / name).write_text("".join(f"{x}\n" for x in items))
    rng = np.random.default_rng(0)
    for rel in images:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (37, 41), dtype=np.uint8)).save(root / rel)


def _row(image, labels, patient, view="PA", follow=0):
    return [image, labels, follow, patient, 50, "M", view, 1024, 1024, 0.14, 0.14]


def test_small_written_csv_official_split_and_rejects(tmp_path):
    root = tmp_path / "nih"
    rows = [_row("00000001_000.png", "Cardiomegaly", 1), _row("00000001_001.png", "No Finding", 1, "AP", 1),
            _row("00000002_000.png", "Effusion|Hernia", 2), _row("00000003_000.png", "Mass", 3, ""),
            _row("00000001_000.png", "Mass", 1),                        # repeated Image Index
            _row("00000004_000.png", "Fever", 4),                       # unknown finding
            _row("00000005_000.png", "Nodule", 5)]                      # in neither list
    _write_nih(root, rows, train_val=["00000001_000.png", "00000001_001.png", "00000003_000.png", "00000004_000.png"],
               test=["00000002_000.png"],
               images=["images_001/images/00000001_000.png", "images_001/images/00000001_001.png",
                       "images_002/00000002_000.png", "images_002/00000003_000.png"])
    table = load_nih(root, holdout=(0.0, 0.3))  # no validation draw: every train_val patient is train
    by_id = {s.study_id: s for s in table.studies}
    assert sorted(by_id) == ["00000001_000", "00000001_001", "00000002_000", "00000003_000"]
    assert {k: s.split for k, s in by_id.items()} == {"00000001_000": "train", "00000001_001": "train",
                                                      "00000002_000": "test", "00000003_000": "train"}
    assert all(len(s.images()) == 1 and s.images()[0].dicom_id == k for k, s in by_id.items())  # study = image
    assert [(s.frontal[0].view_position, s.frontal[0].path) for s in (by_id["00000001_001"], by_id["00000002_000"])] \
        == [("AP", os.path.join("images_001", "images", "00000001_001.png")),
            ("PA", os.path.join("images_002", "00000002_000.png"))]
    assert by_id["00000003_000"].unknown and not by_id["00000003_000"].frontal  # blank View Position
    assert by_id["00000002_000"].labels.tolist() == _vector({"Pleural Effusion"})
    assert by_id["00000002_000"].other_labels == "Hernia"
    reasons = " | ".join(r for _, r in table.rejects)
    assert len(table.rejects) == 3 and "repeated" in reasons and "Fever" in reasons and "neither" in reasons
    everything_validate = load_nih(root, holdout=(0.999999, 0.0))
    assert {s.study_id: s.split for s in everything_validate.studies}["00000001_000"] == "validate"
    assert {s.study_id: s.split for s in everything_validate.studies}["00000002_000"] == "test"  # the list's


def test_split_lists_absent_or_half_present(tmp_path, caplog):
    root = tmp_path / "nolists"
    _write_nih(root, [_row("00000001_000.png", "Mass", 1), _row("00000002_000.png", "No Finding", 2)],
               train_val=None, test=None)
    table = load_nih(root, holdout=(0.0, 0.999999))  # the seeded hash: here every patient is test
    assert {s.split for s in table.studies} == {"test"} and "seeded hash" in caplog.text
    half = tmp_path / "half"
    _write_nih(half, [_row("00000001_000.png", "Mass", 1)], train_val=["00000001_000.png"], test=None)
    with pytest.raises(DataError, match="test_list.txt"):
        load_nih(half)
    with pytest.raises(DataError, match="Data_Entry_2017.csv"):
        load_nih(tmp_path / "nolists" / "..", csv_path=tmp_path / "absent.csv")


def test_phantom_layout_through_prepare_equals_its_truth(tmp_path):
    """phantom --layout nih-cxr14 -> prepare --source nih-cxr14:DIR: frontal films only, one
    study each; labels as NIH states them with the never-stated ones missing (-1) under
    the default blank policy; test_list.txt's split; the broken files rejected."""
    root = tmp_path / "nih"
    generate_phantom(root, 14, seed=3, size=32, corrupt=3, workers=1, progress=False, layout="nih-cxr14",
                     split="0.5,0.25,0.25", findings="cross-view")
    with open(root / "phantom_truth.csv", newline="") as handle:
        truth = list(csv.DictReader(handle))
    prepare_cache(f"nih-cxr14:{root}", tmp_path / "cache", size=32, workers=1, progress=False)  # blank="zeros"
    index = read_index(tmp_path / "cache")
    good = {r["dicom_id"]: r for r in truth if not r["corrupt"]}
    got = {str(d): i for i, d in enumerate(index.dicom_id)}
    assert set(got) == set(good) and len(good) >= 10
    assert set(index.view) == {"frontal"} and list(index.study_id) == list(index.dicom_id)
    stated = {"1.0": 1, "0.0": 0, "": -1}
    for image, row in good.items():
        i = got[image]
        assert index.labels[i].tolist() == [stated[row[name]] for name in CHEXPERT_LABELS], image
        assert index.other_labels[i] == row["other_findings"] and index.subject_id[i] == row["subject_id"]
        assert index.split[i] == row["split"] if row["split"] else index.split[i] in ("train", "validate")
    assert {r["split"] for r in good.values()} >= {"test", ""}
    assert any(r["other_findings"] for r in good.values()) and any(r["No Finding"] == "1.0" for r in good.values())
    with open(tmp_path / "cache" / "rejects.csv", newline="") as handle:
        rejected = {row["path"] for row in csv.DictReader(handle)}
    # by file name: the reader cannot know which images*/ folder an absent file would be in
    assert {os.path.basename(p) for p in rejected} == {os.path.basename(r["path"]) for r in truth if r["corrupt"]}
    assert len(rejected) >= 1


def test_readme_nih_table_is_the_code_s():
    from pathlib import Path

    from fastssl.data.nih import NIH_OTHER, NIH_TO_CHEXPERT

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("| NIH finding | label | NIH finding | label |", 1)[1].split("\n\n", 1)[0]
    stated = {}
    for line in table.strip().splitlines()[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        for findings, label in (cells[0:2], cells[2:4]):
            stated.update({f.strip(): label for f in findings.split(",")})
    assert stated.pop("No Finding") == "No Finding"
    assert {f for f, label in stated.items() if label.startswith("none")} == set(NIH_OTHER)
    assert {f: label for f, label in stated.items() if not label.startswith("none")} == NIH_TO_CHEXPERT
