"""fastssl.eval.report: scores.csv round trip and its errors, ROC points whose area is the
AUROC (ties included), and the ROC figure."""
from __future__ import annotations

import os

import numpy as np
import pytest

from _eval_helpers import brute_auroc
from fastssl.eval.report import plot_roc, read_scores_csv, roc_points, write_scores_csv


def test_roc_area_is_the_auroc(rng):
    for _ in range(20):
        n = int(rng.integers(4, 50))
        s = rng.integers(0, 6, size=n).astype(float)  # ties: diagonal segments
        y = rng.integers(-1, 2, size=n)
        y[:2] = [0, 1]
        fpr, tpr = roc_points(s, y)
        assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
        assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
        area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
        assert area == pytest.approx(brute_auroc(s, y))


def test_scores_csv_round_trip_and_errors(rng, tmp_path):
    studies, subjects = ["s3", "s1", "s2"], ["p9", "p9", "p4"]
    scores = rng.normal(size=(3, 2))
    labels = np.array([[1, -1], [0, 1], [1, 0]])
    path = str(tmp_path / "scores.csv")
    write_scores_csv(path, studies, subjects, scores, labels, ["A", "B"])
    t = read_scores_csv(str(tmp_path))  # a run directory works too
    order = np.argsort(studies)
    assert list(t["studies"]) == ["s1", "s2", "s3"] and list(t["subjects"]) == ["p9", "p4", "p9"]
    np.testing.assert_array_equal(t["scores"], scores[order])  # repr(float): exact
    np.testing.assert_array_equal(t["labels"], labels[order])
    with open(path, "a") as handle:
        handle.write("s1,p9,A,0.5,1\n")
    with pytest.raises(ValueError, match="repeated"):
        read_scores_csv(path)
    with pytest.raises(ValueError, match="cannot read"):
        read_scores_csv(str(tmp_path / "nope.csv"))
    with pytest.raises(ValueError, match="expected"):
        write_scores_csv(path, studies, subjects, scores[:2], labels[:2], ["A", "B"])


def test_plot_roc_writes_png(rng, tmp_path):
    pytest.importorskip("matplotlib", reason="roc.png needs matplotlib (the plots extra)")
    labels = rng.integers(0, 2, size=(40, 3))
    labels[:, 2] = 0  # one class only: no panel
    path = plot_roc(str(tmp_path / "roc.png"), labels + rng.normal(size=labels.shape), labels, ["A", "B", "C"])
    with open(path, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert [p for p in os.listdir(tmp_path) if ".tmp" in p] == []
