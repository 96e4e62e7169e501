"""Multi-view masked autoencoder (MVMAE) for paired radiographs, and its two baselines.

* :class:`ViewEncoder`: a timm ViT (one input channel, learned position embedding, CLS
  token) plus a learned view-type embedding (0 frontal, 1 lateral, 2 unknown) added to
  every patch token. Its masked path uses fastssl.ops: ``random_masking`` on the device
  and ``gather_tokens`` (kept tokens + position + view embedding in one pass).
* :class:`MultiViewMAE`: the encoder, a decoder of ``decoder_depth`` timm Blocks with its
  own position and view embeddings (input built by ``unshuffle_with_mask_token``), a
  linear head to p*p*C pixels and ``fastssl.ops.mae_loss``. A batch of studies in view
  slots (flu: every image of a study; paired: frontal + lateral) reconstructs each image
  from its own visible patches and aligns the pooled latents of the images of a study
  (``fastssl.models.alignment``); single mode (the unpaired baseline) is the same MAE
  without alignment. ``model_config(preset, recipe)`` builds the released MVMAE model
  ("mvmae") or fastssl's MAE-style variant ("mae").
* :class:`SupervisedViT`: the same encoder + a linear head over the CLS feature, trained
  with BCE-with-logits on the 14 CheXpert labels (the supervised baseline).

Shapes (B batch, C=1 channels, H=W=img_size, p patch, L=(H/p)^2 patches,
K=int(L*(1-mask_ratio)) visible patches, D encoder width, Dd decoder width):
    images (B, 1, H, W) float, already normalised (dataset mean/std: BatchAugment);
    views (B,) int64 in {0, 1, 2}; latent (B, 1+K, D); pred (B, L, p*p*C);
    mask (B, L) float32, 1 = masked.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer

from fastssl.models.alignment import ALIGN_LOSSES, alignment_loss, pair_cosines
from fastssl.ops import gather_tokens, mae_loss, random_masking, unshuffle_with_mask_token
from fastssl.reference.mae import num_kept

__all__ = ["ModelConfig", "PRESETS", "RECIPES", "MODEL_RECIPES", "model_config", "ViewEncoder",
           "MultiViewMAE", "SupervisedViT", "alignment_loss", "ALIGN_LOSSES", "TARGETS", "VIEW_IDS",
           "NUM_LABELS"]

VIEW_IDS = {"frontal": 0, "lateral": 1, "unknown": 2}  # as fastssl.data.datasets.VIEW_IDS
# Paired mode builds the (frontal, lateral) ids with arange (no host-to-device copy).
assert (VIEW_IDS["frontal"], VIEW_IDS["lateral"]) == (0, 1)
NUM_VIEWS = 3
NUM_LABELS = 14
TARGETS = ("norm_pix", "global")  # global: the input is already normalised -> raw pixel MSE
INITS = ("released", "mae")
RECON_REDUCTIONS = ("released", "image")
RECIPES = ("mvmae", "mae")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and loss. The defaults are the released MVMAE model at ViT-B/16, 224 px
    (``model_config("vit_base", recipe="mvmae")``); ``recipe="mae"`` gives fastssl's
    MAE-style variant. See :func:`model_config`."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 1
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    decoder_dim: int = 768         # released: = embed_dim (no projection); MAE: 512
    decoder_depth: int = 4
    decoder_heads: int = 12        # released: = num_heads; MAE: 16
    decoder_embed: bool = False    # a linear projection embed_dim -> decoder_dim (MAE); off: widths must match
    decoder_view_embed_cls: bool = True  # the decoder's view embedding is added to CLS too (released)
    qk_norm: bool = True           # LayerNorm on queries and keys, encoder and decoder (released)
    cls_pos_embed: bool = False    # a position embedding on CLS (timm/MAE); released: none (the row stays 0)
    final_norm_eps: float = 1e-5   # eps of the encoder's and decoder's last LayerNorm (released: torch default)
    init: str = "released"         # released: PyTorch defaults + trunc_normal(0.02) tokens/embeddings | mae
    target: str = "global"         # "global" (MVMAE: pixel MSE on the normalised input) | "norm_pix" (MAE)
    recon_reduction: str = "released"  # released: sum of per-image losses / (studies x slots) x (masked/L)/ratio | image: mean
    align: str = "mse"             # one of fastssl.models.alignment.ALIGN_LOSSES
    temperature: float = 0.5       # ntxent / infonce only
    drop_path: float = 0.0

    def __post_init__(self) -> None:
        # the encoder's rules at construction; the decoder's wait for the model that has one
        # (an encoder-only config, e.g. a loaded encoder, keeps the default decoder fields)
        self.validate(decoder=False)

    def validate(self, decoder: bool = True) -> None:
        """ValueError naming the first inconsistent field: the one home of the model
        config's rules (construction, :func:`model_config`, the MAE, pretrain and the
        encoder loaders all come here). ``decoder=False``: skip the decoder's rules."""
        from fastssl.models.alignment import ALIGN_LOSSES

        if self.img_size % self.patch_size:
            raise ValueError(f"img_size={self.img_size} is not a multiple of patch_size={self.patch_size}")
        for name, allowed in (("target", TARGETS), ("align", ALIGN_LOSSES), ("init", INITS),
                              ("recon_reduction", RECON_REDUCTIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {allowed}")
        pairs = (("embed_dim", "num_heads"), ("decoder_dim", "decoder_heads"))
        for dim, heads in pairs[:2 if decoder else 1]:
            if getattr(self, dim) % getattr(self, heads):
                raise ValueError(f"{dim}={getattr(self, dim)} is not a multiple of {heads}={getattr(self, heads)}")
        if decoder and not self.decoder_embed and self.decoder_dim != self.embed_dim:
            raise ValueError(f"decoder_dim={self.decoder_dim} differs from embed_dim={self.embed_dim}: "
                             "that needs decoder_embed=True (a projection)")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature}; expected > 0")

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2


# Encoder sizes, and the MAE recipe's decoder (width, heads, depth) for each.
PRESETS: dict[str, dict] = {
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12, mae_decoder=(512, 16, 4)),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6, mae_decoder=(256, 8, 4)),
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3, mae_decoder=(128, 4, 4)),
    # CPU tests and smoke runs: 32 px, 16 patches of 8 px, two blocks of width 32.
    "test": dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mae_decoder=(32, 2, 2),
                 decoder_depth=2),
}

