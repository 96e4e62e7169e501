"""MIMIC-CXR studies: frontal and lateral images of one study, its split and labels.

Two ways in, one table out (:class:`StudyTable`):

* :func:`load_mimic_csv` reads the official CSVs (``mimic-cxr-2.0.0-metadata``,
  ``-split``, ``-chexpert`` or ``-negbio``; ``.csv`` or ``.csv.gz``) with the stdlib
  csv module; paths follow the layout ``files/p1X/p<subject>/s<study>/<dicom_id>.dcm``.
* :func:`scan_dicom_tree` needs no CSV: it reads DICOM headers only (in a process
  pool) and pairs images by StudyInstanceUID and ViewPosition.

Images without a ViewPosition are kept with view "unknown" and views outside the
frontal/lateral lists (e.g. "AP AXIAL", "LAO") with view "other"; both are counted in
:meth:`StudyTable.summary`, never dropped silently. Unreadable files are listed in
``StudyTable.rejects`` as (path, reason).
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import logging
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np

from fastssl.distributed import usable_cores
from fastssl.errors import DataError

__all__ = [
    "CHEXPERT_LABELS", "FRONTAL_VIEWS", "LATERAL_VIEWS", "LABEL_POLICIES", "VIEWS", "SPLITS",
    "ImageRecord", "Study", "StudyTable", "load_mimic_csv", "scan_dicom_tree",
    "find_csv", "mimic_path", "parse_labels", "resolve_view", "enforce_patient_splits",
    "read_study_labels", "read_split_csv",
]

log = logging.getLogger(__name__)

CHEXPERT_LABELS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
    "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion",
    "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices",
)
FRONTAL_VIEWS = ("PA", "AP")  # preference order: PA first (standard erect chest film)
LATERAL_VIEWS = ("LATERAL", "LL")
VIEWS = ("frontal", "lateral", "other", "unknown")
# What uncertain (-1) and blank labels become: 0, 1, or -1 = "ignore" (a mask value).
LABEL_POLICIES = {"zeros": 0, "ones": 1, "ignore": -1}
# Split names, most held out first: a patient found in two splits goes to the first one.
SPLITS = ("test", "validate", "train")

_PREFIX = "mimic-cxr-2.0.0-"


@dataclass(frozen=True)
class ImageRecord:
    """One image. ``path`` is relative to the dataset root (or absolute after a scan
    of a tree outside the MIMIC layout); ``view_position`` is "" when absent."""

    dicom_id: str
    study_id: str
    subject_id: str
    view_position: str
    view: str  # one of VIEWS
    path: str
    # Which field gave view_position: "ViewPosition", "ViewCodeSequence",
    # "ProcedureDescription", a dataset's own column name, or "" (none: view unknown).
    view_source: str = ""
    # Reading hints for PNG/JPG pixels as (name, value) pairs, e.g. ("bits_stored", 12),
    # ("monochrome1", True); see fastssl.data.images.read_image.
    pixel: tuple = ()


@dataclass
class Study:
    """One study. Image lists are in preference order (``frontal[0]`` is preferred).

    ``labels``: (14,) int8 in CHEXPERT_LABELS order, 1 positive, 0 negative, -1 ignore
    (only when the uncertain/blank policy is "ignore").
    """

    study_id: str
    subject_id: str
    split: str
    labels: np.ndarray
    frontal: list[ImageRecord] = field(default_factory=list)
    lateral: list[ImageRecord] = field(default_factory=list)
    other: list[ImageRecord] = field(default_factory=list)
    unknown: list[ImageRecord] = field(default_factory=list)
    dataset: str = ""  # the source's dataset name ("mimic-cxr", "chexpert", ...)
    # The dataset's own findings that map to none of the 14 labels (";"-joined), kept
    # for users who want them (PadChest); "" for datasets labelled with the 14.
    other_labels: str = ""

    @property
    def paired(self) -> bool:
        return bool(self.frontal) and bool(self.lateral)

    def images(self) -> list[ImageRecord]:
        return self.frontal + self.lateral + self.other + self.unknown


@dataclass
class StudyTable:
    """Studies sorted by (subject_id, study_id), plus the files that could not be used."""

    root: str
    studies: list[Study]
    rejects: list[tuple[str, str]] = field(default_factory=list)
    dataset: str = ""
    inputs: list[str] = field(default_factory=list)  # the CSVs it was read from (for resume identity)

    def images(self) -> Iterator[tuple[int, ImageRecord]]:
        """(study index, image) for every image, study by study, preferred views first."""
        for i, study in enumerate(self.studies):
            for image in study.images():
                yield i, image

    def summary(self) -> dict[str, int]:
        """Counts: studies with both views, frontal only, lateral only, neither; images
        per view class; rejected files."""
        out = dict(studies=len(self.studies), both=0, frontal_only=0, lateral_only=0, neither=0,
                   images=0, rejects=len(self.rejects))
        for view in VIEWS:
            out[f"{view}_images"] = 0
        for study in self.studies:
            f, l = bool(study.frontal), bool(study.lateral)
            key = "both" if f and l else "frontal_only" if f else "lateral_only" if l else "neither"
            out[key] += 1
            for view in VIEWS:
                n = len(getattr(study, view))
                out[f"{view}_images"] += n
                out["images"] += n
        return out

    def format_summary(self) -> str:
        s = self.summary()
        lines = [
            f"studies {s['studies']}: both views {s['both']}, frontal only {s['frontal_only']}, "
            f"lateral only {s['lateral_only']}, neither {s['neither']}",
            f"images {s['images']}: frontal {s['frontal_images']}, lateral {s['lateral_images']}, "
            f"other view {s['other_images']}, no ViewPosition {s['unknown_images']}; rejected files {s['rejects']}",
        ]
        return "\n".join(lines)


# ---------------------------------------------------------------- helpers

def classify_view(view_position: str | None, frontal_order: Sequence[str] = FRONTAL_VIEWS,
                  lateral_views: Sequence[str] = LATERAL_VIEWS) -> str:
    """ViewPosition -> "frontal" | "lateral" | "other" | "unknown" (absent/blank)."""
    vp = (view_position or "").strip().upper()
    if not vp:
        return "unknown"
    if vp in frontal_order:
        return "frontal"
    if vp in lateral_views:
        return "lateral"
    return "other"


def mimic_path(subject_id: str, study_id: str, dicom_id: str, suffix: str = ".dcm") -> str:
    """The MIMIC-CXR relative path ``files/p1X/p<subject>/s<study>/<dicom_id>.dcm``
    (``.jpg`` in MIMIC-CXR-JPG)."""
    return f"files/p{subject_id[:2]}/p{subject_id}/s{study_id}/{dicom_id}{suffix}"


def find_csv(root: str | os.PathLike, name: str) -> str | None:
    """``root/mimic-cxr-2.0.0-<name>.csv.gz`` or ``.csv`` (or the bare name), else None."""
    for candidate in (f"{_PREFIX}{name}.csv.gz", f"{_PREFIX}{name}.csv", f"{name}.csv.gz", f"{name}.csv"):
        path = os.path.join(os.fspath(root), candidate)
        if os.path.isfile(path):
            return path
    return None


def _read_csv(path: str, required: Iterable[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """Rows of a .csv or .csv.gz as dicts, with (1-based data) line numbers."""
    try:
        raw = gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
        with raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            missing = sorted(set(required) - set(reader.fieldnames or ()))
            if missing:
                raise DataError(path, f"missing columns {missing}; found {reader.fieldnames}")
            for n, row in enumerate(reader, start=2):
                yield n, row
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(path, f"cannot read CSV ({type(exc).__name__}: {exc})") from None


def _check_policy(name: str, value: str) -> int:
    if value not in LABEL_POLICIES:
        raise ValueError(f"{name}={value!r}; expected one of {sorted(LABEL_POLICIES)}")
    return LABEL_POLICIES[value]


def parse_labels(row: dict[str, str], *, uncertain: str = "zeros", blank: str = "zeros",
                 source: str = "labels CSV", line: int = 0) -> np.ndarray:
    """The 14 CheXpert columns of one CSV row -> (14,) int8 under the given policies.

    "1.0" -> 1, "0.0" -> 0, "-1.0" -> ``uncertain`` policy, "" -> ``blank`` policy
    (policies: "zeros" -> 0, "ones" -> 1, "ignore" -> -1).
    """
    unc, blk = _check_policy("uncertain", uncertain), _check_policy("blank", blank)
    out = np.empty(len(CHEXPERT_LABELS), dtype=np.int8)
    for k, name in enumerate(CHEXPERT_LABELS):
        value = (row.get(name) or "").strip()
        if value == "":
            out[k] = blk
            continue
        try:
            number = float(value)
        except ValueError:
            number = None
        if number == 1.0:
            out[k] = 1
        elif number == 0.0:
            out[k] = 0
        elif number == -1.0:
            out[k] = unc
        else:
            raise DataError(source, f"line {line}: label {name!r} = {value!r}; expected 1, 0, -1 or blank")
    return out


_VIEW_CODE_WORDS = (  # ViewCodeSequence CodeMeaning -> ViewPosition (first match wins)
    ("postero-anterior", "PA"), ("posteroanterior", "PA"), ("antero-posterior", "AP"),
    ("anteroposterior", "AP"), ("left lateral", "LL"), ("latero-lateral", "LATERAL"),
    ("lateral", "LATERAL"),
)
_PROCEDURE_VIEWS = (("PA", re.compile(r"\bPA\b")), ("AP", re.compile(r"\bAP\b")),
                    ("LATERAL", re.compile(r"\bLAT(ERAL)?\b")))


def resolve_view(view_position: str | None, *, view_code: str | None = None,
                 procedure: str | None = None) -> tuple[str, str]:
    """The ViewPosition of an image, from the first field that states it.

    1. ``view_position`` (tag (0018,5101) or the CSV column) when not blank;
    2. ``view_code``: the ViewCodeSequence CodeMeaning ("postero-anterior" -> PA,
       "antero-posterior" -> AP, "left lateral" -> LL, other "lateral" -> LATERAL);
    3. ``procedure``: the PerformedProcedureStepDescription when it names exactly one
       view ("CHEST (PORTABLE AP)" -> AP); "CHEST (PA AND LAT)" names two and says
       nothing about one image.
    Returns (view_position, source field) or ("", "") when none says.
    """
    vp = (view_position or "").strip().upper()
    if vp:
        return vp, "ViewPosition"
    code = (view_code or "").strip().lower()
    for words, position in _VIEW_CODE_WORDS:
        if words in code:
            return position, "ViewCodeSequence"
    named = [position for position, pattern in _PROCEDURE_VIEWS if pattern.search((procedure or "").upper())]
    if len(named) == 1:
        return named[0], "ProcedureDescription"
    return "", ""


def _sort_views(study: Study, frontal_order: Sequence[str], lateral_views: Sequence[str]) -> None:
    # PA before AP (or the configured order); ties by dicom_id so the order is stable.
    rank_f = {v: i for i, v in enumerate(frontal_order)}
    rank_l = {v: i for i, v in enumerate(lateral_views)}
    study.frontal.sort(key=lambda r: (rank_f.get(r.view_position, 99), r.dicom_id))
    study.lateral.sort(key=lambda r: (rank_l.get(r.view_position, 99), r.dicom_id))
    study.other.sort(key=lambda r: (r.view_position, r.dicom_id))
    study.unknown.sort(key=lambda r: r.dicom_id)


def _normalise_views(frontal_order, lateral_views) -> tuple[tuple[str, ...], tuple[str, ...]]:
    frontal = tuple(v.strip().upper() for v in frontal_order)
    lateral = tuple(v.strip().upper() for v in lateral_views)
    if not frontal or not lateral:
        raise ValueError(f"frontal_order={frontal_order!r} and lateral_views={lateral_views!r} must be non-empty")
    if set(frontal) & set(lateral):
        raise ValueError(f"views {sorted(set(frontal) & set(lateral))} are both frontal and lateral")
    return frontal, lateral


def finish_table(root: str, studies: Iterable[Study], rejects: list[tuple[str, str]], *,
                 frontal_order: Sequence[str] = FRONTAL_VIEWS, lateral_views: Sequence[str] = LATERAL_VIEWS,
                 dataset: str = "", inputs: Iterable[str | None] = ()) -> StudyTable:
    """Sort each study's views and the studies, enforce patient-level splits, name the
    dataset, record the CSVs read (``inputs``): the last step of every source."""
    studies = list(studies)
    for study in studies:
        _sort_views(study, frontal_order, lateral_views)
        study.dataset = study.dataset or dataset
    enforce_patient_splits(studies, source=root)
    ordered = sorted(studies, key=lambda s: (s.subject_id, s.study_id))
    return StudyTable(root=root, studies=ordered, rejects=rejects, dataset=dataset,
                      inputs=[os.fspath(p) for p in inputs if p])


def enforce_patient_splits(studies: Sequence[Study], *, source: str = "") -> int:
    """Put every patient in one split: a patient found in several goes wholly into the
    most held-out one (test, then validate, then train, then others by name), so no
    image of a test patient is ever trained on. Returns the number of studies moved."""
    rank = {name: i for i, name in enumerate(SPLITS)}
    chosen: dict[str, str] = {}
    for study in studies:
        have = chosen.get(study.subject_id)
        if have is None or (rank.get(study.split, 99), study.split) < (rank.get(have, 99), have):
            chosen[study.subject_id] = study.split
    moved = 0
    for study in studies:
        if study.split != chosen[study.subject_id]:
            study.split = chosen[study.subject_id]
            moved += 1
    if moved:
        log.warning("%s: %d studies of patients found in two splits moved to the patient's most held-out split",
                    source or "study table", moved)
    return moved


def read_study_labels(path: str, key: str = "study_id", *, uncertain: str = "zeros", blank: str = "zeros",
                      ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A labels CSV (``key`` column + the 14 CheXpert columns) -> ({key: (14,) int8},
    {key of a bad row: "file:line: reason"}); a bad row is reported, never fatal."""
    labels: dict[str, np.ndarray] = {}
    bad: dict[str, str] = {}
    for n, row in _read_csv(path, (key,) + CHEXPERT_LABELS):
        ident = (row[key] or "").strip()
        try:
            labels[ident] = parse_labels(row, uncertain=uncertain, blank=blank, source=path, line=n)
        except DataError as exc:
            bad[ident] = f"{path}:{n}: {exc.reason}"
    return labels, bad


