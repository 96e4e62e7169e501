"""CheXpert v1.0 (and its "small" download) and CheXpert Plus as study tables.

CheXpert v1.0 / small (JPEG, 8-bit)::

    ROOT/train.csv  ROOT/valid.csv  [ROOT/test.csv or test_labels.csv]
    Path,Sex,Age,Frontal/Lateral,AP/PA,<14 labels>
    CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,...

``ROOT`` is the ``CheXpert-v1.0(-small)`` folder or the folder holding it. Paths start
with that folder's name. Labels are 1.0, 0.0, -1.0 (uncertain) or blank, read with the
policies of :func:`fastssl.data.mimic.parse_labels`. Official splits: train.csv ->
"train", valid.csv -> "validate", a test CSV -> "test"; without a test CSV a seeded
patient-level fraction of the train patients becomes "test".

CheXpert Plus (PNG, 16-bit)::

    ROOT/df_chexpert_plus_240401.csv   path_to_image,frontal_lateral,ap_pa,deid_patient_id,split,...
    ROOT/PNG/train/patient42142/study5/view1_frontal.png   (or ROOT/PNG/PNG/..., ROOT/train/...)

Its CSV carries no CheXpert labels (they ship separately): pass ``labels=`` a CSV with a
``path_to_image`` (or ``Path``) column and the 14 label columns; without it every
label follows the blank policy.

Views: ``Frontal/Lateral`` decides frontal / lateral; ``AP/PA`` gives the ViewPosition
(a frontal whose AP/PA is outside ``frontal_order`` is "other"); when the column is
blank the file name (``view1_frontal``) decides; else the image is "unknown".
"""
from __future__ import annotations

import glob
import logging
import os
import re
from typing import Sequence

import numpy as np

from fastssl.data.mimic import (
    CHEXPERT_LABELS,
    FRONTAL_VIEWS,
    LATERAL_VIEWS,
    ImageRecord,
    Study,
    StudyTable,
    _check_policy,
    _normalise_views,
    _read_csv,
    finish_table,
    hash_split,
    parse_labels,
    read_study_labels,
)
from fastssl.errors import DataError

__all__ = ["load_chexpert", "load_chexpert_plus", "chexpert_ids", "chexpert_view"]

log = logging.getLogger(__name__)

_SPLIT_FILES = (("train", ("train.csv",)), ("validate", ("valid.csv",)), ("test", ("test.csv", "test_labels.csv")))
_PATIENT_RE = re.compile(r"(?:^|[/\\])(patient\d+)[/\\](study\d+)[/\\]([^/\\]+)$")


def chexpert_ids(path: str) -> tuple[str, str, str] | None:
    """``.../patient00001/study1/view1_frontal.jpg`` -> (subject "patient00001",
    study "patient00001_study1", image "patient00001_study1_view1_frontal"), or None."""
    m = _PATIENT_RE.search(path.strip())
    if not m:
        return None
    subject, study, name = m.groups()
    stem = os.path.splitext(name)[0]
    return subject, f"{subject}_{study}", f"{subject}_{study}_{stem}"


def chexpert_view(frontal_lateral: str | None, ap_pa: str | None, path: str,
                  frontal_order: Sequence[str] = FRONTAL_VIEWS) -> tuple[str, str, str]:
    """(view, view_position, source column) of one CheXpert row (see module docstring)."""
    fl = (frontal_lateral or "").strip().lower()
    vp = (ap_pa or "").strip().upper()
    source = "Frontal/Lateral"
    if fl not in ("frontal", "lateral"):
        name = os.path.basename(path).lower()
        fl = "frontal" if "frontal" in name else "lateral" if "lateral" in name else ""
        source = "file name" if fl else ""
    if fl == "lateral":
        return "lateral", vp or "LATERAL", source
    if fl == "frontal":
        return ("other" if vp and vp not in frontal_order else "frontal"), vp, source
    return "unknown", vp, ""


