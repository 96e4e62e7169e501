"""``fastssl pretrain``: multi-view MAE pretraining (and its baselines) over a cache.

One dataclass holds every setting (:class:`PretrainConfig`; the CLI flags are its fields);
fields left at None take the recipe's value (``--recipe mvmae``: the released MVMAE
configuration with its 500 epochs and 50 warm-up, the default; ``--recipe mvmae-short``:
the same at 100 epochs and 5 warm-up, ours; ``--recipe mae``: fastssl's MAE-style
variant), the same way for the Python API and the CLI. :func:`train_one_epoch` is the whole inner loop;
:func:`main` prints the derived quantities, then trains, logs, checkpoints and exports.

Modes:
    flu         (the mvmae recipe's) every image of every train study is reconstructed, up
                to 3 per study in view slots (StudyViewsDataset); the pooled latents of the
                images of one study are aligned (alignment loss with an availability mask).
    paired      studies with a frontal and a lateral image, one of each per epoch
                (``--mode paired --beta-max 0``: the matched no-alignment ablation).
    single      the same MAE on single images of every view, no alignment (baseline).
    supervised  SupervisedViT on single images with BCE over the 14 labels (baseline).
Loss = reconstruction + beta * alignment; beta per epoch by the released SigmoidAnnealing
(or per step on a sigmoid ramp 0 -> beta_max with ``--beta-schedule ramp``).

Files in ``out``:
    config.json          the resolved settings of the run (usable as ``--config``)
    job.json             the run's identity: result-affecting settings + the cache's content
    metrics.jsonl        records every log_every steps and at the end of every epoch: step,
                         epoch, loss, recon, align, beta, lr, grad_norm, cos_matched,
                         cos_unmatched, imgs_per_s (window means over steps and ranks), images
                         (the window's count, all ranks); after
                         each epoch {step, epoch, val_recon} (validate split)
    metrics.csv          the same records, columns CSV_FIELDS (empty cell = not in the record)
    tb/                  TensorBoard event files (when the ``tensorboard`` extra is installed)
    checkpoint.pt        model, optimizer, scaler, epoch, step, RNG states, config
                         (+ checkpoint.pt.sha256; written atomically)
    encoder.safetensors  the final encoder weights (+ model config in the metadata)

Rerunning the same command resumes from checkpoint.pt (the batch order, masks and
augmentations continue exactly: they come from seeded generators saved in the
checkpoint); a finished run is detected and left alone; a run with other settings in the
same ``--out`` is refused, naming them (``--overwrite`` replaces it). DDP: launch with torchrun.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from itertools import islice

import numpy as np
import torch
import torch.distributed as dist

from fastssl import distributed as fdist
from fastssl.config import (COUNT, NONNEG, POSITIVE, SEED, Range, add_dataclass_arguments, check_settings,
                            config_from_args, declared_choices, field_help, setting)
from fastssl.models.alignment import ALIGN_LOSSES
from fastssl.models.mvmae import INITS, PRESETS, RECON_REDUCTIONS, TARGETS, MultiViewMAE, SupervisedViT
from fastssl.reference.mae import num_kept
from fastssl.profiling import annotate
from fastssl.train.checkpoint import atomic_torch_save, atomic_write_text, truncate_metrics
from fastssl.models.export import export_encoder, load_encoder

__all__ = ["PretrainConfig", "Schedule", "train_one_epoch", "main", "param_groups", "recipe_beta_range",
           "add_arguments", "run", "load_encoder", "export_encoder"]

log = logging.getLogger(__name__)

MODES = ("flu", "paired", "single", "supervised")
CHECKPOINT, METRICS, METRICS_CSV, ENCODER = "checkpoint.pt", "metrics.jsonl", "metrics.csv", "encoder.safetensors"
CSV_FIELDS = ("step", "epoch", "loss", "recon", "align", "beta", "lr", "grad_norm", "cos_matched",
              "cos_unmatched", "imgs_per_s", "images", "val_recon")
# Settings that do not change the trained weights: a resume may change them. Every other
# field (and the world size and the cache's content) is the run's identity (job.json).
_NOT_IDENTITY = ("out", "workers", "device", "impl", "compile", "plots", "log_every", "val_batches",
                 "ckpt_every", "resume", "overwrite", "verify_data", "stop_after_steps", "progress")

# What each recipe sets (PretrainConfig fields left at None take these values). "mvmae" is
# the released MVMAE configuration (agostini335/MVMAE, config/config_base.yaml and the
# modules it names; README table) with the length of its dataclass defaults
# (config/MyMVWSLConfig.py: n_epochs 500, n_epochs_warmup 50; config_base.yaml's 2 / 5 is a
# smoke setting on 1,000 studies); "mvmae-short" is the same at 100 epochs, 5 warm-up
# (ours, not released: the annealing then spans 0.522 -> 1.397, not 0.008 -> 1.940);
# "mae" is fastssl's earlier MAE-style choice.
_MVMAE = dict(mode="flu", base_lr=1.2e-4, beta2=0.999, decay_all=True, lr_per_epoch=True, warmup_start=0.5,
              beta_schedule="released", beta_steepness=0.02, augment_style="mvmae")
RECIPE_DEFAULTS: dict[str, dict] = {
    "mvmae": dict(_MVMAE, epochs=500, warmup_epochs=50.0),
    "mvmae-short": dict(_MVMAE, epochs=100, warmup_epochs=5.0),
    "mae": dict(mode="paired", base_lr=1.5e-4, beta2=0.95, decay_all=False, lr_per_epoch=False,
                warmup_start=0.0, beta_schedule="ramp", beta_steepness=10.0, augment_style="mae",
                epochs=100, warmup_epochs=5.0),
}
# The model recipe (fastssl.models.mvmae.MODEL_RECIPES) of each training recipe.
RECIPE_MODEL = {"mvmae": "mvmae", "mvmae-short": "mvmae", "mae": "mae"}
_PRESET_NAMES = tuple(sorted(PRESETS))
# Model fields a run may override (None: the recipe's, see fastssl.models.mvmae.MODEL_RECIPES).
_MODEL_OVERRIDES = ("target", "align", "recon_reduction", "qk_norm", "decoder_embed", "decoder_dim",
                    "decoder_heads", "decoder_depth", "init")


@dataclass
class PretrainConfig:
    """Every setting of a pretraining run (the CLI's flags, with ``-`` for ``_``). Fields
    left at None take the recipe's value (:meth:`resolved`); config.json records both."""

    cache: str = ""                # a `fastssl prepare` cache directory
    out: str = "runs/pretrain"     # output directory (rerun the same command to resume)
    recipe: str = setting("mvmae", choices=tuple(RECIPE_DEFAULTS))          # mvmae (released, 500 epochs) | mvmae-short (same, 100 epochs) | mae (MAE-style)
    mode: str | None = setting(None, choices=MODES)        # flu (every image, alignment where a study has two) | paired | single | supervised
    preset: str = setting("vit_base", choices=_PRESET_NAMES)       # vit_tiny | vit_small | vit_base (B/16) | test (CPU)
    img_size: int = setting(0, range=Range(0, 16384, integer=True))              # 0: the preset's (224)
    patch_size: int = setting(0, range=Range(0, 1024, integer=True))            # 0: the preset's (16)
    max_views: int = setting(3, range=COUNT)             # flu: view slots per study (a random subset of a study with more images)
    mask_ratio: float = setting(0.93, range=Range(0, 1, high_open=True))       # MVMAE's (13 of 196 patches visible); MAE's is 0.75
    target: str | None = setting(None, choices=TARGETS)      # global (dataset mean/std on the input, pixel MSE) | norm_pix (MAE)
    align: str | None = setting(None, choices=ALIGN_LOSSES)       # mse (released) | l2 | cosine | ntxent | infonce
    temperature: float = setting(0.5, range=POSITIVE)       # ntxent / infonce temperature
    recon_reduction: str | None = setting(None, choices=RECON_REDUCTIONS)  # released (sum over images / (studies x slots)) | image (mean)
    qk_norm: bool | None = None    # LayerNorm on queries and keys (released: on)
    decoder_embed: bool | None = None  # projection encoder -> decoder width (MAE); released: none
    decoder_dim: int | None = setting(None, range=COUNT)     # released: the encoder's width; MAE: 512 (B), 256 (S), 128 (Ti)
    decoder_heads: int | None = setting(None, range=COUNT)   # released: the encoder's heads; MAE: 16 (B)
    decoder_depth: int | None = setting(None, range=COUNT)   # 4 (the test preset: 2)
    init: str | None = setting(None, choices=INITS)        # released (PyTorch defaults, trunc_normal tokens) | mae
    beta_max: float = setting(2.0, range=Range(0))          # alignment weight: the released annealing's final_beta, or the ramp's end
    beta_schedule: str | None = setting(None, choices=("released", "ramp"))   # released (per-epoch SigmoidAnnealing from the warm-up on) | ramp (per step)
    beta_steepness: float | None = setting(None, range=POSITIVE)  # released 0.02 (per epoch); ramp 10 (over the ramp)
    beta_ramp_epochs: float = setting(-1.0, range=Range(-1)) # ramp only: length of the sigmoid ramp 0 -> beta_max; -1: all epochs
    epochs: int | None = setting(None, range=COUNT)      # the recipe's: 500 (mvmae, the released default), 100 (mvmae-short, mae)
    batch_size: int = setting(64, range=COUNT)           # per rank; a sample is a study (flu, paired) or an image
    base_lr: float | None = setting(None, range=POSITIVE)   # lr = base_lr * batch_size * world_size / 256 (released 1.2e-4)
    min_lr: float = setting(0.0, range=Range(0))            # floor of the cosine
    warmup_epochs: float | None = setting(None, range=Range(0))  # warm-up, then cosine to min_lr; the recipe's: 50 (mvmae), 5 (mvmae-short, mae)
    warmup_start: float | None = setting(None, range=Range(0, 1))  # lr factor at the start of the warm-up (released LinearLR: 0.5)
    lr_per_epoch: bool | None = None   # lr (and beta) change once per epoch (released) or every step
    weight_decay: float = setting(0.05, range=Range(0))     # AdamW
    decay_all: bool | None = None  # decay on every parameter (released) or not on norms/biases/embeddings (MAE)
    beta1: float = setting(0.9, range=Range(0, 1, high_open=True))
    beta2: float | None = setting(None, range=Range(0, 1, high_open=True))     # released 0.999 (AdamW default); MAE 0.95
    clip_grad: float = setting(1.0, range=Range(0))         # max global grad norm (0: off)
    amp: str = setting("bf16", choices=("bf16", "fp16", "none"))              # bf16 | fp16 | none (autocast on CUDA only)
    compile: bool = True           # torch.compile the model on CUDA (--no-compile: eager); never on the CPU
    impl: str = setting("auto", choices=("auto", "triton", "torch"))             # fastssl.ops implementation: auto | triton | torch
    augment: bool = True           # augmentation (augment_style); off: centre resize only
    augment_style: str | None = setting(None, choices=("mvmae", "mae"))  # mvmae: RandomResizedCrop 1:1 + hflip + ColorJitter(0.4, 0.4) p=0.8 | mae
    crop_min: float = setting(0.5, range=Range(0, 1, low_open=True))          # smallest crop area fraction
    pixel_mean: float = setting(-1.0, range=Range(-1))       # input normalisation; -1: the cache manifest's (released: MIMIC's 0.5056)
    pixel_std: float = setting(-1.0, range=Range(-1))        # -1: the cache manifest's (released: 0.252)
    workers: int = setting(4, range=NONNEG)               # DataLoader processes: 0 = this process, N >= 1 = N loader processes
    seed: int = setting(0, range=SEED)
    device: str = setting("auto", check=fdist.check_device)  # torch device
    log_every: int = setting(20, range=COUNT)            # steps between metrics lines (and always at the end of an epoch)
    val_batches: int = setting(20, range=NONNEG)          # validation reconstruction loss per epoch over this many batches (0: off)
    ckpt_every: int = setting(500, range=COUNT)          # steps between checkpoints (also at every epoch end)
    resume: bool = True            # continue from out/checkpoint.pt when present (--no-resume: start over)
    overwrite: bool = False        # replace an --out that holds a run with other settings
    verify_data: bool = False      # hash every byte of the cache for the resume identity (default: sampled blocks)
    stop_after_steps: int = setting(0, range=NONNEG)      # >0: checkpoint and exit after this many steps of this invocation
    plots: bool = True             # loss_curves.png + reconstructions.png when the run finishes (matplotlib)
    progress: bool = True          # tqdm bar (only on a terminal)

    def __post_init__(self) -> None:
        # mask_ratio first, in the words the Python API has always used for it
        if not 0 <= self.mask_ratio < 1:
            raise ValueError(f"mask_ratio={self.mask_ratio}; expected in [0, 1)")
        check_settings(self)   # a bad value fails here, not after the cache is read

    def resolved(self) -> "PretrainConfig":
        """A copy with every None field replaced by the recipe's value (and checked)."""
        if self.recipe not in RECIPE_DEFAULTS:
            raise ValueError(f"recipe={self.recipe!r}; expected one of {tuple(RECIPE_DEFAULTS)}")
        from fastssl.models.mvmae import _recipe_fields

        model_defaults = _recipe_fields(self.preset, RECIPE_MODEL[self.recipe])
        values = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                v = RECIPE_DEFAULTS[self.recipe].get(f.name, model_defaults.get(f.name))
            values[f.name] = v
        out = PretrainConfig(**values)
        out.validate()
        out.model_config()  # the model fields checked too (ValueError naming the field)
        return out

    def validate(self) -> None:
        """ValueError naming the first setting that cannot run: the declared ranges and
        choices (fastssl.config), and a mode, which a resolved config must have."""
        self.__post_init__()
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}; expected one of {MODES}")

    def model_config(self):
        from fastssl.models.mvmae import model_config

        return model_config(self.preset, recipe=RECIPE_MODEL[self.recipe], img_size=self.img_size or None,
                            patch_size=self.patch_size or None, temperature=self.temperature,
                            **{k: getattr(self, k) for k in _MODEL_OVERRIDES})