# Model fields each recipe sets (the decoder sizes follow from the preset, see model_config).
MODEL_RECIPES: dict[str, dict] = {
    "mvmae": dict(decoder_embed=False, decoder_view_embed_cls=True, qk_norm=True, cls_pos_embed=False,
                  final_norm_eps=1e-5, init="released", target="global", recon_reduction="released",
                  align="mse"),
    "mae": dict(decoder_embed=True, decoder_view_embed_cls=False, qk_norm=False, cls_pos_embed=True,
                final_norm_eps=1e-6, init="mae", target="global", recon_reduction="image", align="l2"),
}


def _recipe_fields(preset: str, recipe: str) -> dict:
    """The ModelConfig fields of a preset and a model recipe (ValueError naming an unknown one)."""
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}; expected one of {sorted(PRESETS)}")
    if recipe not in RECIPES:
        raise ValueError(f"recipe={recipe!r}; expected one of {RECIPES}")
    spec = dict(PRESETS[preset])
    dim, heads, depth = spec.pop("mae_decoder")
    fields_ = dict(spec, **MODEL_RECIPES[recipe])
    if recipe == "mae":
        fields_.update(decoder_dim=dim, decoder_heads=heads, decoder_depth=depth)
    else:
        fields_.update(decoder_dim=spec["embed_dim"], decoder_heads=spec["num_heads"])
    return fields_


def model_config(preset: str = "vit_base", recipe: str = "mvmae", **overrides) -> ModelConfig:
    """A preset's encoder with a recipe's decoder and loss, fields replaced by ``overrides``
    (None = keep), checked (ValueError naming the field)."""
    fields_ = _recipe_fields(preset, recipe)
    fields_.update({k: v for k, v in overrides.items() if v is not None})
    cfg = ModelConfig(**fields_)
    cfg.validate()
    return cfg


def check_model_config(cfg: ModelConfig) -> None:
    """Deprecated (one release): ``cfg.validate()``, the one home of these rules."""
    import warnings

    warnings.warn("check_model_config is deprecated: use ModelConfig.validate()", DeprecationWarning, stacklevel=2)
    cfg.validate()


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


