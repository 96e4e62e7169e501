"""Peak host memory of one split batch per row, against the budget's estimate.

    python bench/bench_split_memory.py            # ~1 min on 2 cores

Runs fastssl.curation.hierarchical.split_batch (50 groups, 35 sub-clusters each, best of
2, 2 Lloyd iterations: memory does not grow with either) on float16 rows and samples the
process's resident set every 0.5 ms; prints the peak above the rows themselves, per row,
beside ``split_row_bytes`` (what the memory budget assumes), one JSON line per shape.
"""
from __future__ import annotations

import gc
import json
import os
import threading
import time

import numpy as np

SHAPES = [(200_000, 16), (400_000, 16), (200_000, 128), (100_000, 1024)]  # (rows, d)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_extra_bytes(fn) -> int:
    """Peak resident bytes above the level before fn() ran."""
    gc.collect()
    time.sleep(0.2)
    base, peak, done = _rss(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        fn()
    finally:
        done.set()
        watcher.join()
    return max(peak[0], _rss()) - base


def main() -> None:
    import torch

    from fastssl.curation.hierarchical import split_batch, split_row_bytes

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    for m, d in SHAPES:
        x = rng.standard_normal((m, d), dtype=np.float32).astype(np.float16)
        sizes = np.full(50, m // 50)
        xo = np.concatenate([[0], np.cumsum(sizes)])
        co = np.concatenate([[0], np.cumsum(np.minimum(sizes, 35))])
        extra = peak_extra_bytes(lambda: split_batch(x, xo, co, np.arange(50), 2, n_init=2))
        print(json.dumps({"rows": m, "d": d, "row_bytes": 2 * d,
                          "measured_extra_per_row": round(extra / m),
                          "budget_assumes_per_row": split_row_bytes(2 * d, d)}), flush=True)
        del x


if __name__ == "__main__":
    main()
