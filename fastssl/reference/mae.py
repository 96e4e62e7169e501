"""Reference masked-autoencoder ops: masking, token movement and the reconstruction loss.

Plain PyTorch, differentiable through ordinary autograd. These functions *define* the
semantics of ``fastssl.ops``: they are the CPU path (``impl="torch"``) and the oracle
the Triton kernels are tested against. Where an op's fast path has a hand-written
backward, the closed-form gradient is here too (``*_backward_reference``), itself tested
against autograd of the forward.

Conventions (as facebookresearch/mae):
    imgs: (B, C, H, W); patch grid h = H // p, w = W // p; L = h * w patches, row-major.
    A patch is flattened channel-last: element ``(i * p + j) * C + c`` is pixel (i, j) of
    channel c (``einsum('nchpwq->nhwpqc')``), P = p * p * C values per patch.
    mask: (B, L), 1 = masked (predicted, counts in the loss), 0 = visible.
"""
from __future__ import annotations

import torch

__all__ = [
    "patchify_reference",
    "random_masking_reference",
    "num_kept",
    "gather_tokens_reference",
    "gather_tokens_backward_reference",
    "unshuffle_with_mask_token_reference",
    "unshuffle_with_mask_token_backward_reference",
    "mae_loss_reference",
    "mae_loss_per_group_reference",
    "mae_loss_backward_reference",
]


# ----------------------------------------------------------------------------- masking
def num_kept(num_patches: int, mask_ratio: float) -> int:
    """K = int(L * (1 - mask_ratio)), truncated exactly as facebookresearch/mae does.

    The truncation happens in floating point, so e.g. L=196, ratio=0.93 keeps
    int(13.72) = 13 patches and ratio=0.75 keeps 49.
    """
    return int(num_patches * (1 - mask_ratio))


