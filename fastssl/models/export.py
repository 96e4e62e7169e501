"""The encoder a pretraining run hands to its users: ``encoder.safetensors`` and its loader.

``export_encoder`` writes a file that timm loads as it is: the tensors are exactly the
state dict of a timm ``VisionTransformer`` (no prefix, no classifier), with fastssl's
view-type embedding of one chosen view folded into ``pos_embed`` (patch rows, and the
CLS row too when the encoder adds the view embedding to CLS). The metadata (strings)::

    format            "timm.VisionTransformer"
    fastssl_format    "fastssl.timm_vit/1"
    timm_model        a registered timm name (its architecture fields are overridden by timm_kwargs)
    timm_kwargs       JSON: every architecture argument of timm.create_model, num_classes=0
    pretrained_cfg    JSON: input_size (C, S, S), mean, std (per channel), num_classes 0,
                      crop_pct 1, interpolation: pass as pretrained_cfg_overlay
    final_norm_eps    eps of the last LayerNorm (MVMAE's recipe: torch's 1e-5; timm builds 1e-6
                      and has no argument for it: set ``model.norm.eps`` after creating the model)
    view              the folded view: frontal | lateral | unknown
    img_size, in_chans, pixel_mean, pixel_std   the same facts as plain numbers
    model_config      JSON of fastssl's ModelConfig
    fastssl_unfolded  base64 safetensors of the tensors the fold changed, as trained, and
                      view_embed.weight: ``load_encoder`` rebuilds the ViewEncoder bit for bit

Loading it with timm::

    meta = safetensors.safe_open("encoder.safetensors", "pt").metadata()
    model = timm.create_model(meta["timm_model"], pretrained=True, **json.loads(meta["timm_kwargs"]),
        pretrained_cfg_overlay=dict(file="encoder.safetensors", **json.loads(meta["pretrained_cfg"])))
    model.norm.eps = float(meta["final_norm_eps"])

``model(x)`` is then fastssl's CLS feature ``ViewEncoder(x, views=view)``, and
``timm.data.resolve_data_config(model=model)`` gives the size and mean/std it expects.

``fastssl export RUN/checkpoint.pt --out DIR --views frontal,lateral`` writes
DIR/encoder.safetensors and DIR/encoder_lateral.safetensors from a finished (or running)
run, with the pixel mean/std the run trained with (its ``--pixel-mean/--pixel-std``, else
its training cache's manifest); ``--cache`` is needed only when that cache is gone.
DIR is opened by fastssl.jobs.open_job (job.json: the views, the normalisation written and
the checkpoint's fingerprint, what the files are made of; --cache is not in it, since it
only ever supplies the normalisation): the same export rewrites the same files; another export there (a checkpoint that has trained on, other views) is refused,
naming the differences, unless ``--overwrite``, which empties DIR first.
"""
from __future__ import annotations

import base64
import copy
import json
import logging
import os
from typing import Sequence

from dataclasses import asdict, dataclass

import torch

from fastssl.config import check_settings
from fastssl.data.cache import pixel_stats

__all__ = ["export_encoder", "load_encoder", "timm_state_dict", "timm_kwargs", "pixel_stats",
           "training_normalisation", "resolve_normalisation",
           "read_export_metadata", "export_path", "ExportConfig", "main", "add_arguments", "run"]

log = logging.getLogger(__name__)

FORMAT = "fastssl.timm_vit/1"
OLD_FORMAT = "fastssl.ViewEncoder"
# Registered timm names by (patch, width, depth, heads); other shapes use the base name,
# whose architecture timm_kwargs overrides field by field.
_TIMM_NAMES = {
    (16, 192, 12, 3): "vit_tiny_patch16_224", (16, 384, 12, 6): "vit_small_patch16_224",
    (16, 768, 12, 12): "vit_base_patch16_224", (16, 1024, 24, 16): "vit_large_patch16_224",
    (14, 1280, 32, 16): "vit_huge_patch14_224",
}
_CHECK_ATOL = 1e-5  # export's self-check: timm's CLS feature vs fastssl's (fp32, CPU), x max(1, |feature|)


