"""``fastssl compare RUN_A RUN_B``: is B's macro AUROC different from A's on the same studies?

Reads the two runs' ``scores.csv`` (written by ``fastssl probe`` and ``fastssl finetune``),
checks that they score the same test studies with the same targets and patients, and
reports delta = macro AUROC(B) - macro AUROC(A) with a paired patient-cluster bootstrap
interval and a two-sided p-value (fastssl.eval.stats.paired_bootstrap: every replicate
draws patients once and weights both runs' studies identically, so what the two runs
share cancels). Writes the result as JSON with ``--out``.
"""
from __future__ import annotations

import argparse
import logging
import os

import numpy as np

from fastssl.eval.report import read_scores_csv, write_json
from fastssl.eval.stats import paired_bootstrap

__all__ = ["compare_runs", "add_arguments", "run"]

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


def compare_runs(run_a: str, run_b: str, *, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Two run directories (or scores.csv files) -> the paired comparison dict (see
    fastssl.eval.stats.paired_bootstrap) plus run_a, run_b, n_studies, labels."""
    a, b = read_scores_csv(run_a), read_scores_csv(run_b)
    _check_same_studies(a, b)
    r = paired_bootstrap(a["scores"], b["scores"], a["labels"], a["subjects"], n_boot=n_boot, seed=seed,
                         alpha=alpha)
    r["per_label_delta"] = dict(zip(a["names"], r["per_label_delta"]))
    return dict(run_a=a["path"], run_b=b["path"], n_studies=int(a["studies"].size), **r)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_a", metavar="RUN_A", help="run directory (or scores.csv) of the reference, A")
    parser.add_argument("run_b", metavar="RUN_B", help="run directory (or scores.csv) compared with it, B")
    parser.add_argument("--n-boot", type=int, default=2000, help="paired bootstrap replicates over patients")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--alpha", type=float, default=0.05, help="1 - confidence level of the interval")
    parser.add_argument("--out", default="", help="write the result as JSON to this file")


def run(args: argparse.Namespace) -> int:
    if not 0 < args.alpha < 1:
        raise ValueError(f"--alpha {args.alpha}; expected in (0, 1)")
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
