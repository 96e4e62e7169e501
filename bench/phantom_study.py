"""The phantom study of paper 1's claim: does pairing the two views of a study help?

    python bench/phantom_study.py --out runs/phantom_study --jobs 2 --quiet   # the study
    python bench/phantom_study.py --out /tmp/ps --smoke                        # < 2 min dry run

Encoders (one per seed; the demo's test ViT at 64 px on 1,000 phantom studies by default):

    mvmae_flu     multi-view MAE, the released recipe     pretrain --recipe mvmae --mode flu
    flu_beta0     the same run without alignment           ... --mode flu --beta-max 0
    paired_beta0  paired batches without alignment         ... --mode paired --beta-max 0
    single        single-view MAE                          ... --mode single
    supervised    supervised ViT on the labels             ... --mode supervised
    random        untrained (random init)                  no pretraining

Matched by design: the phantom is written with both views in every study (and every view
tagged), so a study-batch of B studies (flu, paired) holds exactly 2B images and an
image-batch (single, supervised) is 2B images: every pretraining sees the same images per
step, the same steps and the same peak lr (base lr scaled so that lr = base_lr * B / 256
for all). :func:`plan` predicts each run's steps and images from the cache and the script
refuses to start a plan whose compared runs differ; after training it recounts both from
each run's metrics.jsonl (``step``, ``images``) and refuses to report a comparison whose
logged counts differ.

Evaluation: a linear probe (L2 chosen on validation) with 1%, 10% and 100% of the training
labels (``--label-fractions``; kept by patient, ``fastssl probe --label-fraction``), and
with ``--finetune`` full fine-tuning (best epoch on validation) at the same fractions (a
batch no larger than the kept train studies: :func:`finetune_batch`), on the phantom's
test split.

Statistics, per comparison A -> B (delta = macro AUROC(B) - macro AUROC(A)):
  * the paired patient-cluster bootstrap over all seeds of both sides
    (fastssl.eval.stats.paired_bootstrap): 95% CI and two-sided p;
  * an exact sign-flip permutation test over the per-seed deltas
    (fastssl.eval.compare.seed_sign_flip_test; 6 seeds give a smallest p of 0.031);
  * the verdict names a winner only when both tests have p < 0.05 and agree in sign:
    "B better", "A better", else "not separated".

Every step is a fastssl command whose output directory is its record: a rerun skips every
finished step (a pretrain with encoder.safetensors, a probe with probe.json, a
fine-tuning with finetune.json) and resumes the unfinished one. Writes
OUT/phantom_study.json and OUT/phantom_study.md. ``--phantom-flags`` passes extra flags
to ``fastssl phantom`` (e.g. a findings design); they are part of the record.

Cost (measured 2026-12-06 on the 2-core AMD EPYC box shared with parallel jobs, load
average 7-12): at the defaults (1,000 studies, 30 pretrainings, 108 probes) 36.2 min wall with
``--jobs 2`` (697 s user CPU) plus 3.1 min of phantom and prepare; a pretraining (330
steps of 64 images) takes 2-3.5 min wall, a probe 10-15 s. ``--finetune`` adds 108
fine-tunings (5 epochs): the 36 at 100% of the labels took 10.9 min wall, the 72 at 1% and
10% 6.2 min.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("phantom_study")


@dataclass(frozen=True)
class Method:
    label: str               # the table's name
    flags: tuple | None      # pretrain flags; None = no pretraining (random init)
    unit: str | None = None  # a sample of its dataset: "study" (flu, paired) or "image"


METHODS: dict[str, Method] = {
    "mvmae_flu": Method("multi-view MAE (mvmae recipe, flu)", ("--recipe", "mvmae", "--mode", "flu"), "study"),
    "flu_beta0": Method("flu, beta 0 (no alignment)", ("--recipe", "mvmae", "--mode", "flu", "--beta-max", "0"),
                        "study"),
    "paired_beta0": Method("paired, beta 0 (no alignment)",
                           ("--recipe", "mvmae", "--mode", "paired", "--beta-max", "0"), "study"),
    "single": Method("single-view MAE", ("--recipe", "mvmae", "--mode", "single"), "image"),
    "supervised": Method("supervised ViT", ("--recipe", "mvmae", "--mode", "supervised"), "image"),
    "random": Method("random init", None),
}
# (A, B, question): delta = B - A. Each isolates one change.
COMPARISONS = [
    ("flu_beta0", "mvmae_flu", "alignment (same pairs, same steps)"),
    ("single", "mvmae_flu", "pairing + alignment (the paper's claim)"),
    ("single", "flu_beta0", "pairing without alignment"),
    ("single", "paired_beta0", "paired batches without alignment"),
    ("single", "supervised", "labels instead of reconstruction"),
    ("single", "random", "any pretraining at all"),
]
IMAGES_PER_STUDY = 2  # the design: every phantom study has a frontal and a lateral
# pretrain flag -> a value it must accept (None: only the flag)
REQUIRED_PRETRAIN = {"--recipe": "mvmae", "--mode": "flu", "--beta-max": None}
ALPHA = 0.05

SIZES = {
    "full": dict(seeds="0,1,2,3,4,5", studies=1000, img_size=64, preset="test", patch_size=8, pretrain_epochs=15,
                 finetune_epochs=5, batch_size=32, finetune_batch=32, n_boot=1000, label_fractions="0.01,0.1,1"),
    "smoke": dict(seeds="0,1", studies=60, img_size=32, preset="test", patch_size=8, pretrain_epochs=1,
                  finetune_epochs=2, batch_size=8, finetune_batch=8, n_boot=50, label_fractions="1"),
}


# --------------------------------------------------------------------- flags present?
def _flag_gaps(command: str, required: dict) -> list[str]:
    from fastssl.cli import command_parser

    parser, _ = command_parser(command)
    actions = {s: a for a in parser._actions for s in a.option_strings}
    return [flag if flag not in actions else f"{flag} {value}" for flag, value in required.items()
            if flag not in actions or (value is not None and actions[flag].choices is not None
                                       and value not in actions[flag].choices)]


def check_pretrain_flags() -> None:
    """SystemExit naming the flags/values the installed `fastssl pretrain` lacks."""
    missing = _flag_gaps("pretrain", REQUIRED_PRETRAIN)
    if missing:
        raise SystemExit(f"phantom_study: the installed `fastssl pretrain` lacks {missing} (the released-recipe "
                         "flags of issue 8); update fastssl (git merge main) and rerun")


def check_label_fraction_flags(fractions: list[float], finetune: bool) -> None:
    """SystemExit when a fraction below 1 is asked and probe/finetune lack --label-fraction."""
    if all(f == 1 for f in fractions):
        return
    for command in ("probe", "finetune") if finetune else ("probe",):
        missing = _flag_gaps(command, {"--label-fraction": None, "--label-seed": None})
        if missing:
            raise SystemExit(f"phantom_study: `fastssl {command}` lacks {missing}, needed by --label-fractions "
                             f"{fractions}; update fastssl or use --label-fractions 1")


# ------------------------------------------------------------------------------ plan
def train_counts(cache: str) -> dict:
    """The train split of a cache -> dict(studies, paired_studies, images, images_per_study
    (a sorted list of the distinct per-study image counts))."""
    from fastssl.data.cache import read_index

    index = read_index(cache)
    train = index.select("train")
    study, view = index.study_id[train], index.view[train]
    ids, per_study = np.unique(study, return_counts=True)
    paired = sum(1 for s in ids if {"frontal", "lateral"} <= set(view[study == s].tolist()))
    return dict(studies=int(ids.size), paired_studies=int(paired), images=int(train.sum()),
                images_per_study=sorted(set(per_study.tolist())))


def plan(methods: list[str], counts: dict, batch: int, epochs: int, base_lr: float) -> dict:
    """Each trained method's (batch, base_lr, steps, images, lr) as pretrain will run it.

    Study-unit runs take ``batch`` studies a step; image-unit runs take
    IMAGES_PER_STUDY * batch images and base_lr / IMAGES_PER_STUDY, so the absolute lr
    (base_lr * batch / 256) is the same. images is None where a step's image count varies
    (flu on studies with different numbers of images)."""
    out = {}
    for m in methods:
        unit = METHODS[m].unit
        if unit is None:
            continue
        if unit == "image":
            b, lr, samples, per = IMAGES_PER_STUDY * batch, base_lr / IMAGES_PER_STUDY, counts["images"], 1
        elif "paired" in METHODS[m].flags:
            b, lr, samples, per = batch, base_lr, counts["paired_studies"], 2
        else:  # flu: every study, its images in up to 3 slots
            sizes = counts["images_per_study"]
            b, lr, samples, per = batch, base_lr, counts["studies"], min(sizes[0], 3) if len(sizes) == 1 else None
        steps = samples // b * epochs
        out[m] = dict(batch=b, base_lr=lr, steps=steps, images=None if per is None else steps * b * per,
                      lr=lr * b / 256)
    return out


def unmatched(counts: dict, a: str, b: str, keys=("steps", "images")) -> str | None:
    """None when runs a and b have equal, known ``keys`` in ``counts``; else why not."""
    if a not in counts or b not in counts:
        return None  # an untrained side (random init): nothing to match
    diffs = [f"{k} {counts[a].get(k)} vs {counts[b].get(k)}" for k in keys
             if counts[a].get(k) is None or counts[b].get(k) is None
             or not np.isclose(counts[a][k], counts[b][k], rtol=1e-9, atol=0)]
    return "; ".join(diffs) or None


def check_plan(planned: dict, comparisons) -> None:
    """SystemExit listing every comparison whose planned steps, images or lr differ."""
    bad = [f"{a} vs {b}: {why}" for a, b, _ in comparisons
           if (why := unmatched(planned, a, b, ("steps", "images", "lr")))]
    if bad:
        raise SystemExit("phantom_study: unmatched plan (a compared pair must see the same images, steps and lr; "
                         f"write the phantom with every study holding both views): {bad}")


def logged_counts(pretrain_dir: str) -> dict:
    """steps and images a finished pretraining logged in metrics.jsonl (images None when
    the log has no image counts)."""
    steps, images = 0, 0
    with open(os.path.join(pretrain_dir, "metrics.jsonl"), encoding="utf-8") as handle:
        for line in handle:
            rec = json.loads(line)
            if "loss" not in rec:
                continue  # a validation record
            steps = max(steps, int(rec["step"]))
            images = None if images is None or rec.get("images") is None else images + int(rec["images"])
    return dict(steps=steps, images=images)


# ---------------------------------------------------------------------- the commands
def _cli(argv: list[str], timings: dict, name: str) -> None:
    from fastssl.cli import main as cli_main

    t0 = time.perf_counter()
    log.info("fastssl %s", " ".join(argv))
    code = cli_main(argv)
    timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - t0, 1)
    if code:
        raise SystemExit(f"phantom_study: `fastssl {' '.join(argv)}` failed (exit {code}); fix and rerun to resume")


def _data(args, timings: dict, quiet: list[str]) -> str:
    phantom, cache = os.path.join(args.out, "phantom"), os.path.join(args.out, "cache")
    if not os.path.isfile(os.path.join(cache, "index.csv")):
        _cli(["phantom", "--out", phantom, "--studies", str(args.studies), "--size", str(args.img_size),
              "--split", args.split, "--both-views-fraction", "1", "--lateral-only-fraction", "0",
              "--no-view-position-fraction", "0", "--seed", "0", *shlex.split(args.phantom_flags), *quiet],
             timings, "phantom")
        _cli(["prepare", "--source", phantom, "--out", cache, "--size", str(args.img_size), "--dtype", "uint8",
              *quiet], timings, "prepare")
    return cache


def _encoder(args, cache: str, run: str, method: str, seed: int, planned: dict, timings: dict,
             quiet: list[str]) -> str:
    """Pretrains (or finds) the encoder of (method, seed) -> a --checkpoint value."""
    if METHODS[method].flags is None:
        return f"random:{args.preset}:{args.img_size}:{args.patch_size}"
    encoder = os.path.join(run, "pretrain", "encoder.safetensors")
    if not os.path.isfile(encoder):
        p = planned[method]
        _cli(["pretrain", "--cache", cache, "--out", os.path.join(run, "pretrain"), *METHODS[method].flags,
              "--preset", args.preset, "--img-size", str(args.img_size), "--patch-size", str(args.patch_size),
              "--epochs", str(args.pretrain_epochs), "--batch-size", str(p["batch"]), "--base-lr", repr(p["base_lr"]),
              "--warmup-epochs", str(max(1, args.pretrain_epochs // 10)), "--mask-ratio", str(args.mask_ratio),
              "--workers", "0", "--seed", str(seed), "--log-every", "1", "--no-plots", *quiet],
             timings, f"pretrain {method}")
    return encoder


def eval_names(fractions: list[float], finetune: bool) -> list[tuple[str, float]]:
    """The evaluations of every encoder: (kind, label fraction)."""
    return [("probe", f) for f in fractions] + ([("finetune", f) for f in fractions] if finetune else [])


def finetune_batch(cache: str, fraction: float, seed: int, batch: int, min_val_studies: int = 10) -> int:
    """The fine-tuning batch (studies) at a label fraction: ``batch``, or the fewest train
    studies a run of ``fastssl finetune --label-fraction fraction --label-seed seed --seed
    seed`` trains on when fewer (finetune refuses a training set smaller than one batch).
    Counted with finetune's own code: the kept studies of its patient draw
    (fastssl.eval.probe.train_dataset) and, where validation cannot choose the epoch, each
    cross-validation fold's training part (fastssl.eval.finetune.fold_split). A run with
    batch = its kept studies takes one full-set step an epoch; its lr follows the batch
    (base_lr * batch / 256)."""
    from fastssl.eval.finetune import FinetuneConfig, _validation_problem, fold_split
    from fastssl.eval.probe import optional_split, train_dataset

    cfg = FinetuneConfig(cache=cache, checkpoint="", out="", label_fraction=fraction, label_seed=seed, seed=seed,
                         min_val_studies=min_val_studies)
    train = train_dataset(cfg)[0]
    sizes = [len(train.study_ids)]
    if _validation_problem(cfg, optional_split(cfg, cfg.val_split)):  # the epoch is chosen by k-fold CV
        try:
            sizes += [len(fold_split(train, cfg.cv_folds, k, cfg.seed)[0].study_ids) for k in range(cfg.cv_folds)]
        except ValueError:
            pass  # fewer patients than folds: finetune refuses the run itself, naming that
    return min(batch, *sizes)


def _eval_dir(run: str, kind: str, fraction: float) -> str:
    return os.path.join(run, kind if fraction == 1 else f"{kind}_f{fraction:g}")


def _evaluate(args, cache: str, run: str, method: str, checkpoint: str, seed: int, timings: dict,
              quiet: list[str]) -> dict:
    """The probes (each label fraction) and the fine-tuning of one encoder ->
    {"probe@F": {macro_auroc, ci, dir}, "finetune@F": ...}."""
    out = {}
    for kind, fraction in eval_names(args.fraction_list, args.finetune):
        d = _eval_dir(run, kind, fraction)
        record = os.path.join(d, f"{kind}.json")
        labels = [] if fraction == 1 else ["--label-fraction", repr(fraction), "--label-seed", str(seed)]
        if not os.path.isfile(record) and kind == "probe":
            _cli(["probe", "--cache", cache, "--checkpoint", checkpoint, "--out", d, "--workers", "0",
                  "--n-boot", str(args.n_boot), "--seed", str(seed), "--no-plots", *labels, *quiet],
                 timings, f"probe {method}")
        elif not os.path.isfile(record):
            batch = finetune_batch(cache, fraction, seed, args.finetune_batch)
            _cli(["finetune", "--cache", cache, "--checkpoint", checkpoint, "--out", d,
                  "--epochs", str(args.finetune_epochs), "--warmup-epochs", str(min(1, args.finetune_epochs - 1)),
                  "--batch-size", str(batch), "--base-lr", str(args.finetune_base_lr),
                  "--n-boot", str(args.n_boot), "--seed", str(seed), *labels, *quiet], timings, f"finetune {method}")
        with open(record, encoding="utf-8") as handle:
            r = json.load(handle)
        out[f"{kind}@{fraction:g}"] = dict(macro_auroc=r["macro_auroc"], ci=r["macro_ci"], dir=d)
    return out


# ----------------------------------------------------------------------------- table
def verdict(boot: dict, seeds: dict, alpha: float = ALPHA) -> str:
    """"B better" / "A better" when the patient bootstrap's CI excludes 0 and both seed
    tests (sign-flip, t) give p < alpha, all with the sign of the delta; otherwise "not
    separated" (bench/README.md, the study's declared decision rule)."""
    lo, hi = boot["ci"]
    signs = {np.sign(boot["delta"]), np.sign(seeds["mean"]), np.sign(lo), np.sign(hi)}
    if len(signs) == 1 and 0 not in signs and max(seeds["p_value"], seeds["t_p_value"]) < alpha:
        return "B better" if boot["delta"] > 0 else "A better"
    return "not separated"


