"""One mechanism for every job's output directory (every command that writes one: phantom, prepare,
pretrain, probe, finetune, export, tile, embed, curate, grids, demo).

Every job that writes into ``out_dir`` opens it with :func:`open_job`:

    fp = JobFingerprint("pretrain", settings, fingerprint_files(inputs))
    with open_job(out_dir, fp, overwrite=cfg.overwrite, stale=("parts",)) as status:
        ...  # status "new" or "resume"; atomic_write_json / save_checkpoint / truncate_jsonl ...

which takes the output lock (a second job into out_dir fails at once), removes leftovers of
killed writers, and resumes or refuses (naming the differences) against the saved job.json;
with several ranks, rank 0 does all that and the others follow its verdict.

A job whose out_dir is a dataset other tools read (phantom) keeps its own record file through
:class:`DatasetRecord` instead of job.json.

``settings`` holds only the settings that change results (not workers, progress, device...);
``ignore=`` drops more keys at comparison time. A resume whose fingerprint differs from the
saved ``job.json`` raises :class:`fastssl.errors.ResumeMismatch` naming every difference.

Input files are identified by size + a sha256 of sampled 64 KiB blocks (first, last and evenly
spaced ones: cheap at hundreds of GB); ``full=True`` hashes every byte (``--verify-data``).
A sampled hash misses an edit confined to unsampled blocks: that is the price of speed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import socket
import struct
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from fastssl.errors import DataError, OutputLocked, ResumeMismatch

__all__ = [
    "BLOCK_SIZE", "FINGERPRINT_NAME", "LOCK_NAME",
    "fingerprint_files", "sampled_hashes", "JobFingerprint", "DatasetRecord", "check_resume", "write_fingerprint", "clear_outputs",
    "OutputLock", "open_job", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "remove_stale_tmp",
    "save_checkpoint", "load_checkpoint", "read_jsonl", "truncate_jsonl", "verify_safetensors",
]

log = logging.getLogger(__name__)

BLOCK_SIZE = 64 * 1024
SAMPLED_BLOCKS = 8                  # first, last and 6 evenly spaced between them
FINGERPRINT_NAME = "job.json"
LOCK_NAME = ".fastssl.lock"
_TMP_RE = re.compile(r"\.tmp-?(\d+)$")   # ours: .NAME.tmpPID; older writers: NAME.tmpPID, .NAME.tmp-PID


# --------------------------------------------------------------------------- atomic writes
# The writers live in fastssl.atomic; job code keeps importing them from here.
from fastssl.atomic import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text  # noqa: E402


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:         # exists, owned by someone else
        return True
    return True


def remove_stale_tmp(out_dir: str | os.PathLike) -> list[str]:
    """Delete ``*.tmp<pid>`` files in ``out_dir`` (not recursive) whose writer is no longer alive.

    Returns the removed names. Only safe under :class:`OutputLock` (pids are of this host).
    """
    out_dir = os.fspath(out_dir)
    removed = []
    if not os.path.isdir(out_dir):
        return removed
    for name in sorted(os.listdir(out_dir)):
        match = _TMP_RE.search(name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        path = os.path.join(out_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
        removed.append(name)
    if removed:
        log.info("%s: removed %d leftover temporary file(s) of killed writers: %s",
                 out_dir, len(removed), ", ".join(removed))
    return removed


# --------------------------------------------------------------------------- input fingerprints

def _sampled_offsets(size: int) -> list[int]:
    n_blocks = -(-size // BLOCK_SIZE)
    if n_blocks <= SAMPLED_BLOCKS:
        return [i * BLOCK_SIZE for i in range(n_blocks)]
    last = n_blocks - 1
    picks = {round(i * last / (SAMPLED_BLOCKS - 1)) for i in range(SAMPLED_BLOCKS)}
    return [b * BLOCK_SIZE for b in sorted(picks)]


def _hash_file(path: str, size: int, full: bool) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if full:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        else:
            for offset in _sampled_offsets(size):
                handle.seek(offset)
                digest.update(handle.read(BLOCK_SIZE))
    return digest.hexdigest()


def fingerprint_files(paths: Iterable[str | os.PathLike], *, full: bool = False) -> dict[str, dict]:
    """Identity of input files: ``{path: {"size", "mtime_ns", "sha256", "hashed"}}``.

    ``hashed`` is "sampled" (up to 8 blocks of 64 KiB: first, last, evenly spaced) or "full"
    (``full=True``: every byte). Files of at most 8 blocks are hashed whole either way.
    A missing or unreadable file raises FileNotFoundError/PermissionError naming it.
    """
    prints = {}
    for path in paths:
        path = os.fspath(path)
        stat = os.stat(path)
        if not os.path.isfile(path):
            raise IsADirectoryError(f"{path}: is not a regular file (cannot fingerprint it)")
        whole = full or stat.st_size <= SAMPLED_BLOCKS * BLOCK_SIZE
        prints[path] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                        "sha256": _hash_file(path, stat.st_size, full),
                        "hashed": "full" if whole else "sampled"}
    return prints


def sampled_hashes(prints: Mapping[str, dict]) -> dict[str, str]:
    """``{path: sha256}`` of the entries of ``fingerprint_files(...)`` whose sha256 equals the one a
    sampled fingerprint gives (sampled ones, and files small enough to be hashed whole either
    way), so that a later identity check can reuse them instead of reading the files again."""
    whole = SAMPLED_BLOCKS * BLOCK_SIZE
    return {path: entry["sha256"] for path, entry in prints.items()
            if entry.get("hashed") == "sampled" or entry["size"] <= whole}


def _input_differences(saved: Mapping[str, dict], now: Mapping[str, dict]) -> list[str]:
    """Changed inputs in words. mtime alone is not a change (copies and touches keep results)."""
    out = []
    for path in sorted(set(saved) | set(now)):
        if path not in now:
            out.append(f"input {path}: no longer given")
        elif path not in saved:
            out.append(f"input {path}: new")
        elif saved[path]["size"] != now[path]["size"]:
            out.append(f"input {path}: size {saved[path]['size']} -> {now[path]['size']} bytes")
        elif saved[path].get("hashed") == now[path].get("hashed") and saved[path]["sha256"] != now[path]["sha256"]:
            out.append(f"input {path}: content changed (same size, different sha256)")
    return out


# --------------------------------------------------------------------------- job identity, resume

@dataclasses.dataclass
class JobFingerprint:
    """What makes two runs of a job the same run.

    Args:
        job: the command ("pretrain", "curate"...).
        settings: result-affecting settings only (JSON-serialisable values).
        inputs: ``fingerprint_files(...)`` of the input files (or of an index standing for them).
    """
    job: str
    settings: dict
    inputs: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        # through JSON so tuples become lists, as they will be when read back
        return json.loads(json.dumps(dataclasses.asdict(self), sort_keys=True))

    @classmethod
    def from_dict(cls, data: Mapping) -> "JobFingerprint":
        return cls(job=data["job"], settings=dict(data.get("settings", {})), inputs=dict(data.get("inputs", {})))

    @property
    def record_name(self) -> str:
        """The file in out_dir that keeps this fingerprint."""
        return FINGERPRINT_NAME

    def dumps(self) -> str:
        """The record's text (indented JSON, keys sorted: equal fingerprints, equal files)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def loads(self, text: str) -> "JobFingerprint":
        """The fingerprint a record written by :meth:`dumps` holds."""
        return JobFingerprint.from_dict(json.loads(text))

    def differences(self, saved: "JobFingerprint", ignore: Iterable[str] = ()) -> list[str]:
        """Each difference as ``name: saved -> now``."""
        ignore = set(ignore)
        now, before = self.to_dict(), saved.to_dict()
        out = [] if before["job"] == now["job"] else [f"job: {before['job']} -> {now['job']}"]
        missing = object()
        for key in sorted((set(before["settings"]) | set(now["settings"])) - ignore):
            old, new = before["settings"].get(key, missing), now["settings"].get(key, missing)
            if old != new:
                out.append(f"{key}: {'(unset)' if old is missing else json.dumps(old)} -> "
                           f"{'(unset)' if new is missing else json.dumps(new)}")
        return out + _input_differences(before["inputs"], now["inputs"])


