"""Runs the Triton kernel cases (tests/_triton_interpret_cases.py) under the interpreter.

TRITON_INTERPRET must be set before Triton is first imported, and this pytest process
may already have imported it (torch.compile does), so the cases run in a child pytest
with the variable set. A failure there fails this test with the child's report.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent
CASES = HERE / "_triton_interpret_cases.py"


@pytest.mark.triton_interpret
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_triton_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("FASTSSL_IMPL", None)
    cmd = [sys.executable, "-m", "pytest", str(CASES), "-q", "-rfEs", "-p", "no:cacheprovider",
           "-o", "addopts=", "--tb=short"]
    proc = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True,
                          timeout=600)
    report = proc.stdout[-12000:] + ("\n--- stderr ---\n" + proc.stderr[-4000:] if proc.stderr else "")
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "(no output)"
    assert proc.returncode == 0, (
        f"Triton interpreter cases failed (exit {proc.returncode}): {summary}\n"
        f"rerun: TRITON_INTERPRET=1 {' '.join(cmd[1:])}\n\n{report}")
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 50, f"too few cases ran: {summary}\n{report}"
