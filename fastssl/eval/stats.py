"""AUROC, and bootstrap intervals that resample patients (clusters of studies).

AUROC is the Mann-Whitney statistic with average ranks for ties (a positive and a
negative with equal scores count 1/2), vectorised over rows.

Why patients: the studies of one patient are correlated (MIMIC-CXR's test split has
3,269 studies from 293 patients), so resampling studies treats them as independent and
gives intervals that are too narrow. A replicate here draws P of the P patients with
replacement and takes every study of each drawn patient as often as the patient was
drawn. That is the same as weighting each study by its patient's draw count, so a
replicate's AUROC is a *weighted* Mann-Whitney count: the scores are sorted once per
label and each replicate costs O(N), never a re-sort.

Draw convention (what the brute-force tests reproduce): patients are numbered in sorted
order of their ids (``np.unique``); with ``rng = np.random.default_rng(seed)``, replicate
r draws ``rng.integers(0, P, size=(n_boot, P))[r]`` (drawn chunk by chunk; the stream is
the same).
"""
from __future__ import annotations

import warnings

import numpy as np

__all__ = ["midranks", "auroc", "auroc_rows", "macro_auroc", "cluster_codes", "cluster_weights",
           "weighted_auroc", "bootstrap_aurocs", "bootstrap_macro_auroc", "paired_bootstrap",
           "weighted_average_precision", "weighted_f1", "weighted_brier", "best_f1_threshold", "sigmoid",
           "bootstrap_metric", "bootstrap_interval"]


# ------------------------------------------------------------------------------ AUROC
def midranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (1-based) along the last axis; tied values share their mean rank.

    x: (..., N) float -> (..., N) float64.
    """
    x = np.asarray(x)
    flat = x.reshape(-1, x.shape[-1])
    n = flat.shape[1]
    order = np.argsort(flat, axis=1, kind="stable")
    xs = np.take_along_axis(flat, order, axis=1)
    idx = np.broadcast_to(np.arange(n), xs.shape)
    new = np.ones(xs.shape, dtype=bool)  # first element of a tie group
    new[:, 1:] = xs[:, 1:] != xs[:, :-1]
    last = np.ones(xs.shape, dtype=bool)  # last element of a tie group
    last[:, :-1] = new[:, 1:]
    start = np.maximum.accumulate(np.where(new, idx, 0), axis=1)
    end = np.minimum.accumulate(np.where(last, idx, n)[:, ::-1], axis=1)[:, ::-1]
    ranks = np.empty(xs.shape, dtype=np.float64)
    np.put_along_axis(ranks, order, (start + end) / 2.0 + 1.0, axis=1)
    return ranks.reshape(x.shape)


def auroc_rows(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUROC of every row: scores (R, N) finite floats, labels (R, N) in {0, 1, -1 = ignore}.

    Returns (R,) float64; NaN where a row lacks positives or negatives.
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    if scores.shape != labels.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape}: expected equal (R, N)")
    if not np.isfinite(scores).all():
        raise ValueError("scores hold NaN or inf")
    valid = labels >= 0
    # Ignored entries rank above every finite score: a rank counts only smaller or tied
    # values, so they change no valid entry's rank.
    ranks = midranks(np.where(valid, scores, np.inf))
    pos = valid & (labels == 1)
    n_pos = pos.sum(1).astype(np.float64)
    n_neg = (valid & (labels == 0)).sum(1).astype(np.float64)
    u = (ranks * pos).sum(1) - n_pos * (n_pos + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        out = u / (n_pos * n_neg)
    out[(n_pos == 0) | (n_neg == 0)] = np.nan
    return out


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUROC of one score vector: scores (N,), labels (N,) in {0, 1, -1 = ignore}; NaN if
    one class is absent."""
    return float(auroc_rows(np.asarray(scores)[None], np.asarray(labels)[None])[0])


def macro_auroc(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, float]:
    """scores, labels (N, C) -> (per-label AUROC (C,) with NaN for labels lacking a class,
    their mean over the defined labels)."""
    per = auroc_rows(np.asarray(scores).T, np.asarray(labels).T)
    if np.isnan(per).all():
        raise ValueError("no label has both positives and negatives in the test split: AUROC undefined")
    return per, float(np.nanmean(per))


