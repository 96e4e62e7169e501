"""Multi-view masked autoencoder (MVMAE) for paired radiographs, and its two baselines.

* :class:`ViewEncoder`: a timm ViT (one input channel, learned position embedding, CLS
  token) plus a learned view-type embedding (0 frontal, 1 lateral, 2 unknown) added to
  every patch token. Its masked path uses fastssl.ops: ``random_masking`` on the device
  and ``gather_tokens`` (kept tokens + position + view embedding in one pass).
* :class:`MultiViewMAE`: the encoder, a decoder of ``decoder_depth`` timm Blocks with its
  own position and view embeddings (input built by ``unshuffle_with_mask_token``), a
  linear head to p*p*C pixels and ``fastssl.ops.mae_loss``. Paired mode reconstructs each
  view from its own visible patches and aligns the two views' pooled latents; single
  mode (the unpaired baseline) is the same MAE without alignment.
* :class:`SupervisedViT`: the same encoder + a linear head over the CLS feature, trained
  with BCE-with-logits on the 14 CheXpert labels (the supervised baseline).

Shapes (B batch, C=1 channels, H=W=img_size, p patch, L=(H/p)^2 patches,
K=int(L*(1-mask_ratio)) visible patches, D encoder width, Dd decoder width):
    images (B, 1, H, W) float, already normalised (dataset mean/std: BatchAugment);
    views (B,) int64 in {0, 1, 2}; latent (B, 1+K, D); pred (B, L, p*p*C);
    mask (B, L) float32, 1 = masked.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer

from fastssl.ops import gather_tokens, mae_loss, random_masking, unshuffle_with_mask_token

__all__ = ["ModelConfig", "PRESETS", "model_config", "ViewEncoder", "MultiViewMAE",
           "SupervisedViT", "alignment_loss", "ALIGN_LOSSES", "TARGETS", "VIEW_IDS",
           "NUM_LABELS"]

VIEW_IDS = {"frontal": 0, "lateral": 1, "unknown": 2}  # as fastssl.data.datasets.VIEW_IDS
NUM_VIEWS = 3
NUM_LABELS = 14
ALIGN_LOSSES = ("mse", "cosine", "infonce")
TARGETS = ("norm_pix", "global")  # global: the input is already normalised -> raw pixel MSE


@dataclass(frozen=True)
class ModelConfig:
    """Architecture. Defaults are ViT-B/16 at 224 px with MVMAE's 4-block decoder."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 1
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    decoder_dim: int = 512
    decoder_depth: int = 4
    decoder_heads: int = 16
    target: str = "norm_pix"       # "norm_pix" (MAE) | "global" (MVMAE: pixel target on normalised input)
    align: str = "mse"             # "mse" | "cosine" | "infonce"
    temperature: float = 0.5       # InfoNCE only
    drop_path: float = 0.0

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2


PRESETS: dict[str, ModelConfig] = {
    "vit_base": ModelConfig(),
    "vit_small": ModelConfig(embed_dim=384, num_heads=6, decoder_dim=256, decoder_heads=8),
    "vit_tiny": ModelConfig(embed_dim=192, num_heads=3, decoder_dim=128, decoder_heads=4),
    # CPU tests and smoke runs: 32 px, 16 patches of 8 px, two blocks of width 32.
    "test": ModelConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                        decoder_dim=32, decoder_depth=2, decoder_heads=2),
}


def model_config(preset: str = "vit_base", **overrides) -> ModelConfig:
    """A preset with fields replaced, checked (ValueError naming the field)."""
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}; expected one of {sorted(PRESETS)}")
    cfg = replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
    if cfg.img_size % cfg.patch_size:
        raise ValueError(f"img_size={cfg.img_size} is not a multiple of patch_size={cfg.patch_size}")
    if cfg.target not in TARGETS:
        raise ValueError(f"target={cfg.target!r}; expected one of {TARGETS}")
    if cfg.align not in ALIGN_LOSSES:
        raise ValueError(f"align={cfg.align!r}; expected one of {ALIGN_LOSSES}")
    if cfg.embed_dim % cfg.num_heads or cfg.decoder_dim % cfg.decoder_heads:
        raise ValueError("embed_dim / decoder_dim must be multiples of num_heads / decoder_heads")
    if cfg.temperature <= 0:
        raise ValueError(f"temperature={cfg.temperature}; expected > 0")
    return cfg


