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
    for k in ("loss", "recon", "align", "beta"):
        assert out[k].dim() == 0 and torch.isfinite(out[k])
    torch.testing.assert_close(out["loss"], out["recon"] + 1.5 * out["align"])
    torch.testing.assert_close(out["recon"].detach(), (out["recon_frontal"] + out["recon_lateral"]) / 2)
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())  # every parameter is used


def _studies_by_hand(model, images, available, views, ratio, seed):
    """The parts in float64-free plain PyTorch: the available images in (study, slot) order
    with their view ids, one masked pass, mean-pooled latents (CLS + visible tokens),
    the released reconstruction reduction and alignment_loss over the slots."""
    b, v = available.shape
    flat = torch.cat([images[i, j][None] for i in range(b) for j in range(v) if available[i, j]])
    ids = torch.tensor([int(views[i, j]) for i in range(b) for j in range(v) if available[i, j]])
    out = model.reconstruct(flat, ids, ratio, torch.Generator().manual_seed(seed))
    pooled = out["latent"].mean(dim=1)
    z = torch.zeros(b, v, pooled.shape[1])
    z[available] = pooled
    # released: per image mean((pred - x)^2 * mask_pixels) / ratio; per slot the mean over the
    # batch of avail x that; the mean over the slots.
    p = model.cfg.patch_size
    side = model.cfg.img_size // p
    pred_img = out["pred"].reshape(-1, side, side, p, p).permute(0, 1, 3, 2, 4).reshape(flat.shape)
    mask_img = out["mask"].reshape(-1, side, 1, side, 1).expand(-1, side, p, side, p).reshape(flat.shape)
    per_image = (((pred_img - flat) ** 2 * mask_img) / ratio).mean(dim=(1, 2, 3))
    slot_loss = torch.zeros(b, v)
    slot_loss[available] = per_image
    recon = slot_loss.mean(dim=0).mean()
    return dict(pred=out["pred"], z=z, recon=recon)


def test_paired_aligns_mean_pooled_latents_with_lateral_view_ids(model):
    """Issue 15 items 1-2: alignment on the mean-pooled latent (not CLS), lateral images
    with the lateral view id, both checked against the model's parts."""
    f, l = _pair(3, seed=2)
    out = model(f, l, mask_ratio=0.75, beta=1.0, generator=torch.Generator().manual_seed(4))
    views = torch.tensor([[0, 1]] * 3)
    want = _studies_by_hand(model, torch.stack([f, l], 1), torch.ones(3, 2, dtype=torch.bool), views, 0.75, 4)
    torch.testing.assert_close(out["pred"], want["pred"])
    torch.testing.assert_close(out["align"], alignment_loss(want["z"], None, model.cfg.align))
    torch.testing.assert_close(out["recon"], want["recon"])
    assert out["views"].tolist() == [0, 1] * 3


