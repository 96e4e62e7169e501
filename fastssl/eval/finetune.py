"""``fastssl finetune``: full fine-tuning of an encoder with a linear head on CLS, scored per study.

Protocol (the released MVMAE ensemble classifier, agostini335/MVMAE
``classifiers/Classifiers.py`` EnsembleClassifier + ``config/eval/MimicEvalConfig.py``):

* every image of a study goes through the encoder (with its view embedding); a linear
  head on the CLS feature gives per-image logits (B_img, 14); a study's logits are the
  mean over its images, in training *and* evaluation; the loss is BCE-with-logits on the
  study logits (entries labelled -1, uncertain or blank under the cache's label policy,
  are ignored). The released code takes one image per view slot (frontal, lateral,
  unknown); here every image of the study counts, as in ``fastssl probe``.
* AdamW over every parameter (weight decay 0.05 on all, as released), lr = base_lr (5e-5)
  x batch / 256 with batch counted in studies; per epoch a linear warm-up from 0.5 x lr
  (torch LinearLR(start_factor=0.5) over ``warmup_epochs``) then a cosine to 0 over the
  remaining epochs (CosineAnnealingLR). Optional layer-wise lr decay (``--layer-decay``,
  not in the released code): the head and final norm get lr, block i of L gets
  lr x decay^(L - i), the embeddings lr x decay^(L + 1).
* after every epoch the validation split's macro AUROC (study level) is computed; the best
  epoch's weights (``best.pt``) are the model that is scored on the test split.

Files in ``out``: job.json (the run's fingerprint, fastssl.jobs), config.json, metrics.jsonl (one line per epoch: epoch, step, train_loss,
val_macro_auroc, lr, seconds), checkpoint.pt (last epoch: model, optimizer, history),
best.pt (model weights of the best validation epoch), and at the end finetune.json
(settings, best epoch, test AUROC with patient-cluster CIs), scores.csv, roc.png.

Resume: rerunning the same command continues after the last finished epoch (the batch
order and augmentations of an epoch depend only on (seed, epoch), so an interrupted run
ends with the same weights as an uninterrupted one); a finished run says so and stops.
A different run in ``out`` (other settings, cache or encoder) is refused, naming the
differences, unless ``--overwrite``; checkpoints carry sha256 sidecars; one job at a time
holds ``out`` (fastssl.jobs.OutputLock).
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

import numpy as np
import torch

from fastssl.config import COMMAND_RANGES, check_ranges
from fastssl.eval.probe import (
    eval_transform, extract_features, load_eval_encoder, pick_device, split_dataset, study_logits, train_dataset,
)
from fastssl.eval.stats import macro_auroc

__all__ = ["FinetuneConfig", "StudyBatches", "StudyClassifier", "epoch_lr", "param_groups",
           "train_one_epoch", "evaluate", "main", "add_arguments", "run"]

log = logging.getLogger(__name__)

CHECKPOINT, BEST, METRICS, RESULT = "checkpoint.pt", "best.pt", "metrics.jsonl", "finetune.json"
# Settings that change no result: a resume may differ in them (fastssl.jobs fingerprint).
_NOT_RESULT_KEYS = ("out", "eval_batch_size", "device", "stop_after_epochs", "plots",
                    "progress", "overwrite")


@dataclass
class FinetuneConfig:
    """Every setting of a fine-tuning run (the CLI's flags)."""

    cache: str = ""               # a `fastssl prepare` cache directory
    checkpoint: str = ""          # encoder.safetensors / checkpoint.pt, or random:PRESET[:IMG[:PATCH]] (train from scratch)
    out: str = "runs/finetune"    # output directory (rerun the same command to resume)
    train_split: str = "train"    # split trained on
    val_split: str = "validate"   # split the best epoch is chosen on (macro AUROC)
    test_split: str = "test"      # split the chosen model is scored on
    views: str = "all"            # images used: all, or a comma list of frontal,lateral,other,unknown
    dataset: str = ""             # pooled cache: only these datasets' rows, a comma list (e.g. mimic-cxr; '' = all)
    epochs: int = 100             # released: 100
    warmup_epochs: int = 5        # linear warm-up from 0.5 x lr (released: 5)
    batch_size: int = 64          # studies per step (all their images go through the encoder)
    base_lr: float = 5e-5         # lr = base_lr * batch_size / 256 (released: 5e-5)
    weight_decay: float = 0.05    # AdamW, on every parameter (released)
    layer_decay: float = 1.0      # layer-wise lr decay (1: off, as released; 0.75 is MAE's fine-tuning value)
    clip_grad: float = 1.0        # max global grad norm (0: off)
    augment: bool = True          # random resized crop + rotation + brightness/contrast on train images
    crop_min: float = 0.5         # smallest crop area fraction
    eval_batch_size: int = 256    # images per evaluation batch
    amp: str = "bf16"             # bf16 | none (autocast on CUDA only)
    device: str = "auto"          # auto | cpu | cuda
    seed: int = 0                 # batch order, augmentation, head init and bootstrap seed
    label_fraction: float = 1.0   # keep this fraction (0, 1] of the train studies' labels, drawn by patient
    label_seed: int = 0           # seed of the --label-fraction draw
    n_boot: int = 1000            # bootstrap replicates over test patients (subject_id clusters)
    stop_after_epochs: int = 0    # >0: checkpoint and exit after this many epochs of this invocation
    plots: bool = True            # roc.png (needs matplotlib)
    overwrite: bool = False       # replace a different run found in --out (otherwise refused)
    progress: bool = True         # tqdm bar (only on a terminal)

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "n_boot"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; expected >= 1")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"warmup_epochs={self.warmup_epochs}; expected in [0, epochs={self.epochs})")
        if self.base_lr <= 0 or not 0 < self.layer_decay <= 1:
            raise ValueError(f"base_lr={self.base_lr}, layer_decay={self.layer_decay}; expected > 0, in (0, 1]")
        if self.amp not in ("bf16", "none"):
            raise ValueError(f"amp={self.amp!r}; expected bf16 | none")
        check_ranges(self, COMMAND_RANGES["finetune"])   # every numeric flag's range (one-line errors)


# ------------------------------------------------------------------------ the model
class StudyClassifier(torch.nn.Module):
    """A ViewEncoder + a linear head on CLS: images (B, 1, H, W), views (B,) -> (B, C) logits."""

    def __init__(self, encoder: torch.nn.Module, num_labels: int = 14):
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(encoder.cfg.embed_dim, num_labels)
        torch.nn.init.normal_(self.head.weight, std=0.01)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(images, views))


