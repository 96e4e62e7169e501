"""Every supported radiograph dataset behind one interface: ``KIND:DIR`` -> StudyTable.

=============  =========================================  ===================  ==========
kind           what DIR holds                             pixels               dataset
=============  =========================================  ===================  ==========
mimic-dicom    MIMIC-CXR: mimic-cxr-2.0.0-*.csv(.gz),     DICOM                mimic-cxr
               files/p1X/p<subject>/s<study>/<id>.dcm
mimic-jpg      MIMIC-CXR-JPG: the same CSVs, .jpg files   8-bit JPEG           mimic-cxr
dicom-scan     any DICOM tree (headers scanned; optional  DICOM                dicom
               --labels-csv / --split-csv)
chexpert       CheXpert v1.0 or -small: train.csv,        8-bit JPEG           chexpert
               valid.csv [, test.csv]
chexpert-plus  CheXpert Plus: df_chexpert_plus_*.csv,     16-bit PNG           chexpert-plus
               PNG/ (labels: --labels-csv)
padchest       PadChest: PADCHEST_..._labels_*.csv(.gz),  16-bit PNG           padchest
               <ImageDir>/<ImageID>
nih-cxr14      NIH ChestX-ray14: Data_Entry_2017.csv,     8-bit PNG            nih-cxr14
               train_val_list.txt, test_list.txt,
               images*/[images/]<Image Index>
=============  =========================================  ===================  ==========

Views (the cache's ``view`` column; the model's view ids are frontal 0, lateral 1,
other and unknown 2)::

    dataset      field read (in order)                  frontal     lateral     other          unknown
    MIMIC-CXR,   ViewPosition, else ViewCodeSequence    PA, AP      LATERAL,    any other      no field
    DICOM tree   CodeMeaning, else a procedure          (--frontal  LL          value (LAO,    says
                 description naming one view            -order)                 AP AXIAL...)
    CheXpert(+)  Frontal/Lateral (AP/PA gives the       Frontal     Lateral     Frontal with   no column,
                 position), else the file name                                  AP/PA LL/RL    no name hint
    PadChest     Projection, else ViewPosition_DICOM    PA, AP,     L           COSTAL,        UNK / blank
                                                        AP_horizontal           EXCLUDE
    ChestX-ray14 View Position (one image per study)    PA, AP      -           other values   blank

The index's ``view_source`` column names the field each view came from.

A plain ``DIR`` (no kind) is mimic-dicom when it holds the MIMIC metadata CSV, else
dicom-scan. Several sources pool into one table (:func:`load_sources`): every study keeps
its ``dataset``, ids become ``<dataset>:<id>`` so that two datasets never share a study or
a patient, and image paths become absolute. Splits are the official ones where a
dataset has them and a seeded patient-level hash otherwise; no patient is ever in two
splits (:func:`fastssl.data.mimic.enforce_patient_splits`).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Callable, Sequence

from fastssl.config import parse_setting
from fastssl.data.mimic import (
    FRONTAL_VIEWS,
    LATERAL_VIEWS,
    ImageRecord,
    StudyTable,
    enforce_patient_splits,
    find_csv,
    load_mimic_csv,
    scan_dicom_tree,
)

__all__ = ["SOURCE_KINDS", "SourceSpec", "TableOptions", "parse_source", "load_source", "load_sources",
           "pool_tables", "parse_holdout", "parse_views"]

SOURCE_KINDS = ("mimic-dicom", "mimic-jpg", "dicom-scan", "chexpert", "chexpert-plus", "padchest", "nih-cxr14")


@dataclass(frozen=True)
class SourceSpec:
    """One ``--source``: its kind ("auto" = decide from the directory) and root."""

    kind: str
    root: str

    def __str__(self) -> str:
        return self.root if self.kind == "auto" else f"{self.kind}:{self.root}"


@dataclass(frozen=True)
class TableOptions:
    """How every source builds its table (the same options for all pooled sources).

    holdout: (validate, test) patient fractions for datasets without an official split
    (for CheXpert only its test fraction is used: valid.csv is the validation split; for
    ChestX-ray14 only the validate fraction, drawn from its train_val patients).
    seed: seeds those hash splits (None: the historical unseeded hash).
    labels_csv / split_csv: the user's labels and split for a dicom-scan source.
    """

    uncertain: str = "zeros"
    blank: str = "zeros"
    label_source: str = "chexpert"
    frontal_order: tuple[str, ...] = FRONTAL_VIEWS
    lateral_views: tuple[str, ...] = LATERAL_VIEWS
    workers: int | None = None
    holdout: tuple[float, float] = (0.05, 0.05)
    seed: int | None = None
    labels_csv: str | None = None
    split_csv: str | None = None

    def __post_init__(self):
        parse_setting("holdout", parse_holdout, self.holdout)   # the one rule, prepare's --holdout's


def parse_holdout(value) -> tuple[float, float]:
    """(validate, test) patient fractions from "0.05,0.05" or a pair of numbers; ValueError
    unless both are finite, >= 0 and sum below 1 (the rest of the patients are train)."""
    try:
        items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
        pair = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        pair = ()
    if len(pair) != 2 or not all(math.isfinite(v) and v >= 0 for v in pair) or sum(pair) >= 1:
        raise ValueError(f"{value!r}: expected validate,test patient fractions >= 0 summing below 1, "
                         "e.g. 0.05,0.05")
    return pair  # type: ignore[return-value]


def parse_views(value) -> tuple[str, ...]:
    """ViewPosition names from "PA,AP" or a sequence of names: stripped, upper-cased, in order
    (the order is a preference); ValueError when none is named."""
    try:
        items = value.split(",") if isinstance(value, str) else list(value)
    except TypeError:
        items = []
    views = tuple(str(v).strip().upper() for v in items if str(v).strip())
    if not views:
        raise ValueError(f"{value!r} names no ViewPosition; expected e.g. PA,AP")
    return views


def parse_source(spec: str | os.PathLike | SourceSpec) -> SourceSpec:
    """"KIND:DIR" or "DIR" -> SourceSpec (kind "auto" for a bare directory)."""
    if isinstance(spec, SourceSpec):
        return spec
    text = os.fspath(spec)
    kind, sep, rest = text.partition(":")
    if sep and kind in SOURCE_KINDS:
        if not rest:
            raise ValueError(f"--source {text!r}: no directory after '{kind}:'")
        return SourceSpec(kind, rest)
    if sep and not os.path.exists(text) and "/" not in kind and "\\" not in kind:
        raise ValueError(f"--source {text!r}: unknown kind {kind!r}; expected one of {SOURCE_KINDS}")
    return SourceSpec("auto", text)


def _mimic(suffix: str) -> Callable[[str, TableOptions], StudyTable]:
    def load(root: str, o: TableOptions) -> StudyTable:
        return load_mimic_csv(root, label_source=o.label_source, frontal_order=o.frontal_order,
                              lateral_views=o.lateral_views, uncertain=o.uncertain, blank=o.blank, suffix=suffix)
    return load


def _scan(root: str, o: TableOptions) -> StudyTable:
    return scan_dicom_tree(root, workers=o.workers, frontal_order=o.frontal_order, lateral_views=o.lateral_views,
                           uncertain=o.uncertain, blank=o.blank, holdout=o.holdout, labels_csv=o.labels_csv,
                           split_csv=o.split_csv, seed=o.seed)


def _chexpert(root: str, o: TableOptions) -> StudyTable:
    from fastssl.data.chexpert import load_chexpert

    return load_chexpert(root, uncertain=o.uncertain, blank=o.blank, frontal_order=o.frontal_order,
                         lateral_views=o.lateral_views, test_fraction=o.holdout[1], seed=o.seed)


def _chexpert_plus(root: str, o: TableOptions) -> StudyTable:
    from fastssl.data.chexpert import load_chexpert_plus

    return load_chexpert_plus(root, labels=o.labels_csv, uncertain=o.uncertain, blank=o.blank,
                              frontal_order=o.frontal_order, lateral_views=o.lateral_views,
                              test_fraction=o.holdout[1], seed=o.seed)


def _padchest(root: str, o: TableOptions) -> StudyTable:
    from fastssl.data.padchest import load_padchest

    return load_padchest(root, blank=o.blank, frontal_order=o.frontal_order, lateral_views=o.lateral_views,
                         holdout=o.holdout, seed=o.seed)


def _nih(root: str, o: TableOptions) -> StudyTable:
    from fastssl.data.nih import load_nih

    return load_nih(root, frontal_order=o.frontal_order, lateral_views=o.lateral_views, holdout=o.holdout,
                    seed=o.seed)


_LOADERS: dict[str, Callable[[str, TableOptions], StudyTable]] = {
    "mimic-dicom": _mimic(".dcm"), "mimic-jpg": _mimic(".jpg"), "dicom-scan": _scan,
    "chexpert": _chexpert, "chexpert-plus": _chexpert_plus, "padchest": _padchest, "nih-cxr14": _nih,
}
# Which kinds read --labels-csv / --split-csv (the others have their own labels and splits).
_USER_CSV_KINDS = {"labels_csv": ("dicom-scan", "chexpert-plus"), "split_csv": ("dicom-scan",)}


def load_source(spec: str | os.PathLike | SourceSpec, options: TableOptions = TableOptions()) -> StudyTable:
    """One source -> its StudyTable (see the module table for the kinds).

    Raises:
        ValueError: an unknown kind, a missing directory, or a user CSV the kind ignores.
        DataError: the dataset's CSVs are missing or unreadable.
    """
    spec = parse_source(spec)
    if not os.path.isdir(spec.root):
        raise ValueError(f"--source {spec}: {spec.root!r} is not a directory")
    kind = spec.kind
    if kind == "auto":
        kind = "mimic-dicom" if find_csv(spec.root, "metadata") is not None else "dicom-scan"
    for name, kinds in _USER_CSV_KINDS.items():
        if getattr(options, name) and kind not in kinds:
            raise ValueError(f"--{name.replace('_', '-')} applies to {' and '.join(kinds)} sources, "
                             f"not to {kind} ({spec.root})")
    return _LOADERS[kind](spec.root, options)


def load_sources(specs: Sequence[str | os.PathLike | SourceSpec],
                 options: TableOptions = TableOptions()) -> StudyTable:
    """Several sources -> one pooled table (one source: its own table, ids unchanged)."""
    if not specs:
        raise ValueError("no --source given")
    tables = [load_source(spec, options) for spec in specs]
    return tables[0] if len(tables) == 1 else pool_tables(tables)


def pool_tables(tables: Sequence[StudyTable]) -> StudyTable:
    """Tables of different datasets -> one: ids prefixed "<dataset>:", paths absolute,
    rejects concatenated, patient-level splits enforced over the pool."""
    names = [t.dataset for t in tables]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"dataset {repeated} given twice: pool each dataset once")
    studies, rejects, inputs = [], [], []
    for table in tables:
        inputs.extend(table.inputs)
        root = os.path.abspath(table.root)
        for study in table.studies:
            prefix = f"{table.dataset}:"
            study.study_id, study.subject_id = prefix + study.study_id, prefix + study.subject_id
            for view in ("frontal", "lateral", "other", "unknown"):
                setattr(study, view, [_rebase(r, prefix, root) for r in getattr(study, view)])
            studies.append(study)
        rejects.extend(table.rejects)
    enforce_patient_splits(studies, source="pooled sources")
    studies.sort(key=lambda s: (s.subject_id, s.study_id))
    return StudyTable(root="", studies=studies, rejects=rejects, dataset="+".join(names), inputs=inputs)


def _rebase(record: ImageRecord, prefix: str, root: str) -> ImageRecord:
    return dataclasses.replace(record, study_id=prefix + record.study_id, subject_id=prefix + record.subject_id,
                               path=os.path.join(root, record.path))
