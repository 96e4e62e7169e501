"""Study tables from the MIMIC-CXR CSVs and from a header scan: pairing, labels, counts."""
from __future__ import annotations

import csv
import gzip
import os

import numpy as np
import pytest

from dicom_factory import make_dicom, make_tree
from fastssl.data.mimic import (
    CHEXPERT_LABELS,
    classify_view,
    load_mimic_csv,
    mimic_path,
    parse_labels,
    scan_dicom_tree,
)
from fastssl.errors import DataError

# (subject, study, [ViewPosition...]); None = tag absent / blank in the CSV.
STUDIES = [
    ("10000001", "50000001", ["PA", "LATERAL"]),
    ("10000001", "50000002", ["AP", "PA", "LL"]),       # PA preferred over AP
    ("10000002", "50000003", ["AP"]),                   # frontal only
    ("10000003", "50000004", ["LATERAL"]),              # lateral only
    ("10000004", "50000005", [None, "PA"]),             # frontal only + unknown
    ("10000005", "50000006", ["AP AXIAL"]),             # other view only: neither
    ("11000006", "50000007", ["PA", "LATERAL", None]),  # both + unknown
]


def write_csv(path, header, rows):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def write_mimic_csvs(root, gz=True, labels=None):
    ext = ".csv.gz" if gz else ".csv"
    meta, split = [], []
    for k, (subject, study, views) in enumerate(STUDIES):
        for j, vp in enumerate(views):
            dicom_id = f"{study}-{j:02d}"
            meta.append([dicom_id, subject, study, "CHEST", vp or "", 2048, 2048])
            split.append([dicom_id, study, subject, "test" if k == 2 else "train"])
    write_csv(os.path.join(root, f"mimic-cxr-2.0.0-metadata{ext}"),
              ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
               "Rows", "Columns"], meta)
    write_csv(os.path.join(root, f"mimic-cxr-2.0.0-split{ext}"), ["dicom_id", "study_id", "subject_id", "split"], split)
    if labels is None:
        labels = {}
    rows = []
    for subject, study, _ in STUDIES:
        values = labels.get(study, ["1.0", "0.0", "-1.0", ""] + [""] * 10)
        rows.append([subject, study] + values)
    write_csv(os.path.join(root, f"mimic-cxr-2.0.0-chexpert{ext}"), ["subject_id", "study_id", *CHEXPERT_LABELS], rows)


EXPECTED = dict(studies=7, both=3, frontal_only=2, lateral_only=1, neither=1, images=13,
                frontal_images=6, lateral_images=4, other_images=1, unknown_images=2, rejects=0)


@pytest.mark.parametrize("gz", [True, False])
def test_csv_table_counts_and_order(tmp_path, gz):
    write_mimic_csvs(tmp_path, gz=gz)
    table = load_mimic_csv(tmp_path)
    assert table.summary() == EXPECTED
    by_id = {s.study_id: s for s in table.studies}
    s2 = by_id["50000002"]
    assert [r.view_position for r in s2.frontal] == ["PA", "AP"]
    assert [r.view_position for r in s2.lateral] == ["LL"]
    assert s2.frontal[0].path == "files/p10/p10000001/s50000002/50000002-01.dcm"
    assert by_id["50000003"].split == "test" and s2.split == "train"
    assert [r.view for r in by_id["50000005"].unknown] == ["unknown"]
    assert [s.study_id for s in table.studies] == sorted(s.study_id for s in table.studies)
    # configurable order: AP preferred
    table = load_mimic_csv(tmp_path, frontal_order=("AP", "PA"))
    assert [r.view_position for r in {s.study_id: s for s in table.studies}["50000002"].frontal] == ["AP", "PA"]
    assert "both views 3" in table.format_summary()


@pytest.mark.parametrize("uncertain, blank, expected", [
    ("zeros", "zeros", [1, 0, 0, 0]),
    ("ones", "zeros", [1, 0, 1, 0]),
    ("ignore", "zeros", [1, 0, -1, 0]),
    ("zeros", "ignore", [1, 0, 0, -1]),
    ("ones", "ones", [1, 0, 1, 1]),
])
def test_label_policies(tmp_path, uncertain, blank, expected):
    write_mimic_csvs(tmp_path)
    table = load_mimic_csv(tmp_path, uncertain=uncertain, blank=blank)
    labels = table.studies[0].labels
    assert labels.dtype == np.int8 and labels.shape == (14,)
    assert labels[:4].tolist() == expected
    assert set(labels[4:].tolist()) == {expected[3]}


