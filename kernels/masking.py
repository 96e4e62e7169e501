"""Token movement of masked autoencoding: gather the kept tokens, unshuffle with a mask token.

Four kernels, each with its launcher:

* ``gather_tokens_fwd``: out[b, k] = x[b, ids[b, k]] + pos[ids[b, k]] + se[b], one program
  per (sample, block of K, block of D); the embeddings are added in the same pass.
* ``gather_tokens_bwd``: driven by the inverse map ``inv[b, l]`` (the k that kept patch l,
  or K when l was dropped), one program per (block of L, block of D, chunk of samples):
  every grad_x row is written once (dropped rows as zeros: no zero-fill pass, no atomics),
  and grad_pos / grad_sample_embed are reduced in registers into small fp32 partials.
* ``unshuffle_fwd``: out[b, l] = x_vis[b, r] if r = ids_restore[b, l] < K else mask_token.
* ``unshuffle_bwd``: reads grad_out once; a visible row is stored to grad_x_vis[b, r], a
  masked row is added into a per-program mask-token partial.

Index contract: gather's ids and unshuffle's ids_restore hold distinct indices per sample
(a permutation, as ``random_masking`` produces), so the backward scatters never collide.
Indices out of range read nothing (zeros / the mask token) instead of stray memory; the
Python layer rejects them before launch when validating. Nothing here imports fastssl.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["gather_tokens_fwd", "gather_tokens_bwd", "unshuffle_fwd", "unshuffle_bwd",
           "inverse_ids"]


def _block_d(d: int) -> int:
    return min(triton.next_power_of_2(d), 256)


def _block_rows(rows: int, block_d: int, max_tile: int) -> int:
    return max(1, min(triton.next_power_of_2(rows), max_tile // block_d))


def _warps(tile: int) -> int:
    return 8 if tile >= 8192 else 4


# ---------------------------------------------------------------------------- gather
@triton.jit
def _gather_fwd_kernel(
    x_ptr, ids_ptr, pos_ptr, se_ptr, out_ptr,
    K, L, D,
    stride_xb, stride_xl, stride_ib, stride_ik, stride_pl, stride_sb, stride_ob, stride_ok,
    HAS_POS: tl.constexpr, HAS_SE: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ds = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    k_ok = ks < K
    d_ok = ds < D
    idx = tl.load(ids_ptr + b * stride_ib + ks * stride_ik, mask=k_ok, other=0).to(tl.int64)
    hit = k_ok & (idx >= 0) & (idx < L)
    m = hit[:, None] & d_ok[None, :]
    v = tl.load(x_ptr + b * stride_xb + idx[:, None] * stride_xl + ds[None, :], mask=m,
                other=0.0).to(tl.float32)
    if HAS_POS:
        v += tl.load(pos_ptr + idx[:, None] * stride_pl + ds[None, :], mask=m,
                     other=0.0).to(tl.float32)
    if HAS_SE:
        v += tl.load(se_ptr + b * stride_sb + ds, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + b * stride_ob + ks[:, None].to(tl.int64) * stride_ok + ds[None, :],
             v.to(out_ptr.dtype.element_ty), mask=k_ok[:, None] & d_ok[None, :])


@triton.jit
def _gather_bwd_kernel(
    g_ptr, inv_ptr, gx_ptr, gpos_ptr, gse_ptr,
    B, K, L, D, B_PER_PROG,
    stride_gb, stride_gk, stride_vb,
    HAS_POS: tl.constexpr, HAS_SE: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    lb = tl.program_id(0)
    ls = lb * BLOCK_L + tl.arange(0, BLOCK_L)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    bc = tl.program_id(2)
    l_ok = ls < L
    d_ok = ds < D
    acc_pos = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    for bi in range(0, B_PER_PROG):
        b = bc * B_PER_PROG + bi
        b_ok = b < B
        b64 = b.to(tl.int64)
        k = tl.load(inv_ptr + b64 * stride_vb + ls, mask=l_ok & b_ok, other=K).to(tl.int64)
        hit = (k < K) & l_ok & b_ok
        g = tl.load(g_ptr + b64 * stride_gb + k[:, None] * stride_gk + ds[None, :],
                    mask=hit[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        # grad_x is contiguous (B, L, D): dropped rows get their zeros here.
        tl.store(gx_ptr + (b64 * L + ls[:, None]) * D + ds[None, :],
                 g.to(gx_ptr.dtype.element_ty), mask=(l_ok & b_ok)[:, None] & d_ok[None, :])
        if HAS_POS:
            acc_pos += g
        if HAS_SE:  # partial (n_l_blocks, B, D): sum over this block's rows
            tl.store(gse_ptr + (lb * B + b64) * D + ds, tl.sum(g, axis=0), mask=d_ok & b_ok)
    if HAS_POS:  # partial (n_b_chunks, L, D)
        tl.store(gpos_ptr + (bc * L + ls[:, None]).to(tl.int64) * D + ds[None, :], acc_pos,
                 mask=l_ok[:, None] & d_ok[None, :])


def gather_tokens_fwd(x, ids, pos, se, out_dtype, *, max_tile: int = 4096) -> torch.Tensor:
    """(B, K, D) kept tokens + embeddings.

    Args:
        x: (B, L, D), last dim contiguous (copied otherwise). ids: (B, K) int32|int64.
        pos: (L, D) or None; se: (B, D) or None; both last dim contiguous.
        out_dtype: dtype of the result (the promotion of the inputs').
    """
    bsz, length, d = x.shape
    k = ids.shape[1]
    x = x if x.stride(2) == 1 else x.contiguous()
    out = torch.empty((bsz, k, d), dtype=out_dtype, device=x.device)
    if k == 0 or d == 0 or bsz == 0:
        return out
    block_d = _block_d(d)
    block_k = _block_rows(k, block_d, max_tile)
    pos_t = pos if pos is not None else x
    se_t = se if se is not None else x
    grid = (bsz, triton.cdiv(k, block_k), triton.cdiv(d, block_d))
    _gather_fwd_kernel[grid](
        x, ids, pos_t, se_t, out, k, length, d,
        x.stride(0), x.stride(1), ids.stride(0), ids.stride(1),
        pos.stride(0) if pos is not None else 0, se.stride(0) if se is not None else 0,
        out.stride(0), out.stride(1),
        HAS_POS=pos is not None, HAS_SE=se is not None,
        BLOCK_K=block_k, BLOCK_D=block_d, num_warps=_warps(block_k * block_d),
    )
    return out


def inverse_ids(ids: torch.Tensor, length: int) -> torch.Tensor:
    """(B, length) int32: inv[b, l] = k where ids[b, k] == l, else K. Out-of-range ids are
    sent to a spare column so that the scatter never writes out of bounds."""
    bsz, k = ids.shape
    safe = torch.where((ids >= 0) & (ids < length), ids, length).long()
    inv = torch.full((bsz, length + 1), k, dtype=torch.int32, device=ids.device)
    src = torch.arange(k, dtype=torch.int32, device=ids.device).expand(bsz, k)
    inv.scatter_(1, safe, src)
    return inv[:, :length]


def gather_tokens_bwd(grad_out, ids, length, x_dtype, pos_shape_dtype, se_dtype, *,
                      max_tile: int = 4096, min_programs: int = 512):
    """Gradients of gather_tokens_fwd.

    Args:
        grad_out: (B, K, D). ids: (B, K), distinct per row. length: L.
        pos_shape_dtype: (shape, dtype) of pos_embed or None; se_dtype: dtype or None.
        min_programs: split the batch into chunks until the grid has about this many
            programs (each chunk adds one fp32 (L, D) partial of grad_pos).
    Returns:
        grad_x (B, L, D) x_dtype, grad_pos (shape, dtype) or None, grad_se (B, D) or None.
    """
    bsz, k, d = grad_out.shape
    g = grad_out if grad_out.stride(2) == 1 else grad_out.contiguous()
    grad_x = torch.empty((bsz, length, d), dtype=x_dtype, device=g.device)
    inv = inverse_ids(ids, length)
    block_d = _block_d(d)
    block_l = _block_rows(length, block_d, max_tile)
    n_lb, n_db = triton.cdiv(length, block_l), triton.cdiv(d, block_d)
    n_bc = max(1, min(bsz, triton.cdiv(min_programs, n_lb * n_db)))
    b_per = triton.cdiv(bsz, n_bc)
    n_bc = triton.cdiv(bsz, b_per)
    has_pos, has_se = pos_shape_dtype is not None, se_dtype is not None
    f32 = dict(dtype=torch.float32, device=g.device)
    gpos = torch.empty((n_bc, length, d), **f32) if has_pos else grad_x
    gse = torch.empty((n_lb, bsz, d), **f32) if has_se else grad_x
    _gather_bwd_kernel[(n_lb, n_db, n_bc)](
        g, inv, grad_x, gpos, gse, bsz, k, length, d, b_per,
        g.stride(0), g.stride(1), inv.stride(0),
        HAS_POS=has_pos, HAS_SE=has_se, BLOCK_L=block_l, BLOCK_D=block_d,
        num_warps=_warps(block_l * block_d),
    )
    grad_pos = grad_se = None
    if has_pos:
        shape, dtype = pos_shape_dtype
        grad_pos = gpos.sum(0).reshape(shape).to(dtype)
    if has_se:
        grad_se = gse.sum(0).to(se_dtype)
    return grad_x, grad_pos, grad_se


# ------------------------------------------------------------------------- unshuffle
@triton.jit
def _unshuffle_fwd_kernel(
    xv_ptr, tok_ptr, ids_ptr, out_ptr,
    K, L, D,
    stride_xb, stride_xk, stride_ib, stride_il,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    ls = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    ds = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    l_ok = ls < L
    d_ok = ds < D
    r = tl.load(ids_ptr + b * stride_ib + ls * stride_il, mask=l_ok, other=K).to(tl.int64)
    vis = l_ok & (r >= 0) & (r < K)
    v = tl.load(xv_ptr + b * stride_xb + r[:, None] * stride_xk + ds[None, :],
                mask=vis[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    tok = tl.load(tok_ptr + ds, mask=d_ok, other=0.0).to(tl.float32)
    out = tl.where(vis[:, None], v, tok[None, :])
    tl.store(out_ptr + (b * L + ls[:, None]) * D + ds[None, :], out.to(out_ptr.dtype.element_ty),
             mask=l_ok[:, None] & d_ok[None, :])


@triton.jit
def _unshuffle_bwd_kernel(
    g_ptr, ids_ptr, gx_ptr, gtok_ptr,
    K, L, D, n_l_blocks,
    stride_gb, stride_gl, stride_ib, stride_il,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    lb = tl.program_id(1)
    ls = lb * BLOCK_L + tl.arange(0, BLOCK_L)
    ds = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    l_ok = ls < L
    d_ok = ds < D
    r = tl.load(ids_ptr + b * stride_ib + ls * stride_il, mask=l_ok, other=K).to(tl.int64)
    vis = l_ok & (r >= 0) & (r < K)
    m = l_ok[:, None] & d_ok[None, :]
    g = tl.load(g_ptr + b * stride_gb + ls[:, None].to(tl.int64) * stride_gl + ds[None, :],
                mask=m, other=0.0).to(tl.float32)
    # grad_x_vis is contiguous (B, K, D); ids_restore is a permutation, so each visible
    # row is stored by exactly one program.
    tl.store(gx_ptr + (b * K + r[:, None]) * D + ds[None, :], g.to(gx_ptr.dtype.element_ty),
             mask=vis[:, None] & d_ok[None, :])
    tok = tl.sum(tl.where(vis[:, None], 0.0, g), axis=0)
    tl.store(gtok_ptr + (b * n_l_blocks + lb) * D + ds, tok, mask=d_ok)


def unshuffle_fwd(x_vis, mask_token, ids_restore, out_dtype, *, max_tile: int = 4096):
    """(B, L, D) decoder input. x_vis: (B, K, D); mask_token: (D,) contiguous;
    ids_restore: (B, L) int32|int64."""
    bsz, k, d = x_vis.shape
    length = ids_restore.shape[1]
    x_vis = x_vis if x_vis.stride(2) == 1 else x_vis.contiguous()
    out = torch.empty((bsz, length, d), dtype=out_dtype, device=x_vis.device)
    if out.numel() == 0:
        return out
    block_d = _block_d(d)
    block_l = _block_rows(length, block_d, max_tile)
    grid = (bsz, triton.cdiv(length, block_l), triton.cdiv(d, block_d))
    _unshuffle_fwd_kernel[grid](
        x_vis, mask_token, ids_restore, out, k, length, d,
        x_vis.stride(0), x_vis.stride(1), ids_restore.stride(0), ids_restore.stride(1),
        BLOCK_L=block_l, BLOCK_D=block_d, num_warps=_warps(block_l * block_d),
    )
    return out


def unshuffle_bwd(grad_out, ids_restore, num_visible, x_dtype, token_dtype, *,
                  max_tile: int = 4096):
    """(grad_x_vis (B, K, D) x_dtype, grad_mask_token (D,) token_dtype)."""
    bsz, length, d = grad_out.shape
    g = grad_out if grad_out.stride(2) == 1 else grad_out.contiguous()
    gx = torch.empty((bsz, num_visible, d), dtype=x_dtype, device=g.device)
    block_d = _block_d(d)
    block_l = _block_rows(length, block_d, max_tile)
    n_lb = triton.cdiv(length, block_l)
    gtok = torch.empty((bsz * n_lb, d), dtype=torch.float32, device=g.device)
    _unshuffle_bwd_kernel[(bsz, n_lb, triton.cdiv(d, block_d))](
        g, ids_restore, gx, gtok, num_visible, length, d, n_lb,
        g.stride(0), g.stride(1), ids_restore.stride(0), ids_restore.stride(1),
        BLOCK_L=block_l, BLOCK_D=block_d, num_warps=_warps(block_l * block_d),
    )
    return gx, gtok.sum(0).to(token_dtype)
