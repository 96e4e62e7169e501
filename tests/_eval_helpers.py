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


def independent_study_scores(cache: str, img_size: int, image_logits, normalisation=None) -> dict:
    """study id -> (C,) mean over the study's test images of ``image_logits(x (1, 1, H, W),
    view int) -> (C,)``, computed image by image (the oracle of study-level averaging).
    normalisation: (mean, std) of the [0, 1] pixels; None: the cache manifest's."""
    import torch

    from fastssl.data.augment import CenterResize
    from fastssl.data.cache import read_manifest
    from fastssl.data.datasets import SingleViewDataset

    manifest = read_manifest(cache)
    mean, std = normalisation or (manifest["pixel_mean"], manifest["pixel_std"])
    resize = CenterResize(out_size=img_size, mean=mean, std=std)
    ds = SingleViewDataset(cache, split="test")
    per_study: dict[str, list] = {}
    for i in range(len(ds)):
        image, _, study, view = ds[i]
        with torch.no_grad():
            logit = image_logits(resize(image[None]), int(view))
        per_study.setdefault(str(ds.study_ids[int(study)]), []).append(np.asarray(logit, dtype=np.float64))
    return {k: np.mean(v, axis=0) for k, v in per_study.items()}
