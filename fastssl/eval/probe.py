"""``fastssl probe``: linear probe on frozen CLS features, macro AUROC with bootstrap CIs.

Protocol (as the MVMAE evaluation): the encoder is frozen; every image of the train and
test splits gets its CLS feature (centre resize, dataset normalisation, its view
embedding); a logistic regression with 14 outputs is fitted on the train images (each
image carries its study's labels; -1 = ignore); on the test split, a study's logits are
the mean of its images' logits; the score is the macro AUROC over the labels that have
both classes among the test studies, with a seeded bootstrap interval that resamples
patients (subject_id), not studies (fastssl.eval.stats).

Regularisation: ``--l2-grid`` (default 1e-6 ... 1e-1, by decades) fits one probe per
value on the train images and keeps the one with the best macro AUROC on the validation
studies (ties: the larger penalty); the test split is never looked at for the choice.
When validation is empty or too small (``--min-val-studies``, or no label with both
classes), the choice is made by ``--cv-folds`` patient-grouped folds on train instead
(one warning line; recorded in probe.json).

Metrics beyond AUROC (fastssl.eval.report.metrics_summary): AUPRC, F1 at per-label
thresholds chosen to maximise F1 on the validation studies (on the out-of-fold train
studies under cross-validation), Brier score of sigmoid(study logit), each with the same
patient-bootstrap CIs.

Outputs: probe.json (settings, the L2 choice, AUROC, AUPRC, F1, Brier and CIs), probe.npz
(the fitted head: weight, bias, feature mean and std), scores.csv (per test study and
label: study, subject, label, score, target; see fastssl.eval.report), roc.png and
reliability.png, job.json (the run's fingerprint, fastssl.jobs).

``out`` is opened by fastssl.jobs.open_job: rerunning the same command recomputes into it
(a probe is short: nothing is kept between runs); a different run there (other settings,
cache or encoder; --plots included, so a --no-plots rerun cannot leave old PNGs beside
new results) is refused, naming the differences, unless ``--overwrite``, which empties it.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fastssl.config import COUNT, NONNEG, SEED, Range, check_settings, setting
from fastssl.distributed import check_device, pick_device  # noqa: F401  (finetune imports it from here)
from fastssl.eval.stats import (  # noqa: F401  (re-exported: the probe's public API)
    auroc, auroc_rows, bootstrap_macro_auroc, macro_auroc, midranks,
)

__all__ = ["ProbeConfig", "midranks", "auroc", "auroc_rows", "macro_auroc", "bootstrap_macro_auroc",
           "extract_features", "fit_linear_probe", "study_logits", "knn_scores", "select_l2",
           "keep_label_fraction",
           "load_eval_encoder", "main", "add_arguments", "run"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- features
@torch.no_grad()
def extract_features(encoder: torch.nn.Module, dataset, transform, *, batch_size: int = 256,
                     device: torch.device | str = "cpu", workers: int = 0, progress: bool = False) -> dict:
    """CLS features of every image of a SingleViewDataset, in dataset order.

    Args:
        encoder: callable (B, 1, H, W) float, views (B,) -> (B, D) (a ViewEncoder).
        transform: (B, 1, S, S) integer images -> (B, 1, H, W) float on the same device.
    Returns:
        dict(features (N, D) float32, labels (N, 14) int8, study_index (N,) int64,
        view_id (N,) int64), numpy arrays.
    """
    from fastssl.data.datasets import make_loader

    encoder.eval().to(device)
    loader = make_loader(dataset, batch_size, shuffle=False, drop_last=False, num_workers=workers)
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, desc="features", leave=False, disable=None)
    feats, labels, studies, views = [], [], [], []
    for images, lab, study, view in loader:
        x = transform(images.to(device))
        feats.append(encoder(x, view.to(device)).float().cpu())
        labels.append(lab)
        studies.append(study)
        views.append(view)
    if not feats:
        raise ValueError("the dataset is empty: nothing to probe")
    cat = lambda ts: torch.cat(ts).numpy()  # noqa: E731
    return dict(features=cat(feats), labels=cat(labels), study_index=cat(studies), view_id=cat(views))


def fit_linear_probe(x: np.ndarray, y: np.ndarray, *, method: str = "lbfgs", l2: float = 1e-4,
                     max_iter: int = 200, lr: float = 1e-2, seed: int = 0, init: dict | None = None) -> dict:
    """Logistic regression with C outputs on standardised features (masked BCE).

    Args:
        x: (N, D) float features. y: (N, C) in {0, 1, -1 = ignore}.
        method: "lbfgs" (full batch, strong Wolfe line search) or "adamw" (full-batch
            steps, lr ``lr``, decoupled weight decay ``l2``).
        l2: for lbfgs, penalty l2/2 * ||W||^2 added to the mean BCE.
        init: a fitted probe to start from (weight, bias; a warm start along an L2 grid).
    Returns:
        dict(weight (D, C), bias (C,), mean (D,), std (D,), loss) as numpy; apply with
        :func:`probe_logits`.
    """
    from fastssl.models.mvmae import masked_bce

    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x {x.shape} and y {y.shape}: expected (N, D) and (N, C)")
    torch.manual_seed(seed)
    xt = torch.as_tensor(x, dtype=torch.float32)
    mean, std = xt.mean(0), xt.std(0).clamp(min=1e-6)
    xt = (xt - mean) / std
    yt = torch.as_tensor(y, dtype=torch.int64)
    w = torch.zeros(x.shape[1], y.shape[1])
    b = torch.zeros(y.shape[1])
    if init is not None:
        w.copy_(torch.as_tensor(init["weight"])), b.copy_(torch.as_tensor(init["bias"]))
    w.requires_grad_(True), b.requires_grad_(True)

    def objective():
        return masked_bce(xt @ w + b, yt)

    if method == "lbfgs":
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-5,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = objective() + 0.5 * l2 * w.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
    elif method == "adamw":
        opt = torch.optim.AdamW([dict(params=[w], weight_decay=l2), dict(params=[b], weight_decay=0.0)], lr=lr)
        for _ in range(max_iter):
            opt.zero_grad()
            objective().backward()
            opt.step()
    else:
        raise ValueError(f"method={method!r}; expected 'lbfgs' or 'adamw'")
    with torch.no_grad():
        loss = float(objective())
    return dict(weight=w.detach().numpy(), bias=b.detach().numpy(), mean=mean.numpy(), std=std.numpy(), loss=loss)


def probe_logits(probe: dict, x: np.ndarray) -> np.ndarray:
    """(N, D) features -> (N, C) logits of a fitted probe."""
    return ((x - probe["mean"]) / probe["std"]) @ probe["weight"] + probe["bias"]


def study_logits(logits: np.ndarray, labels: np.ndarray, study_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image (N, C) logits -> per-study mean logits (S, C) and the study labels (S, C)
    (the labels of a study's first image: all its images carry the same)."""
    uniq, inv = np.unique(study_index, return_inverse=True)
    inv = inv.reshape(-1)
    sums = np.zeros((uniq.size, logits.shape[1]))
    np.add.at(sums, inv, logits)
    counts = np.bincount(inv, minlength=uniq.size)[:, None]
    first = np.full(uniq.size, -1)
    first[inv[::-1]] = np.arange(inv.size)[::-1]  # the last write per study is its first image
    return sums / counts, labels[first]


