"""What an evaluation job leaves behind, shared by ``probe`` and ``finetune``.

* ``scores.csv``: one row per (test study, label): ``study, subject, label, score,
  target``. ``score`` is the study's logit (the mean over its images' logits), ``target``
  its label (1 positive, 0 negative, -1 ignored: uncertain or blank under the cache's
  label policy). Every metric of the job can be recomputed from it (``fastssl compare``).
* ``roc.png``: the ROC curve of every label that has both classes among the test studies.
* ``reliability.png``: the calibration (reliability) diagram of sigmoid(score), pooled
  over the labels with both classes.
* the summary dict of the job's JSON: macro AUROC, its patient-cluster bootstrap CI, and
  per label the AUROC, CI and class counts; then (:func:`metrics_summary`) AUPRC (average
  precision), F1 at the threshold chosen on validation (or on cross-validation folds) and
  the Brier score of sigmoid(score), macro and per label, each with a CI from the same
  patient draws.
"""
from __future__ import annotations

import csv
import logging
import os

import numpy as np

from fastssl.eval.stats import (
    best_f1_threshold, bootstrap_interval, bootstrap_macro_auroc, bootstrap_metric, macro_auroc, sigmoid,
    weighted_average_precision, weighted_brier, weighted_f1,
)

__all__ = ["study_table", "write_scores_csv", "write_json", "run_job", "read_scores_csv", "auroc_summary", "summary_lines",
           "roc_points", "plot_roc", "SCORES_COLUMNS", "f1_thresholds", "metrics_summary", "reliability_bins",
           "plot_reliability"]

log = logging.getLogger(__name__)

SCORES_COLUMNS = ("study", "subject", "label", "score", "target")


