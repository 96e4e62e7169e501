"""bench/gpu_run.py, the one device script, on the CPU: rows reach the file one by one as
units finish, the deadline and the per-unit cap stop what would overrun, a killed run
keeps its finished rows, and --dry-run runs every section end to end."""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_run.py"


def _module():
    spec = importlib.util.spec_from_file_location("_gpu_run_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _rows(path) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle]


def test_units_append_rows_one_by_one_under_the_deadline(tmp_path):
    """A finished unit's row is on disk before the next unit starts; a unit past its cap
    is stopped (even inside a broad ``except Exception``, as the benchmark modules have)
    and leaves a TIMEOUT row; once the deadline has passed, units become skipped rows."""
    mod = _module()
    report = mod.RowFile(str(tmp_path), deadline_s=2.5)
    seen_on_disk = []

    def measured():
        report("first", status="ok", value=1.5)

    def peek():  # runs as the second unit: the first row must already be in the file
        seen_on_disk.append([r["name"] for r in _rows(report.path)])
        report("second", status="ok")

    def stuck():
        try:
            time.sleep(30)
        except Exception:  # noqa: BLE001 - what a benchmark module does around an engine
            pytest.fail("the cap's exception must not be an Exception")

    t0 = time.perf_counter()
    mod.run_unit(report, "first", measured, cap_s=5)
    mod.run_unit(report, "second", peek, cap_s=5)
    mod.run_unit(report, "stuck", stuck, cap_s=1.0)
    mod.run_unit(report, "late", measured, cap_s=5, need_s=2.0)  # < 2 s left: skipped
    assert time.perf_counter() - t0 < 4
    assert seen_on_disk == [["first"]]
    rows = _rows(report.path)
    assert [r["name"] for r in rows] == ["first", "second", "stuck", "late"]
    assert rows[0]["value"] == 1.5
    assert rows[2]["status"].startswith("TIMEOUT after 1 s")
    assert rows[3]["status"].startswith("skipped (deadline")
    failing = lambda: 1 / 0  # noqa: E731
    report.context["deadline"] = time.perf_counter() + 10
    mod.run_unit(report, "broken", failing, cap_s=5)
    assert _rows(report.path)[-1]["status"] == "FAILED"
    assert "ZeroDivisionError" in _rows(report.path)[-1]["error"]


def test_flags():
    mod = _module()
    text = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True,
                          text=True, check=True).stdout
    for flag in ("--deadline", "--unit-cap", "--out", "--sections", "--dry-run", "--wheels"):
        assert flag in text
    with pytest.raises(SystemExit):
        mod.parse_args(["--sections", "a,x"])
    with pytest.raises(SystemExit):
        mod.parse_args(["--deadline", "0"])
    wheels = subprocess.run([sys.executable, str(SCRIPT), "--wheels"], capture_output=True,
                            text=True, check=True).stdout
    assert "flash-kmeans==0.3.1" in wheels and "pip download" in wheels


def _dry_run(out, *extra):
    env = dict(os.environ, TRITON_INTERPRET="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("OUT", None)
    return [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), *extra], env


@pytest.mark.slow
def test_a_killed_run_keeps_its_finished_rows(tmp_path):
    """What a device call stopped at its timeout returns: every row finished before."""
    cmd, env = _dry_run(tmp_path)
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    path = tmp_path / "gpu_run_rows.jsonl"
    try:
        stop = time.time() + 120
        while time.time() < stop and proc.poll() is None:
            if path.exists() and len(path.read_text().splitlines()) >= 4:
                break
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
    rows = _rows(path)  # every line complete JSON
    assert len(rows) >= 4
    assert [r["name"] for r in rows[:2]] == ["environment", "wheels"]
    assert not (tmp_path / "gpu_run.md").exists() or proc.returncode == 0


@pytest.mark.slow
def test_dry_run_runs_every_section(tmp_path):
    cmd, env = _dry_run(tmp_path)
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = _rows(tmp_path / "gpu_run_rows.jsonl")
    by_name = {r["name"]: r for r in rows}
    assert [s for s in ("0", "a", "b", "c", "d", "end") if any(r["section"] == s for r in rows)] \
        == ["0", "a", "b", "c", "d", "end"]
    for row in rows:
        assert row.get("status") not in ("FAILED",) and row.get("ok", True), row
        assert not str(row.get("status", "")).startswith(("TIMEOUT", "skipped (deadline")), row
    # the correctness rows precede their timings
    names = [r["name"] for r in rows]
    assert names.index("step check: fastssl (Triton ops, fp32) vs plain PyTorch float64") < \
        names.index("step test:0.75:paired fastssl")
    assert any(n.startswith("check triton l2 bf16") for n in names)
    for n, name in enumerate(names):  # each assign timing row follows its float64 check
        if name.startswith("sweep bfloat16"):
            assert names[n - 1].startswith("assign check bf16"), names[n - 1: n + 1]
    assert sum(n.startswith("sweep bfloat16") for n in names) == 3
    assert any(n.startswith("check mae_loss") for n in names)
    # the ratio row is the columns' quotient
    fast = by_name["step test:0.75:paired fastssl"]["images_per_s"]
    comp = by_name["step test:0.75:paired ref_compile"]["images_per_s"]
    eager = by_name["step test:0.75:paired ref_eager"]["images_per_s"]
    ratio = by_name["step test:0.75:paired ratio"]
    assert ratio["x_vs_compiled"] == pytest.approx(fast / comp, rel=1e-9)
    assert ratio["x_vs_eager"] == pytest.approx(eager and fast / eager, rel=1e-9)
    assert (tmp_path / "gpu_run.md").read_text().count("\n| ") == len(rows) + 1