def sigmoid_annealing(epoch: int, final: float, start: int, end: int, steepness: float,
                      initial: float = 0.0) -> float:
    """The released per-epoch beta (MVMAE ``SigmoidAnnealing``): a logistic curve of the
    epoch, constant before ``start`` and from ``end`` on. Its midpoint is
    ``int(start + (end - start) / 2)`` measured from ``start`` (shifted twice, as released),
    so with final 2, steepness 0.02 the epochs a run trains (0 .. end - 1) see
    0.008 -> 1.940 at (start, end) = (50, 500) and 0.522 -> 1.397 at (5, 100)
    (:func:`recipe_beta_range`)."""
    midpoint = int(start + (end - start) / 2)
    t = min(max(epoch, start), end) - start  # before start: the value at start; from end on: at end
    return initial + (final - initial) / (1 + math.exp(-steepness * (t - midpoint)))


def recipe_beta_range(recipe: str, beta_max: float = 2.0) -> tuple[float, float]:
    """(first, last) beta a recipe's released schedule gives over the epochs it trains
    (epoch 0 and epoch ``epochs - 1``); ValueError for a recipe with the per-step ramp."""
    if recipe not in RECIPE_DEFAULTS:
        raise ValueError(f"recipe={recipe!r}; expected one of {tuple(RECIPE_DEFAULTS)}")
    r = RECIPE_DEFAULTS[recipe]
    if r["beta_schedule"] != "released":
        raise ValueError(f"recipe={recipe!r} ramps beta per step; no per-epoch range")
    start, end = int(r["warmup_epochs"]), r["epochs"]
    return tuple(sigmoid_annealing(e, beta_max, start, end, r["beta_steepness"]) for e in (0, end - 1))


