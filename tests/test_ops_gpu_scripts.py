"""The GPU measurement script's logic, run on the CPU (--dry-run: tiny model, Dynamo
without Inductor). Its real run needs an H200; here it must run end to end and give one
row per column with sane values."""
from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_step_flops_formula():
    """ViT-B/16, 224 px, 1 channel, mask 0.75, 4-block 512-wide decoder, per image:
    forward = patch embed + 12 encoder blocks on 50 tokens + decoder embed + 4 decoder
    blocks on 197 tokens + prediction head, counted by hand."""
    mod = _load("gpu_pretrain")
    cfg = mod.model_cfg("vitb16")
    assert (cfg.num_patches, cfg.embed_dim, cfg.decoder_dim) == (196, 768, 512)
    patch = 2 * 196 * 256 * 768
    enc = 12 * (24 * 50 * 768 ** 2 + 4 * 50 ** 2 * 768)
    dec = cfg.decoder_depth * (24 * 197 * 512 ** 2 + 4 * 197 ** 2 * 512)
    fwd = patch + enc + 2 * 50 * 768 * 512 + dec + 2 * 196 * 512 * 256
    assert mod.step_flops(cfg, 0.75, 1) == 3 * fwd - patch
    assert mod.step_flops(cfg, 0.75, 256) == 256 * (3 * fwd - patch)


@pytest.mark.slow
def test_gpu_pretrain_dry_run():
    mod = _load("gpu_pretrain")
    res = mod.main(["--dry-run", "--only", "test:0.75:paired"])
    rows = {r["column"]: r for r in res["rows"]}
    assert set(rows) == set(mod.COLUMNS), res
    for r in rows.values():
        assert "error" not in r, r
        assert r["images_per_s"] > 0 and 0 < r["mfu"] < 1 and r["first_step_s"] > 0
    assert "| test:0.75:paired | fastssl |" in mod.table(res)
