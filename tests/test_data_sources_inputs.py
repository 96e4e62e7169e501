"""Bad and awkward inputs: malformed CSV rows, patients in two splits, unreadable
directories, repeated SOPInstanceUIDs, colliding study UIDs, the user's own labels and
splits for a scanned tree, the view fallbacks, and prepare's argument checks."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from dicom_factory import make_dicom, make_tree, write_csv
from fastssl.data.cache import prepare_cache, read_index
from fastssl.data.chexpert import chexpert_view, load_chexpert, load_chexpert_plus
from fastssl.data.mimic import (
    CHEXPERT_LABELS,
    Study,
    enforce_patient_splits,
    load_mimic_csv,
    resolve_view,
    scan_dicom_tree,
)
from fastssl.data.padchest import load_padchest, padchest_labels, parse_label_list
from fastssl.errors import DataError

LAB = {name: i for i, name in enumerate(CHEXPERT_LABELS)}


# ---------------------------------------------------------------- views

def test_resolve_view_falls_back_field_by_field():
    assert resolve_view(" pa ", view_code="lateral", procedure="CHEST (PORTABLE AP)") == ("PA", "ViewPosition")
    assert resolve_view("", view_code="postero-anterior") == ("PA", "ViewCodeSequence")
    assert resolve_view(None, view_code="antero-posterior") == ("AP", "ViewCodeSequence")
    assert resolve_view(None, view_code="left lateral") == ("LL", "ViewCodeSequence")
    assert resolve_view(None, view_code="Lateral") == ("LATERAL", "ViewCodeSequence")
    assert resolve_view(None, procedure="CHEST (PORTABLE AP)") == ("AP", "ProcedureDescription")
    assert resolve_view(None, procedure="CHEST LAT ONLY") == ("LATERAL", "ProcedureDescription")
    assert resolve_view(None, procedure="CHEST (PA AND LAT)") == ("", "")  # names two views
    assert resolve_view(None, procedure="CHEST (SINGLE VIEW)") == ("", "")
    assert resolve_view(None, view_code="erect") == ("", "")


def test_scan_resolves_a_missing_view_position_from_the_view_code_sequence(tmp_path):
    from pydicom import dcmread
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    path = make_dicom(tmp_path / "a.dcm", np.zeros((4, 4)), view_position=None, patient_id="P1")
    ds = dcmread(path)
    code = Dataset()
    code.CodeMeaning = "antero-posterior"
    ds.ViewCodeSequence = Sequence([code])
    ds.save_as(path)
    make_dicom(tmp_path / "b.dcm", np.zeros((4, 4)), view_position=None, patient_id="P2")
    ds = dcmread(tmp_path / "b.dcm")
    ds.PerformedProcedureStepDescription = "CHEST (PORTABLE AP)"
    ds.save_as(tmp_path / "b.dcm")
    images = {r.dicom_id: r for s in scan_dicom_tree(tmp_path, workers=1).studies for r in s.images()}
    assert (images["a"].view, images["a"].view_position, images["a"].view_source) == ("frontal", "AP", "ViewCodeSequence")
    assert (images["b"].view, images["b"].view_source) == ("frontal", "ProcedureDescription")


def test_chexpert_view_columns():
    assert chexpert_view("Frontal", "PA", "x/view1_frontal.jpg") == ("frontal", "PA", "Frontal/Lateral")
    assert chexpert_view("Lateral", "", "x/view2_lateral.jpg") == ("lateral", "LATERAL", "Frontal/Lateral")
    assert chexpert_view("Frontal", "", "x/view1_frontal.jpg") == ("frontal", "", "Frontal/Lateral")
    assert chexpert_view("", "", "x/view2_lateral.jpg") == ("lateral", "LATERAL", "file name")
    assert chexpert_view("Frontal", "LL", "x/view1_frontal.jpg")[0] == "other"  # AP/PA outside frontal_order
    assert chexpert_view("", "", "x/view1.jpg") == ("unknown", "", "")


# ---------------------------------------------------------------- labels

# agostini335/MVMAE utils/padchest_to_mimic_mapping.csv, read by hand: finding (stripped of
# the leading space PadChest's lists carry) -> target; where the file lists a finding twice
# with different targets, the later row (its closing revision block) is the one kept.
RELEASED_PADCHEST = {
    "Atelectasis": "total atelectasis; round atelectasis; laminar atelectasis; lobar atelectasis; "
                   "segmental atelectasis; atelectasis basal; atelectasis",
    "Cardiomegaly": "cardiomegaly",
    "Consolidation": "infiltrates; consolidation",
    "Edema": "pulmonary edema; kerley lines",
    "Enlarged Cardiomediastinum": "azygoesophageal recess shift; mediastinal shift; descendent aortic elongation; "
                                  "supra aortic elongation; superior mediastinal enlargement; "
                                  "pulmonary artery enlargement; hilar enlargement; aortic aneurysm; aortic elongation; "
                                  "aortic button enlargement; hilar congestion; ascendent aortic elongation; "
                                  "vascular hilar enlargement; mediastinal enlargement; aortic atheromatosis; "
                                  "heart insufficiency; tracheal shift; vascular redistribution; "
                                  "central vascular redistribution; pulmonary hypertension; "
                                  "pulmonary artery hypertension; pulmonary venous hypertension",
    "Fracture": "rib fracture; humeral fracture; clavicle fracture; vertebral compression; vertebral fracture; "
                "vertebral anterior compression; fracture; callus rib fracture",
    "Lung Lesion": "multiple nodules; cavitation; pulmonary fibrosis; sclerotic bone lesion; granuloma; nodule; mass; "
                   "calcified granuloma; lepidic adenocarcinoma; pulmonary mass; blastic bone lesion; "
                   "tuberculosis sequelae; lytic bone lesion; abscess; empyema; lung metastasis; pseudonodule; "
                   "calcified densities; tuberculosis; bone metastasis; cyst; soft tissue mass; calcified adenopathy; "
                   "calcified mediastinal adenopathy; lymphangitis carcinomatosa; calcified fibroadenoma; breast mass; "
                   "fibrotic band; mediastinal mass; adenopathy; pleural mass; air fluid level",
    "Lung Opacity": "miliary opacities; interstitial pattern; bullas; reticulonodular interstitial pattern; "
                    "ground glass pattern; air trapping; alveolar pattern; volume loss; copd signs; hyperinflated lung; "
                    "hypoexpansion; air bronchogram; hypoexpansion basal; bronchiectasis; reticular interstitial pattern; "
                    "emphysema; increased density; asbestosis signs; hiatal hernia; hemidiaphragm elevation; "
                    "bronchovascular markings; diaphragmatic eventration; flattened diaphragm; lung vascular paucity",
    "Pleural Effusion": "loculated fissural effusion; pericardial effusion; costophrenic angle blunting; "
                        "hydropneumothorax; pleural effusion; loculated pleural effusion",
    "Pleural Other": "major fissure thickening; fissure thickening; apical pleural thickening; pleural thickening; "
                     "calcified pleural thickening; calcified pleural plaques; pleural plaques; minor fissure thickening",
    "Pneumonia": "pneumonia; atypical pneumonia",
    "Pneumothorax": "subcutaneous emphysema; pneumoperitoneo; pneumothorax; pneumomediastinum",
    "Support Devices": "pacemaker; reservoir central venous catheter; central venous catheter via jugular vein; "
                       "sternotomy; artificial mitral heart valve; endotracheal tube; surgery neck; "
                       "single chamber device; aortic endoprosthesis; central venous catheter; tracheostomy tube; "
                       "mastectomy; prosthesis; gastrostomy tube; surgery lung; double j stent; "
                       "artificial aortic heart valve; central venous catheter via subclavian vein; humeral prosthesis; "
                       "nephrostomy tube; external foreign body; surgery humeral; chest drain tube; "
                       "artificial heart valve; surgery breast; mammary prosthesis; ventriculoperitoneal drain tube; "
                       "surgery; metal; dual chamber device; surgery heart; catheter; abnormal foreign body; nsg tube; "
                       "post radiotherapy changes; electrical device; suture material; "
                       "central venous catheter via umbilical vein; osteosynthesis material; endoprosthesis; "
                       "bone cement; heart valve calcified",
    "No Finding": "respiratory distress; mediastinic lipomatosis; end on vessel; osteoporosis; scoliosis; "
                  "thoracic cage deformation; osteopenia; vertebral degenerative changes; suboptimal study; goiter; "
                  "dextrocardia; lipomatosis; unchanged; subacromial space narrowing; nipple shadow; dai; exclude; "
                  "normal; pectum excavatum; esophagic dilatation; non axial articular degenerative changes; "
                  "chronic changes; cervical rib; pectum carinatum; obesity; kyphosis; "
                  "sternoclavicular junction hypertrophy; chilaiditi sign; azygos lobe; axial hyperostosis; "
                  "gynecomastia; costochondral junction hypertrophy; right sided aortic arch",
}
# The findings the released file first maps to "No Finding" and revises in its closing block.
RELEASED_REVISED = (
    "diaphragmatic eventration", "pulmonary artery hypertension", "heart valve calcified", "aortic atheromatosis",
    "pulmonary hypertension", "kerley lines", "hemidiaphragm elevation", "tracheal shift", "flattened diaphragm",
    "vascular redistribution", "air fluid level", "pulmonary venous hypertension", "hiatal hernia",
    "central vascular redistribution", "bronchovascular markings", "lung vascular paucity", "heart insufficiency",
)


def test_shipped_padchest_table_is_the_released_mapping():
    """Every finding of the released map, with its target, and nothing else."""
    from fastssl.data.padchest import mapping_table

    want = {f.strip(): (target,) for target, names in RELEASED_PADCHEST.items() for f in names.split(";")}
    assert len(want) == 193
    assert mapping_table() == want
    assert len(RELEASED_REVISED) == 17  # README: "17 findings first go to No Finding"
    for finding in RELEASED_REVISED:  # the later row of the released file wins
        assert want[finding] != ("No Finding",)


def test_padchest_label_lists_map_through_the_shipped_table():
    assert parse_label_list("['pleural effusion', ' cardiomegaly']") == ["pleural effusion", "cardiomegaly"]
    assert parse_label_list("") is None and parse_label_list("nan") is None
    labels, other = padchest_labels(["consolidation", " scoliosis".strip(), "pacemaker"], blank_value=0)
    assert other == "scoliosis"  # released: scoliosis -> "No Finding", i.e. no label
    assert {CHEXPERT_LABELS[i] for i in np.flatnonzero(labels)} == {"Consolidation", "Support Devices"}
    revised, other = padchest_labels(["hiatal hernia", "kerley lines", "mediastinal mass", "copd signs"], 0)
    assert {CHEXPERT_LABELS[i] for i in np.flatnonzero(revised)} == {"Lung Opacity", "Edema", "Lung Lesion"}
    assert other == ""
    unknown, other = padchest_labels(["scoliosis", "made-up finding", "normal"], blank_value=0)
    assert other == "scoliosis;made-up finding" and unknown[LAB["No Finding"]] == 1 and unknown.sum() == 1
    normal, _ = padchest_labels(["normal"], blank_value=0)
    assert normal.tolist() == [int(n == "No Finding") for n in CHEXPERT_LABELS]
    devices_only, _ = padchest_labels(["pacemaker", "scoliosis"], blank_value=0)  # CheXpert: devices are no finding
    assert devices_only[LAB["No Finding"]] == 1 and devices_only[LAB["Support Devices"]] == 1
    blank, other = padchest_labels(None, blank_value=-1)
    assert blank.tolist() == [-1] * 14 and other == ""


# ---------------------------------------------------------------- malformed rows, never a crash

CHEX_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]


def _chex_row(path, view="Frontal", ap_pa="PA", **labels):
    return [path, "Female", "50", view, ap_pa, *[labels.get(n.replace(" ", "_"), "") for n in CHEXPERT_LABELS]]


def test_chexpert_malformed_rows_are_listed(tmp_path):
    root = tmp_path / "CheXpert-v1.0-small"
    root.mkdir()
    p = "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"
    write_csv(root / "train.csv", CHEX_HEADER, [
        _chex_row(p, Cardiomegaly="1.0", Edema="-1.0"),
        _chex_row(p),  # repeated path
        _chex_row("CheXpert-v1.0-small/train/somewhere/else.jpg"),  # not patient/study
        _chex_row("CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg", Edema="2.0"),  # bad label
        _chex_row("CheXpert-v1.0-small/train/patient00001/study1/view2_lateral.jpg", "Lateral", ""),
    ])
    write_csv(root / "valid.csv", CHEX_HEADER, [
        _chex_row("CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg", Pneumonia="1.0")])
    table = load_chexpert(tmp_path, uncertain="ignore", test_fraction=0.0)
    reasons = [r for _, r in table.rejects]
    assert len(reasons) == 3
    assert any("repeated" in r for r in reasons) and any("patientN/studyN" in r for r in reasons)
    assert any("Edema" in r and "2.0" in r for r in reasons)
    study = {s.study_id: s for s in table.studies}["patient00001_study1"]
    assert study.paired and study.split == "train"
    assert study.labels[LAB["Cardiomegaly"]] == 1 and study.labels[LAB["Edema"]] == -1
    assert {s.study_id: s.split for s in table.studies}["patient64541_study1"] == "validate"
    assert table.root == str(tmp_path)  # paths in the CSV start with the folder's name
    # prepare lists the CSV rejects and the (absent) image files, and does not crash
    with pytest.raises(DataError, match="none of the 3 images could be read"):
        prepare_cache(f"chexpert:{tmp_path}", tmp_path / "cache", size=16, workers=1, progress=False)
    with open(tmp_path / "cache" / "rejects.csv") as handle:
        rejects = handle.read()
    assert rejects.count("no such file") == 3 and "repeated" in rejects and "Edema" in rejects


def test_chexpert_test_fraction_is_a_seeded_patient_split(tmp_path):
    rows = [_chex_row(f"train/patient{p:05d}/study{s}/view1_frontal.jpg") for p in range(1, 400) for s in (1, 2)]
    write_csv(tmp_path / "train.csv", CHEX_HEADER, rows)
    write_csv(tmp_path / "valid.csv", CHEX_HEADER, [])
    splits = [{s.study_id: s.split for s in load_chexpert(tmp_path, test_fraction=0.2, seed=seed).studies}
              for seed in (0, 0, 1)]
    assert splits[0] == splits[1] and splits[0] != splits[2]
    assert 0.1 < np.mean([v == "test" for v in splits[0].values()]) < 0.3
    for p in range(1, 400):
        assert splits[2][f"patient{p:05d}_study1"] == splits[2][f"patient{p:05d}_study2"]


def test_chexpert_plus_csv_and_labels(tmp_path):
    header = ["path_to_image", "path_to_dcm", "frontal_lateral", "ap_pa", "deid_patient_id", "split"]
    write_csv(tmp_path / "df_chexpert_plus_240401.csv", header, [
        ["train/patient00001/study1/view1_frontal.jpg", "", "Frontal", "AP", "pid1", "train"],
        ["train/patient00001/study1/view2_lateral.jpg", "", "Lateral", "", "pid1", "train"],
        ["valid/patient00009/study1/view1_frontal.jpg", "", "Frontal", "PA", "pid9", "valid"],
        ["valid/patient00009/study1/view2_frontal.jpg", "", "Frontal", "PA", "pid9", "holdout?"],
    ])
    write_csv(tmp_path / "labels.csv", ["path_to_image", *CHEXPERT_LABELS],
              [["train/patient00001/study1/view1_frontal.jpg", *(["1.0"] + [""] * 13)]])
    (tmp_path / "PNG" / "train").mkdir(parents=True)
    table = load_chexpert_plus(tmp_path, labels=tmp_path / "labels.csv", blank="ignore", test_fraction=0.0)
    assert table.root == str(tmp_path / "PNG") and len(table.rejects) == 1 and "holdout?" in table.rejects[0][1]
    by_id = {s.study_id: s for s in table.studies}
    first = by_id["patient00001_study1"]
    assert first.subject_id == "pid1" and first.paired and first.frontal[0].path.endswith("view1_frontal.png")
    assert first.labels[0] == 1 and set(first.labels[1:].tolist()) == {-1}
    assert by_id["patient00009_study1"].split == "validate"


def test_padchest_malformed_rows_are_listed(tmp_path):
    header = ["ImageID", "ImageDir", "StudyID", "PatientID", "Projection", "Labels", "BitsStored_DICOM",
              "PhotometricInterpretation_DICOM", "ViewPosition_DICOM"]
    write_csv(tmp_path / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz", header, [
        ["a.png", "0", "S1", "P1", "PA", "['normal']", "12", "MONOCHROME1", ""],
        ["a.png", "0", "S1", "P1", "PA", "['normal']", "12", "", ""],  # repeated ImageID
        ["", "0", "S2", "P2", "PA", "['normal']", "12", "", ""],  # no ImageID
        ["c.png", "0", "S3", "P3", "L", "['nodule']", "twelve", "", ""],  # bad bits
        ["d.png", "1", "S4", "P4", "UNK", "", "", "", "POSTEROANTERIOR"],
        ["e.png", "1", "S4", "P4", "COSTAL", "", "", "", ""],
    ])
    table = load_padchest(tmp_path, blank="ignore")
    assert len(table.rejects) == 3
    images = {r.dicom_id: (r, s) for s in table.studies for r in s.images()}
    a, _ = images["a"]
    assert a.path == os.path.join("0", "a.png") and dict(a.pixel) == {"bits_stored": 12, "monochrome1": True}
    d, s4 = images["d"]
    assert (d.view, d.view_position, d.view_source) == ("frontal", "PA", "ViewPosition_DICOM")
    assert images["e"][0].view == "other" and s4.labels.tolist() == [-1] * 14


def test_mimic_repeated_dicom_id_is_kept_once_and_listed(tmp_path):
    header = ["dicom_id", "subject_id", "study_id", "ViewPosition"]
    write_csv(tmp_path / "mimic-cxr-2.0.0-metadata.csv", header, [
        ["d1", "10000001", "50000001", "PA"], ["d1", "10000001", "50000001", "LATERAL"],
        ["d2", "10000001", "50000001", ""]])
    table = load_mimic_csv(tmp_path)
    assert table.summary()["images"] == 2 and len(table.rejects) == 1 and "repeated" in table.rejects[0][1]


# ---------------------------------------------------------------- splits

def test_a_patient_in_two_splits_goes_wholly_to_the_most_held_out_one():
    labels = np.zeros(14, np.int8)
    studies = [Study("s1", "p1", "train", labels), Study("s2", "p1", "test", labels),
               Study("s3", "p2", "validate", labels), Study("s4", "p2", "train", labels),
               Study("s5", "p3", "train", labels)]
    assert enforce_patient_splits(studies) == 2
    assert [s.split for s in studies] == ["test", "test", "validate", "validate", "train"]


def test_scan_takes_the_users_labels_and_split(tmp_path):
    make_tree(tmp_path / "tree", [dict(subject_id="10000001", study_id="50000001", views=["PA", "LATERAL"]),
                                  dict(subject_id="10000001", study_id="50000002", views=["PA"]),
                                  dict(subject_id="10000002", study_id="50000003", views=["AP"])], size=8)
    write_csv(tmp_path / "labels.csv", ["study_id", *CHEXPERT_LABELS], [
        ["50000001", "1.0", "-1.0", *[""] * 12], ["50000003", "0.0", "bad", *[""] * 12]])
    write_csv(tmp_path / "split.csv", ["subject_id", "split"], [["10000001", "test"], ["10000002", "validate"]])
    table = scan_dicom_tree(tmp_path / "tree", workers=1, labels_csv=tmp_path / "labels.csv",
                            split_csv=tmp_path / "split.csv", uncertain="ones", blank="ignore")
    by_id = {s.study_id: s for s in table.studies}
    assert by_id["50000001"].labels.tolist()[:3] == [1, 1, -1] and by_id["50000001"].split == "test"
    assert by_id["50000002"].labels.tolist() == [-1] * 14 and by_id["50000002"].split == "test"
    assert "50000003" not in by_id and "bad" in table.rejects[0][1]  # its labels row is unusable: listed
    # through prepare: the CLI flags reach the table
    cache = tmp_path / "cache"
    prepare_cache(str(tmp_path / "tree"), cache, size=8, workers=1, progress=False, scan=True,
                  labels_csv=tmp_path / "labels.csv", split_csv=tmp_path / "split.csv")
    index = read_index(cache)
    assert set(index.split) == {"test"} and index.labels[:, 0].tolist() == [1, 1, 0]


@pytest.mark.parametrize("blank", ["zeros", "ones", "ignore"])
def test_scan_honours_the_blank_label_policy(tmp_path, blank):
    """Without labels every label of a scanned study follows the blank policy (issue 15, 9)."""
    make_tree(tmp_path, [dict(subject_id="10000001", study_id="50000001", views=["PA"])], size=8)
    table = scan_dicom_tree(tmp_path, workers=1, blank=blank)
    assert table.studies[0].labels.tolist() == [{"zeros": 0, "ones": 1, "ignore": -1}[blank]] * 14


# ---------------------------------------------------------------- scan reliability (issue 11 item 5)

def test_scan_lists_unreadable_directories(tmp_path, monkeypatch):
    make_tree(tmp_path, [dict(subject_id="10000001", study_id="50000001", views=["PA"]),
                         dict(subject_id="10000002", study_id="50000002", views=["PA"])], size=8)
    blocked = str(tmp_path / "files" / "p10" / "p10000002")
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path) == blocked:  # as root, chmod cannot deny a read: simulate EACCES
            raise PermissionError(13, "Permission denied", blocked)
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    table = scan_dicom_tree(tmp_path, workers=1)
    assert table.summary()["images"] == 1
    assert table.rejects == [(blocked, "unreadable directory (Permission denied)")]


def test_scan_trusts_the_folders_patient_over_a_colliding_study_uid(tmp_path):
    uid = "1.2.826.0.1.3680043.8.498.77"
    for subject, study, view, sop in (("10000001", "50000001", "PA", "1.2.3.1"),
                                      ("10000002", "50000009", "LATERAL", "1.2.3.2")):
        folder = tmp_path / "files" / "p10" / f"p{subject}" / f"s{study}"
        folder.mkdir(parents=True)
        make_dicom(folder / f"{study}.dcm", np.zeros((4, 4)), view_position=view, study_uid=uid,
                   patient_id=subject, sop_uid=sop)
    table = scan_dicom_tree(tmp_path, workers=1)
    assert [(s.subject_id, s.study_id, s.paired) for s in table.studies] == [
        ("10000001", "50000001", False), ("10000002", "50000009", False)]
    # outside the MIMIC folders the PatientID decides: a UID claimed by two patients is not merged
    make_dicom(tmp_path / "x.dcm", np.zeros((4, 4)), view_position="PA", study_uid="1.2.5", patient_id="A",
               sop_uid="1.2.3.5")
    make_dicom(tmp_path / "y.dcm", np.zeros((4, 4)), view_position="LATERAL", study_uid="1.2.5", patient_id="B",
               sop_uid="1.2.3.6")
    table = scan_dicom_tree(tmp_path, workers=1, paths=[str(tmp_path / "x.dcm"), str(tmp_path / "y.dcm")])
    assert [(s.subject_id, s.paired) for s in table.studies] == [("A", False)]
    assert table.rejects == [(str(tmp_path / "y.dcm"), "study 1.2.5 also belongs to patient A; this file's patient is B")]


def test_scan_keeps_a_repeated_sop_instance_uid_once(tmp_path):
    make_dicom(tmp_path / "a.dcm", np.zeros((4, 4)), patient_id="P1", sop_uid="1.2.3.4", study_uid="1.2.9")
    make_dicom(tmp_path / "b.dcm", np.ones((4, 4)), patient_id="P1", sop_uid="1.2.3.4", study_uid="1.2.9")
    table = scan_dicom_tree(tmp_path, workers=1)
    assert [r.dicom_id for r in table.studies[0].images()] == ["a"]
    assert table.rejects == [(str(tmp_path / "b.dcm"), f"duplicate SOPInstanceUID of {tmp_path / 'a.dcm'}; kept once")]


# ---------------------------------------------------------------- prepare's argument checks

@pytest.mark.parametrize("kwargs, match", [
    (dict(workers=-3), "--workers: got -3"),  # the one settings format (fastssl.config.check_settings)
    (dict(size=4), "--size: got 4"),
    (dict(size=100_000), "--size: got 100000"),
    (dict(workers=1.5), "--workers: got 1.5"),
    (dict(shard_size=0), "--shard-size: got 0"),
])
def test_prepare_rejects_bad_settings_before_any_work(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        prepare_cache(str(tmp_path), tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "fastssl", "prepare", *args, "--quiet"], capture_output=True,
                          text=True, timeout=120)


def test_prepare_cli_errors_are_one_line_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("x")
    for args, needle in (
        (["--source", str(tmp_path / "empty"), "--out", str(tmp_path / "c")], "no usable DICOM study"),
        (["--source", f"padchest:{tmp_path / 'empty'}", "--out", str(tmp_path / "c")], "PADCHEST"),
        (["--source", str(tmp_path / "empty"), "--out", str(tmp_path / "a_file")], "not a directory"),
        (["--source", str(tmp_path / "empty"), "--out", str(tmp_path / "c"), "--workers", "-3"], "--workers"),
        (["--source", str(tmp_path / "empty"), "--out", str(tmp_path / "c"), "--size", "100000"], "--size"),
        (["--source", str(tmp_path / "empty"), "--out", str(tmp_path / "c"), "--holdout", "0.5"], "--holdout"),
    ):
        result = _cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.stderr, result.stderr


def test_cli_sources_replace_those_of_a_config_file(tmp_path, capsys):
    from fastssl.cli import main as cli_main

    (tmp_path / "list.yaml").write_text(f"source: [{tmp_path / 'from_file_a'}, {tmp_path / 'from_file_b'}]\n")
    (tmp_path / "one.yaml").write_text(f"source: {tmp_path / 'from_file_c'}\n")
    out = ["--out", str(tmp_path / "c"), "--quiet"]
    assert cli_main(["prepare", "--config", str(tmp_path / "list.yaml"), *out]) == 2
    assert "from_file_a" in capsys.readouterr().err
    assert cli_main(["prepare", "--config", str(tmp_path / "one.yaml"), "--source",
                     f"padchest:{tmp_path / 'from_flag'}", *out]) == 2
    err = capsys.readouterr().err
    assert "padchest:" in err and "from_flag" in err and "from_file" not in err


def test_a_format_1_cache_is_still_read(tmp_path):
    """Caches written before the dataset/view_source/other_labels columns stay readable."""
    import csv
    import json

    make_tree(tmp_path / "tree", [dict(subject_id="10000001", study_id="50000001", views=["PA", "LATERAL"])], size=8)
    cache = tmp_path / "cache"
    prepare_cache(str(tmp_path / "tree"), cache, size=8, workers=1, progress=False)
    with open(cache / "index.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    old_columns = [c for c in rows[0] if c not in ("dataset", "view_source", "other_labels")]
    write_csv(cache / "index.csv", old_columns, [[r[c] for c in old_columns] for r in rows])
    manifest = json.loads((cache / "manifest.json").read_text())
    (cache / "manifest.json").write_text(json.dumps(dict(manifest, format_version=1)))
    index = read_index(cache)
    assert len(index) == 2 and index.dataset.tolist() == ["", ""] and index.view.tolist() == ["frontal", "lateral"]
    assert index.select(split=index.split[0]).all()
    with pytest.raises(ValueError, match="not in this cache"):
        index.select(dataset="mimic-cxr")
