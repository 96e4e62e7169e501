"""GPU check of curation at scale (issue 5): one streamed Lloyd iteration from disk.

Runs alone (below) or as ``run(report)`` from another script. Writes N x 1024 fp16 points
as memory-mapped ``.npy`` shards (generated on the GPU: a clustered cloud, not zeros),
drops them from the page cache where the OS allows, then times
  * the read: one streamed pass over the shards (np.load mmap, chunk by chunk), and
  * one level-1 Lloyd iteration at k = 100,000 with fastssl.curation.KMeans
    (init from given centroids, so k-means++ is not timed), which streams the same
    shards, assigns each chunk on the GPU and accumulates on the host.
Goal (issue 5): the iteration is bound by the read, or reaches >= 70% of the bf16 GEMM
rate. N defaults to 4M (8 GiB) to fit the check's time budget; FASTSSL_CURATION_N=20000000
runs the issue's 20M (40 GiB of disk).

    python bench/gpu_curation.py            # alone (not part of bench/gpu_run.py's slot)
    python bench/gpu_curation.py --dry-run  # CPU, tiny: checks the plumbing only
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

D = 1024
K = 100_000
SHARD_ROWS = 1 << 20


def _write_shards(root: Path, n: int, d: int, device: torch.device, seed: int = 0) -> list[str]:
    """Clustered fp16 points (1,000 Gaussian blobs) in shards of SHARD_ROWS rows."""
    gen = torch.Generator(device=device).manual_seed(seed)
    blobs = torch.randn(1000, d, generator=gen, device=device) * 4
    paths = []
    for i, start in enumerate(range(0, n, SHARD_ROWS)):
        rows = min(SHARD_ROWS, n - start)
        owner = torch.randint(0, blobs.shape[0], (rows,), generator=gen, device=device)
        pts = blobs[owner] + torch.randn(rows, d, generator=gen, device=device)
        path = root / f"points_{i:05d}.npy"
        np.save(path, pts.half().cpu().numpy())
        paths.append(str(path))
    return paths


def _drop_page_cache(paths: list[str]) -> bool:
    """Ask the kernel to forget the shards' pages, so the read below comes from disk."""
    ok = True
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        except (OSError, AttributeError):
            ok = False
    return ok


def _read_pass(paths: list[str], chunk_rows: int) -> float:
    t0 = time.perf_counter()
    total = 0.0
    for p in paths:
        arr = np.load(p, mmap_mode="r")
        for s in range(0, arr.shape[0], chunk_rows):
            total += float(np.asarray(arr[s : s + chunk_rows, :1], dtype=np.float32).sum())
            np.ascontiguousarray(arr[s : s + chunk_rows])  # the copy the k-means loop makes
    return time.perf_counter() - t0


def run(report, *, dry_run: bool = False) -> None:
    from fastssl.curation.kmeans import DeviceAssigner, KMeans, KMeansConfig

    if dry_run:
        device, n, d, k, impl = torch.device("cpu"), 20_000, 64, 100, "torch"
    else:
        if not torch.cuda.is_available():
            report("gpu_curation", status="FAILED", error="no CUDA device")
            return
        device, d, k, impl = torch.device("cuda"), D, K, "cuda"
        n = int(os.environ.get("FASTSSL_CURATION_N", 4 << 20))
    root = Path(tempfile.mkdtemp(prefix="fastssl_curation_"))
    try:
        t0 = time.perf_counter()
        paths = _write_shards(root, n, d, device)
        write_s = time.perf_counter() - t0
        cold = _drop_page_cache(paths)
        chunk = 262_144 if not dry_run else 4096
        read_s = _read_pass(paths, chunk)
        _drop_page_cache(paths)
        first = np.load(paths[0], mmap_mode="r")
        rng = np.random.default_rng(0)
        init = np.asarray(first[np.sort(rng.choice(first.shape[0], k, replace=False))],
                          dtype=np.float32)
        cfg = KMeansConfig(k=k, iterations=1, seed=0, chunk_size=chunk, impl=impl,
                           progress=False, empty="keep")
        assigner = DeviceAssigner(device, impl) if dry_run else None
        km = KMeans(cfg, assigner=assigner)
        t0 = time.perf_counter()
        km.fit(paths, init_centroids=init)
        iter_s = time.perf_counter() - t0
        flops = 2.0 * n * k * d
        gemm = getattr(report, "context", {}).get("bf16_gemm_tflops")
        frac = (flops / iter_s / 1e12) / gemm if gemm else float("nan")
        bound = iter_s <= 1.25 * read_s
        report(f"curation: Lloyd iteration n={n:,} d={d} k={k:,} fp16 from disk",
               status="ok", seconds=round(iter_s, 2), read_seconds=round(read_s, 2),
               write_seconds=round(write_s, 1), cold_read=cold,
               tflops=round(flops / iter_s / 1e12, 1),
               frac_bf16_gemm=round(frac, 3) if frac == frac else "-",
               objective=round(km.stats_[-1].objective, 4),
               goal="read-bound or >= 70% GEMM: " + ("met" if bound or frac >= 0.7 else "not met"))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny, on the CPU")
    args = parser.parse_args()
    run(lambda name, **cols: print(name, cols), dry_run=args.dry_run)