def study_table(dataset, study_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Study and subject ids of the studies in ``study_index`` (indices into
    ``dataset.study_ids`` of a SingleViewDataset) -> (study_ids (S,), subject_ids (S,)) str,
    for the sorted distinct study indices (the row order of ``study_logits``)."""
    uniq, first = np.unique(study_index, return_index=True)
    rows = dataset.rows[first]
    return np.asarray(dataset.study_ids)[uniq].astype(str), dataset.index.subject_id[rows].astype(str)


def write_scores_csv(path: str, studies, subjects, scores: np.ndarray, labels: np.ndarray,
                     names) -> None:
    """scores (S, C) float, labels (S, C) int -> ``path`` (long format, atomic rename)."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    if scores.shape != labels.shape or scores.shape != (len(studies), len(names)):
        raise ValueError(f"scores {scores.shape}, labels {labels.shape}: expected ({len(studies)}, {len(names)})")
    import io

    from fastssl.jobs import atomic_write_text

    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(SCORES_COLUMNS)
    for i, (study, subject) in enumerate(zip(studies, subjects)):
        for j, name in enumerate(names):
            writer.writerow([study, subject, name, repr(float(scores[i, j])), int(labels[i, j])])
    atomic_write_text(path, text.getvalue())


def run_job(main, cfg) -> dict | None:
    """``main(cfg)``, a ValueError or DataError logged as one line and giving None.

    Deprecated: commands let user errors reach the CLI router (fastssl.cli), which prints them
    in one format; this stays for one release for code that called it."""
    import warnings

    from fastssl.errors import DataError

    warnings.warn("fastssl.eval.report.run_job is deprecated: call main(cfg) and let fastssl.cli "
                  "report user errors", DeprecationWarning, stacklevel=2)

    try:
        return main(cfg)
    except (ValueError, DataError) as exc:
        log.error("%s", exc)
        return None


def write_json(path: str, obj: dict) -> None:
    """obj as indented JSON at ``path`` (temporary name, then rename; fastssl.jobs)."""
    from fastssl.jobs import atomic_write_json

    atomic_write_json(path, obj)


def read_scores_csv(path: str) -> dict:
    """``scores.csv`` -> dict(studies (S,), subjects (S,), names (C,), scores (S, C) float64,
    labels (S, C) int64), studies sorted by id. Raises ValueError naming the file when a
    column is missing or a (study, label) cell is absent or repeated."""
    if os.path.isdir(path):
        path = os.path.join(path, "scores.csv")
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as exc:
        raise ValueError(f"{path}: cannot read scores ({exc.strerror})") from None
    if not rows or set(SCORES_COLUMNS) - set(rows[0]):
        raise ValueError(f"{path}: expected a CSV with columns {list(SCORES_COLUMNS)}")
    studies = sorted({r["study"] for r in rows})
    names = list(dict.fromkeys(r["label"] for r in rows))
    s_pos, n_pos = {s: i for i, s in enumerate(studies)}, {n: j for j, n in enumerate(names)}
    scores = np.full((len(studies), len(names)), np.nan)
    labels = np.zeros((len(studies), len(names)), dtype=np.int64)
    subjects = [""] * len(studies)
    seen = np.zeros(scores.shape, dtype=np.int64)
    for r in rows:
        i, j = s_pos[r["study"]], n_pos[r["label"]]
        scores[i, j], labels[i, j], subjects[i] = float(r["score"]), int(r["target"]), r["subject"]
        seen[i, j] += 1
    if (seen != 1).any():
        raise ValueError(f"{path}: every (study, label) must appear once; "
                         f"{int((seen == 0).sum())} missing, {int((seen > 1).sum())} repeated")
    return dict(studies=np.array(studies), subjects=np.array(subjects), names=names, scores=scores,
                labels=labels, path=path)


def auroc_summary(scores: np.ndarray, labels: np.ndarray, subjects, names, *, n_boot: int,
                  seed: int) -> dict:
    """Macro and per-label AUROC with patient-cluster bootstrap CIs (subjects (S,))."""
    per, macro = macro_auroc(scores, labels)
    ci = bootstrap_macro_auroc(scores, labels, subjects, n_boot=n_boot, seed=seed)
    return dict(
        n_test_studies=int(scores.shape[0]), n_test_subjects=ci["n_clusters"],
        macro_auroc=macro, macro_ci=list(ci["macro"]), ci_level=1 - ci["alpha"],
        ci_method=f"percentile bootstrap over subjects (patients), {n_boot} replicates, seed {seed}",
        labels_used=[n for n, a in zip(names, per) if not np.isnan(a)],
        per_label={n: dict(auroc=None if np.isnan(a) else float(a),
                           ci=None if np.isnan(a) else list(ci["per_label"][j]),
                           n_pos=int((labels[:, j] == 1).sum()), n_neg=int((labels[:, j] == 0).sum()))
                   for j, (n, a) in enumerate(zip(names, per))})


def f1_thresholds(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per label, the score threshold maximising F1 on (validation or out-of-fold) study
    scores (S, C) -> (C,) float64, NaN for a label without positives there."""
    return np.array([best_f1_threshold(scores[:, j], labels[:, j])[0] for j in range(scores.shape[1])])


_METRICS = {  # name -> weighted metric(scores (N,), labels (N,), weights (R, N), thresholds, column) -> (R,)
    "auprc": lambda s, y, w, t, j: weighted_average_precision(s, y, w),
    "f1": lambda s, y, w, t, j: weighted_f1(s, y, w, t[j]),
    "brier": lambda s, y, w, t, j: weighted_brier(s, y, w),
}


def metrics_summary(scores: np.ndarray, labels: np.ndarray, subjects, names, *, thresholds: np.ndarray,
                    threshold_source: str, n_boot: int, seed: int, alpha: float = 0.05) -> dict:
    """AUPRC, F1 at ``thresholds`` and Brier score, macro (over the labels with both classes
    among the test studies, as the AUROC) and per label, with percentile CIs from the same
    patient bootstrap draws as auroc_summary's (same seed).

    Args: scores, labels (S, C) test studies; subjects (S,); thresholds (C,) score
        thresholds (NaN: no F1 for that label); threshold_source: where they were chosen.
    Returns: dict(macro_auprc, macro_auprc_ci, macro_f1, macro_f1_ci, macro_brier,
        macro_brier_ci, f1_threshold_source, per_label_metrics={name: {auprc, auprc_ci, f1,
        f1_ci, f1_threshold, brier, brier_ci}}), None for undefined values.
    """
    per_auc, _ = macro_auroc(scores, labels)
    used = np.flatnonzero(~np.isnan(per_auc))
    ones = np.ones((1, scores.shape[0]))
    out: dict = dict(f1_threshold_source=threshold_source)
    per_label = {n: dict(f1_threshold=None if np.isnan(t) else float(t)) for n, t in zip(names, thresholds)}
    for key, metric in _METRICS.items():
        full = np.array([metric(scores[:, j], labels[:, j], ones, thresholds, j)[0] for j in range(len(names))])
        boot = bootstrap_metric(lambda s, y, w, j: metric(s, y, w, thresholds, j), scores, labels, subjects,  # noqa: B023
                                n_boot=n_boot, seed=seed, columns=used)
        ci = bootstrap_interval(boot, used, alpha)
        defined = [j for j in used if not np.isnan(full[j])]
        out[f"macro_{key}"] = float(np.mean(full[defined])) if defined else None
        out[f"macro_{key}_ci"] = list(ci["macro"]) if defined else None
        for j, name in enumerate(names):
            ok = j in used and not np.isnan(full[j])
            per_label[name].update({key: float(full[j]) if ok else None,
                                    f"{key}_ci": list(ci["per_label"][j]) if ok else None})
    out["per_label_metrics"] = per_label
    return out


def reliability_bins(scores: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> dict:
    """Calibration table of sigmoid(scores) over the valid entries (labels >= 0) of any
    shape: equal-width probability bins [k/n, (k+1)/n) (the last closed) -> dict(
    mean_predicted (n_bins,), observed (n_bins,) fraction positive, count (n_bins,)),
    NaN for empty bins."""
    labels = np.asarray(labels).ravel()
    valid = labels >= 0
    p, y = sigmoid(np.asarray(scores).ravel()[valid]), labels[valid].astype(np.float64)
    k = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(k, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(k, weights=p, minlength=n_bins) / count
        observed = np.bincount(k, weights=y, minlength=n_bins) / count
    return dict(mean_predicted=mean_p, observed=observed, count=count)


def plot_reliability(path: str, scores: np.ndarray, labels: np.ndarray, names, title: str = "",
                     n_bins: int = 10) -> str | None:
    """Reliability diagram of sigmoid(score) pooled over the labels with both classes
    (observed positive fraction against mean predicted probability per bin, marker area
    ~ count; the diagonal is perfect calibration) over a histogram of the predictions.
    Writes ``path`` (PNG, atomic rename); None (and a warning) without matplotlib."""
    plt = _pyplot(path)
    if plt is None:
        return None
    per, _ = macro_auroc(scores, labels)
    used = ~np.isnan(per)
    bins = reliability_bins(scores[:, used], labels[:, used], n_bins)
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw=dict(height_ratios=(3, 1)))
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1, label="perfect calibration")
    ok = bins["count"] > 0
    ax.plot(bins["mean_predicted"][ok], bins["observed"][ok], "o-", color="C0", label=f"{int(used.sum())} labels pooled")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="observed positive fraction",
           title=f"{title + ': ' if title else ''}reliability ({n_bins} bins)")
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    edges = np.linspace(0, 1, n_bins + 1)
    hist.bar(edges[:-1], bins["count"], width=1 / n_bins, align="edge", color="C0", alpha=0.5)
    hist.set(xlabel="predicted probability (sigmoid of the study score)", ylabel="count")
    _save_png(fig, path)
    return path


def _pyplot(path: str):
    """matplotlib.pyplot with the Agg backend, or None (and a warning naming ``path``)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no %s (pip install 'fastssl[plots]')", path)
        return None
    return plt


def _save_png(fig, path: str) -> None:
    import io

    import matplotlib.pyplot as plt

    from fastssl.jobs import atomic_write_bytes

    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())


def summary_lines(r: dict) -> list[str]:
    """The printed part of an auroc_summary: macro line with CI, one line per used label."""
    lines = [f"  macro AUROC {r['macro_auroc']:.4f}  {100 * r['ci_level']:.0f}% CI "
             f"[{r['macro_ci'][0]:.4f}, {r['macro_ci'][1]:.4f}] over {len(r['labels_used'])} labels "
             f"(bootstrap over {r['n_test_subjects']} patients)"]
    if r.get("macro_auprc") is not None:
        def fmt(key):
            v, ci = r[f"macro_{key}"], r[f"macro_{key}_ci"]
            return "n/a" if v is None else f"{v:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]"

        lines.append(f"  macro AUPRC {fmt('auprc')}, F1 {fmt('f1')} (thresholds from {r['f1_threshold_source']}), "
                     f"Brier {fmt('brier')}")
    for name, v in r["per_label"].items():
        if v["auroc"] is not None:
            lines.append(f"  {name:<28s} {v['auroc']:.4f}  [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]  "
                         f"(+{v['n_pos']} / -{v['n_neg']})")
    return lines


def roc_points(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve of one label: scores (N,), labels (N,) in {0, 1, -1 = ignore} ->
    (fpr, tpr), from (0, 0) to (1, 1), one point per distinct score (tied scores move
    diagonally, so the trapezoid area equals the AUROC with ties counted 1/2)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    keep = labels >= 0
    s, y = scores[keep], labels[keep] == 1
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.concatenate([s[1:] != s[:-1], [True]])  # the last row of each tie group
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    n_pos, n_neg = max(1, int(y.sum())), max(1, int((~y).sum()))
    return np.concatenate([[0.0], fp / n_neg]), np.concatenate([[0.0], tp / n_pos])


def plot_roc(path: str, scores: np.ndarray, labels: np.ndarray, names, title: str = "") -> str | None:
    """The ROC curve of every label with both classes, on one axes, the legend giving each
    label's AUROC and positives. Writes ``path`` (PNG, atomic rename) and returns it; None
    (and a warning) without matplotlib."""
    plt = _pyplot(path)
    if plt is None:
        return None
    per, macro = macro_auroc(scores, labels)
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    cycle = plt.get_cmap("tab20").colors
    for k, j in enumerate(j for j in range(len(names)) if not np.isnan(per[j])):
        fpr, tpr = roc_points(scores[:, j], labels[:, j])
        ax.plot(fpr, tpr, lw=1.3, color=cycle[k % len(cycle)],
                label=f"{names[j]}  {per[j]:.3f} (+{int((labels[:, j] == 1).sum())})")
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), aspect="equal", xlabel="false positive rate", ylabel="true positive rate",
           title=f"{title + ': ' if title else ''}macro AUROC {macro:.3f}")
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False, title="label  AUROC (+pos)")
    fig.subplots_adjust(left=0.08, right=0.62, bottom=0.1, top=0.92)
    _save_png(fig, path)
    return path
