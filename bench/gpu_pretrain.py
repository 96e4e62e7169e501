"""The MVMAE pretraining step measured as a user would measure it: one script, one table.

    python3 bench/gpu_pretrain.py [--budget-s 420] [--only vitb16:0.75:paired ...]
    python3 bench/gpu_pretrain.py --dry-run      (CPU, tiny shapes: the same code paths)

Cells: ViT-B/16 and ViT-L/16 at 224 px, 1 channel, mask 0.75 and 0.93, paired (B/2
frontal + B/2 lateral, one loss call over both views) and single, 256 images per step,
bf16 autocast, fused AdamW, grad clipping. Columns per cell:

* ``fastssl``: the default path, ``torch.compile`` of MultiViewMAE with the fastssl ops
  (Triton kernels on CUDA);
* ``fastssl_eager``: the same model without compile (the single-pass loss runs only in
  eager mode);
* ``ref_eager``: the same model with the plain PyTorch reference ops (``impl="torch"``),
  eager bf16: what a user would write with timm;
* ``ref_compile``: that model under ``torch.compile``.

Each column: steady-state images/s (median of timed steps, events around each step),
the first step's time separately (compile time for compiled columns), MFU and the peak
memory (``torch.cuda.max_memory_allocated``, reset per column).

MFU = step FLOPs x steps/s / (measured bf16 GEMM FLOP/s: torch.matmul 8192^3 on random
data, median of 10). Step FLOPs per image, with p the patch, C channels, P = p^2 C,
L = (224/p)^2 patches, K = int(L (1 - mask)) kept, Ke = 1 + K encoder tokens (CLS),
Ld = 1 + L decoder tokens, D / Dd encoder / decoder width, r the MLP ratio, N / Nd depths:

    block(n, w)  = (8 + 4 r) n w^2 * 2 + 4 n^2 w       (qkv, proj, MLP; QK^T and AV)
    forward      = 2 L P D  +  N block(Ke, D)  +  [2 Ke D Dd]  +  Nd block(Ld, Dd)  +  2 L Dd P
                   ([..] only with a decoder projection, cfg.decoder_embed: the MAE recipe)
    step         = 3 forward - 2 L P D                  (backward = 2x forward for every
                                                          matmul; the patch embedding's
                                                          input gradient is not computed)

Elementwise work, norms, softmax and the loss are not counted (they are memory-bound).

Then, per-kernel GPU time of the fastssl ops inside the default step (torch.profiler,
kernel names of fastssl.kernels) against the bytes each op must move (inputs read once,
outputs written once), as GB/s and the fraction of the measured copy bandwidth.

Must finish in < 8 minutes on one H200: cells run in priority order (the goals' cell,
ViT-B/16 mask 0.75 paired, all four columns first, then every cell's eager columns, then
the compiled ones); a column that would end after ``--budget-s`` (judged by the compile
times seen so far) is reported as skipped, never silently dropped; ``--only`` reruns
chosen cells in a later session. Rows go to stdout as they come; the
table is printed last and written with the JSON to $OUT (if set).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import fastssl  # noqa: E402

if not os.path.isdir(os.path.join(ROOT, "fastssl", "kernels")):
    fastssl.__path__.append(ROOT)  # source tree, not installed: fastssl.kernels -> ./kernels
from fastssl.models import mvmae  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "bench"))
from gpu_triton import median_ms as _median_ms, sync as _sync  # noqa: E402

COLUMNS = ("fastssl", "fastssl_eager", "ref_eager", "ref_compile")
# A candidate step improvement that exists as an option: the fastssl step captured in
# CUDA graphs (torch.compile mode="reduce-overhead"; the optimizer stays outside).
CUDAGRAPHS = "fastssl_cudagraphs"
COMPILED = ("fastssl", "ref_compile", CUDAGRAPHS)
OP_KERNELS = {  # Triton kernel name prefix -> op
    "_mae_loss_kernel": "mae_loss", "_weight_sum_kernel": "mae_loss",
    "_finalize_kernel": "mae_loss",
    "_gather_fwd_kernel": "gather_tokens", "_gather_bwd_kernel": "gather_tokens",
    "_unshuffle_fwd_kernel": "unshuffle", "_unshuffle_bwd_kernel": "unshuffle",
}


@dataclass(frozen=True)
class Cell:
    model: str        # "vitb16" | "vitl16" | "test"
    mask_ratio: float
    mode: str         # "paired" | "single"

    @property
    def name(self) -> str:
        return f"{self.model}:{self.mask_ratio}:{self.mode}"


# ------------------------------------------------------------------------ model, FLOPs
def model_cfg(name: str) -> mvmae.ModelConfig:
    """The MVMAE recipe's model (decoder as wide as the encoder, 4 blocks) at 224 px."""
    if name == "vitb16":
        return mvmae.model_config("vit_base", in_chans=1, img_size=224, patch_size=16)
    if name == "vitl16":
        if "vit_large" in mvmae.PRESETS:
            return mvmae.model_config("vit_large", in_chans=1, img_size=224, patch_size=16)
        return mvmae.model_config("vit_base", embed_dim=1024, depth=24, num_heads=16,
                                  decoder_dim=1024, decoder_heads=16)
    return mvmae.model_config("test")