def test_label_errors(tmp_path):
    with pytest.raises(ValueError, match="uncertain"):
        parse_labels({}, uncertain="maybe")
    write_mimic_csvs(tmp_path, labels={"50000001": ["2.0"] + [""] * 13})
    # A bad labels row is listed (its study's images rejected, naming the row), never fatal.
    table = load_mimic_csv(tmp_path)
    assert "50000001" not in {s.study_id for s in table.studies}
    assert table.rejects and all("Atelectasis" in reason and "chexpert" in reason for _, reason in table.rejects)
    with pytest.raises(DataError, match="metadata"):
        load_mimic_csv(tmp_path / "nowhere")


def test_check_files_rejects_missing(tmp_path):
    write_mimic_csvs(tmp_path)
    present = mimic_path("10000001", "50000001", "50000001-00")
    os.makedirs(os.path.dirname(tmp_path / present), exist_ok=True)
    (tmp_path / present).write_bytes(b"x")
    table = load_mimic_csv(tmp_path, check_files=True)
    assert table.summary()["images"] == 1 and len(table.rejects) == 12
    assert all(reason == "no such file" for _, reason in table.rejects)


def test_classify_view():
    assert classify_view(" pa ") == "frontal" and classify_view("LL") == "lateral"
    assert classify_view("") == "unknown" and classify_view(None) == "unknown"
    assert classify_view("LAO") == "other"


@pytest.mark.parametrize("workers", [1, 2])
def test_scan_pairs_by_study_uid_and_view(tmp_path, workers):
    studies = [dict(subject_id=s, study_id=st, views=v) for s, st, v in STUDIES]
    paths = make_tree(tmp_path, studies, size=8)
    (tmp_path / "files" / "broken.dcm").write_bytes(b"not a dicom")
    # enough files to use the pool when workers=2
    table = scan_dicom_tree(tmp_path, workers=workers, paths=None if workers == 1 else paths * 5 + [str(tmp_path / "files" / "broken.dcm")])
    summary = table.summary()
    if workers == 1:
        assert summary == dict(EXPECTED, rejects=1)
    else:  # every file listed five times: the same SOPInstanceUIDs, kept once, repeats listed
        assert summary == dict(EXPECTED, rejects=1 + 4 * 13)
        assert sum("duplicate SOPInstanceUID" in reason for _, reason in table.rejects) == 4 * 13
    broken = [reason for path, reason in table.rejects if path.endswith("broken.dcm")]
    assert len(broken) == 1 and "not a DICOM file" in broken[0]  # the reader names why
    by_id = {s.study_id: s for s in table.studies}
    assert [r.view_position for r in by_id["50000002"].frontal][:2] in (["PA", "AP"], ["PA", "PA"])
    assert by_id["50000002"].frontal[0].path.startswith("files/p10/p10000001/s50000002/")
    assert by_id["50000001"].subject_id == "10000001"
    assert {s.split for s in table.studies} <= {"train", "validate", "test"}


def test_scan_outside_mimic_layout_uses_uids(tmp_path):
    uid = "1.2.826.0.1.3680043.8.498.42"
    make_dicom(tmp_path / "a.dcm", np.zeros((4, 4)), view_position="PA", study_uid=uid, patient_id="P1")
    make_dicom(tmp_path / "b.dcm", np.zeros((4, 4)), view_position="LATERAL", study_uid=uid, patient_id="P1")
    make_dicom(tmp_path / "c.dcm", np.zeros((4, 4)), view_position=None, patient_id="P2")
    table = scan_dicom_tree(tmp_path, workers=1)
    s = table.summary()
    assert (s["studies"], s["both"], s["neither"], s["unknown_images"]) == (2, 1, 1, 1)
    paired = [st for st in table.studies if st.paired][0]
    assert paired.study_id == uid and paired.subject_id == "P1"
    assert paired.frontal[0].dicom_id == "a" and paired.lateral[0].path == "b.dcm"


