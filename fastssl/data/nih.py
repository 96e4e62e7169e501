"""NIH ChestX-ray14 as a study table: one frontal PNG per study, 14 findings of its own.

Layout::

    ROOT/Data_Entry_2017.csv        Image Index, Finding Labels, Follow-up #, Patient ID,
                                    Patient Age, Patient Gender, View Position, ...
    ROOT/train_val_list.txt         the official split: one Image Index per line
    ROOT/test_list.txt
    ROOT/images*/[images/]<Image Index>   (8-bit PNGs, 1024 x 1024; images_001 ... images_012)

Studies: ChestX-ray14 has PA and AP films only and no study grouping, so every image is
its own study (study_id = its Image Index without ".png"; ``Follow-up #`` orders a
patient's images, it groups nothing). There are no pairs: a NIH source adds
single-view frontal images to a pool. Views: ``View Position`` PA / AP -> frontal (any
other value through ``frontal_order`` / ``lateral_views``, blank -> unknown).

Split: ``test_list.txt`` -> "test"; ``train_val_list.txt`` -> "train", with a seeded
patient-level fraction (``holdout[0]``) drawn as "validate" (the official split has no
validation part). An image in neither list is rejected. Without the two lists, every
patient is split by the seeded hash (``holdout``), and the log says so.

Labels: ``Finding Labels`` is "|"-separated (``Atelectasis|Effusion``, or ``No
Finding``). Its 14 findings map onto the cache's 14 CheXpert labels by
:data:`NIH_TO_CHEXPERT` (a label is 1 when any finding mapping to it is listed, else 0);
"No Finding" is NIH's own. Emphysema, Fibrosis and Hernia have no CheXpert counterpart:
they set no label and are kept in ``other_labels``. The CheXpert labels NIH never states
(:data:`NIH_MISSING`: Enlarged Cardiomediastinum, Fracture, Support Devices) are stored
as -1, "missing", whatever the blank policy: an unstated label is not a negative one.
The labels were mined from reports by NLP; NIH states no uncertainty.
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np

from fastssl.data.mimic import (
    CHEXPERT_LABELS,
    FRONTAL_VIEWS,
    LATERAL_VIEWS,
    ImageRecord,
    Study,
    StudyTable,
    _normalise_views,
    _read_csv,
    classify_view,
    finish_table,
    hash_split,
)
from fastssl.data.padchest import id_problem
from fastssl.errors import DataError

__all__ = ["load_nih", "nih_labels", "NIH_FINDINGS", "NIH_TO_CHEXPERT", "NIH_OTHER", "NIH_MISSING",
           "NIH_CSV", "NIH_LISTS"]

log = logging.getLogger(__name__)

NIH_CSV = "Data_Entry_2017.csv"
NIH_LISTS = {"train": "train_val_list.txt", "test": "test_list.txt"}
NIH_FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
# NIH finding -> CheXpert label. Infiltration -> Lung Opacity and Pleural_Thickening ->
# Pleural Other are the two that are not the same word (both are how CheXpert's labeller
# files those terms); Mass and Nodule are both a Lung Lesion.
NIH_TO_CHEXPERT = {
    "Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Effusion": "Pleural Effusion",
    "Infiltration": "Lung Opacity", "Mass": "Lung Lesion", "Nodule": "Lung Lesion", "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax", "Consolidation": "Consolidation", "Edema": "Edema",
    "Pleural_Thickening": "Pleural Other",
}
NIH_OTHER = ("Emphysema", "Fibrosis", "Hernia")  # no CheXpert counterpart: kept in other_labels
NIH_MISSING = tuple(name for name in CHEXPERT_LABELS
                    if name not in set(NIH_TO_CHEXPERT.values()) | {"No Finding"})
_REQUIRED = ("Image Index", "Finding Labels", "Patient ID", "View Position")


def nih_labels(text: str | None) -> tuple[np.ndarray, str]:
    """``Finding Labels`` -> ((14,) int8 CheXpert labels, ";"-joined findings with no label).

    1 / 0 for the labels NIH states, -1 for NIH_MISSING. Raises ValueError for a blank cell,
    an unknown finding, or "No Finding" listed beside a finding.
    """
    names = [x.strip() for x in (text or "").split("|") if x.strip()]
    if not names:
        raise ValueError("blank Finding Labels")
    unknown = sorted(set(names) - set(NIH_FINDINGS) - {"No Finding"})
    if unknown:
        raise ValueError(f"unknown finding(s) {unknown} in Finding Labels {text!r}")
    if "No Finding" in names and len(names) > 1:
        raise ValueError(f"'No Finding' beside findings in Finding Labels {text!r}")
    positive = {NIH_TO_CHEXPERT[n] for n in names if n in NIH_TO_CHEXPERT}
    labels = np.array([name in positive for name in CHEXPERT_LABELS], dtype=np.int8)
    labels[CHEXPERT_LABELS.index("No Finding")] = names == ["No Finding"]
    labels[[CHEXPERT_LABELS.index(name) for name in NIH_MISSING]] = -1
    return labels, ";".join(dict.fromkeys(n for n in names if n in NIH_OTHER))  # as written, once each


def _image_paths(root: str) -> dict[str, str]:
    """Image file name -> path relative to root, for the PNGs under ROOT/images*/."""
    out: dict[str, str] = {}
    for entry in sorted(os.listdir(root)):
        top = os.path.join(root, entry)
        if not (entry.lower().startswith("images") and os.path.isdir(top)):
            continue
        for dirpath, _, names in os.walk(top):
            for name in names:
                if name.lower().endswith(".png"):
                    out.setdefault(name, os.path.relpath(os.path.join(dirpath, name), root))
    return out


def _official_split(root: str) -> dict[str, str] | None:
    """Image Index -> "train" | "test" from the two list files; None when both are absent."""
    paths = {split: os.path.join(root, name) for split, name in NIH_LISTS.items()}
    present = [p for p in paths.values() if os.path.exists(p)]
    if not present:
        return None
    if len(present) == 1:
        missing = next(p for p in paths.values() if not os.path.exists(p))
        raise DataError(missing, "missing: ChestX-ray14's official split needs both list files")
    out: dict[str, str] = {}
    for split, path in paths.items():
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    out[line.strip()] = split
    return out


def _split_of(image: str, subject: str, official: dict[str, str] | None, holdout, seed) -> str | None:
    if official is None:
        return hash_split(subject, *holdout, seed=seed)
    split = official.get(image)
    if split == "train":
        return hash_split(subject, holdout[0], 0.0, seed=seed)  # train or validate, by patient
    return split


def load_nih(
    root: str | os.PathLike,
    *,
    csv_path: str | os.PathLike | None = None,
    frontal_order: Sequence[str] = FRONTAL_VIEWS,
    lateral_views: Sequence[str] = LATERAL_VIEWS,
    holdout: tuple[float, float] = (0.05, 0.05),
    seed: int | None = None,
    dataset: str = "nih-cxr14",
) -> StudyTable:
    """The ChestX-ray14 study table (see the module docstring).

    Args:
        csv_path: the data entry CSV (default: ROOT/Data_Entry_2017.csv).
        holdout: (validate, test) patient fractions; with the official lists only the
            validate fraction is used (of the train_val patients).
    Rows with an empty id, a repeated Image Index, a bad Finding Labels cell or no split
    are listed in ``rejects``; missing PNGs are rejected when read.
    """
    root = os.fspath(root)
    frontal_order, lateral_views = _normalise_views(frontal_order, lateral_views)
    csv_path = os.fspath(csv_path) if csv_path else os.path.join(root, NIH_CSV)
    if not os.path.exists(csv_path):
        raise DataError(csv_path, f"missing: a ChestX-ray14 root holds {NIH_CSV}")
    official = _official_split(root)
    if official is None:
        log.warning("%s: no %s / %s; patients split by a seeded hash (holdout %s)", root,
                    *NIH_LISTS.values(), tuple(holdout))
    paths = _image_paths(root)
    studies, rejects, seen = [], [], set()
    for n, row in _read_csv(csv_path, _REQUIRED):
        where = f"{csv_path}:{n}"
        ids = {k: (row[k] or "").strip() for k in ("Image Index", "Patient ID")}
        image, subject = ids.values()
        problem = id_problem(ids, "Image Index", seen)
        if problem:
            rejects.append((where, problem))
            continue
        try:
            labels, other = nih_labels(row["Finding Labels"])
        except ValueError as exc:
            rejects.append((where, str(exc)))
            continue
        split = _split_of(image, subject, official, holdout, seed)
        if split is None:
            rejects.append((where, f"{image} is in neither {' nor '.join(NIH_LISTS.values())}"))
            continue
        stem = os.path.splitext(image)[0]
        vp = (row["View Position"] or "").strip().upper()
        study = Study(study_id=stem, subject_id=subject, split=split, labels=labels, other_labels=other)
        view = classify_view(vp, frontal_order, lateral_views)
        record = ImageRecord(stem, stem, subject, vp, view, paths.get(image, os.path.join("images", image)),
                             "View Position" if vp else "")
        getattr(study, view).append(record)
        studies.append(study)
    return finish_table(root, studies, rejects, frontal_order=frontal_order, lateral_views=lateral_views,
                        dataset=dataset, inputs=(csv_path, *(os.path.join(root, p) for p in NIH_LISTS.values()
                                                            if official is not None)))
