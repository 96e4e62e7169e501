"""The README's main job (`fastssl demo`), at a tiny size: every step runs and resumes."""
from __future__ import annotations

import json

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