def _find_csv_dir(root: str, names: Sequence[str]) -> str:
    """The folder holding one of ``names``: root itself or a CheXpert-* folder in it."""
    candidates = [root] + sorted(glob.glob(os.path.join(root, "CheXpert*")))
    for folder in candidates:
        if any(os.path.isfile(os.path.join(folder, n)) for n in names):
            return folder
    raise DataError(root, f"no {' or '.join(names)} here or in a CheXpert-* folder in it")


def _image_base(csv_dir: str, first_path: str) -> str:
    """The folder that CSV paths are relative to: the CSV folder's parent when paths
    start with the CSV folder's own name (CheXpert-v1.0-small/train/...), else itself."""
    head = first_path.replace("\\", "/").split("/", 1)[0]
    return os.path.dirname(csv_dir) if head == os.path.basename(csv_dir) else csv_dir


def load_chexpert(
    root: str | os.PathLike,
    *,
    uncertain: str = "zeros",
    blank: str = "zeros",
    frontal_order: Sequence[str] = FRONTAL_VIEWS,
    lateral_views: Sequence[str] = LATERAL_VIEWS,
    test_fraction: float = 0.05,
    seed: int = 0,
    dataset: str = "chexpert",
) -> StudyTable:
    """The CheXpert v1.0 / small study table (see the module docstring).

    Args:
        test_fraction: share of train.csv patients held out as "test" (seeded by
            ``seed``) when no test CSV is present; 0 keeps all of them in "train".
    Rows with a path outside ``patientN/studyN/``, a repeated path, or a bad label are
    listed in ``rejects``; missing image files are rejected later, when read.
    """
    root = os.fspath(root)
    frontal_order, lateral_views = _normalise_views(frontal_order, lateral_views)
    _check_policy("uncertain", uncertain)
    _check_policy("blank", blank)
    csv_dir = _find_csv_dir(root, ("train.csv", "valid.csv"))
    has_test = any(os.path.isfile(os.path.join(csv_dir, n)) for n in _SPLIT_FILES[2][1])
    rows: list[tuple[str, str, dict]] = []  # (split, "file:line", row)
    inputs = []
    for split, names in _SPLIT_FILES:
        for name in names:
            path = os.path.join(csv_dir, name)
            if os.path.isfile(path):
                inputs.append(path)
                rows.extend((split, f"{path}:{n}", row) for n, row in _read_csv(path, ("Path",) + CHEXPERT_LABELS))
                break
    if not rows:
        raise DataError(csv_dir, "train.csv / valid.csv hold no rows")
    base = _image_base(csv_dir, rows[0][2]["Path"])
    studies: dict[str, Study] = {}
    rejects: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    for split, where, row in rows:
        rel = (row["Path"] or "").strip()
        ids = chexpert_ids(rel)
        if ids is None:
            rejects.append((where, f"Path {rel!r} is not .../patientN/studyN/<image>"))
            continue
        if rel in seen:
            rejects.append((where, f"Path repeated (first at {seen[rel]}); kept once"))
            continue
        seen[rel] = where
        try:
            labels = parse_labels(row, uncertain=uncertain, blank=blank, source=where.rsplit(":", 1)[0],
                                  line=int(where.rsplit(":", 1)[1]))
        except DataError as exc:
            rejects.append((where, exc.reason))
            continue
        subject, study_id, image_id = ids
        if split == "train" and not has_test:
            split = hash_split(subject, 0.0, test_fraction, seed=seed)
        study = studies.setdefault(study_id, Study(study_id=study_id, subject_id=subject, split=split, labels=labels))
        view, vp, source = chexpert_view(row.get("Frontal/Lateral"), row.get("AP/PA"), rel, frontal_order)
        getattr(study, view).append(ImageRecord(image_id, study_id, subject, vp, view, rel, source))
    return finish_table(base, studies.values(), rejects, frontal_order=frontal_order,
                        lateral_views=lateral_views, dataset=dataset, inputs=inputs)


_PLUS_SPLITS = {"train": "train", "valid": "validate", "validate": "validate", "test": "test"}


