"""The paired-view phantom: synthetic MIMIC-CXR-like DICOM studies.

``fastssl phantom --out DIR --studies N`` (or :func:`generate_phantom`) writes::

    DIR/files/p1X/p<subject_id>/s<study_id>/<dicom_id>.dcm
    DIR/mimic-cxr-2.0.0-metadata.csv.gz   DIR/mimic-cxr-2.0.0-split.csv.gz
    DIR/mimic-cxr-2.0.0-chexpert.csv.gz   DIR/phantom_truth.csv   DIR/phantom_config.json (its settings)

``--layout mimic-jpg|chexpert|padchest|nih-cxr14`` writes the same studies in that dataset's files
and CSVs instead (:mod:`fastssl.data.phantom_layouts`); ``phantom_truth.csv`` then holds
the ids, views and labels a reader of that layout must find.

Each study is a 3-D thorax with findings placed in 3-D (see
:mod:`fastssl.data.phantom_anatomy`), projected into a frontal (PA/AP) and/or a lateral
view, so a finding shows in both (``--findings cross-view``: three findings drawn only into
the view where a reader sees them; :func:`label_visibility`). Files are real Part-10 DICOM (Explicit VR Little
Endian, 12 bits stored in 16) with a deliberate mix of the things readers get wrong:
MONOCHROME1 and MONOCHROME2, a Rescale Slope/Intercept, a VOI LUT Sequence, missing
ViewPosition, and (``--corrupt K``) broken files listed in ``phantom_truth.csv``.

Determinism: a plan (subjects, ids, views, encodings, splits) is drawn from the seed in
the parent; each study then renders from its own seed, so any number of workers writes
the same bytes. Every file is written to a temporary name and renamed; a rerun with the
same settings skips the files that exist (resume) and rewrites a CSV only when its content
would change. DIR is opened like every job's output (:func:`fastssl.jobs.open_job`): a
second writer is refused, leftovers of killed writers are removed, and other settings are
refused, named, unless ``--overwrite``.

In every encoding the image a reader gets after modality LUT, VOI (LUT, else window) and
MONOCHROME1 inversion equals the rendered display image (1 = dense = bright) to within
one 12-bit step: windows span the full stored range, and a VOI LUT undoes the gamma the
stored values were given.
"""
from __future__ import annotations

import csv
import gzip
import io
import logging
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from fastssl.atomic import atomic_write_bytes
from fastssl.config import COUNT, FRACTION, NONNEG, SEED, Range, add_dataclass_arguments, check_settings, \
    config_from_args, setting
from fastssl.data import phantom_layouts
from fastssl.distributed import usable_cores
from fastssl.jobs import DatasetRecord, open_job
from fastssl.data.phantom_anatomy import (
    ALL_FINDINGS,
    DEFAULT_FINDING_RATES,
    FINDING_SET_RATES,
    FINDINGS,
    FINDING_SETS,
    label_visibility,
    render_study,
    study_findings,
)

__all__ = ["generate_phantom", "render_study", "PhantomConfig", "PhantomSummary", "CHEXPERT_COLUMNS", "DEFAULT_SPLIT",
           "label_visibility", "add_arguments", "run"]

log = logging.getLogger(__name__)

CHEXPERT_COLUMNS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
    "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion",
    "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices",
)
METADATA_COLUMNS = (
    "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
    "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning",
)
TRUTH_COLUMNS = phantom_layouts.TRUTH_COLUMNS
CORRUPT_KINDS = ("truncated", "no pixel data", "unsupported transfer syntax (JPEG 2000)")

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
JPEG2000 = "1.2.840.10008.1.2.4.90"  # JPEG 2000 Image Compression (Lossless Only)
# Fixed so that files are byte-identical across runs (2.25 = UUID-derived root).
IMPLEMENTATION_UID = "2.25.176585463121092755302290137931473461870"
FORMAT_VERSION = 2  # bump when the same seed would produce different files (2: ViewCodeSequence kept)
# train/validate/test weights per subject: the demo's and the phantom study's; MIMIC's own
# (~0.98/0.01/0.01) leaves a few hundred studies with no validation or test study
DEFAULT_SPLIT = (0.7, 0.1, 0.2)
_SPLIT_TEXT = ",".join(f"{w:g}" for w in DEFAULT_SPLIT)   # the same weights as --split's text

