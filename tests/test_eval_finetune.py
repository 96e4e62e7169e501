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


def test_study_batches_read_by_workers_are_the_in_process_batches(cache):
    """finetune --workers: DataLoader processes yield the batches of the released order
    (the permutation of (seed, epoch), transcribed here), whole studies, as in-process."""
    from fastssl.data.datasets import SingleViewDataset

    ds = SingleViewDataset(cache, split="train")
    batches = StudyBatches(ds)
    perm = np.random.default_rng([3, 2]).permutation(len(ds.study_ids))
    got = list(batches.epoch(3, seed=3, epoch=2, workers=2))
    assert len(got) == len(perm) // 3
    for k, (images, views, group, labels) in enumerate(got):
        for j, s in enumerate(perm[3 * k:3 * k + 3]):
            rows = np.flatnonzero(ds.study_index == s)
            torch.testing.assert_close(images[group == j], ds.get_batch(rows)[0])
            torch.testing.assert_close(labels[j], ds.get_batch(rows)[1][0])
    for (a, *_), (b, *_) in zip(got, batches.epoch(3, seed=3, epoch=2, workers=0)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _finetune(cache, out, *extra, quiet=True):
    from fastssl.cli import main as cli

    return cli(["finetune", "--cache", cache, "--checkpoint", "random:test", "--out", str(out), "--epochs", "3",
                "--warmup-epochs", "1", "--batch-size", "4", "--base-lr", "0.05", "--n-boot", "50",
                "--min-val-studies", "1", *(["--quiet"] if quiet else []), *extra])


def test_finetune_end_to_end_and_resume(cache, tmp_path, capsys):
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
    # F1 thresholds: the best model's validation study scores, brute-force search
    from _eval_helpers import brute_best_threshold, brute_f1
    from fastssl.data.cache import read_index

    val = independent_study_scores(cache, 32, lambda x, v: model(x, torch.tensor([v]))[0].double().numpy(),
                                   split="validate")
    index = read_index(cache)
    val_labels = {v: index.labels[list(index.study_id).index(v)] for v in val}
    assert r["f1_threshold_source"] == "validate" and (full / "reliability.png").is_file()
    compared = 0
    for k, name in enumerate(table["names"]):
        y = np.array([val_labels[v][k] for v in val])
        got = r["per_label_metrics"][name]
        if (y == 1).any() and got["f1"] is not None:
            t = brute_best_threshold(np.array([val[v][k] for v in val]), y)[0]
            assert got["f1_threshold"] == pytest.approx(t, rel=1e-4, abs=1e-4)
            assert got["f1"] == pytest.approx(brute_f1(table["scores"][:, k], table["labels"][:, k], got["f1_threshold"]))
            compared += 1
    assert compared > 0
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
    capsys.readouterr()
    assert _finetune(cache, part, "--base-lr", "0.01") == 2
    err = capsys.readouterr().err
    assert "base_lr: 0.05 -> 0.01" in err
    assert _finetune(cache, part, "--base-lr", "0.01", "--epochs", "2", "--overwrite") == 0
    assert json.loads((part / "finetune.json").read_text())["config"]["base_lr"] == 0.01


def test_finetune_dataset_filter_on_a_pooled_cache(tmp_path, capsys):
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
        capsys.readouterr()
        assert _finetune(cache, out, "--epochs", "2", "--no-plots") == 2  # another run: refused
        err = capsys.readouterr().err
        assert 'dataset: "mimic-cxr" -> ""' in err, err
        assert _finetune(cache, out, "--epochs", "2", "--no-plots", "--overwrite") == 0
        assert list(read_scores_csv(str(out))["studies"]) == sorted(set(index.study_id[test]))
        capsys.readouterr()
        assert _finetune(cache, tmp_path / "bad", "--dataset", "vindr") == 2
    err = capsys.readouterr().err
    assert "['vindr'] not in this cache (has ['chexpert', 'mimic-cxr'])" in err


def test_finetune_label_fraction_recorded_and_fingerprinted(cache, tmp_path, capsys):
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
    capsys.readouterr()
    assert _finetune(cache, out, "--epochs", "2", "--label-fraction", "0.25", "--label-seed", "2") == 2
    err = capsys.readouterr().err
    assert "label_fraction: 0.5 -> 0.25" in err
    capsys.readouterr()
    assert _finetune(cache, tmp_path / "tiny", "--label-fraction", "0.01", "--batch-size", "8") == 2
    err = capsys.readouterr().err
    assert "fewer than one batch of batch_size=8" in err


# The released fine-tuning, transcribed from agostini335/MVMAE (classifiers/Classifiers.py
# configure_optimizers, config/eval/MimicEvalConfig.py, config/data/TransformConfig.py
# TransformMimicFolderMAETrainModule with get_transform_folder_mae's RandomApply p 0.8).
RELEASED = dict(optimizer=torch.optim.AdamW, weight_decay=0.05, base_lr=5e-5, epochs=100, warmup_epochs=5,
                clip_grad=0.0, precision="fp32", crop_scale=(0.5, 1.0), crop_ratio=(1.0, 1.0), hflip=0.5,
                rotation=0.0, brightness=0.4, contrast=0.4, jitter_p=0.8)


def test_finetune_defaults_are_the_released_protocol(cache):
    """Every field of the README's released-vs-ours table, read from what _setup builds:
    the optimizer and its groups' weight decay and lr, no clipping, fp32, and the train
    transform's crop scale / ratio / flip / jitter (and its behaviour: square crops of area
    in [0.5, 1], no rotation, about half the images mirrored). Planted: MAE's transform
    as the default (augment_style "mae") -> ratio and rotation differ, the test fails."""
    from fastssl.eval.finetune import FinetuneConfig, _setup

    cfg = FinetuneConfig(cache=cache, checkpoint="random:test", device="cpu")
    assert (cfg.epochs, cfg.warmup_epochs, cfg.base_lr, cfg.clip_grad, cfg.precision, cfg.mode) == (
        RELEASED["epochs"], RELEASED["warmup_epochs"], RELEASED["base_lr"], RELEASED["clip_grad"],
        RELEASED["precision"], "full")
    cfg.batch_size = 8
    _, model, optimizer, lr, _, transform, augment = _setup(cfg)
    assert type(optimizer) is RELEASED["optimizer"] and lr == pytest.approx(5e-5 * 8 / 256)
    assert {g["weight_decay"] for g in optimizer.param_groups} == {RELEASED["weight_decay"]}
    assert {g["lr"] for g in optimizer.param_groups} == {lr}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    assert (augment.scale, augment.ratio, augment.max_rotation, augment.hflip, augment.brightness,
            augment.contrast, augment.jitter_p, augment.jitter_style) == (
        RELEASED["crop_scale"], RELEASED["crop_ratio"], RELEASED["rotation"], RELEASED["hflip"],
        RELEASED["brightness"], RELEASED["contrast"], RELEASED["jitter_p"], "torchvision")
    assert (augment.mean, augment.std) == (transform.mean, transform.std)
    theta = augment.theta(4000, "cpu", torch.Generator().manual_seed(0)).double()
    w, h = theta[:, 0, 0], theta[:, 1, 1]
    torch.testing.assert_close(w, h)  # ratio 1:1
    assert theta[:, 0, 1].abs().max() == 0 and theta[:, 1, 0].abs().max() == 0  # no rotation
    area = w * h
    assert area.min() >= 0.5 - 1e-6 and area.max() <= 1 + 1e-6 and area.min() < 0.51 and area.max() > 0.99
    ramp = torch.linspace(0, 1, 16).repeat(16, 1)[None, None].repeat(400, 1, 1, 1)  # brighter to the right
    out = augment(ramp, torch.Generator().manual_seed(1))
    mirrored = (out[:, 0, 8, -4] < out[:, 0, 8, 3]).double().mean().item()
    assert abs(mirrored - RELEASED["hflip"]) < 0.08


def test_finetune_does_not_clip_gradients(cache):
    """The gradient the optimizer steps with is the raw one, norm > 1 (recomputed
    independently from the same batch and augmentation draw). Planted: clip_grad 1.0 as
    the default -> the recorded norm is 1, the test fails."""
    from fastssl.data.datasets import SingleViewDataset
    from fastssl.eval.finetune import FinetuneConfig, train_one_epoch
    from fastssl.eval.probe import load_eval_encoder
    from fastssl.models.mvmae import masked_bce

    cfg = FinetuneConfig(cache=cache, checkpoint="random:test", batch_size=8, device="cpu")
    torch.manual_seed(0)
    model = StudyClassifier(load_eval_encoder("random:test"))
    with torch.no_grad():
        model.head.weight.mul_(300.0)  # large logits: a gradient norm well above 1
    reference = StudyClassifier(load_eval_encoder("random:test"))
    reference.load_state_dict(model.state_dict())
    norms = []

    class Recording(torch.optim.SGD):
        def step(self, closure=None):
            norms.append(float(torch.cat([p.grad.flatten() for p in model.parameters()]).norm()))
            return super().step(closure)

    optimizer = Recording([dict(params=list(model.parameters()), lr_scale=1.0)], lr=0.0)
    batches = StudyBatches(SingleViewDataset(cache, split="train"))
    from fastssl.data.augment import mvmae_train_augment

    augment = mvmae_train_augment(32)
    train_one_epoch(model, batches, optimizer, cfg, epoch=0, lr=0.0, augment=augment, device=torch.device("cpu"))
    images, views, group, labels = next(batches.epoch(8, cfg.seed, 0))
    x = augment(images, torch.Generator("cpu").manual_seed(cfg.seed * 100_003 + 0))
    reference.train()
    loss = masked_bce(mean_by_group(reference(x, views), group, labels.shape[0]), labels)
    grads = torch.autograd.grad(loss, list(reference.parameters()), allow_unused=True)
    want = float(torch.cat([g.flatten() for g in grads if g is not None]).norm())
    assert want > 1.0 and norms[0] == pytest.approx(want, rel=1e-4)


def test_finetune_linear_mode_freezes_the_encoder(cache, tmp_path):
    """--mode linear (the released freeze_encoder): after training, every encoder tensor
    equals the initial one, the head moved. Planted: the freeze left out -> the encoder's
    weights change (weight decay alone moves them), the test fails."""
    from fastssl.eval.probe import load_eval_encoder

    out = tmp_path / "linear"
    assert _finetune(cache, out, "--mode", "linear", "--epochs", "2", "--no-plots") == 0
    r = json.loads((out / "finetune.json").read_text())
    assert r["config"]["mode"] == "linear"
    last = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    initial = load_eval_encoder("random:test").state_dict()  # the same seed: the same random init
    for k, v in initial.items():
        assert torch.equal(last[f"encoder.{k}"], v), k
    encoder = load_eval_encoder("random:test")
    torch.manual_seed(0)  # as _setup: the head's initial weights
    head = StudyClassifier(encoder).head.state_dict()
    assert not torch.equal(last["head.weight"], head["weight"])


@pytest.mark.parametrize("epochs", [1, 2])
def test_finetune_short_runs_clip_the_default_warmup(cache, tmp_path, caplog, epochs):
    """--epochs 1 or 2 with the default warm-up (5) runs: the warm-up is clipped to
    epochs - 1 with one warning, and each epoch's lr equals torch's LinearLR(0.5) +
    cosine at that warm-up. Planted: no clipping -> ValueError / a zero-length cosine."""
    from fastssl.cli import main as cli

    out = tmp_path / "short"
    with one_thread():
        assert cli(["finetune", "--cache", cache, "--checkpoint", "random:test", "--out", str(out), "--epochs",
                    str(epochs), "--batch-size", "4", "--n-boot", "20", "--no-plots", "--quiet"]) == 0
    assert f"warmup_epochs=5 >= epochs={epochs}: warm-up clipped to {epochs - 1} epoch(s)" in caplog.text
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=5e-5 * 4 / 256)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1, eta_min=0)
    want = []
    if epochs == 2:
        linear = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=1)
        sched = torch.optim.lr_scheduler.SequentialLR(opt, [linear, cosine], milestones=[1])
    else:
        sched = cosine
    for _ in range(epochs):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx(want, rel=1e-9)


