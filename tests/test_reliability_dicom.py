"""read_dicom on hostile files: bounded memory and time, clear reasons, fuzzing under a memory cap."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEGBaseline8Bit, RLELossless

from dicom_factory import make_dicom
from fastssl.data.dicom import read_dicom, read_dicom_header
from fastssl.errors import DataError

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def _set_header(path, **values) -> str:
    ds = pydicom.dcmread(path)
    for key, value in values.items():
        setattr(ds, key, value)
    ds.save_as(path)
    return str(path)


def _child(code: str, timeout: float = 120) -> dict:
    """Run ``code`` in a fresh interpreter (fastssl and tests importable); it prints one JSON line."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, TESTS, os.environ.get("PYTHONPATH", "")]),
           "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            env=env, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- bounded memory and time

_MEASURE = """
    import json, resource, sys, time
    from fastssl.data.dicom import read_dicom
    from fastssl.errors import DataError
    read_dicom(__GOOD__)                          # warm: imports and decoder plugins loaded
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    try:
        read_dicom(__HOSTILE__)
        reason = None
    except DataError as exc:
        reason = exc.reason
    seconds = time.perf_counter() - t0
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(json.dumps(dict(reason=reason, seconds=seconds, grown_mb=grown_mb)))
"""


def _measure(good: str, hostile: str) -> dict:
    code = _MEASURE.replace("__HOSTILE__", repr(hostile)).replace("__GOOD__", repr(good))
    return _child(code)


@pytest.mark.parametrize("side", [16384, 65535])
def test_huge_rle_claim_fails_fast_in_little_memory(tmp_path, side):
    good = make_dicom(tmp_path / "good.dcm", np.arange(64 * 64).reshape(64, 64) % 4096)
    rng = np.random.default_rng(3)
    hostile = make_dicom(tmp_path / "claim.dcm", rng.integers(0, 4096, (64, 64)), transfer_syntax=RLELossless)
    _set_header(hostile, Rows=side, Columns=side)
    assert os.path.getsize(hostile) < 20_000
    seen = _measure(good, hostile)
    assert seen["reason"] is not None and ("RLE pixel data" in seen["reason"] or "exceeds the limit" in seen["reason"])
    assert seen["seconds"] < 1.0 and seen["grown_mb"] < 100, seen


def test_zero_filled_200mb_file_is_rejected_at_once(tmp_path):
    good = make_dicom(tmp_path / "good.dcm", np.arange(64).reshape(8, 8))
    zeros = tmp_path / "zeros.dcm"
    with open(zeros, "wb") as handle:
        handle.truncate(200 << 20)                # sparse: 200 MB of zeros, no disk used
    seen = _measure(good, str(zeros))
    assert "not a DICOM file" in seen["reason"] and seen["seconds"] < 0.5 and seen["grown_mb"] < 50, seen
    with pytest.raises(DataError, match="not a DICOM file"):
        read_dicom_header(zeros)


def test_size_limits_are_configurable(tmp_path, rng):
    path = make_dicom(tmp_path / "a.dcm", rng.integers(0, 4096, (8, 6)))
    assert read_dicom(path)[0].shape == (8, 6)
    with pytest.raises(DataError, match=r"Rows x Columns = 8 x 6 exceeds the limit of 40 pixels"):
        read_dicom(path, max_pixels=40)
    with pytest.raises(DataError, match="exceeds the 100-byte limit"):
        read_dicom(path, max_file_bytes=100)


def test_short_native_pixel_data_is_named_before_decoding(tmp_path, rng):
    path = make_dicom(tmp_path / "a.dcm", rng.integers(0, 4096, (8, 6)))
    _set_header(path, Rows=4000, Columns=4000)
    with pytest.raises(DataError, match=r"short pixel data \(96 bytes; .* = 4000 x 4000 x 16 needs 32000000\)"):
        read_dicom(path)


@pytest.mark.parametrize("rows, cols", [(64, 1), (1, 64)])
def test_rle_file_whose_rows_or_columns_became_1_is_rejected(tmp_path, rng, rows, cols):
    path = make_dicom(tmp_path / "a.dcm", rng.integers(0, 4096, (64, 64)), transfer_syntax=RLELossless)
    _set_header(path, Rows=rows, Columns=cols)
    with pytest.raises(DataError, match=f"Rows={rows}, Columns={cols} is a strip"):
        read_dicom(path)


# --------------------------------------------------------------------------- clear reasons

def test_empty_file_and_directory_say_so(tmp_path):
    (tmp_path / "empty.dcm").write_bytes(b"")
    (tmp_path / "x.dcm").mkdir()
    for reader in (read_dicom, read_dicom_header):
        with pytest.raises(DataError, match=r"empty.dcm: empty file \(0 bytes\)"):
            reader(tmp_path / "empty.dcm")
        with pytest.raises(DataError, match=r"x.dcm: is a directory"):
            reader(tmp_path / "x.dcm")
        with pytest.raises(DataError, match="no such file"):
            reader(tmp_path / "absent.dcm")