@dataclass(frozen=True)
class Schedule:
    """Learning rate (warm-up from ``warmup_start`` x lr, then cosine) and alignment weight,
    per step or, with ``per_epoch``, constant within an epoch (the released recipe:
    LinearLR(start 0.5) then CosineAnnealingLR stepped per epoch, SigmoidAnnealing beta)."""

    lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int
    beta_max: float
    ramp_steps: int
    steepness: float = 10.0  # ramp: logistic slope over the ramp, sigmoid(k (t - 1/2)), t in [0, 1]
    steps_per_epoch: int = 1
    per_epoch: bool = False  # lr by epoch (warmup/total counted in epochs: warmup_steps // steps_per_epoch)
    warmup_start: float = 0.0
    beta_released: bool = False  # beta = sigmoid_annealing(epoch, beta_max, warm-up epochs, epochs, steepness)

    def _lr_at(self, t: float, warmup: float, total: float) -> float:
        if t < warmup:
            return self.lr * (self.warmup_start + (1 - self.warmup_start) * t / warmup)
        frac = (t - warmup) / max(1, total - warmup)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    def lr_at(self, step: int) -> float:
        if self.per_epoch:
            spe = self.steps_per_epoch
            return self._lr_at(step // spe, self.warmup_steps / spe, self.total_steps // spe)
        return self._lr_at(step, self.warmup_steps, self.total_steps)

    def beta_at(self, step: int) -> float:
        """Ramp: 0 at step 0, beta_max from ramp_steps on; the logistic curve in between,
        shifted and rescaled so that its ends are exactly 0 and beta_max."""
        if self.beta_released:
            spe = self.steps_per_epoch
            return sigmoid_annealing(step // spe, self.beta_max, self.warmup_steps // spe,
                                     self.total_steps // spe, self.steepness)
        if self.ramp_steps <= 0 or step >= self.ramp_steps:
            return self.beta_max
        sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
        lo, hi = sig(-self.steepness / 2), sig(self.steepness / 2)
        t = step / self.ramp_steps
        return self.beta_max * (sig(self.steepness * (t - 0.5)) - lo) / (hi - lo)


def param_groups(model: torch.nn.Module, weight_decay: float, decay_all: bool = False) -> list[dict]:
    """AdamW groups. ``decay_all`` (released): one group, decay on every parameter.
    Otherwise (MAE): decay on weight matrices; none on 1-D params (norms, biases),
    position / view embeddings and the CLS and mask tokens."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if decay_all:
        return [dict(params=[p for _, p in params], weight_decay=weight_decay)]
    no_decay_names = ("pos_embed", "view_embed", "cls_token", "mask_token")
    decay, no_decay = [], []
    for name, p in params:
        (no_decay if p.ndim <= 1 or any(k in name for k in no_decay_names) else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def _forward(model, batch, cfg: PretrainConfig, augment, device, generator, beta: float):
    """One batch of the dataset -> the model's output dict; also the images counted."""
    if cfg.mode == "flu":
        images, available, views = (t.to(device, non_blocking=True) for t in batch[:3])
        flat = augment(images[available], generator)                       # (N, 1, H, W)
        x = flat.new_zeros(images.shape[:2] + flat.shape[1:])
        x[available] = flat
        out = model(x, available=available, views=views, mask_ratio=cfg.mask_ratio, beta=beta,
                    generator=generator)
        return out, flat.shape[0]
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


class _Window:
    """Sums of the logged quantities over the steps since the last record, on the device
    (no host sync per step); :meth:`record` pools them over ranks."""

    KEYS = ("loss", "recon", "align", "beta", "grad_norm")

    def __init__(self, device):
        self.sums = torch.zeros(len(self.KEYS) + 4, device=device)  # + matched/unmatched cosine sums, counts
        self.steps, self.images, self.t0 = 0, 0, time.perf_counter()

    def add(self, out: dict, beta: float, grad_norm: torch.Tensor, images: int) -> None:
        loss = out["loss"].detach().float()
        monitor = out.get("monitor", loss.new_zeros(4))
        self.sums += torch.cat([torch.stack([loss, out.get("recon", loss).detach().float(),
                                             out.get("align", loss.new_zeros(())).detach().float(),
                                             loss.new_full((), beta), grad_norm.detach().float()]),
                                monitor.to(loss.device, torch.float32)])
        self.steps, self.images = self.steps + 1, self.images + images

    def record(self, step: int, epoch: int, lr: float) -> dict:
        """Window means (over steps and ranks) as one metrics record; resets the window."""
        stats = self.sums.clone()
        stats[: len(self.KEYS)] /= self.steps
        images = self.images
        world = fdist.world_size()
        if world > 1:
            stats = fdist.all_reduce_sum(stats)
            stats[: len(self.KEYS)] /= world
            images *= world
        values = stats.tolist()  # the one host sync of the window
        if not math.isfinite(values[0]):
            raise FloatingPointError(f"loss is {values[0]} at step {step} (epoch {epoch}); "
                                     "lower the lr or use amp=bf16")
        m_sum, m_n, u_sum, u_n = values[len(self.KEYS):]
        rec = dict(step=step, epoch=epoch, **dict(zip(self.KEYS, values[: len(self.KEYS)])), lr=lr,
                   cos_matched=m_sum / m_n if m_n else None, cos_unmatched=u_sum / u_n if u_n else None,
                   imgs_per_s=images / max(time.perf_counter() - self.t0, 1e-9),
                   images=images)  # summed over records: the images a run trained on
        self.__init__(self.sums.device)
        return rec


def train_one_epoch(model, loader, optimizer, scaler, sched: Schedule, cfg: PretrainConfig, *,
                    epoch: int, step: int, augment, device, generator, on_step=None,
                    log_fn=None) -> tuple[int, bool]:
    """Train over ``loader`` (the batches of this epoch not yet done).

    Args:
        step: global step before the first batch; the schedule is indexed by it.
        augment: callable (B, 1, S, S) integer images, generator -> (B, 1, H, W) float.
        generator: torch.Generator on ``device`` for masks and augmentation.
        on_step: called with the global step after each optimizer step; returns True to stop.
        log_fn: called with a record of window means (all ranks) every cfg.log_every steps
            and with the last partial window when the epoch ends or the run stops.
    Returns:
        (global step after the last batch, stopped early).
    """
    model.train()
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    use_amp = device.type == "cuda" and amp_dtype is not None
    params = [p for g in optimizer.param_groups for p in g["params"]]
    max_norm = cfg.clip_grad if cfg.clip_grad > 0 else float("inf")
    window, lr, stopped = _Window(device), sched.lr_at(step), False
    for batch in loader:
        lr, beta = sched.lr_at(step), sched.beta_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ctx = torch.autocast("cuda", dtype=amp_dtype) if use_amp else contextlib.nullcontext()
        with ctx, annotate("pretrain/forward"):
            out, images = _forward(model, batch, cfg, augment, device, generator, beta)
        optimizer.zero_grad(set_to_none=True)
        with annotate("pretrain/backward"):
            scaler.scale(out["loss"]).backward()
        with annotate("pretrain/optimizer"):
            scaler.unscale_(optimizer)  # clip the true gradient (a no-op unless fp16)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            scaler.step(optimizer)
            scaler.update()
        step += 1
        window.add(out, beta, grad_norm, images)
        if step % cfg.log_every == 0 and log_fn is not None:
            log_fn(window.record(step, epoch, lr))
        if on_step is not None and on_step(step):
            stopped = True
            break
    if window.steps and log_fn is not None:  # the last partial window of the epoch / run
        log_fn(window.record(step, epoch, lr))
    return step, stopped


# ----------------------------------------------------------------------- run plumbing
def _datasets(cfg: PretrainConfig):
    from fastssl.data.datasets import PairedViewDataset, SingleViewDataset, StudyViewsDataset

    if cfg.mode == "flu":
        return StudyViewsDataset(cfg.cache, split="train", max_views=cfg.max_views, seed=cfg.seed)
    if cfg.mode == "paired":
        data = PairedViewDataset(cfg.cache, split="train", seed=cfg.seed)
        unknown = int(np.isin(data.index.view[data.index.split == "train"], ("unknown", "other")).sum())
        if unknown:
            log.warning("paired mode never trains the view embedding 'unknown' (id 2), but %d train images "
                        "have no frontal/lateral view: --mode flu trains it; otherwise evaluate such images "
                        "with an explicit view", unknown)
        return data
    return SingleViewDataset(cfg.cache, split="train", views="all")


def _normalisation(cfg: PretrainConfig, manifest: dict) -> tuple[float, float]:
    from fastssl.data.cache import pixel_stats

    return pixel_stats(manifest, cfg.pixel_mean, cfg.pixel_std)


def _augment(cfg: PretrainConfig, mcfg, manifest: dict):
    """The training transform: released MVMAE (RandomResizedCrop(scale crop_min..1, ratio
    1:1), horizontal flip, ColorJitter(0.4, 0.4) with p = 0.8) or fastssl's MAE style
    (crop with ratio 3:4..4:3, rotation +-10 deg, brightness/contrast 0.1); then (x - mean) / std."""
    from fastssl.data.augment import BatchAugment, CenterResize

    mean, std = _normalisation(cfg, manifest)
    if not cfg.augment:
        center = CenterResize(out_size=mcfg.img_size, mean=mean, std=std)
        return lambda x, generator=None: center(x)
    if cfg.augment_style == "mvmae":
        return BatchAugment(out_size=mcfg.img_size, scale=(cfg.crop_min, 1.0), ratio=(1.0, 1.0),
                            max_rotation_deg=0.0, brightness=0.4, contrast=0.4, mean=mean, std=std,
                            hflip=0.5, jitter_p=0.8, jitter_style="torchvision")
    return BatchAugment(out_size=mcfg.img_size, scale=(cfg.crop_min, 1.0), mean=mean, std=std)


def _loader(dataset, cfg: PretrainConfig, epoch: int, skip: int, rank: int, world: int, pin: bool):
    """This rank's batches of ``epoch`` after the first ``skip`` ones (DistributedSampler:
    the permutation depends on (seed, epoch) only, so a resumed run sees the same order)."""
    from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)  # the per-epoch view draw of the study datasets
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


@torch.no_grad()
def validation_recon(model, cfg: PretrainConfig, mcfg, manifest: dict, device, rank: int = 0,
                     world: int = 1) -> float | None:
    """Mean reconstruction loss (per image, over its masked patches) over the first
    ``cfg.val_batches`` batches of the validate split: centre-resized images, masks from a
    generator seeded with cfg.seed, so every epoch scores the same masked inputs.
    None when the cache has no validate images or val_batches is 0."""
    from fastssl.data.augment import CenterResize
    from fastssl.data.datasets import SingleViewDataset

    data = SingleViewDataset(cfg.cache, split="validate", views="all")
    n = min(len(data), cfg.val_batches * cfg.batch_size)
    if n == 0:
        return None
    mean, std = _normalisation(cfg, manifest)
    center = CenterResize(out_size=mcfg.img_size, mean=mean, std=std)
    generator = torch.Generator(device).manual_seed(cfg.seed + 7919 * rank)
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for lo in range(rank * cfg.batch_size, n, world * cfg.batch_size):
        images, _, _, views = data.get_batch(np.arange(lo, min(lo + cfg.batch_size, n)))
        x = center(images.to(device))
        out = model.reconstruct(x, views.to(device), cfg.mask_ratio, generator)
        loss = model.recon_loss(out["pred"], x, out["mask"]).double()
        total += torch.stack([loss * x.shape[0], loss.new_tensor(float(x.shape[0]))])
    total = fdist.all_reduce_sum(total)
    model.train(was_training)
    return float(total[0] / total[1])


class MetricsLog:
    """Where the records go: metrics.jsonl and metrics.csv (columns CSV_FIELDS), TensorBoard
    event files under ``tb/`` when ``tensorboard`` is installed, and the user's callbacks.
    Only rank 0 writes (``enabled``)."""

    def __init__(self, out: str, step: int, callbacks=(), enabled: bool = True):
        self.jsonl, self.csv = os.path.join(out, METRICS), os.path.join(out, METRICS_CSV)
        self.callbacks, self.enabled, self.last, self.tb = list(callbacks or ()), enabled, {}, None
        if not enabled:
            return
        truncate_metrics(self.jsonl, step)  # drop what a killed run logged after its checkpoint
        self._rewrite_csv()
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # the optional extra: metrics.csv and metrics.jsonl still hold everything
            return
        self.tb = SummaryWriter(os.path.join(out, "tb"), purge_step=step or None)

    def _rewrite_csv(self) -> None:
        from fastssl.jobs import read_jsonl

        rows = read_jsonl(self.jsonl)
        atomic_write_text(self.csv, ",".join(CSV_FIELDS) + "\n" + "".join(map(self._csv_line, rows)))

    @staticmethod
    def _csv_line(rec: dict) -> str:
        return ",".join("" if rec.get(k) is None else repr(rec[k]) for k in CSV_FIELDS) + "\n"

    def __call__(self, rec: dict) -> None:
        self.last.update(rec)
        if not self.enabled:
            return
        with open(self.jsonl, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(rec) + "\n")
        with open(self.csv, "a", encoding="utf-8") as handle:
            handle.write(self._csv_line(rec))
        if self.tb is not None:
            for k, v in rec.items():
                if k not in ("step", "epoch") and v is not None:
                    self.tb.add_scalar(k, v, rec["step"])
            self.tb.flush()
        for callback in self.callbacks:
            callback(dict(rec))
        if "loss" in rec:
            log.info("step %d loss %.4f recon %.4f align %.4g beta %.3f lr %.2e %.0f img/s", rec["step"],
                     rec["loss"], rec["recon"], rec["align"], rec["beta"], rec["lr"], rec["imgs_per_s"])
        else:
            log.info("epoch %d val_recon %.4f", rec["epoch"], rec["val_recon"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


@dataclass
class _Run:
    """What main sets up once: the process, data, schedule, model and optimiser state."""

    cfg: PretrainConfig
    mcfg: object
    rank: int
    world: int
    device: torch.device
    dataset: object
    steps_per_epoch: int
    sched: Schedule
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: object
    generator: torch.Generator

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def path(self, name: str) -> str:
        return os.path.join(self.cfg.out, name)


def _schedule(cfg: PretrainConfig, steps_per_epoch: int, world: int) -> Schedule:
    total = steps_per_epoch * cfg.epochs
    ramp_epochs = cfg.epochs if cfg.beta_ramp_epochs < 0 else cfg.beta_ramp_epochs
    if cfg.warmup_epochs >= cfg.epochs:
        log.warning("warmup_epochs=%g >= epochs=%d: the run ends inside the warm-up (the lr never "
                    "reaches its peak%s)", cfg.warmup_epochs, cfg.epochs,
                    "; the released beta never starts annealing" if cfg.beta_schedule == "released" else "")
    return Schedule(lr=cfg.base_lr * cfg.batch_size * world / 256, min_lr=cfg.min_lr,
                    warmup_steps=round(cfg.warmup_epochs * steps_per_epoch), total_steps=total,
                    beta_max=cfg.beta_max if cfg.mode in ("paired", "flu") else 0.0,
                    ramp_steps=round(ramp_epochs * steps_per_epoch), steepness=cfg.beta_steepness,
                    steps_per_epoch=steps_per_epoch, per_epoch=cfg.lr_per_epoch,
                    warmup_start=cfg.warmup_start, beta_released=cfg.beta_schedule == "released")


def _setup(cfg: PretrainConfig) -> _Run:
    mcfg = cfg.model_config()
    info = fdist.init()  # alone (rank 0 of 1) without torchrun / SLURM variables
    rank, world = info.rank, info.world_size
    device = fdist.pick_device(cfg.device, info.local_rank)
    os.makedirs(cfg.out, exist_ok=True)
    dataset = _datasets(cfg)
    steps_per_epoch = len(dataset) // (cfg.batch_size * world)
    if steps_per_epoch < 1:
        raise ValueError(f"the train split of {cfg.cache} has {len(dataset)} {cfg.mode} samples: fewer "
                         f"than one global batch of batch_size={cfg.batch_size} x world={world}")
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = (MultiViewMAE(mcfg, impl=cfg.impl) if cfg.mode != "supervised" else SupervisedViT(mcfg)).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.decay_all),
                                  lr=cfg.base_lr, betas=(cfg.beta1, cfg.beta2),
                                  fused=device.type == "cuda")  # one kernel per step on the GPU
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.amp == "fp16")
    generator = torch.Generator(device).manual_seed(cfg.seed * 1000 + rank)
    return _Run(cfg, mcfg, rank, world, device, dataset, steps_per_epoch,
                _schedule(cfg, steps_per_epoch, world), model, optimizer, scaler, generator)