def training_normalisation(path: str) -> tuple[float, float, str] | None:
    """The (mean, std) an encoder file was trained with, and where that was read -> (mean,
    std, source), or None when the file does not say.

    An exported ``encoder*.safetensors`` carries them in its metadata. A pretrain
    ``checkpoint.pt`` carries its settings: ``--pixel-mean/--pixel-std`` when given, else
    the manifest of the cache it trained on (the pretrain job's rule); None when that cache
    is no longer readable.
    """
    from fastssl.data.cache import read_manifest
    from fastssl.errors import DataError

    if path.endswith(".safetensors"):
        meta = read_export_metadata(path)
        if "pixel_mean" not in meta or "pixel_std" not in meta:
            return None
        return float(meta["pixel_mean"]), float(meta["pixel_std"]), f"{path} metadata"
    cfg = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("config") or {}
    mean, std = cfg.get("pixel_mean", -1.0), cfg.get("pixel_std", -1.0)
    if mean is not None and std is not None and mean >= 0 and std > 0:
        return float(mean), float(std), f"{path} settings (--pixel-mean/--pixel-std)"
    try:
        manifest = read_manifest(cfg.get("cache", ""))
    except (OSError, ValueError, DataError):
        return None
    mean, std = pixel_stats(manifest, mean, std)
    return mean, std, f"the training cache {cfg['cache']} (via {path})"


def resolve_normalisation(path: str, manifest: dict) -> tuple[float, float]:
    """The (mean, std) to feed an encoder file: the ones it was trained with
    (:func:`training_normalisation`), whatever the cache in hand; that cache's manifest
    only when the file does not say (a warning names it). One log line when the cache's
    statistics differ from the training ones (the training ones are applied)."""
    found = training_normalisation(path)
    cache_mean, cache_std = pixel_stats(manifest)
    if found is None:
        log.warning("%s does not record its training normalisation: using the cache's pixel mean %.4f std %.4f",
                    path, cache_mean, cache_std)
        return cache_mean, cache_std
    mean, std, source = found
    if (round(mean, 4), round(std, 4)) != (round(cache_mean, 4), round(cache_std, 4)):
        log.info("pixel normalisation: the encoder's training mean %.4f std %.4f (from %s), not this cache's "
                 "%.4f / %.4f", mean, std, source, cache_mean, cache_std)
    return mean, std


def export_path(path: str, view: str, first: bool) -> str:
    """``encoder.safetensors`` for the first view exported, ``encoder_<view>.safetensors`` after."""
    if first:
        return path
    stem, ext = os.path.splitext(path)
    return f"{stem}_{view}{ext or '.safetensors'}"


def timm_kwargs(vit) -> dict:
    """The timm.create_model arguments that rebuild ``vit`` (a timm VisionTransformer) as a
    feature extractor (num_classes=0); read from the module, so that a change of the
    model (qk-norm, another width) is followed without a table to update."""
    from timm.layers import LayerScale

    blk = vit.blocks[0]
    if isinstance(blk.ls1, LayerScale) or getattr(vit, "num_reg_tokens", 0):
        raise ValueError("export_encoder: layer scale and register tokens are not supported")
    return dict(
        img_size=int(vit.patch_embed.img_size[0]), patch_size=int(vit.patch_embed.patch_size[0]),
        in_chans=int(vit.patch_embed.proj.in_channels), num_classes=0, global_pool=vit.global_pool,
        embed_dim=int(vit.embed_dim), depth=len(vit.blocks), num_heads=int(blk.attn.num_heads),
        mlp_ratio=blk.mlp.fc1.out_features / vit.embed_dim, qkv_bias=blk.attn.qkv.bias is not None,
        qk_norm=not isinstance(blk.attn.q_norm, torch.nn.Identity), class_token=vit.cls_token is not None,
        no_embed_class=bool(vit.no_embed_class), pre_norm=not isinstance(vit.norm_pre, torch.nn.Identity),
        fc_norm=not isinstance(vit.fc_norm, torch.nn.Identity))


class _Captured(Exception):
    """Stops a forward pass once the first block's input is seen."""


def _block_inputs(encoder, view: int) -> torch.Tensor:
    """Tokens entering the first block for a zero image of ``view``: (1, 1+L, D)
    (the blocks themselves are not run)."""
    cfg = encoder.cfg
    seen: list[torch.Tensor] = []

    def capture(_module, args):
        seen.append(args[0])
        raise _Captured

    hook = encoder.vit.blocks[0].register_forward_pre_hook(capture)
    device = encoder.view_embed.weight.device
    try:
        with torch.no_grad():
            encoder.forward_features(torch.zeros(1, cfg.in_chans, cfg.img_size, cfg.img_size, device=device),
                                     views=view)
    except _Captured:
        pass
    finally:
        hook.remove()
    if not seen:
        raise ValueError("export_encoder: the encoder's forward_features never reached vit.blocks[0]")
    return seen[0].float().cpu()


