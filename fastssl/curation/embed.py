"""`fastssl embed`: image tiles -> timm features in fp16 .npy shards.

Output directory::

    emb_00000.npy        (rows, dim) float16, one shard (``emb_r<rank:05d>_00000.npy`` when
                         several ranks run); rows of rejected images are left out
    parts/index_00000.csv, parts/rejects_00000.csv   the shard's rows and its rejects
    index.csv            row, shard, offset, source   (row = global row over all shards)
    rejects.csv          source, reason               (unreadable images, skipped)
    manifest.json        model, dim, count, shards, settings
    job.json             the run's fingerprint (fastssl.jobs): model, img size, in_chans,
                         normalisation, dtype, shard size, ranks; a sha256 of the sorted tile
                         paths + sizes and sampled blocks of the weights file
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
import hashlib
import io
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from fastssl import jobs
from fastssl.curation.tree import save_npy_atomic, write_text_atomic
from fastssl.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".npy")


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
    raise DataError(path, "not a folder of tiles nor a .npy array file")


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


class TileDataset:
    """Map-style dataset over the items; never raises for a bad item.

    __getitem__(i) -> (image (in_chans, S, S) float32 normalised, i, reason) where reason
    is "" for a good item and the error for a bad one (image zeros).
    """

    def __init__(self, root: str | os.PathLike, names: Sequence[str], array: np.ndarray | None,
                 positions: Sequence[int], img_size: int, in_chans: int,
                 mean: Sequence[float], std: Sequence[float]):
        self.root, self.names, self.array = Path(root), names, array
        self.positions = np.asarray(positions, dtype=np.int64)
        self.img_size, self.in_chans = int(img_size), int(in_chans)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)[:in_chans]
        self.std = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)[:in_chans]

    def __len__(self) -> int:
        return int(self.positions.shape[0])

    def _read(self, item: int) -> np.ndarray:
        if self.array is not None:
            return _to_float_chw(np.asarray(self.array[item]))
        path = self.root / self.names[item]
        if path.suffix.lower() == ".npy":
            return _to_float_chw(np.load(path, allow_pickle=False))
        from PIL import Image

        with Image.open(path) as img:
            img.load()
            if img.mode not in ("L", "RGB", "I;16"):
                img = img.convert("RGB")
            pixels = np.asarray(img)
        return _to_float_chw(pixels)

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
def build_model(model: str, weights: str | None, random_init: bool, img_size: int | None,
                in_chans: int):
    """timm model with num_classes=0 (pooled features), weights from a local file."""
    import timm
    import torch

    if weights is None and not random_init:
        raise ValueError("give --weights FILE (safetensors or a torch state_dict) or "
                         "--random-init; nothing is downloaded")
    kwargs = {"pretrained": False, "num_classes": 0, "in_chans": in_chans}
    export = _export_metadata(weights)
    if export:  # a `fastssl pretrain` export: its metadata fixes the architecture (qk-norm...)
        model, arch = _export_architecture(export, weights, model, in_chans)
        net = timm.create_model(model, **{**kwargs, **arch, **({"img_size": img_size} if img_size else {})})
    elif img_size is not None:
        try:
            net = timm.create_model(model, img_size=img_size, **kwargs)
        except TypeError:  # convnets take any size and have no img_size argument
            net = timm.create_model(model, **kwargs)
    else:
        net = timm.create_model(model, **kwargs)
    if weights is not None:
        path = Path(weights)
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
        state = _resample_pos_embed({k.removeprefix("module."): v for k, v in state.items()}, net, path)
        try:
            result = net.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches: weights of another architecture
            raise DataError(path, f"weights do not fit {model}: {str(exc).splitlines()[-1].strip()}") from None
        if result.missing_keys:
            raise DataError(path, f"weights do not fit {model}: missing {result.missing_keys[:5]}"
                                  f"{' ...' if len(result.missing_keys) > 5 else ''}")
        if result.unexpected_keys:  # e.g. the classifier head dropped by num_classes=0
            log.info("ignored %d unexpected keys (%s ...)", len(result.unexpected_keys),
                     result.unexpected_keys[0])
        if export:
            _use_export_settings(net, export, path)
    return net.eval()


def _export_metadata(weights: str | None) -> dict:
    """The metadata of a `fastssl pretrain` export (fastssl.train.export), {} for other weights."""
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

    model: str = "vit_large_patch16_224"
    weights: str | None = None
    random_init: bool = False
    img_size: int | None = None  # default: the model's input size
    in_chans: int = 3
    batch_size: int = 64
    shard_size: int = 65536
    workers: int = 4
    device: str = "auto"
    quiet: bool = False
    overwrite: bool = False  # replace another run found in the output dir
    verify_data: bool = False  # fingerprint every byte of the tiles and weights


def _rank_world() -> tuple[int, int]:
    try:
        from fastssl import distributed as d

        return d.rank(), d.world_size()
    except ImportError:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


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


def _write_csv_atomic(path: Path, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(rows)
    jobs.atomic_write_text(path, text.getvalue())


def _read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))[1:]


def _check_config(cfg: EmbedConfig) -> None:
    for name in ("batch_size", "shard_size", "in_chans"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.workers < 0:
        raise ValueError(f"workers must be >= 0, got {cfg.workers}")
    if cfg.weights is None and not cfg.random_init:
        raise ValueError("give --weights FILE (safetensors or a torch state_dict) or "
                         "--random-init; nothing is downloaded")


def _pick_device(name: str, world: int):
    import torch

    device = torch.device("cuda" if name == "auto" and torch.cuda.is_available()
                          else ("cpu" if name == "auto" else name))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _pixel_settings(net, cfg: EmbedConfig) -> tuple[int, tuple, tuple]:
    """(img_size, mean, std) the model is fed with: the flags', else the model's own."""
    data_cfg = net.pretrained_cfg
    img_size = cfg.img_size or int(data_cfg.get("input_size", (3, 224, 224))[-1])
    mean = tuple(data_cfg.get("mean", (0.5,) * 3))
    std = tuple(data_cfg.get("std", (0.5,) * 3))
    if len(mean) < cfg.in_chans:
        mean, std = (float(np.mean(mean)),) * cfg.in_chans, (float(np.mean(std)),) * cfg.in_chans
    return img_size, mean, std


def _tiles_identity(source: Path, names: Sequence[str], full: bool) -> dict:
    """The tile set as one fastssl.jobs input entry, cheap at millions of tiles: a sha256 over
    the sorted relative paths and sizes (``full``: and every tile's bytes). An array file is
    fingerprinted like any input file (sampled blocks)."""
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


def _fingerprint(cfg: EmbedConfig, source: Path, names: Sequence[str], world: int, net) -> jobs.JobFingerprint:
    """What makes two embed runs the same (not workers, batch size, device or progress)."""
    img_size, mean, std = _pixel_settings(net, cfg)
    settings = {"model": cfg.model, "random_init": cfg.random_init, "img_size": img_size,
                "in_chans": cfg.in_chans, "mean": list(mean), "std": list(std), "dim": int(net.num_features),
                "dtype": "float16", "shard_size": cfg.shard_size, "world_size": world, "tiles": len(names)}
    inputs = _tiles_identity(source, names, cfg.verify_data)
    if cfg.weights is not None:
        inputs.update(jobs.fingerprint_files([Path(cfg.weights).resolve()], full=cfg.verify_data))
    return jobs.JobFingerprint("embed", settings, inputs)


def _rank0_verdict(ok: bool) -> bool:
    """Rank 0's ``ok`` on every rank (a collective: the other ranks wait for rank 0's checks)."""
    from fastssl import distributed

    return bool(distributed.broadcast(np.array([int(ok)], np.int64))[0])


@contextlib.contextmanager
def _job_guard(out: Path, fingerprint: jobs.JobFingerprint, rank: int, overwrite: bool):
    """fastssl.jobs on rank 0: the output lock (held to the end), stale temporary files removed,
    the fingerprint checked against a previous run in out (ResumeMismatch naming the differences
    unless ``overwrite``). The other ranks write nothing until rank 0 has passed its checks."""
    if rank != 0:
        if not _rank0_verdict(True):
            raise ValueError(f"{out}: rank 0 refused this run (its log says why)")
        yield
        return
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(jobs.OutputLock(out))
            for sub in (out, out / "parts"):
                jobs.remove_stale_tmp(sub)
            if jobs.check_resume(out, fingerprint, overwrite=overwrite) == "new":
                jobs.clear_outputs(out)
                jobs.write_fingerprint(out, fingerprint)
        except BaseException:
            _rank0_verdict(False)
            raise
        _rank0_verdict(True)
        yield


def embed_images(source: str | os.PathLike, out_dir: str | os.PathLike,
                 config: EmbedConfig | None = None, **overrides) -> dict:
    """Embeds every tile of ``source`` into fp16 shards under ``out_dir``.

    Args:
        source: a folder of tiles (png, jpg, npy; recursive) or a .npy file of
            (N, H, W[, C]) images.
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
    _check_config(cfg)
    source, out = Path(source), Path(out_dir)
    names, array = list_items(source)
    rank, world = _rank_world()
    net = build_model(cfg.model, cfg.weights, cfg.random_init, cfg.img_size, cfg.in_chans)
    fingerprint = _fingerprint(cfg, source, names, world, net)
    with _job_guard(out, fingerprint, rank, cfg.overwrite):
        (out / "parts").mkdir(parents=True, exist_ok=True)
        return _embed_and_merge(cfg, source, out, names, array, net, rank, world)