def _write_plots(cfg: PretrainConfig) -> None:
    """The run's PNGs beside its outputs (fastssl.plots; a missing matplotlib is logged)."""
    from fastssl.plots import write_run_plots

    for path in write_run_plots(cfg.out, cfg.cache):
        print(f"pretrain: plot -> {path}")


def _compiles(cfg: PretrainConfig, device: torch.device) -> bool:
    """The model is compiled on CUDA unless --no-compile (the ops are custom ops with fake
    implementations, so the graph does not break); on the CPU the step runs eager."""
    return cfg.compile and device.type == "cuda"


def _fingerprint(cfg: PretrainConfig, world: int):
    """The run's identity: result-affecting settings (resolved, + world size) and the cache's
    index, manifest and shards (size + sampled-block sha256; every byte with verify_data)."""
    from fastssl.jobs import JobFingerprint, fingerprint_files

    settings = {k: v for k, v in asdict(cfg).items() if k not in _NOT_IDENTITY}
    settings["world_size"] = world
    names = sorted(n for n in os.listdir(cfg.cache)
                   if n in ("index.csv", "manifest.json") or (n.startswith("shard_") and n.endswith(".npy")))
    inputs = fingerprint_files([os.path.join(cfg.cache, n) for n in names], full=cfg.verify_data)
    return JobFingerprint("pretrain", settings, inputs)