def knn_scores(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, k: int = 20,
               temperature: float = 0.07) -> np.ndarray:
    """Cosine kNN probe: the score of label c is the similarity-weighted (exp(s / T)) mean of
    the k nearest train images' labels (ignored labels weigh 0). -> (M, C)."""
    a = F.normalize(torch.as_tensor(train_x, dtype=torch.float32), dim=1)
    q = F.normalize(torch.as_tensor(test_x, dtype=torch.float32), dim=1)
    sim, idx = (q @ a.T).topk(min(k, a.shape[0]), dim=1)
    w = torch.exp(sim / temperature)[:, :, None]                      # (M, k, 1)
    y = torch.as_tensor(train_y, dtype=torch.float32)[idx]            # (M, k, C)
    valid = (y >= 0).float()
    return ((w * valid * y.clamp(min=0)).sum(1) / (w * valid).sum(1).clamp(min=1e-12)).numpy()


# ------------------------------------------------------------------------------ job
@dataclass
class ProbeConfig:
    """Every setting of a probe run (the CLI's flags)."""

    cache: str = ""               # a `fastssl prepare` cache directory
    checkpoint: str = ""          # encoder.safetensors / checkpoint.pt, or random:PRESET[:IMG[:PATCH]] (untrained)
    out: str = "runs/probe"       # output directory (probe.json, scores.csv, roc.png)
    train_split: str = "train"    # split the probe is fitted on
    val_split: str = "validate"   # split the L2 penalty is chosen on (with --l2-grid)
    test_split: str = "test"      # split it is scored on
    views: str = "all"            # images used: all, or a comma list of frontal,lateral,other,unknown
    dataset: str = ""             # pooled cache: only these datasets' rows, a comma list (e.g. mimic-cxr; '' = all)
    batch_size: int = setting(256, range=COUNT)         # feature extraction batch
    workers: int = setting(2, range=NONNEG)              # DataLoader processes reading the images for feature extraction: 0 = this process, N >= 1 = N loader processes
    device: str = setting("auto", check=check_device)  # torch device
    method: str = setting("lbfgs", choices=("lbfgs", "adamw"))         # lbfgs | adamw
    l2: float = setting(1e-4, range=Range(0))              # L2 penalty (lbfgs) or weight decay (adamw) when --l2-grid is empty
    l2_grid: str = "1e-6,1e-5,1e-4,1e-3,1e-2,1e-1"  # L2 values tried; the best validation macro AUROC wins ('' = use --l2)
    max_iter: int = setting(200, range=COUNT)           # optimiser iterations
    n_boot: int = setting(1000, range=NONNEG)            # bootstrap replicates over test patients (subject_id clusters)
    seed: int = setting(0, range=SEED)                 # bootstrap, probe and random-init seed
    knn_k: int = setting(0, range=NONNEG)                # >0: also a cosine kNN probe with this k
    min_val_studies: int = setting(10, range=NONNEG)     # fewer validation studies (or no label with both classes): choose by cross-validation
    cv_folds: int = setting(5, range=Range(2, integer=True))             # folds (patient-grouped) of that cross-validation on train
    label_fraction: float = setting(1.0, range=Range(0, 1, low_open=True))   # keep this fraction (0, 1] of the train studies' labels, drawn by patient
    label_seed: int = setting(0, range=SEED)           # seed of the --label-fraction draw
    plots: bool = True            # roc.png (needs matplotlib)
    overwrite: bool = False       # replace a different run found in --out (otherwise refused)
    progress: bool = True         # tqdm bar (only on a terminal)

    def __post_init__(self) -> None:
        check_settings(self)   # every declared range and choice (the CLI checks the same)