def read_split_csv(path: str) -> tuple[str, dict[str, str]]:
    """A split CSV keyed by ``subject_id`` (whole patients, preferred) or ``study_id`` ->
    (key column, {id: split}). The split column is ``split``; ``.csv`` or ``.csv.gz``."""
    out: dict[str, str] = {}
    key = None
    for _, row in _read_csv(path, ("split",)):
        if key is None:
            key = "subject_id" if "subject_id" in row else "study_id" if "study_id" in row else ""
            if not key:
                raise DataError(path, f"needs a subject_id or study_id column beside split; found {sorted(row)}")
        out[(row[key] or "").strip()] = (row["split"] or "").strip()
    return key or "subject_id", out


# ---------------------------------------------------------------- from the CSVs

def load_mimic_csv(
    root: str | os.PathLike,
    *,
    metadata: str | os.PathLike | None = None,
    split: str | os.PathLike | None = None,
    labels: str | os.PathLike | None = None,
    label_source: str = "chexpert",
    frontal_order: Sequence[str] = FRONTAL_VIEWS,
    lateral_views: Sequence[str] = LATERAL_VIEWS,
    uncertain: str = "zeros",
    blank: str = "zeros",
    check_files: bool = False,
    suffix: str = ".dcm",
    dataset: str = "mimic-cxr",
) -> StudyTable:
    """Build the study table from the MIMIC-CXR CSVs (the DICOM and the JPG releases
    ship the same ones).

    Args:
        root: the dataset root (holding ``files/`` and, by default, the CSVs).
        metadata, split, labels: explicit CSV paths; default: found in ``root``.
        label_source: "chexpert" or "negbio" (which labels CSV to look for).
        frontal_order: frontal ViewPositions in preference order (default PA, AP).
        lateral_views: lateral ViewPositions (default LATERAL, LL).
        uncertain, blank: label policies, "zeros" (default) | "ones" | "ignore" (-1).
        check_files: stat every image; missing ones become rejects instead of images.
        suffix: image file suffix: ".dcm" (MIMIC-CXR) or ".jpg" (MIMIC-CXR-JPG).
        dataset: the name recorded in the cache's ``dataset`` column.
    A blank ViewPosition is resolved from ViewCodeSequence_CodeMeaning, then from
    PerformedProcedureStepDescription (:func:`resolve_view`). Rows with empty ids, a
    repeated dicom_id, or (in the labels CSV) a bad label are listed in ``rejects``.
    Raises:
        DataError: a CSV is missing, unreadable or lacks a column.
        ValueError: a bad policy or view list.
    """
    root = os.fspath(root)
    frontal_order, lateral_views = _normalise_views(frontal_order, lateral_views)
    _check_policy("uncertain", uncertain)
    _check_policy("blank", blank)
    if label_source not in ("chexpert", "negbio"):
        raise ValueError(f"label_source={label_source!r}; expected 'chexpert' or 'negbio'")
    metadata = os.fspath(metadata) if metadata else find_csv(root, "metadata")
    split = os.fspath(split) if split else find_csv(root, "split")
    labels = os.fspath(labels) if labels else find_csv(root, label_source)
    if metadata is None:
        raise DataError(root, f"no {_PREFIX}metadata.csv(.gz) here; pass metadata= or scan the tree")
    splits = _read_dicom_splits(split, root)
    study_labels: dict[str, np.ndarray] = {}
    bad_labels: dict[str, str] = {}  # study -> why its labels row is unusable: its images are rejected
    if labels is not None:
        study_labels, bad_labels = read_study_labels(labels, uncertain=uncertain, blank=blank)
    else:
        log.warning("%s: no %s labels CSV; labels follow the blank policy (%s)", root, label_source, blank)
    rejects: list[tuple[str, str]] = []
    studies = _studies_from_metadata(
        root, metadata, rejects, splits=splits, default_split="train" if split is None else "",
        study_labels=study_labels, bad_labels=bad_labels, blank=blank, views=(frontal_order, lateral_views),
        check_files=check_files, suffix=suffix)
    return finish_table(root, studies.values(), rejects, frontal_order=frontal_order,
                        lateral_views=lateral_views, dataset=dataset, inputs=(metadata, split, labels))


