"""GPU check of the Triton MAE ops: correctness against the reference, then timings.

bench/gpu_run.py runs its ``check_units`` and ``time_units`` one by one (each a row or a
few, under that script's deadline); ``run(report)`` runs them all in order, alone.
``report(name, **columns)`` adds a row. Rows:

* ``check <op> <dtype>``: max error of the Triton op (forward and every gradient)
  against the float64 reference, the tolerance, ok.
* ``copy bandwidth``: a large device-to-device copy, (read + write) / time: the roof.
* ``time <op> fwd+bwd <shape>``: median ms of eager reference, torch.compile of the
  reference and Triton; speedups; the Triton path's achieved GB/s over the ideal bytes
  (inputs read once, gradients written once) and its fraction of the copy roof; the goal
  and whether it is met.

Goals (issue 10): mae_loss fwd+bwd >= 2x torch.compile and >= 70% of copy bandwidth in
GPU time (bytes needed: the masked rows of pred and image and the mask read once, the
gradient written once); gather_tokens fwd+bwd (backward fed by ids_restore) >= 1.5x
compile and >= 70%; both faster than eager in wall time.

``run(report, dry_run=True)`` exercises the same logic on the CPU at tiny shapes (needs
TRITON_INTERPRET=1 before Triton is imported; compile is skipped); the tests use it.
Written for torch >= 2.4 and triton >= 3.0 (the GPU box has torch 2.11, triton 3.6).
"""
from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import fastssl.ops as ops
from fastssl.reference import mae as ref

MAE_GOAL = "fwd+bwd GPU time >= 2x compile at >= 70% copy BW; wall < eager"
GATHER_GOAL = "fwd+bwd GPU time >= 1.5x compile at >= 70% copy BW; wall < eager"


# ------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, iters: int, warmup: int = 2) -> float:
    """Median milliseconds of ``fn`` (CUDA events around each call; host clock on CPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbps(device: torch.device, nbytes: int, iters: int) -> float:
    """(read + write) bytes / s of a device-to-device copy of ``nbytes``."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, iters, warmup=3)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _maxerr(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# ---------------------------------------------------------------------- workloads
