"""The float64 oracle of nearest-centroid assignment, shared by the kmeans test files."""
from __future__ import annotations

import torch

from fastssl.assign.common import multiplied_centroids


def as_multiplied(x: torch.Tensor, c: torch.Tensor, metric: str,
                  precision: str = "data") -> torch.Tensor:
    """The centroids as every engine multiplies them (held in x's dtype, which holds
    them exactly): for cos normalised in float64, rounded to float32, then to x's
    precision (or bf16)."""
    dtype = str(x.dtype).replace("torch.", "")
    return multiplied_centroids(c, dtype, metric, precision).to(x.dtype)


def check_against_float64(x, c_used, metric, labels, distances, rtol):
    """The chosen centroid is optimal within ``rtol`` x the row's score scale, the
    reported distance matches the optimum as closely, and labels agree with the oracle
    wherever the runner-up is clearly (4 tolerances) worse; ties are ambiguous.

    x: (n, d) as rounded to its dtype; c_used: (k, d) as multiplied; labels (n,) int64,
    distances (n,) float32 from the engine, on x's device (the oracle runs there).
    """
    xd, cd = x.detach().double(), c_used.detach().to(x.device, torch.float64)
    if metric == "cos":
        xd = torch.nn.functional.normalize(xd, dim=1)
    dots = xd @ cd.T
    if metric == "l2":
        xsq, csq = (xd * xd).sum(1, keepdim=True), (cd * cd).sum(1)
        scores, scale = xsq - 2 * dots + csq, xsq[:, 0] + csq.max()
    else:
        scores, scale = -dots, xd.norm(dim=1) * cd.norm(dim=1).max()
    tol = rtol * (scale + 1e-30)
    assert labels.dtype == torch.int64 and distances.dtype == torch.float32
    assert labels.shape == distances.shape == (x.shape[0],)
    best, ref = scores.min(1)
    regret = scores.gather(1, labels[:, None])[:, 0] - best
    assert torch.all(regret <= tol), f"regret {(regret / tol).max().item():.3g} tolerances"
    want = best.clamp_min(0) if metric == "l2" else -best
    err = (distances.double() - want).abs()
    assert torch.all(err <= tol + 1e-6), f"distance error {(err / tol).max().item():.3g} tolerances"
    if scores.shape[1] > 1:
        two = scores.topk(2, dim=1, largest=False).values
        clear = (two[:, 1] - two[:, 0]) > 4 * tol
        assert torch.equal(labels[clear], ref[clear])
