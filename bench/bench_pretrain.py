"""pytest-benchmark: one pretraining step (forward + backward + AdamW), paired vs single.

    python -m pytest bench/bench_pretrain.py --benchmark-columns=median,ops -q

CPU: the "test" preset (32 px, patch 8, depth 2, width 32), 64 images per step, on 1 and
2 threads. CUDA: ViT-B/16 at 224 px with bf16 autocast, 256 images per step. Paired mode
takes B/2 pairs (+ InfoNCE-free MSE alignment), single mode B images: the same images per
step, so images/s compare directly. extra_info / the summary table hold images/s.
"""
from __future__ import annotations

import contextlib
import time

import pytest
import torch

from fastssl.models.mvmae import MultiViewMAE, model_config

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
PRESET, IMAGES = ("vit_base", 256) if CUDA else ("test", 64)
THREADS = [None] if CUDA else [1, 2]


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("mask_ratio", [0.75, 0.93])
@pytest.mark.parametrize("mode", ["paired", "single"])
def test_train_step(benchmark, record, mode, mask_ratio, threads):
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = model_config(PRESET)
    model = MultiViewMAE(cfg).to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=CUDA)
    x = torch.randn(IMAGES, 1, cfg.img_size, cfg.img_size, device=DEVICE)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if CUDA else contextlib.nullcontext()

    def step():
        with amp:
            if mode == "paired":
                out = model(x[: IMAGES // 2], x[IMAGES // 2:], mask_ratio=mask_ratio, beta=1.0)
            else:
                out = model(x, None, views=0, mask_ratio=mask_ratio)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        _sync()

    for _ in range(3):  # warm-up (allocator, Triton compilation)
        step()
    try:
        benchmark.pedantic(step, rounds=10 if CUDA else 5, iterations=1)
        sec = benchmark.stats.stats.median
    finally:
        torch.set_num_threads(old)
    ips = IMAGES / sec
    benchmark.extra_info.update(images_per_s=ips, device=str(DEVICE), preset=PRESET)
    record("pretrain_step", f"{mode}-m{mask_ratio}-t{threads or 'gpu'}", sec,
           baseline=(mode == "paired" and mask_ratio == 0.75 and threads in (1, None)),
           images_per_s=round(ips, 1), preset=PRESET, images=IMAGES, device=str(DEVICE))
