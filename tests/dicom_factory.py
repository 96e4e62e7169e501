"""Write small, real DICOM files for the data tests (no MIMIC-CXR needed).

``make_dicom(path, pixels, ...)`` writes a Digital X-Ray-like image with exactly the
pixel-pipeline attributes a test asks for, so every branch of ``read_dicom`` can be
checked against pydicom's own LUT functions.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def _lut_item(first: int, bits: int, data: Sequence[int], *, lut_type: str | None = None) -> Dataset:
    item = Dataset()
    # Descriptor: number of entries (0 means 65536), first stored value mapped, bits per entry.
    item.LUTDescriptor = [len(data) if len(data) < 65536 else 0, int(first), int(bits)]
    item.LUTData = [int(v) for v in data]
    item["LUTData"].VR = "US"  # LUTData's VR is ambiguous (US or OW); pick one explicitly
    if lut_type is not None:
        item.ModalityLUTType = lut_type
    return item


def make_dicom(
    path: str | os.PathLike,
    pixels: np.ndarray | None,
    *,
    bits_allocated: int = 16,
    bits_stored: int = 12,
    pixel_representation: int = 0,
    photometric: str = "MONOCHROME2",
    rescale: tuple[float, float] | None = None,
    window: tuple | None = None,
    voi_lut_function: str | None = None,
    voi_lut: tuple[int, int, Sequence[int]] | None = None,
    modality_lut: tuple[int, int, Sequence[int]] | None = None,
    frames: int = 1,
    samples_per_pixel: int = 1,
    transfer_syntax: str = ExplicitVRLittleEndian,
    view_position: str | None = "PA",
    patient_id: str = "10000001",
    study_uid: str | None = None,
    sop_uid: str | None = None,
    pixel_spacing: tuple[float, float] | None = (0.139, 0.139),
    high_bit_noise: bool = False,
    raw_pixel_bytes: bytes | None = None,
) -> str:
    """Write one DICOM file and return its path.

    Args:
        pixels: (H, W) stored values (or (frames, H, W), or (H, W, 3) for colour); the
            caller keeps them within ``bits_stored``. None writes no Pixel Data element.
        rescale: (slope, intercept) -> RescaleSlope / RescaleIntercept.
        window: (center, width) or ([c1, c2], [w1, w2]) for several windows.
        voi_lut / modality_lut: (first_mapped, bits_per_entry, lut_values).
        high_bit_noise: set the unused high bits (above BitsStored) to ones, as some
            scanners do; a correct reader masks them off.
        raw_pixel_bytes: write these bytes as Pixel Data instead of ``pixels``.
    """
    path = os.fspath(path)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = DX_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = patient_id
    ds.Modality = "DX"
    if view_position is not None:
        ds.ViewPosition = view_position
    if pixel_spacing is not None:
        ds.PixelSpacing = list(pixel_spacing)

    if pixels is not None or raw_pixel_bytes is not None:
        arr = None if pixels is None else np.asarray(pixels)
        if arr is not None:
            if samples_per_pixel == 3:
                rows, cols = arr.shape[-3], arr.shape[-2]
            else:
                rows, cols = arr.shape[-2], arr.shape[-1]
        else:
            rows = cols = 4
        ds.Rows, ds.Columns = int(rows), int(cols)
        ds.SamplesPerPixel = samples_per_pixel
        ds.PhotometricInterpretation = photometric
        if samples_per_pixel == 3:
            ds.PlanarConfiguration = 0
        ds.BitsAllocated = bits_allocated
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = pixel_representation
        if frames > 1:
            ds.NumberOfFrames = frames
        if raw_pixel_bytes is not None:
            ds.PixelData = raw_pixel_bytes
            ds["PixelData"].VR = "OW" if bits_allocated > 8 else "OB"
        else:
            dtype = {8: "u1", 16: "u2", 32: "u4"}[bits_allocated]
            if pixel_representation:
                dtype = dtype.replace("u", "i")
            stored = arr.astype(np.int64)
            if pixel_representation:
                stored = stored & ((1 << bits_stored) - 1)  # two's complement in BitsStored bits
            if high_bit_noise and bits_stored < bits_allocated:
                stored = stored | (((1 << bits_allocated) - 1) ^ ((1 << bits_stored) - 1))
            stored = stored.astype(dtype.replace("i", "u"))
            ds.PixelData = stored.astype("<" + dtype.replace("i", "u")).tobytes()
            ds["PixelData"].VR = "OW" if bits_allocated > 8 else "OB"

    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
        ds.RescaleType = "US"
    if modality_lut is not None:
        ds.ModalityLUTSequence = DicomSequence([_lut_item(*modality_lut, lut_type="US")])
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_lut_function is not None:
        ds.VOILUTFunction = voi_lut_function
    if voi_lut is not None:
        ds.VOILUTSequence = DicomSequence([_lut_item(*voi_lut)])

    if transfer_syntax == RLELossless:
        # pydicom's own RLE encoder needs no plugin; encode the native dataset.
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.compress(RLELossless, encoding_plugin="pydicom")
    elif pydicom.uid.UID(transfer_syntax).is_encapsulated and pixels is not None:
        # No encoder for this syntax here: wrap arbitrary bytes as one fragment, enough to
        # exercise "which plugin decodes this" without a real codestream.
        from pydicom.encaps import encapsulate

        ds.PixelData = encapsulate([b"\xff\xd8\xff\xdb" + bytes(64) + b"\xff\xd9"])
        ds["PixelData"].VR = "OB"
    # The file meta's transfer syntax decides the encoding (implicit/explicit VR).
    ds.save_as(path, enforce_file_format=True)
    return path


def make_tree(root: str | os.PathLike, studies: Sequence[dict], *, size: int = 32, seed: int = 0) -> list[str]:
    """Write a MIMIC-CXR-shaped tree ``root/files/p1X/p<subject>/s<study>/<dicom_id>.dcm``.

    Args:
        studies: dicts with ``subject_id``, ``study_id`` and ``views`` (a list of
            ViewPosition strings, None for "tag absent").
    Returns:
        The paths written, in order.
    """
    rng = np.random.default_rng(seed)
    paths = []
    for study in studies:
        subject, study_id = str(study["subject_id"]), str(study["study_id"])
        study_uid = generate_uid()
        folder = os.path.join(os.fspath(root), "files", f"p{subject[:2]}", f"p{subject}", f"s{study_id}")
        os.makedirs(folder, exist_ok=True)
        for k, view in enumerate(study["views"]):
            dicom_id = f"{study_id}-{k:02d}"
            pixels = rng.integers(0, 4096, size=(size, size + 8 * k))
            paths.append(make_dicom(
                os.path.join(folder, f"{dicom_id}.dcm"), pixels, view_position=view,
                patient_id=subject, study_uid=study_uid, window=(2048, 4096),
            ))
    return paths


def write_csv(path, header, rows) -> None:
    """A .csv or .csv.gz file (gzip when the name ends with .gz)."""
    import csv
    import gzip

    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def make_mimic(root, studies: Sequence[tuple], *, size: int = 24, seed: int = 0,
               corrupt: Sequence[str] = (), splits: dict | None = None) -> list[str]:
    """A small MIMIC-CXR copy: the DICOM tree plus metadata/split/chexpert CSVs (.csv.gz).

    Args:
        studies: (subject_id, study_id, [ViewPosition or None, ...]) tuples; image j of a
            study gets dicom_id ``<study>-<j:02d>``.
        corrupt: dicom_ids whose file is written truncated (a reader must reject them).
        splits: study_id -> split (default "train").
    Returns:
        Every image path written, in order.
    """
    from fastssl.data.mimic import CHEXPERT_LABELS

    root = os.fspath(root)
    specs = [dict(subject_id=s, study_id=st, views=v) for s, st, v in studies]
    paths = make_tree(root, specs, size=size, seed=seed)
    for path in paths:
        if os.path.splitext(os.path.basename(path))[0] in corrupt:
            data = open(path, "rb").read()
            with open(path, "wb") as handle:
                handle.write(data[: len(data) // 2])
    meta, split = [], []
    for subject, study, views in studies:
        for j, vp in enumerate(views):
            dicom_id = f"{study}-{j:02d}"
            meta.append([dicom_id, subject, study, "CHEST", vp or "", size, size + 8 * j])
            split.append([dicom_id, study, subject, (splits or {}).get(study, "train")])
    write_csv(os.path.join(root, "mimic-cxr-2.0.0-metadata.csv.gz"),
              ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
               "Rows", "Columns"], meta)
    write_csv(os.path.join(root, "mimic-cxr-2.0.0-split.csv.gz"), ["dicom_id", "study_id", "subject_id", "split"], split)
    rng = np.random.default_rng(seed + 1)
    choices = np.array(["1.0", "0.0", "-1.0", ""])
    rows = [[s, st, *rng.choice(choices, size=len(CHEXPERT_LABELS))] for s, st, _ in studies]
    write_csv(os.path.join(root, "mimic-cxr-2.0.0-chexpert.csv.gz"), ["subject_id", "study_id", *CHEXPERT_LABELS], rows)
    return paths