def _read_dicom_splits(split: str | None, root: str) -> dict[str, str]:
    """{dicom_id: split} from the MIMIC split CSV; {} (and a warning) without one."""
    splits: dict[str, str] = {}
    if split is not None:
        for _, row in _read_csv(split, ("dicom_id", "split")):
            splits[row["dicom_id"].strip()] = row["split"].strip()
    else:
        log.warning("%s: no split CSV; every study gets split 'train'", root)
    return splits


def _studies_from_metadata(root: str, metadata: str, rejects: list[tuple[str, str]], *, splits: dict[str, str],
                           default_split: str, study_labels: dict[str, np.ndarray], bad_labels: dict[str, str],
                           blank: str, views: tuple[Sequence[str], Sequence[str]], check_files: bool,
                           suffix: str) -> dict[str, Study]:
    """The metadata CSV's rows grouped into studies ({study_id: Study}); unusable rows are
    appended to ``rejects``. ``default_split`` is a new study's split when its first image
    is not in ``splits`` ("train" without a split CSV, else "" until an image says)."""
    no_labels = np.full(len(CHEXPERT_LABELS), LABEL_POLICIES[blank], dtype=np.int8)
    studies: dict[str, Study] = {}
    seen: dict[str, str] = {}
    for n, row in _read_csv(metadata, ("dicom_id", "subject_id", "study_id", "ViewPosition")):
        dicom_id, subject, study_id = row["dicom_id"].strip(), row["subject_id"].strip(), row["study_id"].strip()
        where = f"{metadata}:{n}"
        if not (dicom_id and subject and study_id):
            rejects.append((where, "empty dicom_id, subject_id or study_id"))
            continue
        if dicom_id in seen:
            rejects.append((where, f"dicom_id {dicom_id} repeated (first at {seen[dicom_id]}); kept once"))
            continue
        seen[dicom_id] = where
        path = mimic_path(subject, study_id, dicom_id, suffix)
        if study_id in bad_labels:
            rejects.append((os.path.join(root, path), f"labels CSV row unusable ({bad_labels[study_id]})"))
            continue
        if check_files and not os.path.isfile(os.path.join(root, path)):
            rejects.append((os.path.join(root, path), "no such file"))
            continue
        study = studies.get(study_id)
        if study is None:
            study = studies[study_id] = Study(
                study_id=study_id, subject_id=subject, split=splits.get(dicom_id, default_split),
                labels=study_labels.get(study_id, no_labels).copy(),
            )
        if not study.split:  # a study's split is its images' split; take the first known one
            study.split = splits.get(dicom_id, "")
        vp, source = resolve_view(row["ViewPosition"], view_code=row.get("ViewCodeSequence_CodeMeaning"),
                                  procedure=row.get("PerformedProcedureStepDescription"))
        view = classify_view(vp, *views)
        getattr(study, view).append(ImageRecord(dicom_id, study_id, subject, vp, view, path, source))
    for study in studies.values():
        study.split = study.split or "unknown"
    return studies


