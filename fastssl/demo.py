"""`fastssl demo`: both workflows end to end on built-in data, in a few minutes on a laptop.

1. Radiographs: a paired-view phantom (DICOM, MIMIC-CXR layout, a few corrupt files)
   -> the preprocessed cache -> multi-view MAE pretraining (the released MVMAE recipe,
   flu mode: every image reconstructed, the views of a study aligned) and the
   single-view MAE baseline -> a linear probe of each (macro AUROC over the phantom's
   findings, patient-bootstrap CIs).
2. Curation: long-tailed synthetic embeddings (Zipf-sized Gaussian components in a few
   super-families, fp16 shards) -> a hierarchical k-means tree -> a balanced 10% sample,
   with the component balance before and after against plain random sampling.

Every step is one of the library's own commands (phantom, prepare, pretrain, probe,
curate), so rerunning the demo resumes where it stopped and skips finished work. The
defaults are sized for 2 CPU cores; a GPU is used when present.

``--out`` is opened by fastssl.jobs.open_job (job.json: the demo's settings; the steps open
their own sub-folders): a rerun with other settings is refused, naming them, unless
``--overwrite``, which empties --out (whatever it holds) so that every step starts over. A
step that fails is one ValueError naming it (the router prints it once, exit code 2).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from fastssl.config import COUNT, POSITIVE, SEED, SIDE, Range, add_dataclass_arguments, check_settings, setting

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """The settings of ``fastssl demo`` (its flags, declared once: type, default, range, help)."""

    out: str = "runs/demo"  # output directory (rerun to resume)
    studies: int = setting(600, range=COUNT)  # phantom studies
    phantom_size: int = setting(128, range=Range(32, 16384, integer=True))  # phantom image side (px)
    img_size: int = setting(64, range=SIDE)  # cache and model image side
    epochs: int = setting(30, range=COUNT)  # pretraining epochs per model
    batch_size: int = setting(32, range=COUNT)  # pretraining batch size
    base_lr: float = setting(1e-3, range=POSITIVE)  # lr = base_lr * batch / 256 (higher than ViT-B's: a tiny model)
    points: int = setting(200_000, range=COUNT)  # synthetic embeddings
    dim: int = setting(64, range=COUNT)  # embedding dimension
    components: int = setting(300, range=COUNT)  # ground-truth Gaussian components (Zipf sizes)
    levels: str = "1000,100,10"  # clusters per tree level
    target: float = setting(0.1, range=Range(0, 1, low_open=True))  # curated fraction
    seed: int = setting(0, range=SEED)  # seed of every step
    skip_radiographs: bool = False  # curation part only
    skip_curation: bool = False  # radiograph part only
    overwrite: bool = False  # empty --out first: every step starts over (without it, a demo of other settings there is refused)

    def __post_init__(self) -> None:
        check_settings(self)


SETTINGS = DemoConfig   # the dataclass declaring this command's settings (fastssl.config)
# Not in job.json: where the demo goes, --overwrite itself, and the skips (they choose which
# part runs, not what a part computes; each part's steps keep their own records).
_NOT_RESULT_KEYS = ("out", "overwrite", "skip_radiographs", "skip_curation")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, DemoConfig)


def _fingerprint(cfg: DemoConfig):
    """The demo's identity (fastssl.jobs.JobFingerprint): its settings; it reads no input."""
    from fastssl.jobs import JobFingerprint

    return JobFingerprint("demo", {k: v for k, v in asdict(cfg).items() if k not in _NOT_RESULT_KEYS})