def _columns(scores: dict, names: list[str] | None) -> dict:
    """A read_scores_csv dict restricted to the label columns ``names`` (None: all)."""
    if names is None:
        return scores
    keep = [j for j, n in enumerate(scores["names"]) if n in names]
    return dict(scores, names=[scores["names"][j] for j in keep], scores=scores["scores"][:, keep],
                labels=scores["labels"][:, keep])


def _macro(scores: dict) -> float:
    from fastssl.eval.stats import macro_auroc

    return macro_auroc(scores["scores"], scores["labels"])[1]


def compare_pair(runs: dict, a: str, b: str, seeds: list[int], key: str, n_boot: int, counts: dict,
                 labels: list[str] | None = None) -> dict:
    """One comparison at one evaluation, over all labels or only ``labels``: both tests and
    the verdict, or the refusal."""
    from fastssl.eval.compare import _check_same_studies, seed_sign_flip_test, seed_t_test
    from fastssl.eval.report import read_scores_csv
    from fastssl.eval.stats import paired_bootstrap

    why = next((f"seed {s}: {w}" for s in seeds if (w := unmatched(counts.get(s, {}), a, b))), None)
    if why:
        return dict(refused=f"logged counts differ ({why})")
    side = {m: [_columns(read_scores_csv(runs[m][s][key]["dir"]), labels) for s in seeds] for m in (a, b)}
    first = side[a][0]
    for t in side[a][1:] + side[b]:
        _check_same_studies(first, t)
    boot = paired_bootstrap([t["scores"] for t in side[a]], [t["scores"] for t in side[b]], first["labels"],
                            first["subjects"], n_boot=n_boot, seed=0)
    deltas = [_macro(tb) - _macro(ta) for ta, tb in zip(side[a], side[b])]
    test = dict(seed_sign_flip_test(deltas), deltas=deltas)
    if len(deltas) > 1:
        test["t_p_value"] = seed_t_test(deltas)["p_value"]
    boot = dict(delta=boot["delta"], ci=list(boot["ci"]), p_value=boot["p_value"])
    return dict(bootstrap=boot, seeds=test, verdict=verdict(boot, test) if len(deltas) > 1 else "not separated")


