"""bench/phantom_study.py: matched plans (same images, steps and lr for every compared
pair; an unmatched plan or unmatched logged counts are refused), the seed-level
sign-flip test against brute-force enumeration, the verdict rule, a clear stop when the
installed commands lack a flag, and a --smoke run that goes through every step, logs the
planned counts, writes the table and JSON, and resumes with nothing to redo."""
from __future__ import annotations

import csv
import importlib.util
import itertools
import json
import math
import os
import sys

import numpy as np
import pytest

from _mvmae_helpers import one_thread, phantom_cache
from fastssl.eval.compare import seed_sign_flip_test, seed_t_test, student_t_two_sided

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_study():
    spec = importlib.util.spec_from_file_location("phantom_study", os.path.join(ROOT, "bench", "phantom_study.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # --jobs pickles its functions by module name
    spec.loader.exec_module(module)
    return module


def test_missing_pretrain_flags_fail_clearly(monkeypatch):
    study = load_study()
    monkeypatch.setitem(study.REQUIRED_PRETRAIN, "--no-such-flag", None)
    with pytest.raises(SystemExit, match=r"lacks \[.*--no-such-flag"):
        study.main(["--out", "unused", "--smoke"])


# ------------------------------------------------------------------------------ plan
def test_plan_matches_every_pretraining_by_hand():
    """53 train studies, each a frontal and a lateral (106 images), 8 studies a step, 3
    epochs: study runs 53 // 8 = 6 steps an epoch of 16 images; image runs take 16 images
    a step, 106 // 16 = 6 steps an epoch; lr 1e-3 * 8 / 256 for all."""
    study = load_study()
    counts = dict(studies=53, paired_studies=53, images=106, images_per_study=[2])
    planned = study.plan(list(study.METHODS), counts, batch=8, epochs=3, base_lr=1e-3)
    assert set(planned) == set(study.METHODS) - {"random"}
    for m, p in planned.items():
        assert (p["steps"], p["images"]) == (18, 18 * 16), m
        assert p["lr"] == pytest.approx(1e-3 * 8 / 256), m
        assert p["batch"] == (16 if m in ("single", "supervised") else 8), m
    study.check_plan(planned, study.COMPARISONS)  # matched: no exit


@pytest.mark.parametrize("counts, culprit", [
    # some studies hold one view: flu's images a step vary, paired sees fewer studies
    (dict(studies=53, paired_studies=40, images=93, images_per_study=[1, 2]), "mvmae_flu"),
    (dict(studies=53, paired_studies=30, images=83, images_per_study=[1, 2]), "single vs paired_beta0: steps 15 vs 9"),
    # three images in every study: image runs see 2 of every 3 images a study-run sees a step
    (dict(studies=53, paired_studies=53, images=159, images_per_study=[3]), "single"),
])
def test_unmatched_plan_is_refused(counts, culprit):
    study = load_study()
    planned = study.plan(list(study.METHODS), counts, batch=8, epochs=3, base_lr=1e-3)
    with pytest.raises(SystemExit, match=rf"unmatched plan.*{culprit}"):
        study.check_plan(planned, study.COMPARISONS)
    # a flu step's image count is known only when every study holds the same number
    assert (planned["mvmae_flu"]["images"] is None) == (len(counts["images_per_study"]) > 1)


def test_logged_counts_and_refusal(tmp_path):
    """Steps = the last training record's step, images = the sum of the records' counts
    (validation records skipped); a comparison whose logged counts differ is refused."""
    study = load_study()
    recs = [dict(step=3, epoch=0, loss=1.0, images=48), dict(step=4, epoch=0, loss=1.0, images=16),
            dict(step=4, epoch=0, val_recon=0.5), dict(step=7, epoch=1, loss=1.0, images=40)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert study.logged_counts(str(tmp_path)) == dict(steps=7, images=104)
    counts = {0: dict(single=dict(steps=7, images=104), mvmae_flu=dict(steps=7, images=112))}
    out = study.compare_pair({}, "single", "mvmae_flu", [0], "probe@1", 10, counts)
    assert out == dict(refused="logged counts differ (seed 0: images 104 vs 112)")
    recs[0].pop("images")  # a log without image counts cannot be verified
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert study.logged_counts(str(tmp_path)) == dict(steps=7, images=None)


def _brute_auroc(score, target):
    pos, neg = score[target == 1], score[target == 0]
    return np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])


def test_comparison_over_a_label_group(tmp_path):
    """compare_pair restricted to two of four labels: its per-seed deltas equal brute-force
    pairwise AUROCs over those two labels only; label_groups reads the phantom's findings."""
    from fastssl.eval.report import write_scores_csv

    study = load_study()
    rng = np.random.default_rng(3)
    names = ["Atelectasis", "Cardiomegaly", "Pleural Effusion", "No Finding"]
    studies, subjects = [f"s{i:02d}" for i in range(30)], [f"p{i // 2}" for i in range(30)]
    labels = rng.integers(0, 2, size=(30, 4))
    runs = {}
    for m in ("single", "mvmae_flu"):
        for seed in (0, 1, 2):
            d = tmp_path / m / str(seed)
            d.mkdir(parents=True)
            write_scores_csv(str(d / "scores.csv"), studies, subjects, rng.normal(size=(30, 4)), labels, names)
            runs.setdefault(m, {})[seed] = {"probe@1": dict(dir=str(d))}
    group = ["Atelectasis", "Pleural Effusion"]
    out = study.compare_pair(runs, "single", "mvmae_flu", [0, 1, 2], "probe@1", 50, {}, group)

    def macro(m, seed):
        t = np.loadtxt(os.path.join(runs[m][seed]["probe@1"]["dir"], "scores.csv"), delimiter=",", skiprows=1,
                       dtype=str)
        return np.mean([_brute_auroc(t[t[:, 2] == n, 3].astype(float), t[t[:, 2] == n, 4].astype(int))
                        for n in group])
    want = [macro("mvmae_flu", s) - macro("single", s) for s in (0, 1, 2)]
    assert out["seeds"]["deltas"] == pytest.approx(want)
    assert out["bootstrap"]["delta"] == pytest.approx(np.mean(want))
    phantom = tmp_path / "phantom"
    phantom.mkdir()
    (phantom / "phantom_config.json").write_text(json.dumps(dict(findings="cross-view")))
    assert study.label_groups(str(phantom), names) == {"one-view": ["Atelectasis", "Pleural Effusion"],
                                                       "two-view": ["Cardiomegaly", "No Finding"]}
    (phantom / "phantom_config.json").write_text(json.dumps({}))  # the standard findings: no one-view label
    assert study.label_groups(str(phantom), names) == {}


# ------------------------------------------------------------------- label efficiency
def test_every_label_fraction_is_probed_and_fine_tuned():
    study = load_study()
    fractions = [0.01, 0.1, 1.0]
    assert study.eval_names(fractions, finetune=False) == [("probe", 0.01), ("probe", 0.1), ("probe", 1.0)]
    assert study.eval_names(fractions, finetune=True) == [("probe", 0.01), ("probe", 0.1), ("probe", 1.0),
                                                          ("finetune", 0.01), ("finetune", 0.1), ("finetune", 1.0)]
    assert study._key_title("finetune@0.01") == "fine-tuned, 1% of the training labels"


def _fewest_train_studies_by_hand(index, fraction, seed, k=5):
    """The fewest train studies of a finetune run choosing its epoch by k-fold CV: the kept
    studies (the probe test's by-hand draw), and each fold's training part, the patients
    (sorted, permuted by the seed) at permutation position r in fold r % k."""
    from test_eval_probe import _kept_by_hand

    kept = _kept_by_hand(index, fraction, seed)[0]
    subject = {str(st): str(su) for st, su in zip(index.study_id, index.subject_id)}
    patients = sorted({subject[st] for st in kept})
    if len(patients) < k:
        return len(kept)  # no fold split possible (finetune refuses such a run itself)
    fold = {patients[p]: r % k for r, p in enumerate(np.random.default_rng(seed).permutation(len(patients)))}
    return min([len(kept)] + [sum(fold[subject[st]] != f for st in kept) for f in range(k)])


def test_finetune_batch_fits_the_kept_studies(tmp_path, monkeypatch):
    """A fine-tuning at fraction F gets batch min(--finetune-batch, fewest train studies a
    run sees): the kept studies counted by hand from index.csv, and with a validation split
    too small to choose the epoch (this cache's), each 5-fold CV run's training part; and
    _evaluate passes that batch with the fraction and seed to `fastssl finetune`.
    Planted: --finetune-batch passed unchanged at every fraction -> fails here; the CV
    folds ignored (kept studies only) -> fails here."""
    from test_eval_probe import _kept_by_hand

    from fastssl.data.cache import read_index

    study = load_study()
    cache = phantom_cache(str(tmp_path), studies=60)
    index = read_index(cache)
    assert len(set(index.study_id[index.split == "validate"])) < 10  # the CV case at the default --min-val-studies
    for fraction, seed in ((0.1, 3), (0.25, 0), (1.0, 1)):
        kept = len(_kept_by_hand(index, fraction, seed)[0])
        assert study.finetune_batch(cache, fraction, seed, 64, min_val_studies=1) == min(64, kept)  # validation used
        assert study.finetune_batch(cache, fraction, seed, 64) == _fewest_train_studies_by_hand(index, fraction, seed)
        assert study.finetune_batch(cache, fraction, seed, 2) == 2  # fewer than kept: unchanged
    calls = []

    def fake_cli(argv, timings, name):  # records the command and writes the record it would write
        calls.append(argv)
        out = argv[argv.index("--out") + 1]
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"{argv[0]}.json"), "w") as handle:
            json.dump(dict(macro_auroc=0.5, macro_ci=[0.4, 0.6]), handle)

    monkeypatch.setattr(study, "_cli", fake_cli)
    args = study.parse_args(["--out", str(tmp_path / "s"), "--smoke", "--label-fractions", "0.1,1", "--finetune"])
    out = study._evaluate(args, cache, str(tmp_path / "run"), "single", "random:test", 3, {}, [])
    assert sorted(out) == ["finetune@0.1", "finetune@1", "probe@0.1", "probe@1"]
    tunes = {a[a.index("--out") + 1]: a for a in calls if a[0] == "finetune"}
    low = tunes[str(tmp_path / "run" / "finetune_f0.1")]
    assert low[low.index("--batch-size") + 1] == str(min(args.finetune_batch,
                                                         _fewest_train_studies_by_hand(index, 0.1, 3)))
    assert low[low.index("--label-fraction") + 1] == "0.1" and low[low.index("--label-seed") + 1] == "3"
    full = tunes[str(tmp_path / "run" / "finetune")]
    assert full[full.index("--batch-size") + 1] == str(args.finetune_batch) and "--label-fraction" not in full


