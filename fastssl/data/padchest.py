"""PadChest as a study table: 16-bit PNGs, a Projection column, label lists.

Layout::

    ROOT/PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv(.gz)
    ROOT/<ImageDir>/<ImageID>          (16-bit grayscale PNG)

Columns used: ImageID, ImageDir, StudyID, PatientID, Projection, Labels; optional
ViewPosition_DICOM (when Projection is UNK or blank), BitsStored_DICOM and
PhotometricInterpretation_DICOM (pixel hints, below).

Views (``Projection``): PA, AP, AP_horizontal -> frontal (ViewPosition PA / AP / AP);
L -> lateral (LATERAL); COSTAL, EXCLUDE and others -> other; UNK or blank -> from
ViewPosition_DICOM when it says, else unknown.

Labels: ``Labels`` is a Python-style list ("['pleural effusion', ' cardiomegaly']",
items often with a leading space). Each finding maps onto one CheXpert label through the
shipped table ``tables/padchest_to_chexpert.csv``: the released MVMAE harmonisation map
(agostini335/MVMAE ``utils/padchest_to_mimic_mapping.csv``; where that file lists a
finding twice, its later row), all 193 findings it maps. Findings it maps to "No
Finding" (scoliosis, goiter, ...) set no label. "No Finding" is 1 when no label other
than Support Devices is positive, as in CheXpert. Findings that set no label (other
than "normal") are kept, ";"-joined, in the study's ``other_labels`` (the cache's
``other_labels`` column), as are findings the table does not know. PadChest states no
uncertainty: a listed finding is positive, an unlisted one negative; a blank ``Labels``
cell makes all 14 follow the blank policy.

Pixels (photometric conventions): the PNGs hold 16-bit unsigned values that are read
without any 8-bit step. Many films use only 12 of the 16 bits; the record's
``BitsStored_DICOM`` sets the stored range 0 .. 2**bits - 1 that ``voi="auto"`` maps
onto [0, 1] (without it, see :mod:`fastssl.data.images`). Rows whose
``PhotometricInterpretation_DICOM`` is MONOCHROME1 are inverted so that bone is bright:
this assumes, as the column's presence suggests, that the PNG kept the DICOM's stored
values; we could not check it against the real files, and ``voi="minmax"`` does not
change that inversion. No official split exists: patients are split by a seeded hash.
"""
from __future__ import annotations

import csv
import glob
import os
from functools import lru_cache
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
    classify_view,
    finish_table,
    hash_split,
    resolve_view,
)
from fastssl.errors import DataError

__all__ = ["load_padchest", "padchest_labels", "parse_label_list", "mapping_table", "PROJECTIONS"]

PROJECTIONS = {"PA": "PA", "AP": "AP", "AP_HORIZONTAL": "AP", "L": "LATERAL"}
_TABLE = os.path.join(os.path.dirname(__file__), "tables", "padchest_to_chexpert.csv")
_REQUIRED = ("ImageID", "ImageDir", "StudyID", "PatientID", "Projection", "Labels")


@lru_cache(maxsize=None)
def mapping_table(path: str = _TABLE) -> dict[str, tuple[str, ...]]:
    """The shipped finding -> CheXpert labels table (released MVMAE map), keys lower-case."""
    with open(path, encoding="utf-8", newline="") as handle:
        table = {}
        for row in csv.DictReader(handle):
            labels = tuple(x.strip() for x in row["chexpert_labels"].split(";") if x.strip())
            unknown = set(labels) - set(CHEXPERT_LABELS)
            if unknown:
                raise DataError(path, f"{row['padchest_finding']!r} maps to unknown labels {sorted(unknown)}")
            table[row["padchest_finding"].strip().lower()] = labels
    return table


def parse_label_list(text: str | None) -> list[str] | None:
    """"['a', ' b']" -> ["a", "b"] (lower-case, stripped, empties dropped); a blank or
    "nan" cell -> None."""
    text = (text or "").strip()
    if not text or text.lower() == "nan":
        return None
    inner = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    items = (item.strip().strip("'\"").strip().lower() for item in inner.split(","))
    return [item for item in items if item]


def padchest_labels(findings: list[str] | None, blank_value: int) -> tuple[np.ndarray, str]:
    """Findings -> ((14,) int8 CheXpert labels, ";"-joined unmapped findings)."""
    if findings is None:
        return np.full(len(CHEXPERT_LABELS), blank_value, dtype=np.int8), ""
    table = mapping_table()
    positive, other = set(), []
    for finding in findings:
        labels = set(table.get(finding, ())) - {"No Finding"}  # "No Finding" targets set nothing
        if labels:
            positive.update(labels)
        elif finding != "normal" and finding not in other:
            other.append(finding)
    labels = np.array([name in positive for name in CHEXPERT_LABELS], dtype=np.int8)
    labels[CHEXPERT_LABELS.index("No Finding")] = not (positive - {"Support Devices"})
    return labels, ";".join(other)