_VIEW_MEANING = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral", "LL": "left lateral"}
_PROCEDURE = {"both": "CHEST (PA AND LAT)", "frontal_PA": "CHEST (PA AND LAT)",
              "frontal_AP": "CHEST (PORTABLE AP)", "lateral": "CHEST (PA AND LAT)"}


@dataclass(frozen=True)
class PhantomSummary:
    """What :func:`generate_phantom` produced (counts over the whole directory)."""

    out_dir: str
    studies: int
    subjects: int
    images: int  # readable images (corrupt files not included)
    both_views: int
    frontal_only: int
    lateral_only: int
    no_view_position: int  # readable images without a ViewPosition tag
    corrupt: int
    written: int  # files written by this run (0 when the directory was complete)
    seconds: float

    def __str__(self) -> str:
        return (
            f"phantom in {self.out_dir}: {self.studies} studies of {self.subjects} subjects, "
            f"{self.images} images ({self.both_views} both views, {self.frontal_only} frontal only, "
            f"{self.lateral_only} lateral only), {self.no_view_position} without ViewPosition, "
            f"{self.corrupt} corrupt; {self.written} files written in {self.seconds:.1f} s"
        )


# --------------------------------------------------------------------------- plan
def _check_fraction(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value}; expected a fraction in [0, 1]")
    return value


def _parse_split(split) -> tuple[float, float, float]:
    if isinstance(split, str):
        try:
            split = [float(x) for x in split.split(",")]
        except ValueError:
            raise ValueError(f"--split {split!r}; expected three numbers 'train,validate,test'") from None
    split = tuple(float(x) for x in split)
    if len(split) != 3 or min(split) < 0 or sum(split) <= 0:
        raise ValueError(f"--split {split!r}; expected three non-negative numbers 'train,validate,test'")
    total = sum(split)
    return tuple(x / total for x in split)  # type: ignore[return-value]


