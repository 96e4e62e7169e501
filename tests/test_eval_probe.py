"""fastssl.eval.probe: AUROC against a brute-force pairwise count (ties, ignored labels),
bootstrap intervals, probe on separable features, study-level averaging, and the tiny
end-to-end job phantom -> prepare -> pretrain -> probe through the CLI."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from _eval_helpers import brute_auroc, independent_study_scores
from _mvmae_helpers import one_thread, phantom_cache
from fastssl.eval.probe import (
    auroc, auroc_rows, bootstrap_macro_auroc, fit_linear_probe, knn_scores, macro_auroc, midranks,
    probe_logits, study_logits,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def test_midranks_average_ties():
    np.testing.assert_array_equal(midranks(np.array([3.0, 1.0, 3.0, 2.0, 3.0])), [4, 1, 4, 2, 4])
    x = np.array([[0.5, 0.5], [2.0, 1.0]])
    np.testing.assert_array_equal(midranks(x), [[1.5, 1.5], [2, 1]])


@pytest.mark.parametrize("distinct", [3, 1000])
def test_auroc_matches_brute_force(rng, distinct):
    for _ in range(20):
        n = int(rng.integers(2, 60))
        s = rng.integers(0, distinct, size=n).astype(float)  # few values: many ties
        y = rng.integers(-1, 2, size=n)
        assert auroc(s, y) == pytest.approx(brute_auroc(s, y), nan_ok=True)
    s, y = rng.normal(size=(7, 40)), rng.integers(0, 2, size=(7, 40))
    np.testing.assert_allclose(auroc_rows(s, y), [brute_auroc(a, b) for a, b in zip(s, y)])


def test_auroc_edge_cases():
    assert auroc([1, 2, 3], [0, 0, 1]) == 1.0 and auroc([3, 2, 1], [0, 0, 1]) == 0.0
    assert auroc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5
    assert np.isnan(auroc([1, 2], [1, 1])) and np.isnan(auroc([1, 2], [0, -1]))
    with pytest.raises(ValueError, match="NaN"):
        auroc([np.nan, 1], [0, 1])
    with pytest.raises(ValueError, match="no label"):
        macro_auroc(np.zeros((3, 2)), np.zeros((3, 2)))


def test_macro_and_bootstrap(rng):
    y = rng.integers(0, 2, size=(80, 5))
    y[:, 4] = 0  # one class only: left out of the macro
    s = y + rng.normal(scale=1.0, size=y.shape)
    per, macro = macro_auroc(s, y)
    assert np.isnan(per[4]) and macro == pytest.approx(np.mean(per[:4]))
    ci = bootstrap_macro_auroc(s, y, n_boot=300, seed=1)
    assert ci["macro"][0] < macro < ci["macro"][1] and ci["macro"][1] - ci["macro"][0] < 0.2
    assert np.isnan(ci["per_label"][4]).all()
    key = lambda r: (r["macro"], r["per_label"][:4])  # noqa: E731  (NaN != NaN: leave label 4 out)
    assert key(ci) == key(bootstrap_macro_auroc(s, y, n_boot=300, seed=1))  # seeded
    assert key(ci) != key(bootstrap_macro_auroc(s, y, n_boot=300, seed=2))
    # chunking over replicates changes nothing
    assert key(ci) == key(bootstrap_macro_auroc(s, y, n_boot=300, seed=1, max_elems=80 * 7))
    # one replicate by hand
    one = bootstrap_macro_auroc(s, y, n_boot=1, seed=5)
    idx = np.random.default_rng(5).integers(0, 80, size=(1, 80))[0]
    want = np.mean([brute_auroc(s[idx, j], y[idx, j]) for j in range(4)])
    assert one["macro"][0] == pytest.approx(want)


def test_probe_on_separable_features(rng):
    y = rng.integers(0, 2, size=(300, 14))
    y[rng.random(y.shape) < 0.1] = -1  # ignored entries
    x = np.concatenate([2.0 * y.clip(0) + 0.3 * rng.normal(size=y.shape), rng.normal(size=(300, 6))], 1)
    for method in ("lbfgs", "adamw"):
        probe = fit_linear_probe(x[:200], y[:200], method=method, max_iter=200 if method == "adamw" else 50)
        per, macro = macro_auroc(probe_logits(probe, x[200:]), y[200:])
        assert macro > 0.99, (method, per)
    _, kmacro = macro_auroc(knn_scores(x[:200], y[:200], x[200:], k=10), y[200:])
    assert kmacro > 0.8  # 2^14 label combinations: neighbours share most, not all, labels
    with pytest.raises(ValueError, match="method"):
        fit_linear_probe(x, y, method="sgd")


def test_study_logits_average_views():
    logits = np.array([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0]])
    labels = np.array([[1, 0], [1, 0], [0, 1]], dtype=np.int8)
    s, lab = study_logits(logits, labels, np.array([7, 2, 7]))
    np.testing.assert_array_equal(s, [[3.0, 2.0], [3.0, 2.5]])  # studies in sorted order: 2, 7
    np.testing.assert_array_equal(lab, [[1, 0], [1, 0]])


TRAIN_MEAN, TRAIN_STD = 0.3125, 0.1875  # the pretraining's --pixel-mean/--pixel-std (not the cache's)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny phantom cache and a 2-epoch paired pretraining run on it with a non-default
    pixel normalisation (shared by the evaluation tests of this module)."""
    from fastssl.cli import main as cli

    root = tmp_path_factory.mktemp("probe")
    cache = phantom_cache(str(root))
    run = str(root / "run")
    with one_thread():
        assert cli(["pretrain", "--cache", cache, "--out", run, "--preset", "test", "--epochs", "2",
                    "--batch-size", "4", "--workers", "0", "--mask-ratio", "0.75", "--warmup-epochs", "1",
                    "--log-every", "2", "--pixel-mean", str(TRAIN_MEAN), "--pixel-std", str(TRAIN_STD),
                    "--quiet"]) == 0
    return cache, run