def _check_images(images: torch.Tensor, cfg: ModelConfig, name: str = "images") -> None:
    want = (cfg.in_chans, cfg.img_size, cfg.img_size)
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != want:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name} has shape {shape}; expected (B, {want[0]}, {want[1]}, {want[2]})")
    if not images.dtype.is_floating_point:
        raise TypeError(f"{name} has dtype {images.dtype}; expected float (normalise uint8/uint16 "
                        "first, e.g. fastssl.data.augment.BatchAugment)")


def _view_ids(views, batch: int, device) -> torch.Tensor:
    """int | (B,) int tensor -> (B,) int64 on device."""
    if views is None:
        views = VIEW_IDS["unknown"]
    if isinstance(views, int):
        return torch.full((batch,), views, dtype=torch.long, device=device)
    if not isinstance(views, torch.Tensor) or views.shape != (batch,):
        shape = tuple(views.shape) if isinstance(views, torch.Tensor) else type(views).__name__
        raise ValueError(f"views has shape {shape}; expected an int or (B,) = ({batch},)")
    return views.to(device=device, dtype=torch.long)


class ViewEncoder(nn.Module):
    """timm ViT with one input channel and a view-type embedding on every patch token.

    The timm model provides patch_embed, cls_token, pos_embed (1, 1+L, D, CLS row first),
    blocks and norm; its classifier is absent (num_classes=0).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vit = VisionTransformer(
            img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_classes=0,
            embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
            qkv_bias=True, class_token=True, global_pool="token", drop_path_rate=cfg.drop_path)
        self.view_embed = nn.Embedding(NUM_VIEWS, cfg.embed_dim)
        nn.init.normal_(self.view_embed.weight, std=0.02)

    @property
    def num_patches(self) -> int:
        return self.cfg.num_patches

    def _cls(self, batch: int) -> torch.Tensor:
        return (self.vit.cls_token + self.vit.pos_embed[:, :1]).expand(batch, -1, -1)

    def forward_masked(self, images: torch.Tensor, views: torch.Tensor, ids_keep: torch.Tensor,
                       *, impl: str = "auto") -> torch.Tensor:
        """images (B, 1, H, W), views (B,), ids_keep (B, K) -> latent (B, 1+K, D), CLS first."""
        x = self.vit.patch_embed(images)                                  # (B, L, D)
        x = gather_tokens(x, ids_keep, pos_embed=self.vit.pos_embed[:, 1:],
                          sample_embed=self.view_embed(views), impl=impl)  # (B, K, D)
        x = torch.cat([self._cls(x.shape[0]).to(x.dtype), x], dim=1)
        x = self.vit.blocks(x)
        return self.vit.norm(x)

    def forward_features(self, images: torch.Tensor, views=None) -> torch.Tensor:
        """All patches visible: images (B, 1, H, W), views int | (B,) -> tokens (B, 1+L, D)."""
        _check_images(images, self.cfg)
        b = images.shape[0]
        x = self.vit.patch_embed(images)
        x = x + self.vit.pos_embed[:, 1:] + self.view_embed(_view_ids(views, b, x.device))[:, None]
        x = torch.cat([self._cls(b).to(x.dtype), x], dim=1)
        return self.vit.norm(self.vit.blocks(x))

    def forward(self, images: torch.Tensor, views=None) -> torch.Tensor:
        """CLS feature (B, D) of unmasked images (what a linear probe sees)."""
        return self.forward_features(images, views)[:, 0]


def _gather_with_grad(z: torch.Tensor) -> torch.Tensor:
    """(B, D) per rank -> (world*B, D) in rank order; the local rows keep their gradient,
    the other ranks' rows are constants (each rank back-propagates its own part)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z
    parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, z.detach().contiguous())
    parts[dist.get_rank()] = z
    return torch.cat(parts, dim=0)