def _fill_empty_splits(splits: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """Give every split of positive weight at least one subject (as long as there are
    enough subjects): each empty one takes the last subject of the then largest split.

    splits: (n_subjects,) int in {0, 1, 2}, the random draw; returned changed only where a
    split was empty, so a draw that fills every split (any sizable phantom) is kept as is.
    No random draw is taken, so everything planned after it stays the same.
    """
    splits = splits.copy()
    for k in np.flatnonzero(np.asarray(weights) > 0):
        counts = np.bincount(splits, minlength=3)
        if counts[k] == 0 and counts.max() > 1:
            splits[np.flatnonzero(splits == int(np.argmax(counts)))[-1]] = k
    return splits


def _seed_int(*key: int) -> int:
    return int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _distinct(rng: np.random.Generator, n: int, lo: int, hi: int) -> list[int]:
    out: dict[int, None] = {}
    while len(out) < n:
        for v in rng.integers(lo, hi, size=2 * (n - len(out)) + 8):
            out.setdefault(int(v), None)
    return list(out)[:n]


def _dicom_id(rng: np.random.Generator) -> str:
    # MIMIC-CXR dicom_ids look like "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014"
    return "-".join(f"{int(x):08x}" for x in rng.integers(0, 2**32, size=5))


def _plan(studies: int, seed: int, size: int, both: float, lateral_only: float, no_vp: float,
          corrupt: int, split: tuple[float, float, float], rates: Mapping[str, float],
          uncertain: float, file_layout: str = "mimic-dicom") -> tuple[list[dict], list[dict]]:
    """Everything but the pixels, drawn in the parent from the seed: (studies, rows).

    ``studies``: one task per study for a worker; ``rows``: one record per file.
    """
    rng = np.random.default_rng([seed, 0])
    # subjects: 1 study (60 %), else a few more, like MIMIC's repeat visits
    per_subject: list[int] = []
    while sum(per_subject) < studies:
        per_subject.append(int(min(1 + rng.geometric(0.55) - 1, 6)))
    per_subject[-1] -= sum(per_subject) - studies
    subject_ids = _distinct(rng, len(per_subject), 10_000_000, 20_000_000)
    study_ids = _distinct(rng, studies, 50_000_000, 60_000_000)
    splits = _fill_empty_splits(rng.choice(3, size=len(per_subject), p=split), split)
    base_days = rng.integers(0, 365 * 90, size=len(per_subject))
    tasks: list[dict] = []
    used_ids: set[str] = set()
    k = 0
    for subj_index, (n_st, sid) in enumerate(zip(per_subject, subject_ids)):
        day = int(base_days[subj_index])
        for j in range(n_st):
            srng = np.random.default_rng([seed, 3, k])
            u = srng.random()
            layout = "both" if u < both else ("lateral" if u < both + lateral_only else "frontal")
            position = "PA" if srng.random() < (0.9 if layout == "both" else 0.3) else "AP"
            day += int(srng.integers(1, 400)) if j else 0
            date = np.datetime64("2110-01-01") + np.timedelta64(day, "D")
            secs = srng.uniform(0, 86400)
            hh, mm, ss = int(secs // 3600), int(secs % 3600 // 60), secs % 60
            study_seed = _seed_int(seed, 1, k)
            present, labels, _ = study_findings(study_seed, rates, uncertain)
            task = dict(
                index=k, seed=study_seed, anatomy_seed=_seed_int(seed, 2, subj_index), subject_id=sid,
                study_id=study_ids[k], study_date=str(date).replace("-", ""),
                study_time=f"{hh:02d}{mm:02d}{ss:06.3f}", split=("train", "validate", "test")[splits[subj_index]],
                frontal_position=position, labels=labels, findings=sorted(present), images=[],
                procedure=_PROCEDURE["both" if layout == "both" else ("lateral" if layout == "lateral" else f"frontal_{position}")],
                orientation="Erect" if position == "PA" or layout == "lateral" else "Recumbent",
            )
            views = {"both": ("frontal", "lateral"), "frontal": ("frontal",), "lateral": ("lateral",)}[layout]
            for view in views:
                vp = position if view == "frontal" else ("LL" if srng.random() < 0.15 else "LATERAL")
                task["images"].append(_image_spec(srng, view, vp, no_vp, used_ids))
            tasks.append(task)
            k += 1
    # Corrupt files: extra images attached to studies, each claiming a view.
    if corrupt:
        crng = np.random.default_rng([seed, 4])
        where = crng.choice(studies, size=corrupt, replace=corrupt > studies)
        for i, t in enumerate(where):
            view = "frontal" if crng.random() < 0.6 else "lateral"
            vp = tasks[t]["frontal_position"] if view == "frontal" else "LATERAL"
            spec = _image_spec(crng, view, vp, 0.0, used_ids)
            spec["corrupt"] = CORRUPT_KINDS[i % len(CORRUPT_KINDS)]
            tasks[t]["images"].append(spec)
    phantom_layouts.assign_paths(file_layout, tasks)
    rows = [dict(task=t, image=im) for t in tasks for im in t["images"]]
    return tasks, rows


def _image_spec(rng: np.random.Generator, view: str, vp: str, no_vp: float, used: set[str]) -> dict:
    dicom_id = _dicom_id(rng)
    while dicom_id in used:
        dicom_id = _dicom_id(rng)
    used.add(dicom_id)
    u = rng.random(4)
    return dict(
        dicom_id=dicom_id, view=view,
        view_position=None if u[0] < no_vp else vp, position=vp,
        # Half of the images without ViewPosition keep their ViewCodeSequence (from the id,
        # so no draw changes): the reader must recover the view from it.
        view_code_kept=bool(u[0] < no_vp and int(dicom_id[:8], 16) % 2 == 0),
        photometric="MONOCHROME1" if u[1] < 0.3 else "MONOCHROME2",
        encoding="plain" if u[2] < 0.6 else ("rescale" if u[2] < 0.8 else "voilut"),
        modality="CR" if u[3] < 0.3 else "DX",
        gamma=float(rng.choice([0.8, 1.25])),
        rescale=[(1.0, -1024.0), (0.5, 0.0), (2.0, -4096.0)][int(rng.integers(3))],
        corrupt="",
    )


# --------------------------------------------------------------------------- DICOM
def _uid(seed_tag: str, *parts) -> str:
    """A deterministic UID: 2.25.<name-based UUID (version 5) of the seed and object>.

    (pydicom's ``generate_uid(prefix=None, entropy_srcs=...)`` ignores the entropy and
    returns a random UUID, so it cannot give reproducible files.)
    """
    name = "/".join(["fastssl-phantom", seed_tag, *map(str, parts)])
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, name).int}"