def test_end_to_end_phantom_pretrain_probe(pretrained, tmp_path, capsys):
    """Also pins the study-level averaging (issue 15.5): every study's score in scores.csv
    equals the mean of its images' logits computed independently, image by image."""
    from fastssl.cli import main as cli
    from fastssl.eval.report import read_scores_csv

    cache, run = pretrained
    enc = os.path.join(run, "encoder.safetensors")
    out = str(tmp_path / "probe")
    assert cli(["probe", "--cache", cache, "--checkpoint", enc, "--out", out, "--workers", "0",
                "--n-boot", "50", "--knn-k", "5", "--min-val-studies", "1"]) == 0  # not --quiet: the summary is printed
    with open(os.path.join(out, "probe.json")) as handle:
        r = json.load(handle)
    assert 0.0 <= r["macro_auroc"] <= 1.0 and len(r["per_label"]) == 14 and r["labels_used"]
    lo, hi = r["macro_ci"]
    assert 0.0 <= lo <= hi <= 1.0 and r["feature_dim"] == 32 and r["n_test_studies"] > 0
    assert "macro AUROC" in capsys.readouterr().out
    assert r["l2_selection"]["chosen_on"] == "validate" and len(r["l2_selection"]["validation_macro_auroc"]) == 6
    # scores.csv: one row per (test study, label); the study's score is its images' mean logit
    table = read_scores_csv(out)
    assert table["scores"].shape == (r["n_test_studies"], 14) and os.path.getsize(os.path.join(out, "roc.png")) > 0
    from fastssl.models.export import load_encoder

    encoder = load_encoder(enc).eval()
    head = dict(np.load(os.path.join(out, "probe.npz")))

    def image_logits(x, view):
        feat = encoder(x, view).double().numpy()[0]
        return (feat - head["mean"]) / head["std"] @ head["weight"].astype(np.float64) + head["bias"]

    want = independent_study_scores(cache, encoder.cfg.img_size, image_logits, (TRAIN_MEAN, TRAIN_STD))
    assert sorted(want) == list(table["studies"])
    np.testing.assert_allclose(table["scores"], [want[s] for s in table["studies"]], rtol=1e-4, atol=1e-4)
    # the reported AUROC is the pairwise count over those study scores
    j = r["labels_used"][0]
    k = table["names"].index(j)
    assert r["per_label"][j]["auroc"] == pytest.approx(brute_auroc(table["scores"][:, k], table["labels"][:, k]))
    # AUPRC, F1 and Brier by counting over those scores; the F1 thresholds maximise F1 on
    # the validation studies' scores, computed image by image (planted: thresholds from
    # the test split -> they differ)
    from _eval_helpers import brute_ap, brute_best_threshold, brute_brier, brute_f1

    val = independent_study_scores(cache, encoder.cfg.img_size, image_logits, (TRAIN_MEAN, TRAIN_STD), "validate")
    val_ids = sorted(val)
    val_scores = np.array([val[v] for v in val_ids])
    from fastssl.data.cache import read_index

    index = read_index(cache)
    val_labels = np.array([index.labels[list(index.study_id).index(v)] for v in val_ids])
    assert r["f1_threshold_source"] == "validate" and os.path.getsize(os.path.join(out, "reliability.png")) > 0
    compared = 0
    for name in r["labels_used"]:
        k = table["names"].index(name)
        got, s, y = r["per_label_metrics"][name], table["scores"][:, k], table["labels"][:, k]
        assert got["auprc"] == pytest.approx(brute_ap(s, y)) and got["brier"] == pytest.approx(brute_brier(s, y))
        want = brute_best_threshold(val_scores[:, k], val_labels[:, k])
        if want is None or np.isnan(want[1]) or (val_labels[:, k] == 1).sum() == 0:
            assert got["f1_threshold"] is None and got["f1"] is None
        else:
            assert got["f1_threshold"] == pytest.approx(want[0], rel=1e-4, abs=1e-4)
            assert got["f1"] == pytest.approx(brute_f1(s, y, got["f1_threshold"]), nan_ok=True)
            compared += 1
    assert compared > 0