def test_decoder_failure_keeps_every_plugins_reason(tmp_path, rng):
    from pydicom.pixels import get_decoder

    if not get_decoder(JPEGBaseline8Bit).is_available:
        pytest.skip("no JPEG Baseline decoder plugin installed here")
    path = make_dicom(tmp_path / "fake.dcm", rng.integers(0, 255, (8, 8)), bits_allocated=8, bits_stored=8,
                      transfer_syntax=JPEGBaseline8Bit)   # the factory writes a codestream no decoder accepts
    with pytest.raises(DataError) as info:
        read_dicom(path)
    reason = info.value.reason
    assert "\n" not in reason and "plugins:" in reason
    plugin = get_decoder(JPEGBaseline8Bit).available_plugins[0]
    assert reason.split("plugins:", 1)[1].strip().startswith(f"{plugin}:"), reason


def test_monochrome1_is_inverted_for_32_bit_pixels(tmp_path):
    # stored 20 of 32 bits; rescale 2x - 100, no window: [0, 1] spans the rescaled stored range
    pixels = np.array([[0, 1, 262143, 1048575], [524288, 7, 1000000, 3]], dtype=np.int64)
    path = make_dicom(tmp_path / "m1.dcm", pixels, bits_allocated=32, bits_stored=20, photometric="MONOCHROME1",
                      rescale=(2.0, -100.0))
    image, _ = read_dicom(path)
    # by hand: (2v - 100 - (-100)) / (2 (2^20 - 1)) = v / 1048575, then inverted
    assert image[0, 2] == pytest.approx(1 - 262143 / 1048575, abs=1e-6)
    assert image[0, 0] == pytest.approx(1.0) and image[0, 3] == pytest.approx(0.0, abs=1e-7)
    np.testing.assert_allclose(image, 1 - pixels / 1048575, atol=1e-6)
    monochrome2, _ = read_dicom(make_dicom(tmp_path / "m2.dcm", pixels, bits_allocated=32, bits_stored=20,
                                           rescale=(2.0, -100.0)))
    np.testing.assert_allclose(image, 1 - monochrome2, atol=1e-6)


# --------------------------------------------------------------------------- fuzzing under a memory cap

_FUZZ = """
    import json, os, resource, sys, tempfile, time
    import numpy as np, pydicom
    from pydicom.uid import RLELossless
    from dicom_factory import make_dicom
    from fastssl.data.dicom import read_dicom
    from fastssl.errors import DataError

    rng = np.random.default_rng(__SEED__)
    root = tempfile.mkdtemp()
    px = rng.integers(0, 4096, (24, 20))
    seeds = [make_dicom(os.path.join(root, "a.dcm"), px, window=(2000, 3000)),
             make_dicom(os.path.join(root, "b.dcm"), px, transfer_syntax=RLELossless, photometric="MONOCHROME1"),
             make_dicom(os.path.join(root, "c.dcm"), px, bits_allocated=32, bits_stored=32, rescale=(0.5, 3))]
    for s in seeds:
        read_dicom(s)                                  # imports and plugins loaded before the cap
    def vm_bytes():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmSize")) * 1024
    cap = vm_bytes() + (__CAP_MB__ << 20)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    def header_edit(path, out):
        ds = pydicom.dcmread(path)
        edits = [dict(Rows=65535, Columns=65535), dict(Rows=16384, Columns=16384), dict(Columns=65535),
                 dict(Rows=1), dict(BitsAllocated=64), dict(BitsStored=0), dict(NumberOfFrames=3000),
                 dict(SamplesPerPixel=3), dict(PixelRepresentation=7), dict(WindowWidth=0),
                 dict(RescaleSlope=1e308)]
        for key, value in edits[rng.integers(len(edits))].items():
            setattr(ds, key, value)
        ds.save_as(out)

    counts = dict(ok=0, rejected=0)
    worst = 0.0
    out = os.path.join(root, "fuzz.dcm")
    for i in range(__N__):
        seed_path = seeds[i % len(seeds)]
        raw = bytearray(open(seed_path, "rb").read())
        kind = ["flip", "truncate", "header", "splice"][i % 4]
        if kind == "flip":
            for pos in rng.integers(0, len(raw), rng.integers(1, 9)):
                raw[pos] = int(rng.integers(256))
        elif kind == "truncate":
            raw = raw[: int(rng.integers(0, len(raw)))]
        elif kind == "splice":
            pos = int(rng.integers(0, len(raw)))
            raw[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 17))).astype(np.uint8).tobytes()
        open(out, "wb").write(bytes(raw))
        if kind == "header":
            header_edit(seed_path, out)
        t0 = time.perf_counter()
        try:
            image, _ = read_dicom(out)
            assert image.dtype == np.float32 and np.all((image >= 0) & (image <= 1)), kind
            counts["ok"] += 1
        except DataError as exc:
            assert exc.path == out and exc.reason and "\\n" not in exc.reason, exc
            # refused from the header, not by hitting the cap (MemoryError -> "too large")
            assert "too large to decode" not in exc.reason, exc
            counts["rejected"] += 1
        worst = max(worst, time.perf_counter() - t0)
    print(json.dumps(dict(counts, worst_s=worst)))
"""


@pytest.mark.parametrize("seed", [0, 1])
def test_fuzzed_files_are_read_or_rejected_within_a_memory_cap(seed):
    n = int(os.environ.get("FASTSSL_FUZZ_EXAMPLES", "150"))
    seen = _child(_FUZZ.replace("__SEED__", str(seed)).replace("__CAP_MB__", "200").replace("__N__", str(n)), timeout=300)
    assert seen["ok"] + seen["rejected"] == n and seen["rejected"] > 0
    assert seen["worst_s"] < 2.0, seen
