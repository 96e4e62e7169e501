"""The report of a curation tree: balance metrics, report.json's content, the summary
printed at the end of ``fastssl curate``, and its PNG plots (matplotlib imported lazily).

Beside the tree it describes, so that any caller (the curate job, a notebook) can report
on a tree without importing the training layer.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fastssl.atomic import atomic_writer

__all__ = ["balance_metrics", "build_report", "summary_text", "size_histogram", "cluster_shares", "write_plots"]


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


def size_histogram(sizes: np.ndarray, bins: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Log-spaced histogram of cluster sizes that counts EVERY cluster.

    The last edge lies above the largest size (edges rounded at the maximum used to drop
    the largest cluster); empty clusters are counted in the first bin.
    Returns (counts (bins,), edges (bins + 1,)); counts.sum() == len(sizes).
    """
    sizes = np.maximum(np.asarray(sizes, dtype=np.float64), 1.0)
    top = max(2.0, float(sizes.max(initial=1.0))) * 1.001 + 1.0
    edges = np.logspace(0.0, np.log10(top), bins + 1)
    counts, _ = np.histogram(sizes, bins=edges)
    return counts, edges


def cluster_shares(tree, depth: int, indices: np.ndarray | None, seed: int = 0) -> dict:
    """Share of the full data, the curated sample and a random sample of the same size in
    every cluster of a level, clusters sorted by their size in the full data (largest
    first). Returns {"all": (k,), "curated": (k,), "random": (k,)} float64 arrays."""
    assign = np.asarray(tree.point_assignments(depth))
    k = tree.levels[depth - 1].k
    full = np.bincount(assign, minlength=k).astype(np.float64)
    order = np.argsort(-full, kind="stable")
    out = {"all": full[order] / full.sum()}
    if indices is not None and len(indices):
        cur = np.bincount(assign[indices], minlength=k).astype(np.float64)
        rnd_idx = np.random.default_rng(seed).choice(assign.shape[0], len(indices), replace=False)
        rnd = np.bincount(assign[rnd_idx], minlength=k).astype(np.float64)
        out["curated"] = cur[order] / cur.sum()
        out["random"] = rnd[order] / rnd.sum()
    return out


def write_plots(tree, out: Path, indices: np.ndarray | None = None, seed: int = 0) -> list[str]:
    """PNGs per level: cluster-size histogram (every cluster) and the sample's balance
    against the full data and a random sample. [] when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for depth in range(1, len(tree.levels) + 1):
        k = tree.levels[depth - 1].k
        counts, edges = size_histogram(tree.cluster_point_counts(depth))
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.stairs(counts, edges, fill=True)
        ax.set_xscale("log")
        ax.set_xlabel("points per cluster")
        ax.set_ylabel("clusters")
        ax.set_title(f"level {depth}: {int(counts.sum())} of k={k} clusters")
        written.append(_save(fig, plt, out / f"level_{depth}_sizes.png"))
        shares = cluster_shares(tree, depth, indices, seed)
        fig, ax = plt.subplots(figsize=(6, 4))
        rank = np.arange(1, k + 1)
        for name, style in (("all", "-"), ("random", ":"), ("curated", "--")):
            if name in shares:
                ax.plot(rank, np.maximum(shares[name], 1e-9), style,
                        label={"all": "full data", "random": "random sample",
                               "curated": "curated sample"}[name])
        ax.axhline(1.0 / k, color="grey", lw=0.8, label="uniform")
        ax.set_yscale("log")
        ax.set_xlabel("cluster (by size in the full data)")
        ax.set_ylabel("share of points")
        ax.set_title(f"level {depth}: balance of the sample")
        ax.legend(fontsize=8)
        written.append(_save(fig, plt, out / f"level_{depth}_balance.png"))
    return written


def _save(fig, plt, path: Path) -> str:
    with atomic_writer(path) as handle:
        fig.savefig(handle, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return str(path)