def _block_flops(n: int, width: int, mlp_ratio: float) -> float:
    return 2 * (4 + 2 * mlp_ratio) * n * width ** 2 + 4 * n * n * width


def step_flops(cfg: mvmae.ModelConfig, mask_ratio: float, images: int) -> float:
    """Matmul FLOPs of one training step (module docstring's formula)."""
    p_len = cfg.patch_size ** 2 * cfg.in_chans
    length = cfg.num_patches
    ke = 1 + int(length * (1 - mask_ratio))
    ld = 1 + length
    patch_embed = 2 * length * p_len * cfg.embed_dim
    fwd = (patch_embed + cfg.depth * _block_flops(ke, cfg.embed_dim, cfg.mlp_ratio)
           + (2 * ke * cfg.embed_dim * cfg.decoder_dim if cfg.decoder_embed else 0)
           + cfg.decoder_depth * _block_flops(ld, cfg.decoder_dim, cfg.mlp_ratio)
           + 2 * length * cfg.decoder_dim * p_len)
    return images * (3 * fwd - patch_embed)


# --------------------------------------------------------------------------- timing
def ceilings(device, tiny: bool) -> dict:
    """Measured bf16 GEMM FLOP/s and copy bandwidth (bytes read + written per s)."""
    n = 256 if tiny else 8192
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    gemm_ms = _median_ms(lambda: a @ b, device, 3 if tiny else 10)
    nbytes = (8 << 20) if tiny else (1 << 30)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    copy_ms = _median_ms(lambda: dst.copy_(src), device, 3 if tiny else 20)
    return dict(gemm_flops=2 * n ** 3 / (gemm_ms * 1e-3), copy_bps=2 * nbytes / (copy_ms * 1e-3),
                gemm_dtype=str(dtype).replace("torch.", ""))