@pytest.mark.slow  # three fine-tuning runs (two folds + the final one)
def test_finetune_small_validation_cross_validates_the_epoch(cache, tmp_path, caplog):
    """Validation below --min-val-studies: one warning line, one run per patient-grouped
    fold in out/cv, the chosen epoch is the best mean of the folds' per-epoch AUROC
    (recomputed here from each fold's saved study scores by pairwise counting), the F1
    thresholds come from the out-of-fold scores at that epoch, and the folds split train by
    patient. Planted: the epoch chosen on the last fold's curve only -> fails."""
    from _eval_helpers import brute_auroc, brute_best_threshold
    from fastssl.data.datasets import SingleViewDataset
    from fastssl.eval.finetune import FOLD_SCORES, fold_split

    out = tmp_path / "cv"
    assert _finetune(cache, out, "--min-val-studies", "100", "--cv-folds", "2", "--no-plots") == 0
    assert "has 2 studies (< --min-val-studies 100): epoch chosen by 2-fold cross-validation" in caplog.text
    r = json.loads((out / "finetune.json").read_text())
    sel = r["epoch_selection"]
    assert sel["chosen_on"] == "2-fold cross-validation on train" and len(sel["cv_macro_auroc"]) == 3
    curves, folds = [], [np.load(out / "cv" / f"fold_{k}" / FOLD_SCORES) for k in range(2)]
    for f in folds:
        per_epoch = []
        for e in range(3):
            aucs = [brute_auroc(f["scores"][e][:, j], f["labels"][:, j]) for j in range(14)]
            per_epoch.append(np.nanmean(aucs))
        curves.append(per_epoch)
    mean = np.mean(curves, axis=0)
    np.testing.assert_allclose(sel["cv_macro_auroc"], mean, rtol=1e-9)
    assert r["best_epoch"] == sel["epoch"] == int(np.argmax(mean))
    oof = np.concatenate([f["scores"][sel["epoch"]] for f in folds])
    labels = np.concatenate([f["labels"] for f in folds])
    assert r["f1_threshold_source"] == "2-fold cross-validation on train (out-of-fold)"
    for j, name in enumerate(r["per_label_metrics"]):
        t = r["per_label_metrics"][name]["f1_threshold"]
        if (labels[:, j] == 1).any():
            assert t == pytest.approx(brute_best_threshold(oof[:, j], labels[:, j])[0])
    train = SingleViewDataset(cache, split="train")
    subject = lambda ds: set(ds.index.subject_id[ds.rows])  # noqa: E731
    for k in range(2):
        rest, held = fold_split(SingleViewDataset(cache, split="train"), 2, k, 0)
        assert not subject(rest) & subject(held) and subject(rest) | subject(held) == subject(train)
        assert len(rest.study_ids) + len(held.study_ids) == len(train.study_ids)
    # interrupted after every epoch (folds and final run), rerun until done: the same result
    part = tmp_path / "part"
    for _ in range(10):
        assert _finetune(cache, part, "--min-val-studies", "100", "--cv-folds", "2", "--no-plots",
                         "--stop-after-epochs", "1") == 0
        if (part / "finetune.json").exists():
            break
    assert (part / "scores.csv").read_text() == (out / "scores.csv").read_text()


def test_finetune_normalises_with_the_encoders_training_values(cache, tmp_path):
    """An encoder file trained with mean/std 0.3125/0.1875 on a cache whose manifest says
    otherwise: finetune's evaluation and train transforms both use the encoder's values.
    Planted: eval_transform reading the cache's manifest -> fails."""
    from fastssl.data.cache import read_manifest
    from fastssl.eval.finetune import FinetuneConfig, _setup
    from fastssl.eval.probe import load_eval_encoder
    from fastssl.models.export import export_encoder

    encoder = load_eval_encoder("random:test")
    path = export_encoder(encoder, encoder.cfg, str(tmp_path / "encoder.safetensors"),
                          manifest=dict(pixel_mean=0.3125, pixel_std=0.1875))[0]
    assert read_manifest(cache)["pixel_mean"] != 0.3125
    cfg = FinetuneConfig(cache=cache, checkpoint=path, device="cpu", batch_size=4)
    *_, transform, augment = _setup(cfg)
    assert (transform.mean, transform.std, augment.mean, augment.std) == (0.3125, 0.1875, 0.3125, 0.1875)