@dataclasses.dataclass
class DatasetRecord(JobFingerprint):
    """The fingerprint of a job whose out_dir is a dataset other tools read (``fastssl phantom``).

    Its record is the settings alone, as indented JSON (``indent=1``, keys sorted) in the file
    ``record`` the dataset has always carried, so that datasets written before the job opener
    resume as they did and no job.json joins their files. It has no inputs.
    """
    record: str = "settings.json"

    @property
    def record_name(self) -> str:
        return self.record

    def dumps(self) -> str:
        return json.dumps(self.settings, indent=1, sort_keys=True) + "\n"

    def loads(self, text: str) -> "JobFingerprint":
        settings = json.loads(text)
        if not isinstance(settings, dict):
            raise ValueError(f"expected a JSON object, got {type(settings).__name__}")
        return JobFingerprint(job=self.job, settings=settings)


def _outputs(out_dir: str) -> list[str]:
    """Entries of out_dir that belong to a run (everything but the lock file)."""
    if not os.path.isdir(out_dir):
        return []
    return sorted(name for name in os.listdir(out_dir) if name != LOCK_NAME)


def _removal_note(out_dir: str) -> str:
    names = _outputs(out_dir)
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    return f"use --overwrite to replace it (it removes {len(names)} entries of {out_dir}: {shown}) or another --out"


