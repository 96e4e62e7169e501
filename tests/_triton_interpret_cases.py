"""The Triton kernels of fastssl.ops under TRITON_INTERPRET=1, against the reference.

Not collected by a plain ``pytest`` (the name does not start with test_): the interpreter
must be switched on before Triton is first imported, so tests/test_ops_triton.py runs
this file in a fresh process with TRITON_INTERPRET=1. To run it by hand:

    TRITON_INTERPRET=1 python -m pytest tests/_triton_interpret_cases.py -q

Every comparison is against the float64 reference on the same (rounded) inputs; kernel
gradients are compared with the reference's autograd gradients for a non-unit
grad_output. Shapes are small and odd (L=49, D=33, B=1) because each program instance
costs about a millisecond in the interpreter.
"""
from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 set before Triton is imported "
                "(tests/test_ops_triton.py runs this file that way)", allow_module_level=True)

import fastssl.ops as ops  # noqa: E402
from fastssl.reference import mae as ref  # noqa: E402

from _mae_helpers import (forward_loss_c, lowp_tolerance, masked_ids, max_err,  # noqa: E402
                          randn, random_mask)

pytestmark = pytest.mark.triton_interpret

F64 = torch.float64
GRAD_OUT = 1.7  # non-unit: the kernel must scale by it

# (B, C, H, W, p): L = (H/p)(W/p), P = p*p*C (not always a power of two)
LOSS_SHAPES = [(1, 1, 28, 28, 4), (2, 3, 28, 28, 4), (3, 1, 20, 12, 4), (2, 3, 16, 16, 8)]
RATIOS = [0.0, 0.75, 0.93, "all_but_one"]


def _loss_and_grad(pred, imgs, mask, *, impl, **kw):
    pred = pred.detach().clone().requires_grad_()
    loss = (ops.mae_loss(pred, imgs, mask, impl=impl, **kw) if impl != "ref" else
            ref.mae_loss_reference(pred, imgs, mask, **kw))
    (grad,) = torch.autograd.grad(loss, pred, torch.tensor(GRAD_OUT, dtype=loss.dtype))
    return loss.detach(), grad


def _ref64(pred, imgs, mask, **kw):
    m = mask.double() if mask is not None and mask.dtype != torch.bool else mask
    return _loss_and_grad(pred.double(), imgs.double(), m, impl="ref", **kw)