def _mae_inputs(b, c, img, p, ratio, dtype, device, gen):
    length, p_len = (img // p) ** 2, p * p * c
    imgs = torch.randn(b, c, img, img, device=device, generator=gen)
    pred = torch.randn(b, length, p_len, device=device, generator=gen).to(dtype)
    _, _, mask = ops.random_masking(b, length, ratio, device=device, generator=gen)
    return pred, imgs, mask


def _gather_inputs(b, length, d, ratio, dtype, device, gen):
    x = torch.randn(b, length, d, device=device, generator=gen).to(dtype)
    pos = torch.randn(1, length, d, device=device, generator=gen)
    se = torch.randn(b, d, device=device, generator=gen)
    ids_keep, ids_restore, _ = ops.random_masking(b, length, ratio, device=device, generator=gen)
    return x, pos, se, ids_keep, ids_restore


def _mae_fwd_bwd(fn, pred, imgs, mask, p):
    leaf = pred.detach().requires_grad_()

    def step():
        loss = fn(leaf, imgs, mask, p)
        return torch.autograd.grad(loss, leaf)
    return step


def _gather_fwd_bwd(fn, x, pos, se, ids_keep):
    leaves = [t.detach().requires_grad_() for t in (x, pos, se)]
    g = None

    def step():
        nonlocal g
        out = fn(leaves[0], ids_keep, leaves[1], leaves[2])
        if g is None:
            g = torch.randn_like(out)
        return torch.autograd.grad(out, leaves, g)
    return step


def _mae_ref(pred, imgs, mask, p):
    return ref.mae_loss_reference(pred, imgs, mask, patch_size=p)


def _mae_triton(pred, imgs, mask, p):
    return ops.mae_loss(pred, imgs, mask, patch_size=p, impl="triton", validate=False)


def _gather_ref(x, ids, pos, se):
    return ref.gather_tokens_reference(x, ids, pos_embed=pos, sample_embed=se)


def _gather_triton(x, ids, pos, se, ids_restore=None):
    return ops.gather_tokens(x, ids, ids_restore=ids_restore, pos_embed=pos, sample_embed=se,
                             impl="triton", validate=False)


# ------------------------------------------------------------------------- checks
def _check_mae(report, device, gen, dtype, tiny):
    b, c, img, p = (2, 3, 16, 4) if tiny else (8, 3, 224, 16)
    pred, imgs, mask = _mae_inputs(b, c, img, p, 0.75, dtype, device, gen)
    for layout in ("full", "compact"):
        if layout == "compact":
            ids = torch.argsort(mask, dim=1, descending=True, stable=True)[:, : int(mask[0].sum())]
            pred_l, mask_l, kw = pred[:, : ids.shape[1]].contiguous(), None, {"ids_masked": ids}
        else:
            pred_l, mask_l, kw = pred, mask, {}
        # Incoming gradient 1 (the single pass) and 1.5 (recomputed), two views (groups=2).
        for incoming in (1.0, 1.5):
            leaf = pred_l.detach().requires_grad_()
            loss = ops.mae_loss(leaf, imgs, mask_l, patch_size=p, impl="triton", groups=2, **kw)
            (grad,) = torch.autograd.grad(loss, leaf, torch.tensor(incoming, device=device))
            leaf64 = pred_l.detach().double().requires_grad_()
            want = ref.mae_loss_reference(leaf64, imgs.double(), mask_l, patch_size=p, groups=2,
                                          **kw)
            (want_grad,) = torch.autograd.grad(
                want, leaf64, torch.tensor(incoming, device=device, dtype=torch.float64))
            err_l = _maxerr(loss, want)
            err_g = _maxerr(grad, want_grad) / want_grad.abs().max().item()
            tol_g = 1e-5 if dtype == torch.float32 else 2 ** -7
            ok = err_l <= 1e-4 * abs(want.item()) and err_g <= tol_g
            report(f"check mae_loss {layout} {str(dtype)[6:]} grad_out={incoming}", ok=ok,
                   loss_err=f"{err_l:.2e}", grad_rel_err=f"{err_g:.2e}", tol=f"{tol_g:.0e}")


def _check_tokens(report, device, gen, dtype, tiny):
    b, length, d = (2, 49, 33) if tiny else (8, 196, 768)
    x, pos, se, ids_keep, ids_restore = _gather_inputs(b, length, d, 0.75, dtype, device, gen)
    pos, se = pos.to(dtype), se.to(dtype)
    tol = 1e-6 if dtype == torch.float32 else 2 ** -7

    def errs(f_tri, f_ref, tensors):
        leaves = [t.detach().requires_grad_() for t in tensors]
        out = f_tri(*leaves)
        g = torch.randn(out.shape, device=device, generator=gen).to(out.dtype)
        grads = torch.autograd.grad(out, leaves, g)
        leaves64 = [t.detach().double().requires_grad_() for t in tensors]
        want = f_ref(*leaves64)
        wgrads = torch.autograd.grad(want, leaves64, g.double())
        return max(_maxerr(a, w) / max(w.abs().max().item(), 1e-6)
                   for a, w in zip((out,) + grads, (want,) + wgrads))

    for restore in (None, ids_restore):  # the inverse rebuilt, and random_masking's
        e = errs(lambda x, p, s: _gather_triton(x, ids_keep, p, s, ids_restore=restore),
                 lambda x, p, s: _gather_ref(x, ids_keep, p, s), (x, pos, se))
        report(f"check gather_tokens {str(dtype)[6:]} ids_restore={restore is not None}",
               ok=e <= tol, rel_err=f"{e:.2e}", tol=f"{tol:.0e}")
    # The embeddings' gradients are reduced across programs (last arrival): a race would
    # show as results that move between runs. Bitwise equal over repeats, or not ok.
    leaves = [t.detach().requires_grad_() for t in (x, pos, se)]
    g = torch.randn(b, ids_keep.shape[1], d, device=device, generator=gen).to(dtype)
    runs = [torch.autograd.grad(_gather_triton(*leaves[:1], ids_keep, *leaves[1:],
                                               ids_restore=ids_restore), leaves, g)
            for _ in range(5)]
    same = all(torch.equal(a, b_) for r in runs[1:] for a, b_ in zip(runs[0], r))
    report(f"check gather_tokens {str(dtype)[6:]} backward deterministic x5", ok=same)
    k = ids_keep.shape[1]
    tok = torch.randn(d, device=device, generator=gen).to(dtype)
    e = errs(lambda xv, t: ops.unshuffle_with_mask_token(xv, t, ids_restore, impl="triton"),
             lambda xv, t: ref.unshuffle_with_mask_token_reference(xv, t, ids_restore),
             (x[:, :k], tok))
    report(f"check unshuffle {str(dtype)[6:]}", ok=e <= tol, rel_err=f"{e:.2e}",
           tol=f"{tol:.0e}")


# ------------------------------------------------------------------------ timings
def _device_ms(fn: Callable[[], object], device: torch.device, iters: int = 10) -> float:
    """GPU time per call: the sum of the kernels' durations, launch overhead excluded.

    At the benchmark shapes the work is tens of microseconds of memory traffic, less than
    the Python and launch overhead of an autograd step, so wall time measures the host.
    In training the host runs ahead of the GPU; the kernels' own time is what counts.
    """
    if device.type != "cuda":
        return float("nan")
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize(device)
    total_us = sum(getattr(e, "self_device_time_total", 0.0) for e in prof.key_averages())
    return total_us / 1e3 / iters


def _time_row(report, name, goal, steps, nbytes, copy_gbps, device, iters, warmup, need):
    ms, dev = {}, {}
    for provider, step in steps.items():
        if step is None:
            continue
        try:
            ms[provider] = median_ms(step, device, iters, warmup)
            dev[provider] = _device_ms(step, device)
        except Exception as exc:  # a provider failing must not hide the others' numbers
            report(f"{name} [{provider} failed]", ok=False, error=f"{type(exc).__name__}: {exc}"[:200])
    if device.type == "cuda" and dev.get("triton", 0) > 0:
        # Kernel-time view of the same row: speed-ups and bandwidth of the GPU work alone.
        dtri = dev["triton"]
        report(name + " [GPU kernel time]", eager_ms=_f(dev.get("eager")),
               compile_ms=_f(dev.get("compile")), triton_ms=_f(dtri),
               x_eager=_f(dev["eager"] / dtri if "eager" in dev else None, 2),
               x_compile=_f(dev["compile"] / dtri if "compile" in dev else None, 2),
               GBps=_f(nbytes / (dtri * 1e-3) / 1e9, 0),
               frac_copy=_f(nbytes / (dtri * 1e-3) / 1e9 / copy_gbps, 2), goal=goal)
    tri = ms.get("triton")
    gbps = nbytes / (tri * 1e-3) / 1e9 if tri else float("nan")
    frac = gbps / copy_gbps if tri else float("nan")
    sp_eager = ms["eager"] / tri if tri and "eager" in ms else float("nan")
    sp_comp = ms["compile"] / tri if tri and "compile" in ms else float("nan")
    # The goals: GPU time against compile and the copy roof, wall time against eager (the
    # host overhead counts there). Without kernel times (CPU dry run) wall time stands in.
    kern = dev if device.type == "cuda" and dev.get("triton", 0) > 0 else ms
    k_frac = nbytes / (kern["triton"] * 1e-3) / 1e9 / copy_gbps if "triton" in kern else 0.0
    k_comp = kern["compile"] / kern["triton"] if "compile" in kern and "triton" in kern else 0.0
    met = (sp_eager >= need["eager"] and k_frac >= need["frac"]
           and ("compile" not in need or k_comp >= need["compile"]))
    report(name, eager_ms=_f(ms.get("eager")), compile_ms=_f(ms.get("compile")),
           triton_ms=_f(tri), x_eager=_f(sp_eager, 2), x_compile=_f(sp_comp, 2),
           GBps=_f(gbps, 0), frac_copy=_f(frac, 2), goal=goal, met=bool(met))


def _f(v, nd=3):
    return "-" if v is None or v != v else f"{v:.{nd}f}"


@dataclass
class Setup:
    """Device, sizes and timing settings of one run (GPU, or tiny on the CPU)."""

    device: torch.device
    tiny: bool
    iters: int
    warmup: int
    compile_fn: Optional[Callable]
    gen: torch.Generator

    @staticmethod
    def make(dry_run: bool) -> "Setup":
        if dry_run:
            device, tiny, iters, warmup, compile_fn = torch.device("cpu"), True, 2, 1, None
        else:
            device, tiny, iters, warmup, compile_fn = torch.device("cuda"), False, 50, 5, torch.compile
        return Setup(device, tiny, iters, warmup, compile_fn,
                     torch.Generator(device=device).manual_seed(0))


def check_units(report, s: Setup) -> list[tuple[str, Callable[[], None]]]:
    """(name, fn): each checks one op family in one dtype against float64."""
    units = []
    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype)[6:]
        units.append((f"check mae_loss {name}",
                      functools.partial(_check_mae, report, s.device, s.gen, dtype, s.tiny)))
        units.append((f"check gather/unshuffle {name}",
                      functools.partial(_check_tokens, report, s.device, s.gen, dtype, s.tiny)))
    return units


