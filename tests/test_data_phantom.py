"""The paired-view phantom: rendering, findings in both views, DICOM files, CSVs, resume."""
from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pydicom
import pytest

from fastssl import jobs
from fastssl.data import phantom
from fastssl.data.phantom import generate_phantom, render_study
from fastssl.errors import OutputLocked, ResumeMismatch

SIZE = 64
KW = dict(studies=12, seed=8, size=SIZE, corrupt=3, both_views_fraction=0.5, lateral_only_fraction=0.1,
          no_view_position_fraction=0.15, progress=False)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The same phantom written by one process and by two."""
    one = tmp_path_factory.mktemp("w1")
    two = tmp_path_factory.mktemp("w2")
    s1 = generate_phantom(one, workers=1, **KW)
    s2 = generate_phantom(two, workers=2, **KW)
    return one, two, s1, s2


def _files(root) -> dict[str, bytes]:
    """The phantom's files: every file under root but the job lock (touched by each run)."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            if name == jobs.LOCK_NAME:
                continue
            path = os.path.join(dirpath, name)
            with open(path, "rb") as handle:
                out[os.path.relpath(path, root)] = handle.read()
    return out


def _csv(path) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", newline="") as handle:
        return list(csv.DictReader(handle))


def _decode(ds) -> np.ndarray:
    """Stored -> modality (slope/intercept) -> VOI (LUT, else window) -> [0, 1], M1 inverted."""
    x = ds.pixel_array.astype(np.float64)
    x = x * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    if "VOILUTSequence" in ds:
        item = ds.VOILUTSequence[0]
        lut = np.asarray(item.LUTData, float)
        first, bits = int(item.LUTDescriptor[1]), int(item.LUTDescriptor[2])
        y = lut[np.clip(x.astype(np.int64) - first, 0, len(lut) - 1)] / (2**bits - 1)
    else:
        c, w = float(ds.WindowCenter), float(ds.WindowWidth)
        y = np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    return 1.0 - y if ds.PhotometricInterpretation == "MONOCHROME1" else y


# --------------------------------------------------------------------------- in memory
def test_render_study_is_deterministic_and_in_range():
    a = render_study(3, SIZE)
    b = render_study(np.random.default_rng(11), SIZE)
    again = render_study(3, SIZE)
    for key in ("frontal", "lateral"):
        img = a[key]
        assert img.shape == (SIZE, SIZE) and img.dtype == np.float32
        assert 0.0 <= img.min() and img.max() <= 1.0 and img.std() > 0.1
        np.testing.assert_array_equal(img, again[key])
        assert not np.array_equal(img, b[key])
    assert a["labels"] == again["labels"]
    only = render_study(3, SIZE, views=["lateral"])
    assert only["frontal"] is None
    np.testing.assert_array_equal(only["lateral"], a["lateral"])  # views render independently


def test_lungs_dark_mediastinum_bright():
    """Display convention: 1 = dense. Lung fields are darker than the midline and the
    abdomen in a frontal film; the spine (posterior) is brighter than the retrosternal
    lung in a lateral."""
    r = render_study(5, 128, findings=[], noise=False)
    f, lat = r["frontal"], r["lateral"]
    lungs = np.r_[f[40:70, 25:45].ravel(), f[40:70, 83:103].ravel()].mean()
    assert lungs < f[40:70, 58:70].mean() - 0.15
    assert lungs < f[112:124, 30:100].mean() - 0.15
    assert lat[50:70, 35:50].mean() < lat[50:70, 85:95].mean()