# ----------------------------------------------------------------------------- steps
def make_step(cell: Cell, column: str, device, images: int, compile_backend: str | None):
    """(model, step function) for one column of one cell; the step runs one full update."""
    torch.manual_seed(0)
    impl = "torch" if column.startswith("ref") or device.type == "cpu" else "auto"
    model = mvmae.MultiViewMAE(model_cfg(cell.model), impl=impl).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    net = model
    if column in COMPILED:
        # A fresh Dynamo state per column: the compile time is a user's first compile, and
        # an earlier column's shapes do not turn this one's dims dynamic.
        torch._dynamo.reset()
        if column == CUDAGRAPHS:
            net = torch.compile(model, mode="reduce-overhead")
        else:
            net = torch.compile(model, backend=compile_backend or "inductor")
    size = model.cfg.img_size
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(images, model.cfg.in_chans, size, size, device=device, generator=gen)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            if cell.mode == "paired":
                out = net(x[: images // 2], x[images // 2:], mask_ratio=cell.mask_ratio, beta=1.0)
            else:
                out = net(x, None, views=0, mask_ratio=cell.mask_ratio)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return model, step


def time_column(cell, column, device, images, iters, compile_backend, *,
                profile_ops=False) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model, step = make_step(cell, column, device, images, compile_backend)
    t0 = time.perf_counter()
    step()
    _sync(device)
    first_s = time.perf_counter() - t0
    ms = _median_ms(step, device, iters)
    out = dict(images_per_s=images / (ms * 1e-3), step_ms=ms, first_step_s=first_s,
               flops=step_flops(model.cfg, cell.mask_ratio, images),
               peak_gib=(torch.cuda.max_memory_allocated(device) / 2 ** 30
                         if device.type == "cuda" else float("nan")))
    if profile_ops and device.type == "cuda":
        out["op_ms"] = op_kernel_times(step, device)
    return out


# --------------------------------------------------------------------- op kernel time
def op_bytes(cell: Cell, images: int, x_bytes: int = 2, out_bytes: int = 4) -> dict:
    """Bytes each fastssl op must move in one step (fwd + bwd), inputs read once and
    outputs written once. Tokens are bf16 (x_bytes) under autocast, the embeddings' sum
    fp32 (out_bytes: fp32 parameters promote); mask and indices as random_masking makes."""
    cfg = model_cfg(cell.model)
    b, length, d, dd = images, cfg.num_patches, cfg.embed_dim, cfg.decoder_dim
    k = int(length * (1 - cell.mask_ratio))
    p_len = cfg.patch_size ** 2 * cfg.in_chans
    live = length - k  # masked rows: the ones the loss reads
    idx = 8 * b * length  # int64 ids_restore
    gather = (b * k * d * (x_bytes + 2 * out_bytes) + b * length * d * x_bytes + idx
              + 2 * 4 * length * d + 2 * 4 * b * d)
    unshuffle = b * k * dd * out_bytes * 2 + b * length * dd * out_bytes * 2 + 2 * idx
    mae = b * live * p_len * (x_bytes + 4) + b * length * 4 + b * length * p_len * x_bytes
    return {"gather_tokens": gather, "unshuffle": unshuffle, "mae_loss": mae}


def op_kernel_times(step, device, steps: int = 3) -> dict:
    """Summed GPU time per op (ms per step) of the fastssl kernels in ``step``."""
    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    per_op: dict[str, float] = {}
    for evt in prof.key_averages():
        for prefix, op in OP_KERNELS.items():
            if evt.key.startswith(prefix):
                us = getattr(evt, "self_device_time_total", 0.0)
                per_op[op] = per_op.get(op, 0.0) + us / 1e3 / steps
    return per_op


# ----------------------------------------------------------------------------- driver
def all_cells(dry_run: bool) -> list[Cell]:
    if dry_run:
        return [Cell("test", 0.75, "paired"), Cell("test", 0.93, "single")]
    cells = [Cell(m, r, mode) for m in ("vitb16", "vitl16") for r in (0.75, 0.93)
             for mode in ("paired", "single")]
    return cells  # vitb16:0.75:paired, the goals' cell, first


def plan(cells: list[Cell]) -> list[tuple[Cell, str]]:
    """Eager columns of every cell first (cheap), then the compiled ones in cell order."""
    eager = [(c, col) for c in cells for col in ("fastssl_eager", "ref_eager")]
    compiled = [(c, col) for c in cells for col in ("fastssl", "ref_compile")]
    return [(cells[0], col) for col in COLUMNS] + [t for t in eager + compiled
                                                   if t[0] != cells[0]]


def _compile_estimate(cell: Cell, seen: dict) -> float:
    """Seconds a compiled column of this cell is expected to take to compile (the
    slowest seen for its model; twice ViT-B's for a first ViT-L)."""
    if cell.model in seen:
        return seen[cell.model]
    return 2 * max(seen.values()) if seen else 0.0


def run(args) -> dict:
    device = torch.device("cpu" if args.dry_run else "cuda")
    images = 4 if args.dry_run else args.images
    iters = 2 if args.dry_run else args.iters
    backend = "eager" if args.dry_run else None  # dry run: Dynamo only (no C++ build here)
    start = time.perf_counter()
    res = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               torch=torch.__version__, images=images, rows=[], skipped=[], ops=[])
    res.update(ceilings(device, args.dry_run))
    print(f"ceilings: GEMM {res['gemm_flops'] / 1e12:.1f} TFLOP/s ({res['gemm_dtype']}), "
          f"copy {res['copy_bps'] / 1e9:.0f} GB/s", flush=True)
    cells = all_cells(args.dry_run)
    if args.only:
        cells = [c for c in cells if c.name in set(args.only)]
    compile_s: dict[str, float] = {}
    for cell, column in plan(cells):
        compiled = column in COMPILED
        expect = _compile_estimate(cell, compile_s) if compiled else 0.0
        if time.perf_counter() - start + expect > args.budget_s:
            res["skipped"].append(f"{cell.name} {column} (time budget {args.budget_s:.0f} s)")
            continue
        try:
            r = time_column(cell, column, device, images, iters, backend,
                            profile_ops=cell == cells[0] and column.startswith("fastssl"))
            r["mfu"] = r["flops"] * r["images_per_s"] / images / res["gemm_flops"]
            if compiled:
                compile_s[cell.model] = max(compile_s.get(cell.model, 0.0), r["first_step_s"])
        except Exception as exc:  # noqa: BLE001 - a failing column must not hide the others
            r = dict(error=" ".join(f"{type(exc).__name__}: {exc}".split())[:300])
        need = op_bytes(cell, images)
        for op, ms in sorted(r.pop("op_ms", {}).items()):
            res["ops"].append(dict(cell=cell.name, column=column, op=op, ms=ms, bytes=need[op],
                                   gbps=need[op] / (ms * 1e-3) / 1e9,
                                   frac_copy=need[op] / (ms * 1e-3) / res["copy_bps"]))
        res["rows"].append(dict(cell=cell.name, column=column, **r))
        print(json.dumps(res["rows"][-1], default=str), flush=True)
    res["wall_s"] = time.perf_counter() - start
    return res


def table(res: dict) -> str:
    lines = ["| cell | column | images/s | step ms | first step s | MFU | peak GiB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['cell']} | {r['column']} | FAILED: {r['error']} | | | | |")
            continue
        lines.append(f"| {r['cell']} | {r['column']} | {r['images_per_s']:.0f} | "
                     f"{r['step_ms']:.1f} | {r['first_step_s']:.1f} | {100 * r['mfu']:.1f}% | "
                     f"{r['peak_gib']:.1f} |")
    for s in res["skipped"]:
        lines.append(f"| {s} | skipped | | | | | |")
    for o in res["ops"]:
        lines.append(f"| {o['cell']} op {o['op']} (kernel time per step) | {o['column']} | "
                     f"{o['ms']:.3f} ms | {o['bytes'] / 1e6:.1f} MB | {o['gbps']:.0f} GB/s | "
                     f"{100 * o['frac_copy']:.0f}% of copy | |")
    lines.append(f"\n{res['device']}, torch {res['torch']}, {res['images']} images/step; "
                 f"GEMM {res['gemm_flops'] / 1e12:.1f} TFLOP/s {res['gemm_dtype']}, copy "
                 f"{res['copy_bps'] / 1e9:.0f} GB/s; wall {res['wall_s']:.0f} s")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Dynamo only")
    ap.add_argument("--budget-s", type=float, default=400.0,
                    help="start no column that would end (by the compile times seen so far) "
                         "after this many seconds (default 400)")
    ap.add_argument("--images", type=int, default=256, help="images per step (default 256)")
    ap.add_argument("--iters", type=int, default=10, help="timed steps per column (default 10)")
    ap.add_argument("--only", nargs="*", help="cells to run, e.g. vitb16:0.75:paired")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        ap.error("no CUDA device: use --dry-run for the CPU check")
    res = run(args)
    print(table(res), flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_pretrain.json"), "w") as handle:
            json.dump(res, handle, indent=1, default=str)
        with open(os.path.join(os.environ["OUT"], "gpu_pretrain.md"), "w") as handle:
            handle.write(table(res) + "\n")
    return res


if __name__ == "__main__":
    main()
