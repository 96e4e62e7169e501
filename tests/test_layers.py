"""The package's layers point one way (DESIGN.md, issue 19 item 4):

    cli/demo -> train/eval -> models/curation/data -> ops/assign -> kernels/_C

with the shared utilities (errors, atomic writes, jobs, settings, distributed, profiling)
below everything, and the reference beside the ops, importing no engine. The oracle here
is the source text: every ``import`` statement of every module, walked with ``ast``
(imports inside functions count too: a lazy import is still a dependency).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import fastssl

PACKAGE = Path(fastssl.__file__).parent

# Layer of each module by its dotted name (the longest matching prefix wins). Higher
# layers may import lower ones and their own, never a higher one.
LAYERS = {
    # utilities every layer may use; they import only each other
    "fastssl": 0, "fastssl._lazy": 0, "fastssl.errors": 0, "fastssl.atomic": 0, "fastssl.jobs": 0,
    "fastssl.config": 0, "fastssl.distributed": 0, "fastssl.profiling": 0,
    # the cosine normalisation rule the reference and every engine share
    "fastssl.cosine": 0,
    # native engine and Triton kernels
    "fastssl._C": 1, "fastssl.kernels": 1, "fastssl._native": 1,
    # ops, nearest-centroid assignment (engines, dispatch, arrays) and the reference beside them
    "fastssl.ops": 2, "fastssl.assign": 2, "fastssl.kmeans": 2, "fastssl._assign_common": 2,
    "fastssl._assign_engine": 2, "fastssl._cuda_assign": 2, "fastssl._triton_assign": 2,
    "fastssl._dispatch": 2, "fastssl._arrays": 2, "fastssl.reference": 2,
    # models, curation, data
    "fastssl.models": 3, "fastssl.curation": 3, "fastssl.data": 3,
    # loops and evaluation; `fastssl plot` draws a pretraining run
    "fastssl.train": 4, "fastssl.eval": 4, "fastssl.plots": 4,
    # entry points
    "fastssl.cli": 5, "fastssl.demo": 5, "fastssl.__main__": 5,
}
# What "an engine" is for the reference: it defines the semantics the engines are checked
# against, so it must not depend on any of them (nor on the ops that dispatch to them).
ENGINES = ("fastssl._C", "fastssl.kernels", "fastssl._native", "fastssl.kmeans", "fastssl._assign_engine",
           "fastssl._cuda_assign", "fastssl._triton_assign", "fastssl._dispatch", "fastssl.assign", "fastssl.ops")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int | None:
    best = None
    for prefix, layer in LAYERS.items():
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, layer)
    return None if best is None else best[1]


def _imports(path: Path) -> set[str]:
    """Every fastssl module ``path`` imports: ``from fastssl import x`` counts as fastssl.x
    when x is a submodule, relative imports are resolved."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "fastssl")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if base.split(".")[0] != "fastssl":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                is_module = (PACKAGE.parent / Path(*sub.split("."))).with_suffix(".py").exists() or \
                    (PACKAGE.parent / Path(*sub.split("."))).is_dir()
                found.add(sub if is_module else base)
    return found


def _all_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_has_a_layer():
    unplaced = [_module_name(p) for p in _all_modules() if _layer(_module_name(p)) is None]
    assert not unplaced, f"place these modules in LAYERS (tests/test_layers.py): {unplaced}"


def test_no_module_imports_a_layer_above_it():
    upward = []
    for path in _all_modules():
        module = _module_name(path)
        own = _layer(module)
        for target in sorted(_imports(path)):
            layer = _layer(target)
            if layer is not None and own is not None and layer > own:
                upward.append(f"{module} (layer {own}) imports {target} (layer {layer})")
    assert not upward, "imports pointing up:\n" + "\n".join(upward)


def test_eval_does_not_import_train():
    offenders = [f"{_module_name(p)} imports {t}" for p in _all_modules()
                 if _module_name(p).startswith("fastssl.eval")
                 for t in _imports(p) if t == "fastssl.train" or t.startswith("fastssl.train.")]
    assert not offenders, offenders


def test_reference_imports_no_engine():
    offenders = [f"{_module_name(p)} imports {t}" for p in _all_modules()
                 if _module_name(p).startswith("fastssl.reference")
                 for t in _imports(p) if any(t == e or t.startswith(e + ".") for e in ENGINES)]
    assert not offenders, offenders


def test_the_reference_loads_no_engine_at_run_time():
    """The source walk cannot see that importing a submodule runs its package's __init__
    (fastssl.assign.common once loaded the whole engine seam): import the oracle in a
    fresh interpreter and list what came with it."""
    import subprocess
    import sys

    engines = ", ".join(repr(e) for e in ENGINES)
    code = ("import sys, fastssl.reference.kmeans, fastssl.reference.mae; "
            f"print(sorted(m for m in sys.modules if any(m == e or m.startswith(e + '.') for e in ({engines},))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]", f"the reference loaded engines: {loaded}"


@pytest.mark.parametrize("source, expected", [
    ("from fastssl.train.export import load_encoder\n", {"fastssl.train.export"}),
    ("from fastssl import distributed as d\n", {"fastssl.distributed"}),
    ("def f():\n    from ..train import pretrain\n", {"fastssl.train.pretrain"}),
    ("from . import report\n", {"fastssl.eval.report"}),
    ("import fastssl.models.mvmae\n", {"fastssl.models.mvmae"}),
    ("from fastssl.errors import DataError\n", {"fastssl.errors"}),
])
def test_the_import_walk_sees_every_form(tmp_path, monkeypatch, source, expected):
    # the walk itself, on a module placed in fastssl/eval/: lazy, relative and package imports
    path = PACKAGE / "eval" / "_layers_probe.py"
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: source)
    assert _imports(path) == expected


@pytest.mark.parametrize("old, name, new", [
    ("fastssl.train.export", "load_encoder", "fastssl.models.export"),
    ("fastssl.train.export", "pixel_stats", "fastssl.data.cache"),
    ("fastssl.curation.tree", "save_npy_atomic", "fastssl.atomic:atomic_save_npy"),
    ("fastssl.curation.tree", "write_text_atomic", "fastssl.atomic:atomic_write_text"),
    ("fastssl.train.curate", "size_histogram", "fastssl.curation.report"),
    ("fastssl.train.curate", "cluster_shares", "fastssl.curation.report"),
])
def test_moved_names_still_work_with_a_deprecation_warning(old, name, new):
    import importlib

    module, _, new_name = new.partition(":")
    want = getattr(importlib.import_module(module), new_name or name)
    with pytest.warns(DeprecationWarning, match=name):
        got = getattr(importlib.import_module(old), name)
    assert got is want
    with pytest.raises(AttributeError):
        getattr(importlib.import_module(old), "no_such_name")

