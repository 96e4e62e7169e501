"""Paper 2's tree T1 end to end, scaled to fit the 2-core box: time, points/s, peak memory.

    python bench/bench_curation_t1.py --scale 1000 --dim 128     # 350k points, ~minutes

Runs ``fastssl curate --config fastssl/configs/paper2_T1.yaml`` in a child process on
350M / scale points (fp16 shards of a Zipf mixture) with T1's structure kept where the
scale allows: level 1 = 100k / scale clusters, each split into 35 (about 100 points per
level-1 cluster, as at full scale), 50 iterations, split best of 10, steps [1, 10, 10, 10],
closest, fresh resampling; the upper levels keep T1's ratio of ~10-100 inputs per cluster
(35k -> 350 -> 62 cannot all shrink by the same factor). Peak memory is the child's
ru_maxrss (one rank). Prints one JSON line: seconds per step, points/s and the peak.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fastssl.curation.synthetic import long_tailed_mixture

T1_POINTS = 350_000_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=1000, help="points = 350M / scale")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--split-inits", type=int, default=10)
    parser.add_argument("--memory-budget-mb", type=float, default=64.0)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    n = T1_POINTS // args.scale
    k1 = max(2, 100_000 // args.scale)
    k2 = max(4, k1 * 35 // 10)
    levels = [k1, k2, max(2, k2 // 10), max(2, k2 // 60)]
    root = Path(args.workdir or tempfile.mkdtemp(prefix="t1_"))
    t0 = time.perf_counter()
    paths, _, _ = long_tailed_mixture(n, args.dim, max(10, n // 1000), dtype="float16",
                                      out_dir=root / "emb", shard_rows=1 << 20)
    gen_s = time.perf_counter() - t0
    config = Path(__file__).resolve().parents[1] / "fastssl" / "configs" / "paper2_T1.yaml"
    command = [sys.executable, "-m", "fastssl", "curate", "--config", str(config),
               "--data", *map(str, paths), "--out", str(root / "out"),
               "--levels", ",".join(map(str, levels)), "--iterations", str(args.iterations),
               "--split-inits", str(args.split_inits), "--sample-size", "null,5,5,3",
               "--memory-budget-mb", str(args.memory_budget_mb), "--overwrite", "--quiet"]
    t0 = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - t0
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    tree = json.loads((root / "out" / "tree" / "tree.json").read_text())
    steps = tree["meta"]["steps"]
    level1 = sum(s["seconds"] for s in steps if s["level"] == 1)
    print(json.dumps({
        "points": n, "dim": args.dim, "levels": levels, "split_k": 35,
        "iterations": args.iterations, "split_inits": args.split_inits,
        "memory_budget_mb": args.memory_budget_mb, "data_mib": round(n * args.dim * 2 / 2**20, 1),
        "generate_s": round(gen_s, 1), "wall_s": round(wall, 1), "level1_s": round(level1, 1),
        "points_per_s_level1": round(n / level1), "peak_rss_mib": round(peak_mib, 1),
        "steps": steps,
    }))


if __name__ == "__main__":
    main()