def alignment_loss(za: torch.Tensor, zb: torch.Tensor, kind: str = "mse",
                   temperature: float = 0.5) -> torch.Tensor:
    """Alignment between two views' pooled latents; inputs are L2-normalised here.

    Args:
        za, zb: (B, D) float, row b of both from the same study.
        kind: "mse": mean over the batch of ||za - zb||^2 = 2 (1 - cos) (summed over D, so
              its scale does not depend on the width); "cosine": mean of 1 - cos (the
              negative cosine shifted by 1, so identical views give 0);
              "infonce": symmetric cross-view InfoNCE, logits cos / temperature, the
              positive of za[b] is zb[b], negatives every other zb of the global batch
              (gathered across ranks), and vice versa.
    Returns:
        0-dim float32 tensor.
    """
    if za.dim() != 2 or za.shape != zb.shape:
        raise ValueError(f"za {tuple(za.shape)} and zb {tuple(zb.shape)}: expected equal (B, D)")
    za = F.normalize(za.float(), dim=-1)
    zb = F.normalize(zb.float(), dim=-1)
    if kind == "mse":
        return (za - zb).pow(2).sum(-1).mean()
    if kind == "cosine":
        return (1 - (za * zb).sum(-1)).mean()
    if kind == "infonce":
        all_a, all_b = _gather_with_grad(za), _gather_with_grad(zb)
        rank = dist.get_rank() if all_a.shape[0] != za.shape[0] else 0
        target = torch.arange(za.shape[0], device=za.device) + rank * za.shape[0]
        loss_a = F.cross_entropy(za @ all_b.T / temperature, target)
        loss_b = F.cross_entropy(zb @ all_a.T / temperature, target)
        return (loss_a + loss_b) / 2
    raise ValueError(f"kind={kind!r}; expected one of {ALIGN_LOSSES}")


