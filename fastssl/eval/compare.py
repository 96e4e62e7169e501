"""``fastssl compare RUN_A RUN_B``: is B's macro AUROC different from A's on the same studies?

Reads the two runs' ``scores.csv`` (written by ``fastssl probe`` and ``fastssl finetune``),
checks that they score the same test studies with the same targets and patients, and
reports delta = macro AUROC(B) - macro AUROC(A) with a paired patient-cluster bootstrap
interval and a two-sided p-value (fastssl.eval.stats.paired_bootstrap: every replicate
draws patients once and weights both runs' studies identically, so what the two runs
share cancels). Writes the result as JSON with ``--out``.

:func:`seed_sign_flip_test` and :func:`seed_t_test` are the across-seeds companions: an
exact sign-flip permutation test and a paired t-test on per-seed deltas (one delta per
training seed), for claims that must hold over training randomness as well as over test
patients.
"""
from __future__ import annotations

import argparse
import logging
import math
import os

from dataclasses import dataclass

import numpy as np

from fastssl.config import COUNT, SEED, Range, add_dataclass_arguments, check_settings, setting
from fastssl.eval.report import read_scores_csv, write_json
from fastssl.eval.stats import paired_bootstrap

__all__ = ["compare_runs", "seed_sign_flip_test", "seed_t_test", "student_t_two_sided", "add_arguments", "run"]

log = logging.getLogger(__name__)


def _check_same_studies(a: dict, b: dict) -> None:
    where = f"{a['path']} and {b['path']}"
    if list(a["studies"]) != list(b["studies"]):
        only_a = sorted(set(a["studies"]) - set(b["studies"]))[:3]
        only_b = sorted(set(b["studies"]) - set(a["studies"]))[:3]
        raise ValueError(f"{where} score different studies (only in A e.g. {only_a}, only in B e.g. {only_b}); "
                         "a paired comparison needs the same test split")
    if a["names"] != b["names"]:
        raise ValueError(f"{where} have different labels: {a['names']} vs {b['names']}")
    if not np.array_equal(a["labels"], b["labels"]) or not np.array_equal(a["subjects"], b["subjects"]):
        raise ValueError(f"{where}: the same studies carry different targets or subjects "
                         "(another cache or label policy?)")


@dataclass(frozen=True)
class CompareConfig:
    """The settings of :func:`compare_runs` (``fastssl compare``'s flags, declared once)."""

    n_boot: int = setting(2000, range=COUNT)  # paired bootstrap replicates over patients
    seed: int = setting(0, range=SEED)  # bootstrap seed
    alpha: float = setting(0.05, range=Range(0, 1, low_open=True, high_open=True))  # 1 - confidence level of the interval

    def __post_init__(self) -> None:
        check_settings(self)


SETTINGS = CompareConfig   # the dataclass declaring this command's settings (fastssl.config)