def _embed_and_merge(cfg: EmbedConfig, source: Path, out: Path, names, array, net, rank: int,
                     world: int) -> dict:
    """This rank's unfinished shards, then (rank 0) the merged index and manifest."""
    device = _pick_device(cfg.device, world)
    img_size, mean, std = _pixel_settings(net, cfg)
    shards = _plan_shards(len(names), world, cfg.shard_size)
    mine = [s for s in shards if s[0] == rank]
    todo = [s for s in mine if not (out / f"emb_{s[1]}.npy").exists()]
    log.info("embed: %d items, %d shards on rank %d/%d (%d to do), model %s dim %d, "
             "img %d, device %s", len(names), len(mine), rank, world, len(todo), cfg.model,
             net.num_features, img_size, device)
    started = time.time()
    n_done = 0
    if todo:
        dataset = TileDataset(source, names, array, np.concatenate([np.arange(a, b) for _, _, a, b in todo]),
                              img_size, cfg.in_chans, mean, std)
        n_done = _embed_shards(cfg, dataset, todo, out, names, net, device)
    elapsed = time.time() - started

    _barrier()
    manifest = _merge(out, shards, names, cfg, int(net.num_features), img_size) if rank == 0 else {}
    _barrier()
    if rank == 0:
        log.info("embed: %d rows (%d rejected) in %d shards under %s; this run embedded %d in "
                 "%.1f s", manifest["count"], manifest["rejected"], len(shards), out, n_done, elapsed)
    return manifest


