"""No host syncs in a training step: the ops (and the model) under
``torch.cuda.set_sync_debug_mode("error")``, which raises on any synchronising CUDA call
(a device-to-host copy, ``.item()``, ``nonzero``...). Needs a CUDA device: the debug mode
sees only CUDA synchronisations, so on the CPU there is nothing to check.
"""
from __future__ import annotations

import contextlib
import importlib.util

import pytest
import torch

import fastssl.ops as ops

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA device: set_sync_debug_mode only sees CUDA syncs"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                       reason="the fast path under test is the Triton one"),
]


@contextlib.contextmanager
def _syncs_are_errors():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


class _PairedMAE(torch.nn.Module):
    """The ops in a model's order: mask, gather (+ embeddings), unshuffle, one loss call
    over both views, with indices the model made itself (validate=False)."""

    def __init__(self, p=4, d=32, length=16):
        super().__init__()
        self.p, self.length = p, length
        self.embed = torch.nn.Linear(p * p, d)
        self.pos = torch.nn.Parameter(torch.randn(1, length, d) * 0.02)
        self.view = torch.nn.Embedding(2, d)
        self.mask_token = torch.nn.Parameter(torch.zeros(1, 1, d))
        self.head = torch.nn.Linear(d, p * p)

    def forward(self, imgs, view_ids):
        b = imgs.shape[0]
        ids_keep, ids_restore, mask = ops.random_masking(b, self.length, 0.75, device=imgs.device)
        patches = imgs.unfold(2, self.p, self.p).unfold(3, self.p, self.p)
        tokens = self.embed(patches.reshape(b, self.length, self.p * self.p))
        kept = ops.gather_tokens(tokens, ids_keep, ids_restore=ids_restore, pos_embed=self.pos,
                                 sample_embed=self.view(view_ids), validate=False)
        full = ops.unshuffle_with_mask_token(torch.tanh(kept), self.mask_token, ids_restore,
                                             validate=False)
        return ops.mae_loss(self.head(full), imgs, mask, patch_size=self.p, groups=2)


def _train_step(model, opt, forward):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = forward()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def test_ops_training_step_makes_no_host_sync():
    torch.manual_seed(0)
    model = _PairedMAE().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    imgs = torch.randn(8, 1, 16, 16, device="cuda")
    views = torch.tensor([0] * 4 + [1] * 4, device="cuda")
    _train_step(model, opt, lambda: model(imgs, views))  # warm-up: Triton compiles here
    with _syncs_are_errors():
        for _ in range(2):
            _train_step(model, opt, lambda: model(imgs, views))
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_validation_is_the_one_sync():
    """The check is real: the default validate=True does sync, and is caught."""
    ids_keep, ids_restore, _ = ops.random_masking(2, 16, 0.75, device="cuda")
    x = torch.randn(2, 16, 8, device="cuda")
    ops.gather_tokens(x, ids_keep, validate=True)  # warm-up
    with _syncs_are_errors(), pytest.raises(RuntimeError, match="synchroniz"):
        ops.gather_tokens(x, ids_keep, ids_restore=ids_restore)


@pytest.mark.parametrize("mask_ratio, align", [(0.75, "mse"), (0.93, "mse"), (0.93, "ntxent"),
                                               (0.93, "cosine")])
def test_multiview_mae_step_makes_no_host_sync(mask_ratio, align):
    """MultiViewMAE's paired training step. Pins the model's side: validate=False for the
    indices it draws, no host-to-device copies (beta and the view ids made on the device,
    the alignment's batch count a host int) and no boolean-mask indexing / nonzero when
    every view slot is present (the paired and single entry points). On the CPU,
    tests/test_ops_host_copies.py counts the same copies."""
    from fastssl.models.mvmae import MultiViewMAE, model_config

    torch.manual_seed(0)
    model = MultiViewMAE(model_config("test", align=align)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    x = torch.randn(8, 1, 32, 32, device="cuda")

    def forward():
        return model(x[:4], x[4:], mask_ratio=mask_ratio, beta=0.5)["loss"]
    _train_step(model, opt, forward)
    with _syncs_are_errors():
        _train_step(model, opt, forward)
