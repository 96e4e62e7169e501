"""fastssl.atomic: the bytes each writer leaves are the format's own (written here by hand
or by numpy into memory), and a failed write leaves the old file and no temporary."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest

from fastssl.atomic import atomic_path, atomic_save_npy, atomic_savez, atomic_write_csv, atomic_write_text, atomic_writer


def test_csv_bytes_are_the_csv_module_defaults(tmp_path):
    path = tmp_path / "t.csv"
    atomic_write_csv(path, ["row", "source"], [(0, "a,b.png"), (17, 'q"uote')])
    assert path.read_bytes() == b'row,source\r\n0,"a,b.png"\r\n17,"q""uote"\r\n'


def test_text_is_written_as_given(tmp_path):
    path = tmp_path / "t.json"
    atomic_write_text(path, "é\r\nx\n")
    assert path.read_bytes() == "é\r\nx\n".encode("utf-8")


def test_npy_and_npz_bytes_equal_numpy_in_memory(tmp_path, rng):
    a = rng.standard_normal((7, 3)).astype(np.float32)
    b = rng.integers(0, 9, 5).astype(np.int64)
    want = io.BytesIO()
    np.save(want, a)
    atomic_save_npy(tmp_path / "a.npy", a)
    assert (tmp_path / "a.npy").read_bytes() == want.getvalue()
    atomic_savez(tmp_path / "p.npz", a=a, b=b)
    with np.load(tmp_path / "p.npz") as z:
        assert sorted(z.files) == ["a", "b"] and np.array_equal(z["a"], a) and np.array_equal(z["b"], b)
    with pytest.raises(ValueError):  # no pickled object arrays
        atomic_save_npy(tmp_path / "o.npy", np.array([{"x": 1}], dtype=object))
    assert sorted(os.listdir(tmp_path)) == ["a.npy", "p.npz"]


@pytest.mark.parametrize("mode", ["wb", "w"])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, mode):
    path = tmp_path / "x.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_writer(path, mode) as handle:
            handle.write(b"half" if mode == "wb" else "half")
            raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["x.bin"]
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            open(tmp, "wb").write(b"half")
            raise RuntimeError("torch.save failed")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["x.bin"]
    with atomic_writer(path, mode) as handle:
        handle.write(b"new" if mode == "wb" else "new")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["x.bin"]


def test_bad_mode():
    with pytest.raises(ValueError, match="mode must be"):
        with atomic_writer("x", "a"):
            pass
