"""Paper 2's tree T1 end to end, scaled to fit the 2-core box: time, points/s, peak memory.

    python bench/bench_curation_t1.py --scale 1000 --dim 128     # 350k points, ~minutes

Runs ``fastssl curate --config fastssl/configs/paper2_T1.yaml`` in a child process on
350M / scale points (fp16 shards of a Zipf mixture) with T1's structure kept where the
scale allows: level 1 = 100k / scale clusters, each split into 35 (about 100 points per
level-1 cluster, as at full scale), 50 iterations, split best of 10, steps [1, 10, 10, 10],
closest, fresh resampling; the upper levels keep T1's ratio of ~10-100 inputs per cluster
(35k -> 350 -> 62 cannot all shrink by the same factor). ``--ranks R`` runs R gloo ranks
on this machine, as torchrun would; every rank's peak memory (its own ru_maxrss) is
reported, rank 0 (which gathers the k-means++ sample and writes every result) apart from
the others. Prints one JSON line: seconds per step, points/s and the peaks.

    python bench/bench_curation_t1.py --scale 3500 --dim 16 --ranks 2 --iterations 5 \
        --split-inits 1          # the memory measurement of bench/RESULTS.md (~1 min)
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fastssl.curation.synthetic import long_tailed_mixture

T1_POINTS = 350_000_000
# One rank: `python -m fastssl ...` that writes its own peak RSS (KiB) to argv[1] at exit.
_RANK = ("import atexit, resource, runpy, sys; out = sys.argv.pop(1); "
         "atexit.register(lambda: open(out, 'w').write(str(resource.getrusage("
         "resource.RUSAGE_SELF).ru_maxrss))); sys.argv[0] = 'fastssl'; "
         "runpy.run_module('fastssl', run_name='__main__')")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(command: list[str], ranks: int, workdir: Path) -> list[float]:
    """Runs ``fastssl`` + command on ``ranks`` gloo ranks; returns each rank's peak MiB."""
    port, procs, peaks = _free_port(), [], [workdir / f"peak_rank{r}.txt" for r in range(ranks)]
    for r in range(ranks):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(ranks), LOCAL_RANK=str(r),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        if ranks == 1:
            for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(name)
        procs.append(subprocess.Popen([sys.executable, "-c", _RANK, str(peaks[r]), *command],
                                      env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"bench_curation_t1: a rank failed (exit codes {codes})")
    return [round(int(p.read_text()) / 1024, 1) for p in peaks]


def projected_peak_gib(n: int, d: int, k1: int, world: int, budget_mb: float,
                       split_k: int = 35, per_centroid: int = 20, base_gib: float = 0.6):
    """(main rank, every other rank): a model of the host arrays each phase of a
    T1-shaped run holds at once (float16 rows), for the projection in bench/RESULTS.md.

    Lloyd: one streamed block (the budget) and the centroids with their float64 sums;
    k-means++ (main): the gathered sample and its float32 copy; predict (main): labels
    and distances gathered; split (all): parent labels, their argsort and its temporary,
    one batch (the budget); assembly (main): the sub-centroids, labels, distances, order.
    ``base_gib``: Python, torch and the extension (measured 0.53-0.64 GiB at small n).
    """
    budget = budget_mb * 2**20
    sample = max(per_centroid * k1, 16384)
    lloyd = budget + k1 * d * 16 + n / world * 12
    init_main = sample * d * (2 + 4)
    gather_main = n * 12 * 2
    split = n * 8 * 3 + budget
    assemble_main = k1 * split_k * d * 4 + n * 20
    main = max(lloyd, init_main, gather_main, split + assemble_main)
    other = max(lloyd, split)
    return round(base_gib + main / 2**30, 1), round(base_gib + other / 2**30, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=1000, help="points = 350M / scale")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--split-inits", type=int, default=10)
    parser.add_argument("--memory-budget-mb", type=float, default=64.0)
    parser.add_argument("--ranks", type=int, default=1, help="gloo ranks on this machine")
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
    command = ["curate", "--config", str(config),
               "--data", *map(str, paths), "--out", str(root / "out"),
               "--levels", ",".join(map(str, levels)), "--iterations", str(args.iterations),
               "--split-inits", str(args.split_inits), "--sample-size", "null,5,5,3",
               "--memory-budget-mb", str(args.memory_budget_mb), "--overwrite", "--quiet"]
    t0 = time.perf_counter()
    peaks = run_ranks(command, args.ranks, root)
    wall = time.perf_counter() - t0
    tree = json.loads((root / "out" / "tree" / "tree.json").read_text())
    steps = tree["meta"]["steps"]
    level1 = sum(s["seconds"] for s in steps if s["level"] == 1)
    print(json.dumps({
        "points": n, "dim": args.dim, "levels": levels, "split_k": 35,
        "iterations": args.iterations, "split_inits": args.split_inits,
        "memory_budget_mb": args.memory_budget_mb, "data_mib": round(n * args.dim * 2 / 2**20, 1),
        "generate_s": round(gen_s, 1), "wall_s": round(wall, 1), "level1_s": round(level1, 1),
        "points_per_s_level1": round(n / level1), "ranks": args.ranks,
        "peak_rss_mib_per_rank": peaks,
        "model_peak_gib_main_other": projected_peak_gib(n, args.dim, k1, args.ranks,
                                                        args.memory_budget_mb),
        "t1_projection_gib_main_other_128_ranks": projected_peak_gib(T1_POINTS, 1024, 100_000,
                                                                     128, 4096),
        "steps": steps,
    }))


if __name__ == "__main__":
    main()