SETTINGS = ProbeConfig   # the dataclass declaring this command's settings (fastssl.config)
# Settings that change no result (fastssl.jobs fingerprint): where the run goes, how fast the
# features are extracted (batch_size: the same features up to float rounding), how it reports,
# --overwrite itself.
_NOT_RESULT_KEYS = ("out", "batch_size", "workers", "device", "progress", "overwrite")


def _fingerprint(cfg: ProbeConfig):
    """The run's identity (fastssl.jobs.JobFingerprint): every result-affecting setting, the
    cache's manifest.json and index.csv, and the encoder file (none for ``random:``)."""
    from fastssl.jobs import JobFingerprint, fingerprint_files

    settings = {k: v for k, v in asdict(cfg).items() if k not in _NOT_RESULT_KEYS}
    inputs = [os.path.join(cfg.cache, name) for name in ("manifest.json", "index.csv")]
    if not cfg.checkpoint.startswith("random:"):
        inputs.append(cfg.checkpoint)
    return JobFingerprint("probe", settings, fingerprint_files(inputs))


def load_eval_encoder(spec: str, seed: int = 0):
    """A ViewEncoder to evaluate: a file of ``fastssl pretrain`` (loaded with
    fastssl.models.export.load_encoder), or ``random:PRESET[:IMG[:PATCH]]`` for an untrained
    encoder of that architecture (the random-init baseline), seeded by ``seed``."""
    from fastssl.models.mvmae import ViewEncoder, model_config

    if spec.startswith("random:"):
        parts = spec.split(":")[1:]
        try:
            sizes = [int(v) or None for v in parts[1:3]]
        except ValueError:
            raise ValueError(f"checkpoint={spec!r}; expected random:PRESET[:IMG[:PATCH]] with integer sizes") from None
        sizes += [None] * (2 - len(sizes))
        torch.manual_seed(seed)
        return ViewEncoder(model_config(parts[0], img_size=sizes[0], patch_size=sizes[1]))
    from fastssl.models.export import load_encoder

    if not os.path.isfile(spec):
        raise ValueError(f"checkpoint={spec!r} is not a file (nor random:PRESET)")
    return load_encoder(spec)