@pytest.mark.parametrize("finding", ["effusion", "cardiomegaly"])
def test_finding_shows_in_both_views_in_the_expected_region(finding):
    """The same study with and without the finding: the difference is large in both
    views, and where the 3-D anatomy puts it (effusion: the dependent lung base on its
    side; cardiomegaly: the heart growing left in the frontal, anterior in the lateral)."""
    n, seed = 96, 21
    base = render_study(seed, n, findings=[], noise=False)
    with_f = render_study(seed, n, findings=[finding], noise=False)
    grid_r, grid_c = np.mgrid[0:n, 0:n] / n
    com = {}
    for key in ("frontal", "lateral"):
        diff = with_f[key].astype(np.float64) - base[key]
        mass = np.clip(diff, 0, None) * (diff > 0.05)  # where the image got clearly denser
        assert mass.sum() > 20, (key, mass.sum())  # many pixels, well above the noise floor
        com[key] = ((mass * grid_r).sum() / mass.sum(), (mass * grid_c).sum() / mass.sum())
        assert diff[diff > 0.05].size > 0.005 * n * n
    if finding == "effusion":
        side = with_f["meta"]["finding_info"]["effusion"]["sides"]
        assert com["frontal"][0] > 0.55 and com["lateral"][0] > 0.55  # lung bases
        if side == [0]:  # patient's right = viewer's left
            assert com["frontal"][1] < 0.45
        elif side == [1]:
            assert com["frontal"][1] > 0.55
    else:
        assert 0.4 < com["frontal"][0] < 0.8 and com["frontal"][1] > 0.5  # heart grows to the left
        assert 0.4 < com["lateral"][0] < 0.8 and com["lateral"][1] < 0.5  # and forwards
    assert with_f["labels"] == {
        "effusion": {"Pleural Effusion": 1.0}, "cardiomegaly": {"Cardiomegaly": 1.0}
    }[finding]


# The per-view visibility the cross-view findings are declared with (README: "The phantom's
# findings"), transcribed here rather than read from the code under test.
ONE_VIEW = {"retrocardiac_opacity": "lateral", "posterior_effusion": "lateral", "apical_pneumothorax": "frontal"}
CROSS_VIEW_LABELS = {
    "Atelectasis": "lateral", "Cardiomegaly": "both", "Consolidation": "both", "Lung Lesion": "both",
    "Lung Opacity": "both", "No Finding": "both", "Pleural Effusion": "lateral", "Pneumothorax": "frontal",
    "Support Devices": "both",
}


@pytest.mark.parametrize("finding", sorted(ONE_VIEW))
def test_one_view_finding_changes_only_its_declared_view(finding):
    """The same seed with and without the finding: the other view is identical to the last
    bit (with detector noise on), the declared one clearly denser (noise off) where the
    finding lies: retrocardiac and posterior effusion low and posterior on the lateral
    (posterior = the viewer's right), the apical pneumothorax high on its own side."""
    n, seed = 96, 21
    shown = ONE_VIEW[finding]
    hidden = "frontal" if shown == "lateral" else "lateral"
    np.testing.assert_array_equal(render_study(seed, n, findings=[finding])[hidden],
                                  render_study(seed, n, findings=[])[hidden])
    base = render_study(seed, n, findings=[], noise=False)
    with_f = render_study(seed, n, findings=[finding], noise=False)
    np.testing.assert_array_equal(with_f[hidden], base[hidden])
    diff = np.abs(with_f[shown].astype(np.float64) - base[shown])
    rows, cols = np.nonzero(diff > 0.05)
    assert rows.size >= 20, rows.size
    if shown == "lateral":
        assert rows.mean() / n > 0.5 and cols.mean() / n > 0.5
    else:
        side = with_f["meta"]["finding_info"][finding]["side"]  # 0: patient's right = viewer's left
        assert rows.mean() / n < 0.45
        assert (cols.mean() / n < 0.5) == (side == 0)
    assert with_f["labels"] == {"retrocardiac_opacity": {"Atelectasis": 1.0},
                                "posterior_effusion": {"Pleural Effusion": 1.0},
                                "apical_pneumothorax": {"Pneumothorax": 1.0}}[finding]


def test_label_visibility_tables():
    assert phantom.label_visibility("cross-view") == CROSS_VIEW_LABELS
    standard = {k: "both" for k in CROSS_VIEW_LABELS if k != "Atelectasis"}
    assert phantom.label_visibility("standard") == standard
    with pytest.raises(ValueError, match="--findings"):
        phantom.label_visibility("lateral-only")


