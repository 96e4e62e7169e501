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


def test_metrics_summary_values_and_one_replicate_by_hand(rng):
    """metrics_summary: the point values equal the brute-force counts, and with one
    bootstrap replicate its CI is that replicate's value computed on the explicitly
    expanded patients (the same draw as the AUROC's). Planted: Brier on the logits instead
    of sigmoid(logits) -> fails."""
    from _eval_helpers import brute_ap, brute_brier, brute_f1
    from fastssl.eval.report import metrics_summary

    n, names = 24, ["a", "b", "c"]
    subjects = np.array([f"p{k}" for k in rng.integers(0, 7, size=n)])
    labels = rng.integers(-1, 2, size=(n, 3))
    labels[:2] = [[0, 0, 0], [1, 1, 1]]
    labels[:, 2] = np.where(labels[:, 2] == 1, 0, labels[:, 2])  # label c: no positive -> left out
    scores = labels.clip(0) + rng.normal(size=(n, 3))
    thresholds = np.array([0.3, -0.2, 0.0])
    r = metrics_summary(scores, labels, subjects, names, thresholds=thresholds, threshold_source="validate",
                        n_boot=1, seed=4)
    used = [0, 1]
    for key, brute in (("auprc", lambda s, y, j: brute_ap(s, y)), ("f1", lambda s, y, j: brute_f1(s, y, thresholds[j])),
                       ("brier", lambda s, y, j: brute_brier(s, y))):
        want = [brute(scores[:, j], labels[:, j], j) for j in used]
        assert [r["per_label_metrics"][names[j]][key] for j in used] == pytest.approx(want)
        assert r[f"macro_{key}"] == pytest.approx(np.mean(want))
        assert r["per_label_metrics"]["c"][key] is None
        patients = np.unique(subjects)
        draw = np.random.default_rng(4).integers(0, patients.size, size=(1, patients.size))[0]
        rows = np.concatenate([np.flatnonzero(subjects == patients[k]) for k in draw])
        rep = [brute(scores[rows, j], labels[rows, j], j) for j in used]
        assert r[f"macro_{key}_ci"] == pytest.approx([np.nanmean(rep)] * 2)
    assert r["f1_threshold_source"] == "validate" and r["per_label_metrics"]["b"]["f1_threshold"] == -0.2


def test_reliability_bins_by_hand_and_plot(tmp_path):
    from fastssl.eval.report import plot_reliability, reliability_bins

    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    p = np.array([0.05, 0.15, 0.12, 0.95, 0.55, 0.99])
    y = np.array([0, 1, 0, 1, -1, 1])
    bins = reliability_bins(logit(p), y, n_bins=10)
    assert bins["count"].tolist() == [1, 2, 0, 0, 0, 0, 0, 0, 0, 2]  # 0.55 ignored (label -1)
    np.testing.assert_allclose(bins["mean_predicted"][[0, 1, 9]], [0.05, 0.135, 0.97])
    np.testing.assert_allclose(bins["observed"][[0, 1, 9]], [0.0, 0.5, 1.0])
    assert np.isnan(bins["observed"][2])
    scores = np.stack([logit(p), -logit(p)], 1)
    labels = np.stack([y, y], 1)
    labels[0, 1] = 1
    assert plot_reliability(str(tmp_path / "r.png"), scores, labels, ["a", "b"]) == str(tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
