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