# ---- on the phantom (real DICOM in the MIMIC-CXR layout, with a ground truth) ----

@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    phantom_mod = pytest.importorskip("fastssl.data.phantom")
    root = tmp_path_factory.mktemp("phantom")
    phantom_mod.generate_phantom(root, 40, seed=5, size=48, corrupt=3, workers=1, progress=False,
                                 no_view_position_fraction=0.1)
    with open(root / "phantom_truth.csv", newline="") as handle:
        truth = list(csv.DictReader(handle))
    return root, truth


def _expected_from_truth(truth):
    by_study: dict[str, dict[str, set]] = {}
    for row in truth:
        views = by_study.setdefault(row["study_id"], {"frontal": set(), "lateral": set(), "unknown": set()})
        # without ViewPosition an image's view comes from ViewCodeSequence or a procedure
        # naming one view, else it is "unknown"; the phantom states which (expected_view)
        views[row["expected_view"]].add(row["dicom_id"])
    return by_study


def _views_of(table):
    return {s.study_id: {v: {r.dicom_id for r in getattr(s, v)} for v in ("frontal", "lateral", "unknown")}
            for s in table.studies}


def test_phantom_csv_pairing_matches_truth(phantom):
    root, truth = phantom
    expected = _expected_from_truth(truth)
    table = load_mimic_csv(root)
    assert _views_of(table) == expected
    s = table.summary()
    assert s["images"] == len(truth) and s["other_images"] == 0
    assert s["unknown_images"] == sum(1 for r in truth if r["expected_view"] == "unknown") > 0
    # some images without ViewPosition were resolved, each from the field the phantom kept
    resolved = [r for r in truth if not r["view_position"] and r["expected_view"] != "unknown"]
    assert resolved
    sources = {r.dicom_id: r.view_source for s in table.studies for r in s.images()}
    assert {sources[r["dicom_id"]] for r in resolved} == {"ViewCodeSequence", "ProcedureDescription"}
    both = sum(1 for v in expected.values() if v["frontal"] and v["lateral"])
    assert s["both"] == both and s["studies"] == len(expected)
    for study in table.studies:  # each truth view agrees with the ViewPosition class
        for view in ("frontal", "lateral"):
            assert all(r.view_position in (FRONTAL if view == "frontal" else LATERAL) for r in getattr(study, view))


FRONTAL, LATERAL = ("PA", "AP"), ("LATERAL", "LL")


def test_phantom_scan_pairs_like_the_csvs(phantom):
    root, truth = phantom
    scanned = scan_dicom_tree(root, workers=2)
    assert _views_of(scanned) == _expected_from_truth(truth)
    # corrupt files still have readable headers (truncated pixels, no pixels, bad JPEG 2000):
    # the scan keeps them; the cache rejects them when it reads the pixels.
    assert scanned.rejects == []
    by_id = {s.study_id: s for s in load_mimic_csv(root).studies}
    for s in scanned.studies:
        assert s.subject_id == by_id[s.study_id].subject_id


def test_split_of_a_study_comes_from_its_first_listed_image(tmp_path):
    # split CSV lists only some images: a study takes the first listed image's split, a study
    # with no listed image is "unknown"; without a split CSV every study is "train"
    write_mimic_csvs(tmp_path, gz=False)
    listed = [["50000002-01", "50000002", "10000001", "validate"], ["50000007-02", "50000007", "11000006", "test"]]
    write_csv(tmp_path / "mimic-cxr-2.0.0-split.csv", ["dicom_id", "study_id", "subject_id", "split"], listed)
    splits = {s.study_id: s.split for s in load_mimic_csv(tmp_path).studies}
    want = {s: "unknown" for _, s, _ in STUDIES} | {"50000002": "validate", "50000007": "test"}
    want["50000001"] = "validate"  # patient 10000001's other study: a patient's studies share a split
    assert splits == want
    os.remove(tmp_path / "mimic-cxr-2.0.0-split.csv")
    assert {s.split for s in load_mimic_csv(tmp_path).studies} == {"train"}