def _resume(run: _Run) -> int:
    """Loads out/checkpoint.pt (its sha256 checked) into the run; returns the step reached (0: fresh)."""
    from fastssl.jobs import load_checkpoint

    ckpt_path = run.path(CHECKPOINT)
    if not os.path.isfile(ckpt_path):
        return 0
    ckpt = load_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scaler.load_state_dict(ckpt["scaler"])
    run.generator.set_state(ckpt["rng"]["generators"][run.rank])
    torch.set_rng_state(ckpt["rng"]["torch"])
    return int(ckpt["step"])


def _save(run: _Run, step: int) -> None:
    gens = [run.generator.get_state()]
    if run.world > 1:  # every rank's generator, so each resumes its own masks
        gens = [torch.empty_like(gens[0]) for _ in range(run.world)]
        state = run.generator.get_state()
        dist.all_gather(gens, state.to(run.device) if run.device.type == "cuda" else state)
        gens = [g.cpu() for g in gens]
    if run.is_main:
        atomic_torch_save(dict(
            model=run.model.state_dict(), optimizer=run.optimizer.state_dict(), scaler=run.scaler.state_dict(),
            epoch=step // run.steps_per_epoch, step=step, config=asdict(run.cfg), model_config=asdict(run.mcfg),
            rng=dict(torch=torch.get_rng_state(), generators=gens)), run.path(CHECKPOINT))


