"""The one cosine normalisation of the library, shared by every assignment engine
(``fastssl.assign``) and the float64 oracle (``fastssl.reference.kmeans``).

It lives below both, importing neither, so that the oracle defines the semantics the
engines are checked against without loading any engine, and both multiply the very same
rounded centroids. torch is imported only when a tensor is given.
"""
from __future__ import annotations

from typing import Any

import numpy as np

COS_EPS = 1e-12  # as torch.nn.functional.normalize

__all__ = ["COS_EPS", "normalized_centroids"]


def normalized_centroids(c: Any, dtype: Any) -> Any:
    """Rows divided by max(||row||, 1e-12), computed in float64 and rounded ONCE to dtype.

    Normalising in float32 and then rounding to bf16 rounds twice, and a 1-ulp difference
    in the float32 norm (CPU vs GPU reductions) can then flip a bf16 rounding.

    Args:
        c: (k, d) numpy array or torch tensor (any float dtype, any device).
        dtype: the result's dtype (numpy dtype for numpy input, torch dtype for torch).
    Returns:
        (k, d) array of the same kind and device as ``c``.
    """
    if isinstance(c, np.ndarray):
        c64 = c.astype(np.float64)
        norms = np.linalg.norm(c64, axis=1, keepdims=True)
        return (c64 / np.maximum(norms, COS_EPS)).astype(dtype)
    import torch

    c64 = c.detach().to(torch.float64)
    return (c64 / c64.norm(dim=1, keepdim=True).clamp_min(COS_EPS)).to(dtype)
