"""Atomic file writers: the one copy every fastssl job writes its outputs with.

Each writer writes to a temporary name beside the target (``.NAME.tmpPID``), flushes and
fsyncs it, renames it over the target and fsyncs the directory, so a killed job leaves
either the old file or the new one, never a torn one. On an error the temporary goes.
A temporary left by a killed process is removed by ``fastssl.jobs.remove_stale_tmp``.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, Any

__all__ = ["atomic_path", "atomic_writer", "atomic_write_bytes", "atomic_write_text", "atomic_write_json",
           "atomic_write_csv", "atomic_save_npy", "atomic_savez"]


def _tmp_path(path: str) -> str:
    head, name = os.path.split(os.path.abspath(path))
    return os.path.join(head, f".{name}.tmp{os.getpid()}")


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:                 # some filesystems do not open directories; rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary name beside ``path`` for a writer that wants a file name (torch.save...);
    when the block ends without an error it replaces ``path``, on an error it goes. The
    caller fsyncs what it wrote."""
    path = os.fspath(path)
    tmp = _tmp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """An open handle on a temporary sibling of ``path`` ("wb" or "w": UTF-8 text, no newline
    translation); when the block ends without an error it replaces ``path``."""
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode, **({} if mode == "wb" else {"encoding": "utf-8", "newline": ""})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` so that ``path`` holds either the old or the new content, never a torn one."""
    with atomic_writer(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``atomic_write_bytes`` for UTF-8 text (written as given: no newline translation)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as indented JSON (keys sorted, so equal objects give equal files)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence]) -> None:
    """A CSV table (csv module defaults: ``\\r\\n`` line ends, minimal quoting): header, then rows."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())


def atomic_save_npy(path: str | os.PathLike, array) -> None:
    """``np.save`` of one array (no pickled objects)."""
    import numpy as np

    with atomic_writer(path, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


def atomic_savez(path: str | os.PathLike, **arrays) -> None:
    """``np.savez`` (uncompressed) of named arrays."""
    import numpy as np

    with atomic_writer(path, "wb") as handle:
        np.savez(handle, **arrays)
