"""The README's main job (`fastssl demo`), at a tiny size: every step runs and resumes."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from fastssl.cli import main

TINY = ["--studies", "80", "--phantom-size", "64", "--img-size", "32", "--epochs", "2",
        "--batch-size", "16", "--points", "6000", "--dim", "16", "--components", "40",
        "--levels", "60,12,4", "--quiet"]


@pytest.mark.slow
def test_demo_runs_end_to_end_and_resumes(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *TINY]) == 0
    text = capsys.readouterr().out
    assert "macro AUROC" in text and "hierarchical k-means sample" in text
    summary = json.loads((out / "demo_summary.json").read_text())
    radio = summary["radiographs"]
    for mode in ("flu", "single"):
        assert 0.0 <= radio[mode]["macro_auroc"] <= 1.0
        assert radio[mode]["labels"] >= 1
    assert radio["rejected_files"] == 3  # the phantom's corrupt files, skipped and listed
    cur = summary["curation"]
    assert cur["sample_size"] == 600 and cur["points"] == 6000
    # Curation spreads the sample over the ground-truth components better than chance.
    assert cur["curated_entropy_norm"] > cur["random_entropy_norm"]

    # A rerun finds every step finished: same results, much less time.
    first = summary["seconds"]
    assert main(["demo", "--out", str(out), *TINY]) == 0
    again = json.loads((out / "demo_summary.json").read_text())
    assert again["radiographs"] == radio and again["curation"] == cur
    assert again["seconds"]["pretrain flu"] < max(1.0, first["pretrain flu"])


def _demo(out, capsys, *extra):
    """(exit code, stdout, stderr) of ``fastssl demo`` at the tiny size."""
    capsys.readouterr()
    code = main(["demo", "--out", str(out), *TINY, *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_demo_out_is_a_job_resumed_refused_or_overwritten(tmp_path, capsys):
    """--out is opened by fastssl.jobs.open_job: the same settings resume (the steps' folders
    kept), another setting is refused in one router line naming it, touching nothing;
    --overwrite empties --out (every step starts over); a foreign folder and a held lock are
    refused. Both parts skipped: only the demo's own job runs. Planted: --epochs left out of
    job.json, no open_job (a plain mkdir) -> this test fails."""
    from fastssl import jobs

    out, skip = tmp_path / "demo", ("--skip-radiographs", "--skip-curation")
    code, text, err = _demo(out, capsys, *skip)
    assert (code, err) == (0, "") and "fastssl demo: summary" in text
    assert sorted(os.listdir(out)) == [jobs.LOCK_NAME, "demo_summary.json", "job.json"]
    record = (out / "job.json").read_bytes()
    assert json.loads(record)["settings"]["epochs"] == 2
    (out / "pretrain_flu").mkdir()
    (out / "pretrain_flu" / "kept.txt").write_text("a step's work")    # what a resume must keep
    assert _demo(out, capsys, *skip)[0] == 0 and (out / "pretrain_flu" / "kept.txt").exists()
    assert (out / "job.json").read_bytes() == record
    code, text, err = _demo(out, capsys, *skip, "--epochs", "3")
    assert code == 2 and text == "" and err.count("\n") == 1 and err.startswith("fastssl demo: error: ")
    assert "epochs: 2 -> 3" in err and "--overwrite" in err, err
    assert (out / "job.json").read_bytes() == record and (out / "pretrain_flu" / "kept.txt").exists()
    assert _demo(out, capsys, *skip, "--epochs", "3", "--overwrite")[0] == 0
    assert not (out / "pretrain_flu").exists() and json.loads((out / "job.json").read_text())["settings"]["epochs"] == 3
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    code, _, err = _demo(foreign, capsys, *skip)
    assert code == 2 and "is not empty and has no job.json" in err
    assert set(os.listdir(foreign)) - {jobs.LOCK_NAME} == {"notes.txt"}
    held = tmp_path / "held"
    with jobs.OutputLock(held):
        code, _, err = _demo(held, capsys, *skip)
    assert code == 2 and "is in use by another job" in err and os.listdir(held) == [jobs.LOCK_NAME]


def test_demo_step_failure_is_one_router_error_naming_the_step(tmp_path, capsys):
    """A step that fails is one line, ``fastssl demo: error: step 'NAME' ...``, exit code 2 (not a
    SystemExit of another format); a step that cannot resume its folder says to use
    ``fastssl demo --overwrite`` (not the step's own --overwrite, which the demo has not), and
    that --overwrite then runs the step from scratch. Planted: the old SystemExit, the step's
    advice passed through unchanged -> this test fails."""
    out = tmp_path / "demo"
    assert _demo(out, capsys, "--skip-radiographs", "--skip-curation")[0] == 0
    (out / "curate").mkdir()
    (out / "curate" / "notes.txt").write_text("not a curate run")
    code, text, err = _demo(out, capsys, "--skip-radiographs")
    assert code == 2 and text == "" and err.count("\n") == 1, err
    assert err.startswith(f"fastssl demo: error: step 'curate' cannot resume: {out / 'curate'} is not empty"), err
    assert "use `fastssl demo --overwrite`" in err and "use --overwrite" not in err, err
    shutil.rmtree(out / "curate")
    (out / "curate").write_text("a file where the step's folder goes")
    code, _, err = _demo(out, capsys, "--skip-radiographs")
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("fastssl demo: error: step 'curate' failed: --out ") and "not a directory" in err, err
    code, text, err = _demo(out, capsys, "--skip-radiographs", "--overwrite")
    assert code == 0 and "hierarchical k-means sample" in text
    assert json.loads((out / "demo_summary.json").read_text())["curation"]["points"] == 6000
