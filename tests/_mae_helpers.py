"""Shared by the MAE op tests: facebookresearch/mae transcribed, inputs, tolerances.

Imports no Triton, so the interpreter cases can import it after TRITON_INTERPRET is set.
"""
from __future__ import annotations

import numpy as np
import torch


# ------------------------------------------- facebookresearch/mae, models_mae.py (verbatim
# apart from `self`: patch size passed in; the 3 is MAE's hard-coded channel count)
def mae_patchify(imgs, p):
    assert imgs.shape[2] == imgs.shape[3] and imgs.shape[2] % p == 0
    h = w = imgs.shape[2] // p
    x = imgs.reshape(shape=(imgs.shape[0], 3, h, p, w, p))
    x = torch.einsum('nchpwq->nhwpqc', x)
    x = x.reshape(shape=(imgs.shape[0], h * w, p**2 * 3))
    return x


def mae_forward_loss(imgs, pred, mask, p, norm_pix_loss):
    target = mae_patchify(imgs, p)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.e-6)**.5
    loss = (pred - target) ** 2
    loss = loss.mean(dim=-1)  # [N, L], mean loss per patch
    loss = (loss * mask).sum() / mask.sum()  # mean loss on removed patches
    return loss


# The same two functions with the channel count generalised (1 for radiographs) and
# non-square images allowed: the only change is `3` -> `c` and separate h, w.
def patchify_c(imgs, p):
    n, c, hh, ww = imgs.shape
    h, w = hh // p, ww // p
    x = imgs.reshape(shape=(n, c, h, p, w, p))
    x = torch.einsum('nchpwq->nhwpqc', x)
    return x.reshape(shape=(n, h * w, p**2 * c))


def forward_loss_c(imgs, pred, mask, p, norm_pix_loss):
    target = patchify_c(imgs, p)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.e-6)**.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


# --------------------------------------------------------------------------- inputs
def randn(rng: np.random.Generator, shape, dtype=torch.float32, scale=1.0, shift=0.0):
    return torch.from_numpy(rng.standard_normal(shape) * scale + shift).to(dtype)


def masked_ids(mask: torch.Tensor) -> torch.Tensor:
    """(B, M) indices of the masked patches of a mask with the same count per row."""
    return torch.stack([torch.nonzero(row, as_tuple=False)[:, 0] for row in mask.bool()])


def random_mask(rng: np.random.Generator, b: int, length: int, ratio: float | str,
                *, same_count: bool = False) -> torch.Tensor:
    """(B, L) float32 mask, 1 = masked. ratio "all_but_one" masks L-1 per row. Unless
    same_count, each row masks a different count around the ratio (as a float mask may)."""
    out = np.zeros((b, length), dtype=np.float32)
    for i in range(b):
        if ratio == "all_but_one":
            n = length - 1
        else:
            n = int(length * float(ratio))
            if not same_count and 0 < n < length - 1:
                n = n + (i % 3) - 1
        out[i, rng.permutation(length)[:n]] = 1.0
    return torch.from_numpy(out)


# ----------------------------------------------------------------------- tolerances
def lowp_tolerance(ref64: torch.Tensor, torch_lowp: torch.Tensor, dtype: torch.dtype) -> float:
    """2x the error PyTorch's own low-precision computation makes against float64, plus a
    floor of a few ulps of the output dtype at the reference's scale."""
    err = (torch_lowp.double() - ref64).abs().max().item()
    floor = 4 * torch.finfo(dtype).eps * max(ref64.abs().max().item(), 1e-3)
    return 2 * err + floor


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()
