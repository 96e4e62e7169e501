"""fastssl.eval.stats: the patient-cluster bootstrap and the paired comparison against a
brute-force computation that materialises every replicate (each drawn patient's studies
copied as often as the patient was drawn) and counts positive/negative pairs."""
from __future__ import annotations

import numpy as np
import pytest

from _eval_helpers import brute_auroc
from fastssl.eval.stats import (
    bootstrap_aurocs, bootstrap_macro_auroc, cluster_weights, macro_auroc, paired_bootstrap, weighted_auroc,
)


def brute_replicates(scores, labels, subjects, n_boot, seed):
    """(n_boot, C) per-label AUROC of explicitly expanded patient-bootstrap replicates."""
    patients = np.unique(subjects)
    draws = np.random.default_rng(seed).integers(0, patients.size, size=(n_boot, patients.size))
    out = np.full((n_boot, scores.shape[1]), np.nan)
    for r in range(n_boot):
        rows = np.concatenate([np.flatnonzero(subjects == patients[k]) for k in draws[r]])
        for j in range(scores.shape[1]):
            out[r, j] = brute_auroc(scores[rows, j], labels[rows, j])
    return out


def small_case(rng, n=14, c=3, n_patients=5, distinct=4):
    """Few distinct scores (ties), ignored labels, patients of 1 to many studies."""
    subjects = np.array([f"p{k}" for k in rng.integers(0, n_patients, size=n)])
    labels = rng.integers(-1, 2, size=(n, c))
    labels[:4] = [[0, 1, 0], [1, 0, 1], [0, 1, 1], [1, 0, 0]][:4]  # both classes in every label
    scores = rng.integers(0, distinct, size=(n, c)).astype(float)
    return scores, labels, subjects


def test_weighted_auroc_equals_repeated_rows(rng):
    for _ in range(10):
        n = int(rng.integers(2, 30))
        s = rng.integers(0, 5, size=n).astype(float)
        y = rng.integers(-1, 2, size=n)
        w = rng.integers(0, 4, size=(3, n))
        got = weighted_auroc(s, y, w)
        want = [brute_auroc(np.repeat(s, wr), np.repeat(y, wr)) for wr in w]
        np.testing.assert_allclose(got, want, equal_nan=True)


def test_cluster_weights_count_draws():
    codes = np.array([0, 0, 1, 2, 1])
    draws = np.array([[0, 0, 2], [1, 1, 1]])
    np.testing.assert_array_equal(cluster_weights(codes, draws), [[2, 2, 0, 1, 0], [0, 0, 3, 0, 3]])


@pytest.mark.parametrize("seed", [0, 3])
def test_patient_bootstrap_matches_brute_force(rng, seed):
    scores, labels, subjects = small_case(rng)
    got = bootstrap_aurocs(scores, labels, subjects, n_boot=40, seed=seed)
    want = brute_replicates(scores, labels, subjects, 40, seed)
    np.testing.assert_allclose(got, want, equal_nan=True)
    # chunked over replicates: the same draws
    np.testing.assert_allclose(bootstrap_aurocs(scores, labels, subjects, n_boot=40, seed=seed, max_elems=3 * 14),
                               want, equal_nan=True)
    # the interval is the percentile of the brute-force replicates' macro means
    ci = bootstrap_macro_auroc(scores, labels, subjects, n_boot=40, seed=seed)
    macro = np.array([np.nanmean(r) for r in want if not np.isnan(r).all()])
    np.testing.assert_allclose(ci["macro"], np.percentile(macro, [2.5, 97.5]))
    assert ci["n_clusters"] == np.unique(subjects).size


def test_patient_bootstrap_is_wider_than_study_bootstrap(rng):
    """Studies of one patient share their findings and a score offset: resampling studies
    as if independent underestimates the spread (by about sqrt(8) here); resampling
    patients does not."""
    n_patients, per = 30, 8
    subjects = np.repeat(np.arange(n_patients), per)
    labels = rng.integers(0, 2, size=(n_patients, 2))[subjects]
    scores = labels + rng.normal(size=(n_patients, 2))[subjects] + 0.3 * rng.normal(size=labels.shape)
    by_patient = bootstrap_macro_auroc(scores, labels, subjects, n_boot=400, seed=0)["macro"]
    by_study = bootstrap_macro_auroc(scores, labels, None, n_boot=400, seed=0)["macro"]
    assert by_patient[1] - by_patient[0] > 1.5 * (by_study[1] - by_study[0])


def test_paired_bootstrap_matches_brute_force(rng):
    scores_a, labels, subjects = small_case(rng)
    scores_b = scores_a + rng.integers(0, 3, size=scores_a.shape)
    r = paired_bootstrap(scores_a, scores_b, labels, subjects, n_boot=60, seed=2)
    rep_a = brute_replicates(scores_a, labels, subjects, 60, 2)
    rep_b = brute_replicates(scores_b, labels, subjects, 60, 2)
    d = np.array([np.nanmean(b - a) for a, b in zip(rep_a, rep_b) if not np.isnan(a).all()])
    delta = macro_auroc(scores_b, labels)[1] - macro_auroc(scores_a, labels)[1]
    assert r["delta"] == pytest.approx(delta)
    np.testing.assert_allclose(r["ci"], np.percentile(d, [2.5, 97.5]))
    assert r["p_value"] == pytest.approx((1 + np.sum(np.abs(d - delta) >= abs(delta))) / (1 + d.size))