def eval_transform(cache: str, img_size: int, checkpoint: str = ""):
    """The evaluation transform: centre resize + the pixel mean/std the encoder file
    ``checkpoint`` was trained with (fastssl.models.export.resolve_normalisation); the
    cache's manifest values for ``random:`` encoders (nothing was trained) or a file that
    does not record them."""
    from fastssl.data.augment import CenterResize
    from fastssl.data.cache import pixel_stats, read_manifest
    from fastssl.models.export import resolve_normalisation

    manifest = read_manifest(cache)
    if checkpoint and not checkpoint.startswith("random:"):
        mean, std = resolve_normalisation(checkpoint, manifest)
    else:
        mean, std = pixel_stats(manifest)
    return CenterResize(out_size=img_size, mean=mean, std=std)


def split_dataset(cfg, split: str):
    """The SingleViewDataset of ``split`` restricted to cfg.views and cfg.dataset (the rows
    of those datasets of a pooled cache; '' = all); ValueError if empty or if the cache
    holds no dataset of that name."""
    from fastssl.data.datasets import SingleViewDataset

    views = "all" if cfg.views == "all" else tuple(v.strip() for v in cfg.views.split(",") if v.strip())
    datasets = [d.strip() for d in cfg.dataset.split(",") if d.strip()] or None
    ds = SingleViewDataset(cfg.cache, split=split, views=views, dataset=datasets)
    if len(ds) == 0:
        raise ValueError(f"split {split!r} of {cfg.cache} has no images with views={cfg.views!r}"
                         + (f" and dataset={cfg.dataset!r}" if datasets else ""))
    return ds


def keep_label_fraction(dataset, fraction: float, seed: int) -> dict:
    """Restricts a SingleViewDataset (in place) to the studies of a seeded random set of
    patients holding ``fraction`` of its studies (label-efficiency runs).

    Patients (subject_id) are put in the order ``np.random.default_rng(seed).permutation``
    of their sorted ids; the first patients are kept until their studies reach
    ``ceil(fraction * S)`` of the S studies (at least one patient), so every kept patient
    brings all of its studies. fraction 1 keeps everything. ValueError when fraction is
    outside (0, 1].
    Returns dict(fraction, seed, n_studies, n_kept_studies, n_patients, n_kept_patients).
    """
    if isinstance(fraction, bool) or not 0 < fraction <= 1:
        raise ValueError(f"label_fraction={fraction!r}; expected a number in (0, 1]")
    n_studies = len(dataset.study_ids)
    first = np.unique(dataset.study_index, return_index=True)[1]          # one image per study
    study_subject = dataset.index.subject_id[dataset.rows[first]]         # (S,)
    patients, patient_of = np.unique(study_subject, return_inverse=True)
    info = dict(fraction=fraction, seed=seed, n_studies=n_studies, n_kept_studies=n_studies,
                n_patients=int(patients.size), n_kept_patients=int(patients.size))
    if fraction == 1:
        return info
    order = np.random.default_rng(seed).permutation(patients.size)
    per_patient = np.bincount(patient_of.reshape(-1), minlength=patients.size)[order]
    n_kept = int(np.searchsorted(np.cumsum(per_patient), math.ceil(fraction * n_studies))) + 1
    restrict_studies(dataset, np.isin(patient_of.reshape(-1), order[:n_kept]))
    info.update(n_kept_studies=len(dataset.study_ids), n_kept_patients=n_kept)
    log.info("label fraction %g (seed %d): %d of %d train studies kept (%d of %d patients)", fraction, seed,
             len(dataset.study_ids), n_studies, n_kept, patients.size)
    return info


