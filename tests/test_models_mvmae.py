"""MultiViewMAE / SupervisedViT on the tiny CPU preset: shapes, masking, view embedding,
alignment losses, overfitting a batch, bad input."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastssl.models.mvmae import (
    MultiViewMAE, SupervisedViT, ViewEncoder, alignment_loss, masked_bce, model_config,
)
from fastssl.reference.mae import num_kept

from _mvmae_helpers import one_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def _pair(b=4, seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1, size, size, generator=g), torch.randn(b, 1, size, size, generator=g)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return MultiViewMAE(model_config("test"))


def test_paired_shapes_and_loss_composition(model):
    f, l = _pair()
    out = model(f, l, mask_ratio=0.75, beta=1.5)
    cfg = model.cfg
    assert out["pred"].shape == (8, cfg.num_patches, cfg.patch_size ** 2)
    assert out["mask"].shape == (8, cfg.num_patches)
    for k in ("loss", "recon", "recon_frontal", "recon_lateral", "align", "beta"):
        assert out[k].dim() == 0 and torch.isfinite(out[k])
    torch.testing.assert_close(out["recon"], (out["recon_frontal"] + out["recon_lateral"]) / 2)
    torch.testing.assert_close(out["loss"], out["recon"] + 1.5 * out["align"])
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())  # every parameter is used


@pytest.mark.parametrize("ratio", [0.75, 0.93, 0.5])
def test_mask_ratio_gives_the_visible_count(model, ratio):
    f, _ = _pair(3)
    n = model.cfg.num_patches
    k = num_kept(n, ratio)
    ids_keep, _, mask = __import__("fastssl.ops", fromlist=["random_masking"]).random_masking(3, n, ratio)
    latent = model.encoder.forward_masked(f, torch.zeros(3, dtype=torch.long), ids_keep)
    assert latent.shape == (3, 1 + k, model.cfg.embed_dim)
    out = model(f, None, mask_ratio=ratio)
    assert (out["mask"] == 0).sum(1).tolist() == [k] * 3
    # the paper's geometry: 224 px, patch 16 -> 196 patches, 0.93 keeps 13
    assert model_config("vit_base").num_patches == 196 and num_kept(196, 0.93) == 13


def test_view_embedding_changes_the_output(model):
    f, _ = _pair(2)
    with torch.no_grad():
        a, b = model.encode(f, 0), model.encode(f, 1)
        assert a.shape == (2, model.cfg.embed_dim)
        assert not torch.allclose(a, b)
        g = torch.Generator().manual_seed(5)
        r0 = model(f, None, views=0, mask_ratio=0.75, generator=g)["pred"]
        g = torch.Generator().manual_seed(5)
        r1 = model(f, None, views=1, mask_ratio=0.75, generator=g)["pred"]
        assert not torch.allclose(r0, r1)  # the decoder's view embedding too
        torch.testing.assert_close(model.encode(f, torch.tensor([0, 1]))[1], b[1])


def test_single_mode_has_no_alignment(model):
    f, _ = _pair()
    out = model(f, None, views=torch.tensor([0, 1, 2, 0]), mask_ratio=0.75, beta=2.0)
    assert out["pred"].shape[0] == 4 and float(out["align"]) == 0.0
    torch.testing.assert_close(out["loss"], out["recon"])


def test_alignment_zero_for_identical_positive_otherwise():
    z = torch.randn(5, 16)
    for kind in ("mse", "cosine"):
        assert float(alignment_loss(z, z, kind)) == pytest.approx(0.0, abs=1e-6)
        assert float(alignment_loss(z, torch.randn(5, 16), kind)) > 0.1
        assert float(alignment_loss(z, 3 * z, kind)) == pytest.approx(0.0, abs=1e-6)  # scale-free
    a, b = F.normalize(z, dim=1), F.normalize(torch.randn(5, 16), dim=1)
    cos = (a * b).sum(1)
    torch.testing.assert_close(alignment_loss(z, b, "mse"), (2 - 2 * cos).mean())
    torch.testing.assert_close(alignment_loss(z, b, "cosine"), (1 - cos).mean())


def test_infonce_matches_hand_computation():
    za, zb = torch.randn(3, 4), torch.randn(3, 4)
    a, b = F.normalize(za, dim=1), F.normalize(zb, dim=1)
    t = 0.5
    total = 0.0
    for x, y in ((a, b), (b, a)):
        for i in range(3):
            logits = [float(x[i] @ y[j]) / t for j in range(3)]
            total += -(logits[i] - math.log(sum(math.exp(v) for v in logits)))
    want = total / 6
    assert float(alignment_loss(za, zb, "infonce", temperature=t)) == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="kind"):
        alignment_loss(za, zb, "l1")


def test_paired_model_overfits_a_batch():
    torch.manual_seed(0)
    model = MultiViewMAE(model_config("test", target="global"))
    f, l = _pair(4, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(20):
        g = torch.Generator().manual_seed(0)  # the same masks every step: a fixed task
        out = model(f, l, mask_ratio=0.5, beta=0.5, generator=g)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert losses[-1] < 0.6 * losses[0], losses


def test_norm_pix_and_global_targets_differ(model):
    f, l = _pair()
    g = torch.Generator().manual_seed(0)
    a = model(f, l, mask_ratio=0.75, generator=g)["recon"]
    model.cfg = model_config("test", target="global")
    g = torch.Generator().manual_seed(0)
    b = model(f, l, mask_ratio=0.75, generator=g)["recon"]
    assert not torch.allclose(a, b)


def test_supervised_baseline():
    torch.manual_seed(0)
    m = SupervisedViT(model_config("test"))
    x, _ = _pair(6)
    y = torch.randint(-1, 2, (6, 14))
    out = m(x, 0, y)
    assert out["logits"].shape == (6, 14)
    valid = y >= 0
    want = F.binary_cross_entropy_with_logits(out["logits"][valid], y[valid].float())
    torch.testing.assert_close(out["loss"], want)
    assert float(masked_bce(torch.zeros(2, 14), torch.full((2, 14), -1))) == 0.0
    assert m.encode(x, 0).shape == (6, 32)


def test_bad_input_names_argument_and_shape(model):
    with pytest.raises(ValueError, match=r"frontal has shape \(2, 1, 16, 16\).*expected \(B, 1, 32, 32\)"):
        model(torch.zeros(2, 1, 16, 16), torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="lateral"):
        model(torch.zeros(2, 1, 32, 32), torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="pairs"):
        model(torch.zeros(2, 1, 32, 32), torch.zeros(3, 1, 32, 32))
    with pytest.raises(TypeError, match="uint8"):
        model.encode(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="views"):
        model.encode(torch.zeros(2, 1, 32, 32), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="preset"):
        model_config("vit_huge")
    with pytest.raises(ValueError, match="align"):
        model_config("test", align="l2")
    with pytest.raises(ValueError, match="multiple"):
        model_config("test", img_size=36)


def test_presets_build_the_paper_encoder():
    cfg = model_config("vit_base")
    enc = ViewEncoder(cfg)
    assert (cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.decoder_depth) == (224, 16, 768, 12, 4)
    assert enc.vit.patch_embed.proj.in_channels == 1
    assert tuple(enc.vit.pos_embed.shape) == (1, 197, 768)
    assert sum(p.numel() for p in enc.parameters()) == pytest.approx(85.6e6, rel=0.01)