class MultiViewMAE(nn.Module):
    """Masked autoencoder over frontal + lateral pairs (paired) or single images (baseline).

    ``forward(frontal, lateral, mask_ratio=, beta=)``: paired mode. Both views go through
    the encoder and decoder as one batch of 2B (shared weights, independent masks).
    ``forward(images, None, views=...)``: single-view mode, no alignment.
    """

    def __init__(self, cfg: ModelConfig, *, impl: str = "auto"):
        super().__init__()
        self.cfg, self.impl = cfg, impl
        self.encoder = ViewEncoder(cfg)
        d, dd, p = cfg.embed_dim, cfg.decoder_dim, cfg.patch_size
        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, dd))
        self.decoder_view_embed = nn.Embedding(NUM_VIEWS, dd)
        self.decoder_blocks = nn.Sequential(*[
            Block(dd, cfg.decoder_heads, cfg.mlp_ratio, qkv_bias=True,
                  norm_layer=partial(nn.LayerNorm, eps=1e-6)) for _ in range(cfg.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(dd, eps=1e-6)
        self.decoder_pred = nn.Linear(dd, p * p * cfg.in_chans)
        for t in (self.mask_token, self.decoder_pos_embed, self.decoder_view_embed.weight):
            nn.init.normal_(t, std=0.02)
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):  # MAE's decoder init
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def decode(self, latent: torch.Tensor, views: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (B, 1+K, D), views (B,), ids_restore (B, L) -> pred (B, L, p*p*C)."""
        y = self.decoder_embed(latent)                                     # (B, 1+K, Dd)
        patches = unshuffle_with_mask_token(y[:, 1:], self.mask_token, ids_restore, impl=self.impl)
        patches = (patches + self.decoder_pos_embed[:, 1:]
                   + self.decoder_view_embed(views)[:, None])              # (B, L, Dd)
        y = torch.cat([y[:, :1] + self.decoder_pos_embed[:, :1], patches.to(y.dtype)], dim=1)
        y = self.decoder_norm(self.decoder_blocks(y))
        return self.decoder_pred(y[:, 1:])

    def reconstruct(self, images: torch.Tensor, views: torch.Tensor, mask_ratio: float,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One masked pass: images (B, 1, H, W), views (B,) -> dict(latent (B, 1+K, D),
        pred (B, L, p*p*C), mask (B, L), ids_restore (B, L))."""
        b = images.shape[0]
        ids_keep, ids_restore, mask = random_masking(
            b, self.encoder.num_patches, mask_ratio, device=images.device, generator=generator)
        latent = self.encoder.forward_masked(images, views, ids_keep, impl=self.impl)
        pred = self.decode(latent, views, ids_restore)
        return dict(latent=latent, pred=pred, mask=mask, ids_restore=ids_restore)

    def recon_loss(self, pred: torch.Tensor, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        target = "norm_pix" if self.cfg.target == "norm_pix" else "pixel"
        return mae_loss(pred, images, mask, patch_size=self.cfg.patch_size, target=target, impl=self.impl)

    def forward(self, frontal: torch.Tensor, lateral: torch.Tensor | None = None, *,
                mask_ratio: float = 0.93, beta: float = 0.0, views=None,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Paired: frontal, lateral (B, 1, H, W) -> dict(loss, recon, recon_frontal,
        recon_lateral, align, beta, pred (2B, L, P), mask (2B, L)); frontal rows first.
        loss = (recon_frontal + recon_lateral) / 2 + beta * align.

        Single (lateral=None): frontal holds any images, views int | (B,) (default
        unknown) -> dict(loss, recon, pred (B, L, P), mask (B, L)); align is 0.
        """
        _check_images(frontal, self.cfg, "frontal" if lateral is not None else "images")
        b = frontal.shape[0]
        if lateral is None:
            v = _view_ids(views, b, frontal.device)
            out = self.reconstruct(frontal, v, mask_ratio, generator)
            recon = self.recon_loss(out["pred"], frontal, out["mask"])
            zero = recon.new_zeros(())
            return dict(loss=recon, recon=recon, align=zero, beta=zero, pred=out["pred"], mask=out["mask"])
        _check_images(lateral, self.cfg, "lateral")
        if lateral.shape[0] != b:
            raise ValueError(f"frontal has {b} images and lateral {lateral.shape[0]}; expected pairs")
        images = torch.cat([frontal, lateral], dim=0)
        v = torch.cat([_view_ids(VIEW_IDS["frontal"], b, images.device),
                       _view_ids(VIEW_IDS["lateral"], b, images.device)])
        out = self.reconstruct(images, v, mask_ratio, generator)
        rf = self.recon_loss(out["pred"][:b], frontal, out["mask"][:b])
        rl = self.recon_loss(out["pred"][b:], lateral, out["mask"][b:])
        pooled = out["latent"].mean(dim=1)  # CLS + visible tokens
        align = alignment_loss(pooled[:b], pooled[b:], self.cfg.align, self.cfg.temperature)
        recon = (rf + rl) / 2
        beta_t = recon.new_tensor(float(beta))
        return dict(loss=recon + beta_t * align, recon=recon, recon_frontal=rf, recon_lateral=rl,
                    align=align, beta=beta_t, pred=out["pred"], mask=out["mask"])

    def encode(self, images: torch.Tensor, views=None) -> torch.Tensor:
        """CLS features of unmasked images: (B, 1, H, W), views int | (B,) -> (B, D)."""
        return self.encoder(images, views)


class SupervisedViT(nn.Module):
    """The supervised baseline: ViewEncoder + linear head on CLS, BCE over 14 labels."""

    def __init__(self, cfg: ModelConfig, num_labels: int = NUM_LABELS):
        super().__init__()
        self.cfg = cfg
        self.encoder = ViewEncoder(cfg)
        self.head = nn.Linear(cfg.embed_dim, num_labels)
        nn.init.zeros_(self.head.bias)
        nn.init.normal_(self.head.weight, std=0.01)

    def forward(self, images: torch.Tensor, views=None, labels: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """images (B, 1, H, W), labels (B, 14) in {0, 1, -1 = ignore} -> dict(logits (B, 14),
        loss: BCE-with-logits averaged over the non-ignored entries; 0 if labels is None)."""
        logits = self.head(self.encoder(images, views))
        if labels is None:
            return dict(logits=logits, loss=logits.new_zeros(()))
        if labels.shape != logits.shape:
            raise ValueError(f"labels has shape {tuple(labels.shape)}; expected {tuple(logits.shape)}")
        return dict(logits=logits, loss=masked_bce(logits, labels))

    def encode(self, images: torch.Tensor, views=None) -> torch.Tensor:
        return self.encoder(images, views)


def masked_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits over entries whose label is 0 or 1 (-1 = ignore). logits, labels (N, C)."""
    valid = labels >= 0
    per = F.binary_cross_entropy_with_logits(logits.float(), labels.clamp(min=0).float(), reduction="none")
    return (per * valid).sum() / valid.sum().clamp(min=1)


def config_dict(cfg: ModelConfig) -> dict:
    return asdict(cfg)
