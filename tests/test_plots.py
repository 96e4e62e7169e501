"""fastssl.plots: the curves drawn are the metrics file's, the reconstruction figure shows
what the model predicts, and the PNGs are valid images."""
from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")
PIL = pytest.importorskip("PIL.Image")

from _mvmae_helpers import one_thread, phantom_cache  # noqa: E402
from fastssl import plots  # noqa: E402
from fastssl.cli import main as cli  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def _png_ok(path) -> tuple[int, int]:
    with PIL.open(path) as img:
        img.verify()  # raises on a damaged file
    with PIL.open(path) as img:
        assert img.format == "PNG"
        return img.size


def _records(rng, n=12):
    out = []
    for i in range(n):
        rec = dict(step=2 * (i + 1), epoch=i // 4, loss=float(rng.uniform(0.5, 2)), recon=float(rng.uniform(0.5, 1)),
                   align=float(rng.uniform(0, 1)), beta=float(i / n), lr=float(rng.uniform(1e-4, 1e-3)),
                   grad_norm=1.0, imgs_per_s=100.0)
        if i % 4 == 3:  # the end of an epoch: a validation loss and the view cosines
            rec.update(val_recon=float(rng.uniform(0.5, 1)), cos_matched=float(rng.uniform(0.5, 1)),
                       cos_unmatched=float(rng.uniform(0, 0.5)))
        out.append(rec)
    return out


def _check_series(series, records, key):
    steps, values = series[key]
    want = [(r["step"], r[key]) for r in records if key in r]
    assert steps.tolist() == [s for s, _ in want]
    np.testing.assert_array_equal(values, [v for _, v in want])


def test_curves_from_jsonl_equal_the_file(tmp_path, rng):
    records = _records(rng)
    records[5]["loss"] = float("nan")  # a non-finite point is left out, not drawn as a gap to 0
    with open(tmp_path / "metrics.jsonl", "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in records)
    out = plots.plot_pretrain_curves(tmp_path)
    assert out["png"] == str(tmp_path / "loss_curves.png") and out["source"].endswith("metrics.jsonl")
    width, height = _png_ok(out["png"])
    assert width > 300 and height > 5 * 150  # five panels: loss, align, cosine, lr, beta
    series = out["series"]
    assert set(series) == {"loss", "recon", "val_recon", "align", "cos_matched", "cos_unmatched", "lr", "beta"}
    for key in series:
        if key != "loss":
            _check_series(series, records, key)
    assert records[5]["step"] not in series["loss"][0].tolist() and len(series["loss"][0]) == len(records) - 1


def test_curves_from_csv_when_there_is_no_jsonl(tmp_path, rng):
    records = _records(rng, n=8)
    for rec in records:
        rec["phase"] = "train"  # a text column is kept out of the plot, not a crash
    keys = sorted({k for r in records for k in r})
    with open(tmp_path / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(records)  # missing columns -> empty cells
    out = plots.plot_pretrain_curves(tmp_path, tmp_path / "c.png")
    _png_ok(tmp_path / "c.png")
    for key in ("recon", "val_recon", "lr", "cos_matched"):
        _check_series(out["series"], records, key)
    assert "phase" not in out["series"]


def test_no_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plots.plot_pretrain_curves(tmp_path)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"epoch": 1}) + "\n")
    with pytest.raises(ValueError, match="no metrics"):
        plots.plot_pretrain_curves(tmp_path)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from fastssl.train.pretrain import PretrainConfig, main

    root = tmp_path_factory.mktemp("plots")
    cache = phantom_cache(root)
    cfg = PretrainConfig(cache=cache, out=str(root / "run"), preset="test", epochs=1, batch_size=4, workers=0,
                         mask_ratio=0.75, warmup_epochs=0, log_every=1, progress=False, device="cpu",
                         target="global", seed=1)
    assert main(cfg)["finished"]
    return cache, str(root / "run")


def test_reconstruction_shows_what_the_model_predicts(trained_run):
    from fastssl.data.cache import read_manifest
    from fastssl.data.cache import pixel_stats

    cache, run = trained_run
    arrays = plots.reconstruction_arrays(os.path.join(run, "checkpoint.pt"), cache, n=2, seed=5)
    original, masked, recon, mask = arrays["original"], arrays["masked"], arrays["reconstruction"], arrays["mask"]
    assert original.shape == masked.shape == recon.shape == (2, 2, 32, 32) and mask.shape == (2, 2, 16)
    assert arrays["mask_ratio"] == 0.75 and (mask.sum(-1) == 12).all()
    pixel_mask = np.kron(mask.reshape(2, 2, 4, 4), np.ones((8, 8))).astype(bool)  # patch -> its 8x8 pixels
    assert np.array_equal(np.isnan(masked), pixel_mask)
    assert np.array_equal(recon[~pixel_mask], original[~pixel_mask])  # visible patches pasted as they are
    assert np.abs(recon[pixel_mask] - original[pixel_mask]).max() > 1e-3
    # the model's own loss on the same masks: MSE over masked pixels in normalised units
    _, std = pixel_stats(read_manifest(cache))
    mse = ((recon - original) / std) ** 2
    model, _ = plots._load_mae(os.path.join(run, "checkpoint.pt"))
    images = torch.from_numpy((original - pixel_stats(read_manifest(cache))[0]) / std).reshape(4, 1, 32, 32)
    with torch.no_grad():
        out = model.reconstruct(images, torch.tensor([0] * 2 + [1] * 2), 0.75,
                                generator=torch.Generator().manual_seed(5))
        want = float(model.recon_loss(out["pred"], images, out["mask"]))
    assert np.array_equal(out["mask"].numpy().reshape(2, 2, 16), mask)
    assert math.isclose(mse[pixel_mask].mean(), want, rel_tol=1e-4)


def test_figures_and_the_cli(trained_run, tmp_path):
    cache, run = trained_run
    out = plots.plot_reconstructions(os.path.join(run, "checkpoint.pt"), cache, tmp_path / "r.png", n=2)
    width, height = _png_ok(out["png"])
    assert out["original"].shape[1] == 2 and width > height  # 2 rows of 6 panels
    assert cli(["plot", run, "--samples", "2"]) == 0
    for name in ("loss_curves.png", "reconstructions.png"):
        _png_ok(os.path.join(run, name))


def test_supervised_checkpoint_has_nothing_to_reconstruct(trained_run, tmp_path):
    cache, run = trained_run
    ckpt = torch.load(os.path.join(run, "checkpoint.pt"), weights_only=True)
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if k.startswith("encoder.")}
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="no decoder"):
        plots.reconstruction_arrays(str(tmp_path / "checkpoint.pt"), cache)