def _cls_terms(encoder) -> tuple[bool, bool]:
    """What the encoder adds to cls_token before the blocks: (its pos_embed CLS row?, the
    view row?). timm/MAE add the position row; MVMAE's released encoder adds nothing (the
    row is unused); a variant may add the view embedding too. Read from the CLS token
    that enters the first block, so any of the four is followed without a config flag;
    terms that are zero cannot be told apart and need not be (adding them changes nothing)."""
    vit = encoder.vit
    cls_in = _block_inputs(encoder, 0)[0, 0]
    token = vit.cls_token[0, 0].detach().float().cpu()
    pos_row = torch.zeros_like(token) if vit.no_embed_class else vit.pos_embed[0, 0].detach().float().cpu()
    view_row = encoder.view_embed.weight[0].detach().float().cpu()
    for uses_pos in (True, False):
        for uses_view in (False, True):
            want = token + uses_pos * pos_row + uses_view * view_row
            if torch.allclose(cls_in, want, rtol=0, atol=1e-6 * max(1.0, want.abs().max().item())):
                return uses_pos, uses_view
    raise ValueError("export_encoder: the CLS token entering the blocks is not cls_token plus its position "
                     "row and/or the view embedding; it cannot be folded into pos_embed")


def timm_state_dict(encoder, view: str = "frontal") -> tuple[dict, dict]:
    """(timm state dict with ``view`` folded in, the original tensors the fold replaced).

    Both are CPU tensors, no ``vit.`` prefix. The view row is added to the patch rows of
    pos_embed; the CLS row becomes what the encoder adds to cls_token (see _cls_terms);
    without a CLS row (timm's no_embed_class) a view term goes into cls_token."""
    from fastssl.models.mvmae import VIEW_IDS

    if view not in VIEW_IDS:
        raise ValueError(f"view={view!r}; expected one of {sorted(VIEW_IDS)}")
    state = {k[len("vit."):]: v.detach().cpu().float().contiguous()
             for k, v in encoder.state_dict().items() if k.startswith("vit.")}
    row = encoder.view_embed.weight.detach().cpu().float()[VIEW_IDS[view]]
    vit = encoder.vit
    prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    uses_pos, uses_view = _cls_terms(encoder)
    pos = state["pos_embed"].clone()
    pos[:, prefix:] += row
    folded = {"pos_embed": pos}
    if prefix:
        if not uses_pos:
            pos[:, 0] = 0
        if uses_view:
            pos[:, 0] += row
    elif uses_view:
        folded["cls_token"] = state["cls_token"] + row
    unfolded = {f"vit.{k}": state[k] for k in folded}
    unfolded["view_embed.weight"] = encoder.view_embed.weight.detach().cpu().float().contiguous()
    return {**state, **folded}, unfolded


def _timm_model_name(kw: dict) -> str:
    return _TIMM_NAMES.get((kw["patch_size"], kw["embed_dim"], kw["depth"], kw["num_heads"]),
                           "vit_base_patch16_224")