# ---------------------------------------------------------------- from a DICOM tree

_MIMIC_RE = re.compile(r"p(\d+)[/\\]s(\d+)[/\\][^/\\]+$")


def _header(path: str) -> tuple[str, object]:
    """(path, DicomMeta) or (path, reason); runs in pool workers."""
    from fastssl.data.dicom import read_dicom_header

    try:
        return path, read_dicom_header(path)
    except DataError as exc:
        return path, exc.reason
    except Exception as exc:  # never let one file stop a scan of 377k
        return path, f"{type(exc).__name__}: {exc}"


def list_dicom_files(root: str | os.PathLike, suffixes: Sequence[str] = (".dcm", ".dicom"),
                     errors: list[tuple[str, str]] | None = None) -> list[str]:
    """Every file under root whose name ends with one of suffixes, sorted.

    A directory that cannot be listed is appended to ``errors`` as (path, OS error)
    when a list is given (else it is logged): it is never skipped silently."""
    out = []

    def unreadable(exc: OSError) -> None:
        reason = f"unreadable directory ({exc.strerror or type(exc).__name__})"
        if errors is None:
            log.warning("%s: %s", exc.filename, reason)
        else:
            errors.append((os.fspath(exc.filename), reason))

    for folder, dirs, files in os.walk(os.fspath(root), onerror=unreadable):
        dirs.sort()
        out.extend(os.path.join(folder, f) for f in sorted(files) if f.lower().endswith(tuple(suffixes)))
    return out