def _step(name: str, argv: list[str], timings: dict) -> None:
    """``fastssl ARGV`` (parsed and checked as the router does), timed as ``timings[name]``.

    A user error of the step is raised as one ValueError naming the step, for the demo's
    router to print once; a step that cannot resume its folder (ResumeMismatch) says that
    ``fastssl demo --overwrite`` starts every step over (the steps have no --overwrite here)."""
    from fastssl import cli
    from fastssl.errors import ResumeMismatch

    t0 = time.perf_counter()
    log.info("demo: fastssl %s", " ".join(argv))
    parser, module = cli.command_parser(argv[0])
    args = parser.parse_args(argv[1:])
    try:
        cli.check_args(argv[0], args)
        code = int(module.run(args) or 0)
    except ResumeMismatch as exc:
        raise ResumeMismatch(f"step '{name}' cannot resume: {exc.problem}; use `fastssl demo --overwrite` "
                             "(it empties --out: every step starts over) or another --out",
                             problem=exc.problem) from exc
    except cli.USER_ERRORS as exc:
        raise ValueError(f"step '{name}' failed: {' '.join(str(exc).split()) or type(exc).__name__}; "
                         "fix and rerun to resume") from exc
    timings[name] = round(time.perf_counter() - t0, 1)
    if code:
        raise ValueError(f"step '{name}' failed (exit {code}); fix and rerun to resume")


def _radiographs(args, out: Path, timings: dict, quiet: list[str]) -> dict:
    phantom, cache = out / "phantom", out / "cache"
    _step("phantom", ["phantom", "--out", str(phantom), "--studies", str(args.studies),
                      "--size", str(args.phantom_size), "--corrupt", "3",
                      "--split", "0.7,0.1,0.2", "--both-views-fraction", "0.6",
                      "--seed", str(args.seed)] + quiet, timings)
    _step("prepare", ["prepare", "--source", str(phantom), "--out", str(cache),
                      "--size", str(args.img_size), "--dtype", "uint8"] + quiet, timings)
    results = {}
    import torch

    # The demo's model is tiny: on a CPU one thread beats two (measured ~5x on the 2-core
    # box), since the per-op work is too small to split.
    threads = torch.get_num_threads()
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    try:
        _pretrain_and_probe(args, out, cache, timings, quiet, results)
    finally:
        torch.set_num_threads(threads)
    rejects = cache / "rejects.csv"
    results["rejected_files"] = max(0, len(rejects.read_text().splitlines()) - 1) if rejects.exists() else 0
    return results


def _pretrain_and_probe(args, out: Path, cache: Path, timings: dict, quiet: list[str],
                        results: dict) -> None:
    for mode in ("flu", "single"):
        run_dir = out / f"pretrain_{mode}"
        _step(f"pretrain {mode}", [
            "pretrain", "--cache", str(cache), "--out", str(run_dir), "--mode", mode,
            "--preset", "test", "--img-size", str(args.img_size), "--patch-size", "8",
            "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
            "--base-lr", str(args.base_lr), "--warmup-epochs", "2", "--mask-ratio", "0.75",
            "--workers", "0", "--seed", str(args.seed)] + quiet, timings)
        _step(f"probe {mode}", [
            "probe", "--cache", str(cache), "--checkpoint", str(run_dir / "encoder.safetensors"),
            "--out", str(out / f"probe_{mode}"), "--workers", "0", "--n-boot", "300",
            "--seed", str(args.seed)] + quiet, timings)
        report = json.loads((out / f"probe_{mode}" / "probe.json").read_text())
        results[mode] = {"macro_auroc": report["macro_auroc"], "ci": report["macro_ci"],
                         "labels": len(report["labels_used"])}


def _curation(args, out: Path, timings: dict, quiet: list[str]) -> dict:
    from fastssl.curation.synthetic import long_tailed_mixture

    data = out / "embeddings"
    t0 = time.perf_counter()
    if not (data / "components.npy").exists():  # written last: its presence means done
        long_tailed_mixture(args.points, args.dim, args.components, zipf_a=1.1, families=8,
                            seed=args.seed, dtype="float16", out_dir=data)
    timings["embeddings"] = round(time.perf_counter() - t0, 1)
    shards = sorted(str(p) for p in data.glob("points_*.npy"))
    _step("curate", ["curate", "--data", *shards, "--out", str(out / "curate"),
                     "--levels", args.levels, "--iterations", "20", "--resampling-steps", "4",
                     "--target-size", str(args.target), "--labels",
                     str(data / "components.npy"), "--seed", str(args.seed)] + quiet, timings)
    return json.loads((out / "curate" / "report.json").read_text())