def _check_against_timm(encoder, state: dict, kwargs: dict, view: str, final_norm_eps: float) -> None:
    """Builds the timm model from (kwargs, state) and compares its CLS feature with the
    encoder's on a random image; raises when they differ (the export would be wrong)."""
    from timm.models.vision_transformer import VisionTransformer

    from fastssl.models.mvmae import VIEW_IDS

    ours = copy.deepcopy(encoder).cpu().float().eval()
    theirs = VisionTransformer(**kwargs, device="meta")  # no random init: the state replaces it
    theirs.load_state_dict(state, strict=True, assign=True)
    theirs.norm.eps = final_norm_eps  # as the README's fourth line does
    theirs.eval()
    cfg = encoder.cfg
    images = torch.randn(1, cfg.in_chans, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours(images, views=VIEW_IDS[view])
        diff = (theirs(images) - want).abs().max().item()
    limit = _CHECK_ATOL * max(1.0, want.abs().max().item())
    if not diff <= limit:
        raise RuntimeError(f"export_encoder: timm's features differ from fastssl's by {diff:.2e} "
                           f"(> {limit:.1e}); the export does not follow the model")


def _metadata(mcfg, kwargs: dict, final_norm_eps: float, view: str, manifest: dict,
              unfolded: dict) -> dict[str, str]:
    from safetensors.torch import save as save_bytes

    mean, std = pixel_stats(manifest)
    c, s = kwargs["in_chans"], kwargs["img_size"]
    pretrained_cfg = dict(input_size=[c, s, s], mean=[mean] * c, std=[std] * c, num_classes=0,
                          crop_pct=1.0, interpolation="bilinear")
    return {
        "format": "timm.VisionTransformer", "fastssl_format": FORMAT,
        "timm_model": _timm_model_name(kwargs), "timm_kwargs": json.dumps(kwargs),
        "pretrained_cfg": json.dumps(pretrained_cfg), "final_norm_eps": repr(final_norm_eps), "view": view,
        "img_size": str(s), "in_chans": str(c), "pixel_mean": repr(mean), "pixel_std": repr(std),
        "model_config": json.dumps(asdict(mcfg)),
        "fastssl_unfolded": base64.b64encode(save_bytes(unfolded)).decode("ascii"),
    }


def export_encoder(encoder: torch.nn.Module, mcfg, path: str, *, manifest: dict,
                   views: Sequence[str] = ("frontal",)) -> list[str]:
    """Writes one timm-ready safetensors file per view (see the module docstring).

    Args:
        encoder: a fastssl ViewEncoder (any device; it is not modified).
        mcfg: its ModelConfig (stored so that ``load_encoder`` rebuilds it).
        path: file of the first view; the others go to ``<stem>_<view>.safetensors``.
        manifest: the cache's manifest.json (dict): its pixel_mean / pixel_std are the
            normalisation the encoder was trained with.
        views: names in fastssl.models.mvmae.VIEW_IDS, first = ``path``.
    Returns:
        The paths written. Each file is written to a temporary name and renamed; before
        that, timm's VisionTransformer is built from it and must reproduce the encoder's
        CLS feature (RuntimeError otherwise).
    """
    from safetensors.torch import save as save_bytes

    from fastssl.jobs import atomic_write_bytes

    if not isinstance(manifest, dict):
        raise TypeError(f"manifest: expected the cache's manifest.json as a dict, got {type(manifest).__name__}")
    if isinstance(views, str) or not views or len(set(views)) != len(views):
        raise ValueError(f"views={views!r}; expected a non-empty sequence of distinct view names")
    kwargs = timm_kwargs(encoder.vit)
    final_norm_eps = float(encoder.vit.norm.eps)  # not a timm kwarg: the README sets it after create_model
    written = []
    for i, view in enumerate(views):
        state, unfolded = timm_state_dict(encoder, view)
        _check_against_timm(encoder, state, kwargs, view, final_norm_eps)
        out = export_path(path, view, first=i == 0)
        metadata = _metadata(mcfg, kwargs, final_norm_eps, view, manifest, unfolded)
        atomic_write_bytes(out, save_bytes(state, metadata=metadata))
        written.append(out)
    return written


def read_export_metadata(path: str) -> dict:
    """The metadata of an exported encoder, JSON fields parsed (fastssl_unfolded left out)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        meta = dict(f.metadata() or {})
    meta.pop("fastssl_unfolded", None)
    for key in ("timm_kwargs", "pretrained_cfg", "model_config"):
        if key in meta:
            meta[key] = json.loads(meta[key])
    return meta


def _state_from_safetensors(path: str) -> tuple[dict, dict]:
    """(ModelConfig fields, ViewEncoder state dict) of either export format."""
    from safetensors import safe_open
    from safetensors.torch import load as load_bytes

    with safe_open(path, framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if "model_config" not in meta:
        raise ValueError(f"{path}: no model_config in the safetensors metadata (not a fastssl export)")
    if meta.get("fastssl_format") == FORMAT:  # timm layout + the tensors before the fold
        state = {f"vit.{k}": v for k, v in state.items()}
        state.update(load_bytes(base64.b64decode(meta["fastssl_unfolded"])))
    return json.loads(meta["model_config"]), state


def _state_from_checkpoint(path: str, map_location) -> tuple[dict, dict]:
    """(ModelConfig fields, ViewEncoder state dict) of a pretrain checkpoint.pt."""
    from fastssl.errors import DataError

    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
        fields, model = ckpt["model_config"], ckpt["model"]
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch.load raises many types on a file that is not a checkpoint
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise DataError(path, f"not a fastssl checkpoint.pt or encoder*.safetensors ({reason})") from None
    return fields, {k[len("encoder."):]: v for k, v in model.items() if k.startswith("encoder.")}


def load_encoder(path: str, map_location="cpu"):
    """A ViewEncoder from an exported ``encoder*.safetensors`` (timm layout, or the older
    fastssl layout with ``vit.`` keys) or from a pretrain ``checkpoint.pt``
    (DataError naming the file when it is neither)."""
    from fastssl.models.mvmae import ModelConfig, ViewEncoder

    if path.endswith(".safetensors"):
        fields, state = _state_from_safetensors(path)
    else:
        fields, state = _state_from_checkpoint(path, map_location)
    encoder = ViewEncoder(ModelConfig(**fields))
    encoder.load_state_dict(state)
    return encoder


# ------------------------------------------------------------------------------ job
@dataclass(frozen=True)
class ExportConfig:
    """Every setting of ``fastssl export`` (its flags and positional, declared once)."""

    checkpoint: str = ""  # a pretrain checkpoint.pt or an exported encoder*.safetensors
    cache: str = ""  # a cache whose manifest gives the pixel mean/std, used only when the checkpoint records no training normalisation (its settings name a cache that is gone); otherwise the training values are written, whatever this cache holds
    out: str = ""  # output directory: encoder.safetensors (first view), encoder_<view>.safetensors (the others)
    views: str = "frontal"  # comma list of views to fold, one file each: frontal,lateral,unknown
    overwrite: bool = False  # replace a different export (or other files) found in --out (otherwise refused)

    def __post_init__(self) -> None:
        check_settings(self)
        self.view_list()   # a bad --views fails before any file is read

    def view_list(self) -> tuple[str, ...]:
        """--views as a tuple of distinct view names; ValueError naming --views otherwise."""
        from fastssl.models.mvmae import VIEW_IDS

        views = tuple(v.strip() for v in self.views.split(",") if v.strip())
        if not views or len(set(views)) != len(views) or not set(views) <= set(VIEW_IDS):
            raise ValueError(f"--views: {self.views!r} is not a comma list of distinct views from "
                             f"{', '.join(VIEW_IDS)}")
        return views


SETTINGS = ExportConfig   # the dataclass declaring this command's settings (fastssl.config)


def _fingerprint(cfg: ExportConfig, normalisation: dict):
    """The export's identity (fastssl.jobs.JobFingerprint): what the files are made of, the
    views, the pixel mean/std written (they may come from the training cache's manifest) and
    the checkpoint's fingerprint. --cache is left out: it only supplies the mean/std, which
    are in, so an unused --cache given or dropped does not make another export."""
    from fastssl.jobs import JobFingerprint, fingerprint_files

    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out", "overwrite", "cache")}
    return JobFingerprint("export", {**settings, **normalisation}, fingerprint_files([cfg.checkpoint]))


def main(cfg: ExportConfig) -> list[str]:
    """Exports cfg.checkpoint into cfg.out (opened by fastssl.jobs.open_job once the checkpoint
    and its normalisation are known to be usable) -> the paths written, first view first.
    Raises ResumeMismatch when cfg.out holds another export (unless cfg.overwrite),
    OutputLocked when another job writes it."""
    from fastssl.jobs import open_job

    if not os.path.isfile(cfg.checkpoint):
        raise ValueError(f"checkpoint={cfg.checkpoint!r} is not a file")
    encoder = load_encoder(cfg.checkpoint)
    normalisation = _export_normalisation(cfg.checkpoint, cfg.cache)
    # "resume" rewrites the files: the same settings and inputs give the same bytes
    with open_job(cfg.out, lambda: _fingerprint(cfg, normalisation), overwrite=cfg.overwrite):
        return export_encoder(encoder, encoder.cfg, os.path.join(cfg.out, "encoder.safetensors"),
                              manifest=normalisation, views=cfg.view_list())


# ------------------------------------------------------------------------------ CLI
def add_arguments(parser) -> None:
    from fastssl.config import add_dataclass_arguments, field_help

    parser.add_argument("checkpoint", help=field_help(ExportConfig)["checkpoint"])
    add_dataclass_arguments(parser, ExportConfig, required=("out",), skip=("checkpoint",))


def _export_normalisation(checkpoint: str, cache: str) -> dict:
    """pixel_mean / pixel_std for the export: the training ones (resolve_normalisation),
    the --cache manifest's only when the checkpoint does not record them."""
    from fastssl.data.cache import read_manifest

    if cache:
        mean, std = resolve_normalisation(checkpoint, read_manifest(cache))
    else:
        found = training_normalisation(checkpoint)
        if found is None:
            raise ValueError(f"{checkpoint} records no training normalisation (its training cache is gone): "
                             "pass --cache with the cache it trained on")
        mean, std, _ = found
    return dict(pixel_mean=mean, pixel_std=std)


def run(args) -> int:
    """``fastssl export``: timm-ready files, one per view, from a run's checkpoint."""
    from fastssl.config import config_from_args

    for path in main(config_from_args(ExportConfig, args)):
        print(path)
    return 0
