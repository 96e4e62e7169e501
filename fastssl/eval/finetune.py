"""``fastssl finetune``: fine-tuning of an encoder with a linear head on CLS, scored per study.

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
* fp32 and no gradient clipping, as released (``--precision bf16`` and ``--clip-grad``
  are options). The train transform is the released one, the same as its pretraining
  (fastssl.data.augment.mvmae_train_augment: crop 0.5-1 at 1:1, flip, jitter p 0.8),
  normalised with the encoder's training mean/std; evaluation resizes the whole image.
* ``--mode linear`` is what the released code calls linear probing (freeze_encoder):
  the encoder's weights are frozen, the linear head is trained with the same optimizer
  and schedule. (``fastssl probe`` is a different probe: L-BFGS on fixed features.)
* after every epoch the validation split's macro AUROC (study level) is computed; the best
  epoch's weights (``best.pt``) are the model that is scored on the test split.
  When validation is empty, has fewer than ``--min-val-studies`` studies or no label with
  both classes, the epoch is chosen by ``--cv-folds`` patient-grouped folds of train
  instead: one resumable run per fold in ``out/cv/fold_K`` (trains on the other folds,
  validates on its own, saves its per-epoch study scores), then the run on all of train
  keeps the epoch with the best mean fold macro AUROC (one warning line; recorded in
  finetune.json ``epoch_selection``); F1 thresholds then come from the out-of-fold scores.

Files in ``out``: job.json (the run's fingerprint, fastssl.jobs), config.json, metrics.jsonl (one line per epoch: epoch, step, train_loss,
val_macro_auroc, lr, seconds), checkpoint.pt (last epoch: model, optimizer, history),
best.pt (model weights of the best validation epoch), and at the end finetune.json
(settings, best epoch, test AUROC, AUPRC, F1 at thresholds chosen on validation and
Brier score with patient-cluster CIs), scores.csv, roc.png, reliability.png.

Resume: rerunning the same command continues after the last finished epoch (the batch
order and augmentations of an epoch depend only on (seed, epoch), so an interrupted run
ends with the same weights as an uninterrupted one); a finished run says so and stops.
A different run in ``out`` (other settings, cache or encoder) is refused, naming the
differences, unless ``--overwrite``; checkpoints carry sha256 sidecars; one job at a time
holds ``out`` (fastssl.jobs.open_job).
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

from fastssl.config import COUNT, NONNEG, POSITIVE, SEED, Range, check_settings, setting
from fastssl.distributed import check_device
from fastssl.eval.probe import (
    eval_transform, extract_features, load_eval_encoder, optional_split, patient_folds, pick_device, restrict_studies,
    split_dataset, study_logits, train_dataset, validation_usable,
)
from fastssl.eval.stats import macro_auroc

__all__ = ["FinetuneConfig", "StudyBatches", "StudyClassifier", "epoch_lr", "param_groups",
           "train_one_epoch", "evaluate", "main", "add_arguments", "run"]

log = logging.getLogger(__name__)

CHECKPOINT, BEST, METRICS, RESULT = "checkpoint.pt", "best.pt", "metrics.jsonl", "finetune.json"
FOLD_SCORES = "fold_scores.npz"  # a fold run's validation study scores of every epoch (cross-validation)
# Settings that change no result: a resume may differ in them (fastssl.jobs fingerprint).
_NOT_RESULT_KEYS = ("out", "eval_batch_size", "device", "workers", "stop_after_epochs", "plots",
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
    epochs: int = setting(100, range=COUNT)             # released: 100
    warmup_epochs: int = setting(5, range=NONNEG)        # linear warm-up from 0.5 x lr (released: 5); clipped to epochs - 1 with a warning
    batch_size: int = setting(64, range=COUNT)          # studies per step (all their images go through the encoder)
    base_lr: float = setting(5e-5, range=POSITIVE)         # lr = base_lr * batch_size / 256 (released: 5e-5)
    weight_decay: float = setting(0.05, range=Range(0))    # AdamW, on every parameter (released)
    layer_decay: float = setting(1.0, range=Range(0, 1, low_open=True))      # layer-wise lr decay (1: off, as released; 0.75 is MAE's fine-tuning value)
    mode: str = setting("full", choices=("full", "linear"))            # full: encoder + head trained | linear: frozen encoder, trained linear head (released "linear probing")
    clip_grad: float = setting(0.0, range=Range(0))        # max global grad norm (0: off, as released)
    augment: bool = True          # the training transform on train images (off: the evaluation transform)
    augment_style: str = setting("mvmae", choices=("mvmae", "mae"))  # mvmae: released (crop 1:1, flip, jitter p 0.8) | mae: ours (crop 3:4-4:3, rotation, brightness/contrast 0.1)
    crop_min: float = setting(0.5, range=Range(0, 1, low_open=True))         # smallest crop area fraction (released: 0.5)
    eval_batch_size: int = setting(256, range=COUNT)    # images per evaluation batch
    precision: str = setting("fp32", choices=("fp32", "bf16"))       # fp32 (released) | bf16 (autocast, CUDA only)
    device: str = setting("auto", check=check_device)  # torch device
    workers: int = setting(0, range=NONNEG)  # DataLoader processes reading the train batches: 0 = this process, N >= 1 = N loader processes
    seed: int = setting(0, range=SEED)                 # batch order, augmentation, head init and bootstrap seed
    label_fraction: float = setting(1.0, range=Range(0, 1, low_open=True))   # keep this fraction (0, 1] of the train studies' labels, drawn by patient
    label_seed: int = setting(0, range=SEED)           # seed of the --label-fraction draw
    min_val_studies: int = setting(10, range=NONNEG)     # fewer validation studies (or no label with both classes): choose the epoch by cross-validation
    cv_folds: int = setting(5, range=Range(2, integer=True))             # folds (patient-grouped) of that cross-validation on train (one run per fold, in out/cv/)
    cv_fold: int = -1             # internal (no flag): >= 0 is the run of one fold (trains on the others, validates on it)
    n_boot: int = setting(1000, range=COUNT)            # bootstrap replicates over test patients (subject_id clusters)
    stop_after_epochs: int = setting(0, range=NONNEG)    # >0: checkpoint and exit after this many epochs of this invocation
    plots: bool = True            # roc.png (needs matplotlib)
    overwrite: bool = False       # replace a different run found in --out (otherwise refused)
    progress: bool = True         # tqdm bar (only on a terminal)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """ValueError naming the first setting outside its declared range or choices (a field
        changed after construction is checked again here)."""
        check_settings(self)


SETTINGS = FinetuneConfig   # the dataclass declaring this command's settings (fastssl.config)


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


def warmup_used(cfg: FinetuneConfig) -> int:
    """--warmup-epochs clipped to epochs - 1 (the cosine needs one epoch), with a one-line
    warning: the default warm-up of 5 must not make ``--epochs 1..5`` fail."""
    if cfg.warmup_epochs < cfg.epochs:
        return cfg.warmup_epochs
    if cfg.cv_fold < 0:  # the fold runs of a cross-validation clip silently: the main run says it once
        log.warning("finetune: warmup_epochs=%d >= epochs=%d: warm-up clipped to %d epoch(s)", cfg.warmup_epochs,
                    cfg.epochs, cfg.epochs - 1)
    return cfg.epochs - 1


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

    def epoch(self, batch_size: int, seed: int, epoch: int, workers: int = 0):
        """The shuffled batches of ``epoch`` (full batches only; order from (seed, epoch)),
        read by ``workers`` DataLoader processes (0: in this process); the same batches in
        the same order either way (augmentation happens later, in this process)."""
        perm = np.random.default_rng([seed, epoch]).permutation(self.n_studies)
        chunks = [perm[k * batch_size:(k + 1) * batch_size] for k in range(self.n_studies // batch_size)]
        if workers == 0:
            yield from map(self.batch, chunks)
            return
        yield from torch.utils.data.DataLoader(_Chunks(self, chunks), batch_size=None, num_workers=workers,
                                               collate_fn=_as_is)


def _as_is(item):
    """A DataLoader collate that keeps a batch exactly as StudyBatches.batch made it."""
    return item


class _Chunks(torch.utils.data.Dataset):
    """StudyBatches.batch over fixed study chunks, for a DataLoader (item k = chunk k)."""

    def __init__(self, batches: StudyBatches, chunks: list[np.ndarray]):
        self.batches, self.chunks = batches, chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int):
        return self.batches.batch(self.chunks[k])


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
    use_bf16 = device.type == "cuda" and cfg.precision == "bf16"
    losses = []
    it = batches.epoch(cfg.batch_size, cfg.seed, epoch, cfg.workers)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=batches.n_studies // cfg.batch_size, desc=f"epoch {epoch}", leave=False, disable=None)
    for images, views, group, labels in it:
        x = augment(images.to(device), generator)
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
        with ctx:
            logits = model(x, views.to(device)).float()
        study = mean_by_group(logits, group.to(device), labels.shape[0])
        loss = masked_bce(study, labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad > 0:  # off by default: the released fine-tuning does not clip
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
    """Loads out/checkpoint.pt (out/ opened by fastssl.jobs.open_job) when present -> the
    state to continue from: dict(epoch (finished epochs), step, best_auroc, best_epoch)."""
    from fastssl.jobs import load_checkpoint, truncate_jsonl

    path = os.path.join(cfg.out, CHECKPOINT)
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
    device = pick_device(cfg.device)
    encoder = load_eval_encoder(cfg.checkpoint, cfg.seed)
    torch.manual_seed(cfg.seed)  # the head's initial weights
    model = StudyClassifier(encoder).to(device)
    if cfg.mode == "linear":  # the released freeze_encoder: only the head gets gradients
        model.encoder.requires_grad_(False)
    data = dict(val=optional_split(cfg, cfg.val_split), test=split_dataset(cfg, cfg.test_split))
    data["train"], data["label_fraction"] = train_dataset(cfg)
    if cfg.cv_fold >= 0:  # one fold's run: its validation is that fold of train
        data["train"], data["val"] = fold_split(data["train"], cfg.cv_folds, cfg.cv_fold, cfg.seed)
    if len(data["train"].study_ids) < cfg.batch_size:
        raise ValueError(f"split {cfg.train_split!r} has {len(data['train'].study_ids)} studies (label fraction "
                         f"{cfg.label_fraction:g}): fewer than one batch of batch_size={cfg.batch_size}; "
                         "lower --batch-size")
    lr = cfg.base_lr * cfg.batch_size / 256
    optimizer = torch.optim.AdamW(param_groups(model, lr, cfg.weight_decay, cfg.layer_decay), lr=lr)
    transform = eval_transform(cfg.cache, encoder.cfg.img_size, cfg.checkpoint)
    return device, model, optimizer, lr, data, transform, train_transform(cfg, transform)


def fold_split(dataset, k: int, fold: int, seed: int):
    """(the other folds, fold ``fold``) of a SingleViewDataset, by patient-grouped folds
    (fastssl.eval.probe.patient_folds of its studies' subjects)."""
    import copy

    first = np.unique(dataset.study_index, return_index=True)[1]
    held = patient_folds(dataset.index.subject_id[dataset.rows[first]], k, seed) == fold   # (S,)
    return restrict_studies(copy.copy(dataset), ~held), restrict_studies(copy.copy(dataset), held)


def _validation_problem(cfg: FinetuneConfig, val) -> str | None:
    """Why the validation split cannot choose the epoch (probe.validation_usable), or None."""
    if cfg.cv_fold >= 0:
        return None
    if val is None:
        return "is empty"
    return validation_usable(dict(labels=val.index.labels[val.rows], study_index=val.study_index),
                             cfg.min_val_studies)


def _cross_validate_epoch(cfg: FinetuneConfig, why: str) -> dict | None:
    """The epoch chosen by --cv-folds fold runs (out/cv/fold_K, each a resumable finetune
    job that trains on the other folds and validates on its own): the epoch with the best
    mean fold macro AUROC (NaN folds left out; ties to the earlier epoch), and per-label F1
    thresholds from the out-of-fold study scores at that epoch. None while a fold run is
    unfinished (--stop-after-epochs)."""
    from dataclasses import replace

    from fastssl.eval.report import f1_thresholds

    log.warning("finetune: validation split %r %s: epoch chosen by %d-fold cross-validation on train "
                "(patient-grouped, %d extra runs in %s)", cfg.val_split, why, cfg.cv_folds, cfg.cv_folds,
                os.path.join(cfg.out, "cv"))
    curves, scores, labels = [], [], []
    for k in range(cfg.cv_folds):
        sub = replace(cfg, out=os.path.join(cfg.out, "cv", f"fold_{k}"), cv_fold=k, plots=False, n_boot=1)
        if not main(sub)["finished"]:
            return None
        with open(os.path.join(sub.out, METRICS), encoding="utf-8") as handle:
            curves.append([json.loads(line)["val_macro_auroc"] for line in handle])
        with np.load(os.path.join(sub.out, FOLD_SCORES)) as fold:
            scores.append(fold["scores"])
            labels.append(fold["labels"])
    mean = np.nanmean(np.array(curves, dtype=np.float64), axis=0)
    epoch = int(np.nanargmax(mean))
    oof = np.concatenate([s[epoch] for s in scores])
    return dict(chosen_on=f"{cfg.cv_folds}-fold cross-validation on {cfg.train_split}", reason=f"validation split "
                f"{cfg.val_split!r} {why}", epoch=epoch, cv_macro_auroc=[float(v) for v in mean],
                thresholds=f1_thresholds(oof, np.concatenate(labels)))


def train_transform(cfg: FinetuneConfig, transform):
    """The train images' transform, normalised as ``transform`` (the evaluation one, whose
    mean/std are the encoder's): the released MVMAE one (--augment-style mvmae), fastssl's
    MAE-style one (mae), or ``transform`` itself (--no-augment)."""
    from fastssl.data.augment import BatchAugment, mvmae_train_augment

    size, mean, std = transform.out_size, transform.mean, transform.std
    if not cfg.augment:
        return lambda x, generator=None: transform(x)
    if cfg.augment_style == "mvmae":
        return mvmae_train_augment(size, cfg.crop_min, mean=mean, std=std)
    return BatchAugment(out_size=size, scale=(cfg.crop_min, 1.0), mean=mean, std=std)


def _save(cfg: FinetuneConfig, model, optimizer, state: dict) -> None:
    from fastssl.jobs import save_checkpoint

    save_checkpoint(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), state=state,
                           config=asdict(cfg), model_config=asdict(model.encoder.cfg)),
                      os.path.join(cfg.out, CHECKPOINT))


