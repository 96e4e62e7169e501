"""`fastssl compare`: two runs' scores.csv -> the paired patient bootstrap, and clear
refusals when the runs did not score the same studies."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fastssl.eval.report import write_scores_csv
from fastssl.eval.stats import paired_bootstrap


def _runs(rng, tmp_path, n=60):
    studies = [f"s{i:03d}" for i in range(n)]
    subjects = [f"p{i // 3}" for i in range(n)]
    labels = rng.integers(0, 2, size=(n, 3))
    a = labels + 2.0 * rng.normal(size=labels.shape)
    b = labels + 0.7 * rng.normal(size=labels.shape)
    for name, s in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        write_scores_csv(str(tmp_path / name / "scores.csv"), studies, subjects, s, labels, ["X", "Y", "Z"])
    return studies, subjects, labels, a, b


def test_compare_cli_equals_paired_bootstrap(rng, tmp_path, capsys):
    from fastssl.cli import main as cli

    _, subjects, labels, a, b = _runs(rng, tmp_path)
    out = tmp_path / "cmp.json"
    assert cli(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--n-boot", "300", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    want = paired_bootstrap(a, b, labels, np.array(subjects), n_boot=300, seed=0)
    assert r["delta"] == pytest.approx(want["delta"]) and r["ci"] == pytest.approx(list(want["ci"]))
    assert r["p_value"] == pytest.approx(want["p_value"]) and r["n_clusters"] == 20
    assert set(r["per_label_delta"]) == {"X", "Y", "Z"}
    assert "delta B - A" in capsys.readouterr().out


def test_compare_refuses_other_studies_or_targets(rng, tmp_path):
    from fastssl.cli import main as cli

    studies, subjects, labels, a, b = _runs(rng, tmp_path)
    write_scores_csv(str(tmp_path / "b" / "scores.csv"), studies[1:], subjects[1:], b[1:], labels[1:],
                     ["X", "Y", "Z"])
    assert cli(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    flipped = labels.copy()
    flipped[0] = 1 - flipped[0]
    write_scores_csv(str(tmp_path / "b" / "scores.csv"), studies, subjects, b, flipped, ["X", "Y", "Z"])
    assert cli(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert cli(["compare", str(tmp_path / "a"), str(tmp_path / "nope")]) == 2