def test_probe_accepts_training_checkpoint_random_init_and_fixed_l2(pretrained, tmp_path):
    from fastssl.cli import main as cli

    cache, run = pretrained
    out = str(tmp_path / "probe")
    assert cli(["probe", "--cache", cache, "--checkpoint", os.path.join(run, "checkpoint.pt"),
                "--out", out, "--workers", "0", "--n-boot", "10", "--l2-grid", "", "--no-plots", "--quiet"]) == 0
    with open(os.path.join(out, "probe.json")) as handle:
        assert json.load(handle)["l2_selection"] == dict(l2=1e-4, chosen_on=None)
    # another encoder into the same folder is another run: --overwrite replaces the first
    assert cli(["probe", "--cache", cache, "--checkpoint", "random:test", "--out", out, "--workers", "0",
                "--n-boot", "10", "--overwrite", "--quiet"]) == 0
    assert cli(["probe", "--cache", cache, "--checkpoint", os.path.join(run, "nope.pt"),
                "--out", out, "--quiet"]) == 2


def test_probe_out_is_a_job_resumed_refused_or_overwritten(pretrained, tmp_path, capsys):
    """--out is opened by fastssl.jobs.open_job: the same command recomputes equal files; another
    setting, the encoder file's content or --no-plots is refused naming it, touching nothing;
    --no-plots --overwrite leaves no old PNG; a foreign folder and a held lock are refused.
    Planted: --plots left out of the fingerprint, the encoder file left out of the inputs, no
    open_job at all (a plain makedirs) -> this test fails."""
    import shutil

    from fastssl import jobs
    from fastssl.cli import main as cli
    from fastssl.models.export import export_encoder, load_encoder

    cache, run = pretrained
    enc, out = tmp_path / "enc.safetensors", tmp_path / "probe"
    shutil.copyfile(os.path.join(run, "encoder.safetensors"), enc)

    def probe(*extra, where=out):
        capsys.readouterr()
        with one_thread():
            code = cli(["probe", "--cache", cache, "--checkpoint", str(enc), "--out", str(where), "--workers", "0",
                        "--n-boot", "10", "--l2-grid", "", "--quiet", *extra])
        return code, capsys.readouterr().err

    def files(where=out):
        return {p.name: p.read_bytes() for p in where.iterdir() if p.name != jobs.LOCK_NAME}

    assert probe() == (0, "")
    first = files()
    assert {"job.json", "probe.json", "probe.npz", "scores.csv", "roc.png", "reliability.png"} <= set(first)
    assert json.loads(first["job.json"])["settings"]["plots"] is True
    (out / "scores.csv").unlink()                         # a rerun recomputes: the file comes back, equal
    assert probe() == (0, "") and files() == first
    for extra, named in ((["--n-boot", "11"], "n_boot: 10 -> 11"), (["--no-plots"], "plots: true -> false"),
                         (["--seed", "1"], "seed: 0 -> 1")):
        code, err = probe(*extra)
        assert code == 2 and err.startswith("fastssl probe: error: ") and named in err and "--overwrite" in err, err
        assert files() == first                           # refused before any write
    code, err = probe("--no-plots", "--overwrite")
    assert code == 0 and not (out / "roc.png").exists() and not (out / "reliability.png").exists()
    assert json.loads((out / "job.json").read_text())["settings"]["plots"] is False
    assert (out / "probe.json").read_bytes() != first["probe.json"]   # its config says plots false
    # the encoder's bytes are an input: another encoder under the same name is refused
    other = load_encoder(str(enc))
    export_encoder(other, other.cfg, str(enc), manifest=dict(pixel_mean=TRAIN_MEAN, pixel_std=TRAIN_STD),
                   views=("lateral",))
    code, err = probe("--no-plots")
    assert code == 2 and f"input {enc}: " in err, err   # "content changed" or "size a -> b bytes"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    code, err = probe(where=foreign)
    assert code == 2 and "is not empty and has no job.json" in err
    assert set(os.listdir(foreign)) - {jobs.LOCK_NAME} == {"notes.txt"}
    assert (foreign / "notes.txt").read_text() == "mine"
    held = tmp_path / "held"
    with jobs.OutputLock(held):
        code, err = probe(where=held)
    assert code == 2 and "is in use by another job" in err and os.listdir(held) == [jobs.LOCK_NAME]