def run(args: argparse.Namespace) -> int:
    from fastssl.atomic import atomic_write_text
    from fastssl.config import config_from_args
    from fastssl.jobs import open_job

    cfg = config_from_args(DemoConfig, args)
    quiet = ["--quiet"] if args.quiet else []
    # "resume": every step resumes or skips its own finished work; "new": --out was emptied.
    # --overwrite empties it even for the same settings (restart): it is the advice for a step
    # that cannot resume its own folder, and the steps are not given an --overwrite of their own.
    with open_job(cfg.out, lambda: _fingerprint(cfg), overwrite=cfg.overwrite, restart=cfg.overwrite):
        summary = _run_steps(cfg, Path(cfg.out), quiet)
        atomic_write_text(Path(cfg.out) / "demo_summary.json", json.dumps(summary, indent=1))
    print(_summary_text(summary))
    return 0


def _run_steps(cfg: DemoConfig, out: Path, quiet: list[str]) -> dict:
    """Both parts (or the one not skipped) in the opened ``out`` -> demo_summary.json's dict."""
    timings: dict[str, float] = {}
    summary: dict = {"out": str(out), "machine": _machine(), "date": time.strftime("%Y-%m-%d")}
    if not cfg.skip_radiographs:
        summary["radiographs"] = _radiographs(cfg, out, timings, quiet)
    if not cfg.skip_curation:
        report = _curation(cfg, out, timings, quiet)
        gt = report.get("ground_truth", {})
        summary["curation"] = {
            "points": report["n_points"], "sample_size": report.get("sample_size"),
            "components": gt.get("groups"),
            **{f"{name}_{metric}": round(gt[name][metric], 3)
               for name in ("all", "random", "curated") if name in gt
               for metric in ("entropy_norm", "gini", "coverage")},
        }
    summary["seconds"] = timings
    return summary


def _machine() -> str:
    """CPU model, core count and torch version: every recorded figure names its machine."""
    import os
    import platform

    import torch

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            model = next(ln.split(":", 1)[1].strip() for ln in handle if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{model}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def _summary_text(summary: dict) -> str:
    lines = ["", "fastssl demo: summary", "=" * 60]
    radio = summary.get("radiographs")
    if radio:
        lines.append("Radiographs (phantom, linear probe on frozen CLS features, test split):")
        for mode, label in (("flu", "multi-view MAE (mvmae recipe, flu mode)"),
                            ("single", "single-view MAE baseline")):
            r = radio[mode]
            lines.append(f"  {label:42s} macro AUROC {r['macro_auroc']:.3f} "
                         f"[{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] over {r['labels']} labels")
        lines.append(f"  corrupt files skipped and listed: {radio['rejected_files']} "
                     "(cache/rejects.csv)")
    cur = summary.get("curation")
    if cur:
        lines.append(f"Curation ({cur['points']:,} synthetic long-tailed embeddings, "
                     f"{cur['components']} ground-truth components, sample {cur['sample_size']:,}):")
        lines.append(f"  {'':28s} {'H/lnG (1=uniform)':>18s} {'Gini':>6s} {'coverage':>9s}")
        for name, label in (("all", "all points"), ("random", "random sample"),
                            ("curated", "hierarchical k-means sample")):
            if f"{name}_entropy_norm" in cur:
                lines.append(f"  {label:28s} {cur[name + '_entropy_norm']:>18.3f} "
                             f"{cur[name + '_gini']:>6.3f} {cur[name + '_coverage']:>9.3f}")
    lines.append("Seconds per step: " + ", ".join(f"{k} {v}" for k, v in summary["seconds"].items()))
    if "machine" in summary:
        lines.append(f"Machine: {summary['machine']}; {summary['date']}.")
    lines.append(f"Everything is under {summary['out']} (demo_summary.json).")
    return "\n".join(lines)