def restrict_studies(dataset, keep: np.ndarray):
    """Keeps (in place) the images of the studies ``keep`` (S,) bool of a SingleViewDataset
    (study_ids / study_index renumbered) and returns it."""
    image_kept = keep[dataset.study_index]
    dataset.rows, dataset.view_ids = dataset.rows[image_kept], dataset.view_ids[image_kept]
    kept_ids = np.flatnonzero(keep)
    dataset.study_ids = np.asarray(dataset.study_ids)[kept_ids]
    dataset.study_index = np.searchsorted(kept_ids, dataset.study_index[image_kept]).astype(np.int64)
    return dataset


def train_dataset(cfg):
    """The training split's dataset after --label-fraction -> (dataset, the draw's info)."""
    ds = split_dataset(cfg, cfg.train_split)
    return ds, keep_label_fraction(ds, cfg.label_fraction, cfg.label_seed)


def optional_split(cfg, split: str):
    """split_dataset, or None when the split has no images (a fallback applies then)."""
    try:
        return split_dataset(cfg, split)
    except ValueError as exc:
        if "has no images" not in str(exc):
            raise
        return None


def parse_grid(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"l2_grid={text!r}; expected a comma list of numbers") from None
    if any(v < 0 for v in values):
        raise ValueError(f"l2_grid={text!r}; expected values >= 0")
    return values


def select_l2(cfg: ProbeConfig, tr: dict, val: dict) -> tuple[dict, float, dict]:
    """Fit one probe per --l2-grid value on the train images, score each on the validation
    studies (macro AUROC of study-mean logits); the best wins, ties to the larger L2.
    The grid runs from the largest penalty down, each fit starting from the previous
    solution. -> (probe, l2, {l2: validation macro AUROC})."""
    fits, scores, previous = {}, {}, None
    for l2 in sorted(parse_grid(cfg.l2_grid), reverse=True):
        fits[l2] = previous = fit_linear_probe(tr["features"], tr["labels"], method=cfg.method, l2=l2,
                                               max_iter=cfg.max_iter, seed=cfg.seed, init=previous)
        s, y = study_logits(probe_logits(fits[l2], val["features"]), val["labels"], val["study_index"])
        scores[l2] = macro_auroc(s, y)[1]
        log.info("probe: l2=%g validation macro AUROC %.4f", l2, scores[l2])
    best = max(scores, key=lambda v: (scores[v], v))
    return fits[best], best, scores