def pooled_cache(root) -> str:
    """A pooled cache of two tiny phantoms (MIMIC-CXR JPG and CheXpert layouts, 16 studies
    each, every split non-empty in both) -> the cache directory."""
    from fastssl.data.cache import prepare_cache
    from fastssl.data.phantom import generate_phantom

    sources = []
    for layout in ("mimic-jpg", "chexpert"):
        generate_phantom(os.path.join(root, layout), 16, seed=1, size=32, workers=1, both_views_fraction=0.8,
                         split=(0.5, 0.25, 0.25), progress=False, layout=layout)
        sources.append(f"{layout}:{os.path.join(root, layout)}")
    prepare_cache(sources, os.path.join(root, "pool"), size=32, shard_size=64, workers=1, progress=False)
    return os.path.join(root, "pool")


def test_probe_dataset_filter_on_a_pooled_cache(tmp_path, capsys):
    """--dataset restricts train and test to that dataset's rows (fit on the pool's MIMIC
    part, score MIMIC test); without it every test study is scored; unknown -> error."""
    from fastssl.cli import main as cli
    from fastssl.data.cache import read_index
    from fastssl.eval.report import read_scores_csv

    cache = pooled_cache(str(tmp_path))
    index = read_index(cache)

    def test_studies(*datasets):
        return sorted(set(index.study_id[(index.split == "test") & np.isin(index.dataset, datasets)]))

    def probe(out, *extra):
        with one_thread():
            return cli(["probe", "--cache", cache, "--checkpoint", "random:test", "--out", str(tmp_path / out),
                        "--workers", "0", "--n-boot", "10", "--no-plots", "--quiet", *extra])

    assert probe("mimic", "--dataset", "mimic-cxr") == 0
    r = json.loads((tmp_path / "mimic" / "probe.json").read_text())
    assert r["config"]["dataset"] == "mimic-cxr"
    assert r["n_train_images"] == int(((index.split == "train") & (index.dataset == "mimic-cxr")).sum())
    assert list(read_scores_csv(str(tmp_path / "mimic"))["studies"]) == test_studies("mimic-cxr")
    assert probe("all", "--l2-grid", "") == 0
    assert list(read_scores_csv(str(tmp_path / "all"))["studies"]) == test_studies("mimic-cxr", "chexpert")
    assert len(test_studies("chexpert")) > 0 and r["n_train_images"] < int((index.split == "train").sum())
    capsys.readouterr()
    assert probe("bad", "--dataset", "mimic-cxr,vindr") == 2
    err = capsys.readouterr().err
    assert "['vindr'] not in this cache (has ['chexpert', 'mimic-cxr'])" in err


