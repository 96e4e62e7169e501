"""`fastssl plot RUN_DIR`: PNG figures of a pretraining run (matplotlib is imported lazily).

* :func:`plot_pretrain_curves` - ``loss_curves.png`` from ``metrics.jsonl`` (or
  ``metrics.csv``): one panel each for the losses (loss, recon, any ``*recon*`` column such
  as a validation reconstruction loss), alignment, the matched / unmatched cosine columns
  when present, the learning rate and beta; x = optimizer step.
* :func:`plot_reconstructions` - ``reconstructions.png``: for a few studies of the cache,
  frontal and lateral side by side, each as original | masked input | reconstruction
  (predicted masked patches pasted beside the visible ones), from a ``checkpoint.pt`` that
  has a decoder (paired or single mode).
* :func:`write_run_plots` - both, for a job to call at its end; a missing matplotlib or a
  checkpoint without a decoder is a note in the log, not an error.

Each plotting function returns the arrays it drew, so that a test (or a user) can check
them against the files.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastssl.config import COUNT, add_dataclass_arguments, check_settings, config_from_args, setting

__all__ = ["read_metrics", "curve_series", "plot_pretrain_curves", "reconstruction_arrays",
           "plot_reconstructions", "write_run_plots", "add_arguments", "run"]

log = logging.getLogger(__name__)

CURVES_PNG, RECON_PNG = "loss_curves.png", "reconstructions.png"
# Panels of the curves figure: (title, y scale, does a metrics column belong here).
_PANELS = (
    ("loss", "log", lambda k: k == "loss" or "recon" in k),
    ("alignment", "linear", lambda k: k.startswith("align")),
    ("cosine of pooled latents", "linear", lambda k: "cos" in k),
    ("learning rate", "linear", lambda k: k == "lr"),
    ("beta (alignment weight)", "linear", lambda k: k == "beta"),
)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        from fastssl.errors import MissingDependencyError

        raise MissingDependencyError("plots need matplotlib: pip install 'fastssl[plots]'") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------------- curves
def read_metrics(run_dir: str | os.PathLike) -> tuple[list[dict], Path]:
    """The records of ``metrics.jsonl`` (preferred) or ``metrics.csv`` of a run, and the
    file read. Numeric CSV cells become floats; empty cells are left out of their record."""
    run_dir = Path(run_dir)
    jsonl, csv_path = run_dir / "metrics.jsonl", run_dir / "metrics.csv"
    if jsonl.is_file():
        with open(jsonl, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()], jsonl
    if csv_path.is_file():
        with open(csv_path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        return [{k: _number(v) for k, v in row.items() if v not in ("", None)} for row in rows], csv_path
    raise FileNotFoundError(f"{run_dir}: neither metrics.jsonl nor metrics.csv (not a pretrain run dir?)")


def _number(cell: str):
    """A CSV cell as a float when it is one (a text column stays text and is not plotted)."""
    try:
        return float(cell)
    except ValueError:
        return cell


def curve_series(records: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """column -> (steps, values) over the records that hold a finite number for it."""
    series: dict[str, tuple[list, list]] = {}
    for rec in records:
        if "step" not in rec:
            continue
        for key, value in rec.items():
            if key in ("step", "epoch") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                steps, values = series.setdefault(key, ([], []))
                steps.append(rec["step"])
                values.append(float(value))
    return {k: (np.asarray(s, dtype=np.int64), np.asarray(v, dtype=np.float64)) for k, (s, v) in series.items()}


def plot_pretrain_curves(run_dir: str | os.PathLike, out_png: str | os.PathLike | None = None) -> dict:
    """Draws the run's training curves into ``out_png`` (default RUN_DIR/loss_curves.png).

    Returns:
        dict(png=path, source=metrics file, series={column: (steps (n,) int64, values (n,) float64)})
        with exactly the points drawn.
    """
    records, source = read_metrics(run_dir)
    series = curve_series(records)
    panels = [(title, scale, [k for k in sorted(series) if belongs(k)]) for title, scale, belongs in _PANELS]
    panels = [p for p in panels if p[2]]
    if not panels:
        raise ValueError(f"{source}: no metrics with a step to plot")
    plt = _pyplot()
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.3 * len(panels)), sharex=True, squeeze=False)
    drawn = {}
    for ax, (title, scale, keys) in zip(axes[:, 0], panels):
        for key in keys:
            steps, values = series[key]
            ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=key)
            drawn[key] = (steps, values)
        if scale == "log" and all((series[k][1] > 0).all() for k in keys):
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel("optimizer step")
    fig.suptitle(f"{Path(run_dir).name}: training curves", fontsize=11)
    fig.tight_layout()
    out_png = Path(out_png) if out_png is not None else Path(run_dir) / CURVES_PNG
    _savefig(fig, out_png)
    plt.close(fig)
    return dict(png=str(out_png), source=str(source), series=drawn)


def _savefig(fig, path: Path) -> None:
    """PNG written to a temporary name and renamed, as every output of fastssl."""
    import io

    from fastssl.jobs import atomic_write_bytes

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())


# ----------------------------------------------------------------- reconstructions
def _unpatchify(patches, patch_size: int, channels: int):
    """(B, L, p*p*C) in facebookresearch/mae's order -> (B, C, H, W); inverse of
    fastssl.reference.mae.patchify_reference."""
    import torch

    b, n, _ = patches.shape
    side = math.isqrt(n)
    x = patches.reshape(b, side, side, patch_size, patch_size, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, channels, side * patch_size, side * patch_size)


def _load_mae(checkpoint: str):
    """(MultiViewMAE in eval mode, the run's config dict) from a pretrain checkpoint.pt."""
    import torch

    from fastssl.models.mvmae import ModelConfig, MultiViewMAE

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not any(k.startswith("decoder_") for k in ckpt["model"]):
        raise ValueError(f"checkpoint={checkpoint!r} has no decoder (a supervised run?): nothing to reconstruct")
    model = MultiViewMAE(ModelConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt.get("config", {})


def _pick_pairs(cache: str, n: int):
    """(frontal, lateral) (n', 1, S, S) raw images of the first n studies with both views,
    from the validate split, else test, else any split."""
    from fastssl.data.datasets import PairedViewDataset

    for split in ("validate", "test", None):
        ds = PairedViewDataset(cache, split=split, preferred_only=True)
        if len(ds):
            frontal, lateral, _, _ = ds.get_batch(np.arange(min(n, len(ds))))
            return frontal, lateral
    raise ValueError(f"cache={cache!r} has no study with both a frontal and a lateral image")


def reconstruction_arrays(checkpoint: str, cache: str, *, n: int = 4, mask_ratio: float | None = None,
                          seed: int = 0) -> dict:
    """Masks and reconstructs the first ``n`` paired studies of ``cache`` with the MAE of
    ``checkpoint`` (mask ratio of the run unless given; masks drawn from ``seed``).

    Returns:
        dict of float32 arrays in [0, 1] pixel units (the normalisation undone), each
        (2, n, H, W) with index 0 frontal, 1 lateral: original, masked (masked patches
        NaN), reconstruction (prediction on masked patches, original elsewhere); and
        mask (2, n, L) 1 = masked, mask_ratio.
    """
    import torch

    from fastssl.data.augment import CenterResize
    from fastssl.data.cache import read_manifest
    from fastssl.models.mvmae import VIEW_IDS
    from fastssl.reference.mae import patchify_reference
    from fastssl.data.cache import pixel_stats

    if n < 1:
        raise ValueError(f"n={n}; expected >= 1")
    model, run_cfg = _load_mae(checkpoint)
    cfg = model.cfg
    ratio = float(run_cfg.get("mask_ratio", 0.75) if mask_ratio is None else mask_ratio)
    mean, std = pixel_stats(read_manifest(cache))
    resize = CenterResize(out_size=cfg.img_size, mean=mean, std=std)
    frontal, lateral = _pick_pairs(cache, n)
    images = torch.cat([resize(frontal), resize(lateral)])                 # (2n, C, H, W)
    b = frontal.shape[0]
    views = torch.tensor([VIEW_IDS["frontal"]] * b + [VIEW_IDS["lateral"]] * b)
    with torch.no_grad():
        out = model.reconstruct(images, views, ratio, generator=torch.Generator().manual_seed(seed))
    target = patchify_reference(images, cfg.patch_size)                    # (2n, L, P)
    pred = out["pred"].float()
    if cfg.target == "norm_pix":  # the decoder predicts each patch normalised by its own stats
        pred = pred * (target.var(-1, keepdim=True) + 1e-6).sqrt() + target.mean(-1, keepdim=True)
    mask = out["mask"][..., None]                                          # (2n, L, 1)

    def pixels(patches):
        x = _unpatchify(patches, cfg.patch_size, cfg.in_chans)[:, 0] * std + mean
        return x.reshape(2, b, *x.shape[1:]).numpy().astype(np.float32)

    return dict(original=pixels(target), masked=pixels(target.masked_fill(mask.bool(), float("nan"))),
                reconstruction=pixels(target * (1 - mask) + pred * mask),
                mask=out["mask"].reshape(2, b, -1).numpy(), mask_ratio=ratio)


def plot_reconstructions(checkpoint: str, cache: str, out_png: str | os.PathLike, *, n: int = 4,
                         seed: int = 0) -> dict:
    """Draws :func:`reconstruction_arrays` as one row per study: frontal original | masked
    | reconstruction, then the same for the lateral view. Returns the arrays and png."""
    arrays = reconstruction_arrays(checkpoint, cache, n=n, seed=seed)
    plt = _pyplot()
    rows = arrays["original"].shape[1]
    columns = [(v, kind) for v in range(2) for kind in ("original", "masked", "reconstruction")]
    fig, axes = plt.subplots(rows, 6, figsize=(12, 2.1 * rows + 0.4), squeeze=False)
    cmap = plt.get_cmap("gray").with_extremes(bad="#3b6ea5")  # masked patches: a blue no radiograph has
    for r in range(rows):
        for c, (v, kind) in enumerate(columns):
            ax = axes[r, c]
            ax.imshow(np.clip(arrays[kind][v, r], 0, 1), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"{('frontal', 'lateral')[v]}: {kind}", fontsize=9)
    fig.suptitle(f"{Path(checkpoint).parent.name}: {arrays['mask_ratio']:.0%} of patches masked", fontsize=11)
    fig.tight_layout()
    out_png = Path(out_png)
    _savefig(fig, out_png)
    plt.close(fig)
    return dict(arrays, png=str(out_png))


def write_run_plots(run_dir: str | os.PathLike, cache: str | None = None, *, n: int = 4) -> list[str]:
    """The PNGs of a finished or running pretrain job, for the job to call at its end:
    curves always, reconstructions when the checkpoint has a decoder and ``cache`` (default:
    the run's config.json) is given. Returns the paths written; what cannot be drawn is
    logged, not raised (a missing matplotlib must not fail a training job)."""
    from fastssl.errors import MissingDependencyError

    run_dir = Path(run_dir)
    written = []
    try:
        written.append(plot_pretrain_curves(run_dir)["png"])
        if cache is None and (run_dir / "config.json").is_file():
            cache = json.loads((run_dir / "config.json").read_text(encoding="utf-8")).get("cache")
        checkpoint = run_dir / "checkpoint.pt"
        if cache and checkpoint.is_file():
            written.append(plot_reconstructions(str(checkpoint), cache, run_dir / RECON_PNG, n=n)["png"])
    except (MissingDependencyError, ValueError, FileNotFoundError) as exc:
        log.warning("plots of %s: %s", run_dir, exc)
    return written


# ----------------------------------------------------------------------------- CLI
@dataclass(frozen=True)
class PlotConfig:
    """The settings of ``fastssl plot`` besides its run directory (its flags, declared once)."""

    cache: str | None = None  # cache for the reconstruction figure (default: the run's config.json)
    samples: int = setting(4, range=COUNT)  # studies in the reconstruction figure

    def __post_init__(self) -> None:
        check_settings(self)


SETTINGS = PlotConfig   # the dataclass declaring this command's settings (fastssl.config)


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", help="a `fastssl pretrain` output directory")
    add_dataclass_arguments(parser, PlotConfig)   # --cache, --samples


def run(args) -> int:
    settings = config_from_args(PlotConfig, args)
    if not Path(args.run_dir).is_dir():
        raise ValueError(f"{args.run_dir} is not a directory")
    written = write_run_plots(args.run_dir, settings.cache, n=settings.samples)
    for path in written:
        print(path)
    return 0 if written else 1
