"""Read one radiograph DICOM file into a float image in [0, 1].

The pixel pipeline follows DICOM PS3.3 C.11 in order:

1. stored values: BitsStored bits of each BitsAllocated container, two's complement when
   PixelRepresentation = 1 (unused high bits are masked off, some scanners fill them);
2. modality LUT: a Modality LUT Sequence if present, else RescaleSlope/RescaleIntercept;
3. VOI: a VOI LUT Sequence, else the first WindowCenter/WindowWidth (with VOILUTFunction
   LINEAR, LINEAR_EXACT or SIGMOID), else the full stored range after step 2;
4. MONOCHROME1 is inverted so that higher is always brighter.

Every failure is a :class:`fastssl.errors.DataError` naming the file and the reason, so
that a long job (``fastssl prepare``) can record it and carry on.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from fastssl.errors import DataError

__all__ = ["DicomMeta", "read_dicom", "read_dicom_header", "VOI_MODES", "MAX_PIXELS", "MAX_FILE_BYTES"]

VOI_MODES = ("auto", "none", "minmax")

# Limits that keep one hostile file from taking a worker's memory (prepare runs one reader
# per core). Generous for radiographs: the largest detectors are ~4300 x 4300.
MAX_PIXELS = 16384 * 16384          # Rows x Columns read_dicom decodes (multi-frame is refused)
MAX_FILE_BYTES = 2 << 30            # larger files are not read at all
# RLE (PS3.5 G.3.1): a replicate run turns 2 bytes into at most 128, so the decoded size is
# at most 64x the encoded one; a header claiming more is a lie (or the file is truncated).
_RLE_MAX_RATIO = 64
# Groups a DICOM dataset without preamble can start with: file meta, then identifying data.
_FIRST_GROUPS = {0x0002, 0x0008}

# Header elements read for `meta`; pixel elements are read separately.
_CODEC_HINT = (
    "install a pydicom decoder plugin: `pip install fastssl[codecs]` "
    "(pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg) or `pip install python-gdcm`"
)


@dataclass(frozen=True)
class DicomMeta:
    """Header facts of one image; fields are None when the tag is absent.

    ``view_position`` is the stripped, upper-cased (0018,5101) value, or None when the
    tag is absent or empty. ``pixel_spacing`` is (row mm, column mm).
    """

    path: str
    view_position: str | None = None
    patient_id: str | None = None
    study_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    rows: int | None = None
    columns: int | None = None
    pixel_spacing: tuple[float, float] | None = None
    photometric_interpretation: str | None = None
    transfer_syntax: str | None = None
    # Where a missing ViewPosition can be recovered from (fastssl.data.mimic.resolve_view).
    procedure_description: str | None = None  # PerformedProcedureStepDescription
    view_code_meaning: str | None = None  # ViewCodeSequence[0].CodeMeaning


def _text(ds, keyword: str) -> str | None:
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed element must not hide the rest of the header
        return None
    if value is None:
        return None
    value = str(value).strip()
    return value or None


def _int(ds, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value is None or value == "" else int(value)
    except Exception:
        return None


def _meta(ds, path: str) -> DicomMeta:
    spacing = None
    try:
        raw = ds.get("PixelSpacing")
        if raw is not None and len(raw) == 2:
            spacing = (float(raw[0]), float(raw[1]))
    except Exception:
        spacing = None
    view = _text(ds, "ViewPosition")
    tsyntax = None
    try:
        tsyntax = str(ds.file_meta.TransferSyntaxUID)
    except Exception:
        pass
    return DicomMeta(
        path=path,
        view_position=view.upper() if view else None,
        patient_id=_text(ds, "PatientID"),
        study_instance_uid=_text(ds, "StudyInstanceUID"),
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        rows=_int(ds, "Rows"),
        columns=_int(ds, "Columns"),
        pixel_spacing=spacing,
        photometric_interpretation=_text(ds, "PhotometricInterpretation"),
        transfer_syntax=tsyntax,
        procedure_description=_text(ds, "PerformedProcedureStepDescription"),
        view_code_meaning=_view_code_meaning(ds),
    )


def _view_code_meaning(ds) -> str | None:
    try:
        return _text(ds.ViewCodeSequence[0], "CodeMeaning")
    except Exception:  # absent, empty or malformed sequence
        return None


def _check_file(path: str, max_file_bytes: int) -> None:
    """Refuse, before pydicom reads anything, what cannot be a DICOM file worth reading:
    a directory, an empty or oversized file, bytes with neither a "DICM" marker at 128 nor
    a plausible first data element (e.g. a zero-filled file, which pydicom would otherwise
    scan to the end)."""
    if os.path.isdir(path):
        raise DataError(path, "is a directory, not a DICOM file")
    if not os.path.isfile(path):
        raise DataError(path, "no such file")
    size = os.path.getsize(path)
    if size == 0:
        raise DataError(path, "empty file (0 bytes)")
    if size > max_file_bytes:
        raise DataError(path, f"file of {size} bytes exceeds the {max_file_bytes}-byte limit for one image")
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError as exc:
        raise DataError(path, f"cannot read ({exc.strerror or exc})") from None
    if head[128:132] == b"DICM":
        return
    if len(head) >= 8 and (int.from_bytes(head[:2], "little") in _FIRST_GROUPS
                           or int.from_bytes(head[:2], "big") in _FIRST_GROUPS):
        return      # a bare dataset (no preamble), as some archives store them
    raise DataError(path, 'not a DICOM file (no "DICM" marker at byte 128 and no DICOM data element at the start)')


def _dcmread(path: str, max_file_bytes: int = MAX_FILE_BYTES, **kwargs):
    import pydicom

    _check_file(path, max_file_bytes)
    try:
        with warnings.catch_warnings():
            # pydicom warns about many harmless deviations; errors are what we act on.
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path, **kwargs)
    except DataError:
        raise
    except Exception as exc:  # pydicom raises many types on bad bytes; name them all the same way
        raise DataError(path, f"not a readable DICOM file ({type(exc).__name__}: {_one_line(exc)})") from None


def _one_line(exc: BaseException) -> str:
    """The whole message of ``exc`` on one line (decoder errors list every plugin's reason
    on its own line; the first line alone says nothing)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def read_dicom_header(path: str | os.PathLike) -> DicomMeta:
    """Read the header only (no pixel data), e.g. to pair views across a tree quickly."""
    path = os.fspath(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = _dcmread(path, stop_before_pixels=True)
        return _meta(ds, path)


def _lut(path: str, ds, item, what: str) -> tuple[np.ndarray, int, int]:
    """(values, first_mapped, bits) of a Modality/VOI LUT Sequence item."""
    try:
        n, first, bits = (int(v) for v in item.LUTDescriptor)
        data = item.LUTData
    except Exception as exc:
        raise DataError(path, f"{what}: bad or missing LUTDescriptor/LUTData ({exc})") from None
    n = 65536 if n == 0 else n  # PS3.3: 0 entries means 2^16
    if isinstance(data, (bytes, bytearray)):
        # OW: 16-bit words in the dataset's byte order.
        little = getattr(ds, "is_little_endian", True) is not False
        if len(data) % 2:
            raise DataError(path, f"{what}: LUTData has an odd byte length {len(data)}")
        values = np.frombuffer(data, dtype="<u2" if little else ">u2")
    elif isinstance(data, (int, float)):
        values = np.asarray([data])
    else:
        values = np.asarray(list(data))
    if values.size != n:
        raise DataError(path, f"{what}: LUTDescriptor says {n} entries, LUTData has {values.size}")
    if not 1 <= bits <= 16:
        raise DataError(path, f"{what}: LUTDescriptor bits per entry {bits} not in 1..16")
    # The descriptor's first-mapped value is US or SS; a signed one is stored as US here.
    if first >= 32768 and (int(getattr(ds, "PixelRepresentation", 0) or 0) == 1):
        first -= 65536
    return values.astype(np.float64), first, bits


def _apply_lut(x: np.ndarray, values: np.ndarray, first: int) -> np.ndarray:
    # Inputs below the first mapped value take the first entry, above the last the last.
    idx = np.clip(np.rint(x).astype(np.int64) - first, 0, values.size - 1)
    return values[idx]


def _first(value):
    """The first of a multi-valued element (MultiValue/list), or the value itself."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        return value
    return value[0]


def _window(path: str, ds, x: np.ndarray) -> np.ndarray | None:
    """First WindowCenter/WindowWidth applied to x, output in [0, 1]; None when absent."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None or center == "" or width == "":
        return None
    try:
        # Multi-valued: several alternative windows; the first is the default one.
        c, w = float(_first(center)), float(_first(width))
    except Exception as exc:
        raise DataError(path, f"WindowCenter/WindowWidth not numbers ({exc})") from None
    function = (_text(ds, "VOILUTFunction") or "LINEAR").upper()
    if not (np.isfinite(c) and np.isfinite(w)):
        raise DataError(path, f"WindowCenter/WindowWidth not finite ({c}, {w})")
    if function == "LINEAR":
        if w < 1:
            raise DataError(path, f"WindowWidth {w} < 1 is invalid for VOILUTFunction LINEAR")
        # PS3.3 C.11.2.1.2.1: the -0.5 / (w - 1) offsets make integer windows exact.
        y = ((x - (c - 0.5)) / (w - 1) + 0.5) if w > 1 else (x > c - 0.5).astype(np.float64)
        return np.clip(y, 0.0, 1.0)
    if function == "LINEAR_EXACT":
        if w <= 0:
            raise DataError(path, f"WindowWidth {w} <= 0 is invalid for VOILUTFunction LINEAR_EXACT")
        return np.clip((x - c) / w + 0.5, 0.0, 1.0)
    if function == "SIGMOID":
        if w <= 0:
            raise DataError(path, f"WindowWidth {w} <= 0 is invalid for VOILUTFunction SIGMOID")
        return 1.0 / (1.0 + np.exp(np.clip(-4.0 * (x - c) / w, -700, 700)))
    raise DataError(path, f"unknown VOILUTFunction {function!r} (expected LINEAR, LINEAR_EXACT or SIGMOID)")


def _stored_range(bits: int, signed: bool) -> tuple[int, int]:
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def _check_pixel_module(path: str, ds) -> tuple[int, int, int]:
    """Validate the Image Pixel module; returns (bits_allocated, bits_stored, pixel_rep)."""
    if "PixelData" not in ds:
        kinds = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        raise DataError(path, f"no pixel data (only {kinds[0]})" if kinds else "no pixel data")
    samples = _int(ds, "SamplesPerPixel") or 1
    photometric = _text(ds, "PhotometricInterpretation")
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DataError(
            path, f"colour image (SamplesPerPixel={samples}, PhotometricInterpretation={photometric}); "
            "only greyscale MONOCHROME1/MONOCHROME2 radiographs are read",
        )
    frames = _int(ds, "NumberOfFrames") or 1
    if frames != 1:
        raise DataError(path, f"multi-frame image (NumberOfFrames={frames}); one frame per file expected")
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    if not rows or not cols or rows < 1 or cols < 1:
        raise DataError(path, f"wrong sizes: Rows={rows}, Columns={cols}")
    if rows == 1 or cols == 1:   # e.g. an RLE header whose Rows/Columns were damaged
        raise DataError(path, f"wrong sizes: Rows={rows}, Columns={cols} is a strip, not a radiograph")
    allocated, stored = _int(ds, "BitsAllocated"), _int(ds, "BitsStored")
    rep = _int(ds, "PixelRepresentation")
    if allocated not in (8, 16, 32):
        raise DataError(path, f"BitsAllocated={allocated}; 8, 16 or 32 expected")
    if stored is None or not 1 <= stored <= allocated:
        raise DataError(path, f"BitsStored={stored} not in 1..BitsAllocated ({allocated})")
    if rep not in (0, 1):
        raise DataError(path, f"PixelRepresentation={rep}; 0 (unsigned) or 1 (signed) expected")
    return allocated, stored, rep


def _check_pixel_length(path: str, ds, allocated: int, max_pixels: int) -> None:
    """Compare what the header claims (Rows x Columns x BitsAllocated) with the cap and with
    the Pixel Data actually present, before any decoder allocates the claimed size."""
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    if rows * cols > max_pixels:
        raise DataError(path, f"Rows x Columns = {rows} x {cols} exceeds the limit of {max_pixels} pixels")
    need = rows * cols * allocated // 8
    try:
        have = len(ds.PixelData)
        tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        encapsulated = tsyntax is not None and tsyntax.is_encapsulated
    except ValueError:  # not a transfer syntax: _decode names it
        return
    if not encapsulated and have < need:
        raise DataError(path, f"truncated or short pixel data ({have} bytes; Rows x Columns x BitsAllocated "
                              f"= {rows} x {cols} x {allocated} needs {need})")
    if encapsulated and tsyntax == "1.2.840.10008.1.2.5" and need > _RLE_MAX_RATIO * have:
        raise DataError(path, f"RLE pixel data of {have} bytes cannot hold Rows x Columns = {rows} x {cols} "
                              f"x {allocated} bits ({need} bytes; RLE expands at most {_RLE_MAX_RATIO}x)")


@contextlib.contextmanager
def _quiet_pydicom():
    """pydicom logs a traceback at ERROR before raising a decode failure; the failure
    comes back to the caller as a DataError naming the file, so the log is noise (one
    traceback per corrupt file in a long prepare run)."""
    logger = logging.getLogger("pydicom")
    previous = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _decode(path: str, ds) -> np.ndarray:
    from pydicom.pixels import get_decoder

    tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    try:
        compressed = tsyntax is not None and tsyntax.is_compressed
    except ValueError:  # pydicom: "UID is not a transfer syntax"
        raise DataError(path, f"TransferSyntaxUID {tsyntax!s} is not a transfer syntax") from None
    if compressed:
        try:
            decoder = get_decoder(tsyntax)
        except Exception:
            raise DataError(path, f"transfer syntax {tsyntax.name} ({tsyntax}) is not supported by pydicom") from None
        if not decoder.is_available:
            raise DataError(
                path, f"compressed transfer syntax {tsyntax.name} ({tsyntax}) needs a decoder plugin; "
                + _CODEC_HINT,
            )
    try:
        with warnings.catch_warnings(), _quiet_pydicom():
            warnings.simplefilter("ignore")
            # pydicom masks the bits above BitsStored and sign-extends when
            # PixelRepresentation = 1; it also checks the Pixel Data length.
            arr = ds.pixel_array
    except MemoryError:
        raise DataError(path, "pixel data too large to decode") from None
    except Exception as exc:
        reason = _one_line(exc)
        if "shorter than" in reason or "truncat" in reason.lower() or "length" in reason.lower():
            raise DataError(path, f"truncated or short pixel data ({reason})") from None
        raise DataError(path, f"cannot decode pixel data ({type(exc).__name__}: {reason})") from None
    return arr


def read_dicom(path: str | os.PathLike, *, voi: str = "auto", max_pixels: int = MAX_PIXELS,
               max_file_bytes: int = MAX_FILE_BYTES) -> tuple[np.ndarray, DicomMeta]:
    """Read a greyscale radiograph.

    Args:
        path: a DICOM file (Part 10 or a bare dataset).
        voi: "auto" (VOI LUT Sequence, else the first window, else the full range),
            "none" (ignore VOI: the full stored range, i.e. every value BitsStored allows,
            mapped through the modality LUT, scaled linearly to [0, 1]), or "minmax"
            (this image's own min..max after the modality LUT).
        max_pixels: larger Rows x Columns are refused before decoding (memory stays bounded).
        max_file_bytes: larger files are refused before reading.
    Returns:
        image: (Rows, Columns) float32 in [0, 1], higher = brighter (MONOCHROME1 inverted).
        meta: :class:`DicomMeta` (ViewPosition, PatientID, StudyInstanceUID, ...).
    Raises:
        DataError: naming the file and the reason (not DICOM, truncated, no pixel data,
            colour, multi-frame, compressed without a decoder plugin, bad LUT...).
        ValueError: ``voi`` not one of :data:`VOI_MODES`.
    """
    if voi not in VOI_MODES:
        raise ValueError(f"voi={voi!r}; expected one of {VOI_MODES}")
    path = os.fspath(path)
    try:
        with warnings.catch_warnings():
            # pydicom warns on every non-conformant value it meets (e.g. a UID with a
            # bad character); those do not stop us reading pixels, so keep logs clean.
            warnings.simplefilter("ignore")
            return _read(path, voi, max_pixels, max_file_bytes)
    except (DataError, MemoryError):
        raise
    except Exception as exc:  # last line of defence: bad bytes never escape as another type
        raise DataError(path, f"unreadable DICOM ({type(exc).__name__}: {_one_line(exc)})") from None


def _read(path: str, voi: str, max_pixels: int, max_file_bytes: int) -> tuple[np.ndarray, DicomMeta]:
    ds = _dcmread(path, max_file_bytes, force=True)
    meta = _meta(ds, path)
    allocated, stored_bits, rep = _check_pixel_module(path, ds)
    _check_pixel_length(path, ds, allocated, max_pixels)
    arr = _decode(path, ds)
    if arr.ndim != 2 or arr.shape != (meta.rows, meta.columns):
        raise DataError(path, f"wrong sizes: decoded pixels {arr.shape}, header Rows x Columns = ({meta.rows}, {meta.columns})")
    signed = rep == 1
    try:
        invert = meta.photometric_interpretation == "MONOCHROME1"  # lowest value is white
        if arr.dtype.kind in "iu" and arr.dtype.itemsize <= 2:
            image = _through_table(path, ds, arr, stored_bits, signed, voi, invert)
        else:  # 32-bit containers: too many codes for a table, map the pixels directly
            image = _pipeline(path, ds, arr.astype(np.float64), stored_bits, signed, voi)
            image = (1.0 - image if invert else image).astype(np.float32)
            if not np.isfinite(image).all():
                raise DataError(path, "pixel pipeline produced non-finite values (bad rescale or window)")
    except DataError:
        raise
    except Exception as exc:  # a malformed LUT element must not escape as a random type
        raise DataError(path, f"bad modality/VOI attributes ({type(exc).__name__}: {exc})") from None
    return image, meta


def _through_table(path: str, ds, arr: np.ndarray, bits: int, signed: bool, voi: str,
                   invert: bool) -> np.ndarray:
    """The pipeline evaluated once per possible stored code (<= 65536 of them, float64),
    then applied to the image as one table lookup: ~10x faster than float64 temporaries
    over a 5-megapixel film, and exactly the same values."""
    n = 1 << (8 * arr.dtype.itemsize)
    codes = np.arange(n, dtype=np.int64)
    if arr.dtype.kind == "i":  # index by the unsigned view: negative codes sit in the top half
        codes = np.where(codes >= n // 2, codes - n, codes)
    # native byte order first (big-endian files decode to '>u2'), then the unsigned view
    view = arr.astype(arr.dtype.newbyteorder("="), copy=False).view(f"u{arr.dtype.itemsize}")
    present = np.bincount(view.ravel(), minlength=n) > 0 if voi == "minmax" else None
    table = _pipeline(path, ds, codes.astype(np.float64), bits, signed, voi, present=present)
    if invert:
        table = 1.0 - table
    # Checked on the codes BitsStored allows (pydicom masks/sign-extends to that range).
    lo, hi = _stored_range(bits, signed)
    if not np.isfinite(table[(codes >= lo) & (codes <= hi)]).all():
        raise DataError(path, "pixel pipeline produced non-finite values (bad rescale or window)")
    table = table.astype(np.float32)
    out = np.empty(view.shape, dtype=np.float32)
    # Row blocks of ~64k pixels: the gather's intp index stays in cache instead of a
    # 40 MB temporary per film (measured ~1.7x faster on 2500 x 2048).
    step = max(1, 65536 // max(1, view.shape[1]))
    for r in range(0, view.shape[0], step):
        np.take(table, view[r:r + step], out=out[r:r + step])
    return out


def _pipeline(path: str, ds, x: np.ndarray, bits: int, signed: bool, voi: str,
              present: np.ndarray | None = None) -> np.ndarray:
    """Stored values x (float64, any shape) -> [0, 1] before the MONOCHROME1 inversion.
    ``present`` (a mask over x) limits voi="minmax" to the values that occur."""
    lo, hi = _stored_range(bits, signed)
    range_in = np.array([lo, hi], dtype=np.float64)

    # Modality LUT: the sequence wins over rescale (PS3.3 C.11.1: they are exclusive).
    mlut = ds.get("ModalityLUTSequence")
    if mlut is not None and len(mlut) > 0:
        values, first, _ = _lut(path, ds, mlut[0], "Modality LUT Sequence")
        x = _apply_lut(x, values, first)
        range_out = (float(values.min()), float(values.max()))
    else:
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        if not (np.isfinite(slope) and np.isfinite(intercept)):
            raise DataError(path, f"RescaleSlope/RescaleIntercept not finite ({slope}, {intercept})")
        x = x * slope + intercept
        ends = range_in * slope + intercept
        range_out = (float(ends.min()), float(ends.max()))

    if voi == "auto":
        vlut = ds.get("VOILUTSequence")
        if vlut is not None and len(vlut) > 0:
            values, first, lut_bits = _lut(path, ds, vlut[0], "VOI LUT Sequence")
            return np.clip(_apply_lut(x, values, first) / float((1 << lut_bits) - 1), 0.0, 1.0)
        windowed = _window(path, ds, x)
        if windowed is not None:
            return windowed
    elif voi == "minmax":
        seen = x if present is None else x[present]
        range_out = (float(seen.min()), float(seen.max()))
    span = range_out[1] - range_out[0]
    if span <= 0:
        return np.zeros_like(x)
    return np.clip((x - range_out[0]) / span, 0.0, 1.0)