def _kept_by_hand(index, fraction, seed):
    """The --label-fraction draw, counted independently: train studies per patient, the
    patients in the seeded order, added one by one until ceil(fraction * S) studies."""
    import math

    train = index.split == "train"
    studies_of: dict[str, set] = {}
    for study, subject in zip(index.study_id[train], index.subject_id[train]):
        studies_of.setdefault(str(subject), set()).add(str(study))
    patients = sorted(studies_of)
    target = math.ceil(fraction * sum(len(v) for v in studies_of.values()))
    kept: set = set()
    for p in np.random.default_rng(seed).permutation(len(patients)):
        kept |= studies_of[patients[p]]
        if len(kept) >= target:
            break
    return kept, target, max(len(v) for v in studies_of.values())


def test_label_fraction_keeps_whole_patients(tmp_path, capsys):
    """--label-fraction keeps whole patients' train studies up to ceil(F * S) (counted by hand
    from index.csv); validation and test untouched; recorded; F outside (0, 1] is refused.
    Planted: the seed ignored (rng seeded 0), and one patient too few kept; both fail here."""
    from fastssl.cli import main as cli
    from fastssl.data.cache import read_index
    from fastssl.data.datasets import SingleViewDataset
    from fastssl.eval.probe import keep_label_fraction

    cache = phantom_cache(str(tmp_path), studies=60)
    index = read_index(cache)
    for fraction, seed in ((0.25, 3), (0.1, 0), (0.5, 7)):
        ds = SingleViewDataset(cache, split="train")
        info = keep_label_fraction(ds, fraction, seed)
        want, target, biggest = _kept_by_hand(index, fraction, seed)
        assert set(map(str, ds.study_ids)) == want and info["n_kept_studies"] == len(want)
        assert target <= len(want) < target + biggest
        rows = np.flatnonzero((index.split == "train") & np.isin(index.study_id, sorted(want)))
        np.testing.assert_array_equal(np.sort(ds.rows), rows)  # every image of a kept study
        assert [str(ds.study_ids[k]) for k in ds.study_index] == list(index.study_id[ds.rows])
    full = SingleViewDataset(cache, split="train")
    assert keep_label_fraction(full, 1.0, 5)["n_kept_studies"] == len(full.study_ids)
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"label_fraction=.*expected a number in \(0, 1\]"):
            keep_label_fraction(full, bad, 0)

    out = tmp_path / "probe"
    common = ["probe", "--cache", cache, "--checkpoint", "random:test", "--out", str(out), "--workers", "0",
              "--n-boot", "10", "--no-plots", "--quiet", "--l2-grid", ""]
    with one_thread():
        assert cli(common + ["--label-fraction", "0.25", "--label-seed", "3"]) == 0
    r = json.loads((out / "probe.json").read_text())
    want, _, _ = _kept_by_hand(index, 0.25, 3)
    assert r["config"]["label_fraction"] == 0.25 and r["config"]["label_seed"] == 3
    assert r["n_train_studies"] == len(want) == r["label_fraction"]["n_kept_studies"]
    assert r["n_train_images"] == int(((index.split == "train") & np.isin(index.study_id, sorted(want))).sum())
    assert r["n_test_images"] == int((index.split == "test").sum())  # test untouched
    capsys.readouterr()
    assert cli(common + ["--label-fraction", "0"]) == 2
    assert "--label-fraction: got 0.0; allowed: a number in (0, 1]" in capsys.readouterr().err