def _features(net, x, ok: np.ndarray, device, dim: int) -> np.ndarray:
    """(B, dim) float16 features of a batch; rows of rejected items (ok False) stay zero."""
    import torch

    out_feat = np.zeros((len(ok), dim), np.float16)
    if ok.any():
        xb = x[torch.from_numpy(ok)].to(device, non_blocking=True)
        if device.type == "cuda":
            xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = net(xb)
        else:
            y = net(xb)
        out_feat[ok] = y.float().cpu().numpy().astype(np.float16)
    return out_feat


def _embed_shards(cfg: EmbedConfig, dataset: TileDataset, todo, out: Path, names, net, device) -> int:
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
    shard_iter = iter(todo)
    current = next(shard_iter)
    feats, items, rejects = [], [], []
    n_done = 0

    def flush(shard) -> None:
        _, name, a, b = shard
        emb = np.concatenate(feats) if feats else np.zeros((0, dim), np.float16)
        rows = [[off, f"emb_{name}.npy", off, names[it]] for off, it in enumerate(items)]
        _write_csv_atomic(out / "parts" / f"index_{name}.csv", ["row", "shard", "offset", "source"], rows)
        _write_csv_atomic(out / "parts" / f"rejects_{name}.csv", ["source", "reason"], rejects)
        save_npy_atomic(out / f"emb_{name}.npy", emb)  # last: marks the shard finished

    with torch.inference_mode():
        for x, idx, reasons in loader:
            ok = np.array([r == "" for r in reasons], dtype=bool)
            out_feat = _features(net, x, ok, device, dim)
            # Rows go to their shard in order; a batch may straddle a shard boundary.
            for j, item in enumerate(idx.tolist()):
                while item >= current[3]:
                    flush(current)
                    n_done += len(items)
                    feats, items, rejects = [], [], []
                    current = next(shard_iter)
                if ok[j]:
                    feats.append(out_feat[j : j + 1])
                    items.append(item)
                else:
                    rejects.append([names[item], reasons[j]])
                    log.warning("rejected %s: %s", names[item], reasons[j])
            bar.update(len(reasons))
    flush(current)
    bar.close()
    return n_done + len(items)