def check_resume(out_dir: str | os.PathLike, fingerprint: JobFingerprint, *, overwrite: bool = False,
                 ignore: Iterable[str] = ()) -> str:
    """"resume" when out_dir holds a run with the same fingerprint, else "new".

    Raises ResumeMismatch (a ValueError) when out_dir holds a different run, or outputs with no
    record (``job.json``, or a DatasetRecord's own file), unless ``overwrite``: then it logs
    what will go and returns "new"; the caller then calls :func:`clear_outputs` and
    :func:`write_fingerprint`. Changes nothing on disk.
    """
    out_dir = os.fspath(out_dir)
    saved_path = os.path.join(out_dir, fingerprint.record_name)
    if not _outputs(out_dir):
        return "new"
    if os.path.isfile(saved_path):
        try:
            with open(saved_path, encoding="utf-8") as handle:
                saved = fingerprint.loads(handle.read())
            problems = fingerprint.differences(saved, ignore)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            problems = [f"{saved_path} is unreadable ({exc})"]
        if not problems:
            return "resume"
        what = f"{out_dir} holds a {fingerprint.job} run with other settings or inputs: " + "; ".join(problems)
    else:
        what = (f"{out_dir} is not empty and has no {fingerprint.record_name} "
                f"(not a fastssl {fingerprint.job} output)")
    if overwrite:
        log.warning("%s; --overwrite: removing %s", what, ", ".join(_outputs(out_dir)))
        return "new"
    raise ResumeMismatch(f"{what}; {_removal_note(out_dir)}", problem=what)