def hash_split(subject_id: str, validate: float = 0.05, test: float = 0.05, seed: int | None = None) -> str:
    """A deterministic split by patient (all studies of a patient fall together).

    ``seed`` None keeps the historical (unseeded) assignment; another seed draws
    another, equally patient-level, split."""
    key = subject_id if seed is None else f"{int(seed)}:{subject_id}"
    u = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "little") / 2**64
    return "test" if u < test else "validate" if u < test + validate else "train"


def scan_dicom_tree(
    root: str | os.PathLike,
    *,
    workers: int | None = None,
    frontal_order: Sequence[str] = FRONTAL_VIEWS,
    lateral_views: Sequence[str] = LATERAL_VIEWS,
    uncertain: str = "zeros",
    blank: str = "zeros",
    holdout: tuple[float, float] = (0.05, 0.05),
    paths: Sequence[str] | None = None,
    labels_csv: str | os.PathLike | None = None,
    split_csv: str | os.PathLike | None = None,
    seed: int | None = None,
    dataset: str = "dicom",
) -> StudyTable:
    """Pair a DICOM tree by StudyInstanceUID and ViewPosition, reading headers only.

    Args:
        root: the tree to scan (``*.dcm``, ``*.dicom``).
        workers: header-reading processes (default: all usable cores; 0 or 1: in this process).
        uncertain, blank: label policies for ``labels_csv``; without it every label
            follows ``blank``.
        holdout: (validate, test) fractions of patients; split by a hash of the patient
            (and ``seed``) so that it is stable across runs and never splits a patient.
        paths: files to read instead of walking ``root``.
        labels_csv: the user's labels: ``study_id`` + the 14 CheXpert columns.
        split_csv: the user's split: ``subject_id`` (or ``study_id``) + ``split``; ids
            it does not list fall back to the hash split.
        seed: seeds the hash split (None: the historical unseeded one).
    Returns:
        A StudyTable; ``study_id`` / ``subject_id`` come from the MIMIC-CXR folders
        ``p<subject>/s<study>`` when the path has them, else StudyInstanceUID/PatientID.
        A study is keyed by (patient, study): a file in another patient's folder whose
        StudyInstanceUID collides stays with its folder's patient; outside the MIMIC
        folders, a StudyInstanceUID claimed by two PatientIDs is kept for the first and
        the other patient's files are rejected (listed). ``dicom_id`` is the
        file name without its suffix. Unreadable directories and files, and repeated
        SOPInstanceUIDs (the first path in sorted order is kept), are in ``rejects``.
    """
    root = os.fspath(root)
    frontal_order, lateral_views = _normalise_views(frontal_order, lateral_views)
    fill = _check_policy("blank", blank)
    _check_policy("uncertain", uncertain)
    rejects: list[tuple[str, str]] = []
    files = list(paths) if paths is not None else list_dicom_files(root, errors=rejects)
    results = _read_headers(files, workers)
    user_labels, bad_labels = ({}, {}) if labels_csv is None else read_study_labels(
        os.fspath(labels_csv), uncertain=uncertain, blank=blank)
    split_key, user_splits = ("", {}) if split_csv is None else read_split_csv(os.fspath(split_csv))

    def new_study(subject: str, study_id: str) -> Study:
        key = subject if split_key == "subject_id" else study_id
        return Study(study_id=study_id, subject_id=subject,
                     split=user_splits.get(key) or hash_split(subject, *holdout, seed=seed),
                     labels=user_labels.get(study_id, np.full(len(CHEXPERT_LABELS), fill, dtype=np.int8)).copy())

    studies = _studies_from_headers(root, results, rejects, new_study, bad_labels, (frontal_order, lateral_views))
    return finish_table(root, studies.values(), rejects, frontal_order=frontal_order,
                        lateral_views=lateral_views, dataset=dataset, inputs=(labels_csv, split_csv))


