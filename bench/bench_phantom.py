"""Phantom throughput: studies/s at 256 px, in memory and written as DICOM, 1 and 2 workers.

Run: ``pytest bench/bench_phantom.py --benchmark-only -q`` (``BENCH_PHANTOM_STUDIES``
sets the studies per timed run, default 60). Not collected by the default test run.
Each generate round writes into a fresh directory (a rerun into a complete one is a
no-op and would time nothing). Studies/s are in ``extra_info`` and printed.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from fastssl.data.phantom import generate_phantom, render_study

SIZE = 256
STUDIES = int(os.environ.get("BENCH_PHANTOM_STUDIES", "60"))


def test_render_study_both_views(benchmark):
    seeds = iter(range(10**6))
    out = benchmark.pedantic(lambda: render_study(next(seeds), SIZE), rounds=10, iterations=1, warmup_rounds=1)
    assert out["frontal"].shape == (SIZE, SIZE)
    benchmark.extra_info["studies_per_s"] = 1.0 / benchmark.stats.stats.median
    print(f"\nrender_study, both views, {SIZE} px: {1.0 / benchmark.stats.stats.median:.2f} studies/s")


@pytest.mark.parametrize("workers", [1, 2])
def test_generate_phantom(benchmark, workers):
    dirs = []

    def setup():
        dirs.append(tempfile.mkdtemp(prefix="bench_phantom_"))
        return (dirs[-1],), {}

    def run(out):
        return generate_phantom(out, STUDIES, seed=0, size=SIZE, workers=workers, progress=False)

    try:
        summary = benchmark.pedantic(run, setup=setup, rounds=2, iterations=1)
    finally:
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
    assert summary.written > STUDIES
    rate = STUDIES / benchmark.stats.stats.median
    benchmark.extra_info.update(studies_per_s=rate, images=summary.images, workers=workers)
    print(f"\ngenerate_phantom {STUDIES} studies ({summary.images} images), {SIZE} px, "
          f"workers={workers}: {rate:.2f} studies/s")
