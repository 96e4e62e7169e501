"""The phantom's studies in each dataset's file layout and CSV format, quirks included.

:func:`fastssl.data.phantom.generate_phantom` plans and renders the studies once; this
module names their files and writes the CSVs of a layout:

* ``mimic-dicom``: MIMIC-CXR (DICOM, the module :mod:`fastssl.data.phantom` writes).
* ``mimic-jpg``: MIMIC-CXR-JPG: the same CSVs, ``files/.../<dicom_id>.jpg`` (8-bit JPEG
  of the displayed image).
* ``chexpert``: ``CheXpert-v1.0-small/{train,valid}.csv`` and
  ``CheXpert-v1.0-small/{train,valid}/patientNNNNN/studyN/viewK_{frontal,lateral}.jpg``;
  labels 1.0 / 0.0 / -1.0 / blank in train.csv, 1.0 / 0.0 in valid.csv (validation
  patients); test patients stay in train.csv (CheXpert ships no test CSV with them);
  AP/PA blank for laterals and for the images the phantom draws without a view field.
* ``padchest``: ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv`` and
  ``<ImageDir>/<ImageID>.png``: 16-bit PNGs holding 12-bit values (BitsStored_DICOM 12),
  MONOCHROME1 films stored inverted, label lists with leading spaces, findings that map
  to no CheXpert label, some blank label cells, Projection "UNK" where no view is known.

Broken files (``--corrupt``) in the JPEG/PNG layouts: a truncated file, an empty file, or
a CSV row whose file is absent. Every layout writes ``phantom_truth.csv``: one row per
image with the ids a reader must produce, the view it must find (``expected_view``), the
split the dataset states (blank where the reader draws it), and the 14 labels as the
dataset states them, derived from the phantom's own findings (not from fastssl's tables).
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np

from fastssl.data.phantom_anatomy import FINDING_LABELS

__all__ = ["LAYOUTS", "assign_paths", "raster_bytes", "is_absent", "layout_tables", "truth_rows",
           "TRUTH_COLUMNS", "CHEXPERT_ROOT", "PADCHEST_CSV"]

LAYOUTS = ("mimic-dicom", "mimic-jpg", "chexpert", "padchest")
CHEXPERT_ROOT = "CheXpert-v1.0-small"
PADCHEST_CSV = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
LABELS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
    "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion",
    "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices",
)
TRUTH_COLUMNS = ("dicom_id", "study_id", "subject_id", "view", "view_position", "expected_view", "split",
                 "corrupt", "findings", "other_findings", "path", *LABELS)
# The phantom's findings as PadChest names them, and findings with no CheXpert label.
PADCHEST_NAMES = {"nodule": "nodule", "mass": "mass", "effusion": "pleural effusion",
                  "cardiomegaly": "cardiomegaly", "consolidation": "consolidation",
                  "pneumothorax": "pneumothorax", "devices": "pacemaker",
                  "retrocardiac_opacity": "atelectasis", "posterior_effusion": "pleural effusion",
                  "apical_pneumothorax": "pneumothorax"}
PADCHEST_UNMAPPED = ("scoliosis", "aortic elongation")
_CHEXPERT_HEADER = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *LABELS)
_PADCHEST_HEADER = ("ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientSex_DICOM",
                    "ViewPosition_DICOM", "Projection", "MethodProjection", "Labels", "BitsStored_DICOM",
                    "PhotometricInterpretation_DICOM")


def _label(v: float | None) -> str:
    return "" if v is None else f"{v:.1f}"


def assign_paths(layout: str, tasks: list[dict]) -> None:
    """Give every image its file path in ``layout`` (and the layout's ids in
    ``task["ids"]`` / ``im["id"]``)."""
    patients: dict[int, int] = {}
    studies_of: dict[int, int] = {}
    for t in tasks:
        sid = t["subject_id"]
        patients.setdefault(sid, len(patients) + 1)
        studies_of[sid] = studies_of.get(sid, 0) + 1
        for k, im in enumerate(t["images"], start=1):
            im["absent"] = layout != "mimic-dicom" and im["corrupt"] == "unsupported transfer syntax (JPEG 2000)"
            if layout in ("mimic-dicom", "mimic-jpg"):
                t["ids"] = (str(sid), str(t["study_id"]))
                im["id"] = im["dicom_id"]
                sub = f"files/p{str(sid)[:2]}/p{sid}/s{t['study_id']}"
                im["path"] = f"{sub}/{im['dicom_id']}.{'dcm' if layout == 'mimic-dicom' else 'jpg'}"
            elif layout == "chexpert":
                patient, study = f"patient{patients[sid]:05d}", f"study{studies_of[sid]}"
                t["ids"] = (patient, f"{patient}_{study}")
                name = f"view{k}_{im['view']}"
                im["id"] = f"{patient}_{study}_{name}"
                part = "valid" if t["split"] == "validate" else "train"
                im["path"] = f"{CHEXPERT_ROOT}/{part}/{patient}/{study}/{name}.jpg"
            elif layout == "padchest":
                t["ids"] = (f"{sid * 2654435761 % 2**40:x}", f"{t['study_id'] * 40503 % 2**48:x}")
                im["id"] = im["dicom_id"]
                im["path"] = f"{sid % 4}/{im['dicom_id']}.png"
            else:
                raise ValueError(f"--layout {layout!r}; expected one of {LAYOUTS}")


def is_absent(im: dict) -> bool:
    """A CSV row whose file the layout deliberately leaves out."""
    return bool(im.get("absent"))


def raster_bytes(layout: str, im: dict, image: np.ndarray) -> bytes:
    """The JPEG/PNG file of one rendered image (display values in [0, 1]), broken as
    ``im["corrupt"]`` says."""
    from PIL import Image

    buf = io.BytesIO()
    disp = np.clip(image, 0.0, 1.0)
    if layout == "padchest":
        stored = np.round(disp * 4095).astype(np.uint16)
        if im["photometric"] == "MONOCHROME1":
            stored = 4095 - stored
        Image.fromarray(stored).save(buf, format="PNG")  # uint16 -> mode I;16, a 16-bit PNG
    else:
        Image.fromarray(np.round(disp * 255).astype(np.uint8)).save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    if im["corrupt"] == "truncated":
        return data[: len(data) // 2]
    if im["corrupt"] == "no pixel data":
        return b""
    return data


def _expected_view(layout: str, t: dict, im: dict) -> str:
    """The view a correct reader finds from the fields this layout writes."""
    if layout == "chexpert" or im["view_position"] is not None:
        return im["view"]
    if layout in ("mimic-dicom", "mimic-jpg") and (im.get("view_code_kept") or t["procedure"] == "CHEST (PORTABLE AP)"):
        return im["view"]
    return "unknown"


def _stated_labels(layout: str, t: dict) -> dict[str, str]:
    """The 14 labels as the layout's CSV states them (from the phantom's findings)."""
    if layout == "padchest":
        if _padchest_blank(t):
            return {c: "" for c in LABELS}
        positive = {lab for f in t["findings"] for lab in FINDING_LABELS[f]}
        positive |= {"No Finding"} if not positive - {"Support Devices"} else set()
        return {c: "1.0" if c in positive else "0.0" for c in LABELS}
    if layout == "chexpert" and t["split"] == "validate":  # radiologist consensus: 0 / 1 only
        return {c: "1.0" if t["labels"].get(c) is not None else "0.0" for c in LABELS}
    return {c: _label(t["labels"].get(c)) for c in LABELS}


def _padchest_blank(t: dict) -> bool:
    return t["index"] % 13 == 12


def _padchest_findings(t: dict) -> tuple[list[str], list[str]]:
    """(the Labels list as written, the unmapped findings in it)."""
    names = list(dict.fromkeys(PADCHEST_NAMES[f] for f in t["findings"]))  # two findings may share a name
    other = [PADCHEST_UNMAPPED[j] for j in range(2) if t["index"] % (5 + 2 * j) == 0]
    return (names + other) or ["normal"], other


def truth_rows(layout: str, tasks: Sequence[dict]) -> list[dict]:
    rows = []
    for t in sorted(tasks, key=lambda t: (str(t["ids"][0]), str(t["ids"][1]))):
        labels = _stated_labels(layout, t)
        other = "" if layout != "padchest" or _padchest_blank(t) else ";".join(_padchest_findings(t)[1])
        split = t["split"] if layout.startswith("mimic") else ("validate" if layout == "chexpert"
                                                                and t["split"] == "validate" else "")
        for im in sorted(t["images"], key=lambda im: im["id"]):
            rows.append(dict(dicom_id=im["id"], study_id=t["ids"][1], subject_id=t["ids"][0], view=im["view"],
                             view_position=im["view_position"] or "", expected_view=_expected_view(layout, t, im),
                             split=split, corrupt=im["corrupt"], findings=";".join(t["findings"]),
                             other_findings=other, path=im["path"], **labels))
    return rows


def layout_tables(layout: str, tasks: Sequence[dict]) -> dict[str, list[tuple[Sequence[str], list[dict]]]]:
    """file name -> (header, rows) of the dataset CSVs of a JPEG/PNG layout other than
    mimic-jpg (which shares MIMIC-CXR's CSVs)."""
    if layout == "chexpert":
        train, valid = [], []
        for t in tasks:
            labels = _stated_labels(layout, t)
            for im in t["images"]:
                lateral = im["view"] == "lateral"
                row = {"Path": im["path"], "Sex": ("Female", "Male")[t["subject_id"] % 2],
                       "Age": 20 + t["subject_id"] % 70, "Frontal/Lateral": "Lateral" if lateral else "Frontal",
                       "AP/PA": "" if lateral or im["view_position"] is None else im["view_position"], **labels}
                (valid if t["split"] == "validate" else train).append(row)
        return {f"{CHEXPERT_ROOT}/train.csv": (_CHEXPERT_HEADER, train),
                f"{CHEXPERT_ROOT}/valid.csv": (_CHEXPERT_HEADER, valid)}
    if layout == "padchest":
        rows = []
        for t in tasks:
            names = "" if _padchest_blank(t) else "[" + ", ".join(
                f"'{' ' if j else ''}{n}'" for j, n in enumerate(_padchest_findings(t)[0])) + "]"
            for im in t["images"]:
                vp = im["view_position"]
                rows.append({
                    "ImageID": im["path"].split("/", 1)[1], "ImageDir": im["path"].split("/", 1)[0],
                    "StudyDate_DICOM": t["study_date"], "StudyID": t["ids"][1], "PatientID": t["ids"][0],
                    "PatientSex_DICOM": ("F", "M")[t["subject_id"] % 2], "ViewPosition_DICOM": vp or "",
                    "Projection": {"LATERAL": "L", "LL": "L"}.get(vp, vp) if vp else "UNK",
                    "MethodProjection": "Manual review of DICOM fields", "Labels": names,
                    "BitsStored_DICOM": "12", "PhotometricInterpretation_DICOM": im["photometric"],
                })
        return {PADCHEST_CSV: (_PADCHEST_HEADER, rows)}
    return {}
