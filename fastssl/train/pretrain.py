"""``fastssl pretrain``: multi-view MAE pretraining (and its two baselines) over a cache.

One dataclass holds every setting (:class:`PretrainConfig`; the CLI flags are its fields);
:func:`train_one_epoch` is the whole inner loop; :func:`main` prints the derived
quantities, then trains, logs, checkpoints and exports.

Modes:
    paired      MultiViewMAE on (frontal, lateral) pairs of a study: mean of the two
                reconstruction losses + beta * alignment, beta on a sigmoid ramp 0 -> beta_max.
    single      the same MAE on single images of every view, no alignment (baseline).
    supervised  SupervisedViT on single images with BCE over the 14 labels (baseline).

Files in ``out``:
    config.json          the settings of the run
    metrics.jsonl        one line per log step: step, epoch, loss, recon, align, beta, lr,
                         grad_norm, imgs_per_s (means over the window and over ranks)
    checkpoint.pt        model, optimizer, scaler, epoch, step, RNG states, config;
                         written to a temporary name and renamed (a killed job keeps the old one)
    encoder.safetensors  the final encoder weights (+ model config in the metadata)

Rerunning the same command resumes from checkpoint.pt (the batch order, masks and
augmentations continue exactly: they come from seeded generators saved in the
checkpoint); a finished run is detected and left alone. DDP: launch with torchrun.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from itertools import islice

import torch
import torch.distributed as dist

from fastssl.config import add_dataclass_arguments, config_from_args
from fastssl.models.mvmae import MultiViewMAE, SupervisedViT, model_config
from fastssl.profiling import annotate
from fastssl.train.checkpoint import atomic_torch_save, atomic_write_text, truncate_metrics
from fastssl.train.export import export_encoder, load_encoder

__all__ = ["PretrainConfig", "Schedule", "train_one_epoch", "main", "param_groups",
           "add_arguments", "run", "load_encoder", "export_encoder"]

log = logging.getLogger(__name__)

MODES = ("paired", "single", "supervised")
CHECKPOINT, METRICS, ENCODER = "checkpoint.pt", "metrics.jsonl", "encoder.safetensors"
# Settings that a resumed run must share with its checkpoint (they change the model or
# the meaning of a step); the others (epochs, workers, log_every...) may change.
_RESUME_KEYS = ("mode", "preset", "img_size", "patch_size", "target", "align", "batch_size", "seed")


@dataclass
class PretrainConfig:
    """Every setting of a pretraining run (the CLI's flags, with ``-`` for ``_``)."""

    cache: str = ""                # a `fastssl prepare` cache directory
    out: str = "runs/pretrain"     # output directory (rerun the same command to resume)
    mode: str = "paired"           # paired | single | supervised
    preset: str = "vit_base"       # vit_tiny | vit_small | vit_base (B/16) | test (CPU)
    img_size: int = 0              # 0: the preset's (224)
    patch_size: int = 0            # 0: the preset's (16)
    mask_ratio: float = 0.93       # MVMAE's (13 of 196 patches visible); MAE's is 0.75
    target: str = "global"         # global (MVMAE: dataset mean/std on the input, pixel MSE) | norm_pix (MAE)
    align: str = "mse"             # mse | cosine | infonce (alignment loss of paired mode)
    temperature: float = 0.5       # InfoNCE temperature
    beta_max: float = 2.0          # alignment weight reached at the end of the ramp
    beta_ramp_epochs: float = -1.0 # length of the sigmoid ramp 0 -> beta_max; -1: all epochs
    epochs: int = 100
    batch_size: int = 64           # per rank; in paired mode a sample is a pair (2 images)
    base_lr: float = 1.5e-4        # lr = base_lr * batch_size * world_size / 256
    min_lr: float = 0.0            # floor of the cosine
    warmup_epochs: float = 5.0     # linear warm-up, then cosine to min_lr (per step)
    weight_decay: float = 0.05     # AdamW; none on norms, biases, embeddings and tokens
    beta1: float = 0.9
    beta2: float = 0.95
    clip_grad: float = 1.0         # max global grad norm (0: off)
    amp: str = "bf16"              # bf16 | fp16 | none (autocast on CUDA only)
    compile: bool = False          # torch.compile the model
    impl: str = "auto"             # fastssl.ops implementation: auto | triton | torch
    augment: bool = True           # random resized crop + rotation + brightness/contrast (BatchAugment)
    crop_min: float = 0.5          # smallest crop area fraction
    workers: int = 4               # DataLoader processes
    seed: int = 0
    device: str = "auto"           # auto | cpu | cuda
    log_every: int = 20            # steps between metrics lines
    ckpt_every: int = 500          # steps between checkpoints (also at every epoch end)
    resume: bool = True            # continue from out/checkpoint.pt when present
    stop_after_steps: int = 0      # >0: checkpoint and exit after this many steps of this invocation
    progress: bool = True          # tqdm bar (only on a terminal)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}; expected one of {MODES}")
        if not 0 <= self.mask_ratio < 1:
            raise ValueError(f"mask_ratio={self.mask_ratio}; expected in [0, 1)")
        if self.amp not in ("bf16", "fp16", "none"):
            raise ValueError(f"amp={self.amp!r}; expected bf16 | fp16 | none")
        for name in ("epochs", "batch_size", "log_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; expected >= 1")
        if self.base_lr <= 0 or self.warmup_epochs < 0:
            raise ValueError(f"base_lr={self.base_lr}, warmup_epochs={self.warmup_epochs}; expected > 0, >= 0")
        if not 0 < self.crop_min <= 1:
            raise ValueError(f"crop_min={self.crop_min}; expected in (0, 1]")

    def model_config(self):
        return model_config(self.preset, img_size=self.img_size or None, patch_size=self.patch_size or None,
                            target=self.target, align=self.align, temperature=self.temperature)


@dataclass(frozen=True)
class Schedule:
    """Per-step learning rate (linear warm-up, cosine) and alignment weight (sigmoid ramp)."""

    lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int
    beta_max: float
    ramp_steps: int
    steepness: float = 10.0  # logistic slope over the ramp: sigmoid(k (t - 1/2)), t in [0, 1]

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * step / self.warmup_steps
        t = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    def beta_at(self, step: int) -> float:
        """0 at step 0, beta_max from ramp_steps on; the logistic curve in between,
        shifted and rescaled so that its ends are exactly 0 and beta_max."""
        if self.ramp_steps <= 0 or step >= self.ramp_steps:
            return self.beta_max
        sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
        lo, hi = sig(-self.steepness / 2), sig(self.steepness / 2)
        t = step / self.ramp_steps
        return self.beta_max * (sig(self.steepness * (t - 0.5)) - lo) / (hi - lo)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices; none on 1-D params (norms, biases),
    position / view embeddings and the CLS and mask tokens (as MAE)."""
    no_decay_names = ("pos_embed", "view_embed", "cls_token", "mask_token")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or any(k in name for k in no_decay_names) else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def _forward(model, batch, cfg: PretrainConfig, augment, device, generator, beta: float):
    """One batch of the dataset -> the model's output dict; also the images counted."""
    if cfg.mode == "paired":
        frontal, lateral = (t.to(device, non_blocking=True) for t in batch[:2])
        out = model(augment(frontal, generator), augment(lateral, generator),
                    mask_ratio=cfg.mask_ratio, beta=beta, generator=generator)
        return out, 2 * frontal.shape[0]
    images, labels, _, views = (t.to(device, non_blocking=True) for t in batch)
    x = augment(images, generator)
    if cfg.mode == "single":
        return model(x, None, views=views, mask_ratio=cfg.mask_ratio, generator=generator), x.shape[0]
    return model(x, views, labels), x.shape[0]


def train_one_epoch(model, loader, optimizer, scaler, sched: Schedule, cfg: PretrainConfig, *,
                    epoch: int, step: int, augment, device, generator, on_step=None,
                    log_fn=None) -> tuple[int, bool]:
    """Train over ``loader`` (the batches of this epoch not yet done).

    Args:
        step: global step before the first batch; the schedule is indexed by it.
        augment: callable (B, 1, S, S) integer images, generator -> (B, 1, H, W) float.
        generator: torch.Generator on ``device`` for masks and augmentation.
        on_step: called with the global step after each optimizer step; returns True to stop.
        log_fn: called every cfg.log_every steps with a dict of window means (all ranks).
    Returns:
        (global step after the last batch, stopped early).
    """
    model.train()
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    use_amp = device.type == "cuda" and amp_dtype is not None
    params = [p for g in optimizer.param_groups for p in g["params"]]
    keys = ("loss", "recon", "align", "beta", "grad_norm")
    window = torch.zeros(len(keys), device=device)  # summed on the device: no sync per step
    n_steps, n_images, t0 = 0, 0, time.perf_counter()
    for batch in loader:
        lr, beta = sched.lr_at(step), sched.beta_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ctx = torch.autocast("cuda", dtype=amp_dtype) if use_amp else contextlib.nullcontext()
        with ctx, annotate("pretrain/forward"):
            out, images = _forward(model, batch, cfg, augment, device, generator, beta)
        loss = out["loss"]
        optimizer.zero_grad(set_to_none=True)
        with annotate("pretrain/backward"):
            scaler.scale(loss).backward()
        with annotate("pretrain/optimizer"):
            scaler.unscale_(optimizer)  # clip the true gradient (a no-op unless fp16)
            max_norm = cfg.clip_grad if cfg.clip_grad > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            scaler.step(optimizer)
            scaler.update()
        step, n_steps, n_images = step + 1, n_steps + 1, n_images + images
        recon = out.get("recon", loss)
        align = out.get("align", loss.new_zeros(()))
        window += torch.stack([loss.detach().float(), recon.detach().float(), align.detach().float(),
                               loss.new_tensor(beta, dtype=torch.float32), grad_norm.detach().float()])
        if step % cfg.log_every == 0:
            stats = window / n_steps
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(stats)
                stats /= dist.get_world_size()
                n_images *= dist.get_world_size()
            values = stats.tolist()  # the one host sync of the window
            if not math.isfinite(values[0]):
                raise FloatingPointError(f"loss is {values[0]} at step {step} (epoch {epoch}); "
                                         "lower the lr or use amp=bf16")
            elapsed = time.perf_counter() - t0
            if log_fn is not None:
                log_fn(dict(step=step, epoch=epoch, **dict(zip(keys, values)), lr=lr,
                            imgs_per_s=n_images / elapsed))
            window.zero_()
            n_steps, n_images, t0 = 0, 0, time.perf_counter()
        if on_step is not None and on_step(step):
            return step, True
    return step, False


# ----------------------------------------------------------------------- run plumbing
def _dist_init() -> tuple[int, int, int]:
    """(rank, world, local rank); single process when no launcher variables are set."""
    try:
        from fastssl import distributed as fdist
    except ImportError:  # the helpers module is optional here: torchrun variables suffice
        fdist = None
    if fdist is not None:
        info = fdist.init()
        return info.rank, info.world_size, info.local_rank
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    return 0, 1, 0


def _pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but no CUDA device is visible")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def _datasets(cfg: PretrainConfig):
    from fastssl.data.datasets import PairedViewDataset, SingleViewDataset

    if cfg.mode == "paired":
        return PairedViewDataset(cfg.cache, split="train", seed=cfg.seed)
    return SingleViewDataset(cfg.cache, split="train", views="all")


def _augment(cfg: PretrainConfig, mcfg, manifest: dict):
    from fastssl.data.augment import BatchAugment, CenterResize

    mean, std = float(manifest.get("pixel_mean", 0.5)), float(manifest.get("pixel_std", 0.25)) or 0.25
    if cfg.augment:
        return BatchAugment(out_size=mcfg.img_size, scale=(cfg.crop_min, 1.0), mean=mean, std=std)
    center = CenterResize(out_size=mcfg.img_size, mean=mean, std=std)
    return lambda x, generator=None: center(x)


def _loader(dataset, cfg: PretrainConfig, epoch: int, skip: int, rank: int, world: int, pin: bool):
    """This rank's batches of ``epoch`` after the first ``skip`` ones (DistributedSampler:
    the permutation depends on (seed, epoch) only, so a resumed run sees the same order)."""
    from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)  # the paired dataset's per-epoch view draw
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed,
                                 drop_last=True)
    sampler.set_epoch(epoch)
    batches = list(islice(BatchSampler(sampler, cfg.batch_size, drop_last=True), skip, None))
    # A private generator: creating the iterator must not draw from the global RNG.
    return DataLoader(dataset, sampler=batches, batch_size=None, num_workers=cfg.workers,
                      pin_memory=pin, generator=torch.Generator().manual_seed(cfg.seed + epoch))


