"""Warm vs fresh (SDC) resampling: balance of the curated sample on a long-tailed mixture.

    python bench/bench_curation_resampling.py            # 1,000 components, ~3 min on 2 cores
    python bench/bench_curation_resampling.py --quick    # 200 components, seconds

A Zipf(1.1) mixture of C Gaussian components (fastssl.curation.synthetic) is clustered
once at level 1 (k1 clusters of ~n / k1 points, no resampling, as paper 2's split level);
level 2 then clusters the k1 centroids into k in {C/3, C, 2C} clusters with 1, 2 or 10
k-means runs (0, 1 or 9 resampling steps, SDC's count) and each of the two resampling
initialisations: "warm" (Lloyd restarts from the current centroids) and "fresh" (a new
greedy k-means++ on the resampled subset, as SDC). From each two-level tree a balanced
sample of 10% of the points is drawn (hierarchical_sample, random inside level-1
clusters) and scored on the ground-truth components: normalised entropy H / ln C of the
sample's component counts and the number of components it covers. A uniform random
sample of the same size is the baseline. Figures averaged over --seeds seeds.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from fastssl.curation import HierarchicalTree, hierarchical_kmeans, hierarchical_sample
from fastssl.curation.synthetic import long_tailed_mixture


def component_balance(components: np.ndarray, n_components: int) -> tuple[float, int]:
    """(H / ln C of the component counts, number of components present)."""
    counts = np.bincount(components, minlength=n_components).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum() / np.log(n_components)), int((counts > 0).sum())


def run(n: int, d: int, comps: int, k1: int, seeds: list[int], iterations: int) -> list[dict]:
    rows = []
    for seed in seeds:
        x, comp, _ = long_tailed_mixture(n, d, comps, zipf_a=1.1, seed=seed)
        t0 = time.perf_counter()
        level1 = hierarchical_kmeans(x, [k1], iterations=iterations, seed=seed,
                                     progress=False).levels[0]
        level1_s = time.perf_counter() - t0
        target = n // 10
        rnd = np.random.default_rng(seed).choice(n, target, replace=False)
        rows.append({"seed": seed, "k": 0, "init": "random sample", "steps": 0,
                     **dict(zip(("entropy", "covered"), component_balance(comp[rnd], comps)))})
        for k in (comps // 3, comps, 2 * comps):
            for steps in (1, 2, 10):
                for init in (("warm", "fresh") if steps > 1 else ("fresh",)):
                    t0 = time.perf_counter()
                    level2 = hierarchical_kmeans(
                        level1.centroids, [k], iterations=iterations, resampling_steps=steps,
                        resample_level1=True, resampling_init=init, seed=seed,
                        progress=False).levels[0]
                    secs = time.perf_counter() - t0
                    tree = HierarchicalTree(levels=[level1, level2])
                    picked = hierarchical_sample(tree, target, seed=seed)
                    h, cov = component_balance(comp[picked], comps)
                    rows.append({"seed": seed, "k": k, "init": init if steps > 1 else "-",
                                 "steps": steps, "entropy": h, "covered": cov,
                                 "level2_s": round(secs, 2), "level1_s": round(level1_s, 2)})
    return rows


def table(rows: list[dict], comps: int) -> str:
    keys = sorted({(r["k"], r["steps"], r["init"]) for r in rows})
    lines = [f"| k (C = {comps}) | k-means runs (resampled) | init | sample H/lnC | "
             "covered components |", "|---|---|---|---|---|"]
    for k, steps, init in keys:
        sel = [r for r in rows if (r["k"], r["steps"], r["init"]) == (k, steps, init)]
        h = np.mean([r["entropy"] for r in sel])
        cov = np.mean([r["covered"] for r in sel])
        label = "random 10% sample" if k == 0 else str(k)
        runs = "-" if k == 0 else f"{steps} ({steps - 1})"
        lines.append(f"| {label} | {runs} | {init if k else '-'} | {h:.4f} | {cov:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 components, 12k points")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    comps, n, k1 = (200, 12_000, 1_600) if args.quick else (1000, 60_000, 8_000)
    t0 = time.perf_counter()
    rows = run(n, 16, comps, k1, list(range(args.seeds)), args.iterations)
    print(f"n={n} d=16 C={comps} k1={k1} iterations={args.iterations} seeds={args.seeds} "
          f"({time.perf_counter() - t0:.0f} s, {platform.processor() or platform.machine()})")
    print(table(rows, comps))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