# --------------------------------------------------------------------- seed statistics
def _brute_sign_flip(deltas):
    observed = abs(sum(deltas))
    sums = [abs(sum(s * d for s, d in zip(signs, deltas))) for signs in itertools.product((1, -1), repeat=len(deltas))]
    return sum(s >= observed - 1e-12 for s in sums) / len(sums)


@pytest.mark.parametrize("deltas", [
    [0.010, 0.020, 0.015, 0.030, 0.005],          # all positive: 2 of 32
    [0.010, -0.020, 0.015, 0.030, 0.005, 0.012],
    [0.01, -0.01, 0.02, -0.02, 0.03, -0.03],    # ties with the observed sum 0: p = 1
    [0.003, 0.02, -0.004, 0.011, 0.007, 0.009, -0.001],
])
def test_seed_sign_flip_matches_brute_force(deltas):
    r = seed_sign_flip_test(deltas)
    assert r["p_value"] == pytest.approx(_brute_sign_flip(deltas), abs=1e-15)
    assert r["mean"] == pytest.approx(np.mean(deltas))
    assert r["n_positive"] == sum(d > 0 for d in deltas) and r["min_p"] == 2 / 2 ** len(deltas)


def test_seed_sign_flip_by_hand():
    assert seed_sign_flip_test([0.01] * 5)["p_value"] == 2 / 32   # 5 seeds never reach p < 0.05
    assert seed_sign_flip_test([0.01] * 6)["p_value"] == 2 / 64
    # signed sums +-0.04, +-0.08 and four of +-0.02: four of the eight reach |0.04|
    assert seed_sign_flip_test([0.03, 0.03, -0.02])["p_value"] == pytest.approx(4 / 8)
    with pytest.raises(ValueError, match="NaN"):
        seed_sign_flip_test([0.1, float("nan")])