def load_chexpert_plus(
    root: str | os.PathLike,
    *,
    csv_path: str | os.PathLike | None = None,
    labels: str | os.PathLike | None = None,
    image_dir: str | os.PathLike | None = None,
    suffix: str = ".png",
    uncertain: str = "zeros",
    blank: str = "zeros",
    frontal_order: Sequence[str] = FRONTAL_VIEWS,
    lateral_views: Sequence[str] = LATERAL_VIEWS,
    test_fraction: float = 0.05,
    seed: int = 0,
    dataset: str = "chexpert-plus",
) -> StudyTable:
    """The CheXpert Plus study table (see the module docstring).

    Args:
        csv_path: the metadata CSV (default: ``df_chexpert_plus*.csv`` in ``root``).
        labels: a CSV of ``path_to_image`` (or ``Path``) + the 14 labels.
        image_dir: the folder ``path_to_image`` is relative to (default: the first of
            ROOT/PNG/PNG, ROOT/PNG, ROOT that has a ``train`` folder, else ROOT).
        suffix: the image suffix on disk (".png"; the CSV names ".jpg").
        test_fraction, seed: as :func:`load_chexpert` (the CSV's splits are train/valid).
    """
    root = os.fspath(root)
    frontal_order, lateral_views = _normalise_views(frontal_order, lateral_views)
    _check_policy("uncertain", uncertain)
    fill = _check_policy("blank", blank)
    csv_path = os.fspath(csv_path) if csv_path else _plus_csv(root)
    image_dir = os.fspath(image_dir) if image_dir else next(
        (d for d in (os.path.join(root, "PNG", "PNG"), os.path.join(root, "PNG"), root)
         if os.path.isdir(os.path.join(d, "train"))), root)
    study_labels, bad_labels = ({}, {}) if labels is None else _plus_labels(os.fspath(labels), uncertain, blank)
    if labels is None:
        log.warning("%s: no labels CSV for CheXpert Plus; labels follow the blank policy (%s)", root, blank)
    studies: dict[str, Study] = {}
    rejects: list[tuple[str, str]] = []
    seen: set[str] = set()
    for n, row in _read_csv(csv_path, ("path_to_image", "frontal_lateral", "ap_pa", "split")):
        where, rel = f"{csv_path}:{n}", (row["path_to_image"] or "").strip()
        ids = chexpert_ids(rel)
        split = _PLUS_SPLITS.get((row["split"] or "").strip().lower())
        if ids is None or split is None or rel in seen:
            why = ("repeated path_to_image" if ids and split and rel in seen else
                   f"split {row['split']!r} unknown" if ids else f"path_to_image {rel!r} is not .../patientN/studyN/<image>")
            rejects.append((where, why))
            continue
        seen.add(rel)
        if rel in bad_labels:
            rejects.append((where, f"labels CSV row unusable ({bad_labels[rel]})"))
            continue
        subject = (row.get("deid_patient_id") or "").strip() or ids[0]
        _, study_id, image_id = ids
        if split == "train":
            split = hash_split(subject, 0.0, test_fraction, seed=seed)
        study = studies.setdefault(study_id, Study(
            study_id=study_id, subject_id=subject, split=split,
            labels=study_labels.get(rel, np.full(len(CHEXPERT_LABELS), fill, dtype=np.int8)).copy()))
        view, vp, source = chexpert_view(row["frontal_lateral"], row["ap_pa"], rel, frontal_order)
        path = os.path.splitext(rel)[0] + suffix
        getattr(study, view).append(ImageRecord(image_id, study_id, subject, vp, view, path, source))
    return finish_table(image_dir, studies.values(), rejects, frontal_order=frontal_order,
                        lateral_views=lateral_views, dataset=dataset, inputs=(csv_path, labels))


def _plus_csv(root: str) -> str:
    found = sorted(glob.glob(os.path.join(root, "df_chexpert_plus*.csv")))
    if not found:
        raise DataError(root, "no df_chexpert_plus*.csv here; pass csv_path=")
    return found[-1]  # the newest release sorts last (its date is in the name)


def _plus_labels(path: str, uncertain: str, blank: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    for _, row in _read_csv(path, ()):
        key = "path_to_image" if "path_to_image" in row else "Path"
        break
    else:
        return {}, {}
    return read_study_labels(path, key, uncertain=uncertain, blank=blank)

