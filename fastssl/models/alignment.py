"""Alignment losses between the views of a study, and the collapse monitor.

Every loss takes the pooled latents of a batch of studies laid out in view slots,
``z (B, V, D)``, with an availability mask ``available (B, V)`` (False: the study has no
image in that slot; the row's values are ignored). Latents are L2-normalised here.

Kinds (V >= 2; a batch with V = 1 has nothing to align and gives 0):

* ``"mse"``: the released MVMAE definition (agostini335/MVMAE ``feats_mse``): for each
  study, the squared difference of the normalised latents **averaged over D**, summed
  over the ordered slot pairs (i, j) where both are available, divided by V^2; then the
  mean over the batch (studies with fewer than two images contribute 0). For two views
  that is (1 - cos) / D.
* ``"l2"``: ||z_i - z_j||^2 = 2 (1 - cos) (summed over D), averaged over the available
  ordered pairs i != j; the strength does not depend on D (fastssl's former "mse").
* ``"cosine"``: the released ``cosine_sim`` (agostini335/MVMAE ``feats_cos_sim``): for
  each study, the cosines of the normalised latents summed over the ordered slot pairs
  (i, j), i != j, where both are available, divided by V (V - 1); minus the mean over the
  batch (studies with fewer than two images contribute 0). Its value is -cos for two
  views; with missing views it is weaker than a mean over the available pairs (the
  released normalisation counts every slot pair of every study).
* ``"ntxent"``: the released SimCLR-style loss (``ContrastiveLoss``, temperature 0.5):
  for a slot pair (m, n), both z_m[b] and z_n[b] are anchors, the positive is the other
  view of the same study, the denominator runs over the m- and n-latents of every study
  of the global batch whose pair is available (intra- and cross-view negatives, the
  positive included, the anchor itself excluded), + 1e-12. Averaged over the anchors
  whose pair is available, then over the slot pairs that have any. (The released code
  also averages in anchors of missing pairs, computed from zero-filled images, and its
  self-exclusion is misplaced on more than one rank; both are fixed here.)
* ``"infonce"``: cross-view InfoNCE: logits cos / temperature from z_m[b] to the
  n-latents of the global batch's available pairs, target z_n[b]; both directions.

Across ranks, the contrastive kinds gather latents with
``torch.distributed.nn.functional.all_gather`` (the gradient flows back to the rank that
owns a row), and every kind is scaled so that the mean of the per-rank losses, which
DDP's gradient averaging differentiates, is the loss of one process over the global batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastssl import distributed as fdist

__all__ = ["ALIGN_LOSSES", "alignment_loss", "pair_cosines"]

ALIGN_LOSSES = ("mse", "l2", "cosine", "ntxent", "infonce")


def _global_count(count: torch.Tensor) -> torch.Tensor:
    """Sum of ``count`` (any shape, no gradient) over ranks."""
    # a copy: all_reduce_sum reduces a tensor already on the communication device in place
    return fdist.all_reduce_sum(count.detach().to(torch.float32).clone())


def _check(z: torch.Tensor, available) -> torch.Tensor:
    if not isinstance(z, torch.Tensor) or z.dim() != 3:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"z has shape {shape}; expected (B, V, D)")
    if available is None:
        return torch.ones(z.shape[:2], dtype=torch.bool, device=z.device)
    if not isinstance(available, torch.Tensor) or available.shape != z.shape[:2]:
        shape = tuple(available.shape) if isinstance(available, torch.Tensor) else type(available).__name__
        raise ValueError(f"available has shape {shape}; expected (B, V) = {tuple(z.shape[:2])}")
    return available.to(device=z.device, dtype=torch.bool)


def _pairwise(z: torch.Tensor, available: torch.Tensor):
    """Normalised z -> cos (B, V, V), squared distances (B, V, V), ordered-pair mask i != j."""
    gram = z @ z.transpose(1, 2)
    sq = gram.diagonal(dim1=1, dim2=2)
    dist2 = (sq[:, :, None] + sq[:, None, :] - 2 * gram).clamp(min=0)
    eye = torch.eye(z.shape[1], dtype=torch.bool, device=z.device)
    pairs = available[:, :, None] & available[:, None, :] & ~eye
    return gram, dist2, pairs


def _mean_over_ranks(total: torch.Tensor, count: torch.Tensor | int) -> torch.Tensor:
    """Local sum / global count x world: the ranks' mean is the global mean. ``count`` is
    a device tensor, or a host int (the local batch size): on one process that divides
    on the host, with no host-to-device copy (a blocking one, every step, in eager mode)."""
    _, world = fdist.rank_world()
    if not isinstance(count, torch.Tensor):
        if world == 1:
            return total / max(count, 1)
        count = torch.full((), count, dtype=torch.float32, device=total.device)
    n = _global_count(count)
    return total * world / n.clamp(min=1)


def _contrastive_pair(zm, zn, both, temperature: float, kind: str):
    """One slot pair: local (B, D) x2, both (B,) -> (sum of the anchors' losses, anchor count)."""
    rank, _ = fdist.rank_world()
    b = zm.shape[0]
    all_m, all_n = fdist.all_gather_tensor(zm, grad=True), fdist.all_gather_tensor(zn, grad=True)
    all_ok = fdist.all_gather_tensor(both)
    own = torch.arange(b, device=zm.device) + rank * b          # this rank's rows in the gathered batch
    pos = (zm * zn).sum(-1) / temperature                         # (B,)
    if kind == "ntxent":
        cols = torch.cat([all_m, all_n])                          # (2N, D)
        n_all = all_m.shape[0]
        anchor_col = torch.cat([own, own + n_all])                # each anchor's own column
        cols_idx = torch.arange(2 * n_all, device=zm.device)
        # the anchor itself excluded by a comparison (an indexed "= False" would copy the
        # scalar from the host every call)
        valid = torch.cat([all_ok, all_ok])[None, :] & (cols_idx[None, :] != anchor_col[:, None])
        sim = torch.cat([zm, zn]) @ cols.T / temperature          # (2B, 2N)
        denom = (sim.exp() * valid).sum(-1) + 1e-12
        losses = denom.log() - torch.cat([pos, pos])
        keep = torch.cat([both, both])
    else:  # infonce: cross-view candidates only, both directions
        cand_mask = torch.where(all_ok, 0.0, float("-inf"))[None, :]
        lse_m = torch.logsumexp(zm @ all_n.T / temperature + cand_mask, dim=-1)
        lse_n = torch.logsumexp(zn @ all_m.T / temperature + cand_mask, dim=-1)
        losses = torch.cat([lse_m - pos, lse_n - pos])
        keep = torch.cat([both, both])
    losses = torch.where(keep, losses, torch.zeros_like(losses))  # no NaN from rows without a pair
    return losses.sum(), keep.sum()


def alignment_loss(z: torch.Tensor, available: torch.Tensor | None = None, kind: str = "mse",
                   temperature: float = 0.5) -> torch.Tensor:
    """Alignment of the view slots of each study (see the module docstring for the kinds).

    Args:
        z: (B, V, D) float pooled latents; row b holds study b's views.
        available: (B, V) bool, True where slot v of study b holds an image; None: all.
        kind: one of ALIGN_LOSSES.
        temperature: ntxent / infonce only; > 0.
    Returns:
        0-dim float32 tensor.
    """
    if kind not in ALIGN_LOSSES:
        raise ValueError(f"kind={kind!r}; expected one of {ALIGN_LOSSES}")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}; expected > 0")
    available = _check(z, available)
    b, v, d = z.shape
    z = F.normalize(z.float(), dim=-1) * available[..., None]
    if v < 2:
        return z.sum() * 0.0
    cos, dist2, pairs = _pairwise(z, available)
    if kind == "mse":  # per study: sum over pairs of mean_D (.)^2 / V^2; mean over the batch
        per_study = (dist2 * pairs).sum(dim=(1, 2)) / d / v ** 2
        return _mean_over_ranks(per_study.sum(), b)
    if kind == "cosine":  # per study: -sum over pairs of cos / (V (V - 1)); mean over the batch
        per_study = (cos * pairs).sum(dim=(1, 2)) / (v * (v - 1))
        return -_mean_over_ranks(per_study.sum(), b)
    if kind == "l2":
        return _mean_over_ranks((dist2 * pairs).sum(), pairs.sum())
    totals, counts = [], []
    for m in range(v):
        for n in range(m + 1, v):
            s, c = _contrastive_pair(z[:, m], z[:, n], available[:, m] & available[:, n], temperature, kind)
            totals.append(s)
            counts.append(c)
    counts_all = _global_count(torch.stack(counts))
    active = counts_all > 0
    _, world = fdist.rank_world()
    # Masked sums rather than per_pair[active] / bool(active.any()): no host sync. A slot
    # pair with no anchors has a zero total, so it adds nothing; none active gives 0.
    per_pair = torch.stack(totals) * world / counts_all.clamp(min=1)
    return (per_pair * active).sum() / active.sum().clamp(min=1)


@torch.no_grad()
def pair_cosines(z: torch.Tensor, study: torch.Tensor) -> torch.Tensor:
    """The collapse monitor: cosines of matched pairs (two images of one study) and of
    unmatched pairs (images of different studies in the batch), as sums and counts so
    that windows and ranks can be pooled.

    Args:
        z: (N, D) pooled latents of the batch's images; study: (N,) study index of each.
    Returns:
        (4,) float32: sum of matched cosines, their count, sum of unmatched, their count.
    """
    zn = F.normalize(z.float(), dim=-1)
    cos = zn @ zn.T
    same = study[:, None] == study[None, :]
    matched = same & ~torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    return torch.stack([(cos * matched).sum(), matched.sum().float(), (cos * ~same).sum(), (~same).sum().float()])
