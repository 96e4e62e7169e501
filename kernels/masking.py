"""Token movement of masked autoencoding: gather the kept tokens, unshuffle with a mask token.

Four kernels, each with its launcher:

* ``gather_tokens_fwd``: out[b, k] = x[b, ids[b, k]] + pos[ids[b, k]] + se[b], one program
  per (sample, block of K, block of D); the embeddings are added in the same pass.
* ``gather_tokens_bwd``: driven by ``ids_restore[b, l]`` (the k that kept patch l, or >= K
  when l was dropped; random_masking returns it), one program per (block of L, block of
  D, slice of the batch): every grad_x row is written once (dropped rows as zeros: no
  zero-fill pass), grad_pos and grad_sample_embed are reduced in the same launch from
  small fp32 partials by the program that arrives last (a fixed order: deterministic).
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
def _last_arrival(counter_ptr, n_arrivals):
    """True in the program that arrives last at ``counter_ptr`` (of ``n_arrivals``): every
    earlier program's stores are then visible to it (barrier + acq_rel atomic)."""
    tl.debug_barrier()
    done = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    tl.debug_barrier()
    return done == n_arrivals - 1


@triton.jit
def _gather_bwd_kernel(
    g_ptr, rst_ptr, gx_ptr, pos_part_ptr, se_part_ptr, gpos_ptr, gse_ptr, count_ptr,
    B, K, L, D, b_per_slice, n_l_tiles, n_b_slices,
    stride_gb, stride_gk, stride_rb, stride_rl,
    HAS_POS: tl.constexpr, HAS_SE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    lt = tl.program_id(0)
    dt = tl.program_id(1)
    bt = tl.program_id(2)
    n_d_tiles = tl.num_programs(1)
    ls = lt * BLOCK_L + tl.arange(0, BLOCK_L)
    ds = dt * BLOCK_D + tl.arange(0, BLOCK_D)
    l_ok = ls < L
    d_ok = ds < D
    b_end = tl.minimum((bt + 1) * b_per_slice, B)
    acc_pos = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    for b0 in range(bt * b_per_slice, b_end, BLOCK_B):
        bs = b0 + tl.arange(0, BLOCK_B)
        bl_ok = (bs < b_end)[:, None] & l_ok[None, :]
        b64 = bs.to(tl.int64)
        # The whole (BLOCK_B, BLOCK_L) index tile in one load, before any token moves: the
        # token loads below are independent of each other (no chain of dependent loads).
        k = tl.load(rst_ptr + b64[:, None] * stride_rb + ls[None, :] * stride_rl, mask=bl_ok,
                    other=K).to(tl.int64)
        hit = bl_ok & (k >= 0) & (k < K)
        g = tl.load(g_ptr + (b64[:, None] * stride_gb + k * stride_gk)[:, :, None]
                    + ds[None, None, :], mask=hit[:, :, None] & d_ok[None, None, :],
                    other=0.0).to(tl.float32)
        # grad_x is contiguous (B, L, D): dropped rows get their zeros here.
        gx_off = ((b64[:, None] * L + ls[None, :]) * D)[:, :, None] + ds[None, None, :]
        tl.store(gx_ptr + gx_off, g.to(gx_ptr.dtype.element_ty),
                 mask=bl_ok[:, :, None] & d_ok[None, None, :])
        if HAS_POS:
            acc_pos += tl.sum(g, axis=0)
        if HAS_SE:  # this L tile's share of grad_se[b] = sum over the kept rows
            se_off = (lt * B + b64)[:, None] * D + ds[None, :]
            tl.store(se_part_ptr + se_off, tl.sum(g, axis=1),
                     mask=(bs < b_end)[:, None] & d_ok[None, :])
    ld_ok = l_ok[:, None] & d_ok[None, :]
    if HAS_POS:  # grad_pos = sum over the batch: slices' partials reduced by the last one
        tile = (ls[:, None] * D + ds[None, :]).to(tl.int64)
        tl.store(pos_part_ptr + bt * L * D + tile, acc_pos, mask=ld_ok)
        if _last_arrival(count_ptr + lt * n_d_tiles + dt, n_b_slices):
            total = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
            for s in range(0, n_b_slices):  # fixed order: deterministic
                total += tl.load(pos_part_ptr + s * L * D + tile, mask=ld_ok, other=0.0,
                                 cache_modifier=".cg")
            tl.store(gpos_ptr + tile, total.to(gpos_ptr.dtype.element_ty), mask=ld_ok)
    if HAS_SE:  # grad_se: the L tiles' partials reduced by the last one of this slice
        count_se = count_ptr + tl.num_programs(0) * n_d_tiles + bt * n_d_tiles + dt
        if _last_arrival(count_se, n_l_tiles):
            for b0 in range(bt * b_per_slice, b_end, BLOCK_B):
                bs = b0 + tl.arange(0, BLOCK_B)
                bd_ok = (bs < b_end)[:, None] & d_ok[None, :]
                off = bs.to(tl.int64)[:, None] * D + ds[None, :]
                total = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
                for t in range(0, n_l_tiles):
                    total += tl.load(se_part_ptr + t * B * D + off, mask=bd_ok, other=0.0,
                                     cache_modifier=".cg")
                tl.store(gse_ptr + off, total.to(gse_ptr.dtype.element_ty), mask=bd_ok)


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
    """(B, length) int32: inv[b, l] = k where ids[b, k] == l, else K (what
    random_masking's ids_restore holds, for callers that lack it). Out-of-range ids are
    sent to a spare column so that the scatter never writes out of bounds."""
    bsz, k = ids.shape
    safe = torch.where((ids >= 0) & (ids < length), ids, length).long()
    inv = torch.full((bsz, length + 1), k, dtype=torch.int32, device=ids.device)
    src = torch.arange(k, dtype=torch.int32, device=ids.device).expand(bsz, k)
    inv.scatter_(1, safe, src)
    return inv[:, :length]


def _bwd_tiles(bsz, length, d, max_tile, min_programs):
    """(BLOCK_B, BLOCK_L, BLOCK_D, samples per slice, slices): tiles of about max_tile
    elements; the batch is split into slices until the grid has >= min_programs."""
    block_d = min(triton.next_power_of_2(d), 64 if min_programs > 1 else 256)
    block_l = max(1, min(triton.next_power_of_2(length), max_tile // block_d // 2 or 1, 32))
    block_b = max(1, min(triton.next_power_of_2(bsz), max_tile // (block_d * block_l)))
    tiles = triton.cdiv(length, block_l) * triton.cdiv(d, block_d)
    slices = max(1, min(triton.cdiv(bsz, block_b), triton.cdiv(min_programs, tiles)))
    b_per = triton.cdiv(triton.cdiv(bsz, slices), block_b) * block_b
    return block_b, block_l, block_d, b_per, triton.cdiv(bsz, b_per)


def gather_tokens_bwd(grad_out, ids_restore, x_dtype, pos_shape_dtype, se_dtype, *,
                      max_tile: int = 4096, min_programs: int = 1024, tiles=None):
    """Gradients of gather_tokens_fwd, in one launch (plus the zeroed arrival counters).

    Args:
        grad_out: (B, K, D). ids_restore: (B, L) int32|int64: row l of grad_x takes row
            ids_restore[b, l] of grad_out when it is < K, else zeros (random_masking's
            ids_restore, or inverse_ids(ids_keep, L)).
        pos_shape_dtype: (shape, dtype) of pos_embed or None; se_dtype: dtype or None.
        min_programs: split the batch into slices until the grid has about this many
            programs (each slice adds one fp32 (L, D) partial of grad_pos, reduced in a
            fixed order by the slice that finishes last: deterministic). 1024 is ~8 per
            SM of an H100/H200, a guess to be tuned on the device.
        tiles: (BLOCK_B, BLOCK_L, BLOCK_D, samples per slice) to override the choice
            (tests use it to exercise the split reductions).
    Returns:
        grad_x (B, L, D) x_dtype, grad_pos (shape, dtype) or None, grad_se (B, D) or None.
    """
    bsz, k, d = grad_out.shape
    length = ids_restore.shape[1]
    g = grad_out if grad_out.stride(2) == 1 else grad_out.contiguous()
    grad_x = torch.empty((bsz, length, d), dtype=x_dtype, device=g.device)
    if tiles is None:
        block_b, block_l, block_d, b_per, n_bs = _bwd_tiles(bsz, length, d, max_tile, min_programs)
    else:
        block_b, block_l, block_d, b_per = tiles
        n_bs = triton.cdiv(bsz, b_per)
    n_lt, n_dt = triton.cdiv(length, block_l), triton.cdiv(d, block_d)
    has_pos, has_se = pos_shape_dtype is not None, se_dtype is not None
    f32 = dict(dtype=torch.float32, device=g.device)
    pos_part = torch.empty((n_bs, length, d), **f32) if has_pos else grad_x
    se_part = torch.empty((n_lt, bsz, d), **f32) if has_se else grad_x
    gpos = torch.empty((length, d), dtype=pos_shape_dtype[1], device=g.device) if has_pos else grad_x
    gse = torch.empty((bsz, d), dtype=se_dtype, device=g.device) if has_se else grad_x
    counters = torch.zeros(n_lt * n_dt + n_bs * n_dt, dtype=torch.int32, device=g.device)
    if grad_x.numel():
        _gather_bwd_kernel[(n_lt, n_dt, n_bs)](
            g, ids_restore, grad_x, pos_part, se_part, gpos, gse, counters,
            bsz, k, length, d, b_per, n_lt, n_bs,
            g.stride(0), g.stride(1), ids_restore.stride(0), ids_restore.stride(1),
            HAS_POS=has_pos, HAS_SE=has_se, BLOCK_B=block_b, BLOCK_L=block_l, BLOCK_D=block_d,
            num_warps=_warps(block_b * block_l * block_d),
        )
    grad_pos = gpos.reshape(pos_shape_dtype[0]) if has_pos else None
    return grad_x, grad_pos, gse if has_se else None


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
