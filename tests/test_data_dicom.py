"""read_dicom against pydicom's own LUT functions, on generated and shipped files."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import (
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    RLELossless,
)

from dicom_factory import make_dicom
from fastssl.data.dicom import read_dicom, read_dicom_header
from fastssl.errors import DataError


def reference(path: str, voi: str = "auto") -> np.ndarray:
    """The same pipeline built from pydicom's functions, scaled to [0, 1] the way pydicom
    scales its output (apply_windowing maps to the stored range after rescale)."""
    ds = pydicom.dcmread(path)
    x = apply_modality_lut(ds.pixel_array, ds)  # stays integer when there is no rescale
    bits, signed = ds.BitsStored, ds.PixelRepresentation == 1
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if "ModalityLUTSequence" in ds:
        data = np.asarray(ds.ModalityLUTSequence[0].LUTData, dtype=np.float64)
        full = (data.min(), data.max())
        y_min, y_max = 0, 2 ** ds.ModalityLUTSequence[0].LUTDescriptor[2] - 1
    else:
        slope, icpt = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
        full = tuple(sorted((lo * slope + icpt, hi * slope + icpt)))
        y_min, y_max = lo, hi
        if "RescaleSlope" in ds:
            y_min, y_max = lo * slope + icpt, hi * slope + icpt
    if voi == "auto" and "VOILUTSequence" in ds:
        y = apply_voi_lut(x, ds) / (2 ** ds.VOILUTSequence[0].LUTDescriptor[2] - 1)
    elif voi == "auto" and "WindowCenter" in ds:
        y = (apply_voi_lut(x.astype(np.float64), ds, prefer_lut=False) - y_min) / (y_max - y_min)
    else:
        y = np.clip((x.astype(np.float64) - full[0]) / (full[1] - full[0]), 0, 1)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        y = 1 - y
    return y


def check_against_reference(path, voi="auto", atol=1e-6):
    image, meta = read_dicom(path, voi=voi)
    assert image.dtype == np.float32 and image.ndim == 2
    assert image.min() >= 0 and image.max() <= 1
    np.testing.assert_allclose(image, reference(path, voi), atol=atol)
    return image, meta


@pytest.fixture
def pixels(rng):
    return rng.integers(0, 4096, size=(13, 17))  # odd sizes on purpose


CASES = {
    "plain12": dict(),
    "high_bit_noise": dict(high_bit_noise=True),
    "window": dict(window=(1500, 2000)),
    "window_narrow": dict(window=(2048.5, 1)),
    "two_windows_first_used": dict(window=([1000, 3000], [500, 800])),
    "window_linear_exact": dict(window=(1500, 2000), voi_lut_function="LINEAR_EXACT"),
    "window_sigmoid": dict(window=(1500, 2000), voi_lut_function="SIGMOID"),
    "rescale": dict(rescale=(2.0, -1024.0)),
    "rescale_window": dict(rescale=(0.5, 100.0), window=(900, 1200)),
    "rescale_negative_slope": dict(rescale=(-1.0, 4095.0)),
    "monochrome1": dict(photometric="MONOCHROME1"),
    "monochrome1_window": dict(photometric="MONOCHROME1", window=(2000, 3000)),
    "voi_lut": dict(voi_lut=(0, 16, [min(65535, 16 * v) for v in range(4096)])),
    "voi_lut_offset": dict(voi_lut=(500, 12, list(range(0, 4000, 2)))),
    "modality_lut": dict(modality_lut=(0, 16, [4095 - v for v in range(4096)])),
    "modality_lut_window": dict(modality_lut=(100, 16, [(3 * v) % 4096 for v in range(3000)]), window=(2000, 1500)),
    "bits8": dict(bits_allocated=8, bits_stored=8),
    "bits10_in_16": dict(bits_stored=10),
    "implicit_vr": dict(transfer_syntax=ImplicitVRLittleEndian, voi_lut=(0, 16, list(range(0, 65536, 16)))),
    "big_endian": dict(transfer_syntax=ExplicitVRBigEndian),
    "rle": dict(transfer_syntax=RLELossless, window=(1500, 2000)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_pipeline_matches_pydicom(tmp_path, pixels, case):
    kwargs = dict(CASES[case])
    if kwargs.get("bits_stored") == 8:
        pixels = pixels % 256
    if kwargs.get("bits_stored") == 10:
        pixels = pixels % 1024
    if kwargs.get("transfer_syntax") == ExplicitVRBigEndian:
        pytest.importorskip("pydicom")
    path = make_dicom(tmp_path / f"{case}.dcm", pixels, **kwargs)
    try:
        check_against_reference(path)
    except NotImplementedError:
        pytest.skip("pydicom cannot write this syntax here")
    if case != "plain12":
        check_against_reference(path, voi="none")


@pytest.mark.parametrize("bits", [12, 16])
def test_signed_stored_values(tmp_path, rng, bits):
    pixels = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), size=(9, 11))
    path = make_dicom(tmp_path / "s.dcm", pixels, bits_stored=bits, pixel_representation=1,
                      rescale=(1.0, 1000.0), high_bit_noise=True)
    image, _ = check_against_reference(path, voi="none")
    # Two's complement honoured: the order of stored values is the order of brightness.
    order = np.argsort(pixels.ravel(), kind="stable")
    assert np.all(np.diff(image.ravel()[order]) >= 0)


def test_voi_none_ignores_window_and_monochrome1_is_inverted(tmp_path):
    pixels = np.array([[0, 4095], [1000, 2000]])
    path = make_dicom(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1", window=(1000, 10))
    image, _ = read_dicom(path, voi="none")
    np.testing.assert_allclose(image, 1 - pixels / 4095, atol=1e-6)
    windowed, _ = read_dicom(path)
    assert windowed[0, 0] == 1.0 and windowed[0, 1] == 0.0  # below window -> black -> inverted white


def test_voi_minmax_uses_image_range(tmp_path):
    path = make_dicom(tmp_path / "mm.dcm", np.array([[100, 200], [300, 500]]), window=(0, 10))
    image, _ = read_dicom(path, voi="minmax")
    np.testing.assert_allclose(image, [[0, 0.25], [0.5, 1]], atol=1e-6)
    with pytest.raises(ValueError, match="voi="):
        read_dicom(path, voi="lut")


def test_meta(tmp_path, pixels):
    path = make_dicom(tmp_path / "meta.dcm", pixels, view_position="ll ", patient_id="10002000",
                      study_uid="1.2.3", sop_uid="1.2.3.4", pixel_spacing=(0.1, 0.2))
    _, meta = read_dicom(path)
    assert meta.view_position == "LL"
    assert (meta.patient_id, meta.study_instance_uid, meta.sop_instance_uid) == ("10002000", "1.2.3", "1.2.3.4")
    assert (meta.rows, meta.columns, meta.pixel_spacing) == (13, 17, (0.1, 0.2))
    assert read_dicom_header(path) == meta
    path = make_dicom(tmp_path / "noview.dcm", pixels, view_position=None, pixel_spacing=None)
    meta = read_dicom_header(path)
    assert meta.view_position is None and meta.pixel_spacing is None


# ---- rejections: every one a DataError naming the file and the reason ----

REJECTS = {
    "multiframe": (dict(frames=2), "multi-frame"),
    "colour": (dict(samples_per_pixel=3, photometric="RGB", bits_allocated=8, bits_stored=8), "colour"),
    "no_pixels": (dict(), "no pixel data"),
    "short_pixels": (dict(raw_pixel_bytes=b"\x00\x01" * 5), "pixel data"),
    "jpegls_no_plugin": (dict(transfer_syntax=JPEGLSLossless), "JPEG-LS"),
    "bad_window": (dict(window=(100, 0)), "WindowWidth"),
    "bad_function": (dict(window=(100, 10), voi_lut_function="CUBIC"), "VOILUTFunction"),
    "lut_size": (dict(voi_lut=(0, 16, [1, 2, 3])), None),
}


@pytest.mark.parametrize("case", sorted(REJECTS))
def test_rejects_with_data_error(tmp_path, rng, case):
    kwargs, match = REJECTS[case]
    pixels = rng.integers(0, 256, size=(8, 6))
    if case == "multiframe":
        pixels = rng.integers(0, 4096, size=(2, 8, 6))
    if case == "colour":
        pixels = rng.integers(0, 256, size=(8, 6, 3))
    if case == "no_pixels":
        pixels = None
    if case == "jpegls_no_plugin":
        from pydicom.pixels import get_decoder

        if get_decoder(JPEGLSLossless).is_available:
            pytest.skip("a JPEG-LS decoder plugin is installed here")
    path = make_dicom(tmp_path / f"{case}.dcm", pixels, **kwargs)
    if case == "lut_size":
        # Descriptor claims more entries than LUTData holds.
        ds = pydicom.dcmread(path)
        ds.VOILUTSequence[0].LUTDescriptor = [10, 0, 16]
        ds.save_as(path)
        match = "LUTDescriptor says 10 entries"
    with pytest.raises(DataError, match=match) as info:
        read_dicom(path)
    assert info.value.path == os.fspath(path)
    if case == "jpegls_no_plugin":
        assert "pylibjpeg" in info.value.reason and "1.2.840.10008.1.2.4.80" in info.value.reason


def test_not_dicom_missing_and_truncated(tmp_path, pixels):
    bad = tmp_path / "notes.dcm"
    bad.write_text("hello")
    with pytest.raises(DataError, match="notes.dcm"):
        read_dicom(bad)
    with pytest.raises(DataError, match="no such file"):
        read_dicom(tmp_path / "absent.dcm")
    good = make_dicom(tmp_path / "good.dcm", pixels)
    data = Path(good).read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) - 40])
    with pytest.raises(DataError, match="cut.dcm"):
        read_dicom(tmp_path / "cut.dcm")
    (tmp_path / "empty.dcm").write_bytes(b"")
    with pytest.raises(DataError, match="empty.dcm"):
        read_dicom(tmp_path / "empty.dcm")


# ---- the files that ship inside pydicom ----

def shipped(name: str) -> str:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not shipped with this pydicom install (download disabled)")
    return path


@pytest.mark.parametrize("name", [
    "CT_small.dcm", "MR_small.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm",
    "MR_small_RLE.dcm", "examples_overlay.dcm", "JPEG2000.dcm", "RG1_UNCI.dcm",
])
def test_shipped_images_match_pydicom(name):
    path = shipped(name)
    try:
        pydicom.dcmread(path).pixel_array
    except Exception as exc:  # compressed and no plugin: our error must say so
        with pytest.raises(DataError, match="decoder plugin"):
            read_dicom(path)
        pytest.skip(f"no decoder for {name}: {exc}")
    check_against_reference(path)
    check_against_reference(path, voi="none")


@pytest.mark.parametrize("name, match", [
    ("MR_truncated.dcm", "pixel data"),
    ("rtdose.dcm", "multi-frame"),
    ("SC_rgb_small_odd.dcm", "colour"),
    ("rtstruct.dcm", "no pixel data"),
    ("liver_1frame.dcm", "BitsAllocated"),
    ("MR_small_jpeg_ls_lossless.dcm", "pylibjpeg"),
])
def test_shipped_rejects(name, match):
    path = shipped(name)
    if name == "MR_small_jpeg_ls_lossless.dcm":
        from pydicom.pixels import get_decoder

        if get_decoder(JPEGLSLossless).is_available:
            pytest.skip("a JPEG-LS decoder plugin is installed here")
    with pytest.raises(DataError, match=match):
        read_dicom(path)


# ---- fuzz: mutated bytes of valid files give a DataError or a correct image ----

_SEEDS: list[bytes] = []


def seeds() -> list[bytes]:
    """Bytes of three valid files (module-level so hypothesis does not print them)."""
    if not _SEEDS:
        import tempfile

        rng = np.random.default_rng(7)
        pixels = rng.integers(0, 4096, size=(6, 5))
        with tempfile.TemporaryDirectory() as root:
            files = [
                make_dicom(os.path.join(root, "a.dcm"), pixels, window=(2000, 3000)),
                make_dicom(os.path.join(root, "b.dcm"), pixels, rescale=(2.0, -50.0), photometric="MONOCHROME1",
                           voi_lut=(0, 12, list(range(0, 8192, 2))[:4096])),
                make_dicom(os.path.join(root, "c.dcm"), pixels % 128 - 64, bits_stored=8, bits_allocated=8,
                           pixel_representation=1),
            ]
            _SEEDS.extend(Path(f).read_bytes() for f in files)
    return _SEEDS


@settings(max_examples=int(os.environ.get("FASTSSL_FUZZ_EXAMPLES", "100")), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_reader_never_crashes(tmp_path, data):
    raw = bytearray(seeds()[data.draw(st.integers(0, 2), label="seed file")])
    kind = data.draw(st.sampled_from(["flip", "truncate", "splice"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            pos = data.draw(st.integers(0, len(raw) - 1))
            raw[pos] = data.draw(st.integers(0, 255))
    elif kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        pos = data.draw(st.integers(0, len(raw)))
        raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    path = tmp_path / "fuzz.dcm"
    path.write_bytes(bytes(raw))
    try:
        image, _ = read_dicom(path)
    except DataError as exc:
        assert exc.path == os.fspath(path) and exc.reason
        return
    ds = pydicom.dcmread(path, force=True)
    assert image.shape == (ds.Rows, ds.Columns) and image.dtype == np.float32
    assert np.all((image >= 0) & (image <= 1))