def test_verdict_needs_both_tests_and_one_sign():
    study = load_study()
    boot = dict(delta=0.02, ci=[0.005, 0.035], p_value=0.01)
    seeds = dict(mean=0.02, p_value=0.03, t_p_value=0.01)
    assert study.verdict(boot, seeds) == "B better"
    assert study.verdict(dict(delta=-0.02, ci=[-0.035, -0.005], p_value=0.01),
                         dict(mean=-0.02, p_value=0.03, t_p_value=0.01)) == "A better"
    assert study.verdict(boot, dict(seeds, p_value=0.06)) == "not separated"          # sign-flip disagrees
    assert study.verdict(boot, dict(seeds, t_p_value=0.2)) == "not separated"         # t-test disagrees
    assert study.verdict(dict(boot, ci=[-0.001, 0.035]), seeds) == "not separated"   # CI reaches 0
    assert study.verdict(boot, dict(seeds, mean=-0.01)) == "not separated"           # opposite signs


def _t_density_tail(t, df, n=400000):
    """P(|T| >= |t|) by the midpoint rule on the density, in float64 (x = tan(u) maps the
    tail [|t|, inf) onto [atan|t|, pi/2), where the integrand is smooth and bounded)."""
    edges = np.linspace(np.arctan(abs(t)), np.pi / 2, n + 1)
    u = (edges[1:] + edges[:-1]) / 2
    const = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    f = const * (1 + np.tan(u) ** 2 / df) ** (-(df + 1) / 2) / np.cos(u) ** 2
    return 2 * float(np.sum(f) * (edges[1] - edges[0]))