def test_flu_masks_reconstruct_every_image_and_align_only_pairs(model):
    """Flu: each available image is reconstructed (single-image studies too), alignment
    only between images of one study, missing slots change nothing."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 1, 32, 32, generator=g)
    available = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.bool)
    views = torch.tensor([[0, 1, 0], [0, 0, 0], [0, 1, 2], [0, 2, 0]])
    out = model(images, available=available, views=views, mask_ratio=0.75, beta=2.0,
                generator=torch.Generator().manual_seed(9))
    assert out["pred"].shape[0] == 7 and out["study"].tolist() == [0, 0, 1, 2, 2, 2, 3]
    assert out["views"].tolist() == [0, 1, 0, 0, 1, 2, 2]
    want = _studies_by_hand(model, images, available, views, 0.75, 9)
    torch.testing.assert_close(out["pred"], want["pred"])
    torch.testing.assert_close(out["recon"], want["recon"])
    torch.testing.assert_close(out["align"], alignment_loss(want["z"], available, "mse"))
    # released mse: studies 0 (1 pair x2) and 2 (3 pairs x2) only, / V^2 = 9, mean over 4 studies
    zn = F.normalize(want["z"].detach(), dim=-1)
    d = want["z"].shape[-1]
    by_hand = sum(2 * float(((zn[s, i] - zn[s, j]) ** 2).mean()) for s, i, j in
                  [(0, 0, 1), (2, 0, 1), (2, 0, 2), (2, 1, 2)]) / 9 / 4
    assert float(out["align"].detach()) == pytest.approx(by_hand, rel=1e-5) and d == 32
    images2 = images.clone()
    images2[~available] = 100.0  # what sits in a missing slot is never read
    out2 = model(images2, available=available, views=views, mask_ratio=0.75, beta=2.0,
                 generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(out2["loss"], out["loss"])
    single = torch.tensor([[1, 0, 0]] * 4, dtype=torch.bool)  # no study has two images
    out3 = model(images, available=single, views=views, mask_ratio=0.75, beta=2.0)
    assert float(out3["align"].detach()) == 0.0 and float(out3["recon"].detach()) > 0
    assert float(out3["monitor"][1]) == 0  # no matched pair in the batch


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
    assert out["pred"].shape[0] == 4 and float(out["align"].detach()) == 0.0
    torch.testing.assert_close(out["loss"], out["recon"])


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
    model.cfg = model_config("test", target="norm_pix")
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
        model_config("test", align="l1")
    with pytest.raises(ValueError, match="recipe"):
        model_config("test", recipe="simclr")
    with pytest.raises(ValueError, match="decoder_embed"):
        model_config("test", decoder_dim=64)
    with pytest.raises(ValueError, match="multiple"):
        model_config("test", img_size=36)


def test_presets_build_the_paper_encoder():
    cfg = model_config("vit_base")
    enc = ViewEncoder(cfg)
    assert (cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.decoder_depth) == (224, 16, 768, 12, 4)
    assert enc.vit.patch_embed.proj.in_channels == 1
    assert tuple(enc.vit.pos_embed.shape) == (1, 197, 768)
    assert sum(p.numel() for p in enc.parameters()) == pytest.approx(85.6e6, rel=0.01)


def test_mvmae_recipe_builds_the_released_model():
    """Released (agostini335/MVMAE NetworksMAE.py, ConfigMAENetworks.py ViTbase*): qk-norm in
    encoder and decoder, decoder width 768 = encoder, 12 heads, 4 blocks, no projection,
    the decoder view embedding on CLS too, no CLS position embedding, PyTorch default init
    of Linear layers, trunc_normal(0.02) tokens."""
    cfg = model_config("vit_base", recipe="mvmae")
    assert (cfg.decoder_dim, cfg.decoder_heads, cfg.decoder_depth) == (768, 12, 4)
    assert cfg.qk_norm and not cfg.decoder_embed and cfg.decoder_view_embed_cls and not cfg.cls_pos_embed
    assert (cfg.target, cfg.align, cfg.recon_reduction, cfg.init) == ("global", "mse", "released", "released")
    assert cfg == model_config() and cfg == __import__("fastssl.models.mvmae", fromlist=["x"]).ModelConfig()
    torch.manual_seed(0)
    m = MultiViewMAE(model_config("vit_tiny", recipe="mvmae", depth=2))
    assert isinstance(m.decoder_embed, torch.nn.Identity)
    assert isinstance(m.encoder.vit.blocks[0].attn.q_norm, torch.nn.LayerNorm)
    assert isinstance(m.decoder_blocks[0].attn.k_norm, torch.nn.LayerNorm)
    assert float(m.encoder.vit.pos_embed[0, 0].abs().max()) == 0.0  # the unused CLS row
    assert m.encoder.vit.norm.eps == 1e-5 and m.decoder_norm.eps == 1e-5
    # PyTorch's Linear init is U(-1/sqrt(fan_in), 1/sqrt(fan_in)): std 1/sqrt(3 fan_in);
    # timm's / MAE's would be 0.02 (trunc normal) or xavier.
    w = m.encoder.vit.blocks[0].mlp.fc1.weight
    assert float(w.std()) == pytest.approx(1 / math.sqrt(3 * 192), rel=0.05)
    assert float(w.abs().max()) <= 1 / math.sqrt(192)
    assert float(m.decoder_pred.weight.std()) == pytest.approx(1 / math.sqrt(3 * 192), rel=0.05)
    for t in (m.encoder.vit.pos_embed[0, 1:], m.encoder.view_embed.weight, m.mask_token,
              m.decoder_pos_embed, m.encoder.vit.cls_token):
        assert float(t.std()) == pytest.approx(0.02, rel=0.35)  # (timm: cls_token std 1e-6)


def test_mae_recipe_keeps_the_mae_choices():
    cfg = model_config("vit_base", recipe="mae")
    assert (cfg.decoder_dim, cfg.decoder_heads, cfg.decoder_depth) == (512, 16, 4)
    assert not cfg.qk_norm and cfg.decoder_embed and cfg.cls_pos_embed and cfg.init == "mae"
    assert cfg.align == "l2" and cfg.recon_reduction == "image"
    torch.manual_seed(0)
    m = MultiViewMAE(model_config("test", recipe="mae"))
    assert isinstance(m.decoder_embed, torch.nn.Linear)
    assert isinstance(m.encoder.vit.blocks[0].attn.q_norm, torch.nn.Identity)


def test_decoder_view_embedding_on_cls_changes_the_prediction():
    torch.manual_seed(0)
    on = MultiViewMAE(model_config("test"))
    off = MultiViewMAE(model_config("test", decoder_view_embed_cls=False))
    off.load_state_dict(on.state_dict())
    f, _ = _pair(2)
    a = on(f, None, views=1, mask_ratio=0.5, generator=torch.Generator().manual_seed(0))["pred"]
    b = off(f, None, views=1, mask_ratio=0.5, generator=torch.Generator().manual_seed(0))["pred"]
    assert not torch.allclose(a, b)
    with torch.no_grad():
        on.decoder_view_embed.weight.zero_()
        off.decoder_view_embed.weight.zero_()
    a = on(f, None, views=1, mask_ratio=0.5, generator=torch.Generator().manual_seed(0))["pred"]
    b = off(f, None, views=1, mask_ratio=0.5, generator=torch.Generator().manual_seed(0))["pred"]
    torch.testing.assert_close(a, b)


def test_unknown_view_embedding_is_trained_in_flu_not_in_paired(model):
    """Issue 8 item 4: flu batches give the unknown slot (id 2) data, so its embedding gets a
    gradient; paired batches never do (pretrain warns when the cache has such images)."""
    images = torch.randn(2, 3, 1, 32, 32)
    available = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    views = torch.tensor([[0, 1, 2], [2, 0, 0]])
    model(images, available=available, views=views, mask_ratio=0.75, beta=1.0)["loss"].backward()
    assert float(model.encoder.view_embed.weight.grad[2].abs().sum()) > 0
    assert float(model.decoder_view_embed.weight.grad[2].abs().sum()) > 0
    model.zero_grad()
    f, l = _pair(2)
    model(f, l, mask_ratio=0.75, beta=1.0)["loss"].backward()
    assert float(model.encoder.view_embed.weight.grad[2].abs().sum()) == 0


def test_released_cls_position_row_never_trains():
    """cls_pos_embed=False: the CLS row of pos_embed gets no gradient (stays 0 under AdamW with
    decay), the patch rows do."""
    torch.manual_seed(0)
    m = MultiViewMAE(model_config("test"))
    f, l = _pair(2)
    m(f, l, mask_ratio=0.5, beta=1.0)["loss"].backward()
    g = m.encoder.vit.pos_embed.grad[0]
    assert float(g[0].abs().max()) == 0.0 and float(g[1:].abs().max()) > 0


def test_all_available_path_equals_the_boolean_indexing_path(model):
    """Paired and single modes take the slots by reshaping (no host sync); the result must
    equal the general path that indexes with the availability mask, value and gradient."""
    f, l = _pair(b=3, seed=5)
    images = torch.stack([f, l], dim=1)
    available = torch.ones(3, 2, dtype=torch.bool)
    views = torch.tensor([[0, 1]] * 3)
    outs, grads = [], []
    for fast in (False, True):
        model.zero_grad()
        out = model.forward_studies(images, available, views, mask_ratio=0.75, beta=0.7,
                                    generator=torch.Generator().manual_seed(3), all_available=fast)
        out["loss"].backward()
        outs.append(out)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    for key in ("loss", "recon", "align", "pred", "study", "views", "recon_per_image"):
        torch.testing.assert_close(outs[1][key], outs[0][key], rtol=0, atol=0)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-7)


def test_paired_per_view_losses_equal_their_parts(model):
    """recon_frontal / recon_lateral come from the one fused loss call's per-image values:
    they must equal the loss of each view's rows computed on their own."""
    f, l = _pair(b=4, seed=9)
    out = model(f, l, mask_ratio=0.75, beta=0.0, generator=torch.Generator().manual_seed(4))
    scale = model._recon_scale(4, 4, out["mask"], 0.75)
    for name, rows, images in (("recon_frontal", slice(0, None, 2), f), ("recon_lateral", slice(1, None, 2), l)):
        alone = model.recon_loss(out["pred"][rows].detach(), images, out["mask"][rows]) * scale
        torch.testing.assert_close(out[name], alone, rtol=1e-6, atol=1e-7)