def _layer_id(name: str, depth: int) -> int:
    """0 for the embeddings, i + 1 for block i, depth + 1 for the final norm and the head."""
    if name.startswith("encoder.vit.blocks."):
        return int(name.split(".")[3]) + 1
    if name.startswith(("encoder.vit.norm", "head")):
        return depth + 1
    return 0


def param_groups(model: StudyClassifier, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups, one per layer depth: lr x layer_decay^(depth + 1 - layer id), weight
    decay on every parameter (as the released classifier)."""
    depth = model.encoder.cfg.depth
    groups: dict[int, list] = {}
    for name, p in model.named_parameters():
        groups.setdefault(_layer_id(name, depth), []).append(p)
    return [dict(params=ps, lr=lr * layer_decay ** (depth + 1 - k), lr_scale=layer_decay ** (depth + 1 - k),
                 weight_decay=weight_decay) for k, ps in sorted(groups.items())]


def epoch_lr(epoch: int, lr: float, warmup: int, epochs: int) -> float:
    """The released per-epoch schedule: LinearLR(start_factor=0.5, total_iters=warmup),
    then CosineAnnealingLR(T_max=epochs - warmup, eta_min=0)."""
    if epoch < warmup:
        return lr * (0.5 + 0.5 * epoch / warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))


# ------------------------------------------------------------------------- the data
class StudyBatches:
    """Batches of whole studies over a SingleViewDataset: every image of each study.

    ``batch(studies)`` with studies (B,) indices into ``dataset.study_ids`` -> images
    (n, 1, S, S), views (n,), group (n,) the batch position of each image's study,
    labels (B, C) int8 (the study's labels)."""

    def __init__(self, dataset):
        self.dataset = dataset
        order = np.argsort(dataset.study_index, kind="stable")
        self.order = order
        counts = np.bincount(dataset.study_index, minlength=len(dataset.study_ids))
        self.ptr = np.concatenate([[0], np.cumsum(counts)])
        self.n_studies = int(len(dataset.study_ids))

    def batch(self, studies: np.ndarray):
        starts, ends = self.ptr[studies], self.ptr[studies + 1]
        idx = np.concatenate([self.order[a:b] for a, b in zip(starts, ends)])
        group = np.repeat(np.arange(len(studies)), ends - starts)
        images, labels, _, views = self.dataset.get_batch(idx)
        first = np.concatenate([[0], np.cumsum(ends - starts)[:-1]])
        return images, views, torch.from_numpy(group), labels[torch.from_numpy(first)]

    def epoch(self, batch_size: int, seed: int, epoch: int):
        """The shuffled batches of ``epoch`` (full batches only; order from (seed, epoch))."""
        perm = np.random.default_rng([seed, epoch]).permutation(self.n_studies)
        for k in range(self.n_studies // batch_size):
            yield self.batch(perm[k * batch_size:(k + 1) * batch_size])


def mean_by_group(logits: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """(n, C) per-image logits, (n,) group ids -> (n_groups, C) per-group means."""
    sums = logits.new_zeros(n_groups, logits.shape[1]).index_add_(0, group, logits)
    counts = torch.bincount(group, minlength=n_groups).clamp(min=1).to(logits.dtype)
    return sums / counts[:, None]


# ------------------------------------------------------------------------- the loop
def train_one_epoch(model, batches: StudyBatches, optimizer, cfg: FinetuneConfig, *, epoch: int, lr: float,
                    augment, device, progress: bool = False) -> tuple[float, int]:
    """One epoch over the train studies at learning rate ``lr`` (times each group's
    lr_scale). -> (mean study-level BCE, optimizer steps)."""
    from fastssl.models.mvmae import masked_bce

    model.train()
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    generator = torch.Generator(device).manual_seed(cfg.seed * 100_003 + epoch)
    use_amp = device.type == "cuda" and cfg.amp == "bf16"
    losses = []
    it = batches.epoch(cfg.batch_size, cfg.seed, epoch)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=batches.n_studies // cfg.batch_size, desc=f"epoch {epoch}", leave=False, disable=None)
    for images, views, group, labels in it:
        x = augment(images.to(device), generator)
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
        with ctx:
            logits = model(x, views.to(device)).float()
        study = mean_by_group(logits, group.to(device), labels.shape[0])
        loss = masked_bce(study, labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        optimizer.step()
        losses.append(loss.detach())
    if not losses:
        raise ValueError(f"split {cfg.train_split!r} has {batches.n_studies} studies: fewer than one batch "
                         f"of batch_size={cfg.batch_size}")
    mean = float(torch.stack(losses).mean())
    if not math.isfinite(mean):
        raise FloatingPointError(f"train loss is {mean} in epoch {epoch}; lower --base-lr")
    return mean, len(losses)


def evaluate(model, dataset, transform, cfg: FinetuneConfig, device) -> tuple[np.ndarray, np.ndarray]:
    """Study-level logits and labels of a split: (S, C), (S, C), studies in sorted order."""
    out = extract_features(model, dataset, transform, batch_size=cfg.eval_batch_size, device=device)
    return study_logits(out["features"], out["labels"], out["study_index"])


# ------------------------------------------------------------------------------ job
def _fingerprint(cfg: FinetuneConfig):
    """The run's identity (fastssl.jobs): every result-affecting setting, the cache index
    and manifest, and the encoder file."""
    from fastssl.jobs import JobFingerprint, fingerprint_files

    settings = {k: v for k, v in asdict(cfg).items() if k not in _NOT_RESULT_KEYS}
    inputs = [os.path.join(cfg.cache, name) for name in ("index.csv", "manifest.json")]
    if not cfg.checkpoint.startswith("random:"):
        inputs.append(cfg.checkpoint)
    return JobFingerprint("finetune", settings, fingerprint_files(inputs))


def _resume(cfg: FinetuneConfig, model, optimizer) -> dict:
    """Claims out/ for this run (a different run there is refused unless --overwrite) and
    loads out/checkpoint.pt when present -> the state to continue from: dict(epoch
    (finished epochs), step, best_auroc, best_epoch)."""
    from fastssl.jobs import check_resume, clear_outputs, load_checkpoint, remove_stale_tmp, truncate_jsonl
    from fastssl.jobs import write_fingerprint

    remove_stale_tmp(cfg.out)
    fp = _fingerprint(cfg)
    path = os.path.join(cfg.out, CHECKPOINT)
    if check_resume(cfg.out, fp, overwrite=cfg.overwrite) == "new":
        clear_outputs(cfg.out)
        write_fingerprint(cfg.out, fp)
    if not os.path.isfile(path):
        return dict(epoch=0, step=0, best_auroc=-math.inf, best_epoch=-1)
    ckpt = load_checkpoint(path)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    done = int(ckpt["state"]["epoch"])
    truncate_jsonl(os.path.join(cfg.out, METRICS), lambda rec: rec["epoch"] < done)
    return dict(ckpt["state"])


def _setup(cfg: FinetuneConfig):
    """Model, optimizer, datasets and transforms of a run (nothing read from out/ yet)."""
    from fastssl.data.augment import BatchAugment

    device = pick_device(cfg.device)
    encoder = load_eval_encoder(cfg.checkpoint, cfg.seed)
    torch.manual_seed(cfg.seed)  # the head's initial weights
    model = StudyClassifier(encoder).to(device)
    data = {name: split_dataset(cfg, split) for name, split in (("val", cfg.val_split), ("test", cfg.test_split))}
    data["train"], data["label_fraction"] = train_dataset(cfg)
    if len(data["train"].study_ids) < cfg.batch_size:
        raise ValueError(f"split {cfg.train_split!r} has {len(data['train'].study_ids)} studies (label fraction "
                         f"{cfg.label_fraction:g}): fewer than one batch of batch_size={cfg.batch_size}; "
                         "lower --batch-size")
    lr = cfg.base_lr * cfg.batch_size / 256
    optimizer = torch.optim.AdamW(param_groups(model, lr, cfg.weight_decay, cfg.layer_decay), lr=lr)
    transform = eval_transform(cfg.cache, encoder.cfg.img_size, cfg.checkpoint)
    if cfg.augment:
        augment = BatchAugment(out_size=encoder.cfg.img_size, scale=(cfg.crop_min, 1.0), mean=transform.mean,
                               std=transform.std)
    else:
        augment = lambda x, generator=None: transform(x)  # noqa: E731
    return device, model, optimizer, lr, data, transform, augment


def _save(cfg: FinetuneConfig, model, optimizer, state: dict) -> None:
    from fastssl.jobs import save_checkpoint

    save_checkpoint(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), state=state,
                           config=asdict(cfg), model_config=asdict(model.encoder.cfg)),
                      os.path.join(cfg.out, CHECKPOINT))


def _train(cfg: FinetuneConfig, device, model, optimizer, lr, data, transform, augment, state: dict) -> bool:
    """Epochs from state["epoch"] on; after each: validation AUROC, best.pt, checkpoint,
    metrics line. Returns True when all epochs are done (False: stopped early)."""
    from fastssl.jobs import save_checkpoint

    batches = StudyBatches(data["train"])
    start = state["epoch"]
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        lr_e = epoch_lr(epoch, lr, cfg.warmup_epochs, cfg.epochs)
        loss, steps = train_one_epoch(model, batches, optimizer, cfg, epoch=epoch, lr=lr_e, augment=augment,
                                      device=device, progress=cfg.progress)
        val = macro_auroc(*evaluate(model, data["val"], transform, cfg, device))[1]
        state.update(epoch=epoch + 1, step=state["step"] + steps)
        if val > state["best_auroc"]:
            state.update(best_auroc=val, best_epoch=epoch)
            save_checkpoint(model.state_dict(), os.path.join(cfg.out, BEST))
        _save(cfg, model, optimizer, state)
        rec = dict(epoch=epoch, step=state["step"], train_loss=loss, val_macro_auroc=val, lr=lr_e,
                   seconds=round(time.perf_counter() - t0, 2))
        with open(os.path.join(cfg.out, METRICS), "a", encoding="utf-8") as handle:
            handle.write(json.dumps(rec) + "\n")
        log.info("finetune: epoch %d/%d loss %.4f val macro AUROC %.4f (best %.4f, epoch %d) lr %.2e",
                 epoch + 1, cfg.epochs, loss, val, state["best_auroc"], state["best_epoch"] + 1, lr_e)
        if cfg.stop_after_epochs and epoch + 1 - start >= cfg.stop_after_epochs and epoch + 1 < cfg.epochs:
            return False
    return True


def _score(cfg: FinetuneConfig, device, model, data, transform, state: dict) -> dict:
    """The best epoch's model on the test split -> finetune.json, scores.csv, roc.png."""
    from fastssl.data.mimic import CHEXPERT_LABELS
    from fastssl.eval.report import auroc_summary, plot_roc, study_table, write_json, write_scores_csv

    from fastssl.jobs import load_checkpoint

    model.load_state_dict(load_checkpoint(os.path.join(cfg.out, BEST)))
    test = data["test"]
    scores, labels = evaluate(model, test, transform, cfg, device)
    studies, subjects = study_table(test, test.study_index)
    names = list(CHEXPERT_LABELS)
    result = dict(checkpoint=cfg.checkpoint, cache=os.path.abspath(cfg.cache), config=asdict(cfg),
                  best_epoch=state["best_epoch"], val_macro_auroc=state["best_auroc"],
                  n_train_studies=len(data["train"].study_ids), n_test_images=len(test),
                  label_fraction=data["label_fraction"],
                  **auroc_summary(scores, labels, subjects, names, n_boot=cfg.n_boot, seed=cfg.seed))
    write_scores_csv(os.path.join(cfg.out, "scores.csv"), studies, subjects, scores, labels, names)
    if cfg.plots:
        plot_roc(os.path.join(cfg.out, "roc.png"), scores, labels, names, title="fine-tuned, test studies")
    write_json(os.path.join(cfg.out, RESULT), result)
    return result


def main(cfg: FinetuneConfig) -> dict:
    """Runs, resumes or recognises as finished a fine-tuning job, holding out/'s lock.
    Returns the finetune.json dict when finished (plus finished=True), else
    dict(finished=False, epoch)."""
    from fastssl.jobs import OutputLock

    cfg.validate()
    device, model, optimizer, lr, data, transform, augment = _setup(cfg)
    os.makedirs(cfg.out, exist_ok=True)
    with OutputLock(cfg.out):
        state = _resume(cfg, model, optimizer)
        return _run(cfg, state, device, model, optimizer, lr, data, transform, augment)


def _run(cfg: FinetuneConfig, state: dict, device, model, optimizer, lr, data, transform, augment) -> dict:
    from fastssl.jobs import atomic_write_json

    result_path = os.path.join(cfg.out, RESULT)
    if state["epoch"] >= cfg.epochs and os.path.isfile(result_path):
        with open(result_path, encoding="utf-8") as handle:
            log.info("finetune: %s is finished; nothing to do", cfg.out)
            return dict(json.load(handle), finished=True)
    atomic_write_json(os.path.join(cfg.out, "config.json"), asdict(cfg))
    log.info("finetune: %d train / %d val / %d test studies, batch %d studies, lr %.3e (base %g x %d/256), "
             "layer decay %g, %d epochs (warm-up %d)%s", len(data["train"].study_ids), len(data["val"].study_ids),
             len(data["test"].study_ids), cfg.batch_size, lr, cfg.base_lr, cfg.batch_size, cfg.layer_decay,
             cfg.epochs, cfg.warmup_epochs, f", resuming after epoch {state['epoch']}" if state["epoch"] else "")
    if not _train(cfg, device, model, optimizer, lr, data, transform, augment, state):
        return dict(finished=False, epoch=state["epoch"])
    return dict(_score(cfg, device, model, data, transform, state), finished=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fastssl.config import add_dataclass_arguments

    add_dataclass_arguments(parser, FinetuneConfig, required=("cache", "checkpoint"), skip=("progress",),
                            choices=dict(amp=("bf16", "none")))


def run(args: argparse.Namespace) -> int:
    from fastssl.config import config_from_args
    from fastssl.eval.report import run_job, summary_lines

    cfg = config_from_args(FinetuneConfig, args)
    r = run_job(main, cfg)
    if r is None:
        return 2
    if not r["finished"]:
        print(f"finetune: stopped after epoch {r['epoch']} of {cfg.epochs}; rerun the same command to continue")
        return 0
    print("\n".join([f"finetune: best epoch {r['best_epoch'] + 1} (validation macro AUROC "
                     f"{r['val_macro_auroc']:.4f}), {r['n_test_studies']} test studies"
                     + (f" of {cfg.dataset}" if cfg.dataset.strip() else ""), *summary_lines(r),
                     f"  -> {cfg.out}/finetune.json, scores.csv" + (", roc.png" if cfg.plots else "")]))
    return 0