# ------------------------------------------------------------------------ mae_loss
@pytest.mark.parametrize("target", ["norm_pix", "pixel"])
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("shape", LOSS_SHAPES)
def test_mae_loss_fp32(rng, shape, ratio, target):
    b, c, h, w, p = shape
    length = (h // p) * (w // p)
    imgs = randn(rng, (b, c, h, w), scale=3.0, shift=1.0)
    pred = randn(rng, (b, length, p * p * c))
    mask = random_mask(rng, b, length, ratio)
    loss, grad = _loss_and_grad(pred, imgs, mask, impl="triton", patch_size=p, target=target)
    want, want_grad = _ref64(pred, imgs, mask, patch_size=p, target=target)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    assert max_err(loss, want) <= 1e-5 * max(want.abs().item(), 1e-3), (loss, want)
    assert max_err(grad, want_grad) <= 1e-5 * want_grad.abs().max().item() + 1e-9
    if ratio == 0.0:  # nothing masked: exactly zero, never NaN
        assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("target", ["norm_pix", "pixel"])
@pytest.mark.parametrize("c", [1, 3])
def test_mae_loss_low_precision(rng, dtype, target, c):
    b, h, w, p = 2, 28, 28, 4
    length = 49
    imgs = randn(rng, (b, c, h, w), dtype, scale=2.0, shift=0.5)
    pred = randn(rng, (b, length, p * p * c), dtype)
    mask = random_mask(rng, b, length, 0.75)
    loss, grad = _loss_and_grad(pred, imgs, mask, impl="triton", patch_size=p, target=target)
    want, want_grad = _ref64(pred, imgs, mask, patch_size=p, target=target)
    # PyTorch's own computation at this precision (MAE's formula run in `dtype`).
    tp = pred.detach().clone().requires_grad_()
    torch_loss = forward_loss_c(imgs, tp, mask.to(dtype), p, target == "norm_pix")
    (torch_grad,) = torch.autograd.grad(torch_loss, tp, torch.tensor(GRAD_OUT, dtype=dtype))
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert max_err(loss, want) <= lowp_tolerance(want, torch_loss, dtype)
    assert max_err(grad, want_grad) <= lowp_tolerance(want_grad, torch_grad, dtype)


def test_mae_loss_mixed_dtypes_and_strides(rng):
    """bf16 pred against fp32 images (autocast), images as a strided crop, bool mask."""
    big = randn(rng, (2, 3, 32, 40))
    imgs = big[:, :, 2:30, 5:33]  # (2, 3, 28, 28), not contiguous
    pred = randn(rng, (2, 49, 48), torch.bfloat16)
    mask = random_mask(rng, 2, 49, 0.75).bool()
    loss, grad = _loss_and_grad(pred, imgs, mask, impl="triton", patch_size=4)
    want, want_grad = _ref64(pred, imgs, mask, patch_size=4)
    assert max_err(loss, want) <= 1e-5 * want.item()
    assert max_err(grad, want_grad) <= 2 ** -7 * want_grad.abs().max().item()
    # channels_last images and a pred whose last dim is strided
    imgs_cl = imgs.contiguous(memory_format=torch.channels_last)
    pred_wide = randn(rng, (2, 49, 96))[..., ::2]
    loss, grad = _loss_and_grad(pred_wide, imgs_cl, mask.float(), impl="triton", patch_size=4)
    want, want_grad = _ref64(pred_wide, imgs_cl, mask.float(), patch_size=4)
    assert max_err(loss, want) <= 1e-5 * want.item()
    assert max_err(grad, want_grad) <= 1e-5 * want_grad.abs().max().item()


def test_mae_loss_float_weights_and_counts_per_sample(rng):
    imgs = randn(rng, (3, 1, 28, 28))
    pred = randn(rng, (3, 49, 16))
    weights = torch.from_numpy(rng.uniform(0, 2, (3, 49)).astype("float32"))
    weights[1] = 0.0  # a sample with nothing masked next to others
    loss, grad = _loss_and_grad(pred, imgs, weights, impl="triton", patch_size=4)
    want, want_grad = _ref64(pred, imgs, weights, patch_size=4)
    assert max_err(loss, want) <= 1e-5 * want.item()
    assert max_err(grad, want_grad) <= 1e-5 * want_grad.abs().max().item()
    assert torch.equal(grad[1], torch.zeros_like(grad[1]))


@pytest.mark.parametrize("target", ["norm_pix", "pixel"])
@pytest.mark.parametrize("c", [1, 3])
def test_mae_loss_compact_layout(rng, target, c):
    imgs = randn(rng, (2, c, 28, 28))
    mask = random_mask(rng, 2, 49, 0.75, same_count=True)
    ids = masked_ids(mask)
    pred = randn(rng, (2, ids.shape[1], 16 * c))
    kw = dict(patch_size=4, target=target, ids_masked=ids)
    loss, grad = _loss_and_grad(pred, imgs, None, impl="triton", **kw)
    want, want_grad = _ref64(pred, imgs, None, **kw)
    assert max_err(loss, want) <= 1e-5 * want.item()
    assert max_err(grad, want_grad) <= 1e-5 * want_grad.abs().max().item()
    loss32, _ = _loss_and_grad(pred, imgs, None, impl="triton", **dict(kw, ids_masked=ids.int()))
    assert loss32.item() == loss.item()


def test_mae_loss_out_of_range_ids_unvalidated_reads_nothing(rng):
    imgs = randn(rng, (1, 1, 8, 8))
    pred = randn(rng, (1, 2, 16))
    ids = torch.tensor([[1, 1 << 20]])
    loss, grad = _loss_and_grad(pred, imgs, None, impl="triton", patch_size=4, ids_masked=ids,
                                validate=False)
    want, _ = _ref64(pred[:, :1], imgs, None, patch_size=4, ids_masked=ids[:, :1])
    assert abs(loss.item() - want.item() / 2) <= 1e-5 * want.item()  # 2nd row adds 0
    assert torch.equal(grad[0, 1], torch.zeros(16))


# ------------------------------------------------------- mae_loss: single pass, groups
def _ref_groups64(pred, imgs, mask, grad_loss, grad_groups, **kw):
    """float64 reference of d(grad_loss * loss + grad_groups . per_group) / d pred."""
    leaf = pred.detach().double().requires_grad_()
    m = mask.double() if mask is not None and mask.dtype != torch.bool else mask
    per_group = ref.mae_loss_per_group_reference(leaf, imgs.double(), m, **kw)
    total = grad_loss * per_group.mean() + (torch.tensor(grad_groups, dtype=F64) * per_group).sum()
    (grad,) = torch.autograd.grad(total, leaf)
    return per_group.mean().detach(), per_group.detach(), grad


@pytest.fixture
def launches(monkeypatch):
    """The kernel modes launched: "forward", "single_pass", "backward" (every group
    recomputed), "backward[skip]" (a single-pass gradient kept for every group: the
    incoming gradient is the unit one) or "backward[partial]" (some groups recomputed)."""
    from fastssl.kernels import mae_loss as k
    seen = []
    real = k._launch
    names = {k.FORWARD: "forward", k.SINGLE_PASS: "single_pass", k.BACKWARD: "backward"}

    def spy(mode, *args, **kw):
        tag = ""
        if kw.get("skip_unit"):  # read on the host here, in the test only
            unit = float(kw["grad_loss"]) == 1.0 and not bool(kw["grad_groups"].any())
            tag = "[skip]" if unit else "[partial]"
        seen.append(names[mode] + tag)
        return real(mode, *args, **kw)
    monkeypatch.setattr(k, "_launch", spy)
    return seen


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("shape", [(2, 1, 28, 28, 4), (4, 3, 20, 12, 4)])
def test_mae_loss_single_pass_unit_gradient(rng, shape, ratio, groups, launches):
    """loss.backward() (incoming gradient 1): the forward's single pass writes the
    gradient and backward keeps it (the backward launch skips every group)."""
    b, c, h, w, p = shape
    length = (h // p) * (w // p)
    imgs = randn(rng, (b, c, h, w), scale=3.0, shift=1.0)
    pred = randn(rng, (b, length, p * p * c)).requires_grad_()
    mask = random_mask(rng, b, length, ratio)
    loss, per_group = ops.mae_loss(pred, imgs, mask, patch_size=p, impl="triton", groups=groups,
                                   return_groups=True)
    loss.backward()
    want, want_groups, want_grad = _ref_groups64(pred, imgs, mask, 1.0, [0.0] * groups,
                                                 patch_size=p, groups=groups)
    assert launches == ["single_pass", "backward[skip]"]
    assert max_err(loss, want) <= 1e-5 * max(want.abs().item(), 1e-3)
    assert max_err(per_group, want_groups) <= 1e-5 * max(want_groups.abs().max().item(), 1e-3)
    assert max_err(pred.grad, want_grad) <= 1e-5 * want_grad.abs().max().item() + 1e-9
    if ratio == 0.0:
        assert loss.item() == 0.0 and torch.equal(pred.grad, torch.zeros_like(pred.grad))


@pytest.mark.parametrize("grad_loss, grad_groups", [
    (1.0, [0.0, 0.7]),   # group 0 keeps the single-pass gradient, group 1 is recomputed
    (1.7, [0.0, 0.0]),   # non-unit: both recomputed
    (0.0, [0.0, 1.0]),   # only the second group's own loss
    (1.0, [0.0, 0.0]),   # unit: both kept
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mae_loss_groups_incoming_gradients(rng, grad_loss, grad_groups, dtype):
    b, c, p, length = 4, 1, 4, 49
    imgs = randn(rng, (b, c, 28, 28), scale=2.0, shift=0.5)
    pred = randn(rng, (b, length, p * p * c), dtype).requires_grad_()
    mask = random_mask(rng, b, length, 0.75).bool()
    loss, per_group = ops.mae_loss(pred, imgs, mask, patch_size=p, impl="triton", groups=2,
                                   return_groups=True, target="pixel")
    total = grad_loss * loss + (torch.tensor(grad_groups) * per_group).sum()
    total.backward()
    _, want_groups, want_grad = _ref_groups64(pred, imgs, mask, grad_loss, grad_groups,
                                              patch_size=p, groups=2, target="pixel")
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    assert max_err(per_group, want_groups) <= tol * want_groups.abs().max().item()
    assert pred.grad.dtype == dtype
    assert max_err(pred.grad, want_grad) <= tol * want_grad.abs().max().item()


def test_mae_loss_backward_leaves_unit_groups_untouched(rng):
    """The skip is decided on the device: a unit-gradient group's rows of ``out`` are not
    written (poisoned values survive), the other group is recomputed into it."""
    from fastssl.kernels import mae_loss as k
    imgs = randn(rng, (4, 1, 28, 28))
    pred = randn(rng, (4, 49, 16))
    mask = random_mask(rng, 4, 49, 0.75)
    out = torch.full((4, 49, 16), 123.0)
    wsums = k.weight_sums(pred, mask, 2)
    k.mae_loss_backward(torch.tensor(1.0), torch.tensor([0.0, 0.3]), pred, imgs, mask, None,
                        wsums, groups=2, patch_size=4, norm_pix=True, eps=1e-6, out=out)
    _, _, want = _ref_groups64(pred, imgs, mask, 1.0, [0.0, 0.3], patch_size=4, groups=2)
    assert bool((out[:2] == 123.0).all())
    assert max_err(out[2:], want[2:]) <= 1e-5 * want.abs().max().item()


def test_mae_loss_one_group_per_image(rng):
    """groups=B: the mean over images of each image's masked MSE (MultiViewMAE's loss),
    per-image losses out for logs, even when the images mask different counts."""
    b, length = 6, 49
    imgs = randn(rng, (b, 1, 28, 28))
    pred = randn(rng, (b, length, 16)).requires_grad_()
    mask = random_mask(rng, b, length, 0.75)  # counts differ per image
    loss, per_image = ops.mae_loss(pred, imgs, mask, patch_size=4, groups=b, return_groups=True,
                                   impl="triton", target="pixel")
    (loss + 0.5 * per_image[::2].mean()).backward()
    _, want_images, want_grad = _ref_groups64(pred, imgs, mask, 1.0, [0.5 / 3, 0.0] * 3,
                                              patch_size=4, groups=b, target="pixel")
    assert per_image.shape == (b,)
    assert max_err(per_image, want_images) <= 1e-5 * want_images.abs().max().item()
    assert max_err(pred.grad, want_grad) <= 1e-5 * want_grad.abs().max().item()


def test_mae_loss_retain_graph_and_second_backward(rng, launches):
    """A second backward over a retained graph recomputes (the single-pass gradient was
    handed out once) and accumulates the same gradient again."""
    imgs = randn(rng, (2, 1, 20, 12))
    pred = randn(rng, (2, 15, 16)).requires_grad_()
    mask = random_mask(rng, 2, 15, 0.75)
    loss = ops.mae_loss(pred, imgs, mask, patch_size=4, impl="triton")
    loss.backward(retain_graph=True)
    first = pred.grad.clone()
    loss.backward(torch.tensor(0.5))
    _, _, want = _ref_groups64(pred, imgs, mask, 1.0, [0.0], patch_size=4)
    assert max_err(first, want) <= 1e-5 * want.abs().max().item()
    assert max_err(pred.grad, 1.5 * want) <= 1.5e-5 * want.abs().max().item()
    assert launches == ["single_pass", "backward[skip]", "backward"]


def test_mae_loss_no_grad_and_eval_launch_forward_only(rng, launches):
    imgs = randn(rng, (2, 1, 8, 8))
    pred = randn(rng, (2, 4, 16))
    mask = random_mask(rng, 2, 4, 0.5)
    a = ops.mae_loss(pred, imgs, mask, patch_size=4, impl="triton")  # no requires_grad
    with torch.no_grad():
        b = ops.mae_loss(pred.requires_grad_(), imgs, mask, patch_size=4, impl="triton")
    assert launches == ["forward", "forward"] and a.item() == b.item()


def test_mae_loss_groups_compact_layout(rng):
    imgs = randn(rng, (4, 1, 28, 28))
    mask = random_mask(rng, 4, 49, 0.93, same_count=True)
    ids = masked_ids(mask)
    pred = randn(rng, (4, ids.shape[1], 16)).requires_grad_()
    loss, per_group = ops.mae_loss(pred, imgs, None, ids_masked=ids, patch_size=4, groups=2,
                                   return_groups=True, impl="triton")
    (loss + per_group[0]).backward()
    _, want_groups, want_grad = _ref_groups64(pred, imgs, None, 1.0, [1.0, 0.0], patch_size=4,
                                              ids_masked=ids, groups=2)
    assert max_err(per_group, want_groups) <= 1e-5 * want_groups.abs().max().item()
    assert max_err(pred.grad, want_grad) <= 1e-5 * want_grad.abs().max().item()


# --------------------------------------------------------------------- gather_tokens
GATHER_CASES = [  # (B, L, D, mask ratio)
    (1, 49, 33, 0.75), (2, 49, 33, 0.93), (3, 49, 8, 0.0), (2, 49, 300, "all_but_one"),
]


def _keep_ids(b, length, ratio):
    keep = 1 if ratio == "all_but_one" else ref.num_kept(length, ratio)
    return torch.stack([torch.randperm(length)[:keep] for _ in range(b)])


@pytest.mark.parametrize("embeds", ["none", "pos", "pos3d_se", "se"])
@pytest.mark.parametrize("case", GATHER_CASES)
def test_gather_tokens_fp32(rng, case, embeds):
    b, length, d, ratio = case
    torch.manual_seed(b * length + d)
    ids = _keep_ids(b, length, ratio)
    x = randn(rng, (b, length, d))
    pos = {"pos": randn(rng, (length, d)), "pos3d_se": randn(rng, (1, length, d))}.get(embeds)
    se = randn(rng, (b, d)) if embeds in ("se", "pos3d_se") else None
    inputs = [t for t in (x, pos, se) if t is not None]

    def run(impl, tensors):
        tensors = [t.detach().clone().requires_grad_() for t in tensors]
        it = iter(tensors[1:])
        p = next(it) if pos is not None else None
        s = next(it) if se is not None else None
        if impl == "ref":
            out = ref.gather_tokens_reference(tensors[0], ids, pos_embed=p, sample_embed=s)
        else:
            out = ops.gather_tokens(tensors[0], ids, pos_embed=p, sample_embed=s, impl=impl)
        g = torch.from_numpy(rng_g.standard_normal(out.shape)).to(out.dtype)
        return out.detach(), torch.autograd.grad(out, tensors, g)

    import numpy as np
    rng_g = np.random.default_rng(1)
    out, grads = run("triton", inputs)
    rng_g = np.random.default_rng(1)
    want, want_grads = run("ref", [t.double() for t in inputs])
    assert out.shape == (b, ids.shape[1], d) and out.dtype == torch.float32
    assert max_err(out, want) <= 1e-6 * want.abs().max().item()
    for g, wg in zip(grads, want_grads):
        assert g.shape == wg.shape
        assert max_err(g, wg) <= 1e-6 * max(wg.abs().max().item(), 1.0)


def _masking(b, length, ratio):
    """(ids_keep, ids_restore) of random per-row permutations, as random_masking's."""
    keep = 1 if ratio == "all_but_one" else ref.num_kept(length, ratio)
    perm = torch.stack([torch.randperm(length) for _ in range(b)])
    return perm[:, :keep], torch.argsort(perm, dim=1)


def _gather_grads64(ids_keep, x, pos, se, g):
    leaves = [t.detach().double().requires_grad_() for t in (x, pos, se)]
    out = ref.gather_tokens_reference(leaves[0], ids_keep, pos_embed=leaves[1],
                                      sample_embed=leaves[2])
    return torch.autograd.grad(out, leaves, g.double())


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_tokens_backward_from_ids_restore(rng, ratio, dtype):
    """The op's backward driven by random_masking's ids_restore (no inverse rebuilt)."""
    b, length, d = 3, 49, 33
    torch.manual_seed(7)
    ids_keep, ids_restore = _masking(b, length, ratio)
    x, pos, se = randn(rng, (b, length, d), dtype), randn(rng, (1, length, d)), randn(rng, (b, d))
    leaves = [t.clone().requires_grad_() for t in (x, pos, se)]
    out = ops.gather_tokens(leaves[0], ids_keep, ids_restore=ids_restore, pos_embed=leaves[1],
                            sample_embed=leaves[2], impl="triton")
    g = randn(rng, out.shape)
    grads = torch.autograd.grad(out, leaves, g)
    want = _gather_grads64(ids_keep, x, pos, se, g)
    tol = 1e-6 if dtype == torch.float32 else 2 ** -7  # one bf16 ulp (the interpreter truncates)
    for a, w in zip(grads, want):
        assert a.shape == w.shape
        assert max_err(a, w) <= tol * max(w.abs().max().item(), 1.0)


@pytest.mark.parametrize("tiles", [(2, 8, 16, 2), (1, 4, 32, 3), (4, 16, 8, 4)])
def test_gather_tokens_bwd_split_reductions_deterministic(rng, tiles):
    """Small tiles force several batch slices and L tiles: grad_pos and grad_se come from
    partials reduced by the last program to arrive; the result is exact and bitwise the
    same on a second run."""
    from fastssl.kernels import masking as k
    b, length, d = 5, 49, 33
    torch.manual_seed(3)
    ids_keep, ids_restore = _masking(b, length, 0.75)
    g = randn(rng, (b, ids_keep.shape[1], d))
    first = k.gather_tokens_bwd(g, ids_restore, torch.float32, ((1, length, d), torch.float32),
                                torch.float32, tiles=tiles)
    again = k.gather_tokens_bwd(g, ids_restore.int(), torch.float32,
                                ((1, length, d), torch.float32), torch.float32, tiles=tiles)
    x, pos, se = randn(rng, (b, length, d)), randn(rng, (1, length, d)), randn(rng, (b, d))
    want = _gather_grads64(ids_keep, x, pos, se, g)
    for a, a2, w in zip(first, again, want):
        assert a.shape == w.shape and torch.equal(a, a2)
        assert max_err(a, w) <= 1e-6 * max(w.abs().max().item(), 1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gather_tokens_low_precision(rng, dtype):
    b, length, d = 3, 49, 33
    ids = _keep_ids(b, length, 0.75)
    x, pos, se = randn(rng, (b, length, d), dtype), randn(rng, (length, d), dtype), randn(rng, (b, d), dtype)
    g = randn(rng, (b, ids.shape[1], d), dtype)

    def run(impl, x, pos, se, g):
        x, pos, se = (t.detach().clone().requires_grad_() for t in (x, pos, se))
        f = ref.gather_tokens_reference if impl == "ref" else ops.gather_tokens
        kw = {} if impl == "ref" else {"impl": impl}
        out = f(x, ids, pos_embed=pos, sample_embed=se, **kw)
        return (out.detach(),) + torch.autograd.grad(out, (x, pos, se), g)

    got = run("triton", x, pos, se, g)
    want = run("ref", x.double(), pos.double(), se.double(), g.double())
    torch_lowp = run("ref", x, pos, se, g)
    for a, w, t in zip(got, want, torch_lowp):
        assert a.dtype == dtype
        assert max_err(a, w) <= lowp_tolerance(w, t, dtype)


def test_gather_tokens_mixed_dtype_promotes(rng):
    x = randn(rng, (2, 49, 33), torch.bfloat16)
    pos = randn(rng, (49, 33))
    ids = _keep_ids(2, 49, 0.75)
    out = ops.gather_tokens(x, ids, pos_embed=pos, impl="triton")
    want = ref.gather_tokens_reference(x.double(), ids, pos_embed=pos.double())
    assert out.dtype == torch.float32 and max_err(out, want) <= 1e-6 * want.abs().max().item()


# ------------------------------------------------------------------------- unshuffle
@pytest.mark.parametrize("case", GATHER_CASES)
def test_unshuffle_fp32(rng, case):
    b, length, d, ratio = case
    keep = 1 if ratio == "all_but_one" else ref.num_kept(length, ratio)
    ids_restore = torch.stack([torch.randperm(length) for _ in range(b)])
    x_vis, tok = randn(rng, (b, keep, d)), randn(rng, (1, 1, d))
    g = randn(rng, (b, length, d))

    def run(impl, x_vis, tok, g):
        x_vis, tok = x_vis.detach().clone().requires_grad_(), tok.detach().clone().requires_grad_()
        if impl == "ref":
            out = ref.unshuffle_with_mask_token_reference(x_vis, tok, ids_restore)
        else:
            out = ops.unshuffle_with_mask_token(x_vis, tok, ids_restore, impl=impl)
        return (out.detach(),) + torch.autograd.grad(out, (x_vis, tok), g)

    got = run("triton", x_vis, tok, g)
    want = run("ref", x_vis.double(), tok.double(), g.double())
    for a, w in zip(got, want):
        assert a.shape == w.shape
        assert max_err(a, w) <= 1e-6 * max(w.abs().max().item(), 1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unshuffle_low_precision(rng, dtype):
    b, length, d = 2, 49, 33
    ids_restore = torch.stack([torch.randperm(length) for _ in range(b)]).int()
    x_vis, tok, g = randn(rng, (b, 12, d), dtype), randn(rng, (d,), dtype), randn(rng, (b, length, d), dtype)

    def run(impl, x_vis, tok, g):
        x_vis, tok = x_vis.detach().clone().requires_grad_(), tok.detach().clone().requires_grad_()
        f = ref.unshuffle_with_mask_token_reference if impl == "ref" else ops.unshuffle_with_mask_token
        out = f(x_vis, tok, ids_restore) if impl == "ref" else f(x_vis, tok, ids_restore, impl=impl)
        return (out.detach(),) + torch.autograd.grad(out, (x_vis, tok), g)

    got = run("triton", x_vis, tok, g)
    want = run("ref", x_vis.double(), tok.double(), g.double())
    torch_lowp = run("ref", x_vis, tok, g)
    for a, w, t in zip(got, want, torch_lowp):
        assert a.dtype == dtype
        assert max_err(a, w) <= lowp_tolerance(w, t, dtype)


# ---------------------------------------------------------- the ops together, compiled
def test_pipeline_compiled_with_triton_impl(rng):
    """random_masking -> gather -> unshuffle -> mae_loss, Triton impl, under
    torch.compile(fullgraph=True): same loss and gradients as the eager reference."""
    b, c, p, d = 2, 1, 4, 16
    imgs = randn(rng, (b, c, 28, 28))
    ids_keep, ids_restore, mask = ops.random_masking(b, 49, 0.75)
    x, pos, se, tok = (randn(rng, s) for s in ((b, 49, d), (1, 49, d), (b, d), (1, 1, d)))
    w = randn(rng, (d, p * p * c), scale=0.3)

    def step(x, pos, se, tok, impl):
        kept = ops.gather_tokens(x, ids_keep, pos_embed=pos, sample_embed=se, impl=impl)
        full = ops.unshuffle_with_mask_token(kept * 2.0, tok, ids_restore, impl=impl)
        loss, per_view = ops.mae_loss(full @ w, imgs, mask, patch_size=p, impl=impl, groups=2,
                                      return_groups=True)
        return loss + 0.25 * per_view[0]

    leaves = [t.clone().requires_grad_() for t in (x, pos, se, tok)]
    want = step(*leaves, "torch")
    want_grads = torch.autograd.grad(want, leaves)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (x, pos, se, tok)]
    got = compiled(*leaves, "triton")
    got_grads = torch.autograd.grad(got, leaves)
    assert max_err(got, want) <= 1e-5 * want.item()
    for a, bb in zip(got_grads, want_grads):
        assert max_err(a, bb) <= 1e-5 * bb.abs().max().item()


@pytest.mark.slow
def test_pipeline_inductor_fullgraph(rng):
    """The same pipeline through Inductor (fullgraph=True) on the CPU: the Triton ops stay
    opaque custom ops (their fake implementations give Inductor the shapes), the code
    around them is generated C++. ~1-2 minutes on a 2-core box, most of it Inductor's
    first C++ build."""
    b, p, d = 2, 4, 16
    imgs = randn(rng, (b, 1, 28, 28))
    ids_keep, ids_restore, mask = ops.random_masking(b, 49, 0.75)
    x, pos, se, tok = (randn(rng, s) for s in ((b, 49, d), (1, 49, d), (b, d), (1, 1, d)))
    w = randn(rng, (d, p * p), scale=0.3)

    def step(x, pos, se, tok, impl):
        kept = ops.gather_tokens(x, ids_keep, ids_restore=ids_restore, pos_embed=pos,
                                 sample_embed=se, impl=impl)
        full = ops.unshuffle_with_mask_token(torch.tanh(kept), tok, ids_restore, impl=impl)
        return ops.mae_loss(full @ w, imgs, mask, patch_size=p, impl=impl, groups=2)

    leaves = [t.clone().requires_grad_() for t in (x, pos, se, tok)]
    want = step(*leaves, "torch")
    want_grads = torch.autograd.grad(want, leaves)
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="inductor", fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (x, pos, se, tok)]
    got = compiled(*leaves, "triton")
    got_grads = torch.autograd.grad(got, leaves)
    assert max_err(got, want) <= 1e-5 * want.item()
    for a, bb in zip(got_grads, want_grads):
        assert max_err(a, bb) <= 1e-5 * bb.abs().max().item()


def test_gpu_check_script_dry_run():
    """bench/gpu_triton.py's logic at tiny shapes on the CPU (its real run is on a GPU)."""
    import importlib.util
    import pathlib
    import sys

    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "gpu_triton.py"
    if not path.exists():
        pytest.skip("bench/gpu_triton.py is not in this checkout")
    spec = importlib.util.spec_from_file_location("_gpu_triton", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclass looks the module up there
    spec.loader.exec_module(mod)
    rows = []
    mod.run(lambda name, **cols: rows.append((name, cols)), dry_run=True)
    names = [n for n, _ in rows]
    assert any(n.startswith("check") for n in names) and any(n.startswith("time") for n in names)
    assert all(cols.get("ok", True) for _, cols in rows), rows


# ------------------------------------------- mae_loss scale: no recompute at mask 0.93
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_mae_loss_scale_multiplies_loss_groups_and_gradient(rng, impl, launches):
    b, length, p = 4, 49, 4
    imgs = randn(rng, (b, 1, 28, 28), scale=2.0, shift=0.5)
    pred = randn(rng, (b, length, p * p)).requires_grad_()
    mask = random_mask(rng, b, length, 0.93)
    loss, per_group = ops.mae_loss(pred, imgs, mask, patch_size=p, impl=impl, groups=2,
                                   return_groups=True, scale=1.37)
    loss.backward()
    want, want_groups, want_grad = _ref_groups64(pred, imgs, mask, 1.37, [0.0, 0.0],
                                                 patch_size=p, groups=2)
    assert max_err(loss, 1.37 * want) <= 1e-5 * want.abs().item()
    assert max_err(per_group, 1.37 * want_groups) <= 1e-5 * want_groups.abs().max().item()
    assert max_err(pred.grad, want_grad) <= 1e-5 * want_grad.abs().max().item()
    assert launches == (["single_pass", "backward[skip]"] if impl == "triton" else [])
    with pytest.raises(ValueError, match="scale"):
        ops.mae_loss(pred, imgs, mask, patch_size=p, impl=impl, scale=float("nan"))


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_multiview_mae_mask_093_keeps_the_single_pass_gradient(rng, beta, launches):
    """MVMAE's released reduction scales the loss by (masked / L) / mask_ratio, != 1 at
    mask 0.93 (15 of 16 patches masked here: 0.9375 / 0.93). The factor goes into the op,
    so backward keeps the forward's gradient (no recompute), and that gradient equals
    the float64 gradient of the scaled mean of the per-image masked MSEs."""
    from fastssl.models.mvmae import MultiViewMAE, model_config

    torch.manual_seed(0)
    model = MultiViewMAE(model_config("test"), impl="triton")
    x = randn(rng, (4, 1, 32, 32))
    out = model(x[:2], x[2:], mask_ratio=0.93, beta=beta)
    out["pred"].retain_grad()
    out["loss"].backward()
    assert [m for m in launches if m.startswith(("single", "backward"))] == [
        "single_pass", "backward[skip]"]
    scale = (2 * 2) / (2 * 2) * (15 / 16) / 0.93  # images / slots x masked fraction / ratio
    images = torch.stack([x[:2], x[2:]], dim=1).flatten(0, 1)  # (study, slot) order
    leaf = out["pred"].detach().double().requires_grad_()
    per_image = ref.mae_loss_per_group_reference(leaf, images.double(), out["mask"],
                                                 patch_size=8, target="pixel", groups=4)
    want = scale * per_image.mean()
    (want_grad,) = torch.autograd.grad(want, leaf)
    assert max_err(out["recon"], want) <= 1e-5 * want.abs().item()
    assert max_err(out["pred"].grad, want_grad) <= 1e-5 * want_grad.abs().max().item()