# (name, batch, channels, image, patch, ratio): ViT-B/16 1-channel radiographs at the
# classic and the MVMAE ratio, ViT-L/16 on 3-channel images. Order = priority.
MAE_SHAPES = [("vitb16-224-1ch m0.75", 256, 1, 224, 16, 0.75),
              ("vitb16-224-1ch m0.93", 256, 1, 224, 16, 0.93),
              ("vitl16-224-3ch m0.75", 256, 3, 224, 16, 0.75)]
TOKEN_SHAPES = [("vitb16 d768 m0.75", 256, 196, 768, 0.75),
                ("vitb16 d768 m0.93", 256, 196, 768, 0.93),
                ("vitl16 d1024 m0.75", 256, 196, 1024, 0.75)]


def _time_mae(report, s: Setup, copy_gbps, name, b, c, img, p, ratio, dtype):
    pred, imgs, mask = _mae_inputs(b, c, img, p, ratio, dtype, s.device, s.gen)
    # Bytes needed: the masked rows of pred and of the image read once, the mask read
    # once, the (dense) gradient written once.
    live = mask.float().mean().item()
    nbytes = int(live * (_nbytes(pred) + _nbytes(imgs))) + _nbytes(mask) + _nbytes(pred)
    comp = s.compile_fn(_mae_ref) if s.compile_fn else None
    steps = {"eager": _mae_fwd_bwd(_mae_ref, pred, imgs, mask, p),
             "compile": _mae_fwd_bwd(comp, pred, imgs, mask, p) if comp else None,
             "triton": _mae_fwd_bwd(_mae_triton, pred, imgs, mask, p)}
    _time_row(report, f"time mae_loss fwd+bwd {name} {str(dtype)[6:]}", MAE_GOAL, steps,
              nbytes, copy_gbps, s.device, s.iters, s.warmup,
              {"eager": 1.0, "compile": 2.0, "frac": 0.7})


