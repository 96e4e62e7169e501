"""pytest-benchmark: fastssl.ops.gather_tokens (and unshuffle_with_mask_token), eager
reference vs torch.compile vs Triton.

    pytest bench/bench_gather.py --benchmark-columns=median,ops -q

Shapes: ViT-B/16 tokens (L=196, D=768) at mask 0.75 and 0.93, ViT-L/16 (D=1024); bf16
tokens with fp32 position and view embeddings (the autocast case) on a GPU, fp32 on the
CPU; batch 256 on a GPU, reduced on the CPU. ``extra_info`` holds GB/s over the ideal
bytes: kept rows read and written once (fwd), gradients read and written once (bwd).
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
DTYPE = torch.bfloat16 if CUDA else torch.float32

SHAPES = {  # name: (L, D, mask ratio)
    "vitb16-d768-m0.75": (196, 768, 0.75),
    "vitb16-d768-m0.93": (196, 768, 0.93),
    "vitl16-d1024-m0.75": (196, 1024, 0.75),
}


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _gather_ref(x, ids, pos, se, ids_restore):
    return ref.gather_tokens_reference(x, ids, pos_embed=pos, sample_embed=se)


def _gather_triton(x, ids, pos, se, ids_restore):
    return ops.gather_tokens(x, ids, ids_restore=ids_restore, pos_embed=pos, sample_embed=se,
                             impl="triton", validate=False)


def _unshuffle_ref(x, ids, pos, se, ids_restore):
    return ref.unshuffle_with_mask_token_reference(x, se[0], ids_restore)


def _unshuffle_triton(x, ids, pos, se, ids_restore):
    return ops.unshuffle_with_mask_token(x, se[0], ids_restore, impl="triton", validate=False)


_FNS = {("gather", "eager"): _gather_ref, ("gather", "triton"): _gather_triton,
        ("unshuffle", "eager"): _unshuffle_ref, ("unshuffle", "triton"): _unshuffle_triton}
_COMPILED = {}


def _provider(op, name):
    if name == "compile":
        if op not in _COMPILED:
            _COMPILED[op] = torch.compile(_FNS[(op, "eager")], dynamic=False)
        return _COMPILED[op]
    if name == "triton" and not CUDA:
        pytest.skip("the Triton provider needs a CUDA device (none here)")
    return _FNS[(op, name)]


@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("provider", ["eager", "compile", "triton"])
@pytest.mark.parametrize("op", ["gather", "unshuffle"])
def test_token_move(benchmark, op, provider, shape, mode):
    fn = _provider(op, provider)
    length, d, ratio = SHAPES[shape]
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    ids_keep, ids_restore, _ = ops.random_masking(BATCH, length, ratio, device=DEVICE,
                                                  generator=gen)
    k = ids_keep.shape[1]
    rows = length if op == "gather" else k
    x = torch.randn(BATCH, rows, d, device=DEVICE, generator=gen).to(DTYPE).requires_grad_()
    pos = torch.randn(1, length, d, device=DEVICE, generator=gen).requires_grad_()
    se = torch.randn(BATCH, d, device=DEVICE, generator=gen).requires_grad_()
    leaves = (x, pos, se) if op == "gather" else (x, se)
    args = (x, ids_keep, pos, se, ids_restore)
    out = fn(*args)
    g = torch.randn(out.shape, device=DEVICE, generator=gen).to(out.dtype)

    if mode == "fwd":
        def step():
            with torch.no_grad():
                fn(*args)
            _sync()
    elif mode == "bwd":
        def step():
            torch.autograd.grad(out, leaves, g, retain_graph=True)
            _sync()
    else:
        def step():
            torch.autograd.grad(fn(*args), leaves, g)
            _sync()

    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    es, oes = x.element_size(), out.element_size()
    # gather: kept rows of x read, out written; bwd: grad_out read, dense grad_x written.
    # unshuffle: x_vis read, (B, L, D) out written; bwd: grad_out read, grad_x_vis written.
    out_rows = k if op == "gather" else length
    fwd = BATCH * d * (k * es + out_rows * oes)
    bwd = BATCH * d * (out_rows * oes + rows * es)
    nbytes = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(device=str(DEVICE), batch=BATCH, dtype=str(DTYPE)[6:],
                                bytes=nbytes, GBps=round(nbytes / median / 1e9, 2))