def random_masking_reference(
    batch: int,
    num_patches: int,
    mask_ratio: float,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by argsort of uniform noise (facebookresearch/mae).

    Returns:
        ids_keep: (B, K) int64, the kept patch indices (in shuffled order).
        ids_restore: (B, L) int64, position of each patch in the shuffled order; a patch
            is visible iff ``ids_restore[b, l] < K``.
        mask: (B, L) float32, 1 = masked, 0 = kept.
    """
    keep = num_kept(num_patches, mask_ratio)
    noise = torch.rand(batch, num_patches, device=device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    mask = torch.ones(batch, num_patches, device=noise.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return ids_keep, ids_restore, mask


# ------------------------------------------------------------------------ token moves
def _pos_2d(pos_embed: torch.Tensor) -> torch.Tensor:
    return pos_embed.reshape(pos_embed.shape[-2], pos_embed.shape[-1])


def gather_tokens_reference(
    x: torch.Tensor,
    ids_keep: torch.Tensor,
    *,
    pos_embed: torch.Tensor | None = None,
    sample_embed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Kept tokens plus their position embedding plus a per-sample embedding.

    Args:
        x: (B, L, D) patch tokens.
        ids_keep: (B, K) integer indices into L.
        pos_embed: (L, D) or (1, L, D), added to each token before the gather.
        sample_embed: (B, D), added to every kept token of sample b (view-type embedding).
    Returns:
        (B, K, D): ``(x + pos_embed)[b, ids_keep[b, k]] + sample_embed[b]``, dtype the
        promotion of the inputs' dtypes.
    """
    if pos_embed is not None:
        x = x + _pos_2d(pos_embed)
    index = ids_keep.long().unsqueeze(-1).expand(-1, -1, x.shape[-1])
    out = torch.gather(x, 1, index)
    if sample_embed is not None:
        out = out + sample_embed.unsqueeze(1)
    return out


def gather_tokens_backward_reference(
    grad_out: torch.Tensor,
    ids_keep: torch.Tensor,
    num_patches: int,
    *,
    x_dtype: torch.dtype,
    pos_embed: torch.Tensor | None = None,
    sample_embed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Closed-form gradients of :func:`gather_tokens_reference`.

    Returns grad_x (B, L, D) in ``x_dtype`` (rows scattered-added, zero where not kept),
    grad_pos_embed (pos_embed's shape and dtype, the sum of grad_x over the batch) and
    grad_sample_embed ((B, D), the sum of grad_out over K), None for absent embeddings.
    """
    b, _, d = grad_out.shape
    acc = torch.promote_types(grad_out.dtype, torch.float32)
    g = grad_out.to(acc)
    index = ids_keep.long().unsqueeze(-1).expand(-1, -1, d)
    grad_x = torch.zeros(b, num_patches, d, dtype=acc, device=g.device).scatter_add_(1, index, g)
    grad_pos = grad_se = None
    if pos_embed is not None:
        grad_pos = grad_x.sum(0).reshape(pos_embed.shape).to(pos_embed.dtype)
    if sample_embed is not None:
        grad_se = g.sum(1).to(sample_embed.dtype)
    return grad_x.to(x_dtype), grad_pos, grad_se


def unshuffle_with_mask_token_reference(
    x_vis: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor
) -> torch.Tensor:
    """The decoder input: visible tokens put back in place, mask tokens elsewhere.

    Args:
        x_vis: (B, K, D) visible tokens, in shuffled (ids_keep) order, without CLS.
        mask_token: (D,) (any shape with D elements).
        ids_restore: (B, L) integers; values < K pick a visible token, values >= K
            select the mask token (as ``torch.cat([x_vis, mask_tokens])`` then gather).
    Returns:
        (B, L, D): ``x_vis[b, ids_restore[b, l]]`` if ``ids_restore[b, l] < K`` else
        ``mask_token``; dtype the promotion of x_vis's and mask_token's.
    """
    b, k, d = x_vis.shape
    dtype = torch.promote_types(x_vis.dtype, mask_token.dtype)
    # One mask-token slot after the visible ones; every id >= K reads it.
    tokens = mask_token.reshape(1, 1, d).expand(b, 1, d)
    full = torch.cat([x_vis.to(dtype), tokens.to(dtype)], 1)
    index = ids_restore.long().clamp(max=k).unsqueeze(-1).expand(-1, -1, d)
    return torch.gather(full, 1, index)


def unshuffle_with_mask_token_backward_reference(
    grad_out: torch.Tensor,
    ids_restore: torch.Tensor,
    num_visible: int,
    *,
    x_dtype: torch.dtype,
    token_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form gradients of :func:`unshuffle_with_mask_token_reference`.

    Returns grad_x_vis (B, K, D) in ``x_dtype`` and grad_mask_token (D,) in
    ``token_dtype`` (the sum of grad_out over every masked position of every sample).
    """
    b, _, d = grad_out.shape
    acc = torch.promote_types(grad_out.dtype, torch.float32)
    g = grad_out.to(acc)
    idx = ids_restore.long().clamp(max=num_visible)
    full = torch.zeros(b, num_visible + 1, d, dtype=acc, device=g.device)
    full.scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, d), g)
    return full[:, :num_visible].to(x_dtype), full[:, num_visible].sum(0).to(token_dtype)


# ------------------------------------------------------------------ reconstruction loss
def patchify_reference(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C) in facebookresearch/mae's order, any C."""
    n, c, h_img, w_img = imgs.shape
    p = patch_size
    h, w = h_img // p, w_img // p
    x = imgs.reshape(n, c, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, h * w, p * p * c)


def _loss_terms(pred, imgs, mask, patch_size, target, eps, ids_masked):
    """(target patches, row weights) in the compute dtype (float64 stays float64)."""
    acc = torch.float64 if pred.dtype == torch.float64 else torch.float32
    patches = patchify_reference(imgs.to(acc), patch_size)
    if ids_masked is not None:
        index = ids_masked.long().unsqueeze(-1).expand(-1, -1, patches.shape[-1])
        patches = torch.gather(patches, 1, index)
        weight = torch.ones(pred.shape[:2], dtype=acc, device=pred.device)
    else:
        weight = mask.to(acc)
    if target == "norm_pix":
        mean = patches.mean(dim=-1, keepdim=True)
        var = patches.var(dim=-1, keepdim=True)  # unbiased, as MAE's norm_pix_loss
        patches = (patches - mean) / (var + eps) ** 0.5
    elif target != "pixel":
        raise ValueError(f"target={target!r}; expected 'norm_pix' or 'pixel'")
    return patches, weight, acc


def _safe_denominator(weight: torch.Tensor) -> torch.Tensor:
    # An all-zero mask has nothing to reconstruct: dividing by 1 instead of 0 turns the
    # (then exactly zero) numerator into a zero loss and a zero gradient, never NaN.
    total = weight.sum(dim=-1)
    return torch.where(total != 0, total, torch.ones_like(total))


def _by_group(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, ...) -> (G, B/G * prod(...)): group g is the g-th consecutive slice of the batch."""
    if groups < 1 or t.shape[0] % groups:
        raise ValueError(f"groups={groups} must be a positive divisor of the batch size "
                         f"{t.shape[0]}")
    return t.reshape(groups, -1)


def mae_loss_per_group_reference(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    patch_size: int,
    target: str = "norm_pix",
    eps: float = 1e-6,
    ids_masked: torch.Tensor | None = None,
    groups: int = 1,
) -> torch.Tensor:
    """(G,) MAE losses of G equal consecutive slices of the batch (e.g. G=2: the frontal
    then the lateral views of a paired batch), each ``sum(mse * w) / sum(w)`` over its
    own rows (0 when its ``sum(w) == 0``). Arguments as :func:`mae_loss_reference`."""
    patches, weight, acc = _loss_terms(pred, imgs, mask, patch_size, target, eps, ids_masked)
    mse = ((pred.to(acc) - patches) ** 2).mean(dim=-1)
    w = _by_group(weight, groups)
    return (_by_group(mse, groups) * w).sum(dim=-1) / _safe_denominator(w)


def mae_loss_reference(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    patch_size: int,
    target: str = "norm_pix",
    eps: float = 1e-6,
    ids_masked: torch.Tensor | None = None,
    groups: int = 1,
) -> torch.Tensor:
    """MAE reconstruction loss: per-patch MSE averaged over the masked patches.

    Args:
        pred: (B, L, P) one prediction per patch, or (B, M, P) with ``ids_masked``.
            P = patch_size**2 * C.
        imgs: (B, C, H, W), H and W multiples of patch_size.
        mask: (B, L) float or bool, 1 = masked; weights of the per-patch MSE. Ignored
            (may be None) in the compact layout.
        patch_size: p.
        target: "norm_pix" (each target patch normalised by its mean and unbiased
            variance, ``(t - mean) / sqrt(var + eps)``) or "pixel" (raw pixels).
        ids_masked: (B, M) integers: row m of pred predicts patch ids_masked[b, m]; every
            row counts with weight 1 (the compact layout of a decoder that predicts only
            masked tokens).
        groups: G dividing B: the loss is the mean of the G per-group losses of
            :func:`mae_loss_per_group_reference` (1: MAE's loss over the whole batch).
    Returns:
        scalar: ``sum(mse * w) / sum(w)`` (G=1), 0 when ``sum(w) == 0``. float32 (float64
        when pred is float64).
    """
    return mae_loss_per_group_reference(pred, imgs, mask, patch_size=patch_size, target=target,
                                        eps=eps, ids_masked=ids_masked, groups=groups).mean()


def mae_loss_backward_reference(
    grad_out: torch.Tensor,
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    patch_size: int,
    target: str = "norm_pix",
    eps: float = 1e-6,
    ids_masked: torch.Tensor | None = None,
    groups: int = 1,
    grad_groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """Closed-form d total / d pred, in pred's dtype, for
    ``total = grad_out * loss + sum(grad_groups * per_group)`` (grad_groups (G,) or None).

    ``grad = c[g] * w[b, r] / sum_g(w) * 2 * (pred - target) / P`` with
    ``c[g] = grad_out / G + grad_groups[g]``; the target does not depend on pred, so
    norm_pix adds no term.
    """
    patches, weight, acc = _loss_terms(pred, imgs, mask, patch_size, target, eps, ids_masked)
    coef = grad_out.to(acc).reshape(()) / groups
    if grad_groups is not None:
        coef = coef + grad_groups.to(acc).reshape(groups)
    scale = (coef / _safe_denominator(_by_group(weight, groups))).reshape(groups, 1)
    row_scale = (_by_group(weight, groups) * scale).reshape(weight.shape)
    p_len = pred.shape[-1]
    grad = (pred.to(acc) - patches) * (row_scale * (2.0 / p_len)).unsqueeze(-1)
    return grad.to(pred.dtype)