def _train_features_by_hand(cache, encoder, mean, std):
    """(N, D) float64 CLS features of the train images, one image at a time, normalised
    with (mean, std): the oracle of the normalisation the probe applies."""
    import torch

    from fastssl.data.augment import CenterResize
    from fastssl.data.datasets import SingleViewDataset

    resize = CenterResize(out_size=encoder.cfg.img_size, mean=mean, std=std)
    ds = SingleViewDataset(cache, split="train")
    with torch.no_grad():
        return np.stack([encoder(resize(ds[i][0][None]), int(ds[i][3])).double().numpy()[0] for i in range(len(ds))])


@pytest.mark.parametrize("source", ["encoder.safetensors", "checkpoint.pt"])
def test_probe_normalises_with_the_encoders_training_values(pretrained, tmp_path, source, caplog):
    """Pretrained with --pixel-mean/--pixel-std, probed on a second cache whose manifest
    has other statistics: the train features (probe.npz's feature mean and std) equal those
    computed by hand with the training normalisation, and one line says so. Planted: the
    old rule (the evaluation cache's manifest) -> the features differ, the test fails."""
    import shutil

    from fastssl.cli import main as cli
    from fastssl.models.export import load_encoder

    cache, run = pretrained
    other = str(tmp_path / "other_cache")
    shutil.copytree(cache, other)
    manifest = json.loads(open(os.path.join(other, "manifest.json")).read())
    manifest.update(pixel_mean=0.61, pixel_std=0.29)  # other statistics, same images
    open(os.path.join(other, "manifest.json"), "w").write(json.dumps(manifest))
    out = str(tmp_path / "probe")
    caplog.set_level("INFO")
    with one_thread():
        assert cli(["probe", "--cache", other, "--checkpoint", os.path.join(run, source), "--out", out,
                    "--workers", "0", "--n-boot", "10", "--l2-grid", "", "--no-plots", "--quiet"]) == 0
    assert f"training mean {TRAIN_MEAN:.4f} std {TRAIN_STD:.4f}" in caplog.text and "0.6100 / 0.2900" in caplog.text
    encoder = load_encoder(os.path.join(run, "encoder.safetensors")).eval()
    want = _train_features_by_hand(other, encoder, TRAIN_MEAN, TRAIN_STD)
    head = np.load(os.path.join(out, "probe.npz"))
    np.testing.assert_allclose(head["mean"], want.mean(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(head["std"], want.std(0, ddof=1), rtol=1e-3, atol=1e-4)
    shifted = _train_features_by_hand(other, encoder, 0.61, 0.29)  # what the old rule fed the encoder
    assert np.abs(shifted.mean(0) - want.mean(0)).max() > 1e-2


def _brute_cv_choice(x, y, study, subjects, grid, k, seed, max_iter):
    """k-fold L2 choice by brute force: patient folds by the stated rule (sorted patients,
    seeded permutation, position % k), a cold-start probe per (L2, fold), study scores by a
    loop over studies, per-label pairwise AUROC, mean over folds; ties to the larger L2."""
    patients = sorted(set(subjects))
    perm = np.random.default_rng(seed).permutation(len(patients))
    fold_of = {patients[p]: r % k for r, p in enumerate(perm)}
    folds = np.array([fold_of[s] for s in subjects])
    result = {}
    for l2 in grid:
        per_fold = []
        for f in range(k):
            held = folds == f
            probe = fit_linear_probe(x[~held], y[~held], l2=l2, max_iter=max_iter)
            logits = probe_logits(probe, x[held])
            ids = sorted(set(study[held]))
            s = np.array([logits[study[held] == i].mean(0) for i in ids])
            lab = np.array([y[held][study[held] == i][0] for i in ids])
            aucs = [brute_auroc(s[:, j], lab[:, j]) for j in range(y.shape[1])]
            if not np.isnan(aucs).all():
                per_fold.append(np.nanmean(aucs))
        result[l2] = float(np.mean(per_fold))
    return max(result, key=lambda v: (result[v], v)), result


def test_cv_select_l2_matches_brute_force(rng):
    """Patient-grouped k-fold choice of the L2 against the brute-force transcription above.
    Planted: folds drawn per image instead of per patient (a patient in two folds) -> the
    per-L2 scores differ, the test fails."""
    from fastssl.eval.probe import ProbeConfig, cv_select_l2, patient_folds

    n_pat, y_dim = 30, 3
    subjects = np.repeat([f"p{i:02d}" for i in range(n_pat)], 4)               # 4 images per patient
    study = np.repeat(np.arange(n_pat * 2), 2)                                 # 2 studies per patient
    y = np.repeat(rng.integers(0, 2, size=(n_pat * 2, y_dim)), 2, axis=0).astype(np.int8)
    x = 0.6 * y + rng.normal(size=(y.shape[0], y_dim)) + 0.5 * rng.normal(size=(n_pat * 2, y_dim)).repeat(2, 0)
    x = np.concatenate([x, rng.normal(size=(x.shape[0], 5))], 1).astype(np.float32)
    grid = [1e-3, 1e-1, 3.0]
    cfg = ProbeConfig(l2_grid=",".join(map(str, grid)), cv_folds=4, seed=3, max_iter=100)
    tr = dict(features=x, labels=y, study_index=study)
    probe, l2, scores, oof = cv_select_l2(cfg, tr, subjects)
    want_l2, want = _brute_cv_choice(x, y, study, subjects, grid, 4, 3, 100)
    assert l2 == want_l2 and len(set(want.values())) == 3
    assert {float(k): v for k, v in scores.items()} == pytest.approx(want, abs=1e-6)
    folds = patient_folds(subjects, 4, 3)
    for f in range(4):  # out-of-fold logits: the fold's probe at the chosen L2
        held = folds == f
        fold_probe = fit_linear_probe(x[~held], y[~held], l2=l2, max_iter=100)
        np.testing.assert_allclose(oof[held], probe_logits(fold_probe, x[held]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="too few for 40-fold"):
        patient_folds(subjects, 40, 0)


@pytest.mark.slow  # a phantom, a cache and 10 probe fits (~10 s)
def test_probe_empty_validation_falls_back_to_cross_validation(tmp_path, caplog):
    """A cache without validation studies: the probe says so in one line, records the
    k-fold choice in probe.json, and its L2 equals the brute-force k-fold choice on the
    train features."""
    from fastssl.cli import main as cli
    from fastssl.data.cache import prepare_cache
    from fastssl.data.phantom import generate_phantom
    from fastssl.eval.probe import ProbeConfig, eval_transform, extract_features, load_eval_encoder, split_dataset

    generate_phantom(str(tmp_path / "src"), 40, seed=2, size=32, workers=1, both_views_fraction=0.8,
                     split=(0.75, 0.0, 0.25), progress=False)
    cache = str(tmp_path / "cache")
    prepare_cache(str(tmp_path / "src"), cache, size=32, shard_size=64, workers=1, progress=False)
    out = tmp_path / "probe"
    grid = "1e-4,1e-2,1"
    with one_thread():
        assert cli(["probe", "--cache", cache, "--checkpoint", "random:test", "--out", str(out), "--workers", "0",
                    "--n-boot", "10", "--no-plots", "--quiet", "--l2-grid", grid, "--cv-folds", "3",
                    "--max-iter", "50"]) == 0
        assert "validation split 'validate' is empty: L2 chosen by 3-fold cross-validation" in caplog.text
        chosen = json.loads((out / "probe.json").read_text())["l2_selection"]
        assert chosen["chosen_on"] == "3-fold cross-validation on train" and chosen["cv_folds"] == 3
        r = json.loads((out / "probe.json").read_text())
        assert r["f1_threshold_source"] == "3-fold cross-validation on train (out-of-fold)"
        cfg = ProbeConfig(cache=cache, checkpoint="random:test")
        ds = split_dataset(cfg, "train")
        encoder = load_eval_encoder("random:test", 0)
        tr = extract_features(encoder, ds, eval_transform(cache, 32), batch_size=64)
        want_l2, want = _brute_cv_choice(tr["features"], tr["labels"], tr["study_index"],
                                         list(ds.index.subject_id[ds.rows]), [1e-4, 1e-2, 1.0], 3, 0, 50)
    assert chosen["l2"] == want_l2
    assert {float(k): v for k, v in chosen["cv_macro_auroc"].items()} == pytest.approx(want, abs=1e-5)
