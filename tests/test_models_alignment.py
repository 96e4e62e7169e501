"""fastssl.models.alignment against direct float64 transcriptions of the released MVMAE
formulas (agostini335/MVMAE mm_maes/mm_mae_mmvm.py feats_mse, mm_maes/utils.py
ContrastiveLoss), and the cross-rank gradient against one process over the global batch."""
from __future__ import annotations

import json
import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from fastssl.models.alignment import ALIGN_LOSSES, alignment_loss, pair_cosines


def _latents(b, v, d, seed, missing: bool):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, v, d, generator=g, dtype=torch.float64) * 3 + 0.5
    avail = torch.ones(b, v, dtype=torch.bool)
    if missing:
        avail = torch.rand(b, v, generator=g) < 0.6
        avail[0] = True            # one study with every view
        avail[1, 1:] = False       # one single-image study
    return z, avail


def released_mse(z, avail):
    """feats_mse: (V, B, D) stacked, normalised; mean over D of the squared difference for
    every ordered slot pair, masked by both availabilities, summed over pairs / V^2, mean over B."""
    v = z.shape[1]
    t = F.normalize(z.transpose(0, 1), dim=-1)                  # (V, B, D)
    m = avail.transpose(0, 1)                                   # (V, B)
    diff = ((t[None] - t[:, None]) ** 2).mean(-1)               # (V, V, B)
    both = torch.logical_and(m[None], m[:, None])
    return ((both * diff).sum(dim=(0, 1)) / v ** 2).mean()


def released_cosine_sim(z, avail):
    """feats_cos_sim: (V, B, D) stacked, normalised; the cosine of every ordered slot pair,
    masked by both availabilities and by the off-diagonal, summed over pairs /
    (V^2 - V); minus the mean over B."""
    v = z.shape[1]
    t = F.normalize(z.transpose(0, 1), dim=-1)                  # (V, B, D)
    m = avail.transpose(0, 1)                                   # (V, B)
    cos = (t[None] * t[:, None]).sum(-1)                        # (V, V, B)
    both = torch.logical_and(m[None], m[:, None])
    nondiag = (torch.ones(v, v, dtype=z.dtype) - torch.eye(v, dtype=z.dtype))[..., None]
    return -((nondiag * both * cos).sum(dim=(0, 1)) / (v ** 2 - v)).mean()


def released_contrastive(zi, zj, mi, mj, temperature, rows="all"):
    """ContrastiveLoss.forward on one process; rows="available" averages only the anchors
    whose pair is available (fastssl's definition), "all" every anchor (released)."""
    zi, zj = F.normalize(zi, dim=1), F.normalize(zj, dim=1)
    z_all = torch.cat([zi, zj])
    sim = torch.cat([zi, zj]) @ z_all.T
    pos = torch.cat([(zi * zj).sum(1)] * 2)
    both = torch.cat([torch.logical_and(mi, mj)] * 2)
    mask = both[None, :].expand(sim.shape[0], -1) & ~torch.eye(z_all.shape[0], dtype=torch.bool)
    denom = (torch.exp(sim / temperature) * mask).sum(1) + 1e-12
    losses = -torch.log(torch.exp(pos / temperature) / denom)
    return losses.mean() if rows == "all" else losses[both].mean()


def released_ntxent(z, avail, temperature=0.5, rows="all"):
    """feats_simclr: the mean over ordered slot pairs m != n of ContrastiveLoss(m, n)."""
    v = z.shape[1]
    per_pair = []
    for m in range(v):
        for n in range(v):
            if m == n or (rows != "all" and not bool((avail[:, m] & avail[:, n]).any())):
                continue
            per_pair.append(released_contrastive(z[:, m], z[:, n], avail[:, m], avail[:, n], temperature, rows))
    return torch.stack(per_pair).mean()