def _train(cfg: FinetuneConfig, device, model, optimizer, lr, data, transform, augment, state: dict,
           warmup: int) -> bool:
    """Epochs from state["epoch"] on (``warmup``: the warm-up epochs used); after each: validation AUROC, best.pt, checkpoint,
    metrics line. Returns True when all epochs are done (False: stopped early)."""
    from fastssl.jobs import save_checkpoint

    batches = StudyBatches(data["train"])
    start = state["epoch"]
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        lr_e = epoch_lr(epoch, lr, warmup, cfg.epochs)
        loss, steps = train_one_epoch(model, batches, optimizer, cfg, epoch=epoch, lr=lr_e, augment=augment,
                                      device=device, progress=cfg.progress)
        val, best = _validate_epoch(cfg, model, data, transform, device, epoch, state)
        state.update(epoch=epoch + 1, step=state["step"] + steps)
        if best:
            state.update(best_auroc=val if data["selection"] is None else data["selection"]["cv_macro_auroc"][epoch],
                         best_epoch=epoch)
            save_checkpoint(model.state_dict(), os.path.join(cfg.out, BEST))
        _save(cfg, model, optimizer, state)
        rec = dict(epoch=epoch, step=state["step"], train_loss=loss, val_macro_auroc=val, lr=lr_e,
                   seconds=round(time.perf_counter() - t0, 2))
        with open(os.path.join(cfg.out, METRICS), "a", encoding="utf-8") as handle:
            handle.write(json.dumps(rec) + "\n")
        log.info("finetune: epoch %d/%d loss %.4f val macro AUROC %s (best %.4f, epoch %d) lr %.2e",
                 epoch + 1, cfg.epochs, loss, "n/a" if val is None else f"{val:.4f}", state["best_auroc"],
                 state["best_epoch"] + 1, lr_e)
        if cfg.stop_after_epochs and epoch + 1 - start >= cfg.stop_after_epochs and epoch + 1 < cfg.epochs:
            return False
    return True


