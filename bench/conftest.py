"""Shared benchmark plumbing: problem-size option and a summary table per session.

Run a suite with `python -m pytest bench/<file>.py` (bench/ is outside the default
test path). `--bench-size=quick` (default) uses the reduced shapes; `full` the shapes the
issue names. Each benchmark may call `record(group, name, seconds, **columns)`; at the
end the session prints one table per group with every row's ratio to the group's
baseline, and writes it to bench/.last_<group>.json for RESULTS.md.
"""
from __future__ import annotations

import json
import os
import platform
import time
from collections import defaultdict
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_ROWS: dict[str, list[dict]] = defaultdict(list)
_BASELINES: dict[str, str] = {}


def pytest_addoption(parser):
    parser.addoption("--bench-size", default="quick", choices=("quick", "full"),
                     help="problem sizes: reduced (quick) or as the issues name them (full)")


@pytest.fixture(scope="session")
def bench_size(request) -> str:
    return request.config.getoption("--bench-size")


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
            "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return info


@pytest.fixture(scope="session")
def record():
    """record(group, name, seconds, baseline=False, **columns): one row of the summary."""

    def add(group: str, name: str, seconds: float, *, baseline: bool = False, **columns):
        _ROWS[group].append({"name": name, "seconds": seconds, **columns})
        if baseline:
            _BASELINES[group] = name

    return add


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _ROWS:
        return
    info = machine_info()
    out_dir = Path(__file__).parent
    lines = [f"\nmachine: {info}"]
    for group, rows in _ROWS.items():
        base = next((r for r in rows if r["name"] == _BASELINES.get(group)), None)
        for row in rows:
            if base is not None:
                row[f"x_vs_{base['name']}"] = round(base["seconds"] / row["seconds"], 3)
        keys = list(dict.fromkeys(k for row in rows for k in row))
        lines.append(f"\n[{group}]")
        lines.append(" | ".join(keys))
        for row in rows:
            lines.append(" | ".join(_fmt(row.get(k, "")) for k in keys))
        (out_dir / f".last_{group}.json").write_text(
            json.dumps({"machine": info, "rows": rows}, indent=2))
    terminalreporter.write_line("\n".join(lines))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
