"""Shared oracle of the evaluation tests: AUROC by counting every positive/negative pair."""
from __future__ import annotations

import numpy as np


def brute_auroc(s, y):
    """s, y (N,) -> the fraction of (positive, negative) pairs ranked right, ties 1/2."""
    pos, neg = s[y == 1], s[y == 0]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (pos.size * neg.size)


def independent_study_scores(cache: str, img_size: int, image_logits, normalisation=None, split="test") -> dict:
    """study id -> (C,) mean over the study's ``split`` images of ``image_logits(x (1, 1, H, W),
    view int) -> (C,)``, computed image by image (the oracle of study-level averaging).
    normalisation: (mean, std) of the [0, 1] pixels; None: the cache manifest's."""
    import torch

    from fastssl.data.augment import CenterResize
    from fastssl.data.cache import read_manifest
    from fastssl.data.datasets import SingleViewDataset

    manifest = read_manifest(cache)
    mean, std = normalisation or (manifest["pixel_mean"], manifest["pixel_std"])
    resize = CenterResize(out_size=img_size, mean=mean, std=std)
    ds = SingleViewDataset(cache, split=split)
    per_study: dict[str, list] = {}
    for i in range(len(ds)):
        image, _, study, view = ds[i]
        with torch.no_grad():
            logit = image_logits(resize(image[None]), int(view))
        per_study.setdefault(str(ds.study_ids[int(study)]), []).append(np.asarray(logit, dtype=np.float64))
    return {k: np.mean(v, axis=0) for k, v in per_study.items()}


def brute_ap(s, y):
    """Average precision by its step-wise definition: over the distinct scores t, from the
    largest down, (recall(t) - recall(previous t)) * precision(t), where precision and
    recall are those of ``s >= t``, counted by hand (labels -1 ignored)."""
    keep = y >= 0
    s, y = s[keep], y[keep]
    n_pos = int((y == 1).sum())
    if n_pos == 0:
        return float("nan")
    ap, previous_recall = 0.0, 0.0
    for t in sorted(set(s.tolist()), reverse=True):
        picked = s >= t
        tp = int((picked & (y == 1)).sum())
        recall = tp / n_pos
        ap += (recall - previous_recall) * tp / int(picked.sum())
        previous_recall = recall
    return ap


def brute_f1(s, y, t):
    """F1 of ``s >= t`` by counting (labels -1 ignored); NaN when TP + FP + FN is 0."""
    keep = y >= 0
    s, y = s[keep], y[keep]
    tp = int(((s >= t) & (y == 1)).sum())
    fp = int(((s >= t) & (y == 0)).sum())
    fn = int(((s < t) & (y == 1)).sum())
    return float("nan") if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def brute_brier(s, y):
    """Mean of (1 / (1 + exp(-s)) - y)^2 over the valid entries, one at a time."""
    import math

    terms = [(1 / (1 + math.exp(-a)) - b) ** 2 for a, b in zip(s.tolist(), y.tolist()) if b >= 0]
    return sum(terms) / len(terms) if terms else float("nan")


def brute_best_threshold(s, y):
    """The score t with the largest brute_f1(s, y, t), ties to the larger t."""
    best = None
    for t in sorted(set(s[y >= 0].tolist()), reverse=True):
        f1 = brute_f1(s, y, t)
        if best is None or f1 > best[1]:
            best = (t, f1)
    return best
