"""The phantom study of paper 1's claim: does aligning the two views of a study help?

    python bench/phantom_study.py --out runs/phantom_study --jobs 2 --quiet   # the full study
    python bench/phantom_study.py --out /tmp/ps --smoke                        # < 1 min dry run

Encoders (one per seed; ViT-tiny at 128 px on ~2,000 phantom studies by default):

    mvmae_flu     multi-view MAE, the released recipe    pretrain --recipe mvmae --mode flu
    paired_beta0  the same pairs without alignment       pretrain --mode paired --beta-max 0
    single        single-view MAE                        pretrain --mode single
    supervised    supervised ViT on the labels           pretrain --mode supervised
    random        untrained (random init)                no pretraining

each evaluated by a linear probe (L2 chosen on validation) and by full fine-tuning
(best epoch on validation), on the phantom's test split. The table gives, per encoder and
evaluation, the macro AUROC averaged over seeds with the range of the per-seed
patient-cluster 95% CIs, and the paired delta against the single-view MAE: all seeds of
both methods under one patient bootstrap (fastssl.eval.stats.paired_bootstrap), its 95%
CI and two-sided p-value.

Every step is a fastssl command whose output directory is its record: a rerun skips every
finished step (a pretrain with encoder.safetensors, a probe with probe.json, a
fine-tuning with finetune.json) and resumes the unfinished one. Writes
OUT/phantom_study.json and OUT/phantom_study.md. The pretraining flags --recipe, --mode
flu and --beta-max are required; the script stops at once, naming what is missing, if
the installed ``fastssl pretrain`` lacks them.

Cost (CPU seconds per image, one thread, ViT-tiny at 128 px, AMD EPYC of the 2-core dev
box, 2026-11-30, measured as process time on a busy machine): probe feature extraction
0.030, fine-tuning step 0.080, MAE pretraining step at mask 0.93 0.022 (a supervised
pretraining step costs as much as a fine-tuning step). At the default sizes (~3,270
images, ~2,290 of them train) that adds up to about 48 min of pretraining, 27 min of
probes, 53 min of fine-tuning and a few minutes of phantom: ~130 CPU-minutes, ~67 min
with ``--jobs 2`` on a quiet 2-core machine, over the 45-min target; ``--studies 1300``
(~44 min) or a GPU (``device`` auto) fits it. Measured 2026-11-30 at the default sizes:
140 CPU-minutes, 90.9 min wall with the box shared for half of it (bench/RESULTS.md). Resume makes a split run cheap: stop it,
rerun the same command later.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np

log = logging.getLogger("phantom_study")

# name -> (table label, pretrain flags; None = no pretraining, a random-init encoder)
METHODS: dict[str, tuple[str, list[str] | None]] = {
    "mvmae_flu": ("multi-view MAE (mvmae recipe, flu)", ["--recipe", "mvmae", "--mode", "flu"]),
    "paired_beta0": ("paired, beta 0 (no alignment)", ["--recipe", "mvmae", "--mode", "paired", "--beta-max", "0"]),
    "single": ("single-view MAE", ["--recipe", "mvmae", "--mode", "single"]),
    "supervised": ("supervised ViT", ["--recipe", "mvmae", "--mode", "supervised"]),
    "random": ("random init", None),
}
BASELINE = "single"
# pretrain flag -> a value it must accept (None: only the flag)
REQUIRED_PRETRAIN = {"--recipe": "mvmae", "--mode": "flu", "--beta-max": None}

# The full study and the smoke run. The full sizes are set by the ~45 min budget on 2 CPU
# cores: 12 pretrainings, 15 probes and 15 fine-tunings of a ViT-tiny at 128 px leave
# room for only a few pretraining epochs and one fine-tuning epoch (measured throughput
# in the module docstring); with a GPU, raise --pretrain-epochs / --finetune-epochs.
SIZES = {
    "full": dict(seeds="0,1,2", studies=2000, img_size=128, preset="vit_tiny", patch_size=16, pretrain_epochs=3,
                 finetune_epochs=1, batch_size=64, finetune_batch=32, n_boot=1000),
    "smoke": dict(seeds="0", studies=48, img_size=32, preset="test", patch_size=8, pretrain_epochs=1,
                  finetune_epochs=2, batch_size=8, finetune_batch=8, n_boot=50),
}


def check_pretrain_flags() -> None:
    """SystemExit naming the flags/values the installed `fastssl pretrain` lacks."""
    from fastssl.cli import command_parser

    parser, _ = command_parser("pretrain")
    actions = {s: a for a in parser._actions for s in a.option_strings}
    missing = [flag if flag not in actions else f"{flag} {value}" for flag, value in REQUIRED_PRETRAIN.items()
               if flag not in actions or (value is not None and actions[flag].choices is not None
                                          and value not in actions[flag].choices)]
    if missing:
        raise SystemExit(f"phantom_study: the installed `fastssl pretrain` lacks {missing} (the released-recipe "
                         "flags of issue 8); update fastssl (git merge main) and rerun")


def _cli(argv: list[str], timings: dict, name: str) -> None:
    from fastssl.cli import main as cli_main

    t0 = time.perf_counter()
    log.info("fastssl %s", " ".join(argv))
    code = cli_main(argv)
    timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - t0, 1)
    if code:
        raise SystemExit(f"phantom_study: `fastssl {' '.join(argv)}` failed (exit {code}); fix and rerun to resume")


def _data(args, out: str, timings: dict, quiet: list[str]) -> str:
    phantom, cache = os.path.join(out, "phantom"), os.path.join(out, "cache")
    if not os.path.isfile(os.path.join(cache, "index.csv")):
        _cli(["phantom", "--out", phantom, "--studies", str(args.studies), "--size", str(args.img_size),
              "--split", "0.7,0.1,0.2", "--both-views-fraction", "0.6", "--seed", "0", *quiet], timings, "phantom")
        _cli(["prepare", "--source", phantom, "--out", cache, "--size", str(args.img_size), "--dtype", "uint8",
              *quiet], timings, "prepare")
    return cache


def _encoder(args, cache: str, run: str, method: str, seed: int, timings: dict, quiet: list[str]) -> str:
    """Pretrains (or finds) the encoder of (method, seed) -> a --checkpoint value."""
    flags = METHODS[method][1]
    if flags is None:
        return f"random:{args.preset}:{args.img_size}:{args.patch_size}"
    encoder = os.path.join(run, "pretrain", "encoder.safetensors")
    if not os.path.isfile(encoder):
        _cli(["pretrain", "--cache", cache, "--out", os.path.join(run, "pretrain"), *flags,
              "--preset", args.preset, "--img-size", str(args.img_size), "--patch-size", str(args.patch_size),
              "--epochs", str(args.pretrain_epochs), "--batch-size", str(args.batch_size),
              "--base-lr", str(args.pretrain_base_lr), "--warmup-epochs", str(max(1, args.pretrain_epochs // 10)),
              "--workers", "0", "--seed", str(seed), *(["--mask-ratio", str(args.mask_ratio)] if args.mask_ratio else []),
              *quiet], timings, f"pretrain {method}")
    return encoder


def _evaluate(args, cache: str, run: str, method: str, checkpoint: str, seed: int, timings: dict,
              quiet: list[str]) -> dict:
    """Probe and fine-tuning of one encoder -> {"probe": json, "finetune": json}."""
    out = {}
    probe_dir, ft_dir = os.path.join(run, "probe"), os.path.join(run, "finetune")
    if not os.path.isfile(os.path.join(probe_dir, "probe.json")):
        _cli(["probe", "--cache", cache, "--checkpoint", checkpoint, "--out", probe_dir, "--workers", "0",
              "--n-boot", str(args.n_boot), "--seed", str(seed), *quiet], timings, f"probe {method}")
    if not os.path.isfile(os.path.join(ft_dir, "finetune.json")):
        _cli(["finetune", "--cache", cache, "--checkpoint", checkpoint, "--out", ft_dir,
              "--epochs", str(args.finetune_epochs), "--warmup-epochs", str(min(1, args.finetune_epochs - 1)),
              "--batch-size", str(args.finetune_batch),
              "--base-lr", str(args.finetune_base_lr), "--n-boot", str(args.n_boot), "--seed", str(seed), *quiet],
             timings, f"finetune {method}")
    for kind, d, name in (("probe", probe_dir, "probe.json"), ("finetune", ft_dir, "finetune.json")):
        with open(os.path.join(d, name), encoding="utf-8") as handle:
            r = json.load(handle)
        out[kind] = dict(macro_auroc=r["macro_auroc"], ci=r["macro_ci"], dir=d)
    return out


def summarise(runs: dict, methods: list[str], seeds: list[int], n_boot: int) -> dict:
    """runs[method][seed][kind] -> per (method, kind): seed mean, per-seed values and CIs,
    and the paired delta against the baseline (all seeds, one patient bootstrap)."""
    from fastssl.eval.report import read_scores_csv
    from fastssl.eval.stats import paired_bootstrap

    table: dict = {}
    for kind in ("probe", "finetune"):
        scores = {m: [read_scores_csv(runs[m][s][kind]["dir"]) for s in seeds] for m in methods}
        base = scores.get(BASELINE)
        for m in methods:
            per_seed = [runs[m][s][kind] for s in seeds]
            row = dict(mean=float(np.mean([r["macro_auroc"] for r in per_seed])),
                       sd=float(np.std([r["macro_auroc"] for r in per_seed], ddof=1)) if len(seeds) > 1 else 0.0,
                       per_seed=[dict(seed=s, macro_auroc=r["macro_auroc"], ci=r["ci"]) for s, r in zip(seeds, per_seed)])
            if base is not None and m != BASELINE:
                first = base[0]
                d = paired_bootstrap([t["scores"] for t in base], [t["scores"] for t in scores[m]], first["labels"],
                                     first["subjects"], n_boot=n_boot, seed=0)
                row["delta_vs_single"] = dict(delta=d["delta"], ci=list(d["ci"]), p_value=d["p_value"])
            table.setdefault(m, {})[kind] = row
    return table


def markdown(table: dict, meta: dict) -> str:
    def cell(row: dict) -> str:
        lo = min(p["ci"][0] for p in row["per_seed"])
        hi = max(p["ci"][1] for p in row["per_seed"])
        return f"{row['mean']:.3f} ± {row['sd']:.3f} [{lo:.3f}, {hi:.3f}]"

    def delta(row: dict) -> str:
        d = row.get("delta_vs_single")
        return "-" if d is None else f"{d['delta']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}], p={d['p_value']:.3f}"

    lines = [f"Phantom study: {meta['studies']} phantom studies, {meta['preset']} at {meta['img_size']} px, "
             f"seeds {meta['seeds']}, {meta['test_studies']} test studies of {meta['test_patients']} patients; "
             f"{meta['date']}, {meta['machine']}, {meta['minutes']:.1f} min.",
             "",
             "Macro AUROC: mean ± sd over seeds [lowest, highest bound of the per-seed patient-cluster 95% CIs]; "
             "delta vs single-view MAE: all seeds, paired patient bootstrap, 95% CI and two-sided p.",
             "",
             "| encoder | linear probe | delta vs single (probe) | fine-tuned | delta vs single (fine-tuned) |",
             "|---|---|---|---|---|"]
    for m, rows in table.items():
        lines.append(f"| {METHODS[m][0]} | {cell(rows['probe'])} | {delta(rows['probe'])} | "
                     f"{cell(rows['finetune'])} | {delta(rows['finetune'])} |")
    lines += ["", f"Command: `{meta['command']}`"]
    return "\n".join(lines) + "\n"


def _machine() -> str:
    import platform

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            name = next(ln.split(":", 1)[1].strip() for ln in handle if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} CPUs"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/phantom_study", help="output directory (rerun to resume)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: the whole pipeline in < 1 min")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {list(METHODS)}")
    for key, value in SIZES["full"].items():
        p.add_argument("--" + key.replace("_", "-"), type=type(value), default=None,
                       help=f"default {value} ({SIZES['smoke'][key]} with --smoke)"
                       + ("; comma list, one encoder of each kind per seed" if key == "seeds" else ""))
    p.add_argument("--pretrain-base-lr", type=float, default=1e-3, help="lr = base_lr * batch / 256 (tiny models)")
    p.add_argument("--finetune-base-lr", type=float, default=1e-3, help="lr = base_lr * batch / 256 (few epochs)")
    p.add_argument("--mask-ratio", type=float, default=0.0, help="0: the recipe's")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--jobs", type=int, default=1, help="(method, seed) runs at a time, each on one thread")
    p.add_argument("--quiet", action="store_true", help="warnings only from the fastssl commands")
    args = p.parse_args(argv)
    for key, value in SIZES["smoke" if args.smoke else "full"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = sorted(set(args.method_list) - set(METHODS))
    if bad or not args.seed_list:
        p.error(f"--methods {bad} unknown (choose from {list(METHODS)})" if bad else "--seeds is empty")
    return args


def _one_run(args, cache: str, quiet: list[str], method: str, seed: int) -> tuple[dict, dict]:
    """Pretraining (if any), probe and fine-tuning of (method, seed) -> (results, seconds)."""
    if args.jobs > 1:
        import torch

        torch.set_num_threads(1)  # the cores go to parallel runs, not to threads of one
    timings: dict = {}
    run = os.path.join(args.out, method, f"seed{seed}")
    checkpoint = _encoder(args, cache, run, method, seed, timings, quiet)
    return _evaluate(args, cache, run, method, checkpoint, seed, timings, quiet), timings


def _all_runs(args, cache: str, quiet: list[str]) -> dict:
    """{(method, seed): (results, seconds)}; --jobs N runs N at a time in forked processes
    (each one thread: small models use cores better side by side than split)."""
    tasks = [(m, seed) for seed in args.seed_list for m in args.method_list]
    if args.jobs <= 1:
        return {t: _one_run(args, cache, quiet, *t) for t in tasks}
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = {t: pool.submit(_one_run, args, cache, quiet, *t) for t in tasks}
        return {t: f.result() for t, f in futures.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if any(METHODS[m][1] is not None for m in args.method_list):
        check_pretrain_flags()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    t0, timings, quiet = time.perf_counter(), {}, ["--quiet"] if args.quiet else []
    os.makedirs(args.out, exist_ok=True)
    cache = _data(args, args.out, timings, quiet)
    runs: dict = {}
    for (m, seed), (result, seconds) in _all_runs(args, cache, quiet).items():
        runs.setdefault(m, {})[seed] = result
        for name, value in seconds.items():
            timings[name] = round(timings.get(name, 0.0) + value, 1)
    table = summarise(runs, args.method_list, args.seed_list, args.n_boot)
    some = runs[args.method_list[0]][args.seed_list[0]]["probe"]["dir"]
    with open(os.path.join(some, "probe.json"), encoding="utf-8") as handle:
        probe = json.load(handle)
    meta = dict(studies=args.studies, preset=args.preset, img_size=args.img_size, seeds=args.seed_list,
                test_studies=probe["n_test_studies"], test_patients=probe["n_test_subjects"],
                date=time.strftime("%Y-%m-%d", time.gmtime()), machine=_machine(),
                minutes=(time.perf_counter() - t0) / 60, seconds=timings,
                command="python bench/phantom_study.py " + " ".join(sys.argv[1:] if argv is None else argv),
                settings={k: v for k, v in vars(args).items() if k not in ("seed_list", "method_list")})
    from fastssl.eval.report import write_json

    write_json(os.path.join(args.out, "phantom_study.json"), dict(meta=meta, table=table))
    text = markdown(table, meta)
    with open(os.path.join(args.out, "phantom_study.md"), "w", encoding="utf-8") as handle:
        handle.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