def _method_row(runs: dict, m: str, seeds: list[int], key: str, groups: dict) -> dict:
    """One encoder at one evaluation: seed mean and sd of the macro AUROC, per-seed values,
    and the seed mean over each label group."""
    from fastssl.eval.report import read_scores_csv

    vals = [runs[m][s][key]["macro_auroc"] for s in seeds]
    row = dict(mean=float(np.mean(vals)), sd=float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
               per_seed=[dict(seed=s, macro_auroc=runs[m][s][key]["macro_auroc"], ci=runs[m][s][key]["ci"])
                         for s in seeds])
    if groups:
        scores = [read_scores_csv(runs[m][s][key]["dir"]) for s in seeds]
        row["groups"] = {g: float(np.mean([_macro(_columns(t, names)) for t in scores])) for g, names in groups.items()}
    return row


def summarise(runs: dict, methods: list[str], seeds: list[int], n_boot: int, keys: list[str],
              counts: dict | None = None, groups: dict | None = None) -> dict:
    """runs[method][seed][key] -> {"methods": per key and method (_method_row),
    "comparisons": per key, the COMPARISONS among ``methods`` over all labels and, with
    ``groups`` ({name: label names}, from the phantom's findings), over the "one-view" group}.
    counts[seed][method]: the logged steps/images of each pretraining."""
    groups = groups or {}
    label_sets = {"all": None, **({"one-view": groups["one-view"]} if "one-view" in groups else {})}
    table: dict = dict(methods={}, comparisons={}, groups=groups)
    for key in keys:
        table["methods"][key] = {m: _method_row(runs, m, seeds, key, groups) for m in methods}
        table["comparisons"][key] = [
            dict(a=a, b=b, question=q, labels=name,
                 **compare_pair(runs, a, b, seeds, key, n_boot, counts or {}, label_names))
            for name, label_names in label_sets.items() for a, b, q in COMPARISONS if a in methods and b in methods]
    return table


