"""fastssl.eval.finetune: the released per-epoch schedule against torch's own schedulers,
layer-wise lr decay groups, whole-study batches, study-level logits against an image-by-
image oracle, model selection on validation, and resume (interrupted == uninterrupted)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from _eval_helpers import independent_study_scores
from _mvmae_helpers import one_thread, phantom_cache
from fastssl.eval.finetune import StudyBatches, StudyClassifier, epoch_lr, mean_by_group, param_groups


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A tiny phantom cache; the tests that use it run on one thread (tiny models)."""
    with one_thread():
        yield phantom_cache(str(tmp_path_factory.mktemp("finetune")))


@pytest.mark.parametrize("warmup, epochs", [(5, 100), (1, 4), (0, 3), (3, 7)])
def test_epoch_lr_is_the_released_schedule(warmup, epochs):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=2e-4)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs - warmup, eta_min=0)
    if warmup:
        linear = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=warmup)
        sched = torch.optim.lr_scheduler.SequentialLR(opt, [linear, cosine], milestones=[warmup])
    else:
        sched = cosine
    for epoch in range(epochs):
        assert epoch_lr(epoch, 2e-4, warmup, epochs) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-15)
        opt.step()
        sched.step()


def test_layer_decay_groups():
    from fastssl.eval.probe import load_eval_encoder

    model = StudyClassifier(load_eval_encoder("random:test"))  # depth 2
    groups = param_groups(model, 1.0, 0.05, 0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(lr_of) == len(named) and all(g["weight_decay"] == 0.05 for g in groups)
    want = {"head.weight": 1.0, "encoder.vit.norm.weight": 1.0, "encoder.vit.blocks.1.attn.qkv.weight": 0.5,
            "encoder.vit.blocks.0.mlp.fc1.bias": 0.25, "encoder.vit.pos_embed": 0.125,
            "encoder.view_embed.weight": 0.125, "encoder.vit.patch_embed.proj.weight": 0.125}
    assert {k: lr_of[id(named[k])] for k in want} == want
    assert {g["lr"] for g in param_groups(model, 1.0, 0.05, 1.0)} == {1.0}


def test_study_batches_hold_whole_studies(cache):
    from fastssl.data.datasets import SingleViewDataset

    ds = SingleViewDataset(cache, split="train")
    batches = StudyBatches(ds)
    studies = np.array([3, 0, 5])
    images, views, group, labels = batches.batch(studies)
    for k, s in enumerate(studies):
        rows = np.flatnonzero(ds.study_index == s)
        assert int((group == k).sum()) == rows.size
        torch.testing.assert_close(images[group == k], ds.get_batch(rows)[0])
        torch.testing.assert_close(labels[k], ds.get_batch(rows)[1][0])
    epoch = list(batches.epoch(4, seed=0, epoch=1))
    assert len(epoch) == batches.n_studies // 4
    assert [b[3].tolist() for b in epoch] == [b[3].tolist() for b in batches.epoch(4, seed=0, epoch=1)]
    logits = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(mean_by_group(logits, torch.tensor([1, 0, 1, 1, 0]), 3),
                               torch.stack([logits[[1, 4]].mean(0), logits[[0, 2, 3]].mean(0), torch.zeros(3, dtype=torch.float64)]))


def _finetune(cache, out, *extra, quiet=True):
    from fastssl.cli import main as cli

    return cli(["finetune", "--cache", cache, "--checkpoint", "random:test", "--out", str(out), "--epochs", "3",
                "--warmup-epochs", "1", "--batch-size", "4", "--base-lr", "0.05", "--n-boot", "50",
                *(["--quiet"] if quiet else []), *extra])


def test_finetune_end_to_end_and_resume(cache, tmp_path, capsys, caplog):
    from fastssl.eval.report import read_scores_csv

    full = tmp_path / "full"
    assert _finetune(cache, full) == 0
    r = json.loads((full / "finetune.json").read_text())
    history = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    best = max(history, key=lambda h: h["val_macro_auroc"])  # model selection on validation
    assert r["best_epoch"] == best["epoch"] and r["val_macro_auroc"] == pytest.approx(best["val_macro_auroc"])
    assert 0 <= r["macro_ci"][0] <= r["macro_auroc"] <= r["macro_ci"][1] <= 1
    # the scores are the best model's per-image logits averaged per study
    model = StudyClassifier(__import__("fastssl.eval.probe", fromlist=["x"]).load_eval_encoder("random:test"))
    model.load_state_dict(torch.load(full / "best.pt", weights_only=True))
    model.eval()
    want = independent_study_scores(cache, 32, lambda x, v: model(x, torch.tensor([v]))[0].double().numpy())
    table = read_scores_csv(str(full))
    np.testing.assert_allclose(table["scores"], [want[s] for s in table["studies"]], rtol=1e-4, atol=1e-4)
    assert (full / "roc.png").is_file()
    # interrupted after one epoch, then the same command again: the same run
    part = tmp_path / "part"
    assert _finetune(cache, part, "--stop-after-epochs", "1", quiet=False) == 0
    assert not (part / "finetune.json").exists() and "rerun" in capsys.readouterr().out
    assert _finetune(cache, part) == 0
    assert (part / "metrics.jsonl").read_text().count("\n") == 3
    for name in ("best.pt", "checkpoint.pt"):  # the best and the last epoch's weights
        a, b = (torch.load(d / name, weights_only=True) for d in (full, part))
        a, b = (x.get("model", x) for x in (a, b))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert (part / "scores.csv").read_text() == (full / "scores.csv").read_text()
    # finished: nothing to do; other settings: refused, naming them, unless --overwrite
    assert _finetune(cache, part) == 0
    caplog.clear()
    assert _finetune(cache, part, "--base-lr", "0.01") == 2
    assert "base_lr: 0.05 -> 0.01" in caplog.text
    assert _finetune(cache, part, "--base-lr", "0.01", "--epochs", "2", "--overwrite") == 0
    assert json.loads((part / "finetune.json").read_text())["config"]["base_lr"] == 0.01


def test_finetune_dataset_filter_on_a_pooled_cache(tmp_path, caplog):
    """--dataset restricts train, validation and test to that dataset (scores.csv holds
    exactly its test studies), is recorded and is part of the resume fingerprint."""
    from fastssl.data.cache import read_index
    from fastssl.eval.report import read_scores_csv
    from test_eval_probe import pooled_cache

    cache = pooled_cache(str(tmp_path))
    index = read_index(cache)
    test = index.split == "test"
    out = tmp_path / "ft"
    with one_thread():
        assert _finetune(cache, out, "--dataset", "mimic-cxr", "--epochs", "2", "--no-plots") == 0
        r = json.loads((out / "finetune.json").read_text())
        assert r["config"]["dataset"] == "mimic-cxr"
        mimic = index.dataset == "mimic-cxr"
        assert r["n_train_studies"] == np.unique(index.study_id[(index.split == "train") & mimic]).size
        assert list(read_scores_csv(str(out))["studies"]) == sorted(set(index.study_id[test & mimic]))
        caplog.clear()
        assert _finetune(cache, out, "--epochs", "2", "--no-plots") == 2  # another run: refused
        assert 'dataset: "mimic-cxr" -> ""' in caplog.text, caplog.text
        assert _finetune(cache, out, "--epochs", "2", "--no-plots", "--overwrite") == 0
        assert list(read_scores_csv(str(out))["studies"]) == sorted(set(index.study_id[test]))
        caplog.clear()
        assert _finetune(cache, tmp_path / "bad", "--dataset", "vindr") == 2
    assert "['vindr'] not in this cache (has ['chexpert', 'mimic-cxr'])" in caplog.text


def test_finetune_label_fraction_recorded_and_fingerprinted(cache, tmp_path, caplog):
    """--label-fraction trains on the whole patients test_eval_probe's hand count keeps,
    is recorded in finetune.json and is part of the resume fingerprint (another fraction
    in the same --out is refused). Planted: the fraction left out of the fingerprint."""
    from fastssl.data.cache import read_index
    from test_eval_probe import _kept_by_hand

    out = tmp_path / "ft"
    assert _finetune(cache, out, "--epochs", "2", "--label-fraction", "0.5", "--label-seed", "2", "--no-plots") == 0
    r = json.loads((out / "finetune.json").read_text())
    want, _, _ = _kept_by_hand(read_index(cache), 0.5, 2)
    assert r["config"]["label_fraction"] == 0.5 and r["config"]["label_seed"] == 2
    assert r["n_train_studies"] == len(want) == r["label_fraction"]["n_kept_studies"]
    caplog.clear()
    assert _finetune(cache, out, "--epochs", "2", "--label-fraction", "0.25", "--label-seed", "2") == 2
    assert "label_fraction: 0.5 -> 0.25" in caplog.text
    caplog.clear()
    assert _finetune(cache, tmp_path / "tiny", "--label-fraction", "0.01", "--batch-size", "8") == 2
    assert "fewer than one batch of batch_size=8" in caplog.text