def test_paired_bootstrap_detects_a_real_difference_only(rng):
    n = 300
    subjects = rng.integers(0, 60, size=n)
    labels = rng.integers(0, 2, size=(n, 4))
    weak = labels + 1.5 * rng.normal(size=labels.shape)
    strong = labels + 0.5 * rng.normal(size=labels.shape)
    r = paired_bootstrap(weak, strong, labels, subjects, n_boot=500, seed=0)
    assert r["delta"] > 0.1 and r["ci"][0] > 0 and r["p_value"] < 0.01
    same = paired_bootstrap(weak, weak + 1e-9 * rng.normal(size=weak.shape), labels, subjects, n_boot=200)
    assert abs(same["delta"]) < 1e-6 and same["p_value"] > 0.5
    with pytest.raises(ValueError, match="same studies"):
        paired_bootstrap(weak, strong[:-1], labels, subjects)
    with pytest.raises(ValueError, match="clusters"):
        bootstrap_macro_auroc(weak, labels, subjects[:-1])


def test_paired_bootstrap_averages_runs_over_seeds(rng):
    """K runs per side: each side's macro is the mean over its runs, and every replicate
    uses the same patient draw for all runs (compared with runs bootstrapped one by one)."""
    scores, labels, subjects = small_case(rng, n=30, n_patients=9, distinct=50)
    runs_a = [scores + rng.normal(size=scores.shape) for _ in range(3)]
    runs_b = [scores + 0.5 * rng.normal(size=scores.shape) for _ in range(2)]
    r = paired_bootstrap(runs_a, runs_b, labels, subjects, n_boot=80, seed=4)
    macro = lambda runs: np.mean([macro_auroc(s, labels)[1] for s in runs])  # noqa: E731
    assert r["delta"] == pytest.approx(macro(runs_b) - macro(runs_a)) and r["n_runs"] == (3, 2)
    rep = lambda runs: np.mean([brute_replicates(s, labels, subjects, 80, 4) for s in runs], axis=0)  # noqa: E731
    d = np.nanmean(rep(runs_b) - rep(runs_a), axis=1)
    np.testing.assert_allclose(r["ci"], np.percentile(d[~np.isnan(d)], [2.5, 97.5]))


# ------------------------------------------------------------------ AP, F1, Brier
def test_metrics_on_hand_made_cases():
    from fastssl.eval.stats import (
        best_f1_threshold, weighted_average_precision, weighted_brier, weighted_f1,
    )

    one = np.ones((1, 4))
    # AP: thresholds 0.9 (P 1, R .5), 0.8 (P .5, R .5), 0.7 (P 2/3, R 1) -> .5 + 0 + .5 * 2/3
    s, y = np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])
    assert weighted_average_precision(s, y, one)[0] == pytest.approx(0.5 + 0.5 * 2 / 3)
    # ties: 0.5 (P 1/2, R 1/2), 0.2 (P 2/3, R 1) -> .25 + .5 * 2/3; the ignored row changes nothing
    s, y = np.array([0.5, 0.5, 0.2, 3.0]), np.array([1, 0, 1, -1])
    assert weighted_average_precision(s, y, one)[0] == pytest.approx(0.25 + 0.5 * 2 / 3)
    # F1 at 0.5: TP 1, FP 1, FN 1 -> 2 / 4
    assert weighted_f1(s, y, one, 0.5)[0] == pytest.approx(0.5)
    assert best_f1_threshold(s, y) == pytest.approx((0.2, 2 * 2 / (2 * 2 + 1)))
    # Brier: p = .5, .75, .25 against 1, 0, 1 -> (.25 + .5625 + .5625) / 3
    s, y = np.array([0.0, np.log(3), -np.log(3), 7.0]), np.array([1, 0, 1, -1])
    assert weighted_brier(s, y, one)[0] == pytest.approx((0.25 + 0.5625 + 0.5625) / 3)
    assert np.isnan(weighted_average_precision(s, np.array([0, 0, -1, 0]), one)[0])
    assert np.isnan(best_f1_threshold(s, np.array([0, 0, -1, 0]))[0])


@pytest.mark.parametrize("distinct", [3, 1000])
def test_weighted_metrics_match_brute_force_on_expanded_rows(rng, distinct):
    """Under integer weights each metric equals the brute-force count over rows repeated
    that many times (the bootstrap's meaning of a weight); the best F1 threshold equals
    the brute-force search. Planted: AP with precision taken before the tie group is
    added (ties split) -> fails at distinct=3."""
    from _eval_helpers import brute_ap, brute_best_threshold, brute_brier, brute_f1
    from fastssl.eval.stats import (
        best_f1_threshold, weighted_average_precision, weighted_brier, weighted_f1,
    )

    for _ in range(15):
        n = int(rng.integers(3, 40))
        s = rng.integers(0, distinct, size=n).astype(float) / 3 - 0.5
        y = rng.integers(-1, 2, size=n)
        y[:2] = [0, 1]
        w = rng.integers(0, 3, size=(4, n)).astype(float)
        w[0] = 1
        t = float(s[int(rng.integers(0, n))])
        for r in range(4):
            rows = np.repeat(np.arange(n), w[r].astype(int))
            assert weighted_average_precision(s, y, w)[r] == pytest.approx(brute_ap(s[rows], y[rows]), nan_ok=True)
            assert weighted_f1(s, y, w, t)[r] == pytest.approx(brute_f1(s[rows], y[rows], t), nan_ok=True)
            assert weighted_brier(s, y, w)[r] == pytest.approx(brute_brier(s[rows], y[rows]), nan_ok=True)
        want_t, want_f1 = brute_best_threshold(s, y)
        assert best_f1_threshold(s, y) == pytest.approx((want_t, want_f1))