@pytest.mark.parametrize("t, df", [(2.5706, 5), (0.3, 1), (1.7, 2), (-2.2, 3), (4.1, 4), (0.9, 7), (3.3, 10)])
def test_student_t_tail_against_numerical_integration(t, df):
    assert student_t_two_sided(t, df) == pytest.approx(_t_density_tail(t, df), abs=1e-6)


def test_seed_t_test_by_hand():
    # deltas 1, 2, 3, 4, 6: mean 3.2, sd sqrt(3.7), t = 3.2 / (sqrt(3.7) / sqrt(5)) = 3.7199; df 4
    r = seed_t_test([0.01, 0.02, 0.03, 0.04, 0.06])
    assert r["t"] == pytest.approx(3.2 / (math.sqrt(3.7) / math.sqrt(5)))
    assert r["p_value"] == pytest.approx(_t_density_tail(r["t"], 4), abs=1e-6)
    assert 0.02 < r["p_value"] < 0.025  # t(4) tables: 3.495 -> 0.025, 3.747 -> 0.02 (two-sided)
    assert seed_t_test([0.01, 0.01, 0.01])["p_value"] == 0.0 and seed_t_test([0.0, 0.0])["p_value"] == 1.0


# ----------------------------------------------------------------------------- smoke
def _train_studies(cache: str) -> int:
    with open(os.path.join(cache, "index.csv"), newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["split"] == "train"]
    per_study = {}
    for r in rows:
        per_study[r["study_id"]] = per_study.get(r["study_id"], 0) + 1
    assert set(per_study.values()) == {2}  # the design: both views in every study
    return len(per_study)


@pytest.mark.slow
def test_smoke_run_writes_the_table_and_resumes(tmp_path, monkeypatch, capsys):
    """Two runs at a time (--jobs 2), then a sequential rerun that finds all done. Every
    pretraining logs steps = (train studies // 8) x 1 epoch and 16 images a step."""
    study = load_study()
    out = str(tmp_path / "study")
    with one_thread():
        assert study.main(["--out", out, "--smoke", "--quiet", "--jobs", "2"]) == 0
    result = json.loads(open(os.path.join(out, "phantom_study.json")).read())
    steps = _train_studies(os.path.join(out, "cache")) // 8
    assert result["meta"]["logged_counts_seed0"] == {m: dict(steps=steps, images=16 * steps)
                                                     for m in study.METHODS if m != "random"}
    rows, comparisons = result["table"]["methods"]["probe@1"], result["table"]["comparisons"]["probe@1"]
    assert set(rows) == set(study.METHODS) and all(0 <= r["mean"] <= 1 for r in rows.values())
    assert [(c["a"], c["b"]) for c in comparisons] == [(a, b) for a, b, _ in study.COMPARISONS]
    for c in comparisons:  # the seed test's deltas are the per-seed macro AUROC differences
        want = [rows[c["b"]]["per_seed"][i]["macro_auroc"] - rows[c["a"]]["per_seed"][i]["macro_auroc"]
                for i in range(2)]
        assert c["seeds"]["deltas"] == pytest.approx(want) and c["seeds"]["n_seeds"] == 2
    md = open(os.path.join(out, "phantom_study.md")).read()
    assert md.count("\n| ") == 2 + len(study.METHODS) + len(study.COMPARISONS) and "single-view MAE" in md
    # a rerun finds every step done: no command runs
    calls = []
    monkeypatch.setattr(study, "_cli", lambda argv, timings, name: calls.append(name))
    capsys.readouterr()
    assert study.main(["--out", out, "--smoke", "--quiet"]) == 0
    assert calls == []
    again = json.loads(open(os.path.join(out, "phantom_study.json")).read())["meta"]
    meta = result["meta"]  # the record keeps the first run's cost: times add up over invocations
    assert again["invocations"] == 2 and again["minutes"] >= meta["minutes"] and again["seconds"] == meta["seconds"]
