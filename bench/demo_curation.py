"""Demonstration: hierarchical k-means curation flattens a long-tailed set.

    python bench/demo_curation.py                      # quick: 200k x 64, 500 components
    python bench/demo_curation.py --points 1000000 --dim 256 --components 1000 \\
        --levels 10000,1000,100 --iterations 10        # the README's size

1. A synthetic long-tailed mixture (fastssl.curation.synthetic): Zipf(a) component sizes
   in a few super-families, written to memory-mapped .npy shards.
2. hierarchical_kmeans over the shards (with resampling steps at levels 2+), then
   hierarchical_sample to --fraction of the points.
3. Component distribution of the curated subset against plain random sampling of the same
   size: normalised entropy H/ln(C) (1 = uniform), Gini, coverage.
4. The level-1 k-means objective against faiss.Kmeans with the same initial centroids and
   iterations (goal: within 1%), and seconds per Lloyd iteration for both.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--components", type=int, default=500)
    p.add_argument("--families", type=int, default=8)
    p.add_argument("--zipf-a", type=float, default=1.1)
    p.add_argument("--levels", default=None,
                   help="clusters per level (default: 4*components, components, components/10)")
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--resampling-steps", type=int, default=3)
    p.add_argument("--fraction", type=float, default=0.1, help="curated fraction of the points")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-faiss", action="store_true", help="skip the faiss comparison")
    p.add_argument("--workdir", default=None, help="where shards and the tree go (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)

    from fastssl.curation import KMeans, hierarchical_kmeans
    from fastssl.curation.sampling import hierarchical_sample
    from fastssl.curation.synthetic import long_tailed_mixture
    from fastssl.train.curate import balance_metrics

    c = args.components
    levels = [int(v) for v in args.levels.split(",")] if args.levels else \
        [4 * c, c, max(2, c // 10)]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fastssl_demo_"))
    t0 = time.perf_counter()
    paths, comp, fam = long_tailed_mixture(args.points, args.dim, c, zipf_a=args.zipf_a,
                                           families=args.families, seed=args.seed,
                                           dtype=args.dtype, out_dir=work / "emb")
    gen_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    tree = hierarchical_kmeans(paths, levels, iterations=args.iterations,
                               resampling_steps=args.resampling_steps, seed=args.seed,
                               output_dir=work / "tree", overwrite=True)
    tree_s = time.perf_counter() - t0
    target = int(round(args.fraction * args.points))
    curated = hierarchical_sample(tree, target, strategy="random", seed=args.seed)
    rnd = np.random.default_rng(args.seed).choice(args.points, target, replace=False)
    counts = {name: np.bincount(comp[idx], minlength=c) for name, idx in
              (("all data", np.arange(args.points)), ("random", rnd), ("curated", curated))}
    metrics = {name: balance_metrics(v) for name, v in counts.items()}

    figures: dict = {"args": vars(args), "levels": levels, "generate_s": round(gen_s, 1),
                     "tree_s": round(tree_s, 1), "steps": tree.meta["steps"],
                     "balance": metrics}
    print(f"\n{args.points:,} points x {args.dim} ({args.dtype}), {c} components, "
          f"Zipf a={args.zipf_a}, {args.families} families; levels {levels}, "
          f"{args.iterations} iterations, {args.resampling_steps} resampling steps")
    print(f"tree built in {tree_s:.1f}s; sample = {target:,} points ({args.fraction:.0%})\n")
    print(f"{'components in':<14} {'H/lnC':>7} {'Gini':>6} {'coverage':>9} {'min':>6} {'max':>8}")
    for name, m in metrics.items():
        print(f"{name:<14} {m['entropy_norm']:>7.3f} {m['gini']:>6.3f} {m['coverage']:>9.3f} "
              f"{m['min']:>6.0f} {m['max']:>8.0f}")

    if not args.no_faiss:
        import faiss

        x = np.concatenate([np.load(q) for q in paths]).astype(np.float32)
        k = levels[0]
        init = KMeans(k=k, iterations=0, seed=args.seed, progress=False).fit(x).centroids_
        km = KMeans(k=k, iterations=args.iterations, progress=False)
        t0 = time.perf_counter()
        km.fit(x, init_centroids=init)
        ours_it = (time.perf_counter() - t0) / max(1, args.iterations)
        fk = faiss.Kmeans(args.dim, k, niter=args.iterations, seed=args.seed,
                          max_points_per_centroid=1 << 30, verbose=False)
        t0 = time.perf_counter()
        fk.train(x, init_centroids=init)
        faiss_it = (time.perf_counter() - t0) / max(1, args.iterations)
        # both final centroid sets scored by the same exact assignment
        obj_ours = float(km.predict(x)[1].astype(np.float64).mean())
        obj_faiss = float(km.predict(x, centroids=fk.centroids)[1].astype(np.float64).mean())
        rel = (obj_ours - obj_faiss) / obj_faiss
        figures["kmeans_vs_faiss"] = {"k": k, "objective": obj_ours, "objective_faiss": obj_faiss,
                                      "relative_difference": rel, "s_per_iteration": ours_it,
                                      "s_per_iteration_faiss": faiss_it}
        print(f"\nlevel-1 k-means, k={k}, {args.iterations} iterations, same init:")
        print(f"{'':<10} {'objective':>12} {'s/iteration':>12}")
        print(f"{'fastssl':<10} {obj_ours:>12.5g} {ours_it:>12.3f}")
        print(f"{'faiss':<10} {obj_faiss:>12.5g} {faiss_it:>12.3f}")
        print(f"relative difference {rel:+.3%} (goal: within 1%); speed {faiss_it / ours_it:.2f}x faiss")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
