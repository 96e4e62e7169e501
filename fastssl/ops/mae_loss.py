"""The MAE reconstruction loss as one op: patchify + target normalisation + masked MSE.

``mae_loss`` checks its inputs, picks an implementation (``impl=``) and calls the
registered custom op ``fastssl::mae_loss``, whose autograd formula calls
``fastssl::mae_loss_backward``. Both have fake (meta) implementations, so a model that
calls ``mae_loss`` compiles with ``torch.compile(fullgraph=True)``.

Implementations:
    "triton"  fused kernels (fastssl.kernels.mae_loss): the target is read straight from
              ``imgs``. In eager mode, when pred needs a gradient, one pass writes the loss
              and the gradient for an incoming gradient of 1, which backward returns
              unless the device sees another incoming gradient (a caller that scales its
              loss by a constant passes it as ``scale``, so that the incoming gradient
              stays the unit one and nothing is recomputed); under torch.compile, for
              other incoming gradients and a second backward (retain_graph) the gradient
              is recomputed in backward. CUDA tensors, or CPU tensors under
              TRITON_INTERPRET=1.
    "torch"   fastssl.reference.mae (forward and the closed-form gradient).
    "auto"    "triton" for CUDA tensors when Triton is installed, else "torch"
              (FASTSSL_IMPL overrides "auto").
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from fastssl.ops import _common
from fastssl.reference import mae as _ref

__all__ = ["mae_loss", "TARGETS"]

TARGETS = ("norm_pix", "pixel")


# ------------------------------------------------------------------------ custom ops
def _loss_dtype(pred: torch.Tensor) -> torch.dtype:
    return torch.float64 if pred.dtype == torch.float64 else torch.float32


def _triton_forward(pred, imgs, mask, ids_masked, patch_size, norm_pix, eps, groups, scale, *,
                    with_grad):
    k = _common.kernels("mae_loss")
    with _common.device_ctx(pred):
        return k.mae_loss_forward(pred, imgs, mask, ids_masked, groups=groups,
                                  patch_size=patch_size, norm_pix=norm_pix, eps=eps,
                                  with_grad=with_grad, scale=scale,
                                  **_common.tuning(pred.device))


def _mae_loss_impl(pred: torch.Tensor, imgs: torch.Tensor, mask: Optional[torch.Tensor],
                   ids_masked: Optional[torch.Tensor], patch_size: int, norm_pix: bool,
                   eps: float, groups: int, scale: float,
                   impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss (), per_group (G,)): the loss is the mean of the per-group losses, each
    multiplied by scale."""
    if impl == "torch":
        per_group = _ref.mae_loss_per_group_reference(
            pred, imgs, mask, patch_size=patch_size, target="norm_pix" if norm_pix else "pixel",
            eps=eps, ids_masked=ids_masked, groups=groups) * scale
        return per_group.mean(), per_group
    loss, per_group, _, _ = _triton_forward(pred, imgs, mask, ids_masked, patch_size, norm_pix,
                                            eps, groups, scale, with_grad=False)
    return loss, per_group


_mae_loss_op = torch.library.custom_op("fastssl::mae_loss", _mae_loss_impl, mutates_args=())


@_mae_loss_op.register_fake
def _(pred, imgs, mask, ids_masked, patch_size, norm_pix, eps, groups, scale, impl):
    dtype = _loss_dtype(pred)
    return pred.new_empty((), dtype=dtype), pred.new_empty((groups,), dtype=dtype)


def _backward_impl(grad_loss, grad_groups, pred, imgs, mask, ids_masked, patch_size, norm_pix,
                   eps, groups, scale, impl, *, wsums=None, out=None):
    """d (grad_loss * loss + sum(grad_groups * per_group)) / d pred. With ``out`` (the
    single-pass gradient of the forward, Triton only) only groups whose incoming gradient
    is not the unit one are recomputed into it, decided on the device."""
    if impl == "torch":
        grad_groups = None if grad_groups is None else grad_groups * scale
        return _ref.mae_loss_backward_reference(
            grad_loss * scale, pred, imgs, mask, patch_size=patch_size,
            target="norm_pix" if norm_pix else "pixel", eps=eps, ids_masked=ids_masked,
            groups=groups, grad_groups=grad_groups)
    k = _common.kernels("mae_loss")
    with _common.device_ctx(pred):
        if out is None:  # not saved by a single-pass forward: sum the weights again
            wsums = k.weight_sums(pred, mask, groups)
        return k.mae_loss_backward(grad_loss.float(), grad_groups.float(), pred, imgs, mask,
                                   ids_masked, wsums, groups=groups, patch_size=patch_size,
                                   norm_pix=norm_pix, eps=eps, out=out, scale=scale,
                                   **_common.tuning(pred.device))


def _mae_loss_backward_impl(grad_loss: torch.Tensor, grad_groups: torch.Tensor,
                            pred: torch.Tensor, imgs: torch.Tensor,
                            mask: Optional[torch.Tensor], ids_masked: Optional[torch.Tensor],
                            patch_size: int, norm_pix: bool, eps: float, groups: int,
                            scale: float, impl: str) -> torch.Tensor:
    return _backward_impl(grad_loss, grad_groups, pred, imgs, mask, ids_masked, patch_size,
                          norm_pix, eps, groups, scale, impl)


_mae_loss_backward_op = torch.library.custom_op(
    "fastssl::mae_loss_backward", _mae_loss_backward_impl, mutates_args=())


@_mae_loss_backward_op.register_fake
def _(grad_loss, grad_groups, pred, imgs, mask, ids_masked, patch_size, norm_pix, eps, groups,
      scale, impl):
    return torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)


