"""The MAE reconstruction loss as one op: patchify + target normalisation + masked MSE.

``mae_loss`` checks its inputs, picks an implementation (``impl=``) and calls the
registered custom op ``fastssl::mae_loss``, whose autograd formula calls
``fastssl::mae_loss_backward``. Both have fake (meta) implementations, so a model that
calls ``mae_loss`` compiles with ``torch.compile(fullgraph=True)``.

Implementations:
    "triton"  fused kernels (fastssl.kernels.mae_loss): the target is read straight from
              ``imgs``, the gradient is recomputed in backward (see the kernel module for
              the bytes-moved argument). CUDA tensors, or CPU tensors under
              TRITON_INTERPRET=1.
    "torch"   fastssl.reference.mae (forward and the closed-form gradient).
    "auto"    "triton" for CUDA tensors when Triton is installed, else "torch"
              (FASTSSL_IMPL overrides "auto").
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from fastssl.ops import _common
from fastssl.reference import mae as _ref

__all__ = ["mae_loss", "TARGETS"]

TARGETS = ("norm_pix", "pixel")


# ------------------------------------------------------------------------ custom ops
def _weight(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # The kernel reads any numeric mask; a bool is reinterpreted as bytes (no copy).
    if mask is not None and mask.dtype == torch.bool:
        return mask.view(torch.uint8)
    return mask


def _weight_sum(pred: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None:  # compact layout: every row weighs 1
        return torch.tensor(float(pred.shape[0] * pred.shape[1]), device=pred.device)
    return mask.sum(dtype=torch.float32)


def _loss_dtype(pred: torch.Tensor) -> torch.dtype:
    return torch.float64 if pred.dtype == torch.float64 else torch.float32


def _mae_loss_impl(pred: torch.Tensor, imgs: torch.Tensor, mask: Optional[torch.Tensor],
                 ids_masked: Optional[torch.Tensor], patch_size: int, norm_pix: bool,
                 eps: float, impl: str) -> torch.Tensor:
    target = "norm_pix" if norm_pix else "pixel"
    if impl == "torch":
        return _ref.mae_loss_reference(pred, imgs, mask, patch_size=patch_size, target=target,
                                       eps=eps, ids_masked=ids_masked)
    k = _common.kernels("mae_loss")
    with torch.cuda.device(pred.device) if pred.is_cuda else _nullcontext():
        part = k.mae_loss_fwd(pred, imgs, _weight(mask), ids_masked, patch_size=patch_size,
                              norm_pix=norm_pix, eps=eps, **_common.tuning(pred.device))
    wsum = _weight_sum(pred, mask)
    # sum(w) == 0 means nothing to reconstruct: the partials are exactly 0, divide by 1.
    return part.sum() / torch.where(wsum != 0, wsum, torch.ones_like(wsum))


_mae_loss_op = torch.library.custom_op("fastssl::mae_loss", _mae_loss_impl, mutates_args=())


@_mae_loss_op.register_fake
def _(pred, imgs, mask, ids_masked, patch_size, norm_pix, eps, impl):
    return pred.new_empty((), dtype=_loss_dtype(pred))


def _mae_loss_backward_impl(grad: torch.Tensor, pred: torch.Tensor, imgs: torch.Tensor,
                          mask: Optional[torch.Tensor], ids_masked: Optional[torch.Tensor],
                          patch_size: int, norm_pix: bool, eps: float,
                          impl: str) -> torch.Tensor:
    target = "norm_pix" if norm_pix else "pixel"
    if impl == "torch":
        return _ref.mae_loss_backward_reference(grad, pred, imgs, mask, patch_size=patch_size,
                                                target=target, eps=eps, ids_masked=ids_masked)
    k = _common.kernels("mae_loss")
    wsum = _weight_sum(pred, mask)
    scale = (grad.float() / torch.where(wsum != 0, wsum, torch.ones_like(wsum))).reshape(1)
    with torch.cuda.device(pred.device) if pred.is_cuda else _nullcontext():
        return k.mae_loss_bwd(pred, imgs, _weight(mask), ids_masked, scale,
                              patch_size=patch_size, norm_pix=norm_pix, eps=eps,
                              **_common.tuning(pred.device))


_mae_loss_backward_op = torch.library.custom_op(
    "fastssl::mae_loss_backward", _mae_loss_backward_impl, mutates_args=())


@_mae_loss_backward_op.register_fake
def _(grad, pred, imgs, mask, ids_masked, patch_size, norm_pix, eps, impl):
    return torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)


def _setup_context(ctx, inputs, output):
    pred, imgs, mask, ids_masked, patch_size, norm_pix, eps, impl = inputs
    ctx.save_for_backward(pred, imgs, mask, ids_masked)
    ctx.config = (patch_size, norm_pix, eps, impl)


def _backward(ctx, grad, backward_op=None):
    pred, imgs, mask, ids_masked = ctx.saved_tensors
    grad_pred = None
    if ctx.needs_input_grad[0]:
        grad_pred = (backward_op or _mae_loss_backward_op)(grad, pred, imgs, mask, ids_masked, *ctx.config)
    return grad_pred, None, None, None, None, None, None, None


_mae_loss_op.register_autograd(_backward, setup_context=_setup_context)
_mae_loss_eager = _common.eager_function(
    _mae_loss_impl, _setup_context,
    functools.partial(_backward, backward_op=_mae_loss_backward_impl))


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------- public
def _check(pred, imgs, mask, patch_size, target, ids_masked) -> None:
    _common.check_tensor(pred, "pred", 3, _common.FLOAT_DTYPES, "(B, L, P)")
    _common.check_tensor(imgs, "imgs", 4, _common.FLOAT_DTYPES, "(B, C, H, W)")
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    if target not in TARGETS:
        raise ValueError(f"target={target!r}; expected one of {TARGETS}")
    b, c, h, w = imgs.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"imgs has shape {tuple(imgs.shape)}: H={h} and W={w} must be "
                         f"multiples of patch_size={p}")
    n_patches = (h // p) * (w // p)
    p_len = p * p * c
    if pred.shape[0] != b or pred.shape[2] != p_len:
        raise ValueError(
            f"pred has shape {tuple(pred.shape)} and imgs {tuple(imgs.shape)}: expected "
            f"pred (B={b}, rows, P=patch_size**2*C={p_len})")
    if target == "norm_pix" and p_len < 2:
        raise ValueError("target='norm_pix' needs at least 2 values per patch (the unbiased "
                         f"variance of one value is undefined); P={p_len}")
    if ids_masked is None:
        if mask is None:
            raise ValueError("mask is required unless ids_masked is given")
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if pred.shape[1] != n_patches:
            raise ValueError(
                f"pred has shape {tuple(pred.shape)} but imgs {tuple(imgs.shape)} with "
                f"patch_size={p} has L={n_patches} patches (pass ids_masked for the compact "
                "layout)")
        if tuple(mask.shape) != (b, n_patches):
            raise ValueError(f"mask has shape {tuple(mask.shape)}; expected (B, L) = "
                             f"({b}, {n_patches})")
        if not (mask.dtype == torch.bool or mask.dtype.is_floating_point):
            raise TypeError(f"mask has dtype {mask.dtype}; expected bool or a floating dtype")
        _common.check_same_device(("pred", pred), ("imgs", imgs), ("mask", mask))
    else:
        if mask is not None:
            raise ValueError("mask must be None when ids_masked is given: in the compact "
                             "layout every row of pred counts")
        _common.check_tensor(ids_masked, "ids_masked", 2, _common.INDEX_DTYPES, "(B, M)")
        if tuple(ids_masked.shape) != tuple(pred.shape[:2]):
            raise ValueError(f"ids_masked has shape {tuple(ids_masked.shape)}; expected (B, M) "
                             f"= {tuple(pred.shape[:2])} from pred {tuple(pred.shape)}")
        _common.check_same_device(("pred", pred), ("imgs", imgs), ("ids_masked", ids_masked))


def mae_loss(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    patch_size: int,
    target: str = "norm_pix",
    eps: float = 1e-6,
    ids_masked: torch.Tensor | None = None,
    impl: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """MAE reconstruction loss, fused: ``sum(mse_per_patch * w) / sum(w)``.

    Patches follow facebookresearch/mae's patchify (``'nchpwq->nhwpqc'``: channel last
    within a patch), for any number of channels.

    Args:
        pred: (B, L, P) float32|float16|bfloat16 (float64 with impl="torch"), one row per
            patch; P = patch_size**2 * C. Or (B, M, P) in the compact layout.
        imgs: (B, C, H, W) float32|float16|bfloat16|float64, H and W multiples of
            patch_size, any strides. Data: no gradient flows to it.
        mask: (B, L) bool or float, 1 = masked. Its values weight the per-patch MSE (a
            float mask may hold any non-negative weights); samples may mask different
            counts. Must be None in the compact layout.
        patch_size: p.
        target: "norm_pix" (MAE's norm_pix_loss: each target patch minus its mean,
            divided by sqrt(unbiased variance + eps)) or "pixel" (raw pixels, e.g. images
            already normalised with dataset statistics, as MVMAE).
        eps: added to the variance before the square root.
        ids_masked: (B, M) int32|int64, the compact layout of a decoder that predicts only
            masked tokens: row m of pred predicts patch ids_masked[b, m] and every row
            counts with weight 1 (loss = mean over all B*M rows).
        impl: "auto" | "triton" | "torch" (module docstring).
        validate: check that ids_masked lies in [0, L) (one device sync). Skipped inside
            torch.compile. With validate=False an out-of-range id contributes zero error
            instead of reading stray memory.
    Returns:
        0-dim float32 tensor (float64 for float64 pred), differentiable w.r.t. pred only.
        A mask with no masked patch gives 0 and a zero gradient, never NaN.
    Raises:
        ValueError / TypeError: bad shapes or dtypes, before anything is launched.
        MissingDependencyError: impl="triton" where Triton cannot run.
    """
    _check(pred, imgs, mask, patch_size, target, ids_masked)
    chosen = _common.resolve("mae_loss", impl, pred.device, pred.dtype)
    if ids_masked is not None and _common.should_validate(validate):
        n_patches = (imgs.shape[2] // patch_size) * (imgs.shape[3] // patch_size)
        out_of_range, _ = _common.index_problems(ids_masked, n_patches, distinct=False)
        if out_of_range:
            raise ValueError(f"ids_masked holds values outside [0, L={n_patches})")
    op = _mae_loss_op if torch.compiler.is_compiling() else _mae_loss_eager
    return op(pred, imgs, mask, ids_masked, patch_size, target == "norm_pix", float(eps), chosen)
