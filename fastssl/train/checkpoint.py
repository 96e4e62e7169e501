"""Checkpoint and metrics files of a training run: atomic writes, resume truncation."""
from __future__ import annotations

import json
import os

import torch

__all__ = ["atomic_torch_save", "atomic_write_text", "truncate_metrics"]


def atomic_torch_save(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


def truncate_metrics(path: str, step: int) -> None:
    """Drop metrics lines logged after the checkpoint we resume from (they will be redone)."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as handle:
        lines = [ln for ln in handle if ln.strip() and json.loads(ln)["step"] <= step]
    atomic_write_text(path, "".join(lines))