def test_cross_view_phantom_labels_follow_its_findings(tmp_path):
    """A cross-view phantom draws the one-view findings (and no two-view effusion or
    pneumothorax); each study's CheXpert row states exactly its findings' labels."""
    root = tmp_path / "cv"
    generate_phantom(root, 40, seed=4, size=32, workers=1, progress=False, findings="cross-view")
    truth = _csv(root / "phantom_truth.csv")
    drawn = {f for r in truth for f in r["findings"].split(";") if f}
    assert drawn & set(ONE_VIEW) and not drawn & {"effusion", "pneumothorax"}
    labels_of = {"retrocardiac_opacity": {"Atelectasis"}, "posterior_effusion": {"Pleural Effusion"},
                 "apical_pneumothorax": {"Pneumothorax"}, "nodule": {"Lung Lesion"},
                 "mass": {"Lung Lesion", "Lung Opacity"}, "cardiomegaly": {"Cardiomegaly"},
                 "consolidation": {"Consolidation", "Lung Opacity"}, "devices": {"Support Devices"}}
    for r in truth:
        expected = set().union(*[labels_of[f] for f in r["findings"].split(";") if f])
        stated = {c for c in phantom.CHEXPERT_COLUMNS if r[c] in ("1.0", "-1.0")} - {"No Finding"}
        assert stated == expected, r
    config = (root / "phantom_config.json").read_text()
    assert '"findings": "cross-view"' in config


def test_fill_empty_splits_by_hand():
    """An empty split of positive weight takes the last subject of the largest split."""
    got = phantom._fill_empty_splits(np.array([0, 0, 0, 0, 1]), (0.98, 0.01, 0.01))
    np.testing.assert_array_equal(got, [0, 0, 0, 2, 1])
    got = phantom._fill_empty_splits(np.array([0, 0, 0, 0, 0]), (0.98, 0.01, 0.01))
    np.testing.assert_array_equal(got, [0, 0, 0, 2, 1])
    got = phantom._fill_empty_splits(np.array([0, 0, 0]), (1.0, 0.0, 0.0))  # weight 0 stays empty
    np.testing.assert_array_equal(got, [0, 0, 0])


@pytest.mark.parametrize("studies", [50, 51, 300])
@pytest.mark.parametrize("split", [None, "0.98,0.01,0.01"])
def test_every_split_gets_studies(studies, split):
    """fastssl phantom --studies N (N >= 50), with the default split and with MIMIC's own
    proportions: train, validate and test each hold studies, a subject sits in one split,
    and with the default weights the study counts are near 70/10/20 %."""
    from fastssl.cli import command_parser

    default = command_parser("phantom")[0].parse_args(["--out", "x"]).split
    weights = phantom._parse_split(split or default)
    for seed in range(12):
        tasks, _ = phantom._plan(studies, seed, 32, 0.45, 0.03, 0.03, 0, weights, dict(phantom.DEFAULT_FINDING_RATES),
                                 0.05)
        counts = {k: sum(t["split"] == k for t in tasks) for k in ("train", "validate", "test")}
        assert min(counts.values()) >= 1, (seed, counts)
        by_subject = {}
        for t in tasks:
            by_subject.setdefault(t["subject_id"], set()).add(t["split"])
        assert all(len(v) == 1 for v in by_subject.values())
        if split is None and studies == 300:
            # whole subjects (1 to 6 studies) move together: wide bounds
            assert 0.55 < counts["train"] / studies < 0.85 and 0.03 < counts["validate"] / studies < 0.22
            assert 0.08 < counts["test"] / studies < 0.35, counts


def test_forcing_a_finding_changes_nothing_else():
    a = render_study(4, SIZE, findings=["nodule"], noise=False)
    b = render_study(4, SIZE, findings=["nodule", "devices"], noise=False)
    c = render_study(4, SIZE, findings=[], noise=False)
    assert a["meta"]["finding_info"]["nodule"] == b["meta"]["finding_info"]["nodule"]
    assert c["labels"] == {"No Finding": 1.0}
    assert render_study(4, SIZE, findings=["devices"])["labels"] == {"Support Devices": 1.0, "No Finding": 1.0}