def padchest_view(projection: str | None, dicom_view: str | None, frontal_order: Sequence[str],
                  lateral_views: Sequence[str]) -> tuple[str, str, str]:
    """(view, view_position, source column) of one row (see the module docstring)."""
    proj = (projection or "").strip().upper()
    if proj and proj != "UNK":
        vp = PROJECTIONS.get(proj, proj)
        return classify_view(vp, frontal_order, lateral_views), vp, "Projection"
    raw = (dicom_view or "").strip().upper()
    vp = raw if raw in (*frontal_order, *lateral_views) else resolve_view(None, view_code=raw)[0]
    if vp:
        return classify_view(vp, frontal_order, lateral_views), vp, "ViewPosition_DICOM"
    return "unknown", "", ""


def id_problem(ids: dict[str, str], key: str, seen: set[str]) -> str | None:
    """Why a CSV row cannot be used, from its ids (``{column: stripped value}``): an empty
    one, or a repeat of ``ids[key]`` already in ``seen``; None when usable (then seen)."""
    if not all(ids.values()):
        return f"empty {', '.join(ids)}"
    if ids[key] in seen:
        return f"{key} {ids[key]} repeated; kept once"
    seen.add(ids[key])
    return None


def _hints(row: dict, where: str) -> tuple:
    hints = []
    bits = (row.get("BitsStored_DICOM") or "").strip()
    if bits:
        try:
            hints.append(("bits_stored", int(float(bits))))
        except ValueError:
            raise DataError(where, f"BitsStored_DICOM {bits!r} is not a number") from None
    if (row.get("PhotometricInterpretation_DICOM") or "").strip().upper() == "MONOCHROME1":
        hints.append(("monochrome1", True))
    return tuple(hints)


def load_padchest(
    root: str | os.PathLike,
    *,
    csv_path: str | os.PathLike | None = None,
    blank: str = "zeros",
    frontal_order: Sequence[str] = FRONTAL_VIEWS,
    lateral_views: Sequence[str] = LATERAL_VIEWS,
    holdout: tuple[float, float] = (0.05, 0.05),
    seed: int = 0,
    dataset: str = "padchest",
) -> StudyTable:
    """The PadChest study table (see the module docstring).

    Args:
        csv_path: the labels CSV (default: ``PADCHEST_chest_x_ray_images_labels*.csv*`` in root).
        holdout: (validate, test) fractions of patients, split by a hash seeded with ``seed``.
    Rows with empty ids, a repeated ImageID or a bad BitsStored_DICOM are listed in
    ``rejects``; missing PNGs are rejected when read.
    """
    root = os.fspath(root)
    frontal_order, lateral_views = _normalise_views(frontal_order, lateral_views)
    fill = _check_policy("blank", blank)
    csv_path = os.fspath(csv_path) if csv_path else _find(root)
    studies: dict[str, Study] = {}
    rejects: list[tuple[str, str]] = []
    seen: set[str] = set()
    for n, row in _read_csv(csv_path, _REQUIRED):
        where = f"{csv_path}:{n}"
        folder = (row["ImageDir"] or "").strip()
        ids = {k: (row[k] or "").strip() for k in ("ImageID", "StudyID", "PatientID")}
        image, study_id, subject = ids.values()
        problem = id_problem(ids, "ImageID", seen)
        if problem:
            rejects.append((where, problem))
            continue
        try:
            hints = _hints(row, where)
        except DataError as exc:
            rejects.append((where, exc.reason))
            continue
        study = studies.get(study_id)
        if study is None:
            labels, other = padchest_labels(parse_label_list(row["Labels"]), fill)
            study = studies[study_id] = Study(study_id=study_id, subject_id=subject,
                                              split=hash_split(subject, *holdout, seed=seed),
                                              labels=labels, other_labels=other)
        view, vp, source = padchest_view(row["Projection"], row.get("ViewPosition_DICOM"), frontal_order, lateral_views)
        path = os.path.join(folder, image) if folder else image
        getattr(study, view).append(ImageRecord(os.path.splitext(image)[0], study_id, subject, vp, view,
                                                path, source, hints))
    return finish_table(root, studies.values(), rejects, frontal_order=frontal_order,
                        lateral_views=lateral_views, dataset=dataset, inputs=(csv_path,))


def _find(root: str) -> str:
    found = sorted(glob.glob(os.path.join(root, "PADCHEST_chest_x_ray_images_labels*.csv*")))
    if not found:
        raise DataError(root, "no PADCHEST_chest_x_ray_images_labels*.csv(.gz) here; pass csv_path=")
    return found[-1]