def _time_tokens(report, s: Setup, copy_gbps, name, b, length, d, ratio):
    dtype = torch.bfloat16
    x, pos, se, ids_keep, ids_restore = _gather_inputs(b, length, d, ratio, dtype, s.device, s.gen)
    k = ids_keep.shape[1]
    es = x.element_size()  # out is fp32 when the embeddings are fp32: count its size
    out_es = torch.promote_types(x.dtype, pos.dtype).itemsize
    nbytes = (b * k * d * (es + 2 * out_es) + b * length * d * es  # x read, out w, g r, gx w
              + 2 * _nbytes(pos) + 2 * _nbytes(se) + _nbytes(ids_restore))
    tri_fn = functools.partial(_gather_triton, ids_restore=ids_restore)
    comp = s.compile_fn(_gather_ref) if s.compile_fn else None
    steps = {"eager": _gather_fwd_bwd(_gather_ref, x, pos, se, ids_keep),
             "compile": _gather_fwd_bwd(comp, x, pos, se, ids_keep) if comp else None,
             "triton": _gather_fwd_bwd(tri_fn, x, pos, se, ids_keep)}
    _time_row(report, f"time gather_tokens fwd+bwd {name} bf16", GATHER_GOAL, steps, nbytes,
              copy_gbps, s.device, s.iters, s.warmup, {"eager": 1.0, "compile": 1.5, "frac": 0.7})

    xv = x[:, :k].contiguous().requires_grad_()
    tok = torch.randn(d, device=s.device, generator=s.gen).requires_grad_()

    def unshuffle_step(fn):
        def step():
            out = fn(xv, tok, ids_restore)
            return torch.autograd.grad(out, (xv, tok), torch.ones_like(out))
        return step

    def _unsh_triton(a, t, i):
        return ops.unshuffle_with_mask_token(a, t, i, impl="triton", validate=False)

    nbytes = b * k * d * es * 2 + b * length * d * out_es * 2
    comp = s.compile_fn(ref.unshuffle_with_mask_token_reference) if s.compile_fn else None
    steps = {"eager": unshuffle_step(ref.unshuffle_with_mask_token_reference),
             "compile": unshuffle_step(comp) if comp else None,
             "triton": unshuffle_step(_unsh_triton)}
    _time_row(report, f"time unshuffle fwd+bwd {name} bf16", "(no goal)", steps, nbytes,
              copy_gbps, s.device, s.iters, s.warmup, {"eager": 0.0, "frac": 0.0})