def _validate_epoch(cfg: FinetuneConfig, model, data, transform, device, epoch: int, state: dict):
    """After ``epoch``: (validation macro AUROC or None, whether this epoch's weights are the
    chosen ones). With a cross-validated epoch (data["selection"]) that epoch is chosen and
    nothing is validated; a fold run also appends its fold's study scores to FOLD_SCORES."""
    from fastssl.eval.probe import macro_auroc_or_nan

    if data["selection"] is not None:
        return None, epoch == data["selection"]["epoch"]
    scores, labels = evaluate(model, data["val"], transform, cfg, device)
    if cfg.cv_fold >= 0:
        _append_fold_scores(os.path.join(cfg.out, FOLD_SCORES), scores, labels, epoch)
        val = macro_auroc_or_nan(scores, labels)
        return val, bool(val > state["best_auroc"]) or state["best_epoch"] < 0
    val = macro_auroc(scores, labels)[1]
    return val, val > state["best_auroc"]


def _append_fold_scores(path: str, scores: np.ndarray, labels: np.ndarray, epoch: int) -> None:
    """FOLD_SCORES := scores (epochs, S, C) of epochs 0..epoch (a resumed run keeps the
    first ``epoch`` ones), labels (S, C); atomic."""
    import io

    from fastssl.jobs import atomic_write_bytes

    previous = np.zeros((0,) + scores.shape)
    if epoch > 0 and os.path.isfile(path):
        with np.load(path) as old:
            previous = old["scores"][:epoch]
    data = io.BytesIO()
    np.savez(data, scores=np.concatenate([previous, scores[None]]), labels=labels)
    atomic_write_bytes(path, data.getvalue())