def _banner(run: _Run, step: int) -> str:
    cfg, mcfg, sched = run.cfg, run.mcfg, run.sched
    n_params = sum(p.numel() for p in run.model.parameters())
    impls = _resolved_impls(run.device, cfg.impl) if cfg.mode != "supervised" else {}
    amp = cfg.amp if run.device.type == "cuda" else "none (CPU)"
    eff_batch = cfg.batch_size * run.world
    if sched.beta_released:
        beta = (f"released SigmoidAnnealing per epoch (start {sched.warmup_steps // run.steps_per_epoch}, "
                f"steepness {cfg.beta_steepness:g}): {sched.beta_at(0):.3f} -> "
                f"{sched.beta_at(sched.total_steps - 1):.3f}")
    else:
        beta = f"0 -> {sched.beta_max} over {sched.ramp_steps} steps (sigmoid)"
    return (f"pretrain: recipe={cfg.recipe} mode={cfg.mode} preset={cfg.preset} img={mcfg.img_size} "
            f"patch={mcfg.patch_size} L={mcfg.num_patches} visible={num_kept(mcfg.num_patches, cfg.mask_ratio)} "
            f"params={n_params / 1e6:.2f}M\n"
            f"  device={run.device} world_size={run.world} amp={amp} compile={_compiles(cfg, run.device)} ops={impls}\n"
            f"  samples={len(run.dataset)} batch/rank={cfg.batch_size} effective_batch={eff_batch}\n"
            f"  steps/epoch={run.steps_per_epoch} total_steps={sched.total_steps} "
            f"warmup_steps={sched.warmup_steps} (from {cfg.warmup_start:g} x lr, "
            f"lr set per {'epoch' if cfg.lr_per_epoch else 'step'}) "
            f"lr={sched.lr:.3e} (base_lr {cfg.base_lr:g} x {eff_batch}/256) min_lr={cfg.min_lr:g}\n"
            f"  wd={cfg.weight_decay} ({'all params' if cfg.decay_all else 'not on norms/biases/embeddings'}) "
            f"betas=({cfg.beta1}, {cfg.beta2}) clip={cfg.clip_grad} augment={cfg.augment and cfg.augment_style}\n"
            f"  target={mcfg.target} recon={mcfg.recon_reduction} qk_norm={mcfg.qk_norm} "
            f"decoder={mcfg.decoder_dim}x{mcfg.decoder_depth} init={mcfg.init} "
            f"align={mcfg.align if cfg.mode in ('paired', 'flu') else '-'} beta: {beta}"
            + (f"\n  resuming at step {step} (epoch {step // run.steps_per_epoch})" if step else ""))