def time_units(report, s: Setup, copy_gbps: float) -> list[tuple[str, Callable[[], None]]]:
    """(name, fn) per timed shape, in priority order: the bf16 ViT-B rows first."""
    mae = [("tiny", 2, 1, 16, 4, 0.75)] if s.tiny else MAE_SHAPES
    tokens = [("tiny", 2, 49, 33, 0.75)] if s.tiny else TOKEN_SHAPES
    units = []
    for dtype in (torch.bfloat16, torch.float32):
        units += [(f"time mae_loss {shape[0]} {str(dtype)[6:]}",
                   functools.partial(_time_mae, report, s, copy_gbps, *shape, dtype))
                  for shape in mae]
        if dtype == torch.bfloat16:
            units += [(f"time gather/unshuffle {shape[0]} bf16",
                       functools.partial(_time_tokens, report, s, copy_gbps, *shape))
                      for shape in tokens]
    return units


def run(report: Callable[..., None], *, dry_run: bool = False) -> None:
    """Check every Triton op against the reference, then time them (see module doc)."""
    if not dry_run and not torch.cuda.is_available():
        report("mae ops (Triton)", ok=False, error="no CUDA device")
        return
    s = Setup.make(dry_run)
    import triton

    props = torch.cuda.get_device_properties(s.device) if s.device.type == "cuda" else None
    report("versions", device=props.name if props else "cpu (interpreter)",
           torch=torch.__version__, triton=triton.__version__)
    for _, fn in check_units(report, s):
        fn()
    copy_gbps = copy_bandwidth_gbps(s.device, (8 << 20) if s.tiny else (1 << 30), s.iters)
    report("copy bandwidth", GBps=f"{copy_gbps:.0f}", bytes="2 x " + ("8 MiB" if s.tiny else "1 GiB"))
    for _, fn in time_units(report, s, copy_gbps):
        fn()


if __name__ == "__main__":  # standalone: print rows as they come
    run(lambda name, **cols: print(name, cols))
