"""fastssl.assign as a package: the engine seam, the callable package, the old names.

Every label is checked against a float64 brute-force nearest centroid written here.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import fastssl
from fastssl.assign import engine_for, torch_engine

ROOT = Path(__file__).resolve().parents[1]


def _nearest64(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    d2 = ((x[:, None, :].astype(np.float64) - c[None].astype(np.float64)) ** 2).sum(-1)
    return d2.argmin(1)


@pytest.fixture
def data():
    rng = np.random.default_rng(11)
    return (rng.standard_normal((67, 13)).astype(np.float32),
            rng.standard_normal((9, 13)).astype(np.float32))


def test_the_package_is_callable_as_the_function(data):
    """fastssl.assign(x, c) (README) is fastssl.assign.assign, whatever loaded first."""
    x, c = data
    labels, distances = fastssl.assign(x, c)
    np.testing.assert_array_equal(labels, _nearest64(x, c))
    want = ((x.astype(np.float64) - c[_nearest64(x, c)]) ** 2).sum(1)
    np.testing.assert_allclose(distances, want, rtol=1e-5, atol=1e-5)
    from fastssl import assign

    np.testing.assert_array_equal(assign(x, c, impl="torch")[0], _nearest64(x, c))


def test_old_public_names_warn_and_still_work(data):
    x, c = data
    from fastssl import kmeans

    with pytest.warns(DeprecationWarning, match="fastssl.assign.assign_grouped"):
        grouped = kmeans.assign_grouped
    xo, co = np.array([0, 30, 67]), np.array([0, 4, 9])
    labels, _ = grouped(x, xo, c, co)
    for g in range(2):
        rows, cents = x[xo[g]:xo[g + 1]], c[co[g]:co[g + 1]]
        np.testing.assert_array_equal(labels[xo[g]:xo[g + 1]], co[g] + _nearest64(rows, cents))
    with pytest.warns(DeprecationWarning, match="moved to fastssl.assign.resolved_engine"):
        assert kmeans.resolved_engine(x, impl="torch") == "torch"
    with pytest.raises(AttributeError, match="no attribute 'KMeans'"):
        kmeans.KMeans  # noqa: B018 (the loop never lived here)


@pytest.mark.parametrize("old, new", [
    ("fastssl._arrays", "fastssl.assign.arrays"),
    ("fastssl._assign_common", "fastssl.assign.common"),
    ("fastssl._cuda_assign", "fastssl.assign.cuda_engine"),
    ("fastssl._triton_assign", "fastssl.assign.triton_engine"),
    ("fastssl._assign_engine", "fastssl.assign.dispatch"),
])
def test_old_private_modules_are_the_moved_ones(old, new):
    """The very module object, so a monkeypatch through the old name reaches the code, and
    a DeprecationWarning saying where it went. A fresh interpreter: the warning is raised
    once, at the first import in a process."""
    import subprocess
    import sys

    code = (f"import warnings, importlib; warnings.simplefilter('always')\n"
            f"with warnings.catch_warnings(record=True) as seen:\n"
            f"    old = importlib.import_module({old!r})\n"
            f"print(old is importlib.import_module({new!r}), [str(w.message) for w in seen "
            f"if issubclass(w.category, DeprecationWarning)])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("True [") and f"import {new}" in out, out


def test_an_engine_runs_what_it_is_named(data, monkeypatch):
    """engine_for resolves once; the engine's entry points run that engine, no other."""
    x, c = data
    ran = []
    real_run = torch_engine.run

    def spy(*args, **kwargs):
        ran.append("torch")
        return real_run(*args, **kwargs)

    monkeypatch.setattr(torch_engine, "run", spy)
    engine = engine_for(x, impl="torch")
    assert engine.name == "torch" and ran == []
    labels, _ = engine.assign(x, c)
    np.testing.assert_array_equal(labels, _nearest64(x, c))
    assert ran == ["torch"]
    labels, _ = engine.assign_grouped(x, [0, 67], c, [0, 9])
    np.testing.assert_array_equal(labels, _nearest64(x, c))
    assert ran == ["torch", "torch"]
    assert engine_for("cpu", op="assign_topk").name == "torch"


def test_curation_resolves_the_engine_once(data, monkeypatch):
    """KMeans's host assigner asks the one "auto" rule once, then reuses the engine."""
    from fastssl.curation.kmeans import default_assigner

    from test_kmeans_engine import _spy_choices

    x, c = data
    asked = _spy_choices(monkeypatch)
    monkeypatch.delenv("FASTSSL_IMPL", raising=False)
    from fastssl import _dispatch

    _dispatch.env_override.cache_clear()
    assigner = default_assigner("auto")
    for start in (0, 20, 40):
        labels, _ = assigner(x[start:start + 27], c)
        np.testing.assert_array_equal(labels, _nearest64(x[start:start + 27], c))
    assert asked == ["assign"]


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def test_curation_and_jobs_use_only_the_public_seam():
    """No engine-private import outside fastssl/assign: only names in fastssl.assign's
    __all__ (the seam), never its submodules or the deprecated private modules."""
    import fastssl.assign as api

    # fastssl._native is the build probe the assign package asks (has_cuda_ext): a caller
    # that imports it decides engine availability on its own, around the seam.
    private = {"fastssl._arrays", "fastssl._assign_common", "fastssl._cuda_assign",
               "fastssl._triton_assign", "fastssl._assign_engine", "fastssl.kmeans", "fastssl._native"}
    bad = []
    for folder in ("curation", "train", "eval", "data", "models", "ops"):
        for path in sorted((ROOT / "fastssl" / folder).glob("*.py")):
            for module, names in _imports(path):
                where = f"{path.relative_to(ROOT)}: {module}"
                if module in private or module.startswith("fastssl.assign."):
                    bad.append(where)
                elif module == "fastssl.assign":
                    bad += [f"{where}.{n}" for n in names if n not in api.__all__]
    assert not bad, bad


def test_importing_the_seam_loads_no_engine():
    """import fastssl.assign loads no torch, Triton, extension or engine module."""
    code = ("import sys, fastssl.assign\n"
            "names = ('torch', 'triton', 'fastssl._C', 'fastssl.kmeans') + tuple(\n"
            "    'fastssl.assign.' + e for e in ('cpu_engine', 'cuda_engine', 'triton_engine',"
            " 'torch_engine'))\n"
            "print([m for m in names if m in sys.modules])\n")
    env = {k: v for k, v in os.environ.items() if k not in ("FASTSSL_IMPL", "TRITON_INTERPRET")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_new_names_do_not_warn(data):
    x, c = data
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from fastssl.assign import assign_topk

        labels, _ = assign_topk(torch.from_numpy(x), torch.from_numpy(c), 2)
    d2 = ((x[:, None, :].astype(np.float64) - c[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(labels.numpy(), np.argsort(d2, axis=1, kind="stable")[:, :2])
