"""Fused MAE reconstruction loss: patchify + norm_pix target + masked MSE (+ its gradient).

The loss is ``scale x mean over G groups of sum_g(w * mse) / sum_g(w)``, where group g is
the g-th of G equal consecutive slices of the batch (G=2: the frontal then the lateral
views of a paired batch, each normalised by its own weight sum; G=1: MAE's loss) and
``scale`` a constant of the caller (MVMAE's released reduction: masked / L / mask_ratio;
1 by default), folded in so that the single pass below stays valid for a scaled loss.

Per forward three kernels (two in the compact layout), per backward one (two when the
weights must be summed again), and no scalar glue on the host side:

* ``_weight_sum_kernel`` (full layout only; one program per (group, chunk of about 1024
  rows), so that a (B, L) mask is summed in parallel): partial weight sums, (G, chunks).
  Every program of the main kernel adds its group's <= 64 partials itself, in a fixed
  order, and takes ``inv_w = 1 / sum_g(w)`` (1 when the sum is 0: nothing to reconstruct
  gives a zero loss and gradient, never NaN). In the compact layout the count is known.
* ``_mae_loss_kernel``, one program per (sample, block of rows), in one of three modes:
  - FORWARD: per-row MSE against the target read straight from ``imgs`` (strided address
    math, no (B, L, P) target is ever written), weighted, summed and scaled by
    its group's ``inv_w`` into one fp32 partial per program.
  - SINGLE_PASS: the same, and in the same pass the gradient for an incoming gradient of
    1 on the (scaled) loss, ``2 scale w (pred - target) / (P G sum_g(w))``. Each live row of pred
    and imgs is read once for both.
  - BACKWARD: the gradient for any incoming gradient, recomputed from pred and imgs:
    scale ``c_g = (grad_loss / G + grad_groups[g]) scale`` per group. With ``SKIP_UNIT`` the
    program leaves ``grad`` untouched when ``c_g == scale / G`` (decided on the device from
    the incoming gradients: no host sync), so a gradient already written by SINGLE_PASS
    is kept as is and only other incoming gradients pay for the recompute.
* ``_finalize_kernel`` (one program): ``per_group[g] = sum of g's partials`` and
  ``loss = mean(per_group)``, in a fixed order (deterministic).

Bytes, per element, s_p / s_i the bytes of pred / imgs and f the fraction of live rows:
single pass reads f (s_p + s_i) and writes s_p once; recompute reads f (s_p + s_i) twice.
Rows with zero weight still get their (zero) gradient written: the gradient is dense.

Nothing here imports fastssl: launchers take tensors that the caller has validated.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["mae_loss_forward", "mae_loss_backward", "weight_sums"]

FORWARD, SINGLE_PASS, BACKWARD = 0, 1, 2


@triton.jit
def _weight_sum_kernel(w_ptr, part_ptr, rows_per_group, rows_per_chunk, R, stride_wb,
                       stride_wr, MAX_CHUNKS: tl.constexpr, BLOCK: tl.constexpr):
    g = tl.program_id(0)
    chunk = tl.program_id(1)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    end = tl.minimum((chunk + 1) * rows_per_chunk, rows_per_group)
    for start in range(chunk * rows_per_chunk, end, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        flat = g.to(tl.int64) * rows_per_group + idx
        acc += tl.load(w_ptr + (flat // R) * stride_wb + (flat % R) * stride_wr,
                       mask=idx < end, other=0).to(tl.float32)
    tl.store(part_ptr + g * MAX_CHUNKS + chunk, tl.sum(acc, axis=0))


@triton.jit
def _group_inverse_weight(wpart_ptr, group, n_chunks, rows_per_group,
                          HAS_W: tl.constexpr, MAX_CHUNKS: tl.constexpr):
    """1 / (the group's weight sum), or 1 when that sum is 0; the same in every program."""
    if HAS_W:
        cs = tl.arange(0, MAX_CHUNKS)
        total = tl.sum(tl.load(wpart_ptr + group * MAX_CHUNKS + cs, mask=cs < n_chunks,
                               other=0.0), axis=0)
    else:  # compact layout: every row weighs 1
        total = rows_per_group * 1.0  # (a constexpr when it is 1: no .to())
    return 1.0 / tl.where(total != 0.0, total, 1.0)


@triton.jit
def _mae_loss_kernel(
    pred_ptr, img_ptr, w_ptr, ids_ptr, wpart_ptr, gl_ptr, gg_ptr, grad_ptr, part_ptr,
    R, W_PATCHES, N_PATCHES, n_row_blocks, samples_per_group, n_chunks, n_groups,
    stride_pb, stride_pr,
    stride_ib, stride_ic, stride_ih, stride_iw,
    stride_wb, stride_wr,
    stride_db, stride_dr,
    eps, scale,
    MAX_CHUNKS: tl.constexpr,
    PATCH: tl.constexpr,
    C: tl.constexpr,  # compile-time, so that the lane -> (i, q, c) divisions are cheap
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,
    NORM_PIX: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_IDS: tl.constexpr,
    MODE: tl.constexpr,
    SKIP_UNIT: tl.constexpr,
):
    P: tl.constexpr = PATCH * PATCH * C
    b = tl.program_id(0)
    rb = tl.program_id(1)
    b64 = b.to(tl.int64)
    group = b // samples_per_group
    inv_w = _group_inverse_weight(wpart_ptr, group, n_chunks, samples_per_group * R, HAS_W,
                                  MAX_CHUNKS)
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    write_ok = row_ok
    unit = 1.0 / (n_groups * 1.0)  # d loss / d per_group[g] (the loss is their mean)
    if MODE == 2:
        # Per-group scale of the gradient: d loss_total / d per_group[g].
        coef = tl.load(gl_ptr).to(tl.float32) * unit + tl.load(gg_ptr + group).to(tl.float32)
        if SKIP_UNIT:  # grad already holds the unit-gradient result for this group
            write_ok = tl.where(coef != unit, row_ok, False)
        coef = coef * scale
    else:
        coef = unit * scale

    # Row weight: the mask value (full layout) or 1 (compact layout). A zero weight means
    # the row contributes nothing, so its pred and pixels are never read.
    if HAS_W:
        w = tl.load(w_ptr + b64 * stride_wb + rows * stride_wr, mask=write_ok, other=0).to(tl.float32)
    else:
        w = tl.where(write_ok, 1.0, 0.0)
    live = write_ok & (w != 0.0)

    # Which patch each row predicts, then the patch's top-left pixel.
    if HAS_IDS:
        patch = tl.load(ids_ptr + b64 * stride_db + rows * stride_dr, mask=live, other=0)
        # An out-of-range id (possible only with validate=False) reads nothing.
        live = live & (patch >= 0) & (patch < N_PATCHES)
    else:
        patch = rows
    ph = (patch // W_PATCHES).to(tl.int64)
    pw = (patch % W_PATCHES).to(tl.int64)
    row_base = b64 * stride_ib + ph * (PATCH * stride_ih) + pw * (PATCH * stride_iw)

    # Element j of a patch is pixel (i, q) of channel c with j = (i * p + q) * C + c
    # (MAE's channel-last patchify). BLOCK_P is P rounded up to a power of two.
    j = tl.arange(0, BLOCK_P)
    col_ok = j < P
    c = j % C
    q = (j // C) % PATCH
    i = j // (C * PATCH)
    col_off = c * stride_ic + i * stride_ih + q * stride_iw

    m2 = live[:, None] & col_ok[None, :]
    t = tl.load(img_ptr + row_base[:, None] + col_off[None, :], mask=m2, other=0.0).to(tl.float32)
    if NORM_PIX:
        mean = tl.sum(t, axis=1) / P
        d = tl.where(m2, t - mean[:, None], 0.0)
        var = tl.sum(d * d, axis=1) / (P - 1)  # unbiased, as MAE
        t = d * (1.0 / tl.sqrt_rn(var + eps))[:, None]

    pred_off = b64 * stride_pb + rows.to(tl.int64)[:, None] * stride_pr + j[None, :]
    x = tl.load(pred_ptr + pred_off, mask=m2, other=0.0).to(tl.float32)
    diff = x - t  # exactly 0 in masked-off lanes and dead rows

    if MODE != 0:
        g = diff * (w * (coef * inv_w * 2.0 / P))[:, None]
        grad_off = (b64 * R + rows.to(tl.int64))[:, None] * P + j[None, :]
        tl.store(grad_ptr + grad_off, g.to(grad_ptr.dtype.element_ty),
                 mask=write_ok[:, None] & col_ok[None, :])
    if MODE != 2:
        mse = tl.sum(diff * diff, axis=1) / P
        tl.store(part_ptr + b * n_row_blocks + rb, tl.sum(mse * w, axis=0) * (inv_w * scale))


@triton.jit
def _finalize_kernel(part_ptr, loss_ptr, group_ptr, n_groups, per_group,
                     BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    # (groups, partials) tiles: any number of groups (e.g. one per image) in a few steps.
    total = tl.zeros([BLOCK_G], dtype=tl.float32)
    for g0 in range(0, n_groups, BLOCK_G):
        gs = g0 + tl.arange(0, BLOCK_G)
        g_ok = gs < n_groups
        acc = tl.zeros([BLOCK_G, BLOCK_C], dtype=tl.float32)
        for c0 in range(0, per_group, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            acc += tl.load(part_ptr + gs.to(tl.int64)[:, None] * per_group + cs[None, :],
                           mask=g_ok[:, None] & (cs < per_group)[None, :], other=0.0)
        s = tl.sum(acc, axis=1)
        tl.store(group_ptr + gs, s, mask=g_ok)
        total += s
    tl.store(loss_ptr, tl.sum(total, axis=0) / n_groups)


def _blocks(rows: int, p_len: int, max_tile: int) -> tuple[int, int]:
    block_p = triton.next_power_of_2(p_len)
    block_r = max(1, min(triton.next_power_of_2(rows), max_tile // block_p))
    return block_r, block_p


def _weight_view(weight):
    # The kernels read any numeric weight; a bool mask is reinterpreted as bytes (no copy).
    if weight is not None and weight.dtype == torch.bool:
        return weight.view(torch.uint8)
    return weight


MAX_CHUNKS = 64


def weight_sums(pred, weight, groups: int):
    """((G, MAX_CHUNKS) float32 partial weight sums of each group's rows, chunks used),
    what the loss kernels reduce to 1 / sum_g(w); None when every row weighs 1 (weight
    None). pred (B, R, P) gives the shapes, weight (B, R) bool or float."""
    if weight is None:
        return None
    weight = _weight_view(weight)
    b, rows, _ = pred.shape
    per_group = (b // groups) * rows
    per_chunk = max(1024, triton.cdiv(per_group, MAX_CHUNKS))
    n_chunks = triton.cdiv(per_group, per_chunk)
    part = torch.empty((groups, MAX_CHUNKS), dtype=torch.float32, device=pred.device)
    _weight_sum_kernel[(groups, n_chunks)](
        weight, part, per_group, per_chunk, rows, weight.stride(0), weight.stride(1),
        MAX_CHUNKS=MAX_CHUNKS, BLOCK=1024, num_warps=4)
    return part, n_chunks


def _launch(mode, pred, imgs, weight, ids, wsums, groups, patch_size, norm_pix, eps, scale, *,
            grad=None, part=None, grad_loss=None, grad_groups=None, skip_unit=False,
            max_tile=4096):
    b, rows, p_len = pred.shape
    block_r, block_p = _blocks(rows, p_len, max_tile)
    n_rb = triton.cdiv(rows, block_r)
    dummy = pred  # unused pointer arguments (the constexpr flags switch their use off)
    wt = weight if weight is not None else dummy
    it = ids if ids is not None else dummy
    wpart, n_chunks = wsums if wsums is not None else (dummy, 0)
    _mae_loss_kernel[(b, n_rb)](
        pred, imgs, wt, it, wpart,
        grad_loss if grad_loss is not None else dummy,
        grad_groups if grad_groups is not None else dummy,
        grad if grad is not None else dummy, part if part is not None else dummy,
        rows, imgs.shape[3] // patch_size,
        (imgs.shape[2] // patch_size) * (imgs.shape[3] // patch_size), n_rb, b // groups,
        n_chunks, groups,
        pred.stride(0), pred.stride(1),
        imgs.stride(0), imgs.stride(1), imgs.stride(2), imgs.stride(3),
        wt.stride(0) if weight is not None else 0, wt.stride(1) if weight is not None else 0,
        it.stride(0) if ids is not None else 0, it.stride(1) if ids is not None else 0,
        float(eps), float(scale),
        MAX_CHUNKS=MAX_CHUNKS, PATCH=patch_size, C=imgs.shape[1], BLOCK_R=block_r, BLOCK_P=block_p,
        NORM_PIX=norm_pix, HAS_W=weight is not None, HAS_IDS=ids is not None, MODE=mode,
        SKIP_UNIT=skip_unit, num_warps=8 if block_r * block_p >= 8192 else 4,
    )
    return n_rb


def mae_loss_forward(pred, imgs, weight, ids, *, groups: int, patch_size: int,
                     norm_pix: bool, eps: float, with_grad: bool, scale: float = 1.0,
                     max_tile: int = 4096):
    """The loss, per group, and (with_grad) the gradient for an incoming gradient of 1.

    Args:
        pred: (B, R, P) float32|float16|bfloat16, last dim contiguous (copied otherwise).
        imgs: (B, C, H, W) float32|float16|bfloat16, any strides.
        weight: (B, R) row weights (the mask, bool or float) or None (every row weighs 1).
        ids: (B, R) integer patch index of each row, or None (row r is patch r).
        groups: G, dividing B: the loss is the mean of the G groups' normalised losses.
        scale: multiplies the loss, the per-group losses and the gradient.
        max_tile: elements per program (rows * next_pow2(P)); larger suits the interpreter.
    Returns:
        loss () float32, per_group (G,) float32, wsums (the weight_sums result, what
        mae_loss_backward needs), grad (B, R, P) in pred's dtype or None.
    """
    if pred.stride(2) != 1:
        pred = pred.contiguous()
    weight = _weight_view(weight)
    b, rows, p_len = pred.shape
    wsums = weight_sums(pred, weight, groups)
    block_r, _ = _blocks(rows, p_len, max_tile)
    part = torch.empty(b * triton.cdiv(rows, block_r), dtype=torch.float32, device=pred.device)
    grad = torch.empty((b, rows, p_len), dtype=pred.dtype, device=pred.device) if with_grad else None
    _launch(SINGLE_PASS if with_grad else FORWARD, pred, imgs, weight, ids, wsums, groups,
            patch_size, norm_pix, eps, scale, grad=grad, part=part, max_tile=max_tile)
    loss = torch.empty((), dtype=torch.float32, device=pred.device)
    per_group = torch.empty(groups, dtype=torch.float32, device=pred.device)
    per_group_parts = part.numel() // groups
    block_c = min(triton.next_power_of_2(per_group_parts), 1024)
    _finalize_kernel[(1,)](part, loss, per_group, groups, per_group_parts,
                           BLOCK_G=1024 // block_c, BLOCK_C=block_c, num_warps=4)
    return loss, per_group, wsums, grad


def mae_loss_backward(grad_loss, grad_groups, pred, imgs, weight, ids, wsums, *, groups: int,
                      patch_size: int, norm_pix: bool, eps: float, out=None, scale: float = 1.0,
                      max_tile: int = 4096) -> torch.Tensor:
    """d total / d pred for ``total = grad_loss * loss + sum(grad_groups * per_group)``
    (loss and per_group scaled by ``scale``, as mae_loss_forward made them).

    Args:
        grad_loss: () or (1,) float tensor on pred's device; grad_groups: (G,) float.
        wsums: weight_sums(pred, weight, groups), as mae_loss_forward returns it.
        out: (B, R, P) the gradient mae_loss_forward(with_grad=True) wrote. Groups whose
            incoming gradient is the unit one (grad_loss == 1, grad_groups[g] == 0) keep
            it untouched; the others are recomputed into it. None: a new tensor, every
            group recomputed.
    Returns:
        (B, R, P) in pred's dtype (``out`` when given).
    """
    if pred.stride(2) != 1:
        pred = pred.contiguous()
    skip_unit = out is not None
    grad = out if out is not None else torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)
    _launch(BACKWARD, pred, imgs, _weight_view(weight), ids, wsums, groups, patch_size,
            norm_pix, eps, scale, grad=grad, grad_loss=grad_loss.reshape(1),
            grad_groups=grad_groups.reshape(groups), skip_unit=skip_unit, max_tile=max_tile)
    return grad