def _dataset(task: dict, im: dict, image: np.ndarray | None, size: int, run_tag: str, spacing_mm: float):
    """The pydicom FileDataset of one image (``image`` None: no pixel data)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian

    sop_class = DX_STORAGE if im["modality"] == "DX" else CR_STORAGE
    sop_uid = _uid(run_tag, "image", im["dicom_id"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    meta.ImplementationVersionName = "FASTSSL_PHANTOM"
    ds = FileDataset(im["path"], {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = task["study_date"]
    ds.StudyTime = task["study_time"]
    ds.AccessionNumber = ""
    ds.Modality = im["modality"]
    if im["modality"] == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = "fastssl phantom"
    ds.PatientName = f"PHANTOM^{task['subject_id']}"
    ds.PatientID = str(task["subject_id"])
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.BodyPartExamined = "CHEST"
    ds.PerformedProcedureStepDescription = task["procedure"]
    if im["view_position"] is not None:
        ds.ViewPosition = im["view_position"]
    if im["view_position"] is not None or im.get("view_code_kept"):
        code = Dataset()
        code.CodeValue = im["position"]
        code.CodingSchemeDesignator = "99FASTSSL"  # a private scheme: no SNOMED code is claimed
        code.CodeMeaning = _VIEW_MEANING[im["position"]]
        ds.ViewCodeSequence = DicomSequence([code])
    ds.StudyInstanceUID = _uid(run_tag, "study", task["study_id"])
    ds.SeriesInstanceUID = _uid(run_tag, "series", im["dicom_id"])
    ds.StudyID = str(task["study_id"])
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    # rows go to the feet; columns to the patient's left (frontal) or back (lateral)
    ds.PatientOrientation = ["L", "F"] if im["view"] == "frontal" else ["P", "F"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = im["photometric"]
    ds.Rows = size
    ds.Columns = size
    ds.PixelSpacing = [f"{spacing_mm:.6g}", f"{spacing_mm:.6g}"]
    ds.ImagerPixelSpacing = [f"{spacing_mm:.6g}", f"{spacing_mm:.6g}"]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    stored, window = _encode(image, im)
    center, width = window
    ds.WindowCenter = f"{center:.6g}"
    ds.WindowWidth = f"{width:.6g}"
    if im["encoding"] == "rescale":
        slope, intercept = im["rescale"]
        ds.RescaleIntercept = f"{intercept:g}"
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleType = "US"
    elif im["encoding"] == "voilut":
        item = Dataset()
        item.LUTDescriptor = [4096, 0, 12]
        ramp = np.arange(4096) / 4095.0
        item.LUTData = np.round(4095 * ramp ** im["gamma"]).astype(np.uint16).tolist()
        item["LUTData"].VR = "US"
        item.LUTExplanation = f"gamma {im['gamma']:g}"
        ds.VOILUTSequence = DicomSequence([item])
    if stored is not None:
        ds.PixelData = stored.astype("<u2").tobytes()
    return ds


def _encode(image: np.ndarray | None, im: dict) -> tuple[np.ndarray | None, tuple[float, float]]:
    """Stored values and (WindowCenter, WindowWidth) for a display image in [0, 1].

    Every path reads back as the display image: plain (M1 stores 4095 - v), rescale
    (window in modality units), VOI LUT (stored = LUT^-1(display), LUT = x^gamma).
    """
    stored = None
    if image is not None:
        disp = np.clip(image, 0.0, 1.0)
        if im["photometric"] == "MONOCHROME1":
            disp = 1.0 - disp  # inverted on reading: store the complement
        if im["encoding"] == "voilut":
            disp = disp ** (1.0 / im["gamma"])
        stored = np.round(disp * 4095).astype(np.uint16)
    if im["encoding"] == "rescale":
        slope, intercept = im["rescale"]
        return stored, (2048 * slope + intercept, 4096 * slope)
    return stored, (2048.0, 4096.0)


def _dicom_bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _corrupt_bytes(kind: str, task: dict, im: dict, image: np.ndarray, size: int, run_tag: str, spacing: float) -> bytes:
    if kind == "truncated":  # a copy cut short inside the pixel data
        data = _dicom_bytes(_dataset(task, im, image, size, run_tag, spacing))
        return data[: len(data) - (size * size)]
    if kind == "no pixel data":
        return _dicom_bytes(_dataset(task, im, None, size, run_tag, spacing))
    # an encapsulated "JPEG 2000" stream of garbage under a compressed transfer syntax
    from pydicom.encaps import encapsulate

    ds = _dataset(task, im, None, size, run_tag, spacing)
    ds.file_meta.TransferSyntaxUID = JPEG2000
    garbage = np.random.default_rng(task["seed"]).integers(0, 256, size=4096, dtype=np.uint8).tobytes()
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + garbage])  # SOC + SIZ markers, then noise
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return _dicom_bytes(ds)


def _work(args: tuple) -> int:
    """Render and write the missing files of one study; returns the number written."""
    task, out_dir, size, run_tag, rates, uncertain, layout = args
    missing = [im for im in task["images"] if not phantom_layouts.is_absent(im)
               and not os.path.exists(os.path.join(out_dir, im["path"]))]
    if not missing:
        return 0
    # the views render from independent streams: rendering only the missing ones is exact
    views = sorted({im["view"] for im in missing})
    res = render_study(task["seed"], size, views=views, frontal_position=task["frontal_position"],
                       finding_rates=rates, uncertain_fraction=uncertain, anatomy_seed=task["anatomy_seed"])
    for im in missing:
        os.makedirs(os.path.join(out_dir, os.path.dirname(im["path"])), exist_ok=True)
        image = res[im["view"]]
        spacing = res["meta"][im["view"]]["pixel_spacing_mm"]
        if layout != "mimic-dicom":
            data = phantom_layouts.raster_bytes(layout, im, image)
        elif im["corrupt"]:
            data = _corrupt_bytes(im["corrupt"], task, im, image, size, run_tag, spacing)
        else:
            data = _dicom_bytes(_dataset(task, im, image, size, run_tag, spacing))
        atomic_write_bytes(os.path.join(out_dir, im["path"]), data)
    return len(missing)


# --------------------------------------------------------------------------- CSVs
def _csv_bytes(columns: Sequence[str], rows: Iterable[dict]) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode()


def _gzip(data: bytes) -> bytes:
    buf = io.BytesIO()
    # mtime=0 and no file name: the same content gives the same bytes
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as gz:
        gz.write(data)
    return buf.getvalue()


def _write_if_changed(path: str, data: bytes) -> int:
    try:
        with open(path, "rb") as handle:
            if handle.read() == data:
                return 0
    except FileNotFoundError:
        pass
    atomic_write_bytes(path, data)
    return 1


def _label(v: float | None) -> str:
    return "" if v is None else f"{v:.1f}"


def _tables(tasks: list[dict], size: int, layout: str = "mimic-dicom") -> dict[str, bytes]:
    """file name -> bytes of every CSV of the layout, the truth included."""
    truth = _csv_bytes(TRUTH_COLUMNS, phantom_layouts.truth_rows(layout, tasks))
    if layout not in ("mimic-dicom", "mimic-jpg"):
        out = {name: table if isinstance(table, bytes) else _csv_bytes(*table)
               for name, table in phantom_layouts.layout_tables(layout, tasks).items()}
        return dict(out, **{"phantom_truth.csv": truth})
    meta, split, chex = [], [], []
    for t in sorted(tasks, key=lambda t: (t["subject_id"], t["study_id"])):
        chex.append({"subject_id": t["subject_id"], "study_id": t["study_id"],
                     **{c: _label(t["labels"].get(c)) for c in CHEXPERT_COLUMNS}})
        for im in sorted(t["images"], key=lambda im: im["dicom_id"]):
            vp = im["view_position"] or ""
            meta.append({
                "dicom_id": im["dicom_id"], "subject_id": t["subject_id"], "study_id": t["study_id"],
                "PerformedProcedureStepDescription": t["procedure"], "ViewPosition": vp,
                "Rows": size, "Columns": size, "StudyDate": t["study_date"], "StudyTime": t["study_time"],
                "ProcedureCodeSequence_CodeMeaning": t["procedure"],
                "ViewCodeSequence_CodeMeaning": _VIEW_MEANING[im["position"]] if vp or im["view_code_kept"] else "",
                "PatientOrientationCodeSequence_CodeMeaning": t["orientation"],
            })
            split.append({"dicom_id": im["dicom_id"], "study_id": t["study_id"], "subject_id": t["subject_id"],
                          "split": t["split"]})
    return {
        "mimic-cxr-2.0.0-metadata.csv.gz": _gzip(_csv_bytes(METADATA_COLUMNS, meta)),
        "mimic-cxr-2.0.0-split.csv.gz": _gzip(_csv_bytes(("dicom_id", "study_id", "subject_id", "split"), split)),
        "mimic-cxr-2.0.0-chexpert.csv.gz": _gzip(_csv_bytes(("subject_id", "study_id") + CHEXPERT_COLUMNS, chex)),
        "phantom_truth.csv": truth,
    }


# --------------------------------------------------------------------------- API
@dataclass(frozen=True)
class PhantomConfig:
    """The settings of :func:`generate_phantom` (``fastssl phantom``'s flags, declared once).
    Checks that involve two settings (the view fractions' sum, --split) stay in the API."""

    studies: int = setting(100, range=COUNT)  # number of studies
    size: int = setting(256, range=Range(32, 16384, integer=True))  # pixels per image side
    seed: int = setting(0, range=SEED)  # random seed: same seed, same bytes
    workers: int | None = setting(None, range=NONNEG)  # rendering processes (default: all usable cores); 0 = this process (as is 1)
    both_views_fraction: float = setting(0.45, range=FRACTION)  # studies with a frontal and a lateral
    lateral_only_fraction: float = setting(0.03, range=FRACTION)  # studies with a lateral only
    no_view_position_fraction: float = setting(0.03, range=FRACTION)  # images written without the ViewPosition tag
    corrupt: int = setting(0, range=NONNEG)  # extra broken files (listed in phantom_truth.csv)
    split: str = _SPLIT_TEXT  # train,validate,test weights per subject; a split of positive weight left empty by the draw gets one subject
    uncertain_fraction: float = setting(0.05, range=FRACTION)  # chance a present finding is labelled -1.0 (uncertain)
    layout: str = setting("mimic-dicom", choices=phantom_layouts.LAYOUTS)  # write the studies in this dataset's files and CSVs (prepare reads each)
    findings: str = setting("standard", choices=FINDING_SETS)  # standard: every finding shows in both views; cross-view: Atelectasis (retrocardiac) and Pleural Effusion (posterior recess) only on the lateral, Pneumothorax (apical) only on the frontal, the other labels in both (README: the phantom's findings)
    overwrite: bool = False  # replace what --out holds (a phantom of other settings, or other files): it is emptied first

    def __post_init__(self) -> None:
        check_settings(self)


SETTINGS = PhantomConfig   # the dataclass declaring this command's settings (fastssl.config)
CONFIG_NAME = "phantom_config.json"   # the phantom's record: its settings (fastssl.jobs.DatasetRecord)


def _settings(studies, seed, size, workers, both_views_fraction, lateral_only_fraction, no_view_position_fraction,
              corrupt, split, uncertain_fraction, finding_rates, layout, findings) -> dict:
    """The checked settings of :func:`generate_phantom` (ValueError naming the flag)."""
    PhantomConfig(studies=studies, size=size, seed=seed, workers=workers, both_views_fraction=both_views_fraction,
                  lateral_only_fraction=lateral_only_fraction, no_view_position_fraction=no_view_position_fraction,
                  corrupt=corrupt, uncertain_fraction=uncertain_fraction, layout=layout, findings=findings)
    studies, size, corrupt, seed = int(studies), int(size), int(corrupt), int(seed)
    both = float(both_views_fraction)   # each fraction checked by PhantomConfig
    lat = float(lateral_only_fraction)
    if both + lat > 1.0:
        raise ValueError(f"--both-views-fraction + --lateral-only-fraction = {both + lat:g} > 1")
    # the standard set records its 7 two-view findings only: its phantom_config.json (and
    # so the resume check of existing phantoms) is what it was before the one-view findings
    base = FINDING_SET_RATES[findings]
    rates = {f: base[f] for f in (FINDINGS if findings == "standard" else ALL_FINDINGS)}
    for k, v in (finding_rates or {}).items():
        if k not in ALL_FINDINGS:
            raise ValueError(f"finding_rates key {k!r} unknown; expected names from {ALL_FINDINGS}")
        rates[k] = _check_fraction(f"finding_rates[{k!r}]", v)
    workers = usable_cores() if workers is None else int(workers)
    config = dict(format=FORMAT_VERSION, studies=studies, seed=seed, size=size, both_views_fraction=both,
                  lateral_only_fraction=lat,
                  no_view_position_fraction=float(no_view_position_fraction),
                  corrupt=corrupt, split=list(_parse_split(split)),
                  uncertain_fraction=float(uncertain_fraction),
                  finding_rates=rates, layout=layout)
    if findings != "standard":
        config["findings"] = findings
    return dict(config=config, workers=workers)


def _render_all(jobs: list[tuple], workers: int, progress: bool) -> int:
    """Run :func:`_work` over the studies (a process pool for workers > 1; 0 and 1 render
    in this process, as prepare converts); files written."""
    bar = None
    if progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), unit="study", desc="phantom")
    if workers <= 1 or len(jobs) == 1:
        results = map(_work, jobs)
        pool = None
    else:
        import multiprocessing as mp

        pool = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn").Pool(workers)
        results = pool.imap_unordered(_work, jobs, chunksize=max(1, min(16, len(jobs) // (8 * workers))))
    written = 0
    try:
        for n in results:
            written += n
            if bar is not None:
                bar.update(1)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        if bar is not None:
            bar.close()
    return written


def _summary(out: str, tasks: list[dict], rows: list[dict], written: int, seconds: float) -> PhantomSummary:
    layouts = [{im["view"] for im in t["images"] if not im["corrupt"]} for t in tasks]
    good = [im for t in tasks for im in t["images"] if not im["corrupt"]]
    return PhantomSummary(
        out_dir=out, studies=len(tasks), subjects=len({t["subject_id"] for t in tasks}), images=len(good),
        both_views=sum(v == {"frontal", "lateral"} for v in layouts),
        frontal_only=sum(v == {"frontal"} for v in layouts),
        lateral_only=sum(v == {"lateral"} for v in layouts),
        no_view_position=sum(im["view_position"] is None for im in good),
        corrupt=len(rows) - len(good), written=written, seconds=seconds,
    )


def generate_phantom(
    out_dir: str | os.PathLike,
    studies: int = 100,
    *,
    seed: int = 0,
    size: int = 256,
    workers: int | None = None,
    both_views_fraction: float = 0.45,
    lateral_only_fraction: float = 0.03,
    no_view_position_fraction: float = 0.03,
    corrupt: int = 0,
    split: Sequence[float] | str = DEFAULT_SPLIT,
    uncertain_fraction: float = 0.05,
    finding_rates: Mapping[str, float] | None = None,
    progress: bool = True,
    layout: str = "mimic-dicom",
    findings: str = "standard",
    overwrite: bool = False,
) -> PhantomSummary:
    """Write (or complete) a synthetic MIMIC-CXR-like dataset in ``out_dir``.

    Args:
        studies: number of studies (>= 1); subjects get 1 to 6 studies each.
        seed: everything (ids, UIDs, pixels) follows from it; same seed, same bytes.
        size: pixels per side (>= 32; real MIMIC images are ~2500-3000).
        workers: rendering processes (None: all usable cores; 0 or 1: this process); the
            output does not depend on it.
        both_views_fraction / lateral_only_fraction: study layouts; the rest is
            frontal only.
        no_view_position_fraction: images written without the ViewPosition tag.
        corrupt: extra broken files (truncated, no pixel data, JPEG 2000 garbage),
            attached to random studies and marked in phantom_truth.csv.
        split: train/validate/test weights per subject (a subject is in one split); a
            split of positive weight that the draw leaves empty gets one subject.
        uncertain_fraction: chance that a present finding is labelled -1.0.
        finding_rates: per-finding prevalence overriding the finding set's.
        progress: a tqdm bar (only on a terminal).
        layout: "mimic-dicom" | "mimic-jpg" | "chexpert" | "padchest" | "nih-cxr14": the
            same studies in that dataset's files and CSVs (:mod:`fastssl.data.phantom_layouts`;
            nih-cxr14 keeps the frontal films only, one study each, as ChestX-ray14 has).
        findings: "standard" (every finding drawn into both views) | "cross-view" (some
            findings only in the view where a reader sees them; per label:
            :func:`label_visibility`).
        overwrite: empty ``out_dir`` first when it holds a phantom of other settings, or
            files that are no phantom's; without it those are refused.

    ``out_dir`` is opened by :func:`fastssl.jobs.open_job` (a lock, leftovers of killed
    writers removed); its record is ``phantom_config.json``, the settings: the same
    settings complete a phantom, rewriting only missing or changed files.

    Raises:
        ValueError: a bad argument (the message names the flag); ResumeMismatch (a
            ValueError): ``out_dir`` holds a phantom of other settings (named) or other files.
    """
    t_start = time.perf_counter()
    checked = _settings(studies, seed, size, workers, both_views_fraction, lateral_only_fraction,
                        no_view_position_fraction, corrupt, split, uncertain_fraction, finding_rates, layout,
                        findings)
    c = checked["config"]
    out = os.fspath(out_dir)
    record = DatasetRecord("phantom", c, record=CONFIG_NAME)
    with open_job(out, record, overwrite=overwrite, stale=("**",)) as status:
        return _write_phantom(out, c, checked["workers"], int(status == "new"), progress, t_start)


def _write_phantom(out: str, c: dict, workers: int, written: int, progress: bool, t_start: float) -> PhantomSummary:
    """The files of the phantom of checked settings ``c`` that ``out`` lacks (or holds with
    other bytes); ``written`` counts files written before (the record)."""
    layout = c["layout"]
    tasks, rows = _plan(c["studies"], c["seed"], c["size"], c["both_views_fraction"], c["lateral_only_fraction"],
                        c["no_view_position_fraction"], c["corrupt"], tuple(c["split"]), c["finding_rates"],
                        c["uncertain_fraction"], layout)
    jobs = [(t, out, c["size"], str(c["seed"]), c["finding_rates"], c["uncertain_fraction"], layout) for t in tasks]
    written += _render_all(jobs, workers, progress)
    for name, data in _tables(tasks, c["size"], layout).items():
        os.makedirs(os.path.dirname(os.path.join(out, name)), exist_ok=True)
        written += _write_if_changed(os.path.join(out, name), data)
    summary = _summary(out, tasks, rows, written, time.perf_counter() - t_start)
    log.info("%s", summary)
    return summary


# --------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (created; resumable)")
    add_dataclass_arguments(parser, PhantomConfig)   # --studies, --size, --seed, --workers, ... --findings


def run(args) -> int:
    settings = asdict(config_from_args(PhantomConfig, args))
    summary = generate_phantom(args.out, progress=not args.quiet, **settings)
    print(summary)
    return 0
