"""bench/phantom_study.py: it refuses a `fastssl pretrain` without the released-recipe
flags, naming them; its --smoke run goes through every step, writes the table and JSON,
and a rerun skips every finished step."""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

from _mvmae_helpers import one_thread

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_study():
    spec = importlib.util.spec_from_file_location("phantom_study", os.path.join(ROOT, "bench", "phantom_study.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # --jobs pickles its functions by module name
    spec.loader.exec_module(module)
    return module


def _has_recipe_flags(study) -> bool:
    try:
        study.check_pretrain_flags()
    except SystemExit:
        return False
    return True


def test_missing_pretrain_flags_fail_clearly(monkeypatch):
    study = load_study()
    monkeypatch.setitem(study.REQUIRED_PRETRAIN, "--no-such-flag", None)
    with pytest.raises(SystemExit, match=r"lacks \[.*--no-such-flag"):
        study.main(["--out", "unused", "--smoke"])


@pytest.mark.slow
def test_smoke_run_writes_the_table_and_resumes(tmp_path, monkeypatch, capsys):
    """Two runs at a time (--jobs 2), then a sequential rerun that finds all done. With the
    released-recipe flags installed, the study's own commands; until they land
    (issue 8, paper1 branch), the same pipeline with today's modes standing in."""
    study = load_study()
    if not _has_recipe_flags(study):
        stand_in = {"mvmae_flu": ["--mode", "paired"], "paired_beta0": ["--mode", "paired", "--beta-max", "0"],
                    "single": ["--mode", "single"], "supervised": ["--mode", "supervised"], "random": None}
        monkeypatch.setattr(study, "METHODS", {k: (v[0], stand_in[k]) for k, v in study.METHODS.items()})
        monkeypatch.setattr(study, "REQUIRED_PRETRAIN", {})
    out = str(tmp_path / "study")
    with one_thread():
        assert study.main(["--out", out, "--smoke", "--quiet", "--jobs", "2"]) == 0
    result = json.loads(open(os.path.join(out, "phantom_study.json")).read())
    table = result["table"]
    assert set(table) == set(study.METHODS)
    for method, rows in table.items():
        for kind in ("probe", "finetune"):
            assert 0 <= rows[kind]["mean"] <= 1
            assert ("delta_vs_single" in rows[kind]) == (method != "single")
    md = open(os.path.join(out, "phantom_study.md")).read()
    assert md.count("\n| ") == 1 + len(study.METHODS) and "single-view MAE" in md
    # a rerun finds every step done: no command runs
    calls = []
    monkeypatch.setattr(study, "_cli", lambda argv, timings, name: calls.append(name))
    capsys.readouterr()
    assert study.main(["--out", out, "--smoke", "--quiet"]) == 0
    assert calls == []
