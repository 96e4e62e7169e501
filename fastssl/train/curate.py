"""``fastssl curate``: hierarchical k-means tree, balanced sample and a report.

Files in ``--out``:
    tree/                  the HierarchicalTree (plain .npy levels, memory-mapped), its
                           progress.json and per-step checkpoints while running
    curated_indices.npy    (target,) int64 rows of the data chosen by hierarchical_sample
    report.json            cluster-size distributions per level, balance metrics (normalised
                           entropy, Gini) of the tree and of the sample, ground-truth group
                           coverage when --labels is given, timings
    plots/*.png            cluster-size histograms and group distributions (only when
                           matplotlib is importable)

Rerunning the same command resumes the tree where it stopped (finished levels and steps
are skipped); a different tree config is refused unless --overwrite.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["add_arguments", "run", "balance_metrics", "build_report", "summary_text"]


def _levels(value) -> list[int]:
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    try:
        return [int(v) for v in str(value).replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--levels {value!r}: expected e.g. 10000,1000,100") from None


def _target(value) -> float:
    v = float(value)
    if v < 0:
        raise argparse.ArgumentTypeError(f"--target-size {value}: must be >= 0")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    bool_flag = argparse.BooleanOptionalAction
    # not required=True: the router's pre-pass would reject a --data given by --config
    parser.add_argument("--data", nargs="+", default=None,
                        help="(required) embeddings: .npy shard paths, a directory of them, or a glob")
    parser.add_argument("--out", default="runs/curate", help="output directory")
    parser.add_argument("--levels", type=_levels, default=[1000, 100, 10],
                        help="clusters per level, finest first, e.g. 10000,1000,100,10")
    parser.add_argument("--iterations", type=int, default=20, help="Lloyd iterations per k-means run")
    parser.add_argument("--split-k", type=int, default=None,
                        help="split every level-1 cluster into this many sub-clusters")
    parser.add_argument("--split-iterations", type=int, default=None,
                        help="Lloyd iterations of the split (default: --iterations)")
    parser.add_argument("--resampling-steps", type=int, default=0,
                        help="resampling steps of levels 2+ (the paper uses 10)")
    parser.add_argument("--resample-level1", action=bool_flag, default=False,
                        help="also run the resampling steps at level 1")
    parser.add_argument("--sample-size", type=int, default=None,
                        help="inputs per cluster in a resampling step (default: half the mean size)")
    parser.add_argument("--sampling-strategy", choices=("random", "closest"), default="random",
                        help="which inputs a resampling step takes per cluster")
    parser.add_argument("--init", choices=("kmeans++", "random"), default="kmeans++",
                        help="initialisation of each level's k-means")
    parser.add_argument("--init-sample-size", type=int, default=None,
                        help="points the k-means++ initialisation runs on (default max(2k, 16384))")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    parser.add_argument("--memory-budget-mb", type=float, default=512.0,
                        help="RAM for one streamed block of rows")
    parser.add_argument("--fp64-accumulate", action=bool_flag, default=True,
                        help="accumulate centroid sums in float64")
    parser.add_argument("--impl", choices=("auto", "cpu", "cuda", "torch"), default="auto",
                        help="assignment engine (fastssl.kmeans.assign)")
    parser.add_argument("--nonfinite", choices=("raise", "skip"), default="raise",
                        help="rows with NaN/inf: stop with an error, or leave them out")
    parser.add_argument("--overwrite", action=bool_flag, default=False,
                        help="replace a tree of a different config found in --out")
    parser.add_argument("--target-size", type=_target, default=0.1,
                        help="points to keep: a count, or a fraction of the points if < 1; 0 = no sample")
    parser.add_argument("--sample-strategy", choices=("random", "closest", "furthest"),
                        default="random", help="points taken inside a level-1 cluster")
    parser.add_argument("--labels", default=None,
                        help="optional (n,) integer .npy of ground-truth groups for the report")


# ------------------------------------------------------------------ metrics
def balance_metrics(counts: np.ndarray) -> dict:
    """Balance of a distribution of counts over groups (zeros included).

    Returns normalised entropy H/ln(G) (1 = uniform), Gini (0 = uniform), coverage
    (fraction of groups with any count), and size quantiles.
    """
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    g = c.shape[0]
    if total <= 0 or g == 0:
        return {"groups": int(g), "total": 0, "entropy_norm": 0.0, "gini": 0.0, "coverage": 0.0}
    p = c[c > 0] / total
    entropy = float(-(p * np.log(p)).sum())
    srt = np.sort(c)
    gini = float((2 * np.arange(1, g + 1) - g - 1).dot(srt) / (g * srt.sum()))
    q = np.quantile(c, [0, 0.1, 0.5, 0.9, 1.0])
    return {
        "groups": int(g), "total": int(total),
        "entropy_norm": entropy / np.log(g) if g > 1 else 1.0,
        "gini": gini, "coverage": float((c > 0).mean()),
        "min": float(q[0]), "p10": float(q[1]), "median": float(q[2]), "p90": float(q[3]),
        "max": float(q[4]), "mean": float(c.mean()),
    }


def build_report(tree, indices: np.ndarray | None, labels: np.ndarray | None,
                 point_ids: np.ndarray | None = None, seed: int = 0) -> dict:
    """Per-level cluster-size balance, sample balance and ground-truth group coverage.

    Args:
        tree: HierarchicalTree. indices: tree point indices of the sample (or None).
        labels: (n_data,) ground-truth group of every data row (or None).
        point_ids: tree point -> data row (when non-finite rows were left out).
    """
    report: dict = {"n_points": tree.n_points, "dim": tree.dim, "levels": []}
    for depth in range(1, len(tree.levels) + 1):
        sizes = tree.cluster_point_counts(depth)
        entry = {"level": depth, "k": tree.levels[depth - 1].k, "sizes": balance_metrics(sizes)}
        if indices is not None:
            assign = tree.point_assignments(depth)
            entry["sample"] = balance_metrics(np.bincount(assign[indices], minlength=sizes.shape[0]))
        report["levels"].append(entry)
    if indices is not None:
        report["sample_size"] = int(indices.shape[0])
    if labels is not None:
        lab = np.asarray(labels)
        if point_ids is not None:
            lab = lab[point_ids]
        if lab.shape[0] != tree.n_points:
            raise ValueError(f"--labels has {lab.shape[0]} entries but the tree has "
                             f"{tree.n_points} points")
        _, inv = np.unique(lab, return_inverse=True)
        groups = int(inv.max()) + 1
        gt = {"groups": groups, "all": balance_metrics(np.bincount(inv, minlength=groups))}
        if indices is not None:
            gt["curated"] = balance_metrics(np.bincount(inv[indices], minlength=groups))
            rnd = np.random.default_rng(seed).choice(tree.n_points, indices.shape[0], replace=False)
            gt["random"] = balance_metrics(np.bincount(inv[rnd], minlength=groups))
        report["ground_truth"] = gt
    return report


def summary_text(report: dict) -> str:
    lines = [f"curation: {report['n_points']:,} points, d={report['dim']}"]
    lines.append(f"{'level':>5} {'k':>8} {'min':>7} {'median':>8} {'max':>9} {'H/lnK':>6} "
                 f"{'Gini':>5} | sample {'H/lnK':>6} {'Gini':>5}")
    for e in report["levels"]:
        s = e["sizes"]
        row = (f"{e['level']:>5} {e['k']:>8,} {s['min']:>7.0f} {s['median']:>8.0f} "
               f"{s['max']:>9.0f} {s['entropy_norm']:>6.3f} {s['gini']:>5.2f}")
        if "sample" in e:
            row += f" |        {e['sample']['entropy_norm']:>6.3f} {e['sample']['gini']:>5.2f}"
        lines.append(row)
    if "sample_size" in report:
        lines.append(f"sample: {report['sample_size']:,} points")
    gt = report.get("ground_truth")
    if gt:
        lines.append(f"ground truth: {gt['groups']} groups")
        for name in ("all", "random", "curated"):
            if name in gt:
                m = gt[name]
                lines.append(f"  {name:>8}: H/lnG {m['entropy_norm']:.3f}  Gini {m['gini']:.3f}  "
                             f"coverage {m['coverage']:.3f}")
    return "\n".join(lines)


def write_plots(report: dict, tree, out: Path, labels=None, indices=None) -> list[str]:
    """PNG cluster-size histograms per level; [] when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for depth in range(1, len(tree.levels) + 1):
        sizes = tree.cluster_point_counts(depth)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.hist(np.maximum(sizes, 1), bins=np.logspace(0, np.log10(max(2, sizes.max())), 40))
        ax.set_xscale("log")
        ax.set_xlabel("points per cluster")
        ax.set_ylabel("clusters")
        ax.set_title(f"level {depth}: k={tree.levels[depth - 1].k}")
        path = out / f"level_{depth}_sizes.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(str(path))
    return written


