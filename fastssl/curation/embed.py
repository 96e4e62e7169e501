"""`fastssl embed`: image tiles -> timm features in fp16 .npy shards.

Input: a folder of tiles, a .npy array of images, or a tile index written by `fastssl tile`
(tiles read from their slides on the fly). The model is a timm name or ``local-dir:FOLDER``
(timm's format: config.json with architecture, model_args, pretrained_cfg + model.safetensors);
weights load strictly (a missing or unexpected key is an error naming it) and pixels are
normalised with the model's pretrained_cfg mean/std, so the features are the model's own.
``--precision fp32`` (default, every device; TF32 off) or ``bf16`` (autocast).

Output directory::

    emb_00000.npy        (rows, dim) float16, one shard (``emb_r<rank:05d>_00000.npy`` when
                         several ranks run); rows of rejected images are left out
    parts/index_00000.csv, parts/rejects_00000.csv   the shard's rows and its rejects
    index.csv            row, shard, offset, source   (row = global row over all shards; source =
                         the tile's path under the source folder, "file.npy[i]", or the tile name)
    rejects.csv          source, reason               (unreadable images, skipped)
    manifest.json        model, weights, dim, count, precision, mean, std, shards; "source" (absolute
                         path of what was embedded) and "tile_index" (absolute tiles.csv, or null)
    job.json             the run's fingerprint (fastssl.jobs): model, img size, in_chans,
                         normalisation, precision, shard size, ranks; a sha256 of the sorted tile
                         paths + sizes (or the tile index files) and sampled blocks of the weights
    .fastssl.lock        held by rank 0 while the job runs: a second job into the dir fails

Resumable: a shard counts as finished when its .npy exists (each file is written to a
temporary name and renamed, the .npy last), so rerunning the same command skips
finished shards; temporary files of a killed run are removed. A rerun with other
settings, tiles or weights is refused naming the differences (ResumeMismatch) unless
--overwrite, which clears the dir first. One unreadable image never aborts the run: it is listed in
rejects.csv. With torch.distributed initialised each rank embeds a contiguous slice of
the items into its own rank-suffixed shards and rank 0 writes the merged index.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from fastssl import distributed as fdist
from fastssl import jobs
from fastssl.atomic import atomic_save_npy, atomic_write_csv, atomic_write_text
from fastssl.config import COUNT, NONNEG, SIDE, Range, add_dataclass_arguments, check_settings, config_from_args, setting
from fastssl.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".npy")
PRECISIONS = ("fp32", "bf16")


# --------------------------------------------------------------------------- sources
def list_items(source: str | os.PathLike) -> tuple[list[str], np.ndarray | None]:
    """Items to embed: (names, array).

    A folder gives its image tiles (png, jpg, jpeg, npy; recursive, sorted by relative
    path) and array None. A .npy file of (N, H, W) or (N, H, W, C) gives names
    "file.npy[i]" and the memory-mapped array.
    """
    path = Path(source)
    if path.is_dir():
        names = sorted(
            p.relative_to(path).as_posix()
            for p in path.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not names:
            raise DataError(path, f"no image tiles ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return names, None
    if path.is_file() and path.suffix.lower() == ".npy":
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(path, f"cannot load as .npy ({exc})") from None
        if array.ndim not in (3, 4):
            raise DataError(path, f"expected (N, H, W) or (N, H, W, C) images, got shape {array.shape}")
        return [f"{path.name}[{i}]" for i in range(array.shape[0])], array
    raise DataError(path, "not a folder of tiles, a tile index (tiles.csv) nor a .npy array file")


@dataclass
class _Items:
    """What one embed run reads: ``names`` (index.csv's source column), and for each either a
    file under ``source``, a row of ``array`` or a slide region ``tiles[i]`` of ``tile_index``."""

    source: Path
    names: list[str]
    array: np.ndarray | None = None
    tile_index: Path | None = None
    tiles: list | None = None


def _open_items(source: str | os.PathLike) -> _Items:
    """The items of a folder of tiles, a .npy array file or a tile index (`fastssl tile`'s
    folder or its tiles.csv; names are the tile names)."""
    from fastssl.curation import tile

    tiles_csv = tile.tile_index_path(source)
    if tiles_csv is not None:
        tile.slide_reader()  # a missing reader stops the job here, it must not reject every tile
        names, refs = tile.read_tile_index(tiles_csv)
        if not names:
            raise DataError(tiles_csv, "no tiles in this tile index")
        return _Items(Path(source), names, tile_index=tiles_csv, tiles=refs)
    names, array = list_items(source)
    return _Items(Path(source), names, array)


def _to_float_chw(pixels: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) array -> (C, H, W) float32 in [0, 1] (uint8/uint16 scaled)."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected (H, W) or (H, W, 1|3|4) pixels, got shape {pixels.shape}")
    pixels = pixels[:, :, :3]
    if pixels.dtype == np.uint8:
        out = pixels.astype(np.float32) / 255.0
    elif pixels.dtype == np.uint16:
        out = pixels.astype(np.float32) / 65535.0
    elif np.issubdtype(pixels.dtype, np.floating):
        out = pixels.astype(np.float32)
    else:
        raise ValueError(f"unsupported pixel dtype {pixels.dtype}")
    if not np.isfinite(out).all():
        raise ValueError("pixels contain NaN or inf")
    return np.ascontiguousarray(out.transpose(2, 0, 1))


class _ItemDataset:
    """Map-style dataset over the items to embed; never raises for a bad item.

    Items are tile files under ``root``, rows of ``array`` or, with ``tiles``, regions of
    whole-slide images (fastssl.curation.tile.TileRef, read on the fly).
    __getitem__(i) -> (image (in_chans, S, S) float32 normalised, i, reason) where reason
    is "" for a good item and the error for a bad one (image zeros).
    """

    def __init__(self, root: str | os.PathLike, names: Sequence[str], array: np.ndarray | None,
                 positions: Sequence[int], img_size: int, in_chans: int,
                 mean: Sequence[float], std: Sequence[float], tiles: Sequence | None = None):
        from fastssl.curation.tile import SlideCache

        self.root, self.names, self.array = Path(root), names, array
        self.tiles, self.slides = tiles, SlideCache()
        self.positions = np.asarray(positions, dtype=np.int64)
        self.img_size, self.in_chans = int(img_size), int(in_chans)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)[:in_chans]
        self.std = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)[:in_chans]

    def __len__(self) -> int:
        return int(self.positions.shape[0])

    def _read(self, item: int) -> np.ndarray:
        if self.tiles is not None:
            return _to_float_chw(self.slides.read(self.tiles[item]))
        if self.array is not None:
            return _to_float_chw(np.asarray(self.array[item]))
        from fastssl.curation.tiles import read_image

        return _to_float_chw(read_image(self.root / self.names[item]))

    def _resize(self, chw: np.ndarray):
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(chw)
        c = x.shape[0]
        if c != self.in_chans:
            # grey -> repeated channels; colour -> luminance for a 1-channel model
            x = x.expand(self.in_chans, -1, -1) if c == 1 else (
                (x * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)
                .expand(self.in_chans, -1, -1))
        if x.shape[1:] != (self.img_size, self.img_size):
            x = F.interpolate(x[None], size=(self.img_size, self.img_size), mode="bilinear",
                              antialias=True, align_corners=False)[0]
        return x.contiguous()

    def __getitem__(self, i: int):
        import torch

        item = int(self.positions[i])
        try:
            x = self._resize(self._read(item))
            x = (x - torch.from_numpy(self.mean)) / torch.from_numpy(self.std)
            return x.float(), item, ""
        except Exception as exc:  # one bad file must never abort the run
            reason = f"{type(exc).__name__}: {exc}".replace("\n", " ")
            return torch.zeros(self.in_chans, self.img_size, self.img_size), item, reason


# --------------------------------------------------------------------------- model
LOCAL_DIR = "local-dir:"
# Weight files looked for in a local-dir model folder, in timm's order of preference.
_LOCAL_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth")
_NO_WEIGHTS = ("give --weights FILE (safetensors or a torch state_dict), a --model local-dir:FOLDER holding "
               "model.safetensors, or --random-init; nothing is downloaded")


def build_model(model: str, weights: str | None, random_init: bool, img_size: int | None,
                in_chans: int):
    """timm model with num_classes=0 (pooled features), weights loaded strictly from a local file.

    ``model`` is a timm name or ``local-dir:FOLDER`` (timm's format: FOLDER/config.json with
    ``architecture``, ``model_args`` and ``pretrained_cfg``, beside model.safetensors or
    pytorch_model.bin, which are the weights unless ``weights`` names another file). The
    architecture options (init_values, dynamic_img_size...) and the pixel mean/std then come from
    config.json. Every key of the file must fit the model: a missing or unexpected key is a
    DataError naming it (only classifier-head keys are dropped, features are taken before it).
    """
    weights = _local_dir_weights(model, weights, random_init)
    if weights is None and not random_init:
        raise ValueError(_NO_WEIGHTS)
    export = _export_metadata(weights)
    net = _create_model(model, export, weights, img_size, in_chans)
    if weights is not None:
        _load_weights_strict(net, Path(weights), model)
        if export:
            _use_export_settings(net, export, Path(weights))
    return net.eval()


def _local_dir_weights(model: str, weights: str | None, random_init: bool) -> str | None:
    """The weights file of a ``local-dir:`` model folder when --weights is not given."""
    if not model.startswith(LOCAL_DIR) or weights is not None or random_init:
        return weights
    folder = Path(model[len(LOCAL_DIR):])
    if not (folder / "config.json").is_file():
        raise DataError(folder / "config.json", "missing: a local-dir model folder needs timm's config.json")
    for name in _LOCAL_WEIGHT_FILES:
        if (folder / name).is_file():
            return str(folder / name)
    raise DataError(folder, f"no weights file ({', '.join(_LOCAL_WEIGHT_FILES)}) in this model folder")


def _create_model(model: str, export: dict, weights: str | None, img_size: int | None, in_chans: int):
    """The timm module: a fastssl export's metadata fixes the architecture (qk-norm...); a
    local-dir folder's config.json gives model_args; otherwise the timm name's defaults."""
    import timm

    kwargs = {"pretrained": False, "num_classes": 0, "in_chans": in_chans}
    if export:
        model, arch = _export_architecture(export, weights, model, in_chans)
        kwargs.update(arch)
    if model.startswith(LOCAL_DIR):
        kwargs.update(_local_dir_layers(Path(model[len(LOCAL_DIR):])))
    try:
        if img_size is not None:
            try:
                return timm.create_model(model, **{**kwargs, "img_size": img_size})
            except TypeError:  # convnets take any size and have no img_size argument
                pass
        return timm.create_model(model, **kwargs)
    except (FileNotFoundError, json.JSONDecodeError, KeyError, RuntimeError) as exc:
        raise ValueError(f"--model {model}: cannot build it ({type(exc).__name__}: {exc})") from None


def _local_dir_layers(folder: Path) -> dict:
    """Layer classes named by string in config.json's model_args (JSON holds no classes):
    ``"mlp_layer": "SwiGLUPacked"`` (Virchow) becomes ``timm.layers.SwiGLUPacked``."""
    import timm.layers

    try:
        args = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_args", {})
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(folder / "config.json", f"cannot read ({exc})") from None
    layer = args.get("mlp_layer")
    if not isinstance(layer, str):
        return {}
    if not isinstance(getattr(timm.layers, layer, None), (type, functools.partial)):  # SwiGLUPacked is a partial
        raise DataError(folder / "config.json", f"model_args.mlp_layer {layer!r} is not a layer class of timm.layers")
    return {"mlp_layer": getattr(timm.layers, layer)}


def _read_state_dict(path: Path) -> dict:
    """The tensors of a .safetensors file or a torch checkpoint (a {"model": ...} wrapper and
    DistributedDataParallel's "module." prefix removed)."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types on a damaged file
        raise DataError(path, f"cannot load weights ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise DataError(path, f"expected a state_dict of tensors, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_weights_strict(net, path: Path, model: str) -> None:
    """Loads ``path`` into ``net``; every model key must be given and every file key used.

    The one exception: keys of the classifier head (pretrained_cfg["classifier"], e.g. head.*)
    when the model has no such parameters, since features are taken before the head.
    """
    state = _resample_pos_embed(_read_state_dict(path), net, path)
    expected = set(net.state_dict())
    head = net.pretrained_cfg.get("classifier") or "head"
    heads = [head] if isinstance(head, str) else list(head)
    dropped = [k for k in state if k not in expected and any(k.startswith(h + ".") for h in heads)]
    state = {k: v for k, v in state.items() if k not in dropped}
    if dropped:
        log.info("%s: dropped the classifier head's %d keys (%s)", path, len(dropped), ", ".join(dropped))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise DataError(path, f"weights do not fit {model}: " + "; ".join(
            f"{what} keys {_few(keys)}" for what, keys in (("missing", missing), ("unexpected", unexpected))
            if keys))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # shape mismatches: weights of another architecture
        raise DataError(path, f"weights do not fit {model}: {str(exc).splitlines()[-1].strip()}") from None


def _few(keys: Sequence[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


def _export_metadata(weights: str | None) -> dict:
    """The metadata of a `fastssl pretrain` export (fastssl.models.export), {} for other weights."""
    if weights is None or Path(weights).suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # the loader below reports the damaged file with its name
        return {}
    return meta if "timm_kwargs" in meta else {}


def _export_architecture(export: dict, weights: str, model: str, in_chans: int) -> tuple[str, dict]:
    """(timm model name, create_model kwargs) of an export; --in-chans must agree."""
    arch = json.loads(export["timm_kwargs"])
    if in_chans != arch["in_chans"]:
        raise ValueError(f"--in-chans {in_chans}: {weights} is a fastssl export of a {arch['in_chans']}-channel "
                         f"encoder; pass --in-chans {arch['in_chans']}")
    log.info("%s: a fastssl export, architecture from its metadata (%s with %s) instead of --model %s",
             weights, export["timm_model"], arch, model)
    return export["timm_model"], arch


def _use_export_settings(net, export: dict, path: Path) -> None:
    """What a timm model cannot take from create_model: the export's final LayerNorm eps, and
    the pixel mean/std its encoder was trained with (the model's defaults would differ)."""
    if "final_norm_eps" in export:
        net.norm.eps = float(export["final_norm_eps"])
    data_cfg = json.loads(export.get("pretrained_cfg", "{}"))
    if "mean" in data_cfg and "std" in data_cfg:
        net.pretrained_cfg = dict(net.pretrained_cfg, mean=tuple(data_cfg["mean"]), std=tuple(data_cfg["std"]),
                                  input_size=(net.patch_embed.proj.in_channels, *net.patch_embed.img_size))
        log.info("%s: pixel mean %s std %s from the file's metadata", path, data_cfg["mean"], data_cfg["std"])


def _resample_pos_embed(state: dict, net, path: Path) -> dict:
    """Weights trained at another image size: their absolute position embedding
    (1, prefix + h*w, D) resampled to the model's patch grid as timm's ViT loader does
    (timm.layers.resample_abs_pos_embed: bicubic, antialiased, prefix rows kept)."""
    pos, target = state.get("pos_embed"), getattr(net, "pos_embed", None)
    if pos is None or target is None or pos.shape == target.shape or pos.ndim != 3:
        return state
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(net, "no_embed_class", False) else int(getattr(net, "num_prefix_tokens", 1))
    old_side = math.isqrt(pos.shape[1] - prefix)
    if old_side * old_side != pos.shape[1] - prefix or pos.shape[2] != target.shape[2]:
        raise DataError(path, f"pos_embed of shape {tuple(pos.shape)} cannot be resampled to "
                              f"{tuple(target.shape)} (not a square grid of the same width)")
    grid = [int(g) for g in net.patch_embed.grid_size]
    log.info("%s: position embedding resampled from a %dx%d to a %dx%d patch grid (weights trained "
             "at another image size)", path, old_side, old_side, grid[0], grid[1])
    return dict(state, pos_embed=resample_abs_pos_embed(pos.float(), new_size=grid, num_prefix_tokens=prefix))


# --------------------------------------------------------------------------- job
@dataclass
class EmbedConfig:
    """Settings of an embedding run (defaults are the CLI's)."""

    model: str = "vit_large_patch16_224"  # timm model name, or local-dir:FOLDER (timm's config.json + model.safetensors: architecture options and pixel mean/std from config.json)
    weights: str | None = None  # local weights: .safetensors or a torch state_dict (.pth/.bin), loaded strictly (default for local-dir: the folder's model.safetensors or pytorch_model.bin)
    random_init: bool = False  # random weights (testing only; nothing is downloaded)
    img_size: int | None = setting(None, range=SIDE)  # input side in pixels (default: the model's)
    in_chans: int = setting(3, range=Range(1, 64, integer=True))  # model input channels
    batch_size: int = setting(64, range=COUNT)  # images per forward pass
    shard_size: int = setting(65536, range=COUNT)  # rows per output shard
    workers: int = setting(4, range=NONNEG)  # DataLoader processes: 0 = this process, N >= 1 = N loader processes
    device: str = setting("auto", check=fdist.check_device)  # torch device
    precision: str = setting("fp32", choices=PRECISIONS)  # fp32: the model's own features on every device (TF32 off); bf16: autocast, faster on GPUs, features differ by about 1e-2
    quiet: bool = False  # no progress bar (the router's --quiet)
    overwrite: bool = False  # replace a run of other settings, tiles or weights found in --out
    verify_data: bool = False  # fingerprint every byte of the tiles and weights (default: tile paths and sizes, sampled blocks of the weights; cheap at millions of tiles)


SETTINGS = EmbedConfig   # the dataclass declaring this command's settings (fastssl.config)


# the one rank helpers, bound here so that tests can stand in for another rank
_rank_world, _barrier = fdist.rank_world, fdist.barrier


def _shard_name(rank: int, world: int, shard: int) -> str:
    """Zero-padded, so that sorting by name keeps the rows' order for any number of ranks
    (readers follow manifest.json's order anyway)."""
    return f"r{rank:05d}_{shard:05d}" if world > 1 else f"{shard:05d}"


def _plan_shards(n_items: int, world: int, shard_size: int) -> list[tuple[int, str, int, int]]:
    """[(rank, name, first item, stop item)] over all ranks: each rank a contiguous slice
    of the items, cut into shards of shard_size."""
    plan = []
    for r in range(world):
        lo, hi = n_items * r // world, n_items * (r + 1) // world
        for s, start in enumerate(range(lo, hi, shard_size)):
            plan.append((r, _shard_name(r, world, s), start, min(start + shard_size, hi)))
    return plan


def _read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))[1:]


def _check_config(cfg: EmbedConfig) -> None:
    """The API's check of an EmbedConfig: its declared ranges and choices (fastssl.config), the
    three counts first in the words this function has always used for them."""
    for name in ("batch_size", "shard_size", "in_chans"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    check_settings(cfg)
    if cfg.weights is None and not cfg.random_init:
        raise ValueError(_NO_WEIGHTS)


def _pixel_settings(net, cfg: EmbedConfig) -> tuple[int, tuple, tuple]:
    """(img_size, mean, std) the model is fed with: the flags', else the model's own."""
    data_cfg = net.pretrained_cfg
    img_size = cfg.img_size or int(data_cfg.get("input_size", (3, 224, 224))[-1])
    mean = tuple(data_cfg.get("mean", (0.5,) * 3))
    std = tuple(data_cfg.get("std", (0.5,) * 3))
    if len(mean) < cfg.in_chans:
        mean, std = (float(np.mean(mean)),) * cfg.in_chans, (float(np.mean(std)),) * cfg.in_chans
    return img_size, mean, std


def _tiles_identity(items: _Items, full: bool) -> dict:
    """The tile set as one fastssl.jobs input entry, cheap at millions of tiles: a sha256 over
    the sorted relative paths and sizes (``full``: and every tile's bytes). An array file and a
    tile index's tiles.csv + slides.csv are fingerprinted like any input file (sampled blocks)."""
    source, names = items.source, items.names
    if items.tile_index is not None:
        index = items.tile_index.resolve()
        return jobs.fingerprint_files([index, index.with_name("slides.csv")], full=full)
    if not source.is_dir():
        return jobs.fingerprint_files([source.resolve()], full=full)
    digest, total = hashlib.sha256(), 0
    for name in names:
        path = source / name
        size = path.stat().st_size
        total += size
        digest.update(f"{name}\t{size}\n".encode())
        if full:
            digest.update(jobs.fingerprint_files([path], full=True)[str(path)]["sha256"].encode())
    return {str(source.resolve()): {"size": total, "tiles": len(names), "sha256": digest.hexdigest(),
                                    "hashed": "full" if full else "names+sizes"}}


def _fingerprint(cfg: EmbedConfig, items: _Items, world: int, net) -> jobs.JobFingerprint:
    """What makes two embed runs the same (not workers, batch size, device or progress)."""
    img_size, mean, std = _pixel_settings(net, cfg)
    settings = {"model": cfg.model, "random_init": cfg.random_init, "img_size": img_size,
                "in_chans": cfg.in_chans, "mean": list(mean), "std": list(std), "dim": int(net.num_features),
                "dtype": "float16", "precision": cfg.precision, "shard_size": cfg.shard_size, "world_size": world, "tiles": len(items.names)}
    inputs = _tiles_identity(items, cfg.verify_data)
    files = [cfg.weights] if cfg.weights is not None else []
    if cfg.model.startswith(LOCAL_DIR):  # its config.json fixes the architecture and mean/std
        files.append(Path(cfg.model[len(LOCAL_DIR):]) / "config.json")
    inputs.update(jobs.fingerprint_files([Path(f).resolve() for f in files], full=cfg.verify_data))
    return jobs.JobFingerprint("embed", settings, inputs)


def embed_images(source: str | os.PathLike, out_dir: str | os.PathLike,
                 config: EmbedConfig | None = None, **overrides) -> dict:
    """Embeds every tile of ``source`` into fp16 shards under ``out_dir``.

    Args:
        source: a folder of tiles (png, jpg, npy; recursive), a .npy file of (N, H, W[, C])
            images, or a tile index of `fastssl tile` (its folder or tiles.csv: each tile is
            read from its slide, no tile files are written).
        out_dir: output directory (created; rerunning the same command resumes).
        config: :class:`EmbedConfig`; keyword overrides replace its fields.
    Returns:
        The manifest (dict): model, dim, count (rows embedded), rejected, shards, ...
        ({} on ranks other than 0).
    Raises:
        ValueError: a bad setting; ResumeMismatch: out_dir holds another run (other settings,
            tiles or weights; not with ``overwrite``); OutputLocked: another job writes out_dir.
        DataError: the source or the weights file cannot be used.
    """
    cfg = EmbedConfig(**{**asdict(config or EmbedConfig()), **overrides})
    cfg = replace(cfg, weights=_local_dir_weights(cfg.model, cfg.weights, cfg.random_init))
    _check_config(cfg)
    out = Path(out_dir)
    items = _open_items(source)
    rank, world = _rank_world()
    net = build_model(cfg.model, cfg.weights, cfg.random_init, cfg.img_size, cfg.in_chans)
    fingerprint = _fingerprint(cfg, items, world, net)
    with jobs.open_job(out, fingerprint, overwrite=cfg.overwrite, stale=("parts",), rank=rank, world=world):
        (out / "parts").mkdir(parents=True, exist_ok=True)
        return _embed_and_merge(cfg, items, out, net, rank, world)


def _embed_and_merge(cfg: EmbedConfig, items: _Items, out: Path, net, rank: int, world: int) -> dict:
    """This rank's unfinished shards, then (rank 0) the merged index and manifest."""
    device = fdist.pick_device(cfg.device)
    img_size, mean, std = _pixel_settings(net, cfg)
    shards = _plan_shards(len(items.names), world, cfg.shard_size)
    mine = [s for s in shards if s[0] == rank]
    todo = [s for s in mine if not (out / f"emb_{s[1]}.npy").exists()]
    log.info("embed: %d items, %d shards on rank %d/%d (%d to do), model %s dim %d, img %d, mean %s "
             "std %s, %s on %s", len(items.names), len(mine), rank, world, len(todo), cfg.model,
             net.num_features, img_size, mean, std, cfg.precision, device)
    started = time.time()
    n_done = 0
    if todo:
        positions = np.concatenate([np.arange(a, b) for _, _, a, b in todo])
        dataset = _ItemDataset(items.source, items.names, items.array, positions, img_size, cfg.in_chans,
                               mean, std, tiles=items.tiles)
        n_done = _embed_shards(cfg, dataset, todo, out, items.names, net, device)
    elapsed = time.time() - started

    _barrier()
    manifest = _merge(out, shards, items, cfg, int(net.num_features), (img_size, mean, std)) if rank == 0 else {}
    _barrier()
    if rank == 0:
        log.info("embed: %d rows (%d rejected) in %d shards under %s; this run embedded %d in "
                 "%.1f s", manifest["count"], manifest["rejected"], len(shards), out, n_done, elapsed)
    return manifest


def _features(net, x, ok: np.ndarray, device, dim: int, precision: str) -> np.ndarray:
    """(B, dim) float16 features of a batch; rows of rejected items (ok False) stay zero.
    fp32 runs in plain float32 (no autocast); bf16 autocasts on any device."""
    import torch

    out_feat = np.zeros((len(ok), dim), np.float16)
    if ok.any():
        xb = x[torch.from_numpy(ok)].to(device, non_blocking=True)
        if device.type == "cuda":
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            y = net(xb)
        out_feat[ok] = y.float().cpu().numpy().astype(np.float16)
    return out_feat


@contextlib.contextmanager
def _no_tf32(precision: str):
    """fp32 on a GPU means fp32: TF32 matmuls and convolutions (cuDNN's default) are switched
    off for the run, so that GPU features equal CPU ones within fp32 rounding."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if precision == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class _ShardWriter:
    """Collects the rows of the shard being filled and writes it (index part, rejects part,
    then the .npy last, which marks it finished) when an item of the next shard arrives."""

    def __init__(self, todo, out: Path, names: Sequence[str], dim: int):
        self.shards, self.out, self.names, self.dim = iter(todo), out, names, dim
        self.current = next(self.shards)
        self.feats, self.items, self.rejects, self.written = [], [], [], 0

    def add(self, item: int, feature: np.ndarray | None, reason: str) -> None:
        """One item's (1, dim) feature, or its reject reason when feature is None."""
        while item >= self.current[3]:  # a batch may straddle a shard boundary
            self.flush()
            self.current = next(self.shards)
        if feature is not None:
            self.feats.append(feature)
            self.items.append(item)
        else:
            self.rejects.append([self.names[item], reason])
            log.warning("rejected %s: %s", self.names[item], reason)

    def flush(self) -> None:
        name = self.current[1]
        emb = np.concatenate(self.feats) if self.feats else np.zeros((0, self.dim), np.float16)
        rows = [[off, f"emb_{name}.npy", off, self.names[it]] for off, it in enumerate(self.items)]
        atomic_write_csv(self.out / "parts" / f"index_{name}.csv", ["row", "shard", "offset", "source"], rows)
        atomic_write_csv(self.out / "parts" / f"rejects_{name}.csv", ["source", "reason"], self.rejects)
        atomic_save_npy(self.out / f"emb_{name}.npy", emb)  # last: marks the shard finished
        self.written += len(self.items)
        self.feats, self.items, self.rejects = [], [], []


def _embed_shards(cfg: EmbedConfig, dataset: _ItemDataset, todo, out: Path, names, net, device) -> int:
    """Embeds the shards ``todo`` (each written when complete); returns the rows embedded."""
    import torch
    from tqdm import tqdm

    dim = int(net.num_features)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.workers,
        pin_memory=device.type == "cuda", persistent_workers=False,
    )
    net = net.to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    bar = tqdm(total=len(dataset), unit="img", disable=cfg.quiet or not sys.stderr.isatty())
    writer = _ShardWriter(todo, out, names, dim)
    with torch.inference_mode(), _no_tf32(cfg.precision):
        for x, idx, reasons in loader:
            ok = np.array([r == "" for r in reasons], dtype=bool)
            out_feat = _features(net, x, ok, device, dim, cfg.precision)
            for j, item in enumerate(idx.tolist()):
                writer.add(item, out_feat[j : j + 1] if ok[j] else None, reasons[j])
            bar.update(len(reasons))
    writer.flush()
    bar.close()
    return writer.written


def _merge(out: Path, shards, items: _Items, cfg: EmbedConfig, dim: int, pixels: tuple) -> dict:
    """Rank 0: the global index.csv, rejects.csv and manifest.json from the shard parts.
    ``pixels`` = (img_size, mean, std) the model was fed with."""
    index_rows, reject_rows, shard_info = [], [], []
    for _, name, a, b in shards:
        if not (out / f"emb_{name}.npy").exists():
            raise DataError(out / f"emb_{name}.npy", "shard missing after all ranks finished")
        rows = _read_csv(out / "parts" / f"index_{name}.csv")
        index_rows += [[len(index_rows) + k, shard_file, offset, source]
                       for k, (_, shard_file, offset, source) in enumerate(rows)]
        reject_rows += _read_csv(out / "parts" / f"rejects_{name}.csv")
        shard_info.append({"file": f"emb_{name}.npy", "rows": len(rows), "items": [a, b]})
    atomic_write_csv(out / "index.csv", ["row", "shard", "offset", "source"], index_rows)
    atomic_write_csv(out / "rejects.csv", ["source", "reason"], reject_rows)
    img_size, mean, std = pixels
    manifest = {
        "model": cfg.model, "weights": cfg.weights, "random_init": cfg.random_init,
        "dim": dim, "dtype": "float16", "precision": cfg.precision, "count": len(index_rows),
        "rejected": len(reject_rows), "items": len(items.names), "img_size": img_size,
        "in_chans": cfg.in_chans, "mean": list(mean), "std": list(std),
        # what index.csv's source names are relative to, and the tile index they come from
        "source": str(items.source.resolve()),
        "tile_index": str(items.tile_index.resolve()) if items.tile_index is not None else None,
        "shards": shard_info,
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2))
    return manifest


# --------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    parser.add_argument("source", help="folder of tiles (png, jpg, npy; recursive), a .npy file of "
                                       "(N, H, W[, C]) uint8 images, or a tile index of `fastssl tile` "
                                       "(its folder or tiles.csv: tiles are read from the slides)")
    parser.add_argument("--out", required=True, help="output directory (rerun to resume)")
    add_dataclass_arguments(parser, EmbedConfig, skip=("quiet",))   # declared once, on EmbedConfig


def run(args) -> int:
    try:
        from fastssl import distributed as d

        d.init()
    except ImportError:
        pass
    cfg = config_from_args(EmbedConfig, args)
    manifest = embed_images(args.source, args.out, cfg)
    if manifest:
        print(f"embedded {manifest['count']} images ({manifest['rejected']} rejected) with "
              f"{manifest['model']} (dim {manifest['dim']}) into {len(manifest['shards'])} "
              f"shards under {args.out}")
    return 0