def _released_init(module: nn.Module, tokens) -> None:
    """The released code's initialisation: PyTorch's defaults for every Linear, Conv2d and
    LayerNorm (timm's ViT init is undone), trunc_normal(std 0.02) for the tokens and
    embeddings in ``tokens``."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.LayerNorm)):
            m.reset_parameters()
    for t in tokens:
        nn.init.trunc_normal_(t, std=0.02)


class ViewEncoder(nn.Module):
    """timm ViT with one input channel and a view-type embedding on every patch token.

    The timm model provides patch_embed, cls_token, pos_embed (1, 1+L, D, CLS row first),
    blocks and norm; its classifier is absent (num_classes=0). With
    ``cfg.cls_pos_embed=False`` (released) the CLS row of pos_embed is 0 and never trained,
    so the weights still load into a timm ViT unchanged.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vit = VisionTransformer(
            img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_classes=0,
            embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
            qkv_bias=True, qk_norm=cfg.qk_norm, class_token=True, global_pool="token",
            drop_path_rate=cfg.drop_path)
        self.vit.norm.eps = cfg.final_norm_eps
        self.view_embed = nn.Embedding(NUM_VIEWS, cfg.embed_dim)
        if cfg.init == "released":
            _released_init(self.vit, (self.vit.cls_token, self.vit.pos_embed, self.view_embed.weight))
        else:
            nn.init.normal_(self.view_embed.weight, std=0.02)
        if not cfg.cls_pos_embed:
            with torch.no_grad():
                self.vit.pos_embed[:, :1].zero_()

    @property
    def num_patches(self) -> int:
        return self.cfg.num_patches

    def _cls(self, batch: int) -> torch.Tensor:
        # Released: no position embedding on CLS; the row stays in the state dict (0 from
        # init, never used, so it never trains) and the export writes 0 there for timm.
        cls = self.vit.cls_token + self.vit.pos_embed[:, :1] if self.cfg.cls_pos_embed else self.vit.cls_token
        return cls.expand(batch, -1, -1)

    def forward_masked(self, images: torch.Tensor, views: torch.Tensor, ids_keep: torch.Tensor,
                       *, ids_restore: torch.Tensor | None = None, impl: str = "auto") -> torch.Tensor:
        """images (B, 1, H, W), views (B,), ids_keep (B, K) -> latent (B, 1+K, D), CLS first.

        ids_restore (B, L): random_masking's inverse of ids_keep; given, the indices are
        trusted (no device-to-host validation) and feed the gather's backward."""
        x = self.vit.patch_embed(images)                                  # (B, L, D)
        x = gather_tokens(x, ids_keep, ids_restore=ids_restore, pos_embed=self.vit.pos_embed[:, 1:],
                          sample_embed=self.view_embed(views), impl=impl,
                          validate=ids_restore is None)                   # (B, K, D)
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