def test_render_study_rejects_bad_arguments():
    with pytest.raises(ValueError, match="size"):
        render_study(0, 16)
    with pytest.raises(ValueError, match="views"):
        render_study(0, SIZE, views=["oblique"])
    with pytest.raises(ValueError, match="findings"):
        render_study(0, SIZE, findings=["fracture"])
    with pytest.raises(ValueError, match="frontal_position"):
        render_study(0, SIZE, frontal_position="LL")
    with pytest.raises(TypeError, match="rng_or_seed"):
        render_study(1.5, SIZE)


# --------------------------------------------------------------------------- files
def test_same_seed_same_bytes_whatever_the_workers(made):
    one, two, s1, s2 = made
    f1, f2 = _files(one), _files(two)
    assert sorted(f1) == sorted(f2)
    assert all(f1[k] == f2[k] for k in f1)
    assert (s1.images, s1.corrupt) == (s2.images, s2.corrupt)


def test_workers_0_renders_in_this_process_like_every_command(made, tmp_path, monkeypatch):
    """--workers 0 means this process, as for prepare and the DataLoader commands (it used
    to be refused here alone); no pool is started and the bytes are those of 1 and 2."""
    import multiprocessing

    monkeypatch.setattr(multiprocessing, "get_context", lambda *a: pytest.fail("workers=0 started a pool"))
    s0 = generate_phantom(tmp_path / "w0", workers=0, **KW)
    f0, f1 = _files(tmp_path / "w0"), _files(made[0])
    assert sorted(f0) == sorted(f1) and all(f0[k] == f1[k] for k in f1)
    assert (s0.images, s0.corrupt) == (made[2].images, made[2].corrupt)


def test_dicom_files_are_valid_and_decode_to_the_render(made):
    root = made[0]
    truth = _csv(root / "phantom_truth.csv")
    tasks, _ = phantom._plan(KW["studies"], KW["seed"], SIZE, 0.5, 0.1, 0.15, 3, phantom.DEFAULT_SPLIT,
                             dict(phantom.DEFAULT_FINDING_RATES), 0.05)
    by_id = {im["dicom_id"]: (t, im) for t in tasks for im in t["images"]}
    seen = {"photometric": set(), "encoding": set(), "modality": set()}
    for row in truth:
        if row["corrupt"]:
            continue
        task, im = by_id[row["dicom_id"]]
        path = root / im["path"]
        raw = path.read_bytes()
        assert raw[:128] == b"\0" * 128 and raw[128:132] == b"DICM"  # Part 10 preamble
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
        assert (ds.Rows, ds.Columns) == (SIZE, SIZE) and len(ds.PixelSpacing) == 2
        assert ds.Modality in ("DX", "CR") and "WindowCenter" in ds and "WindowWidth" in ds
        assert ds.PatientID == row["subject_id"]
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert ds.get("ViewPosition", "") == row["view_position"]
        arr = ds.pixel_array
        assert arr.dtype == np.uint16 and arr.max() < 4096
        seen["photometric"].add(ds.PhotometricInterpretation)
        seen["encoding"].add("voilut" if "VOILUTSequence" in ds else ("rescale" if "RescaleSlope" in ds else "plain"))
        seen["modality"].add(ds.Modality)
        want = render_study(task["seed"], SIZE, views=[row["view"]], frontal_position=task["frontal_position"],
                            anatomy_seed=task["anatomy_seed"])[row["view"]]
        np.testing.assert_allclose(_decode(ds), want, atol=2.5 / 4095)
    assert seen == {"photometric": {"MONOCHROME1", "MONOCHROME2"}, "encoding": {"plain", "rescale", "voilut"},
                    "modality": {"DX", "CR"}}


