"""pytest-benchmark: fastssl.ops.mae_loss, eager reference vs torch.compile vs Triton.

    pytest bench/bench_mae_loss.py --benchmark-columns=median,ops -q

Shapes are named after real use: ViT-B/16 on 224 px 1-channel radiographs (L=196,
P=256) at mask 0.75 (MAE) and 0.93 (MVMAE), and ViT-L/16 on 3-channel images (P=768);
batch 256 on a GPU, reduced on the CPU so that the suite takes a couple of minutes.
``extra_info`` holds GB/s over the ideal bytes: pred, imgs, mask read once (fwd) plus the
gradient written once (bwd, fwd+bwd). Triton providers need CUDA and are skipped without.
"""
from __future__ import annotations

import pytest
import torch

import fastssl.ops as ops
from fastssl.reference import mae as ref

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
BATCH = 256 if CUDA else 8
ROUNDS = 20 if CUDA else 3

SHAPES = {  # name: (channels, image, patch, mask ratio)
    "vitb16-224-1ch-m0.75": (1, 224, 16, 0.75),
    "vitb16-224-1ch-m0.93": (1, 224, 16, 0.93),
    "vitl16-224-3ch-m0.75": (3, 224, 16, 0.75),
}


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _ref(pred, imgs, mask, p):
    return ref.mae_loss_reference(pred, imgs, mask, patch_size=p)


def _triton(pred, imgs, mask, p):
    return ops.mae_loss(pred, imgs, mask, patch_size=p, impl="triton", validate=False)


_COMPILED = {}


def _provider(name):
    if name == "eager":
        return _ref
    if name == "compile":
        if "c" not in _COMPILED:
            _COMPILED["c"] = torch.compile(_ref, dynamic=False)
        return _COMPILED["c"]
    if not CUDA:
        pytest.skip("the Triton provider needs a CUDA device (none here)")
    return _triton


@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("provider", ["eager", "compile", "triton"])
def test_mae_loss(benchmark, provider, shape, mode):
    fn = _provider(provider)
    c, img, p, ratio = SHAPES[shape]
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    length = (img // p) ** 2
    imgs = torch.randn(BATCH, c, img, img, device=DEVICE, generator=gen)
    pred = torch.randn(BATCH, length, p * p * c, device=DEVICE, generator=gen).requires_grad_()
    _, _, mask = ops.random_masking(BATCH, length, ratio, device=DEVICE, generator=gen)

    if mode == "fwd":
        def step():
            with torch.no_grad():
                fn(pred, imgs, mask, p)
            _sync()
    elif mode == "bwd":
        loss = fn(pred, imgs, mask, p)

        def step():
            torch.autograd.grad(loss, pred, retain_graph=True)
            _sync()
    else:
        def step():
            torch.autograd.grad(fn(pred, imgs, mask, p), pred)
            _sync()

    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    nbytes = (pred.numel() * pred.element_size() + imgs.numel() * imgs.element_size()
              + mask.numel() * mask.element_size())
    if mode != "fwd":
        nbytes += pred.numel() * pred.element_size()
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(device=str(DEVICE), batch=BATCH, bytes=nbytes,
                                GBps=round(nbytes / median / 1e9, 2))
