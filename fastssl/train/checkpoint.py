"""Checkpoint and metrics files of a training run: the names pretrain imports, on fastssl.jobs."""
from __future__ import annotations

import os

from fastssl.jobs import atomic_write_text, save_checkpoint, truncate_jsonl

__all__ = ["atomic_torch_save", "atomic_write_text", "truncate_metrics"]

# torch.save atomically, with a sha256 sidecar that fastssl.jobs.load_checkpoint verifies
atomic_torch_save = save_checkpoint


def truncate_metrics(path: str | os.PathLike, step: int) -> None:
    """Drop metrics lines logged after the checkpoint we resume from (they will be redone)."""
    truncate_jsonl(path, lambda record: record["step"] <= step)
