"""Masking and token movement of masked autoencoding, on the device.

``random_masking`` draws the per-sample mask with PyTorch ops on the device (argsort of
uniform noise, no Python loop over the batch). ``gather_tokens`` and
``unshuffle_with_mask_token`` are registered custom ops (``fastssl::gather_tokens``,
``fastssl::unshuffle_with_mask_token``) with fake implementations and autograd, so they
compile with ``torch.compile(fullgraph=True)``; ``impl=`` picks the fused Triton kernels
(fastssl.kernels.masking) or the PyTorch reference, as in fastssl.ops.mae_loss.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from fastssl.ops import _common
from fastssl.reference import mae as _ref

__all__ = ["random_masking", "gather_tokens", "unshuffle_with_mask_token"]

_EMPTY = (0,)  # placeholder shape for an absent gradient (custom ops return tensors only)


# ------------------------------------------------------------------- random masking
def random_masking(
    batch: int,
    num_patches: int,
    mask_ratio: float,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking, as facebookresearch/mae, entirely on ``device``.

    Uniform noise (B, L) is argsorted; the first K patches of each row are kept.
    K = int(L * (1 - mask_ratio)): truncation, as MAE (L=196: ratio 0.75 keeps 49,
    0.93 keeps 13).

    Args:
        batch: B >= 1. num_patches: L >= 1.
        mask_ratio: in [0, 1); must leave K >= 1 kept patch.
        device: where the tensors are made (default: torch's default device).
        generator: a torch.Generator on ``device``, for reproducible masks.
    Returns:
        ids_keep: (B, K) int64, kept patch indices in shuffled order (distinct per row).
        ids_restore: (B, L) int64, the inverse permutation: patch l is visible iff
            ``ids_restore[b, l] < K``, and then it is token ``ids_restore[b, l]`` of the
            encoder's output.
        mask: (B, L) float32, 1 = masked, 0 = visible; K zeros per row.
    Raises:
        ValueError: mask_ratio outside [0, 1) or leaving no patch visible.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if isinstance(num_patches, bool) or not isinstance(num_patches, int) or num_patches < 1:
        raise ValueError(f"num_patches must be a positive int, got {num_patches!r}")
    ratio = float(mask_ratio)
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio!r}")
    keep = _ref.num_kept(num_patches, ratio)
    if keep < 1:
        raise ValueError(f"mask_ratio={mask_ratio!r} keeps int({num_patches} * "
                         f"(1 - {mask_ratio!r})) = {keep} of {num_patches} patches; at least "
                         "one patch must stay visible")
    noise = torch.rand(batch, num_patches, device=device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    # The inverse permutation by a scatter rather than MAE's second argsort: same result,
    # one O(B L) pass instead of a sort.
    ids_restore = torch.empty_like(ids_shuffle)
    ids_restore.scatter_(1, ids_shuffle,
                         torch.arange(num_patches, device=noise.device).expand(batch, -1))
    mask = (ids_restore >= keep).to(torch.float32)
    return ids_shuffle[:, :keep], ids_restore, mask


# -------------------------------------------------------------------- gather_tokens
def _gather_impl(x: torch.Tensor, ids_keep: torch.Tensor, ids_restore: Optional[torch.Tensor],
                 pos_embed: Optional[torch.Tensor], sample_embed: Optional[torch.Tensor],
                 impl: str) -> torch.Tensor:
    # ids_restore is an input only so that backward gets it (the forward needs ids_keep).
    if impl == "torch":
        return _ref.gather_tokens_reference(x, ids_keep, pos_embed=pos_embed,
                                            sample_embed=sample_embed)
    k = _common.kernels("masking")
    pos = pos_embed.contiguous() if pos_embed is not None else None
    se = sample_embed.contiguous() if sample_embed is not None else None
    with _common.device_ctx(x):
        return k.gather_tokens_fwd(x, ids_keep, pos, se, _gather_dtype(x, pos_embed, sample_embed),
                                   **_common.tuning(x.device))


_gather_op = torch.library.custom_op("fastssl::gather_tokens", _gather_impl, mutates_args=())


def _gather_dtype(x, pos_embed, sample_embed) -> torch.dtype:
    dtype = x.dtype
    for t in (pos_embed, sample_embed):
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


@_gather_op.register_fake
def _(x, ids_keep, ids_restore, pos_embed, sample_embed, impl):
    return x.new_empty((x.shape[0], ids_keep.shape[1], x.shape[2]),
                       dtype=_gather_dtype(x, pos_embed, sample_embed))


def _gather_backward_impl(grad: torch.Tensor, ids_keep: torch.Tensor,
                          ids_restore: Optional[torch.Tensor], length: int,
                          x: torch.Tensor, pos_embed: Optional[torch.Tensor],
                        sample_embed: Optional[torch.Tensor],
                        impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # x, pos_embed and sample_embed are empty dtype carriers (see _gather_setup); the
    # reference reads pos_embed's shape, so give it an (L, D) view of one element.
    d = grad.shape[2]
    if pos_embed is not None:
        pos_embed = pos_embed.new_zeros(()).expand(length, d)
    if impl == "torch":
        gx, gpos, gse = _ref.gather_tokens_backward_reference(
            grad, ids_keep, length, x_dtype=x.dtype, pos_embed=pos_embed,
            sample_embed=sample_embed)
    else:
        k = _common.kernels("masking")
        pos_info = (pos_embed.shape, pos_embed.dtype) if pos_embed is not None else None
        se_dtype = sample_embed.dtype if sample_embed is not None else None
        tune = _common.tuning(grad.device)
        if grad.device.type != "cuda":
            tune["min_programs"] = 1  # the interpreter runs programs one after another
        with _common.device_ctx(grad):
            if ids_restore is None:  # a caller without random_masking's inverse
                ids_restore = k.inverse_ids(ids_keep, length)
            gx, gpos, gse = k.gather_tokens_bwd(grad, ids_restore, x.dtype, pos_info, se_dtype,
                                                **tune)
    if gpos is None:
        gpos = x.new_empty(_EMPTY)
    if gse is None:
        gse = x.new_empty(_EMPTY)
    return gx, gpos, gse


_gather_backward_op = torch.library.custom_op(
    "fastssl::gather_tokens_backward", _gather_backward_impl, mutates_args=())


@_gather_backward_op.register_fake
def _(grad, ids_keep, ids_restore, length, x, pos_embed, sample_embed, impl):
    b, _, d = grad.shape
    gpos = pos_embed.new_empty((length, d)) if pos_embed is not None else x.new_empty(_EMPTY)
    gse = sample_embed.new_empty((b, d)) if sample_embed is not None else x.new_empty(_EMPTY)
    return x.new_empty((b, length, d)), gpos, gse


def _gather_setup(ctx, inputs, output):
    x, ids_keep, ids_restore, pos_embed, sample_embed, impl = inputs
    # Backward needs only the indices and the shapes/dtypes of the inputs: x itself is
    # not saved, so the (B, L, D) tokens are not kept alive until backward for us.
    ctx.save_for_backward(ids_keep, ids_restore)
    ctx.length = x.shape[1]
    ctx.dtypes = (x.dtype, None if pos_embed is None else pos_embed.dtype,
                  None if sample_embed is None else sample_embed.dtype)
    ctx.impl = impl


def _gather_backward(ctx, grad, backward_op=None):
    ids_keep, ids_restore = ctx.saved_tensors
    x_dt, pos_dt, se_dt = ctx.dtypes
    carrier = lambda dt: None if dt is None else grad.new_empty(_EMPTY, dtype=dt)  # noqa: E731
    gx, gpos, gse = (backward_op or _gather_backward_op)(
        grad, ids_keep, ids_restore, ctx.length, carrier(x_dt), carrier(pos_dt),
        carrier(se_dt), ctx.impl)
    return (gx, None, None, gpos if pos_dt is not None else None,
            gse if se_dt is not None else None, None)


_gather_op.register_autograd(_gather_backward, setup_context=_gather_setup)
_gather_eager = _common.eager_function(
    _gather_impl, _gather_setup,
    functools.partial(_gather_backward, backward_op=_gather_backward_impl))


def _check_gather_args(x, ids_keep, ids_restore, pos_embed, sample_embed):
    """Shapes, dtypes and devices (no sync); returns pos_embed as (L, D) or None."""
    _common.check_tensor(x, "x", 3, _common.FLOAT_DTYPES, "(B, L, D)")
    _common.check_tensor(ids_keep, "ids_keep", 2, _common.INDEX_DTYPES, "(B, K)")
    b, length, d = x.shape
    if ids_keep.shape[0] != b:
        raise ValueError(f"ids_keep has shape {tuple(ids_keep.shape)} and x {tuple(x.shape)}: "
                         "the batch sizes differ")
    if ids_restore is not None:
        _common.check_tensor(ids_restore, "ids_restore", 2, _common.INDEX_DTYPES, "(B, L)")
        if tuple(ids_restore.shape) != (b, length):
            raise ValueError(f"ids_restore has shape {tuple(ids_restore.shape)}; expected "
                             f"(B, L) = ({b}, {length}) from x {tuple(x.shape)}")
    pos2d = None
    if pos_embed is not None:
        if not isinstance(pos_embed, torch.Tensor) or pos_embed.dtype not in _common.FLOAT_DTYPES:
            raise TypeError("pos_embed must be a floating torch.Tensor")
        if tuple(pos_embed.shape) not in ((length, d), (1, length, d)):
            raise ValueError(f"pos_embed has shape {tuple(pos_embed.shape)}; expected (L, D) = "
                             f"({length}, {d}) or (1, L, D) for x {tuple(x.shape)}")
        pos2d = pos_embed.reshape(length, d)
    if sample_embed is not None:
        _common.check_tensor(sample_embed, "sample_embed", 2, _common.FLOAT_DTYPES, "(B, D)")
        if tuple(sample_embed.shape) != (b, d):
            raise ValueError(f"sample_embed has shape {tuple(sample_embed.shape)}; expected "
                             f"(B, D) = ({b}, {d})")
    _common.check_same_device(("x", x), ("ids_keep", ids_keep), ("ids_restore", ids_restore),
                              ("pos_embed", pos_embed), ("sample_embed", sample_embed))
    return pos2d


def _validate_gather_ids(ids_keep, ids_restore, length):
    """Index values, with one device sync for every answer."""
    bad = _common.index_flags(ids_keep, length, distinct=True)
    if ids_restore is not None:
        k = ids_keep.shape[1]
        # ids_restore must be the inverse: patch ids_keep[b, k] sits at position k.
        at_keep = ids_restore.gather(1, ids_keep.long().clamp(0, length - 1))
        inverse = (at_keep == torch.arange(k, device=ids_keep.device)).all()
        bad = torch.cat([bad, _common.index_flags(ids_restore, length, distinct=True,
                                                  permutation=True), (~inverse).reshape(1)])
    flags = bad.cpu().tolist()
    if flags[0]:
        raise ValueError(f"ids_keep holds values outside [0, L={length})")
    if flags[1]:
        raise ValueError("ids_keep repeats an index within a row; indices must be distinct")
    if ids_restore is not None and any(flags[2:]):
        raise ValueError("ids_restore must be the inverse permutation of ids_keep's shuffle "
                         "(ids_restore[b, ids_keep[b, k]] == k), as random_masking returns")


def gather_tokens(
    x: torch.Tensor,
    ids_keep: torch.Tensor,
    *,
    ids_restore: torch.Tensor | None = None,
    pos_embed: torch.Tensor | None = None,
    sample_embed: torch.Tensor | None = None,
    impl: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """The encoder's input: kept tokens plus position and per-sample embeddings, one pass.

    ``out[b, k] = x[b, ids_keep[b, k]] + pos_embed[ids_keep[b, k]] + sample_embed[b]``.

    Args:
        x: (B, L, D) float32|float16|bfloat16 (float64 with impl="torch"), patch tokens.
        ids_keep: (B, K) int32|int64, distinct indices in [0, L) per row (as from
            :func:`random_masking`).
        ids_restore: (B, L), random_masking's inverse permutation (optional): the Triton
            backward reads it instead of rebuilding the inverse of ids_keep.
        pos_embed: (L, D) or (1, L, D) (without a CLS row: pass ``pos_embed[:, 1:]``).
        sample_embed: (B, D), e.g. the view-type embedding of each sample.
        impl: "auto" | "triton" | "torch".
        validate: check that ids_keep lies in [0, L) without a repeat within a row and
            that ids_restore is its inverse (one device sync; skipped inside
            torch.compile). Pass False for indices the caller made with random_masking:
            no host sync then. Repeats would make the Triton backward drop gradient;
            out-of-range ids read zeros instead of stray memory.
    Returns:
        (B, K, D), dtype the promotion of the inputs' dtypes. Backward gives grad_x
        (B, L, D) (zeros at dropped patches), grad_pos_embed (sum over the batch) and
        grad_sample_embed (sum over K).
    """
    pos2d = _check_gather_args(x, ids_keep, ids_restore, pos_embed, sample_embed)
    dtype = _gather_dtype(x, pos_embed, sample_embed)
    chosen = _common.resolve("gather_tokens", impl, x.device, dtype)
    if _common.should_validate(validate) and ids_keep.numel():
        _validate_gather_ids(ids_keep, ids_restore, x.shape[1])
    op = _gather_op if torch.compiler.is_compiling() else _gather_eager
    return op(x, ids_keep, ids_restore, pos2d, sample_embed, chosen)


# ------------------------------------------------------------- unshuffle + mask token
def _unshuffle_impl(x_vis: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor,
                  impl: str) -> torch.Tensor:
    if impl == "torch":
        return _ref.unshuffle_with_mask_token_reference(x_vis, mask_token, ids_restore)
    k = _common.kernels("masking")
    with _common.device_ctx(x_vis):
        return k.unshuffle_fwd(x_vis, mask_token.contiguous(), ids_restore,
                               torch.promote_types(x_vis.dtype, mask_token.dtype),
                               **_common.tuning(x_vis.device))


_unshuffle_op = torch.library.custom_op(
    "fastssl::unshuffle_with_mask_token", _unshuffle_impl, mutates_args=())


@_unshuffle_op.register_fake
def _(x_vis, mask_token, ids_restore, impl):
    return x_vis.new_empty((x_vis.shape[0], ids_restore.shape[1], x_vis.shape[2]),
                           dtype=torch.promote_types(x_vis.dtype, mask_token.dtype))


def _unshuffle_backward_impl(grad: torch.Tensor, ids_restore: torch.Tensor, k_vis: int,
                           x_vis: torch.Tensor, mask_token: torch.Tensor,
                           impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    # x_vis and mask_token are empty dtype carriers (see _unshuffle_setup).
    if impl == "torch":
        return _ref.unshuffle_with_mask_token_backward_reference(
            grad, ids_restore, k_vis, x_dtype=x_vis.dtype, token_dtype=mask_token.dtype)
    k = _common.kernels("masking")
    with _common.device_ctx(grad):
        return k.unshuffle_bwd(grad, ids_restore, k_vis, x_vis.dtype, mask_token.dtype,
                               **_common.tuning(grad.device))


_unshuffle_backward_op = torch.library.custom_op(
    "fastssl::unshuffle_with_mask_token_backward", _unshuffle_backward_impl, mutates_args=())


@_unshuffle_backward_op.register_fake
def _(grad, ids_restore, k_vis, x_vis, mask_token, impl):
    b, _, d = grad.shape
    return x_vis.new_empty((b, k_vis, d)), mask_token.new_empty((d,))


def _unshuffle_setup(ctx, inputs, output):
    x_vis, mask_token, ids_restore, impl = inputs
    ctx.save_for_backward(ids_restore)  # not x_vis: only its shape and dtype are needed
    ctx.k_vis = x_vis.shape[1]
    ctx.dtypes = (x_vis.dtype, mask_token.dtype)
    ctx.impl = impl


def _unshuffle_backward(ctx, grad, backward_op=None):
    (ids_restore,) = ctx.saved_tensors
    x_dt, tok_dt = ctx.dtypes
    gx, gtok = (backward_op or _unshuffle_backward_op)(grad, ids_restore, ctx.k_vis,
                                      grad.new_empty(_EMPTY, dtype=x_dt),
                                      grad.new_empty(_EMPTY, dtype=tok_dt), ctx.impl)
    return gx, gtok, None, None


_unshuffle_op.register_autograd(_unshuffle_backward, setup_context=_unshuffle_setup)
_unshuffle_eager = _common.eager_function(
    _unshuffle_impl, _unshuffle_setup,
    functools.partial(_unshuffle_backward, backward_op=_unshuffle_backward_impl))


def unshuffle_with_mask_token(
    x_vis: torch.Tensor,
    mask_token: torch.Tensor,
    ids_restore: torch.Tensor,
    *,
    impl: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """The decoder's input in one pass: visible tokens back in place, mask tokens elsewhere.

    ``out[b, l] = x_vis[b, ids_restore[b, l]] if ids_restore[b, l] < K else mask_token``
    (MAE's ``cat([x, mask_tokens]); gather(ids_restore)`` without the concatenation).

    Args:
        x_vis: (B, K, D) float32|float16|bfloat16 (float64 with impl="torch"): the
            encoder's visible tokens in ids_keep order, without CLS (add it back after).
        mask_token: D values, shape (D,) or (1, 1, D) as MAE stores it.
        ids_restore: (B, L) int32|int64, a permutation of range(L) per row (as from
            :func:`random_masking`), L >= K.
        impl: "auto" | "triton" | "torch".
        validate: check that every row of ids_restore is a permutation of range(L) (one
            device sync; skipped inside torch.compile).
    Returns:
        (B, L, D), dtype the promotion of x_vis's and mask_token's. Backward gives
        grad_x_vis (B, K, D) and grad_mask_token (the sum over all masked positions).
    """
    _common.check_tensor(x_vis, "x_vis", 3, _common.FLOAT_DTYPES, "(B, K, D)")
    _common.check_tensor(ids_restore, "ids_restore", 2, _common.INDEX_DTYPES, "(B, L)")
    if not isinstance(mask_token, torch.Tensor) or mask_token.dtype not in _common.FLOAT_DTYPES:
        raise TypeError("mask_token must be a floating torch.Tensor")
    b, k_vis, d = x_vis.shape
    if mask_token.numel() != d or (mask_token.dim() > 1 and mask_token.shape[-1] != d):
        raise ValueError(f"mask_token has shape {tuple(mask_token.shape)}; expected (D,) or "
                         f"(1, 1, D) with D={d} from x_vis {tuple(x_vis.shape)}")
    if ids_restore.shape[0] != b or ids_restore.shape[1] < k_vis:
        raise ValueError(f"ids_restore has shape {tuple(ids_restore.shape)} and x_vis "
                         f"{tuple(x_vis.shape)}: expected (B={b}, L >= K={k_vis})")
    _common.check_same_device(("x_vis", x_vis), ("mask_token", mask_token),
                              ("ids_restore", ids_restore))
    dtype = torch.promote_types(x_vis.dtype, mask_token.dtype)
    chosen = _common.resolve("unshuffle_with_mask_token", impl, x_vis.device, dtype)
    if _common.should_validate(validate) and ids_restore.numel():
        length = ids_restore.shape[1]
        out_of_range, not_perm = _common.index_problems(ids_restore, length, distinct=True,
                                                        permutation=True)
        if out_of_range:
            raise ValueError(f"ids_restore holds values outside [0, L={length})")
        if not_perm:
            raise ValueError("ids_restore must be a permutation of range(L) in every row")
    op = _unshuffle_op if torch.compiler.is_compiling() else _unshuffle_eager
    return op(x_vis, mask_token.reshape(d), ids_restore, chosen)