# ------------------------------------------------------------------ the job
def _load_labels(path: str) -> np.ndarray:
    from fastssl.errors import DataError

    try:
        labels = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(path, f"cannot load labels ({exc})") from None
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(path, f"expected a 1-D integer array, got {labels.dtype} {labels.shape}")
    return labels


def run(args: argparse.Namespace) -> int:
    from fastssl import distributed as dist
    from fastssl.curation.hierarchical import hierarchical_kmeans
    from fastssl.curation.tree import save_npy_atomic, write_text_atomic
    from fastssl.errors import DataError

    if not args.data:
        log.error("--data is required (a flag or the 'data' key of --config)")
        return 2
    levels = _levels(args.levels)
    out = Path(args.out)
    dist.init()
    t0 = time.perf_counter()
    quiet = getattr(args, "quiet", False)
    log.info("curate: levels %s, split_k %s, %d iterations, %d resampling steps, budget %.0f MiB",
             levels, args.split_k, args.iterations, args.resampling_steps, args.memory_budget_mb)
    try:
        tree = hierarchical_kmeans(
            args.data, levels, output_dir=out / "tree", overwrite=args.overwrite,
            iterations=args.iterations, split_k=args.split_k,
            split_iterations=args.split_iterations, resampling_steps=args.resampling_steps,
            resample_level1=args.resample_level1, sample_size=args.sample_size,
            sampling_strategy=args.sampling_strategy, init=args.init,
            init_sample_size=args.init_sample_size, seed=args.seed,
            memory_budget_mb=args.memory_budget_mb, fp64_accumulate=args.fp64_accumulate,
            impl=args.impl, nonfinite=args.nonfinite,
            progress=None if not quiet else False,
        )
    except (ValueError, DataError) as exc:
        log.error("%s", exc)
        return 2
    tree_s = time.perf_counter() - t0
    if not dist.is_main():
        return 0
    point_ids = None
    if tree.meta.get("point_ids"):
        point_ids = np.load(out / "tree" / tree.meta["point_ids"])
    target = float(args.target_size)
    n_target = int(round(target * tree.n_points)) if 0 < target < 1 else int(target)
    indices = None
    if n_target > 0:
        from fastssl.curation.sampling import hierarchical_sample

        indices = np.asarray(hierarchical_sample(tree, n_target, strategy=args.sample_strategy,
                                                 seed=args.seed), dtype=np.int64)
        rows = indices if point_ids is None else point_ids[indices]
        save_npy_atomic(out / "curated_indices.npy", np.sort(rows).astype(np.int64))
    try:
        labels = _load_labels(args.labels) if args.labels else None
        report = build_report(tree, indices, labels, point_ids, seed=args.seed)
    except (ValueError, DataError) as exc:
        log.error("%s", exc)
        return 2
    report["seconds"] = {"tree": round(tree_s, 2), "total": round(time.perf_counter() - t0, 2)}
    report["steps"] = tree.meta.get("steps", [])
    report["plots"] = write_plots(report, tree, out / "plots")
    if not report["plots"]:
        report["plots_note"] = "matplotlib is not importable: no PNG plots"
    write_text_atomic(out / "report.json", json.dumps(report, indent=1))
    print(summary_text(report), file=sys.stdout)
    print(f"wrote {out / 'tree'}, {out / 'report.json'}"
          + (f", {out / 'curated_indices.npy'}" if indices is not None else ""))
    return 0