def infonce_by_hand(z, avail, t):
    """Cross-view InfoNCE per slot pair, both directions, averaged over anchors then pairs."""
    zn = F.normalize(z, dim=-1)
    pairs = []
    for m in range(z.shape[1]):
        for n in range(m + 1, z.shape[1]):
            ok = (avail[:, m] & avail[:, n]).nonzero().flatten().tolist()
            if not ok:
                continue
            terms = []
            for x, y in ((zn[:, m], zn[:, n]), (zn[:, n], zn[:, m])):
                for i in ok:
                    logits = [float(x[i] @ y[j]) / t for j in ok]
                    terms.append(-(logits[ok.index(i)] - math.log(sum(math.exp(u) for u in logits))))
            pairs.append(sum(terms) / len(terms))
    return sum(pairs) / len(pairs)


@pytest.mark.parametrize("views", [2, 3])
@pytest.mark.parametrize("missing", [False, True])
def test_mse_is_the_released_definition(views, missing):
    z, avail = _latents(16, views, 768, seed=views, missing=missing)
    got = alignment_loss(z.float(), avail, "mse")
    want = released_mse(z, avail)
    assert float(got) == pytest.approx(float(want), rel=2e-5)
    if views == 2 and not missing:  # = (1 - cos) / D for two views
        cos = F.cosine_similarity(z[:, 0], z[:, 1], dim=-1)
        assert float(got) == pytest.approx(float(((1 - cos) / 768).mean()), rel=2e-5)


@pytest.mark.parametrize("views", [2, 3])
@pytest.mark.parametrize("missing", [False, True])
def test_ntxent_is_the_released_simclr_loss(views, missing):
    z, avail = _latents(12, views, 768, seed=10 + views, missing=missing)
    got = float(alignment_loss(z.float(), avail, "ntxent", temperature=0.5))
    # All views present: exactly the released value. With missing views: the released
    # formula averaged over the anchors whose pair exists (the documented difference).
    want = float(released_ntxent(z, avail, 0.5, rows="all" if not missing else "available"))
    assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("missing", [False, True])
def test_l2_cosine_infonce_by_hand(missing):
    z, avail = _latents(6, 3, 768, seed=3, missing=missing)
    zn = F.normalize(z, dim=-1)
    pairs = [(b, i, j) for b in range(6) for i in range(3) for j in range(3)
             if i != j and avail[b, i] and avail[b, j]]
    l2 = sum(float(((zn[b, i] - zn[b, j]) ** 2).sum()) for b, i, j in pairs) / len(pairs)
    cos = -sum(float(zn[b, i] @ zn[b, j]) for b, i, j in pairs) / (6 * 3 * 2)  # / (B V (V-1))
    assert float(alignment_loss(z.float(), avail, "l2")) == pytest.approx(l2, rel=1e-5)
    assert float(alignment_loss(z.float(), avail, "cosine")) == pytest.approx(cos, rel=1e-5)
    assert float(alignment_loss(z.float(), avail, "infonce", 0.3)) == pytest.approx(
        infonce_by_hand(z, avail, 0.3), rel=1e-5)


@pytest.mark.parametrize("views", [2, 3])
@pytest.mark.parametrize("missing", [False, True])
def test_cosine_is_the_released_cosine_sim_value_and_gradient(views, missing):
    """A flu batch (single-image studies, studies with every slot, missing slots): value and
    latent gradient of --align cosine equal the released feats_cos_sim's, in float64."""
    z, avail = _latents(10, views, 96, seed=20 + views, missing=missing)
    mine = z.clone().requires_grad_(True)
    got = alignment_loss(mine, avail, "cosine")
    (g_got,) = torch.autograd.grad(got, mine)
    ref = z.clone().requires_grad_(True)
    want = released_cosine_sim(ref, avail)
    (g_want,) = torch.autograd.grad(want, ref)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    torch.testing.assert_close(g_got.double(), g_want, rtol=1e-5, atol=1e-9)