def patient_folds(subjects: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Patient-grouped folds: subjects (N,) -> (N,) fold numbers 0..k-1. The distinct
    subjects, in sorted order, are permuted by ``np.random.default_rng(seed)``; the one at
    position r of that permutation goes to fold r % k (every patient in one fold)."""
    patients, code = np.unique(np.asarray(subjects), return_inverse=True)
    if patients.size < k:
        raise ValueError(f"{patients.size} train patients: too few for {k}-fold cross-validation (lower --cv-folds)")
    fold_of = np.empty(patients.size, dtype=np.int64)
    fold_of[np.random.default_rng(seed).permutation(patients.size)] = np.arange(patients.size) % k
    return fold_of[code.reshape(-1)]


def _fold_macro(probe: dict, feats: dict, where: np.ndarray) -> tuple[float, np.ndarray]:
    """Macro AUROC of ``probe`` on the images ``where`` (bool (N,)) scored per study (NaN if
    no label has both classes there) and their per-image logits."""
    logits = probe_logits(probe, feats["features"][where])
    s, y = study_logits(logits, feats["labels"][where], feats["study_index"][where])
    return macro_auroc_or_nan(s, y), logits


def macro_auroc_or_nan(scores: np.ndarray, labels: np.ndarray) -> float:
    """macro_auroc's mean, NaN instead of an error when no label has both classes."""
    per = auroc_rows(np.asarray(scores).T, np.asarray(labels).T)
    return float(np.nanmean(per)) if not np.isnan(per).all() else float("nan")


def cv_select_l2(cfg: ProbeConfig, tr: dict, subjects: np.ndarray) -> tuple[dict, float, dict, np.ndarray]:
    """The L2 chosen by patient-grouped k-fold cross-validation on the train images (when
    validation is too small): for every --l2-grid value and fold, a probe fitted on the
    other folds (cold start) scores the fold's studies; the value with the best mean fold
    macro AUROC (folds where it is undefined left out) wins, ties to the larger L2; the
    returned probe is refitted on all train images.

    Args: tr: features dict (features (N, D), labels (N, C), study_index (N,));
        subjects (N,) the patient of each image.
    Returns: (probe, l2, {l2: mean fold macro AUROC}, out-of-fold per-image logits (N, C)
        at the chosen l2).
    """
    folds = patient_folds(subjects, cfg.cv_folds, cfg.seed)
    scores, oof = {}, {}
    for l2 in sorted(parse_grid(cfg.l2_grid), reverse=True):
        per_fold, oof[l2] = [], np.zeros(tr["labels"].shape, dtype=np.float64)
        for f in range(cfg.cv_folds):
            held = folds == f
            probe = fit_linear_probe(tr["features"][~held], tr["labels"][~held], method=cfg.method, l2=l2,
                                     max_iter=cfg.max_iter, seed=cfg.seed)
            score, oof[l2][held] = _fold_macro(probe, tr, held)
            per_fold.append(score)
        if np.isnan(per_fold).all():
            raise ValueError(f"no fold of the {cfg.cv_folds}-fold cross-validation has a label with both classes")
        scores[l2] = float(np.nanmean(per_fold))
        log.info("probe: l2=%g %d-fold cross-validated macro AUROC %.4f", l2, cfg.cv_folds, scores[l2])
    best = max(scores, key=lambda v: (scores[v], v))
    probe = fit_linear_probe(tr["features"], tr["labels"], method=cfg.method, l2=best, max_iter=cfg.max_iter,
                             seed=cfg.seed)
    return probe, best, scores, oof[best]


def validation_usable(val: dict | None, min_studies: int) -> str | None:
    """Why a validation split cannot choose a setting (None when it can): missing, fewer
    than ``min_studies`` studies, or no label with both classes among its studies."""
    if val is None:
        return "is empty"
    n = np.unique(val["study_index"]).size
    if n < min_studies:
        return f"has {n} studies (< --min-val-studies {min_studies})"
    _, y = study_logits(np.zeros(val["labels"].shape), val["labels"], val["study_index"])
    if not ((y == 1).any(0) & (y == 0).any(0)).any():
        return "has no label with both classes"
    return None


def _fit(cfg: ProbeConfig, feats: dict, train_subjects: np.ndarray) -> tuple[dict, dict]:
    """The probe and how its L2 was chosen: fixed (--l2-grid ''), on validation, or by
    cross-validation on train when validation is too small (one line says so). The
    selection dict keeps the out-of-fold train logits under "_oof" (not written out)."""
    tr = feats[cfg.train_split]
    if not cfg.l2_grid.strip():
        probe = fit_linear_probe(tr["features"], tr["labels"], method=cfg.method, l2=cfg.l2,
                                 max_iter=cfg.max_iter, seed=cfg.seed)
        return probe, dict(l2=cfg.l2, chosen_on=None)
    why = validation_usable(feats.get(cfg.val_split), cfg.min_val_studies)
    if why is not None and np.unique(train_subjects).size < cfg.cv_folds and \
            validation_usable(feats.get(cfg.val_split), 1) is None:
        log.warning("probe: validation split %r %s, but train has fewer than %d patients for cross-validation: "
                    "L2 chosen on validation anyway", cfg.val_split, why, cfg.cv_folds)
    elif why is not None:
        log.warning("probe: validation split %r %s: L2 chosen by %d-fold cross-validation on train (patient-grouped)",
                    cfg.val_split, why, cfg.cv_folds)
        probe, l2, grid, oof = cv_select_l2(cfg, tr, train_subjects)
        return probe, dict(l2=l2, chosen_on=f"{cfg.cv_folds}-fold cross-validation on {cfg.train_split}",
                           reason=f"validation split {cfg.val_split!r} {why}", cv_folds=cfg.cv_folds,
                           cv_macro_auroc={repr(k): v for k, v in grid.items()}, _oof=oof)
    probe, l2, grid = select_l2(cfg, tr, feats[cfg.val_split])
    return probe, dict(l2=l2, chosen_on=cfg.val_split, validation_macro_auroc={repr(k): v for k, v in grid.items()})


def _thresholds(cfg: ProbeConfig, probe: dict, feats: dict, oof: np.ndarray | None) -> tuple[np.ndarray, str]:
    """Per-label F1 thresholds (C,) and where they were chosen: the out-of-fold train study
    scores when the L2 came from cross-validation, else the validation studies' scores,
    else (no validation) logit 0, i.e. probability 0.5."""
    from fastssl.eval.report import f1_thresholds

    tr, val = feats[cfg.train_split], feats.get(cfg.val_split)
    if oof is not None:
        s, y = study_logits(oof, tr["labels"], tr["study_index"])
        return f1_thresholds(s, y), f"{cfg.cv_folds}-fold cross-validation on {cfg.train_split} (out-of-fold)"
    if val is not None:
        s, y = study_logits(probe_logits(probe, val["features"]), val["labels"], val["study_index"])
        return f1_thresholds(s, y), cfg.val_split
    return np.zeros(tr["labels"].shape[1]), "none (no validation split): logit 0, probability 0.5"


def save_probe(path: str, probe: dict) -> None:
    """The fitted probe as .npz: weight (D, C), bias (C,), mean (D,), std (D,); apply it
    to CLS features x (N, D) as ((x - mean) / std) @ weight + bias."""
    import io

    from fastssl.jobs import atomic_write_bytes

    data = io.BytesIO()
    np.savez(data, **{k: np.asarray(probe[k]) for k in ("weight", "bias", "mean", "std")})
    atomic_write_bytes(path, data.getvalue())


def main(cfg: ProbeConfig) -> dict:
    """Features -> probe (L2 chosen on validation) -> study logits -> AUROC with patient
    CIs; writes out/probe.json, out/scores.csv, out/roc.png and returns the JSON's dict.

    ``cfg.out`` is opened by fastssl.jobs.open_job once the encoder and the splits are known
    to be usable (a bad flag touches nothing): ResumeMismatch when it holds another run
    (unless ``cfg.overwrite``), OutputLocked when another job writes it."""
    from fastssl.jobs import open_job

    check_settings(cfg)   # again: a field may have been changed after construction
    device = pick_device(cfg.device)
    encoder = load_eval_encoder(cfg.checkpoint, cfg.seed)
    transform = eval_transform(cfg.cache, encoder.cfg.img_size, cfg.checkpoint)
    datasets = {cfg.test_split: split_dataset(cfg, cfg.test_split), cfg.val_split: optional_split(cfg, cfg.val_split)}
    datasets[cfg.train_split], label_info = train_dataset(cfg)
    # "resume" recomputes everything: the same settings and inputs give the same files
    with open_job(cfg.out, lambda: _fingerprint(cfg), overwrite=cfg.overwrite):
        return _probe(cfg, encoder, transform, device, datasets, label_info)


def _probe(cfg: ProbeConfig, encoder, transform, device, datasets: dict, label_info: dict) -> dict:
    """The probe of ``main`` in the opened cfg.out -> probe.json's dict. datasets: {split:
    SingleViewDataset or None (an empty validation split)}; label_info: the train split's
    --label-fraction draw (keep_label_fraction)."""
    from fastssl.data.mimic import CHEXPERT_LABELS
    from fastssl.eval.report import (
        auroc_summary, metrics_summary, plot_reliability, plot_roc, study_table, write_json, write_scores_csv,
    )

    feats = {split: extract_features(encoder, ds, transform, batch_size=cfg.batch_size, device=device,
                                     workers=cfg.workers, progress=cfg.progress)
             for split, ds in datasets.items() if ds is not None}
    tr, te = feats[cfg.train_split], feats[cfg.test_split]
    train_ds = datasets[cfg.train_split]
    probe, l2_info = _fit(cfg, feats, train_ds.index.subject_id[train_ds.rows])
    thresholds, threshold_source = _thresholds(cfg, probe, feats, l2_info.pop("_oof", None))
    scores, labels = study_logits(probe_logits(probe, te["features"]), te["labels"], te["study_index"])
    studies, subjects = study_table(datasets[cfg.test_split], te["study_index"])
    names = list(CHEXPERT_LABELS)
    result = dict(
        checkpoint=cfg.checkpoint if cfg.checkpoint.startswith("random:") else os.path.abspath(cfg.checkpoint),
        cache=os.path.abspath(cfg.cache), config=asdict(cfg), feature_dim=int(tr["features"].shape[1]),
        n_train_images=int(tr["features"].shape[0]), n_test_images=int(te["features"].shape[0]),
        n_train_studies=label_info["n_kept_studies"], label_fraction=label_info,
        probe_train_loss=probe["loss"], l2_selection=l2_info,
        **auroc_summary(scores, labels, subjects, names, n_boot=cfg.n_boot, seed=cfg.seed),
        **metrics_summary(scores, labels, subjects, names, thresholds=thresholds, threshold_source=threshold_source,
                          n_boot=cfg.n_boot, seed=cfg.seed))
    if cfg.knn_k > 0:
        kscores, _ = study_logits(knn_scores(tr["features"], tr["labels"], te["features"], k=cfg.knn_k),
                                  te["labels"], te["study_index"])
        kper, kmacro = macro_auroc(kscores, labels)
        result["knn"] = dict(k=cfg.knn_k, macro_auroc=kmacro,
                             per_label={n: None if np.isnan(a) else float(a) for n, a in zip(names, kper)})
    write_scores_csv(os.path.join(cfg.out, "scores.csv"), studies, subjects, scores, labels, names)
    save_probe(os.path.join(cfg.out, "probe.npz"), probe)
    if cfg.plots:
        plot_roc(os.path.join(cfg.out, "roc.png"), scores, labels, names, title="linear probe, test studies")
        plot_reliability(os.path.join(cfg.out, "reliability.png"), scores, labels, names, title="linear probe")
    write_json(os.path.join(cfg.out, "probe.json"), result)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fastssl.config import add_dataclass_arguments

    add_dataclass_arguments(parser, ProbeConfig, required=("cache", "checkpoint"), skip=("progress",))


def run(args: argparse.Namespace) -> int:
    from fastssl.config import config_from_args
    from fastssl.eval.report import summary_lines

    cfg = config_from_args(ProbeConfig, args)
    r = main(cfg)
    chosen = r["l2_selection"]
    how = f"chosen on {chosen['chosen_on']}" if chosen["chosen_on"] else "fixed"
    of = f" of {cfg.dataset}" if cfg.dataset.strip() else ""
    lines = [f"probe: {r['n_test_studies']} test studies{of} ({r['n_test_images']} images), "
             f"probe fitted on {r['n_train_images']} images, features {r['feature_dim']}-d, "
             f"l2={chosen['l2']:g} ({how})", *summary_lines(r)]
    if "knn" in r:
        lines.append(f"  kNN (k={r['knn']['k']}) macro AUROC {r['knn']['macro_auroc']:.4f}")
    lines.append(f"  -> {cfg.out}/probe.json, probe.npz, scores.csv" + (", roc.png, reliability.png" if cfg.plots else ""))
    print("\n".join(lines))
    return 0