def _resolved_impls(device: torch.device, impl: str) -> dict[str, str]:
    from fastssl.ops import _common

    dtype = torch.float32
    return {op: _common.resolve(op, impl, device, dtype)
            for op in ("gather_tokens", "unshuffle_with_mask_token", "mae_loss")}


def main(cfg: PretrainConfig) -> dict:
    """Runs (or resumes, or recognises as finished) a pretraining job. Returns a summary
    dict: step, total_steps, epochs_done, out, finished, stopped, last metrics."""
    from fastssl.data.cache import read_manifest

    cfg.validate()
    mcfg = cfg.model_config()
    rank, world, local = _dist_init()
    is_main = rank == 0
    device = _pick_device(cfg.device, local)
    os.makedirs(cfg.out, exist_ok=True)
    ckpt_path, metrics_path = os.path.join(cfg.out, CHECKPOINT), os.path.join(cfg.out, METRICS)
    enc_path = os.path.join(cfg.out, ENCODER)

    dataset = _datasets(cfg)
    steps_per_epoch = len(dataset) // (cfg.batch_size * world)
    if steps_per_epoch < 1:
        raise ValueError(f"the train split of {cfg.cache} has {len(dataset)} {cfg.mode} samples: fewer "
                         f"than one global batch of batch_size={cfg.batch_size} x world={world}")
    total = steps_per_epoch * cfg.epochs
    eff_batch = cfg.batch_size * world
    lr = cfg.base_lr * eff_batch / 256
    ramp_epochs = cfg.epochs if cfg.beta_ramp_epochs < 0 else cfg.beta_ramp_epochs
    sched = Schedule(lr=lr, min_lr=cfg.min_lr, warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
                     total_steps=total, beta_max=cfg.beta_max if cfg.mode == "paired" else 0.0,
                     ramp_steps=round(ramp_epochs * steps_per_epoch))

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = (MultiViewMAE(mcfg, impl=cfg.impl) if cfg.mode != "supervised" else SupervisedViT(mcfg)).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=lr, betas=(cfg.beta1, cfg.beta2))
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.amp == "fp16")
    generator = torch.Generator(device).manual_seed(cfg.seed * 1000 + rank)
    step = 0
    if cfg.resume and os.path.isfile(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        diff = {k: (ckpt["config"].get(k), getattr(cfg, k)) for k in _RESUME_KEYS
                if ckpt["config"].get(k) != getattr(cfg, k)}
        if diff:
            raise ValueError(f"{ckpt_path} was written with other settings {diff} (checkpoint, now); "
                             "use another --out or --no-resume")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        generator.set_state(ckpt["rng"]["generators"][rank])
        torch.set_rng_state(ckpt["rng"]["torch"])
        step = int(ckpt["step"])
        if is_main:
            truncate_metrics(metrics_path, step)
    if step >= total and os.path.isfile(enc_path):
        if is_main:
            print(f"pretrain: {cfg.out} is finished ({step} of {total} steps); nothing to do")
        return dict(step=step, total_steps=total, finished=True, stopped=False, out=cfg.out, metrics=None)

    n_params = sum(p.numel() for p in model.parameters())
    if is_main:
        atomic_write_text(os.path.join(cfg.out, "config.json"), json.dumps(asdict(cfg), indent=2))
        impls = _resolved_impls(device, cfg.impl) if cfg.mode != "supervised" else {}
        amp = cfg.amp if device.type == "cuda" else "none (CPU)"
        (print if cfg.progress else log.info)(f"pretrain: mode={cfg.mode} preset={cfg.preset} img={mcfg.img_size} patch={mcfg.patch_size} "
              f"L={mcfg.num_patches} visible={int(mcfg.num_patches * (1 - cfg.mask_ratio))} "
              f"params={n_params / 1e6:.2f}M\n"
              f"  device={device} world_size={world} amp={amp} compile={cfg.compile} ops={impls}\n"
              f"  samples={len(dataset)} batch/rank={cfg.batch_size} effective_batch={eff_batch} "
              f"images/step={eff_batch * (2 if cfg.mode == 'paired' else 1)}\n"
              f"  steps/epoch={steps_per_epoch} total_steps={total} warmup_steps={sched.warmup_steps} "
              f"lr={lr:.3e} (base_lr {cfg.base_lr:g} x {eff_batch}/256) min_lr={cfg.min_lr:g} "
              f"wd={cfg.weight_decay} clip={cfg.clip_grad}\n"
              f"  target={cfg.target} align={cfg.align if cfg.mode == 'paired' else '-'} "
              f"beta: 0 -> {sched.beta_max} over {sched.ramp_steps} steps (sigmoid)"
              + (f"\n  resuming at step {step} (epoch {step // steps_per_epoch})" if step else ""))

    net = model
    if cfg.compile:
        net = torch.compile(net)
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    augment = _augment(cfg, mcfg, read_manifest(cfg.cache))

    def save(step_: int) -> None:
        gens = [generator.get_state()]
        if world > 1:  # every rank's generator, so each resumes its own masks
            gens = [torch.empty_like(gens[0]) for _ in range(world)]
            dist.all_gather(gens, generator.get_state().to(device) if device.type == "cuda"
                            else generator.get_state())
            gens = [g.cpu() for g in gens]
        if is_main:
            atomic_torch_save(dict(
                model=model.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                epoch=step_ // steps_per_epoch, step=step_, config=asdict(cfg), model_config=asdict(mcfg),
                rng=dict(torch=torch.get_rng_state(), generators=gens)), ckpt_path)

    last = {}

    def log_fn(rec: dict) -> None:
        last.update(rec)
        if is_main:
            with open(metrics_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(rec) + "\n")
            log.info("step %d/%d loss %.4f recon %.4f align %.4f beta %.3f lr %.2e %.0f img/s",
                     rec["step"], total, rec["loss"], rec["recon"], rec["align"], rec["beta"],
                     rec["lr"], rec["imgs_per_s"])

    start_step, stopped = step, False

    def on_step(s: int) -> bool:
        stop = cfg.stop_after_steps > 0 and s - start_step >= cfg.stop_after_steps
        if s % cfg.ckpt_every == 0 or s % steps_per_epoch == 0 or stop:
            save(s)
        return stop

    pin = device.type == "cuda"
    for epoch in range(step // steps_per_epoch, cfg.epochs):
        loader = _loader(dataset, cfg, epoch, step - epoch * steps_per_epoch, rank, world, pin)
        if cfg.progress and is_main:
            from tqdm import tqdm

            loader = tqdm(loader, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True,
                          disable=None)  # disable=None: off when not a terminal
        step, stopped = train_one_epoch(net, loader, optimizer, scaler, sched, cfg, epoch=epoch, step=step,
                                        augment=augment, device=device, generator=generator,
                                        on_step=on_step, log_fn=log_fn)
        if stopped:
            break
    finished = step >= total
    if finished and is_main:
        export_encoder(model.encoder, mcfg, enc_path)
        print(f"pretrain: done, {step} steps; encoder -> {enc_path}")
    elif is_main:
        print(f"pretrain: stopped at step {step} of {total}; rerun the same command to continue")
    return dict(step=step, total_steps=total, finished=finished, stopped=stopped, out=cfg.out, metrics=last)


# ------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    # --progress is not a flag: --quiet (added by the router) switches the bar off.
    from fastssl.models.mvmae import ALIGN_LOSSES, PRESETS, TARGETS

    add_dataclass_arguments(parser, PretrainConfig, required=("cache",), skip=("progress",), choices=dict(
        mode=MODES, preset=sorted(PRESETS), target=TARGETS, align=ALIGN_LOSSES, amp=("bf16", "fp16", "none"),
        impl=("auto", "triton", "torch"), device=None))


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(PretrainConfig, args)
    from fastssl.errors import DataError

    try:
        summary = main(cfg)
    except (ValueError, DataError) as exc:
        log.error("%s", exc)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0 if summary["finished"] or summary["stopped"] else 1