def test_mse_weight_is_2d_times_smaller_than_l2():
    z, avail = _latents(8, 2, 768, seed=4, missing=False)
    ratio = float(alignment_loss(z.float(), avail, "l2")) / float(alignment_loss(z.float(), avail, "mse"))
    assert ratio == pytest.approx(2 * 768, rel=1e-4)


def test_identical_views_and_bad_input():
    z = torch.randn(4, 1, 16).expand(4, 3, 16)
    for kind in ("mse", "l2"):
        assert float(alignment_loss(z, None, kind)) == pytest.approx(0.0, abs=1e-6)
    assert float(alignment_loss(z, None, "cosine")) == pytest.approx(-1.0, abs=1e-6)
    assert float(alignment_loss(torch.randn(4, 1, 16), None, "ntxent")) == 0.0  # one slot: nothing to align
    with pytest.raises(ValueError, match="kind"):
        alignment_loss(z, None, "l1")
    with pytest.raises(ValueError, match=r"z has shape \(4, 16\)"):
        alignment_loss(torch.randn(4, 16))
    with pytest.raises(ValueError, match="available has shape"):
        alignment_loss(z, torch.ones(4, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature"):
        alignment_loss(z, None, "ntxent", temperature=0)


def test_pair_cosines_matched_and_unmatched():
    z = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))  # seeded: a sum near 0 fails rel=1e-6
    study = torch.tensor([0, 0, 1, 2, 2])
    zn = F.normalize(z, dim=-1)
    matched = [float(zn[i] @ zn[j]) for i in range(5) for j in range(5) if i != j and study[i] == study[j]]
    unmatched = [float(zn[i] @ zn[j]) for i in range(5) for j in range(5) if study[i] != study[j]]
    s = pair_cosines(z, study)
    assert float(s[0] / s[1]) == pytest.approx(sum(matched) / len(matched), rel=1e-6)
    assert float(s[2] / s[3]) == pytest.approx(sum(unmatched) / len(unmatched), rel=1e-6)
    assert s[1] == 4 and s[3] == 16


# ---------------------------------------------------------------- across gloo ranks
B, V, D = 4, 3, 12


def _global_batch(world):
    return _latents(B * world, V, D, seed=99, missing=True)


def _rank_worker(rank, world, port, result_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    z, avail = _global_batch(world)
    rows = slice(rank * B, (rank + 1) * B)
    res = {}
    for kind in ALIGN_LOSSES:
        local = z[rows].float().clone().requires_grad_(True)
        loss = alignment_loss(local, avail[rows], kind, temperature=0.5)
        loss.backward()
        res[kind] = dict(loss=float(loss), grad=local.grad.tolist())
    dist.destroy_process_group()
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(res, handle)


@pytest.mark.parametrize("world", [2, 3])
def test_gradient_across_ranks_equals_one_process(tmp_path, world):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the workers inherit the imported modules (spawn re-imports torch: ~20 s a rank here)
    mp.start_processes(_rank_worker, args=(world, port, str(tmp_path)), nprocs=world, start_method="fork")
    res = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(world)]
    z, avail = _global_batch(world)
    for kind in ALIGN_LOSSES:
        glob = z.float().clone().requires_grad_(True)
        loss = alignment_loss(glob, avail, kind, temperature=0.5)
        loss.backward()
        # DDP averages the ranks' gradients: mean of the rank losses = the global loss,
        # and each rank's latent gradient / world = the global gradient of its rows.
        mean_loss = sum(r[kind]["loss"] for r in res) / world
        assert mean_loss == pytest.approx(float(loss.detach()), rel=1e-5), kind
        for rank, r in enumerate(res):
            got = torch.tensor(r[kind]["grad"]) / world
            torch.testing.assert_close(got, glob.grad[rank * B:(rank + 1) * B], rtol=1e-4, atol=1e-7,
                                       msg=lambda m: f"{kind} rank {rank}: {m}")
