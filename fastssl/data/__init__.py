"""Radiograph data: DICOM/PNG/JPEG reading, the dataset sources (MIMIC-CXR, MIMIC-CXR-JPG,
CheXpert, CheXpert Plus, PadChest, any DICOM tree), the .npy cache and datasets.

Names load on first use (``fastssl.data.read_dicom`` imports pydicom then, and the
datasets import torch only when touched), so ``import fastssl.data`` stays cheap.
"""
from __future__ import annotations

from fastssl._lazy import lazy_exports

# name -> module that defines it; add one line per public name.
_LAZY = {
    "read_dicom": "fastssl.data.dicom",
    "read_dicom_header": "fastssl.data.dicom",
    "DicomMeta": "fastssl.data.dicom",
    "CHEXPERT_LABELS": "fastssl.data.mimic",
    "load_mimic_csv": "fastssl.data.mimic",
    "scan_dicom_tree": "fastssl.data.mimic",
    "StudyTable": "fastssl.data.mimic",
    "prepare_cache": "fastssl.data.cache",
    "load_source": "fastssl.data.sources",
    "load_sources": "fastssl.data.sources",
    "SOURCE_KINDS": "fastssl.data.sources",
    "load_chexpert": "fastssl.data.chexpert",
    "load_chexpert_plus": "fastssl.data.chexpert",
    "load_padchest": "fastssl.data.padchest",
    "read_image": "fastssl.data.images",
    "generate_phantom": "fastssl.data.phantom",
    "PairedViewDataset": "fastssl.data.datasets",
    "SingleViewDataset": "fastssl.data.datasets",
    "StudyViewsDataset": "fastssl.data.datasets",
    "make_loader": "fastssl.data.datasets",
    "BatchAugment": "fastssl.data.augment",
    "CenterResize": "fastssl.data.augment",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