def test_layout_and_csvs_agree_with_the_truth(made):
    root, _, summary, _ = made
    truth = _csv(root / "phantom_truth.csv")
    meta = _csv(root / "mimic-cxr-2.0.0-metadata.csv.gz")
    split = _csv(root / "mimic-cxr-2.0.0-split.csv.gz")
    chex = _csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz")
    assert list(chex[0])[:2] == ["subject_id", "study_id"] and tuple(list(chex[0])[2:]) == phantom.CHEXPERT_COLUMNS
    assert list(meta[0]) == list(phantom.METADATA_COLUMNS)
    dcm = {os.path.relpath(os.path.join(d, n), root) for d, _, ns in os.walk(root / "files") for n in ns}
    pat = re.compile(r"files/p(1\d)/p(\1\d{6})/s(5\d{7})/([0-9a-f]{8}(?:-[0-9a-f]{8}){4})\.dcm")
    found = {}
    for rel in dcm:
        m = pat.fullmatch(rel)
        assert m, rel
        found[m.group(4)] = (m.group(2), m.group(3))
    assert {r["dicom_id"]: (r["subject_id"], r["study_id"]) for r in truth} == found
    assert {r["dicom_id"]: (r["subject_id"], r["study_id"]) for r in meta} == found
    assert {r["dicom_id"]: (r["subject_id"], r["study_id"]) for r in split} == found
    assert {r["dicom_id"]: r["ViewPosition"] for r in meta} == {r["dicom_id"]: r["view_position"] for r in truth}
    # one split per subject; one chexpert row per study
    subj_split: dict[str, set] = {}
    for r in split:
        subj_split.setdefault(r["subject_id"], set()).add(r["split"])
    assert all(len(v) == 1 and v <= {"train", "validate", "test"} for v in subj_split.values())
    assert len(chex) == summary.studies == len({r["study_id"] for r in truth})
    for r in chex:
        vals = {k: v for k, v in r.items() if k not in ("subject_id", "study_id") and v}
        assert set(vals.values()) <= {"1.0", "-1.0"}
        others = set(vals) - {"No Finding", "Support Devices"}
        assert (vals.get("No Finding") == "1.0") == (not others)
    # the summary's counts are those of the truth file
    good = [r for r in truth if not r["corrupt"]]
    views: dict[str, set] = {}
    for r in good:
        views.setdefault(r["study_id"], set()).add(r["view"])
    assert summary.images == len(good) and summary.corrupt == len(truth) - len(good) == 3
    assert summary.both_views == sum(v == {"frontal", "lateral"} for v in views.values()) > 0
    assert summary.frontal_only == sum(v == {"frontal"} for v in views.values()) > 0
    assert summary.lateral_only == sum(v == {"lateral"} for v in views.values())
    assert summary.no_view_position == sum(not r["view_position"] for r in good) > 0
    assert summary.both_views + summary.frontal_only + summary.lateral_only == summary.studies


def test_corrupt_files_fail_to_read_and_are_listed(made):
    root = made[0]
    truth = _csv(root / "phantom_truth.csv")
    bad = [r for r in truth if r["corrupt"]]
    assert sorted(r["corrupt"] for r in bad) == sorted(phantom.CORRUPT_KINDS)
    paths = {m.split("/")[-1][:-4]: m for m in _files(root) if m.endswith(".dcm")}
    for r in bad:
        with pytest.raises(Exception):
            ds = pydicom.dcmread(root / paths[r["dicom_id"]])
            ds.pixel_array  # noqa: B018 (decoding is what fails)