def _train(run: _Run, net, step: int, logger: MetricsLog, manifest: dict) -> tuple[int, bool]:
    """The epochs from ``step`` on: train, checkpoint, validate; returns (step, stopped).
    ``manifest``: the cache's manifest.json (dict), read once per run by the caller."""
    cfg, spe = run.cfg, run.steps_per_epoch
    augment = _augment(cfg, run.mcfg, manifest)
    start_step = step

    def on_step(s: int) -> bool:
        stop = cfg.stop_after_steps > 0 and s - start_step >= cfg.stop_after_steps
        if s % cfg.ckpt_every == 0 or s % spe == 0 or stop:
            _save(run, s)
        return stop

    for epoch in range(step // spe, cfg.epochs):
        loader = _loader(run.dataset, cfg, epoch, step - epoch * spe, run.rank, run.world,
                         run.device.type == "cuda")
        if cfg.progress and run.is_main:
            from tqdm import tqdm

            loader = tqdm(loader, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True,
                          disable=None)  # disable=None: off when not a terminal
        step, stopped = train_one_epoch(net, loader, run.optimizer, run.scaler, run.sched, cfg, epoch=epoch,
                                        step=step, augment=augment, device=run.device,
                                        generator=run.generator, on_step=on_step, log_fn=logger)
        if stopped:
            return step, True
        if cfg.mode != "supervised" and cfg.val_batches > 0:
            val = validation_recon(run.model, cfg, run.mcfg, manifest, run.device, run.rank, run.world)
            if val is not None:
                logger(dict(step=step, epoch=epoch, val_recon=val))
    return step, False


def main(cfg: PretrainConfig, callbacks=()) -> dict:
    """Runs (or resumes, or recognises as finished) a pretraining job.

    Args:
        cfg: the settings; None fields take the recipe's values (``cfg.resolved()``).
        callbacks: callables, each called on rank 0 with every metrics record (a dict:
            the training window's means, or ``{step, epoch, val_recon}`` after an epoch).
    Returns:
        A summary dict: step, total_steps, finished, stopped, out, metrics (last values).
    """
    from fastssl.jobs import open_job

    cfg = cfg.resolved()
    run = _setup(cfg)
    # rank 0 checks out/job.json against this run (a different run is refused, naming the
    # differences, unless --overwrite); --no-resume starts over in this --out
    with open_job(cfg.out, lambda: _fingerprint(cfg, run.world), overwrite=cfg.overwrite,
                  restart=not cfg.resume, rank=run.rank, world=run.world):
        return _run_locked(run, callbacks)


def _run_locked(run: _Run, callbacks) -> dict:
    from fastssl.jobs import verify_safetensors

    cfg = run.cfg
    step = _resume(run)
    total, enc_path = run.sched.total_steps, run.path(ENCODER)
    if step >= total and verify_safetensors(enc_path):
        if run.is_main:
            print(f"pretrain: {cfg.out} is finished ({step} of {total} steps); nothing to do")
        return dict(step=step, total_steps=total, finished=True, stopped=False, out=cfg.out, metrics=None)
    if run.is_main:  # config.json: the resolved settings, usable as --config (keys = flags)
        settings = {k: v for k, v in asdict(cfg).items() if k != "progress"}
        atomic_write_text(run.path("config.json"), json.dumps(settings, indent=2))
        if cfg.progress:  # --quiet: no start banner (results are still printed)
            print(_banner(run, step))
    net = torch.compile(run.model) if _compiles(cfg, run.device) else run.model
    if run.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    from fastssl.data.cache import read_manifest

    manifest = read_manifest(cfg.cache)  # once per run: training, validation and the export's normalisation
    logger = MetricsLog(cfg.out, step, callbacks, enabled=run.is_main)
    try:
        step, stopped = _train(run, net, step, logger, manifest)
    finally:
        logger.close()
    finished = step >= total
    if finished and run.is_main:  # (also re-exports an encoder.safetensors that fails verification)
        mean, std = _normalisation(cfg, manifest)  # what training fed the encoder
        export_encoder(run.model.encoder, run.mcfg, enc_path, manifest=dict(pixel_mean=mean, pixel_std=std))
        print(f"pretrain: done, {step} steps; encoder -> {enc_path}")
        if cfg.plots:
            _write_plots(cfg)
    elif run.is_main:
        print(f"pretrain: stopped at step {step} of {total}; rerun the same command to continue")
    return dict(step=step, total_steps=total, finished=finished, stopped=stopped, out=cfg.out,
                metrics=logger.last)


# ------------------------------------------------------------------------------ CLI
SETTINGS = PretrainConfig   # the dataclass declaring this command's settings (fastssl.config)


def _recipe_flags(parser: argparse.ArgumentParser) -> list[str]:
    """Flags for the fields whose default is None (the recipe's value): same names, help and
    choices as the dataclass fields, default None so that the recipe fills what is not given."""
    helps, choices = field_help(PretrainConfig), declared_choices(PretrainConfig)
    kinds = {"str": str, "int": int, "float": float, "bool": bool}
    names = []
    for f in fields(PretrainConfig):
        if f.default is not None:
            continue
        kind = kinds[str(f.type).split("|")[0].strip()]
        flag = "--" + f.name.replace("_", "-")
        help_ = helps.get(f.name, f.name) + " (default: the recipe's)%(default).0s"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            parser.add_argument(flag, type=kind, default=None, help=help_, choices=choices.get(f.name))
        names.append(f.name)
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # --progress is not a flag: --quiet (added by the router) switches the bar off.
    # Types, choices, ranges and help come from PretrainConfig (declared once there).
    recipe_fields = _recipe_flags(parser)
    add_dataclass_arguments(parser, PretrainConfig, required=("cache",), skip=("progress", *recipe_fields))


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(PretrainConfig, args)
    try:
        summary = main(cfg)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0 if summary["finished"] or summary["stopped"] else 1
