"""Exceptions shared across fastssl."""
from __future__ import annotations

import os


class DataError(Exception):
    """A record (file, shard, row) could not be used.

    Always names the offending file so that a long job can report it and move on.

    Args:
        path: the file (or shard) at fault.
        reason: what is wrong with it, in words a user can act on.
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # picklable across worker processes
        return (type(self), (self.path, self.reason))


class MissingDependencyError(ImportError):
    """A feature needs an optional component (Triton, the native extension, cupy...)."""


class ResumeMismatch(ValueError):
    """An output dir holds a run whose settings or inputs differ from the requested one.

    Args:
        message: the whole refusal: what differs, then what to do (``--overwrite``...).
        problem: what differs alone (default: ``message``), for a caller that words its own
            advice (``fastssl demo``, whose steps' folders its own --overwrite empties).
    """

    def __init__(self, message: str, problem: str | None = None):
        super().__init__(message)
        self.problem = message if problem is None else problem

    def __reduce__(self):  # picklable across worker processes, problem kept
        return (type(self), (str(self), self.problem))


class OutputLocked(ValueError):
    """Another live job holds the output dir's lock."""
