"""Read one radiograph file (DICOM, PNG or JPEG) into a float image in [0, 1].

DICOM goes through :func:`fastssl.data.dicom.read_dicom` (modality LUT, VOI, MONOCHROME1).
PNG and JPEG are read with Pillow at their own bit depth: an 8-bit JPEG (MIMIC-CXR-JPG,
CheXpert) as 0..255, a 16-bit PNG (PadChest, CheXpert Plus) as 0..65535, never through
an 8-bit intermediate, so windowing keeps every stored level.

Windowing of PNG/JPEG (``voi``):

* ``"auto"``: a window from the dataset's CSV when the record carries one
  (``window=(center, width)``); else the stored range ``0 .. 2**bits_stored - 1`` when
  the record states ``bits_stored`` (PadChest's ``BitsStored_DICOM``); else, for 8-bit
  files, 0..255, and for 16-bit files the smallest of 10, 12, 14 or 16 bits that holds the
  image's maximum (a 12-bit film stored in a 16-bit PNG is not left near black).
* ``"none"``: the full range of the file's bit depth (255 or 65535), or of ``bits_stored``.
* ``"minmax"``: the image's own minimum .. maximum.

Then ``monochrome1=True`` (the record's original DICOM was MONOCHROME1 and the PNG kept
its stored values) inverts the result so that higher is always brighter.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from fastssl.errors import DataError

__all__ = ["read_image", "DICOM_SUFFIXES", "RASTER_SUFFIXES"]

DICOM_SUFFIXES = (".dcm", ".dicom")
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg")
_HINTS = ("bits_stored", "window", "monochrome1")


def read_image(path: str | os.PathLike, *, voi: str = "auto",
               hints: Mapping[str, Any] | tuple = ()) -> np.ndarray:
    """``path`` -> (H, W) float32 in [0, 1], higher = brighter.

    Args:
        voi: "auto" | "none" | "minmax" (see the module docstring).
        hints: per-record facts from the dataset's CSV, as a mapping or (name, value)
            pairs: ``bits_stored`` (int), ``window`` ((center, width)), ``monochrome1``
            (bool). Ignored for DICOM, whose header states them.
    Raises:
        DataError: a missing, unreadable or undecodable file, naming it.
    """
    path = os.fspath(path)
    hints = dict(hints)
    unknown = sorted(set(hints) - set(_HINTS))
    if unknown:
        raise ValueError(f"hints {unknown} unknown; expected names from {_HINTS}")
    if path.lower().endswith(RASTER_SUFFIXES):
        stored, depth = _read_raster(path)
        return _to_unit(path, stored, depth, voi, hints)
    from fastssl.data.dicom import read_dicom

    return read_dicom(path, voi=voi)[0]


def _read_raster(path: str) -> tuple[np.ndarray, int]:
    """PNG/JPEG -> (stored values (H, W) as uint8 or uint16, bit depth 8 or 16)."""
    from PIL import Image, UnidentifiedImageError

    if os.path.isdir(path):
        raise DataError(path, "is a directory")
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise DataError(path, "no such file") from None
    except OSError as exc:
        raise DataError(path, f"cannot read ({exc.strerror})") from None
    if size == 0:
        raise DataError(path, "empty file")
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.array(img)
                if arr.min(initial=0) < 0 or arr.max(initial=0) > 65535:
                    raise DataError(path, f"pixel values outside 0..65535 in a {mode} image")
                return arr.astype(np.uint16), 16
            if mode != "L":  # RGB/palette/alpha exports of a grey film: its luminance
                img = img.convert("L")
            return np.array(img, dtype=np.uint8), 8
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(path, f"not a readable PNG/JPEG ({type(exc).__name__}: {exc})") from None


def _to_unit(path: str, stored: np.ndarray, depth: int, voi: str, hints: dict) -> np.ndarray:
    """Stored values -> [0, 1] float32 by the ``voi`` rule, then MONOCHROME1 inversion."""
    x = stored.astype(np.float32)
    if voi == "minmax":
        lo, hi = float(x.min()), float(x.max())
    elif voi == "auto" and hints.get("window"):
        center, width = (float(v) for v in hints["window"])
        if not width > 0:
            raise DataError(path, f"window width {width} from the CSV; expected > 0")
        lo, hi = center - width / 2, center + width / 2
    elif voi in ("auto", "none"):
        bits = int(hints.get("bits_stored") or 0) or (depth if voi == "none" or depth == 8 else _bits_holding(x))
        if not 1 <= bits <= 16:
            raise DataError(path, f"bits_stored {bits} from the CSV; expected 1..16")
        lo, hi = 0.0, float(2 ** bits - 1)
    else:
        raise ValueError(f"voi={voi!r}; expected 'auto', 'none' or 'minmax'")
    out = np.clip((x - lo) / max(hi - lo, 1e-12), 0.0, 1.0) if hi > lo else np.zeros_like(x)
    if hints.get("monochrome1"):
        out = 1.0 - out
    return out.astype(np.float32, copy=False)


def _bits_holding(x: np.ndarray) -> int:
    """The smallest of 10, 12, 14, 16 bits whose range holds the image's maximum."""
    top = float(x.max(initial=0))
    return next(b for b in (10, 12, 14, 16) if top <= 2 ** b - 1)