def label_groups(phantom_dir: str, present: list[str]) -> dict:
    """{"one-view": labels drawn in one view only, "two-view": the others} among the
    ``present`` labels, from the phantom's findings set; {} when no label is one-view."""
    from fastssl.data.phantom_anatomy import label_visibility

    with open(os.path.join(phantom_dir, "phantom_config.json"), encoding="utf-8") as handle:
        findings = json.load(handle).get("findings", "standard")
    seen = label_visibility(findings)
    one = [n for n in present if seen.get(n, "both") != "both"]
    return dict(**{"one-view": one}, **{"two-view": [n for n in present if n not in one]}) if one else {}


def _key_title(key: str) -> str:
    kind, fraction = key.split("@")
    name = "linear probe" if kind == "probe" else "fine-tuned"
    return f"{name}, {float(fraction) * 100:g}% of the training labels"


def _comparison_line(c: dict) -> str:
    head = f"| {METHODS[c['b']].label} vs {METHODS[c['a']].label} | {c['question']} | {c['labels']} | "
    if "refused" in c:
        return head + f"not reported: {c['refused']} | | |"
    b, s = c["bootstrap"], c["seeds"]
    return head + (f"{b['delta']:+.3f} [{b['ci'][0]:+.3f}, {b['ci'][1]:+.3f}], p={b['p_value']:.3f} | "
                   f"{s['n_positive']} of {s['n_seeds']} > 0, sign-flip p={s['p_value']:.3f}, "
                   f"t p={s.get('t_p_value', float('nan')):.3f} | {c['verdict']} |")