def weighted_auroc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of one label under R weightings of its rows (a row of weight k counts k times).

    Args:
        scores: (N,) finite floats. labels: (N,) in {0, 1, -1 = ignore}.
        weights: (R, N) non-negative (bootstrap draw counts).
    Returns:
        (R,) float64: sum_{i pos, j neg} w_i w_j ([s_i > s_j] + [s_i = s_j] / 2) /
        (sum_pos w * sum_neg w); NaN where a weighting leaves no positive or no negative.
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    valid = np.flatnonzero(labels >= 0)
    order = valid[np.argsort(scores[valid], kind="stable")]
    s, pos = scores[order], labels[order] == 1
    w = np.asarray(weights, dtype=np.float64)[:, order]                   # (R, n) sorted
    starts = np.flatnonzero(np.concatenate([[True], s[1:] != s[:-1]]))  # tie groups
    if starts.size == 0:
        return np.full(w.shape[0], np.nan)
    neg_w = np.add.reduceat(w * ~pos, starts, axis=1)                    # (R, groups)
    pos_w = np.add.reduceat(w * pos, starts, axis=1)
    below = np.cumsum(neg_w, axis=1) - neg_w  # negative weight strictly below each group
    u = (pos_w * (below + 0.5 * neg_w)).sum(1)
    n_pos, n_neg = pos_w.sum(1), neg_w.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = u / (n_pos * n_neg)
    out[(n_pos == 0) | (n_neg == 0)] = np.nan
    return out


# ------------------------------------------------------------- AP, F1, Brier (weighted)
def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logits -> probabilities, float64, without overflow warnings."""
    x = np.asarray(x, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -x))


def _valid_sorted_desc(scores, labels, weights):
    """The valid rows sorted by decreasing score -> (scores (n,), positive (n,) bool,
    weights (R, n), starts of the tie groups)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    valid = np.flatnonzero(labels >= 0)
    order = valid[np.argsort(-scores[valid], kind="stable")]
    s = scores[order]
    w = np.asarray(weights, dtype=np.float64)[:, order]
    return s, labels[order] == 1, w, np.flatnonzero(np.concatenate([[True], s[1:] != s[:-1]]))