def write_fingerprint(out_dir: str | os.PathLike, fingerprint: JobFingerprint) -> None:
    """Save ``fingerprint`` as its record in out_dir (job.json; atomically); creates out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_text(os.path.join(out_dir, fingerprint.record_name), fingerprint.dumps())


def clear_outputs(out_dir: str | os.PathLike) -> list[str]:
    """Remove every entry of out_dir except the lock file; returns the removed names."""
    out_dir = os.fspath(out_dir)
    names = _outputs(out_dir)
    for name in names:
        path = os.path.join(out_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    return names


# --------------------------------------------------------------------------- output lock

class OutputLock:
    """Advisory exclusive lock on an output dir: ``out_dir/.fastssl.lock`` (flock, pid, host, command).

    A second job into the same dir (this or another process) fails at once with OutputLocked.
    The lock dies with its process, so a killed job never leaves a dir locked. flock is not
    reliable on some network filesystems (old NFS): there it only records the holder.
    """

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = os.fspath(out_dir)
        self.path = os.path.join(self.out_dir, LOCK_NAME)
        self._fd: int | None = None

    def __enter__(self) -> "OutputLock":
        import fcntl
        os.makedirs(self.out_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            holder = os.read(fd, 4096).decode("utf-8", "replace")
            os.close(fd)
            raise OutputLocked(f"{self.out_dir} is in use by another job ({self._describe(holder)}); "
                               "wait for it to finish or use another --out") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        self._fd = fd
        return self

    @staticmethod
    def _describe(holder: str) -> str:
        try:
            info = json.loads(holder)
            return f"pid {info['pid']} on host {info['host']}, command: {info['command']}"
        except (ValueError, KeyError, TypeError):
            return "holder unknown"

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)   # the file stays: unlinking races with a job opening it
            os.close(self._fd)          # closing releases the flock
            self._fd = None


# --------------------------------------------------------------------------- the job opener

def _stale_dirs(out_dir: str, patterns: Iterable[str]) -> list[str]:
    """out_dir and the existing sub-directories matching ``patterns`` (globs relative to out_dir;
    ``**`` matches any depth, so ``("**",)`` is the whole tree)."""
    import glob

    found = [out_dir]
    for pattern in patterns:
        found += sorted(p for p in glob.glob(os.path.join(glob.escape(out_dir), pattern), recursive=True) if os.path.isdir(p))
    return found


def _open_as_rank0(out_dir: str, fingerprint, overwrite: bool, restart: bool, stale: Iterable[str],
                   ignore: Iterable[str]) -> str:
    """Under the lock: stale temporaries removed, then "resume" or "new" (outputs cleared and
    job.json written), or ResumeMismatch. ``restart``: start over even where a resume is possible."""
    for folder in _stale_dirs(out_dir, stale):
        remove_stale_tmp(folder)
    if callable(fingerprint):
        fingerprint = fingerprint()
    status = check_resume(out_dir, fingerprint, overwrite=overwrite or restart, ignore=ignore)
    if status == "new" or restart:
        clear_outputs(out_dir)
        write_fingerprint(out_dir, fingerprint)
        status = "new"
    return status


def _share_verdict(verdict: str, rank: int, world: int) -> str:
    """Rank 0's ``verdict`` on every rank, through fastssl.distributed.broadcast (its length,
    then its UTF-8 bytes). Alone, returns ``verdict``."""
    if world <= 1:
        return verdict
    import numpy as np

    from fastssl import distributed

    raw = verdict.encode("utf-8") if rank == 0 else b""
    size = int(distributed.broadcast(np.array([len(raw)], np.int64))[0])
    buffer = np.frombuffer(raw, np.uint8) if rank == 0 else np.zeros(size, np.uint8)
    return bytes(distributed.broadcast(buffer)).decode("utf-8")


_REFUSED = "refused: "


@contextlib.contextmanager
def open_job(out_dir: str | os.PathLike, fingerprint: "JobFingerprint | Callable[[], JobFingerprint]", *,
             overwrite: bool = False, restart: bool = False, stale: Iterable[str] = (),
             ignore: Iterable[str] = (), rank: int = 0, world: int = 1):
    """Open ``out_dir`` for a job; yields "new" (out_dir emptied, the record written: job.json,
    or a :class:`DatasetRecord`'s own file) or "resume".

    Rank 0 holds :class:`OutputLock` until the block ends (OutputLocked when another job
    holds it), removes temporaries of killed writers (in out_dir and the sub-directories
    matching the globs ``stale``), and checks ``fingerprint`` (or calls it, so that only rank 0
    hashes the inputs) against the saved record: a different run raises ResumeMismatch naming
    the differences unless ``overwrite``; ``restart`` starts over even when the run could resume
    (pretrain --no-resume). With ``world`` > 1 the other ranks take no lock, touch nothing and
    wait for rank 0's verdict: a refusal is raised on them as a ValueError, so no rank writes
    or hangs.
    """
    out_dir = os.fspath(out_dir)
    if rank != 0:
        verdict = _share_verdict("", rank, world)
        if verdict.startswith(_REFUSED):
            raise ValueError(f"{out_dir}: rank 0 refused this run ({verdict[len(_REFUSED):]})")
        yield verdict
        return
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(OutputLock(out_dir))
            status = _open_as_rank0(out_dir, fingerprint, overwrite, restart, stale, ignore)
        except BaseException as exc:
            _share_verdict(f"{_REFUSED}{type(exc).__name__}: {' '.join(str(exc).split())}", rank, world)
            raise
        _share_verdict(status, rank, world)
        yield status


# --------------------------------------------------------------------------- checkpoints

def _sha256_file(path: str) -> str:
    return _hash_file(path, os.path.getsize(path), full=True)


def _sidecar(path: str) -> str:
    return f"{path}.sha256"


def _accepted_digests(path: str) -> list[str] | None:
    try:
        with open(_sidecar(path), encoding="utf-8") as handle:
            return handle.read().split()
    except FileNotFoundError:
        return None


def save_checkpoint(obj: Any, path: str | os.PathLike) -> None:
    """torch.save ``obj`` atomically, with its sha256 in ``path.sha256``.

    The sidecar first accepts the old and the new digest, then only the new one, so a crash at
    any moment leaves a checkpoint that verifies.
    """
    import torch
    path = os.fspath(path)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        digest = _sha256_file(tmp)
        previous = (_accepted_digests(path) or [])[:1] if os.path.exists(path) else []
        atomic_write_text(_sidecar(path), "\n".join([digest] + previous) + "\n")
    atomic_write_text(_sidecar(path), digest + "\n")


def load_checkpoint(path: str | os.PathLike, *, map_location: Any = "cpu", weights_only: bool = True) -> Any:
    """torch.load after checking the sha256 sidecar (when there is one: older checkpoints have none).

    Raises DataError "damaged checkpoint (...); rerun with --no-resume to start over" on a digest
    mismatch or a file torch cannot read.
    """
    import torch
    path = os.fspath(path)
    advice = "rerun with --no-resume to start over"
    accepted = _accepted_digests(path)
    if accepted is not None:
        digest = _sha256_file(path)
        if digest not in accepted:
            raise DataError(path, f"damaged checkpoint (sha256 {digest[:12]}... is not the one saved in "
                                  f"{os.path.basename(_sidecar(path))}); {advice}")
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except (RuntimeError, EOFError, OSError, ValueError, struct.error, pickle.UnpicklingError) as exc:
        if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise
        raise DataError(path, f"damaged checkpoint ({type(exc).__name__}: {exc}); {advice}") from exc


# --------------------------------------------------------------------------- JSONL logs

def _parse_jsonl(path: str) -> list[dict]:
    with open(path, "rb") as handle:
        lines = handle.read().split(b"\n")
    while lines and not lines[-1].strip():
        lines.pop()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if number < len(lines):
                raise DataError(path, f"line {number} is not JSON (damaged log)") from None
            log.warning("%s: dropping a torn last line (%d bytes)", path, len(line))
    return records


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a JSON-lines file; a torn last line (a writer killed mid-write) is skipped.

    A missing file gives []; a damaged line before the last raises DataError naming the line.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        return []
    return _parse_jsonl(path)


def truncate_jsonl(path: str | os.PathLike, keep: Callable[[dict], bool]) -> int:
    """Rewrite ``path`` (atomically) with only the records for which ``keep(record)`` is true.

    A torn last line is cut away. Returns the number of records kept; a missing file gives 0.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        return 0
    kept = [rec for rec in read_jsonl(path) if keep(rec)]
    atomic_write_text(path, "".join(json.dumps(rec) + "\n" for rec in kept))
    return len(kept)


# --------------------------------------------------------------------------- safetensors

_SAFETENSORS_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2,
                            "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def verify_safetensors(path: str | os.PathLike) -> bool:
    """True when the header parses and every tensor's bytes lie inside the file, sized by dtype x shape."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            raw = handle.read(8)
            if len(raw) < 8:
                return False
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > size - 8 or header_len > 100 << 20:
                return False
            header = json.loads(handle.read(header_len))
        data_len = size - 8 - header_len
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            count = 1
            for dim in entry["shape"]:
                count *= int(dim)
            width = _SAFETENSORS_DTYPE_BYTES.get(entry["dtype"])
            if width is None or not 0 <= begin <= end <= data_len or end - begin != count * width:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return False
