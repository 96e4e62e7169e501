"""Throughput of curated_tiles.csv (issue 21 §3): index.csv read, tiles.csv join, write.

    python bench/bench_curated_table.py --rows 2000000

Writes an index.csv and a tiles.csv of --rows tiles into a temporary directory, selects a
tenth of the rows (seeded), and times the three passes of fastssl.curation.curated_table
(lines or rows per second; the real job reads 350M lines of each file).
"""
from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import numpy as np

from fastssl.curation.curated_table import join_tiles, read_sources, write_curated_table


def write_inputs(root: Path, n: int) -> None:
    """index.csv (row,shard,offset,source) and tiles.csv of n tiles, 5000 per slide."""
    with open(root / "index.csv", "w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["row", "shard", "offset", "source"])
        out.writerows((i, f"emb_r00000_{i // 100000:05d}.npy", i % 100000,
                       f"slide_{i // 5000:06d}/tile_{i:09d}") for i in range(n))
    with open(root / "tiles.csv", "w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["tile", "slide", "level", "x", "y", "size", "mpp"])
        out.writerows((f"slide_{i // 5000:06d}/tile_{i:09d}", f"slide_{i // 5000:06d}", 0,
                       224 * (i % 97), 224 * (i % 89), 224, 0.5) for i in range(n))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000, help="tiles in index.csv")
    args = parser.parse_args()
    n, rng = args.rows, np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_inputs(root, n)
        rows = np.sort(rng.choice(n, n // 10, replace=False))
        t0 = time.perf_counter()
        sources = read_sources(root / "index.csv", rows)
        t1 = time.perf_counter()
        tiles = join_tiles(root / "tiles.csv", sources)
        t2 = time.perf_counter()
        clusters = rng.integers(0, 100_000, (rows.size, 4))
        write_curated_table(root / "curated_tiles.csv", rows, clusters, sources, tiles)
        t3 = time.perf_counter()
    print(f"{n} tiles, {rows.size} curated: index.csv {t1 - t0:.1f} s "
          f"({n / (t1 - t0) / 1e6:.2f} M lines/s), tiles.csv join {t2 - t1:.1f} s "
          f"({n / (t2 - t1) / 1e6:.2f} M lines/s), write {t3 - t2:.1f} s "
          f"({rows.size / (t3 - t2) / 1e6:.2f} M rows/s)")


if __name__ == "__main__":
    main()
