"""``fastssl probe``: linear probe on frozen CLS features, macro AUROC with bootstrap CIs.

Protocol (as the MVMAE evaluation): the encoder is frozen; every image of the train and
test splits gets its CLS feature (centre resize, dataset normalisation, its view
embedding); a logistic regression with 14 outputs is fitted on the train images (each
image carries its study's labels; -1 = ignore); on the test split, a study's logits are
the mean of its images' logits; the score is the macro AUROC over the labels that have
both classes among the test studies, with a seeded study-level bootstrap interval.

AUROC is the Mann-Whitney statistic with average ranks for ties (a positive and a
negative with equal scores count 1/2), vectorised over bootstrap replicates.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fastssl.eval.stats import (  # noqa: F401  (re-exported: the probe's public API)
    auroc, auroc_rows, bootstrap_macro_auroc, macro_auroc, midranks,
)

__all__ = ["ProbeConfig", "midranks", "auroc", "auroc_rows", "macro_auroc", "bootstrap_macro_auroc",
           "extract_features", "fit_linear_probe", "study_logits", "knn_scores", "main",
           "add_arguments", "run"]

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
                     max_iter: int = 200, lr: float = 1e-2, seed: int = 0) -> dict:
    """Logistic regression with C outputs on standardised features (masked BCE).

    Args:
        x: (N, D) float features. y: (N, C) in {0, 1, -1 = ignore}.
        method: "lbfgs" (full batch, strong Wolfe line search) or "adamw" (full-batch
            steps, lr ``lr``, decoupled weight decay ``l2``).
        l2: for lbfgs, penalty l2/2 * ||W||^2 added to the mean BCE.
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
    w = torch.zeros(x.shape[1], y.shape[1], requires_grad=True)
    b = torch.zeros(y.shape[1], requires_grad=True)

    def objective():
        return masked_bce(xt @ w + b, yt)

    if method == "lbfgs":
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

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
    checkpoint: str = ""          # encoder.safetensors or checkpoint.pt from `fastssl pretrain`
    out: str = "runs/probe"       # output directory (probe.json)
    train_split: str = "train"    # split the probe is fitted on
    test_split: str = "test"      # split it is scored on
    views: str = "all"            # images used: all, or a comma list of frontal,lateral,other,unknown
    batch_size: int = 256         # feature extraction batch
    workers: int = 2              # DataLoader processes for feature extraction
    device: str = "auto"          # auto | cpu | cuda
    method: str = "lbfgs"         # lbfgs | adamw
    l2: float = 1e-4              # L2 penalty (lbfgs) or weight decay (adamw)
    max_iter: int = 200           # optimiser iterations
    n_boot: int = 1000            # bootstrap replicates over test studies
    seed: int = 0                 # bootstrap and probe seed
    knn_k: int = 0                # >0: also a cosine kNN probe with this k
    progress: bool = True         # tqdm bar (only on a terminal)


def _load(cfg: ProbeConfig):
    from fastssl.train.export import load_encoder

    if not os.path.isfile(cfg.checkpoint):
        raise ValueError(f"checkpoint={cfg.checkpoint!r} is not a file")
    return load_encoder(cfg.checkpoint)