def test_resume_recreates_a_deleted_file_and_a_complete_rerun_writes_nothing(made, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(made[0], out)
    before = _files(out)
    victim = next(k for k in sorted(before) if k.endswith(".dcm"))
    os.remove(out / victim)
    os.remove(out / "mimic-cxr-2.0.0-split.csv.gz")
    s = generate_phantom(out, workers=1, **KW)
    assert s.written == 2
    assert _files(out) == before
    stamps = {k: os.stat(out / k).st_mtime_ns for k in before}
    again = generate_phantom(out, workers=2, **KW)
    assert again.written == 0
    assert {k: os.stat(out / k).st_mtime_ns for k in before} == stamps
    with pytest.raises(ValueError, match="other settings"):
        generate_phantom(out, workers=1, **{**KW, "seed": 9})


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_phantom_dir_is_opened_like_every_job(made, tmp_path):
    """--out is opened by jobs.open_job. Its record stays phantom_config.json, the settings in
    the bytes phantoms always had (so those resume, and no job.json joins the dataset); a
    killed writer's temporaries go, a second writer is refused, other settings are refused by
    name unless overwrite (which replaces the phantom), and a folder of other files is refused."""
    out = tmp_path / "copy"
    shutil.copytree(made[0], out)
    before = _files(out)
    record = json.loads((out / "phantom_config.json").read_text())
    assert (out / "phantom_config.json").read_text() == json.dumps(record, indent=1, sort_keys=True) + "\n"
    assert record["seed"] == KW["seed"] and "job.json" not in before

    study = out / os.path.dirname(next(k for k in sorted(before) if k.endswith(".dcm")))
    dead, live = study / f".x.dcm.tmp{_dead_pid()}", study / f".y.dcm.tmp{os.getpid()}"
    dead.write_bytes(b"torn")
    live.write_bytes(b"still being written")
    assert generate_phantom(out, workers=1, **KW).written == 0
    assert not dead.exists() and live.exists()
    live.unlink()
    with jobs.OutputLock(out):
        with pytest.raises(OutputLocked, match="in use by another job"):
            generate_phantom(out, workers=1, **KW)

    with pytest.raises(ResumeMismatch, match=r"seed: 8 -> 9.*--overwrite"):
        generate_phantom(out, workers=1, **{**KW, "seed": 9})
    assert _files(out) == before
    fresh = tmp_path / "fresh"
    generate_phantom(fresh, workers=1, **{**KW, "seed": 9})
    generate_phantom(out, workers=1, overwrite=True, **{**KW, "seed": 9})
    assert _files(out) == _files(fresh) != before

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not a phantom")
    with pytest.raises(ResumeMismatch, match="not empty and has no phantom_config.json"):
        generate_phantom(other, workers=1, **KW)
    assert _files(other) == {"notes.txt": b"not a phantom"}


def test_bad_arguments_name_the_flag(tmp_path):
    for kwargs, flag in (
        (dict(studies=0), "--studies"),
        (dict(size=8), "--size"),
        (dict(corrupt=-1), "--corrupt"),
        (dict(both_views_fraction=1.5), "--both-views-fraction"),
        (dict(both_views_fraction=0.9, lateral_only_fraction=0.2), "--lateral-only-fraction"),
        (dict(workers=-1), "--workers"),
        (dict(split="1,2"), "--split"),
    ):
        with pytest.raises(ValueError, match=flag):
            generate_phantom(tmp_path / "x", **{"studies": 2, "progress": False, **kwargs})


def test_cli(tmp_path, capsys):
    from fastssl.cli import main

    out = tmp_path / "cli"
    assert main(["phantom", "--out", str(out), "--studies", "3", "--size", "40", "--workers", "1",
                 "--seed", "2", "--corrupt", "1"]) == 0
    assert "3 studies" in capsys.readouterr().out
    assert len(_csv(out / "phantom_truth.csv")) >= 4
    assert main(["phantom", "--out", str(tmp_path / "bad"), "--studies", "0", "--quiet"]) == 2
    assert "--studies" in capsys.readouterr().err  # one line, no traceback
    config = tmp_path / "cv.yaml"  # --config keys are the flags: findings and split among them
    config.write_text("studies: 3\nsize: 40\nworkers: 1\nfindings: cross-view\nsplit: '1,0,0'\n")
    assert main(["phantom", "--config", str(config), "--out", str(tmp_path / "cv"), "--quiet"]) == 0
    made = json.loads((tmp_path / "cv" / "phantom_config.json").read_text())
    assert (made["findings"], made["split"], made["finding_rates"]["retrocardiac_opacity"]) == (
        "cross-view", [1.0, 0.0, 0.0], 0.15)
    with pytest.raises(SystemExit) as exit_:  # argparse: a choice outside standard|cross-view
        main(["phantom", "--out", str(tmp_path / "x"), "--findings", "lateral", "--quiet"])
    assert exit_.value.code == 2 and "--findings" in capsys.readouterr().err


def test_readme_visibility_table_is_the_code_s():
    """The README's per-label table (label | standard | cross-view) is label_visibility()."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("| label | standard | cross-view |", 1)[1].split("\n\n", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.strip().splitlines()[1:]]
    standard, cross = phantom.label_visibility("standard"), phantom.label_visibility("cross-view")
    assert {r[0] for r in rows} == set(standard) | set(cross)
    for label, std, cv in rows:
        assert (std, cv) == (standard.get(label, "-"), cross.get(label, "-")), label