def _tree_identity(rel: str, meta) -> tuple[str, str | None, str | None]:
    """(subject, StudyInstanceUID, study_id) of one file: the MIMIC folders
    ``p<subject>/s<study>`` when its path has them, else PatientID / StudyInstanceUID;
    the UID is None when neither the header nor the folders give one."""
    m = _MIMIC_RE.search(rel)
    subject = m.group(1) if m else (meta.patient_id or "")
    uid = meta.study_instance_uid or (f"s{m.group(2)}" if m else None)
    return subject, uid, (m.group(2) if m else uid)


def _studies_from_headers(root: str, results, rejects: list[tuple[str, str]], new_study, bad_labels: dict[str, str],
                          views: tuple[Sequence[str], Sequence[str]]) -> dict[tuple[str, str], Study]:
    """Headers (path, DicomMeta or reject reason) grouped into studies keyed by (patient,
    StudyInstanceUID); ``new_study(subject, study_id)`` makes a study's first record.
    Unusable files are appended to ``rejects`` (see :func:`scan_dicom_tree`)."""
    studies: dict[tuple[str, str], Study] = {}
    first_sop: dict[str, str] = {}
    owners: dict[str, str] = {}  # study_id -> its patient
    for path, meta in results:
        if isinstance(meta, str):
            rejects.append((path, meta))
            continue
        rel = os.path.relpath(path, root)
        subject, uid, study_id = _tree_identity(rel, meta)
        if uid is None:
            rejects.append((path, "no StudyInstanceUID (and not in a p<subject>/s<study> folder)"))
            continue
        if meta.sop_instance_uid and meta.sop_instance_uid in first_sop:
            rejects.append((path, f"duplicate SOPInstanceUID of {first_sop[meta.sop_instance_uid]}; kept once"))
            continue
        if study_id in bad_labels:
            rejects.append((path, f"labels CSV row unusable ({bad_labels[study_id]})"))
            continue
        owner = owners.setdefault(study_id, subject)
        if owner != subject:  # one study id, two patients: never merge them into one study
            rejects.append((path, f"study {study_id} also belongs to patient {owner}; this file's patient is "
                                  f"{subject or '(none)'}"))
            continue
        first_sop.setdefault(meta.sop_instance_uid or path, path)
        study = studies.get((subject, uid))
        if study is None:
            study = studies[(subject, uid)] = new_study(subject, study_id)
        vp, source = resolve_view(meta.view_position, view_code=meta.view_code_meaning,
                                  procedure=meta.procedure_description)
        view = classify_view(vp, *views)
        dicom_id = os.path.splitext(os.path.basename(path))[0]
        getattr(study, view).append(ImageRecord(dicom_id, study.study_id, study.subject_id, vp, view, rel, source))
    return studies


def _read_headers(files: Sequence[str], workers: int | None) -> list[tuple[str, object]]:
    """(path, DicomMeta or reject reason) for every file, in order."""
    workers = usable_cores() if workers is None else workers
    if workers <= 1 or len(files) < 64:  # a pool costs more than it saves on a few files
        return [_header(p) for p in files]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_header, files, chunksize=max(1, min(256, len(files) // (4 * workers)))))