def _method_lines(rows: dict, groups: dict) -> list[str]:
    names = list(groups)
    lines = ["| encoder | macro AUROC, all labels |" + "".join(f" {g} labels |" for g in names),
             "|---|---|" + "---|" * len(names)]
    for m, r in rows.items():
        lo, hi = min(p["ci"][0] for p in r["per_seed"]), max(p["ci"][1] for p in r["per_seed"])
        lines.append(f"| {METHODS[m].label} | {r['mean']:.3f} ± {r['sd']:.3f} [{lo:.3f}, {hi:.3f}] |"
                     + "".join(f" {r['groups'][g]:.3f} |" for g in names))
    return lines


def markdown(table: dict, meta: dict) -> str:
    groups = table.get("groups") or {}
    lines = [f"Phantom study: {meta['studies']} phantom studies (both views each), {meta['preset']} ViT at "
             f"{meta['img_size']} px, {meta['pretrain_epochs']} pretraining epochs, seeds {meta['seeds']}, "
             f"{meta['test_studies']} test studies of {meta['test_patients']} patients; {meta['date']}, "
             f"{meta['machine']}, {meta['minutes']:.1f} min wall over {meta.get('invocations', 1)} invocation(s).", ""]
    lines += ["Pretraining counts (logged, seed 0): " + ", ".join(
        f"{m} {c['steps']} steps / {c['images']} images" for m, c in meta["logged_counts_seed0"].items()), ""]
    if groups:
        lines += ["Label groups: " + "; ".join(f"{g}: {', '.join(n)}" for g, n in groups.items()), ""]
    for key, rows in table["methods"].items():
        lines += [f"**{_key_title(key)}.** Macro AUROC, mean ± sd over seeds [lowest, highest bound of the "
                  "per-seed patient-cluster 95% CIs]; label-group columns: seed means.", ""]
        lines += _method_lines(rows, groups) + [""]
        lines += ["| B vs A | question | labels | delta B - A, patient bootstrap 95% CI, p | per-seed deltas | "
                  "verdict |", "|---|---|---|---|---|---|"]
        lines += [_comparison_line(c) for c in table["comparisons"][key]] + [""]
    lines += [f"Verdict: a side wins only when the paired patient bootstrap's 95% CI (all seeds) excludes 0 and "
              f"the exact sign-flip test and the t-test over per-seed deltas both give p < {ALPHA}, all with one "
              "sign (bench/README.md).", "", f"Command: `{meta['command']}`"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- run
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
    p.add_argument("--smoke", action="store_true", help="tiny sizes: the whole pipeline in < 2 min")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {list(METHODS)}")
    for key, value in SIZES["full"].items():
        p.add_argument("--" + key.replace("_", "-"), type=type(value), default=None,
                       help=f"default {value} ({SIZES['smoke'][key]} with --smoke)"
                       + ("; comma list, one encoder of each kind per seed" if key == "seeds" else "")
                       + ("; comma list of fractions in (0, 1] of the training labels the probe keeps"
                          if key == "label_fractions" else "")
                       + ("; study-unit runs (flu, paired) take this many studies a step, image-unit runs "
                          f"{IMAGES_PER_STUDY}x as many images" if key == "batch_size" else ""))
    p.add_argument("--split", default="0.7,0.1,0.2", help="the phantom's train,validate,test weights per patient")
    p.add_argument("--phantom-flags", default="", help="extra `fastssl phantom` flags, one shell-quoted string")
    p.add_argument("--pretrain-base-lr", type=float, default=1e-3,
                   help="lr = base_lr * batch_studies / 256 for every pretraining (tiny models)")
    p.add_argument("--finetune", action="store_true", help="also fine-tune every encoder at every --label-fractions value (batch: "
                        "--finetune-batch, or the kept train studies when fewer)")
    p.add_argument("--finetune-base-lr", type=float, default=1e-3, help="lr = base_lr * batch / 256 (few epochs)")
    p.add_argument("--mask-ratio", type=float, default=0.75, help="pretraining mask ratio (the demo's)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--jobs", type=int, default=1, help="(method, seed) runs at a time, each on one thread")
    p.add_argument("--quiet", action="store_true", help="warnings only from the fastssl commands")
    args = p.parse_args(argv)
    for key, value in SIZES["smoke" if args.smoke else "full"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.fraction_list = [float(f) for f in args.label_fractions.split(",") if f.strip()]
    bad = sorted(set(args.method_list) - set(METHODS))
    if bad or not args.seed_list:
        p.error(f"--methods {bad} unknown (choose from {list(METHODS)})" if bad else "--seeds is empty")
    if not args.fraction_list or not all(0 < f <= 1 for f in args.fraction_list):
        p.error(f"--label-fractions {args.label_fractions!r}: expected a comma list of values in (0, 1]")
    return args


def _one_run(args, cache: str, planned: dict, quiet: list[str], method: str, seed: int) -> tuple[dict, dict, dict]:
    """Pretraining (if any) and evaluations of (method, seed) -> (results, logged counts, seconds)."""
    if args.jobs > 1:
        import torch

        torch.set_num_threads(1)  # the cores go to parallel runs, not to threads of one
    timings: dict = {}
    run = os.path.join(args.out, method, f"seed{seed}")
    checkpoint = _encoder(args, cache, run, method, seed, planned, timings, quiet)
    counts = logged_counts(os.path.dirname(checkpoint)) if METHODS[method].flags else {}
    return _evaluate(args, cache, run, method, checkpoint, seed, timings, quiet), counts, timings


def _all_runs(args, cache: str, planned: dict, quiet: list[str]) -> dict:
    """{(method, seed): (results, counts, seconds)}; --jobs N runs N at a time in forked
    processes (each one thread: small models use cores better side by side than split)."""
    tasks = [(m, seed) for seed in args.seed_list for m in args.method_list]
    if args.jobs <= 1:
        return {t: _one_run(args, cache, planned, quiet, *t) for t in tasks}
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = {t: pool.submit(_one_run, args, cache, planned, quiet, *t) for t in tasks}
        return {t: f.result() for t, f in futures.items()}


def _previous_meta(out: str) -> dict:
    """The meta of an earlier invocation's OUT/phantom_study.json ({} if none)."""
    try:
        with open(os.path.join(out, "phantom_study.json"), encoding="utf-8") as handle:
            return json.load(handle).get("meta", {})
    except (OSError, ValueError):
        return {}


def _meta(args, argv, t0: float, timings: dict, runs: dict, planned: dict, counts: dict) -> dict:
    """What the table rests on. minutes and seconds add up over invocations (a resumed
    study's cost is the sum of its runs; a rerun that finds everything done adds only the
    summary's time), so the record keeps the first run's wall time."""
    earlier = _previous_meta(args.out)
    seconds = dict(earlier.get("seconds", {}))
    for name, value in timings.items():
        seconds[name] = round(seconds.get(name, 0.0) + value, 1)
    key = f"probe@{args.fraction_list[-1]:g}"
    with open(os.path.join(runs[args.method_list[0]][args.seed_list[0]][key]["dir"], "probe.json"),
              encoding="utf-8") as handle:
        probe = json.load(handle)
    return dict(studies=args.studies, preset=args.preset, img_size=args.img_size, seeds=args.seed_list,
                pretrain_epochs=args.pretrain_epochs, test_studies=probe["n_test_studies"],
                test_patients=probe["n_test_subjects"], date=time.strftime("%Y-%m-%d", time.gmtime()),
                machine=_machine(), minutes=earlier.get("minutes", 0.0) + (time.perf_counter() - t0) / 60,
                seconds=seconds, invocations=earlier.get("invocations", 1) + 1 if earlier else 1, planned=planned,
                logged_counts_seed0=counts.get(args.seed_list[0], {}),
                command=shlex.join(["python", "bench/phantom_study.py", *(sys.argv[1:] if argv is None else argv)]),
                settings={k: v for k, v in vars(args).items() if not k.endswith("_list")})


def read_scores_names(run_dir: str) -> list[str]:
    """The labels a run scored (those with both classes among the test studies)."""
    from fastssl.eval.report import read_scores_csv

    return read_scores_csv(run_dir)["names"]


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if any(METHODS[m].flags is not None for m in args.method_list):
        check_pretrain_flags()
    check_label_fraction_flags(args.fraction_list, args.finetune)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    t0, timings, quiet = time.perf_counter(), {}, ["--quiet"] if args.quiet else []
    os.makedirs(args.out, exist_ok=True)
    cache = _data(args, timings, quiet)
    planned = plan(args.method_list, train_counts(cache), args.batch_size, args.pretrain_epochs,
                   args.pretrain_base_lr)
    check_plan(planned, COMPARISONS)
    runs, counts = {}, {}
    for (m, seed), (result, logged, seconds) in _all_runs(args, cache, planned, quiet).items():
        runs.setdefault(m, {})[seed] = result
        if logged:
            counts.setdefault(seed, {})[m] = logged
        for name, value in seconds.items():
            timings[name] = round(timings.get(name, 0.0) + value, 1)
    keys = [f"{k}@{f:g}" for k, f in eval_names(args.fraction_list, args.finetune)]
    present = read_scores_names(runs[args.method_list[0]][args.seed_list[0]][keys[-1]]["dir"])
    groups = label_groups(os.path.join(args.out, "phantom"), present)
    table = summarise(runs, args.method_list, args.seed_list, args.n_boot, keys, counts, groups)
    meta = _meta(args, argv, t0, timings, runs, planned, counts)
    from fastssl.eval.report import write_json

    write_json(os.path.join(args.out, "phantom_study.json"), dict(meta=meta, table=table))
    text = markdown(table, meta)
    with open(os.path.join(args.out, "phantom_study.md"), "w", encoding="utf-8") as handle:
        handle.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
