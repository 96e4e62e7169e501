"""Centroids are never rounded below the data's precision unless asked (issue 13, item 9).

Every engine (the CPU engine under each instruction-set cap, the torch path, and the
device engines' centroid preparation run by the Triton interpreter) must assign exactly
as the float64 oracle does with the centroids rounded to x's precision ("data", the
default) or to bf16 ("bf16", opt-in), and the same hierarchical k-means job must give
the same tree on all of them. Rows lie next to bisectors, so a path that rounds the
centroids differently (float32 centroids against float16 rows on AVX2, bf16 on AMX, as
before the fix) moves dozens of rows and fails. Each engine runs in a child process
(tests/_precision_engines.py): FASTSSL_CPU_ISA and TRITON_INTERPRET are read once.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastssl import assign as kmeans
from fastssl.assign.common import centroid_dtype
from fastssl._native import has_cpu_ext

import _precision_engines as engines

HERE = pathlib.Path(__file__).resolve().parent
ISAS = ("generic", "avx2", "avx512", "avx512_bf16", "amx")
TIE = 4e-6  # of ||x||^2 + max ||c||^2: rows closer than this to a tie may go either way


def _child(impl: str, **env) -> dict:
    environ = {**os.environ, **env}
    environ.pop("FASTSSL_IMPL", None)
    done = subprocess.run([sys.executable, str(HERE / "_precision_engines.py"), impl],
                          cwd=HERE, env=environ, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def results() -> dict:
    """engine name -> the child's output; one child per distinct instruction set."""
    out = {}
    if has_cpu_ext():
        for isa in ISAS:
            got = _child("cpu", FASTSSL_CPU_ISA=isa)
            if f"cpu-{got['isa']}" in out:
                break  # a cap above this CPU runs its best engine again: the rest would too
            out[f"cpu-{got['isa']}"] = got
    out["torch"] = _child("torch")
    if importlib.util.find_spec("triton") is not None:
        out["triton-interpreted"] = _child("triton", TRITON_INTERPRET="1")
    return out


def _scores(x: np.ndarray, c: np.ndarray):
    """float64 squared distances (n, k) and each row's scale ||x||^2 + max ||c||^2."""
    x64, c64 = torch.from_numpy(x.astype(np.float64)), torch.from_numpy(c.astype(np.float64))
    xsq, csq = (x64 * x64).sum(1, keepdim=True), (c64 * c64).sum(1)
    return xsq - 2 * x64 @ c64.T + csq, xsq[:, 0] + csq.max()


def _rounded(c: np.ndarray, dtype: str) -> np.ndarray:
    return torch.from_numpy(c).to(getattr(torch, dtype)).float().numpy()


def _clear_labels(scores: torch.Tensor, scale: torch.Tensor):
    """(labels, mask of rows whose runner-up is more than TIE x scale behind)."""
    two = scores.topk(2, dim=1, largest=False)
    return two.indices[:, 0], (two.values[:, 1] - two.values[:, 0]) > TIE * scale


@pytest.mark.parametrize("precision, coarser", [("data", "float32"), ("bf16", "float16")])
def test_every_engine_assigns_with_the_centroids_rounded_as_asked(results, precision, coarser):
    x, c = engines.near_bisector_rows()
    scores, scale = _scores(x, _rounded(c, centroid_dtype("float16", precision)))
    want, clear = _clear_labels(scores, scale)
    # The case must tell the roundings apart: other centroids move many clear rows.
    other, other_clear = _clear_labels(*_scores(x, _rounded(c, coarser)))
    assert int(((want != other) & clear & other_clear).sum()) >= 10
    for name, out in results.items():
        got = torch.tensor(out["assign"][precision]["labels"])
        wrong = int(((got != want) & clear).sum())
        assert wrong == 0, f"{name}: {wrong} of {int(clear.sum())} clear rows differ ({precision})"
        dist = torch.tensor(out["assign"][precision]["distances"], dtype=torch.float64)
        at_label = scores.gather(1, got[:, None])[:, 0]
        assert torch.all((dist - at_label).abs() <= TIE * scale), name


@pytest.mark.parametrize("precision", ["data", "bf16"])
def test_the_same_job_gives_the_same_tree_on_every_engine(results, precision):
    trees = {name: out["tree"][precision] for name, out in results.items() if "tree" in out}
    assert len(trees) >= 2 and all(len(t) == 2 for t in trees.values())
    first_name, first = next(iter(trees.items()))
    for name, tree in trees.items():
        for level, (a, b) in enumerate(zip(first, tree), start=1):
            differ = int((np.asarray(a) != np.asarray(b)).sum())
            assert differ == 0, f"level {level}: {name} and {first_name} differ on {differ} inputs"


def test_centroid_dtype_follows_the_data_unless_bf16_is_asked():
    assert [centroid_dtype(d) for d in ("float16", "bfloat16", "float32", "float64")] == [
        "float16", "bfloat16", "float32", "float32"]
    assert {centroid_dtype(d, "bf16") for d in ("float16", "float32")} == {"bfloat16"}
    with pytest.raises(ValueError, match="precision='fp8'; expected one of"):
        kmeans.assign(np.ones((2, 3), np.float32), np.ones((1, 3), np.float32), precision="fp8")


def test_centroids_beyond_float16_are_refused_for_float16_rows():
    x = np.ones((4, 3), np.float16)
    c = np.array([[1.0, 2.0, 3.0], [7e4, 0.0, 0.0]], np.float32)
    with pytest.raises(ValueError, match="centroids row 1 does not fit float16"):
        kmeans.assign(x, c, impl="torch")
    labels, _ = kmeans.assign(x.astype(np.float32), c, impl="torch")
    assert labels.tolist() == [0, 0, 0, 0]