def compare_runs(run_a: str, run_b: str, *, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Two run directories (or scores.csv files) -> the paired comparison dict (see
    fastssl.eval.stats.paired_bootstrap) plus run_a, run_b, n_studies, labels."""
    CompareConfig(n_boot=n_boot, seed=seed, alpha=alpha)   # bad settings fail before the files are read
    a, b = read_scores_csv(run_a), read_scores_csv(run_b)
    _check_same_studies(a, b)
    r = paired_bootstrap(a["scores"], b["scores"], a["labels"], a["subjects"], n_boot=n_boot, seed=seed,
                         alpha=alpha)
    r["per_label_delta"] = dict(zip(a["names"], r["per_label_delta"]))
    return dict(run_a=a["path"], run_b=b["path"], n_studies=int(a["studies"].size), **r)


def seed_sign_flip_test(deltas, *, max_seeds: int = 20) -> dict:
    """Exact two-sided sign-flip permutation test of mean(deltas) = 0.

    Under the null a seed's delta (B - A, both trained with that seed) is as likely
    positive as negative, so every one of the 2^K sign assignments is equally likely. The
    p-value is the fraction of assignments whose |mean| reaches the observed |mean|
    (the observed one included), so the smallest p is 2 / 2^K: 5 seeds cannot go below
    0.0625, 6 seeds reach 0.031.

    Args:
        deltas: (K,) per-seed differences, finite, 1 <= K <= max_seeds (2^K assignments).
    Returns:
        dict(mean, p_value, n_seeds, n_positive, min_p).
    """
    d = np.asarray(deltas, dtype=np.float64).reshape(-1)
    if not 1 <= d.size <= max_seeds:
        raise ValueError(f"{d.size} deltas; expected 1..{max_seeds} (one per seed)")
    if not np.isfinite(d).all():
        raise ValueError("deltas hold NaN or inf")
    k = d.size
    bits = (np.arange(1 << k)[:, None] >> np.arange(k)) & 1      # (2^K, K) every assignment
    sums = np.abs((1 - 2 * bits) @ d)
    observed = abs(d.sum())
    # sums equal to the observed one in exact arithmetic may differ in the last bits
    hits = np.count_nonzero(sums >= observed - 1e-12 * max(1.0, np.abs(d).sum()))
    return dict(mean=float(d.mean()), p_value=hits / (1 << k), n_seeds=k, n_positive=int((d > 0).sum()),
                min_p=2 / (1 << k) if k > 0 else 1.0)


def student_t_two_sided(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with an integer ``df`` >= 1, in closed form
    (Abramowitz & Stegun 26.7.3-4: with theta = atan(|t| / sqrt(df)), P(|T| < |t|) is a
    finite series in sin and cos of theta), so no special-function library is needed."""
    if df < 1 or int(df) != df:
        raise ValueError(f"df={df}; expected an integer >= 1")
    theta = math.atan(abs(t) / math.sqrt(df))
    sin, cos = math.sin(theta), math.cos(theta)
    if df % 2:  # odd: (2 / pi) (theta + sin (cos + 2/3 cos^3 + (2 4)/(3 5) cos^5 + ...))
        term, series = cos, 0.0
        for k in range(1, (df - 1) // 2 + 1):
            series += term
            term *= cos * cos * (2 * k) / (2 * k + 1)
        inside = 2 / math.pi * (theta + sin * series)
    else:       # even: sin (1 + 1/2 cos^2 + (1 3)/(2 4) cos^4 + ...)
        term, series = 1.0, 0.0
        for k in range(1, df // 2 + 1):
            series += term
            term *= cos * cos * (2 * k - 1) / (2 * k)
        inside = sin * series
    return min(1.0, max(0.0, 1.0 - inside))


def seed_t_test(deltas) -> dict:
    """Paired t-test of mean(deltas) = 0 over K >= 2 per-seed deltas (df = K - 1),
    two-sided -> dict(mean, t, p_value, n_seeds). All deltas equal: p = 0 unless they are 0."""
    d = np.asarray(deltas, dtype=np.float64).reshape(-1)
    if d.size < 2 or not np.isfinite(d).all():
        raise ValueError(f"deltas {d.tolist()}: expected >= 2 finite values (one per seed)")
    sd = float(d.std(ddof=1))
    if sd == 0:
        t = math.copysign(math.inf, d[0]) if d[0] else 0.0
        return dict(mean=float(d.mean()), t=t, p_value=0.0 if d[0] else 1.0, n_seeds=d.size)
    t = float(d.mean() / (sd / math.sqrt(d.size)))
    return dict(mean=float(d.mean()), t=t, p_value=student_t_two_sided(t, d.size - 1), n_seeds=d.size)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_a", metavar="RUN_A", help="run directory (or scores.csv) of the reference, A")
    parser.add_argument("run_b", metavar="RUN_B", help="run directory (or scores.csv) compared with it, B")
    add_dataclass_arguments(parser, CompareConfig)   # --n-boot, --seed, --alpha
    parser.add_argument("--out", default="", help="write the result as JSON to this file")


def run(args: argparse.Namespace) -> int:
    r = compare_runs(args.run_a, args.run_b, n_boot=args.n_boot, seed=args.seed, alpha=args.alpha)
    level = 100 * (1 - r["alpha"])
    print(f"compare: {r['n_studies']} studies, {r['n_clusters']} patients\n"
          f"  A {r['run_a']}: macro AUROC {r['macro_a']:.4f}\n"
          f"  B {r['run_b']}: macro AUROC {r['macro_b']:.4f}\n"
          f"  delta B - A {r['delta']:+.4f}  {level:.0f}% CI [{r['ci'][0]:+.4f}, {r['ci'][1]:+.4f}]  "
          f"p = {r['p_value']:.4f}  (paired bootstrap over patients, {r['n_boot']} replicates)")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        write_json(args.out, r)
    return 0