def main(cfg: ProbeConfig) -> dict:
    """Features -> probe -> AUROC; writes out/probe.json atomically and returns its dict."""
    from fastssl.data.augment import CenterResize
    from fastssl.data.cache import read_manifest
    from fastssl.data.datasets import SingleViewDataset
    from fastssl.data.mimic import CHEXPERT_LABELS

    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if cfg.device == "auto" else cfg.device))
    encoder = _load(cfg)
    manifest = read_manifest(cfg.cache)
    transform = CenterResize(out_size=encoder.cfg.img_size, mean=float(manifest.get("pixel_mean", 0.5)),
                             std=float(manifest.get("pixel_std", 0.25)) or 0.25)
    views = "all" if cfg.views == "all" else tuple(v.strip() for v in cfg.views.split(",") if v.strip())
    feats = {}
    for split in (cfg.train_split, cfg.test_split):
        ds = SingleViewDataset(cfg.cache, split=split, views=views)
        if len(ds) == 0:
            raise ValueError(f"split {split!r} of {cfg.cache} has no images with views={cfg.views!r}")
        feats[split] = extract_features(encoder, ds, transform, batch_size=cfg.batch_size, device=device,
                                        workers=cfg.workers, progress=cfg.progress)
    tr, te = feats[cfg.train_split], feats[cfg.test_split]
    probe = fit_linear_probe(tr["features"], tr["labels"], method=cfg.method, l2=cfg.l2,
                             max_iter=cfg.max_iter, seed=cfg.seed)
    scores, labels = study_logits(probe_logits(probe, te["features"]), te["labels"], te["study_index"])
    per, macro = macro_auroc(scores, labels)
    ci = bootstrap_macro_auroc(scores, labels, n_boot=cfg.n_boot, seed=cfg.seed)
    names = list(CHEXPERT_LABELS)
    result = dict(
        checkpoint=os.path.abspath(cfg.checkpoint), cache=os.path.abspath(cfg.cache),
        config=asdict(cfg), feature_dim=int(tr["features"].shape[1]),
        n_train_images=int(tr["features"].shape[0]), n_test_images=int(te["features"].shape[0]),
        n_test_studies=int(scores.shape[0]), probe_train_loss=probe["loss"],
        macro_auroc=macro, macro_ci=list(ci["macro"]), ci_level=1 - ci["alpha"],
        labels_used=[n for n, a in zip(names, per) if not np.isnan(a)],
        per_label={n: dict(auroc=None if np.isnan(a) else float(a),
                           ci=None if np.isnan(a) else list(ci["per_label"][j]),
                           n_pos=int((labels[:, j] == 1).sum()), n_neg=int((labels[:, j] == 0).sum()))
                   for j, (n, a) in enumerate(zip(names, per))},
    )
    if cfg.knn_k > 0:
        kscores, _ = study_logits(knn_scores(tr["features"], tr["labels"], te["features"], k=cfg.knn_k),
                                  te["labels"], te["study_index"])
        kper, kmacro = macro_auroc(kscores, labels)
        result["knn"] = dict(k=cfg.knn_k, macro_auroc=kmacro,
                             per_label={n: None if np.isnan(a) else float(a) for n, a in zip(names, kper)})
    os.makedirs(cfg.out, exist_ok=True)
    path = os.path.join(cfg.out, "probe.json")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    os.replace(tmp, path)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fastssl.config import add_dataclass_arguments

    add_dataclass_arguments(parser, ProbeConfig, required=("cache", "checkpoint"), skip=("progress",),
                            choices=dict(method=("lbfgs", "adamw")))


def run(args: argparse.Namespace) -> int:
    from fastssl.errors import DataError
    from fastssl.config import config_from_args

    cfg = config_from_args(ProbeConfig, args)
    try:
        r = main(cfg)
    except (ValueError, DataError) as exc:
        log.error("%s", exc)
        return 2
    lines = [f"probe: {r['n_test_studies']} test studies ({r['n_test_images']} images), "
             f"probe fitted on {r['n_train_images']} images, features {r['feature_dim']}-d",
             f"  macro AUROC {r['macro_auroc']:.4f}  {100 * r['ci_level']:.0f}% CI "
             f"[{r['macro_ci'][0]:.4f}, {r['macro_ci'][1]:.4f}] over {len(r['labels_used'])} labels"]
    for name, v in r["per_label"].items():
        if v["auroc"] is not None:
            lines.append(f"  {name:<28s} {v['auroc']:.4f}  (+{v['n_pos']} / -{v['n_neg']})")
    if "knn" in r:
        lines.append(f"  kNN (k={r['knn']['k']}) macro AUROC {r['knn']['macro_auroc']:.4f}")
    lines.append(f"  -> {os.path.join(cfg.out, 'probe.json')}")
    print("\n".join(lines))
    return 0
