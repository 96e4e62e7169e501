"""GPU check of the MVMAE training step: Triton ops vs the PyTorch reference (same masks,
fp32), then images/s of a bf16 training step, paired vs single, ViT-B/16 at 224 px.

    python3 bench/gpu_pretrain.py            (prints one table; JSON to $OUT if set)
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import fastssl  # noqa: E402

if not os.path.isdir(os.path.join(ROOT, "fastssl", "kernels")):
    fastssl.__path__.append(ROOT)  # source tree, not installed: fastssl.kernels -> ./kernels
from fastssl.models.mvmae import MultiViewMAE, model_config  # noqa: E402


def check_triton_vs_torch():
    torch.manual_seed(0)
    cfg = model_config("vit_base")
    a = MultiViewMAE(cfg, impl="triton").cuda()
    b = MultiViewMAE(cfg, impl="torch").cuda()
    b.load_state_dict(a.state_dict())
    x = torch.randn(16, 1, 224, 224, device="cuda")
    outs = []
    for m in (a, b):
        g = torch.Generator("cuda").manual_seed(1)
        out = m(x[:8], x[8:], mask_ratio=0.75, beta=1.0, generator=g)
        out["loss"].backward()
        outs.append((out, {n: p.grad.clone() for n, p in m.named_parameters()}))
    (oa, ga), (ob, gb) = outs
    rows = {k: abs(float(oa[k].detach()) - float(ob[k].detach())) / abs(float(ob[k].detach())) for k in ("recon_frontal", "recon_lateral", "align")}
    worst = max(((ga[n] - gb[n]).norm() / gb[n].norm().clamp(min=1e-12)).item() for n in ga)
    return dict(rel_err_losses=rows, worst_rel_grad_err=worst)


def time_step(mode, mask_ratio, impl, images=256, steps=10, compile_=False):
    torch.manual_seed(0)
    cfg = model_config("vit_base")
    model = MultiViewMAE(cfg, impl=impl).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    net = torch.compile(model) if compile_ else model
    x = torch.randn(images, 1, 224, 224, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if mode == "paired":
                out = net(x[: images // 2], x[images // 2:], mask_ratio=mask_ratio, beta=1.0)
            else:
                out = net(x, None, views=0, mask_ratio=mask_ratio)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    med = sorted(times)[len(times) // 2]
    return dict(mode=mode, mask_ratio=mask_ratio, impl=impl, compile=compile_, images=images,
                ms=round(1e3 * med, 2), images_per_s=round(images / med, 1),
                max_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))


def main():
    info = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__)
    res = dict(info=info, check=check_triton_vs_torch(), timings=[])
    print(json.dumps(res["check"], indent=1), flush=True)
    for mode in ("paired", "single"):
        for ratio in (0.93, 0.75):
            for impl in ("triton", "torch"):
                r = time_step(mode, ratio, impl)
                res["timings"].append(r)
                print(r, flush=True)
    try:
        r = time_step("paired", 0.93, "triton", compile_=True)
        res["timings"].append(r)
        print(r, flush=True)
    except Exception as exc:  # report, do not hide: compile is optional
        print("torch.compile step failed:", type(exc).__name__, str(exc)[:400], flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_pretrain.json"), "w") as handle:
            json.dump(res, handle, indent=1)


if __name__ == "__main__":
    main()