def weighted_average_precision(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Average precision (step-wise, one threshold per distinct score, as scikit-learn's
    average_precision_score) of one label under R row weightings.

    scores (N,) floats, labels (N,) in {0, 1, -1 = ignore}, weights (R, N) >= 0 ->
    (R,) float64: sum over thresholds t (decreasing) of (R_t - R_t') * P_t, with precision
    P_t and recall R_t of ``score >= t``; NaN where a weighting leaves no positive.
    """
    s, pos, w, starts = _valid_sorted_desc(scores, labels, weights)
    if starts.size == 0:
        return np.full(w.shape[0], np.nan)
    tp = np.add.reduceat(w * pos, starts, axis=1)                       # (R, groups)
    fp = np.add.reduceat(w * ~pos, starts, axis=1)
    ctp, cfp = np.cumsum(tp, axis=1), np.cumsum(fp, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(ctp + cfp > 0, ctp / (ctp + cfp), 0.0)
        out = (tp * precision).sum(1) / ctp[:, -1]
    out[ctp[:, -1] == 0] = np.nan
    return out


def weighted_f1(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray, threshold: float) -> np.ndarray:
    """F1 of ``score >= threshold`` for one label under R row weightings: 2 TP / (2 TP + FP
    + FN) -> (R,) float64; NaN where TP + FP + FN is 0 or the threshold is NaN."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    w = np.asarray(weights, dtype=np.float64)
    if not np.isfinite(threshold):
        return np.full(w.shape[0], np.nan)
    pred, pos, valid = scores >= threshold, labels == 1, labels >= 0
    tp = (w * (pred & pos)).sum(1)
    fp = (w * (pred & valid & ~pos)).sum(1)
    fn = (w * (~pred & pos)).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)


def weighted_brier(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Brier score of one label's logits under R row weightings: the weighted mean of
    (sigmoid(score) - label)^2 over the valid rows -> (R,) float64 (NaN: no valid weight)."""
    labels = np.asarray(labels)
    valid = labels >= 0
    err = np.where(valid, (sigmoid(scores) - np.clip(labels, 0, 1)) ** 2, 0.0)
    w = np.asarray(weights, dtype=np.float64) * valid
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(w.sum(1) > 0, (w * err).sum(1) / w.sum(1), np.nan)


def best_f1_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """The threshold t maximising the F1 of ``score >= t`` over one label's scores (N,)
    (labels in {0, 1, -1 = ignore}); t is one of the scores, ties go to the larger t.
    -> (t, its F1); (NaN, NaN) when there is no positive."""
    s, pos, w, starts = _valid_sorted_desc(scores, labels, np.ones((1, np.asarray(scores).shape[0])))
    n_pos = int(pos.sum())
    if n_pos == 0:
        return float("nan"), float("nan")
    tp = np.cumsum(np.add.reduceat(pos.astype(np.float64), starts))    # TP of score >= group score
    n_pred = np.cumsum(np.add.reduceat(np.ones(s.size), starts))
    f1 = 2 * tp / (n_pred + n_pos)
    k = int(np.argmax(f1))  # the first maximum: the largest threshold
    return float(s[starts[k]]), float(f1[k])


# -------------------------------------------------------------------------- bootstrap
def cluster_codes(clusters, n: int) -> np.ndarray:
    """Cluster ids (N,) (any sortable values; None: each row its own cluster) -> (N,)
    int64 codes 0..P-1 in sorted order of the ids."""
    if clusters is None:
        return np.arange(n, dtype=np.int64)
    clusters = np.asarray(clusters)
    if clusters.shape != (n,):
        raise ValueError(f"clusters has shape {clusters.shape}; expected ({n},), one id per row")
    return np.unique(clusters, return_inverse=True)[1].reshape(-1).astype(np.int64)


def cluster_weights(codes: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Row weights of bootstrap replicates: codes (N,) in 0..P-1, draws (R, P) drawn
    cluster numbers -> (R, N) float64, how many times each row's cluster was drawn."""
    r, p = draws.shape
    counts = np.bincount((draws + p * np.arange(r)[:, None]).ravel(), minlength=r * p).reshape(r, p)
    return counts[:, codes].astype(np.float64)


def bootstrap_metric(metric, scores: np.ndarray, labels: np.ndarray, clusters=None, *, n_boot: int = 1000,
                     seed: int = 0, columns=None, max_elems: int = 1 << 22) -> np.ndarray:
    """Per-label value of a weighted metric in every cluster-bootstrap replicate.

    Args:
        metric: ``metric(scores (N,), labels (N,), weights (R, N), column) -> (R,)`` (e.g.
            :func:`weighted_auroc` with the column ignored).
        scores, labels: (N, C) (labels in {0, 1, -1 = ignore}).
        clusters: (N,) the patient (subject_id) of each row; None resamples rows.
        columns: the label columns to compute (default all); the others stay NaN.
        max_elems: replicates are processed in chunks of about this many weights.
    Returns:
        (n_boot, C) float64; the draws depend only on (seed, number of clusters), so every
        metric of one seed sees the same replicates.
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    if scores.shape != labels.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape}: expected equal (N, C)")
    if n_boot < 1:
        raise ValueError(f"n_boot={n_boot}; expected >= 1")
    n, c = scores.shape
    codes = cluster_codes(clusters, n)
    p = int(codes.max()) + 1 if n else 0
    columns = range(c) if columns is None else columns
    rng = np.random.default_rng(seed)
    out = np.full((n_boot, c), np.nan)
    chunk = max(1, max_elems // max(1, n))
    for r0 in range(0, n_boot, chunk):
        draws = rng.integers(0, p, size=(min(chunk, n_boot - r0), p))
        w = cluster_weights(codes, draws)
        for j in columns:
            out[r0:r0 + w.shape[0], j] = metric(scores[:, j], labels[:, j], w, j)
    return out


def bootstrap_aurocs(scores: np.ndarray, labels: np.ndarray, clusters=None, *, n_boot: int = 1000,
                     seed: int = 0, columns=None, max_elems: int = 1 << 22) -> np.ndarray:
    """Per-label AUROC of every cluster-bootstrap replicate: (n_boot, C) float64, NaN where
    a replicate leaves a label without one class (see :func:`bootstrap_metric`)."""
    return bootstrap_metric(lambda s, y, w, j: weighted_auroc(s, y, w), scores, labels, clusters, n_boot=n_boot,
                            seed=seed, columns=columns, max_elems=max_elems)


def _nan_stats(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN replicates of tiny test sets
        return fn(*args, **kwargs)


def bootstrap_interval(per: np.ndarray, used, alpha: float = 0.05) -> dict:
    """Percentile intervals from bootstrap replicates per (n_boot, C): the macro (mean over
    the ``used`` columns, NaN ones left out per replicate) and every label.
    -> dict(macro=(lo, hi), per_label=[(lo, hi)] * C)."""
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    macro = _nan_stats(np.nanmean, per[:, used], axis=1)
    macro_ci = _nan_stats(np.nanpercentile, macro, q)
    label_ci = _nan_stats(np.nanpercentile, per, q, axis=0).T
    return dict(macro=tuple(float(v) for v in macro_ci), per_label=[tuple(map(float, r)) for r in label_ci])


def bootstrap_macro_auroc(scores: np.ndarray, labels: np.ndarray, clusters=None, *, n_boot: int = 1000,
                          seed: int = 0, alpha: float = 0.05, max_elems: int = 1 << 22) -> dict:
    """Percentile bootstrap interval of the macro and per-label AUROC, resampling clusters.

    Args:
        scores, labels: (N, C), one row per study.
        clusters: (N,) subject_id of each study (the patient bootstrap); None resamples
            studies. The macro mean of a replicate covers the labels defined on the full
            set; a label lacking a class in a replicate is left out of its mean.
    Returns:
        dict(macro=(lo, hi), per_label=[(lo, hi)] * C (NaN for undefined labels), n_boot,
        seed, alpha, n_clusters).
    """
    full, _ = macro_auroc(scores, labels)
    used = np.flatnonzero(~np.isnan(full))
    per = bootstrap_aurocs(scores, labels, clusters, n_boot=n_boot, seed=seed, columns=used,
                           max_elems=max_elems)
    n_clusters = int(cluster_codes(clusters, np.asarray(scores).shape[0]).max()) + 1
    return dict(**bootstrap_interval(per, used, alpha), n_boot=n_boot, seed=seed, alpha=alpha,
                n_clusters=n_clusters)


def _runs(scores) -> np.ndarray:
    """(N, C) or a sequence of K (N, C) score sets (seeds) -> (K, N, C) float64."""
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim not in (2, 3):
        raise ValueError(f"scores have shape {arr.shape}; expected (N, C) or (K runs, N, C)")
    return arr[None] if arr.ndim == 2 else arr


def paired_bootstrap(scores_a, scores_b, labels: np.ndarray, clusters=None, *, n_boot: int = 2000,
                     seed: int = 0, alpha: float = 0.05, max_elems: int = 1 << 22) -> dict:
    """Delta macro AUROC (B - A) of two methods on the same studies, with a paired
    cluster bootstrap: every replicate weights all runs' studies identically.

    Args:
        scores_a, scores_b: (N, C), or (K, N, C) for K runs of a method (seeds; the two
            sides may have different K): a side's macro AUROC is the mean over its runs.
            Rows are the same studies in the same order everywhere.
        labels: (N, C). clusters: (N,) subject_id per study (None: studies).
    Returns:
        dict(macro_a, macro_b, delta, ci=(lo, hi), p_value, per_label_delta (C,) list with
        None for undefined labels, n_boot, seed, alpha, n_clusters). The p-value is
        two-sided, from the bootstrap distribution shifted to the null (Hall & Wilson):
        (1 + #{|d*_r - d| >= |d|}) / (1 + R), where d is the observed delta.
    """
    runs_a, runs_b = _runs(scores_a), _runs(scores_b)
    if runs_a.shape[1:] != runs_b.shape[1:]:
        raise ValueError(f"scores_a {runs_a.shape[1:]} and scores_b {runs_b.shape[1:]}: expected the same studies")
    per_a = np.mean([macro_auroc(s, labels)[0] for s in runs_a], axis=0)
    per_b = np.mean([macro_auroc(s, labels)[0] for s in runs_b], axis=0)
    used = np.flatnonzero(~np.isnan(per_a))
    kw = dict(n_boot=n_boot, seed=seed, columns=used, max_elems=max_elems)  # same seed: same draws
    boot_a = np.mean([bootstrap_aurocs(s, labels, clusters, **kw) for s in runs_a], axis=0)
    boot_b = np.mean([bootstrap_aurocs(s, labels, clusters, **kw) for s in runs_b], axis=0)
    d_star = _nan_stats(np.nanmean, boot_b[:, used] - boot_a[:, used], axis=1)
    d_star = d_star[~np.isnan(d_star)]
    macro_a, macro_b = float(np.mean(per_a[used])), float(np.mean(per_b[used]))
    delta = macro_b - macro_a
    lo, hi = np.percentile(d_star, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    p = (1 + np.count_nonzero(np.abs(d_star - delta) >= abs(delta))) / (1 + d_star.size)
    per_delta = [None if np.isnan(x) else float(x) for x in per_b - per_a]
    return dict(macro_a=macro_a, macro_b=macro_b, delta=delta, ci=(float(lo), float(hi)), p_value=float(p),
                per_label_delta=per_delta, n_boot=n_boot, seed=seed, alpha=alpha, n_runs=(len(runs_a), len(runs_b)),
                n_clusters=int(cluster_codes(clusters, runs_a.shape[1]).max()) + 1)