def _incoming(grad_loss, grad_groups, pred, groups):
    # Autograd may hand None for an output that no loss used: it contributes nothing.
    dtype = _loss_dtype(pred)
    if grad_loss is None:
        grad_loss = pred.new_zeros((), dtype=dtype)
    if grad_groups is None:
        grad_groups = pred.new_zeros((groups,), dtype=dtype)
    return grad_loss, grad_groups


def _setup_context(ctx, inputs, output):
    pred, imgs, mask, ids_masked, patch_size, norm_pix, eps, groups, scale, impl = inputs
    ctx.save_for_backward(pred, imgs, mask, ids_masked)
    ctx.config = (patch_size, norm_pix, eps, groups, scale, impl)


def _backward(ctx, grad_loss, grad_groups):
    pred, imgs, mask, ids_masked = ctx.saved_tensors
    grad_pred = None
    if ctx.needs_input_grad[0]:
        grad_loss, grad_groups = _incoming(grad_loss, grad_groups, pred, ctx.config[3])
        grad_pred = _mae_loss_backward_op(grad_loss, grad_groups, pred, imgs, mask, ids_masked,
                                          *ctx.config)
    return grad_pred, None, None, None, None, None, None, None, None, None


_mae_loss_op.register_autograd(_backward, setup_context=_setup_context)


class _MaeLossEager(torch.autograd.Function):
    """The eager path (no op-dispatcher overhead, see _common.eager_function) with the
    single pass: when pred needs a gradient and the Triton kernels run, the forward also
    writes the gradient for an incoming gradient of 1, and backward returns it unless the
    device sees another incoming gradient (then those groups are recomputed). A second
    backward (retain_graph) recomputes everything."""

    @staticmethod
    def forward(ctx, pred, imgs, mask, ids_masked, patch_size, norm_pix, eps, groups, scale,
                impl, single_pass):
        ctx.unit_grad = ctx.wsums = None
        if impl == "triton" and single_pass:
            loss, per_group, ctx.wsums, ctx.unit_grad = _triton_forward(
                pred, imgs, mask, ids_masked, patch_size, norm_pix, eps, groups, scale,
                with_grad=True)
        else:
            loss, per_group = _mae_loss_impl(pred, imgs, mask, ids_masked, patch_size, norm_pix,
                                             eps, groups, scale, impl)
        ctx.save_for_backward(pred, imgs, mask, ids_masked)
        ctx.config = (patch_size, norm_pix, eps, groups, scale, impl)
        return loss, per_group

    @staticmethod
    def backward(ctx, grad_loss, grad_groups):
        pred, imgs, mask, ids_masked = ctx.saved_tensors
        grad_loss, grad_groups = _incoming(grad_loss, grad_groups, pred, ctx.config[3])
        unit_grad, ctx.unit_grad = ctx.unit_grad, None  # handed out once: no reuse
        grad_pred = _backward_impl(grad_loss, grad_groups, pred, imgs, mask, ids_masked,
                                   *ctx.config, wsums=ctx.wsums, out=unit_grad)
        return grad_pred, None, None, None, None, None, None, None, None, None, None


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
    groups: int = 1,
    return_groups: bool = False,
    scale: float = 1.0,
    impl: str = "auto",
    validate: bool = True,
):
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
        groups: G dividing B. The batch is G equal consecutive slices (G=2: the frontal
            then the lateral views of a paired batch), each normalised by its own weight
            sum; the loss is the mean of the G per-group losses. One call covers both
            views of a paired batch.
        return_groups: also return the (G,) per-group losses (differentiable too).
        scale: a finite constant multiplying the loss and the per-group losses. A caller
            whose total loss scales this one (MVMAE's released reduction) passes the
            factor here rather than multiplying the result: the single-pass gradient is
            then the one backward needs, and the Triton path recomputes nothing.
        impl: "auto" | "triton" | "torch" (module docstring).
        validate: check that ids_masked lies in [0, L) (one device sync). Skipped inside
            torch.compile. With validate=False an out-of-range id contributes zero error
            instead of reading stray memory.
    Returns:
        0-dim float32 tensor (float64 for float64 pred), differentiable w.r.t. pred only;
        with return_groups, ``(loss, per_group)``. A group with no masked patch gives 0
        and a zero gradient, never NaN.
    Raises:
        ValueError / TypeError: bad shapes or dtypes, before anything is launched.
        MissingDependencyError: impl="triton" where Triton cannot run.
    """
    _check(pred, imgs, mask, patch_size, target, ids_masked)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 \
            or pred.shape[0] % groups:
        raise ValueError(f"groups={groups!r} must be a positive int dividing the batch size "
                         f"B={pred.shape[0]} of pred {tuple(pred.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale={scale!r} must be a finite number")
    chosen = _common.resolve("mae_loss", impl, pred.device, pred.dtype)
    if ids_masked is not None and _common.should_validate(validate):
        n_patches = (imgs.shape[2] // patch_size) * (imgs.shape[3] // patch_size)
        out_of_range, _ = _common.index_problems(ids_masked, n_patches, distinct=False)
        if out_of_range:
            raise ValueError(f"ids_masked holds values outside [0, L={n_patches})")
    args = (pred, imgs, mask, ids_masked, patch_size, target == "norm_pix", float(eps), groups,
            float(scale), chosen)
    if torch.compiler.is_compiling():
        loss, per_group = _mae_loss_op(*args)
    else:
        single_pass = torch.is_grad_enabled() and pred.requires_grad
        loss, per_group = _MaeLossEager.apply(*args, single_pass)
    return (loss, per_group) if return_groups else loss