def _merge(out: Path, shards, names, cfg: EmbedConfig, dim: int, img_size: int) -> dict:
    """Rank 0: the global index.csv, rejects.csv and manifest.json from the shard parts."""
    index_rows, reject_rows, shard_info = [], [], []
    row = 0
    for _, name, a, b in shards:
        part = out / "parts" / f"index_{name}.csv"
        if not (out / f"emb_{name}.npy").exists():
            raise DataError(out / f"emb_{name}.npy", "shard missing after all ranks finished")
        rows = _read_csv(part)
        for _, shard_file, offset, source in rows:
            index_rows.append([row, shard_file, offset, source])
            row += 1
        reject_rows += _read_csv(out / "parts" / f"rejects_{name}.csv")
        shard_info.append({"file": f"emb_{name}.npy", "rows": len(rows), "items": [a, b]})
    _write_csv_atomic(out / "index.csv", ["row", "shard", "offset", "source"], index_rows)
    _write_csv_atomic(out / "rejects.csv", ["source", "reason"], reject_rows)
    manifest = {
        "model": cfg.model, "weights": cfg.weights, "random_init": cfg.random_init,
        "dim": dim, "dtype": "float16", "count": row, "rejected": len(reject_rows),
        "items": len(names), "img_size": img_size, "in_chans": cfg.in_chans,
        "shards": shard_info,
    }
    write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=2))
    return manifest


# --------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    d = EmbedConfig()
    parser.add_argument("source", help="folder of tiles (png, jpg, npy; recursive) or a .npy "
                                       "file of (N, H, W[, C]) uint8 images")
    parser.add_argument("--out", required=True, help="output directory (rerun to resume)")
    parser.add_argument("--model", default=d.model, help="timm model name")
    parser.add_argument("--weights", default=None,
                        help="local weights: .safetensors or a torch state_dict (.pth/.bin)")
    parser.add_argument("--random-init", action="store_true",
                        help="random weights (testing only; nothing is downloaded)")
    parser.add_argument("--img-size", type=int, default=None,
                        help="input side in pixels (default: the model's)")
    parser.add_argument("--in-chans", type=int, default=d.in_chans, help="model input channels")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="images per forward pass")
    parser.add_argument("--shard-size", type=int, default=d.shard_size, help="rows per output shard")
    parser.add_argument("--workers", type=int, default=d.workers, help="DataLoader worker processes")
    parser.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a run of other settings, tiles or weights found in --out")
    parser.add_argument("--verify-data", action="store_true",
                        help="fingerprint every byte of the tiles and weights (default: tile paths "
                             "and sizes, sampled blocks of the weights; cheap at millions of tiles)")


def run(args) -> int:
    try:
        from fastssl import distributed as d

        d.init()
    except ImportError:
        pass
    cfg = EmbedConfig(
        model=args.model, weights=args.weights, random_init=args.random_init,
        img_size=args.img_size, in_chans=args.in_chans, batch_size=args.batch_size,
        shard_size=args.shard_size, workers=args.workers, device=args.device,
        quiet=getattr(args, "quiet", False), overwrite=args.overwrite, verify_data=args.verify_data,
    )
    try:
        manifest = embed_images(args.source, args.out, cfg)
    except (ValueError, DataError) as exc:
        log.error("%s", exc)
        return 2
    if manifest:
        print(f"embedded {manifest['count']} images ({manifest['rejected']} rejected) with "
              f"{manifest['model']} (dim {manifest['dim']}) into {len(manifest['shards'])} "
              f"shards under {args.out}")
    return 0
