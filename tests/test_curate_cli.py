"""`fastssl curate`: config file + overrides, outputs, resume, report metrics, synthetic data."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fastssl.cli import main
from fastssl.curation.hierarchical import FAIL_ENV
from fastssl.curation.synthetic import long_tailed_mixture, zipf_sizes
from fastssl.train.curate import balance_metrics


def test_zipf_sizes_and_mixture(tmp_path):
    rng = np.random.default_rng(0)
    sizes = zipf_sizes(10_000, 50, 1.1, rng)
    assert sizes.sum() == 10_000 and sizes.min() >= 1 and sizes.max() > 20 * sizes.min()
    pts, comp, fam = long_tailed_mixture(2000, 8, 20, families=4, seed=1, dtype=np.float16)
    assert pts.shape == (2000, 8) and pts.dtype == np.float16
    assert comp.shape == fam.shape == (2000,) and np.array_equal(fam, comp % 4)
    paths, comp2, _ = long_tailed_mixture(2000, 8, 20, families=4, seed=1, dtype=np.float16,
                                          out_dir=tmp_path, shard_rows=700)
    assert len(paths) == 3 and np.array_equal(comp, comp2)
    assert np.array_equal(np.concatenate([np.load(p) for p in paths]), pts)


def test_balance_metrics():
    u = balance_metrics(np.full(10, 7))
    assert u["entropy_norm"] == pytest.approx(1.0) and u["gini"] == pytest.approx(0.0)
    skew = balance_metrics(np.array([100, 0, 0, 0]))
    assert skew["entropy_norm"] == pytest.approx(0.0) and skew["coverage"] == 0.25
    assert skew["gini"] == pytest.approx(0.75)


def test_curate_cli_end_to_end(tmp_path, monkeypatch, capsys):
    pytest.importorskip("fastssl.curation.sampling")
    paths, comp, _ = long_tailed_mixture(6000, 16, 40, families=4, seed=3,
                                         out_dir=tmp_path / "emb", shard_rows=2500)
    cfg = tmp_path / "curate.yaml"
    cfg.write_text(
        f"data: [{tmp_path / 'emb'}/points_*.npy]\n"
        f"out: {tmp_path / 'out'}\n"
        "levels: [200, 20, 4]\niterations: 5\nresampling_steps: 2\nsplit_k: 2\n"
        f"target_size: 0.1\nlabels: {tmp_path / 'emb' / 'components.npy'}\nquiet: true\n")
    monkeypatch.setenv(FAIL_ENV, "2")
    with pytest.raises(RuntimeError, match="injected failure"):
        main(["curate", "--config", str(cfg), "--levels", "60,12,3"])
    monkeypatch.delenv(FAIL_ENV)
    assert main(["curate", "--config", str(cfg), "--levels", "60,12,3"]) == 0
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    assert [lv["k"] for lv in report["levels"]][1:] == [12, 3]
    idx = np.load(out / "curated_indices.npy")
    assert idx.shape == (600,) and np.unique(idx).size == 600 and idx.max() < 6000
    gt = report["ground_truth"]
    assert gt["curated"]["entropy_norm"] > gt["random"]["entropy_norm"]
    assert gt["curated"]["coverage"] >= gt["random"]["coverage"]
    text = capsys.readouterr().out
    assert "ground truth: 40 groups" in text and "curated" in text
    # a different tree config is refused unless --overwrite
    assert main(["curate", "--config", str(cfg), "--levels", "50,12,3"]) == 2
    assert main(["curate", "--config", str(cfg), "--levels", "50,12,3", "--overwrite",
                 "--target-size", "0"]) == 0


def test_curate_cli_bad_data(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((10, 4), np.float32))
    np.save(tmp_path / "b.npy", np.ones((10, 5), np.float32))
    assert main(["curate", "--data", str(tmp_path / "a.npy"), str(tmp_path / "b.npy"),
                 "--out", str(tmp_path / "o"), "--levels", "2", "--quiet"]) == 2
