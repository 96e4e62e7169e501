"""fastssl.train.pretrain: schedules, parameter groups, and a tiny run on a phantom cache
that is stopped and resumed twice and must equal the uninterrupted run bit for bit."""
from __future__ import annotations

import json
import math
import os
from dataclasses import replace

import pytest
import torch

from _mvmae_helpers import one_thread, phantom_cache
from fastssl.models.mvmae import MultiViewMAE, model_config
from fastssl.train.pretrain import PretrainConfig, Schedule, load_encoder, main, param_groups


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
                          base_lr=1e-3, seed=3, device="cpu")  # CPU: bitwise-reproducible
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


def test_resume_continues_exactly(cache, tmp_path, capsys):
    a = main(_cfg(cache, tmp_path / "a"))
    assert a["finished"] and a["step"] == a["total_steps"] == 8  # 16 pairs / 4 = 4 steps x 2 epochs
    head = capsys.readouterr().out
    assert "effective_batch=4" in head and f"lr={1e-3 * 4 / 256:.3e}" in head and "'mae_loss': 'torch'" in head
    # Stopped mid-epoch 0, then mid-epoch 1, then run to the end: each rerun resumes.
    b = _cfg(cache, tmp_path / "b")
    assert main(replace(b, stop_after_steps=3))["step"] == 3
    assert main(replace(b, stop_after_steps=3))["step"] == 6
    assert main(b)["finished"]
    ca = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    cb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert ca["step"] == cb["step"] == 8
    for k, v in ca["model"].items():
        assert torch.equal(v, cb["model"][k]), k
    for k, v in ca["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg"], cb["optimizer"]["state"][k]["exp_avg"])
    ma, mb = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert [m["step"] for m in mb] == list(range(1, 9))  # no step logged twice
    for x, y in zip(ma, mb):
        assert (x["loss"], x["align"], x["lr"], x["beta"]) == (y["loss"], y["align"], y["lr"], y["beta"])
    # learning rate and beta follow the schedule: lr = 1e-3 * 4 / 256, 4 warm-up steps
    assert ma[1]["lr"] == pytest.approx(1e-3 * 4 / 256 * 1 / 4) and ma[0]["beta"] == 0.0
    # finished work is detected: nothing is redone
    mtime = os.path.getmtime(tmp_path / "a" / "checkpoint.pt")
    again = main(_cfg(cache, tmp_path / "a"))
    assert again["finished"] and os.path.getmtime(tmp_path / "a" / "checkpoint.pt") == mtime
    # the exported encoder is the trained one
    enc = load_encoder(str(tmp_path / "a" / "encoder.safetensors"))
    for k, v in enc.state_dict().items():
        assert torch.equal(v, ca["model"]["encoder." + k])
    with pytest.raises(ValueError, match="other settings"):
        main(_cfg(cache, tmp_path / "a", mode="single"))


@pytest.mark.parametrize("mode", ["single", "supervised"])
def test_baseline_modes_run(cache, tmp_path, mode):
    r = main(_cfg(cache, tmp_path, mode=mode, epochs=1, batch_size=8, target="norm_pix"))
    assert r["finished"] and r["step"] == 4  # 39 train images // 8
    rec = _metrics(tmp_path)[-1]
    assert rec["align"] == 0.0 and rec["beta"] == 0.0 and math.isfinite(rec["loss"]) and rec["imgs_per_s"] > 0
    assert load_encoder(str(tmp_path / "checkpoint.pt")).cfg.img_size == 32


def test_loss_decreases_on_the_phantom(cache, tmp_path):
    r = main(_cfg(cache, tmp_path, epochs=6, base_lr=2e-2, warmup_epochs=1, augment=False, beta_max=0.0,
                  mask_ratio=0.5))
    recon = [m["recon"] for m in _metrics(tmp_path)]
    assert r["finished"] and sum(recon[-4:]) < 0.85 * sum(recon[:4]), recon


def test_bad_settings(cache, tmp_path):
    with pytest.raises(ValueError, match="mode"):
        main(_cfg(cache, tmp_path, mode="clip"))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        main(_cfg(cache, tmp_path, batch_size=64))
    with pytest.raises(ValueError, match="mask_ratio"):
        main(_cfg(cache, tmp_path, mask_ratio=1.0))


def _ddp_worker(rank, world, port, cache, out, result_dir):
    import torch.distributed as dist

    from fastssl.models.mvmae import alignment_loss

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from fastssl import distributed

    distributed.init(backend="gloo")  # also on a GPU machine: both ranks share one host
    r = main(_cfg(cache, out, epochs=1, batch_size=4, align="infonce"))  # initialises gloo
    # InfoNCE with negatives gathered across ranks == one process over the global batch
    g = torch.Generator().manual_seed(0)
    za, zb = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    local = alignment_loss(za[4 * rank:4 * rank + 4], zb[4 * rank:4 * rank + 4], "infonce")
    dist.all_reduce(local)
    dist.destroy_process_group()
    want = float(alignment_loss(za, zb, "infonce"))  # alone now: no gathering
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(dict(step=r["step"], total=r["total_steps"], loss=float(local) / world, want=want), handle)


def test_two_gloo_ranks(cache, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, cache, str(tmp_path / "run"), str(tmp_path)), nprocs=2)
    res = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert res[0]["step"] == res[1]["step"] == res[0]["total"] == 2  # 16 pairs / (4 x 2 ranks)
    assert res[0]["loss"] == pytest.approx(res[0]["want"], rel=1e-5)
    assert os.path.isfile(tmp_path / "run" / "encoder.safetensors")
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert len(ck["rng"]["generators"]) == 2  # each rank resumes its own masks