def _score(cfg: FinetuneConfig, device, model, data, transform, state: dict) -> dict:
    """The best epoch's model on the test split -> finetune.json, scores.csv, roc.png."""
    from fastssl.data.mimic import CHEXPERT_LABELS
    from fastssl.eval.report import (
        auroc_summary, f1_thresholds, metrics_summary, plot_reliability, plot_roc, study_table, write_json,
        write_scores_csv,
    )
    from fastssl.jobs import load_checkpoint

    model.load_state_dict(load_checkpoint(os.path.join(cfg.out, BEST)))
    test = data["test"]
    scores, labels = evaluate(model, test, transform, cfg, device)
    selection = data["selection"]
    if selection is None:
        thresholds, source = f1_thresholds(*evaluate(model, data["val"], transform, cfg, device)), cfg.val_split
        selection = dict(chosen_on=cfg.val_split)
    else:
        thresholds, source = selection.pop("thresholds"), f"{selection['chosen_on']} (out-of-fold)"
    studies, subjects = study_table(test, test.study_index)
    names = list(CHEXPERT_LABELS)
    result = dict(checkpoint=cfg.checkpoint, cache=os.path.abspath(cfg.cache), config=asdict(cfg),
                  best_epoch=state["best_epoch"], val_macro_auroc=state["best_auroc"], epoch_selection=selection,
                  n_train_studies=len(data["train"].study_ids), n_test_images=len(test),
                  label_fraction=data["label_fraction"],
                  **auroc_summary(scores, labels, subjects, names, n_boot=cfg.n_boot, seed=cfg.seed),
                  **metrics_summary(scores, labels, subjects, names, thresholds=thresholds,
                                    threshold_source=source, n_boot=cfg.n_boot, seed=cfg.seed))
    write_scores_csv(os.path.join(cfg.out, "scores.csv"), studies, subjects, scores, labels, names)
    if cfg.plots:
        plot_roc(os.path.join(cfg.out, "roc.png"), scores, labels, names, title="fine-tuned, test studies")
        plot_reliability(os.path.join(cfg.out, "reliability.png"), scores, labels, names, title="fine-tuned")
    write_json(os.path.join(cfg.out, RESULT), result)
    return result