class MultiViewMAE(nn.Module):
    """Masked autoencoder over the view slots of studies (flu / paired) or single images.

    ``forward_studies(images (B, V, 1, H, W), available (B, V), views (B, V))``: the
    general form. Every available image is masked, encoded and reconstructed (shared
    weights, independent masks, one batch of N = available.sum() images); the mean-pooled
    latents (CLS + visible tokens, after the final norm) of the images of one study are
    aligned (:func:`fastssl.models.alignment.alignment_loss`, with the availability mask).
    ``forward(frontal, lateral)``: paired mode (V = 2, frontal then lateral).
    ``forward(images, None, views=...)``: single-view mode (V = 1, no alignment).
    """

    def __init__(self, cfg: ModelConfig, *, impl: str = "auto"):
        super().__init__()
        cfg.validate()
        self.cfg, self.impl = cfg, impl
        self.encoder = ViewEncoder(cfg)
        d, dd, p = cfg.embed_dim, cfg.decoder_dim, cfg.patch_size
        self.decoder_embed = nn.Linear(d, dd) if cfg.decoder_embed else nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, dd))
        self.decoder_view_embed = nn.Embedding(NUM_VIEWS, dd)
        self.decoder_blocks = nn.Sequential(*[
            Block(dd, cfg.decoder_heads, cfg.mlp_ratio, qkv_bias=True, qk_norm=cfg.qk_norm,
                  norm_layer=partial(nn.LayerNorm, eps=1e-6)) for _ in range(cfg.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(dd, eps=cfg.final_norm_eps)
        self.decoder_pred = nn.Linear(dd, p * p * cfg.in_chans)
        tokens = (self.mask_token, self.decoder_pos_embed, self.decoder_view_embed.weight)
        if cfg.init == "released":
            _released_init(nn.ModuleList([self.decoder_blocks, self.decoder_norm, self.decoder_pred]), tokens)
            return
        for t in tokens:
            nn.init.normal_(t, std=0.02)
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):  # MAE's decoder init
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def decode(self, latent: torch.Tensor, views: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (B, 1+K, D), views (B,), ids_restore (B, L) -> pred (B, L, p*p*C)."""
        y = self.decoder_embed(latent)                                     # (B, 1+K, Dd)
        view = self.decoder_view_embed(views)[:, None]                     # (B, 1, Dd)
        # ids_restore comes from random_masking: no validation (it would sync with the host)
        patches = unshuffle_with_mask_token(y[:, 1:], self.mask_token, ids_restore, impl=self.impl,
                                            validate=False)
        patches = patches + self.decoder_pos_embed[:, 1:] + view           # (B, L, Dd)
        cls = y[:, :1] + self.decoder_pos_embed[:, :1]
        if self.cfg.decoder_view_embed_cls:
            cls = cls + view
        y = torch.cat([cls, patches.to(y.dtype)], dim=1)
        y = self.decoder_norm(self.decoder_blocks(y))
        return self.decoder_pred(y[:, 1:])

    def reconstruct(self, images: torch.Tensor, views: torch.Tensor, mask_ratio: float,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One masked pass: images (B, 1, H, W), views (B,) -> dict(latent (B, 1+K, D),
        pred (B, L, p*p*C), mask (B, L), ids_restore (B, L))."""
        b = images.shape[0]
        ids_keep, ids_restore, mask = random_masking(
            b, self.encoder.num_patches, mask_ratio, device=images.device, generator=generator)
        latent = self.encoder.forward_masked(images, views, ids_keep, ids_restore=ids_restore, impl=self.impl)
        pred = self.decode(latent, views, ids_restore)
        return dict(latent=latent, pred=pred, mask=mask, ids_restore=ids_restore)

    def recon_loss(self, pred: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, *,
                   per_image: bool = False, scale: float = 1.0):
        """Mean over the images of each image's MSE over its masked patches: one fused call
        for the whole batch (each image normalised by its own masked count), times
        ``scale`` (inside the op: its single-pass gradient stays the one backward uses).
        per_image=True returns (loss, (B,) per-image losses, scaled too)."""
        target = "norm_pix" if self.cfg.target == "norm_pix" else "pixel"
        return mae_loss(pred, images, mask, patch_size=self.cfg.patch_size, target=target, impl=self.impl,
                        groups=pred.shape[0], return_groups=per_image, scale=scale)

    def _recon_scale(self, n_images: int, slots: int, mask: torch.Tensor, mask_ratio: float) -> float:
        """The released reduction: each image's loss is its masked-pixel MSE x (masked/L) /
        mask_ratio (``mean((pred - x)^2 * mask) / mask_ratio``), summed over the available
        slots and divided by studies x slots (missing slots count as 0)."""
        if self.cfg.recon_reduction == "image" or mask_ratio == 0:
            return 1.0
        n = mask.shape[1]
        masked_fraction = (n - num_kept(n, mask_ratio)) / n
        return n_images / slots * masked_fraction / mask_ratio

    def forward_studies(self, images: torch.Tensor, available: torch.Tensor, views: torch.Tensor, *,
                        mask_ratio: float = 0.93, beta: float = 0.0,
                        generator: torch.Generator | None = None,
                        all_available: bool = False) -> dict[str, torch.Tensor]:
        """images (B, V, 1, H, W) float (missing slots: anything), available (B, V) bool,
        views (B, V) int64 -> dict(loss, recon, align, beta, monitor (4,), pred (N, L, P),
        mask (N, L), latent_pooled (N, D), study (N,), views (N,), recon_per_image (N,)
        detached, on the recon scale), N = available.sum(), the images in (study, slot)
        order. loss = recon + beta * align.

        all_available=True (the caller knows every slot is filled: paired and single modes)
        takes the slots by reshaping instead of boolean indexing, which syncs with the host."""
        if images.dim() != 5 or images.shape[:2] != available.shape or views.shape != available.shape:
            raise ValueError(f"images {tuple(images.shape)}, available {tuple(available.shape)}, views "
                             f"{tuple(views.shape)}: expected (B, V, C, H, W), (B, V), (B, V)")
        b, v = available.shape
        dev = images.device
        available = available.to(device=dev, dtype=torch.bool)
        views = views.to(dev, torch.long)
        if all_available:
            flat, view_ids = images.flatten(0, 1), views.flatten()
            study = torch.arange(b, device=dev).repeat_interleave(v)
        else:
            flat, view_ids = images[available], views[available]                # (N, 1, H, W), (N,)
            study = torch.arange(b, device=dev)[:, None].expand(b, v)[available]
        _check_images(flat, self.cfg)
        out = self.reconstruct(flat, view_ids, mask_ratio, generator)
        # The released reduction's factor goes into the loss op, not onto its result: a
        # factor != 1 (mask 0.93: 183/196 masked / 0.93) on the result would make the
        # incoming gradient non-unit and the op recompute the gradient it already wrote.
        scale = self._recon_scale(flat.shape[0], b * v, out["mask"], mask_ratio)
        recon, per_image = self.recon_loss(out["pred"], flat, out["mask"], per_image=True, scale=scale)
        pooled = out["latent"].mean(dim=1)                                  # CLS + visible tokens
        if all_available:
            z = pooled.view(b, v, -1)
        else:
            z = pooled.new_zeros(b, v, pooled.shape[-1]).index_put(available.nonzero(as_tuple=True), pooled)
        align = alignment_loss(z, available, self.cfg.align, self.cfg.temperature)
        beta_t = recon.new_full((), float(beta))                             # no host-to-device copy
        return dict(loss=recon + beta_t * align, recon=recon, align=align, beta=beta_t,
                    monitor=pair_cosines(pooled.detach(), study), pred=out["pred"], mask=out["mask"],
                    latent_pooled=pooled, study=study, views=view_ids,
                    recon_per_image=per_image.detach())

    def forward(self, frontal: torch.Tensor, lateral: torch.Tensor | None = None, *,
                mask_ratio: float = 0.93, beta: float = 0.0, views=None, available=None,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Paired: frontal, lateral (B, 1, H, W) -> forward_studies over (B, 2) slots, frontal
        view id 0 and lateral 1; pred / mask rows alternate frontal, lateral per study; also
        recon_frontal, recon_lateral (detached; recon is their mean).

        Single (lateral=None): frontal holds any images, views int | (B,) (default
        unknown) -> forward_studies over (B, 1) slots: no alignment (align = 0).

        Studies (``available`` given): frontal is (B, V, 1, H, W), views (B, V) ->
        :meth:`forward_studies` (through ``forward``, so that DDP sees the call).
        """
        if available is not None:
            return self.forward_studies(frontal, available, views, mask_ratio=mask_ratio, beta=beta,
                                        generator=generator)
        _check_images(frontal, self.cfg, "frontal" if lateral is not None else "images")
        b, dev = frontal.shape[0], frontal.device
        if lateral is None:
            v = _view_ids(views, b, dev)[:, None]
            return self.forward_studies(frontal[:, None], torch.ones(b, 1, dtype=torch.bool, device=dev), v,
                                        mask_ratio=mask_ratio, beta=0.0, generator=generator,
                                        all_available=True)
        _check_images(lateral, self.cfg, "lateral")
        if lateral.shape[0] != b:
            raise ValueError(f"frontal has {b} images and lateral {lateral.shape[0]}; expected pairs")
        v = torch.arange(2, device=dev).expand(b, 2)  # ids of (frontal, lateral): asserted below VIEW_IDS
        out = self.forward_studies(torch.stack([frontal, lateral], dim=1),
                                   torch.ones(b, 2, dtype=torch.bool, device=dev), v,
                                   mask_ratio=mask_ratio, beta=beta, generator=generator, all_available=True)
        # per-view values for logs and benchmarks (recon is their mean), from the same loss call
        per_image = out["recon_per_image"]
        out["recon_frontal"], out["recon_lateral"] = per_image[0::2].mean(), per_image[1::2].mean()
        return out

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
