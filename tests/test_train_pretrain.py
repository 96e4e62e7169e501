"""fastssl.train.pretrain: recipes, schedules (against torch's schedulers and a transcription
of the released SigmoidAnnealing), parameter groups, gradient clipping, logging, and a tiny
run on a phantom cache that is stopped and resumed twice and must equal the uninterrupted
run bit for bit."""
from __future__ import annotations

import json
import math
import os
from dataclasses import replace

import pytest
import torch

from _mvmae_helpers import one_thread, phantom_cache
from fastssl.errors import DataError, OutputLocked, ResumeMismatch
from fastssl.models.mvmae import MultiViewMAE, model_config
from fastssl.train.pretrain import (
    PretrainConfig, Schedule, load_encoder, main, param_groups, sigmoid_annealing, train_one_epoch,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return phantom_cache(tmp_path_factory.mktemp("mv"))


def _cfg(cache, out, **kw):
    base = PretrainConfig(cache=cache, out=str(out), preset="test", epochs=2, batch_size=4, workers=0,
                          mask_ratio=0.75, warmup_epochs=1, log_every=1, ckpt_every=1000, progress=False,
                          base_lr=1e-3, seed=3, device="cpu", val_batches=2)  # CPU: bitwise-reproducible
    return replace(base, **kw)


def test_schedule_values():
    s = Schedule(lr=1e-3, min_lr=1e-5, warmup_steps=10, total_steps=110, beta_max=2.0, ramp_steps=50)
    assert s.lr_at(0) == 0.0 and s.lr_at(5) == pytest.approx(5e-4) and s.lr_at(10) == pytest.approx(1e-3)
    assert s.lr_at(60) == pytest.approx((1e-3 + 1e-5) / 2)  # half-way down the cosine
    assert s.lr_at(110) == pytest.approx(1e-5) and s.lr_at(500) == pytest.approx(1e-5)
    lrs = [s.lr_at(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert s.beta_at(0) == 0.0 and s.beta_at(25) == pytest.approx(1.0) and s.beta_at(50) == 2.0
    assert s.beta_at(1000) == 2.0
    betas = [s.beta_at(i) for i in range(51)]
    assert all(a < b for a, b in zip(betas, betas[1:]))
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    want = 2.0 * (sig(10 * (0.1 - 0.5)) - sig(-5)) / (sig(5) - sig(-5))
    assert s.beta_at(5) == pytest.approx(want)
    assert s.beta_at(5) < 0.05  # sigmoid: slow start
    assert Schedule(1e-3, 0, 0, 10, 2.0, 0).beta_at(0) == 2.0  # no ramp


def test_param_groups_exclude_norms_biases_embeddings():
    model = MultiViewMAE(model_config("test"))
    (everything,) = param_groups(model, 0.05, decay_all=True)  # released: decay on all
    assert everything["weight_decay"] == 0.05 and len(everything["params"]) == len(list(model.parameters()))
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    for name in ("encoder.vit.pos_embed", "encoder.vit.cls_token", "encoder.view_embed.weight", "mask_token",
                 "decoder_pos_embed", "decoder_view_embed.weight", "encoder.vit.norm.weight", "decoder_pred.bias"):
        assert name in nd
    assert "encoder.vit.blocks.0.attn.qkv.weight" in d and "decoder_pred.weight" in d
    assert len(d) + len(nd) == len(names)


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


class ReleasedSigmoidAnnealing:
    """Transcription of agostini335/MVMAE mm_maes/utils.py SigmoidAnnealing (the oracle)."""

    def __init__(self, init_beta, final_beta, start_annealing, end_annealing, steepness):
        self.init_beta, self.final_beta, self.steepness = init_beta, final_beta, steepness
        self.start_annealing, self.end_annealing = start_annealing, end_annealing
        self.midpoint = int(start_annealing + (end_annealing - start_annealing) / 2)

    def get_beta_value(self, step):
        if step < self.start_annealing:
            sigmoid = 1 / (1 + math.exp(self.steepness * self.midpoint))
        elif step < self.end_annealing:
            sigmoid = 1 / (1 + math.exp(-self.steepness * ((step - self.start_annealing) - self.midpoint)))
        else:
            sigmoid = 1 / (1 + math.exp(-self.steepness * ((self.end_annealing - self.start_annealing)
                                                           - self.midpoint)))
        return self.init_beta + (self.final_beta - self.init_beta) * sigmoid


@pytest.mark.parametrize("warmup, epochs", [(5, 100), (0, 10), (3, 7), (10, 400), (2, 3)])
def test_beta_follows_the_released_sigmoid_annealing(warmup, epochs):
    oracle = ReleasedSigmoidAnnealing(0.0, 2.0, warmup, epochs, 0.02)
    spe = 3
    s = Schedule(1e-3, 0.0, warmup * spe, epochs * spe, 2.0, 0, steepness=0.02, steps_per_epoch=spe,
                 per_epoch=True, warmup_start=0.5, beta_released=True)
    for step in range(epochs * spe + 2 * spe):
        assert s.beta_at(step) == pytest.approx(oracle.get_beta_value(step // spe), rel=1e-12), step
        assert sigmoid_annealing(step // spe, 2.0, warmup, epochs, 0.02) == s.beta_at(step)
    if (warmup, epochs) == (5, 100):  # the numbers: 0.52 -> 1.41, not 0 -> 2
        assert round(s.beta_at(0), 2) == 0.52 and round(s.beta_at(100 * spe), 2) == 1.41  # (last epoch: 1.40)


@pytest.mark.parametrize("warmup, epochs", [(5, 20), (0, 6), (2, 3)])
def test_released_lr_schedule_matches_torch_schedulers(warmup, epochs):
    """Per-epoch LinearLR(start_factor=0.5, total_iters=warmup) then CosineAnnealingLR(T_max=
    epochs - warmup), chained by SequentialLR, stepped once per epoch (Lightning interval="epoch")."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs - warmup, eta_min=0.0)
    if warmup:
        lin = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=warmup)
        sched = torch.optim.lr_scheduler.SequentialLR(opt, [lin, cos], milestones=[warmup])
    else:
        sched = cos
    spe = 4
    s = Schedule(1e-3, 0.0, warmup * spe, epochs * spe, 0.0, 0, steps_per_epoch=spe, per_epoch=True,
                 warmup_start=0.5)
    for epoch in range(epochs):
        for k in range(spe):
            assert s.lr_at(epoch * spe + k) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-15)
        opt.step()
        sched.step()


def test_recipes_resolve_and_the_cli_builds_the_same_config(cache):
    from fastssl.cli import command_parser
    from fastssl.config import config_from_args

    r = PretrainConfig(cache=cache).resolved()
    assert (r.recipe, r.mode, r.base_lr, r.beta1, r.beta2, r.weight_decay, r.decay_all, r.lr_per_epoch,
            r.warmup_start, r.warmup_epochs, r.beta_schedule, r.beta_steepness, r.beta_max, r.mask_ratio,
            r.clip_grad, r.batch_size, r.augment_style, r.crop_min, r.max_views) == (
        "mvmae", "flu", 1.2e-4, 0.9, 0.999, 0.05, True, True, 0.5, 50.0, "released", 0.02, 2.0, 0.93,
        1.0, 64, "mvmae", 0.5, 3)
    assert r.epochs == 500  # the released dataclass default (config/MyMVWSLConfig.py), not cb's smoke 2
    short = PretrainConfig(cache=cache, recipe="mvmae-short").resolved()
    assert (short.epochs, short.warmup_epochs) == (100, 5.0)
    assert replace(short, recipe="mvmae", epochs=500, warmup_epochs=50.0) == r  # nothing else differs
    assert short.model_config() == r.model_config()
    assert (r.target, r.align, r.recon_reduction, r.qk_norm, r.decoder_embed, r.decoder_dim, r.init) == (
        "global", "mse", "released", True, False, 768, "released")
    m = PretrainConfig(cache=cache, recipe="mae").resolved()
    assert (m.mode, m.base_lr, m.beta2, m.decay_all, m.lr_per_epoch, m.warmup_start, m.beta_schedule,
            m.augment_style, m.align, m.decoder_dim) == (
        "paired", 1.5e-4, 0.95, False, False, 0.0, "ramp", "mae", "l2", 512)
    o = PretrainConfig(cache=cache, beta2=0.95, decoder_dim=512, decoder_heads=16, decoder_embed=True).resolved()
    assert (o.beta2, o.decoder_dim, o.model_config().decoder_dim, o.mode) == (0.95, 512, 512, "flu")
    parser, _ = command_parser("pretrain")
    for argv, api in ((["--cache", cache], PretrainConfig(cache=cache)),
                      (["--cache", cache, "--recipe", "mae", "--no-qk-norm"], PretrainConfig(cache=cache, recipe="mae")),
                      (["--cache", cache, "--align", "ntxent", "--beta2", "0.99"],
                       PretrainConfig(cache=cache, align="ntxent", beta2=0.99))):
        cli = config_from_args(PretrainConfig, parser.parse_args(argv))
        cli.progress = api.progress
        assert cli.resolved() == api.resolved(), argv
        assert cli.resolved().model_config() == api.resolved().model_config()
    with pytest.raises(ValueError, match="recipe"):
        PretrainConfig(cache=cache, recipe="simclr").resolved()
    with pytest.raises(ValueError, match="preset"):
        PretrainConfig(cache=cache, preset="vit_huge").resolved()
    with pytest.raises(ValueError, match="decoder_dim=100 is not a multiple of decoder_heads=12"):
        PretrainConfig(cache=cache, decoder_dim=100, decoder_embed=True).resolved()


@pytest.mark.parametrize("recipe, epochs, warmup, first, last", [
    ("mvmae", 500, 50, 0.008, 1.940),       # the released dataclass default (issue 20's figures)
    ("mvmae-short", 100, 5, 0.522, 1.397),
])
def test_recipe_beta_range_is_the_readme_s(cache, recipe, epochs, warmup, first, last):
    """The beta a recipe's run sees at its first and last epoch, from the transcription of
    the released SigmoidAnnealing; the README's recipe table states exactly these."""
    from pathlib import Path

    from fastssl.train.pretrain import recipe_beta_range

    r = PretrainConfig(cache=cache, recipe=recipe).resolved()
    assert (r.epochs, r.warmup_epochs) == (epochs, warmup)
    oracle = ReleasedSigmoidAnnealing(0.0, 2.0, warmup, epochs, 0.02)
    want = (oracle.get_beta_value(0), oracle.get_beta_value(epochs - 1))
    assert recipe_beta_range(recipe) == pytest.approx(want, rel=1e-12)
    assert (round(want[0], 3), round(want[1], 3)) == (first, last)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| beta |"))
    assert f"{first:.3f} -> {last:.3f} over epochs 0-{epochs - 1}" in row


def test_logged_beta_follows_the_per_step_ramp(cache, tmp_path):
    """The mae recipe's --beta-schedule ramp: every beta in metrics.jsonl (one record per
    step) against the ramp written out here: 0 at step 0, a logistic curve of slope k over
    ramp_steps = round(beta_ramp_epochs x steps/epoch) rescaled to end exactly at beta_max,
    then beta_max. A steepness other than the recipe's 10 checks that the flag reaches it."""
    k, beta_max, ramp_epochs = 6.0, 1.5, 1.5
    main(_cfg(cache, tmp_path, recipe="mae", epochs=3, beta_schedule="ramp", beta_steepness=k,
              beta_max=beta_max, beta_ramp_epochs=ramp_epochs))
    recs = [m for m in _metrics(tmp_path) if "loss" in m]
    steps_per_epoch = recs[-1]["step"] // 3
    ramp_steps = round(ramp_epochs * steps_per_epoch)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731

    def ramp(i):
        if i >= ramp_steps:
            return beta_max
        return beta_max * (sig(k * (i / ramp_steps - 0.5)) - sig(-k / 2)) / (sig(k / 2) - sig(-k / 2))

    assert [m["step"] for m in recs] == list(range(1, 3 * steps_per_epoch + 1))
    for rec in recs:  # "step" counts steps done: the beta logged with it is step - 1's
        assert rec["beta"] == pytest.approx(ramp(rec["step"] - 1), rel=1e-6, abs=1e-7), rec["step"]
    assert recs[0]["beta"] == 0.0 and recs[-1]["beta"] == pytest.approx(beta_max)
    assert len({round(m["beta"], 6) for m in recs}) > ramp_steps - 1  # distinct values on the ramp


def test_config_json_round_trips_through_the_cli(cache, tmp_path, monkeypatch):
    """A run's config.json (the resolved settings) is accepted by --config and gives the same run."""
    from fastssl import cli
    from fastssl.config import config_from_args

    cfg = _cfg(cache, tmp_path, epochs=1, recipe="mae", align="ntxent")
    main(cfg)
    seen = {}
    _, module = cli.command_parser("pretrain")
    monkeypatch.setattr(module, "run", lambda args: seen.update(args=args) or 0)
    assert cli.main(["pretrain", "--config", str(tmp_path / "config.json"), "--quiet"]) == 0
    again = config_from_args(PretrainConfig, seen["args"])
    assert again.resolved() == cfg.resolved()


def test_resume_continues_exactly(cache, tmp_path, capsys):
    a = main(replace(_cfg(cache, tmp_path / "a"), progress=True))  # the banner: not --quiet
    total = a["total_steps"]
    assert a["finished"] and a["step"] == total == 10  # flu: 22 train studies // 4 = 5 steps x 2 epochs
    head = capsys.readouterr().out
    assert "effective_batch=4" in head and f"lr={1e-3 * 4 / 256:.3e}" in head and "'mae_loss': 'torch'" in head
    # Stopped mid-epoch 0, then mid-epoch 1, then run to the end: each rerun resumes.
    b = _cfg(cache, tmp_path / "b")
    assert main(replace(b, stop_after_steps=3))["step"] == 3
    quiet = capsys.readouterr().out  # progress=False (--quiet): results only, no banner
    assert "effective_batch" not in quiet and "stopped at step 3" in quiet
    assert main(replace(b, stop_after_steps=4))["step"] == 7
    assert main(b)["finished"]
    ca = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    cb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert ca["step"] == cb["step"] == total
    for k, v in ca["model"].items():
        assert torch.equal(v, cb["model"][k]), k
    for k, v in ca["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg"], cb["optimizer"]["state"][k]["exp_avg"])
    ma, mb = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert [m["step"] for m in mb if "loss" in m] == list(range(1, total + 1))  # no step logged twice
    assert [m["step"] for m in mb if "val_recon" in m] == [5, 10]  # one validation line per epoch
    for x, y in zip(ma, mb):
        assert x == {**y, "imgs_per_s": x.get("imgs_per_s")} if "loss" in x else x == y
    # finished work is detected: nothing is redone
    mtime = os.path.getmtime(tmp_path / "a" / "checkpoint.pt")
    again = main(_cfg(cache, tmp_path / "a"))
    assert again["finished"] and os.path.getmtime(tmp_path / "a" / "checkpoint.pt") == mtime
    # the exported encoder is the trained one
    enc = load_encoder(str(tmp_path / "a" / "encoder.safetensors"))
    for k, v in enc.state_dict().items():
        assert torch.equal(v, ca["model"]["encoder." + k])
    # a finished run with other settings is refused, naming them (not "nothing to do")
    with pytest.raises(ResumeMismatch, match='mode: "flu" -> "single"'):
        main(_cfg(cache, tmp_path / "a", mode="single"))


def test_resume_identity_refuses_changed_settings(cache, tmp_path, caplog):
    """Issue 11 items 3 and 6 / 12.6: every result-affecting setting is part of the run's
    identity; damaged outputs of a killed run are repaired or refused with one line."""
    out = tmp_path / "run"
    main(_cfg(cache, out, stop_after_steps=2))
    for change, named in ((dict(mask_ratio=0.5, base_lr=2e-3), ("mask_ratio: 0.75 -> 0.5", "base_lr: 0.001 -> 0.002")),
                          (dict(weight_decay=0.1, augment=False), ("weight_decay", "augment: true -> false")),
                          (dict(beta_max=1.0, warmup_epochs=2.0), ("beta_max", "warmup_epochs")),
                          (dict(recipe="mae"), ("recipe", "beta2: 0.999 -> 0.95")),
                          (dict(epochs=3), ("epochs: 2 -> 3",)),
                          (dict(cache=cache + "/."), ("cache",))):
        with pytest.raises(ResumeMismatch) as exc:
            main(replace(_cfg(cache, out), **change))
        for name in named:
            assert name in str(exc.value), (name, str(exc.value))
        assert "--overwrite" in str(exc.value)
    # settings that do not change the weights may change
    assert main(_cfg(cache, out, stop_after_steps=1, log_every=5, workers=0, val_batches=1))["step"] == 3
    # a torn last metrics line (killed mid-write) is cut away; stale temporary files go
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 4, "loss": 0.')
    (out / ".checkpoint.pt.tmp999999999").write_bytes(b"partial")
    assert main(_cfg(cache, out, stop_after_steps=1))["step"] == 4
    assert not (out / ".checkpoint.pt.tmp999999999").exists()
    assert [m["step"] for m in _metrics(out) if "loss" in m] == [1, 2, 3, 4]
    # a damaged checkpoint: one line naming the file and --no-resume; --no-resume starts over
    raw = bytearray((out / "checkpoint.pt").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (out / "checkpoint.pt").write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"checkpoint.pt.*--no-resume"):
        main(_cfg(cache, out))
    assert main(_cfg(cache, out, resume=False, stop_after_steps=1))["step"] == 1
    # a truncated encoder.safetensors does not count as finished: it is exported again
    done = main(_cfg(cache, out))
    assert done["finished"]
    good = (out / "encoder.safetensors").read_bytes()
    (out / "encoder.safetensors").write_bytes(good[: len(good) // 2])
    again = main(_cfg(cache, out))
    assert again["finished"] and again["metrics"] is not None  # not "nothing to do"
    from fastssl.jobs import verify_safetensors

    assert verify_safetensors(out / "encoder.safetensors")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    for k, v in load_encoder(str(out / "encoder.safetensors")).state_dict().items():
        assert torch.equal(v, ckpt["model"]["encoder." + k])
    # --overwrite replaces a different run
    with caplog.at_level("WARNING"):
        assert main(_cfg(cache, out, mask_ratio=0.5, overwrite=True, stop_after_steps=1))["step"] == 1
    assert "mask_ratio" in caplog.text and "removing" in caplog.text
    # a second job into the same --out fails at once
    from fastssl.jobs import OutputLock

    with OutputLock(out), pytest.raises(OutputLocked, match="in use by another job"):
        main(_cfg(cache, out, mask_ratio=0.5, overwrite=True))


def test_logged_lr_and_beta_equal_the_schedule(cache, tmp_path):
    """Issue 15 item 3: the beta and lr in metrics.jsonl, per step, against the released
    per-epoch formulas computed here (SigmoidAnnealing transcription, LinearLR + cosine)."""
    main(_cfg(cache, tmp_path, epochs=4, warmup_epochs=1, beta_max=2.0))
    oracle = ReleasedSigmoidAnnealing(0.0, 2.0, 1, 4, 0.02)
    lr = 1e-3 * 4 / 256
    for rec in (m for m in _metrics(tmp_path) if "loss" in m):
        epoch = (rec["step"] - 1) // 5  # the step counter is after the step; 5 steps per epoch
        assert rec["epoch"] == epoch
        assert rec["beta"] == pytest.approx(oracle.get_beta_value(epoch), rel=1e-6)
        want_lr = lr * 0.5 if epoch == 0 else lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / 3))
        assert rec["lr"] == pytest.approx(want_lr, rel=1e-9)


def test_gradient_clipping_is_applied(cache):
    """Issue 15 item 4: with plain SGD (lr 1, no momentum) the update equals the clipped
    gradient, so its norm equals clip_grad while the logged (pre-clip) norm is larger."""
    from fastssl.data.datasets import StudyViewsDataset
    from fastssl.train.pretrain import _augment
    from fastssl.data.cache import read_manifest

    cfg = _cfg(cache, "unused", clip_grad=0.05).resolved()
    torch.manual_seed(0)
    model = MultiViewMAE(cfg.model_config())
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    data = StudyViewsDataset(cache, max_views=3)
    recs = []
    sched = Schedule(1.0, 1.0, 0, 10, 0.0, 0)  # constant lr 1
    train_one_epoch(model, [data.get_batch(range(4))], opt, torch.amp.GradScaler("cpu", enabled=False),
                    sched, cfg, epoch=0, step=0, augment=_augment(cfg, cfg.model_config(), read_manifest(cache)),
                    device=torch.device("cpu"), generator=torch.Generator().manual_seed(0), log_fn=recs.append)
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert recs[0]["grad_norm"] > 0.5  # the pre-clip norm, logged
    assert float(step.norm()) == pytest.approx(0.05, rel=1e-4)


def test_logging_windows_csv_validation_callbacks_and_warmup_warning(cache, tmp_path, caplog):
    """Issue 12 item 4: a run shorter than log_every still logs every epoch's partial window;
    metrics.csv has the same records; a validation loss per epoch; callbacks see every record;
    a warm-up longer than the run warns."""
    seen = []
    with caplog.at_level("WARNING"):
        r = main(_cfg(cache, tmp_path, epochs=2, log_every=1000, warmup_epochs=3), callbacks=[seen.append])
    assert "warmup_epochs=3 >= epochs=2" in caplog.text
    recs = _metrics(tmp_path)
    assert [(m["step"], "val_recon" in m) for m in recs] == [(5, False), (5, True), (10, False), (10, True)]
    assert seen == recs and r["metrics"]["val_recon"] == recs[-1]["val_recon"]
    import csv

    with open(tmp_path / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and float(rows[0]["loss"]) == recs[0]["loss"] and rows[0]["val_recon"] == ""
    assert float(rows[1]["val_recon"]) == recs[1]["val_recon"]
    assert -1 <= recs[0]["cos_matched"] <= 1 and -1 <= recs[0]["cos_unmatched"] <= 1


def test_tensorboard_receives_every_scalar(cache, tmp_path, monkeypatch):
    """With the optional tensorboard installed, every numeric field of every record goes to a
    SummaryWriter under out/tb at the record's step (a stand-in writer records the calls, so
    the test runs without the extra)."""
    import sys
    import types

    calls = []

    class Writer:
        def __init__(self, logdir, purge_step=None):
            calls.append(("init", logdir, purge_step))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    main(_cfg(cache, tmp_path, epochs=1, log_every=2))
    assert calls[0] == ("init", str(tmp_path / "tb"), None) and calls[-1] == ("close",)
    got = {(tag, step): value for tag, value, step in (c for c in calls if len(c) == 3 and c[0] != "init")}
    for rec in _metrics(tmp_path):
        for k, v in rec.items():
            if k not in ("step", "epoch") and v is not None:
                assert got[(k, rec["step"])] == v


@pytest.mark.parametrize("mode, steps", [("single", 4), ("supervised", 4), ("paired", 2)])
def test_other_modes_run(cache, tmp_path, mode, steps):
    r = main(_cfg(cache, tmp_path, mode=mode, epochs=1, batch_size=8, target="norm_pix"))
    assert r["finished"] and r["step"] == steps  # 39 train images // 8; 16 pairs // 8
    rec = [m for m in _metrics(tmp_path) if "loss" in m][-1]
    assert math.isfinite(rec["loss"]) and rec["imgs_per_s"] > 0
    if mode != "paired":
        assert rec["align"] == 0.0 and rec["beta"] == 0.0
    else:
        assert rec["align"] > 0 and rec["beta"] > 0 and rec["cos_matched"] is not None
    assert load_encoder(str(tmp_path / "checkpoint.pt")).cfg.img_size == 32


def test_loss_decreases_on_the_phantom(cache, tmp_path):
    r = main(_cfg(cache, tmp_path, epochs=6, base_lr=2e-2, warmup_epochs=1, augment=False, beta_max=0.0,
                  mask_ratio=0.5))
    recon = [m["recon"] for m in _metrics(tmp_path) if "recon" in m]
    assert r["finished"] and sum(recon[-4:]) < 0.85 * sum(recon[:4]), recon


def test_bad_settings(cache, tmp_path):
    with pytest.raises(ValueError, match="mode"):
        main(_cfg(cache, tmp_path, mode="clip"))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        main(_cfg(cache, tmp_path, batch_size=64))
    with pytest.raises(ValueError, match="mask_ratio"):
        main(_cfg(cache, tmp_path, mask_ratio=1.0))


def _ddp_worker(rank, world, port, cache, out, result_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from fastssl import distributed

    distributed.init(backend="gloo")  # also on a GPU machine: both ranks share one host
    r = main(_cfg(cache, out, epochs=1, batch_size=4, align="ntxent"))
    distributed.shutdown()
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(dict(step=r["step"], total=r["total_steps"]), handle)


def test_two_gloo_ranks(cache, tmp_path):
    """Flu mode with the contrastive loss over 2 ranks (its gradient across ranks is pinned
    in test_models_alignment.py): the run finishes, exports, and keeps each rank's masks."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(2, port, cache, str(tmp_path / "run"), str(tmp_path)), nprocs=2,
                       start_method="fork")  # spawn would re-import torch in each rank (~30 s here)
    res = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert res[0]["step"] == res[1]["step"] == res[0]["total"] == 2  # 22 studies // (4 x 2 ranks)
    assert os.path.isfile(tmp_path / "run" / "encoder.safetensors")
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert len(ck["rng"]["generators"]) == 2  # each rank resumes its own masks
    assert len([m for m in _metrics(tmp_path / "run") if "val_recon" in m]) == 1


def test_augment_and_normalisation_settings_reach_the_transform(cache):
    from fastssl.data.augment import BatchAugment
    from fastssl.train.pretrain import _augment

    manifest = {"pixel_mean": 0.3, "pixel_std": 0.2}
    cfg = _cfg(cache, "unused").resolved()
    aug = _augment(cfg, cfg.model_config(), manifest)  # released: RRC 1:1 (0.5-1), hflip, jitter 0.4 p=0.8
    assert isinstance(aug, BatchAugment)
    assert (aug.scale, aug.ratio, aug.max_rotation, aug.hflip, aug.brightness, aug.contrast, aug.jitter_p,
            aug.jitter_style, aug.mean, aug.std) == ((0.5, 1.0), (1.0, 1.0), 0.0, 0.5, 0.4, 0.4, 0.8,
                                                     "torchvision", 0.3, 0.2)
    mae = _augment(replace(cfg, augment_style="mae", crop_min=0.3, pixel_mean=0.5056, pixel_std=0.252),
                   cfg.model_config(), manifest)
    assert (mae.scale, mae.ratio, mae.hflip, mae.jitter_style, mae.mean, mae.std) == (
        (0.3, 1.0), (3 / 4, 4 / 3), 0.0, "fixed", 0.5056, 0.252)
    off = _augment(replace(cfg, augment=False), cfg.model_config(), manifest)
    x = torch.full((1, 1, 32, 32), 255, dtype=torch.uint8)
    torch.testing.assert_close(off(x), torch.full((1, 1, 32, 32), (1 - 0.3) / 0.2))


@pytest.mark.slow  # ~40 s: a CLI subprocess and two in-process runs
def test_sigkill_at_a_random_moment_then_resume_equals_uninterrupted(cache, tmp_path):
    """A CLI run killed with SIGKILL after a few steps (checkpoint every step, so the kill can
    land inside a save), resumed by the same settings, ends bitwise equal to a run never
    interrupted, each step logged once."""
    import signal
    import subprocess
    import sys
    import time

    kw = dict(epochs=3, ckpt_every=1)
    ref = main(_cfg(cache, tmp_path / "ref", **kw))
    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "fastssl", "pretrain", "--cache", cache, "--out", str(out), "--preset", "test",
            "--epochs", "3", "--batch-size", "4", "--workers", "0", "--mask-ratio", "0.75", "--warmup-epochs", "1",
            "--log-every", "1", "--ckpt-every", "1", "--base-lr", "0.001", "--seed", "3", "--device", "cpu",
            "--val-batches", "2", "--quiet"]
    proc = subprocess.Popen(argv, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.isfile(out / "metrics.jsonl") and len(_metrics(out)) >= 4:
            break
        time.sleep(0.01)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    time.sleep(float(torch.rand(1)) * 0.3)  # somewhere in the next steps, maybe inside a save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = main(_cfg(cache, out, **kw))
    assert resumed["finished"] and resumed["step"] == ref["step"]
    a = torch.load(tmp_path / "ref" / "checkpoint.pt", weights_only=True)
    b = torch.load(out / "checkpoint.pt", weights_only=True)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    steps = [m["step"] for m in _metrics(out) if "loss" in m]
    assert steps == list(range(1, ref["step"] + 1))
    assert not [n for n in os.listdir(out) if ".tmp" in n]


def test_compile_is_the_default_on_cuda_only():
    """Issue 10: the fast path by default on CUDA (compiled model), --no-compile opts out,
    and the CPU always runs eager (Inductor's CPU compile would cost more than it saves
    at these sizes)."""
    from fastssl.train.pretrain import _compiles

    cfg = PretrainConfig(cache="c")
    assert cfg.compile is True
    assert _compiles(cfg, torch.device("cuda", 0)) and not _compiles(cfg, torch.device("cpu"))
    assert not _compiles(PretrainConfig(cache="c", compile=False), torch.device("cuda", 0))


@pytest.mark.plots
def test_a_finished_run_draws_its_plots_unless_told_not_to(cache, tmp_path):
    """Issue 12 item 3: each job writes its PNGs next to its outputs."""
    from PIL import Image

    base = dict(cache=cache, preset="test", epochs=1, batch_size=8, workers=0, device="cpu", progress=False)
    main(PretrainConfig(out=str(tmp_path / "a"), **base))
    for name in ("loss_curves.png", "reconstructions.png"):
        with Image.open(tmp_path / "a" / name) as png:
            png.verify()
    main(PretrainConfig(out=str(tmp_path / "b"), plots=False, **base))
    assert not list((tmp_path / "b").glob("*.png"))


def test_a_run_reads_the_manifest_once(cache, tmp_path, monkeypatch):
    """Training, validation and the finished run's export share one read of manifest.json
    (the cache layer's own reads, e.g. opening the dataset, are not pretrain's)."""
    import sys

    import fastssl.data.cache as cache_module

    original, callers = cache_module.read_manifest, []

    def counting(cache_dir):
        callers.append(sys._getframe(1).f_globals["__name__"])
        return original(cache_dir)

    monkeypatch.setattr(cache_module, "read_manifest", counting)
    r = main(_cfg(cache, tmp_path, epochs=1, val_batches=1))
    assert r["finished"] and os.path.isfile(tmp_path / "encoder.safetensors")
    assert callers.count("fastssl.train.pretrain") == 1