def main(cfg: FinetuneConfig) -> dict:
    """Runs, resumes or recognises as finished a fine-tuning job, holding out/'s lock.
    Returns the finetune.json dict when finished (plus finished=True), else
    dict(finished=False, epoch)."""
    from fastssl.jobs import open_job

    cfg.validate()
    device, model, optimizer, lr, data, transform, augment = _setup(cfg)
    # a different run in out/ is refused unless --overwrite
    with open_job(cfg.out, _fingerprint(cfg), overwrite=cfg.overwrite):
        state = _resume(cfg, model, optimizer)
        why = _validation_problem(cfg, data["val"])
        data["selection"] = None if why is None else _cross_validate_epoch(cfg, why)
        if why is not None and data["selection"] is None:
            return dict(finished=False, epoch=state["epoch"])
        return _run(cfg, state, device, model, optimizer, lr, data, transform, augment)


def _run(cfg: FinetuneConfig, state: dict, device, model, optimizer, lr, data, transform, augment) -> dict:
    from fastssl.jobs import atomic_write_json

    result_path = os.path.join(cfg.out, RESULT)
    if state["epoch"] >= cfg.epochs and os.path.isfile(result_path):
        with open(result_path, encoding="utf-8") as handle:
            log.info("finetune: %s is finished; nothing to do", cfg.out)
            return dict(json.load(handle), finished=True)
    atomic_write_json(os.path.join(cfg.out, "config.json"), asdict(cfg))
    warmup = warmup_used(cfg)
    log.info("finetune: %d train / %d val / %d test studies, batch %d studies, lr %.3e (base %g x %d/256), "
             "layer decay %g, %s, %s, clip %s, %d epochs (warm-up %d)%s", len(data["train"].study_ids),
             len(data["val"].study_ids) if data["val"] is not None else 0,
             len(data["test"].study_ids), cfg.batch_size, lr, cfg.base_lr, cfg.batch_size, cfg.layer_decay,
             "frozen encoder (linear)" if cfg.mode == "linear" else "full fine-tuning", cfg.precision,
             cfg.clip_grad or "off",
             cfg.epochs, warmup, f", resuming after epoch {state['epoch']}" if state["epoch"] else "")
    if not _train(cfg, device, model, optimizer, lr, data, transform, augment, state, warmup):
        return dict(finished=False, epoch=state["epoch"])
    return dict(_score(cfg, device, model, data, transform, state), finished=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fastssl.config import add_dataclass_arguments

    add_dataclass_arguments(parser, FinetuneConfig, required=("cache", "checkpoint"), skip=("progress", "cv_fold"))


def run(args: argparse.Namespace) -> int:
    from fastssl.config import config_from_args
    from fastssl.eval.report import summary_lines

    cfg = config_from_args(FinetuneConfig, args)
    r = main(cfg)
    if not r["finished"]:
        print(f"finetune: stopped after epoch {r['epoch']} of {cfg.epochs}; rerun the same command to continue")
        return 0
    chosen_on = r.get("epoch_selection", {}).get("chosen_on", cfg.val_split)
    on = "validation" if chosen_on == cfg.val_split else f"{chosen_on}, mean fold"
    print("\n".join([f"finetune: best epoch {r['best_epoch'] + 1} ({on} macro AUROC "
                     f"{r['val_macro_auroc']:.4f}), {r['n_test_studies']} test studies"
                     + (f" of {cfg.dataset}" if cfg.dataset.strip() else ""), *summary_lines(r),
                     f"  -> {cfg.out}/finetune.json, scores.csv" + (", roc.png, reliability.png" if cfg.plots else "")]))
    return 0
