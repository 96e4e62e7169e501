"""`fastssl curate`: config file + overrides, outputs, resume, report metrics, synthetic data."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fastssl.cli import main
from fastssl.curation.hierarchical import FAIL_ENV
from fastssl.curation.synthetic import long_tailed_mixture, zipf_sizes
from fastssl.curation.report import balance_metrics


def test_zipf_sizes_and_mixture(tmp_path):
    rng = np.random.default_rng(0)
    sizes = zipf_sizes(10_000, 50, 1.1, rng)
    assert sizes.sum() == 10_000 and sizes.min() >= 1 and sizes.max() > 20 * sizes.min()
    pts, comp, fam = long_tailed_mixture(2000, 8, 20, families=4, seed=1, dtype=np.float16)
    assert pts.shape == (2000, 8) and pts.dtype == np.float16
    assert comp.shape == fam.shape == (2000,) and np.array_equal(fam, comp % 4)
    paths, comp2, _ = long_tailed_mixture(2000, 8, 20, families=4, seed=1, dtype=np.float16,
                                          out_dir=tmp_path, shard_rows=700)
    assert len(paths) == 3 and np.array_equal(comp, comp2)
    assert np.array_equal(np.concatenate([np.load(p) for p in paths]), pts)


def test_balance_metrics():
    u = balance_metrics(np.full(10, 7))
    assert u["entropy_norm"] == pytest.approx(1.0) and u["gini"] == pytest.approx(0.0)
    skew = balance_metrics(np.array([100, 0, 0, 0]))
    assert skew["entropy_norm"] == pytest.approx(0.0) and skew["coverage"] == 0.25
    assert skew["gini"] == pytest.approx(0.75)


def test_curate_cli_end_to_end(tmp_path, monkeypatch, capsys):
    pytest.importorskip("fastssl.curation.sampling")
    paths, comp, _ = long_tailed_mixture(6000, 16, 40, families=4, seed=3,
                                         out_dir=tmp_path / "emb", shard_rows=2500)
    cfg = tmp_path / "curate.yaml"
    cfg.write_text(
        f"data: [{tmp_path / 'emb'}/points_*.npy]\n"
        f"out: {tmp_path / 'out'}\n"
        "levels: [200, 20, 4]\niterations: 5\nresampling_steps: 2\nsplit_k: 2\n"
        f"target_size: 0.1\nlabels: {tmp_path / 'emb' / 'components.npy'}\nquiet: true\n")
    monkeypatch.setenv(FAIL_ENV, "2")
    with pytest.raises(RuntimeError, match="injected failure"):
        main(["curate", "--config", str(cfg), "--levels", "60,12,3"])
    monkeypatch.delenv(FAIL_ENV)
    assert main(["curate", "--config", str(cfg), "--levels", "60,12,3"]) == 0
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    assert [lv["k"] for lv in report["levels"]][1:] == [12, 3]
    idx = np.load(out / "curated_indices.npy")
    assert idx.shape == (600,) and np.unique(idx).size == 600 and idx.max() < 6000
    gt = report["ground_truth"]
    assert gt["curated"]["entropy_norm"] > gt["random"]["entropy_norm"]
    assert gt["curated"]["coverage"] >= gt["random"]["coverage"]
    text = capsys.readouterr().out
    assert "ground truth: 40 groups" in text and "curated" in text
    # a different tree config is refused unless --overwrite
    assert main(["curate", "--config", str(cfg), "--levels", "50,12,3"]) == 2
    assert main(["curate", "--config", str(cfg), "--levels", "50,12,3", "--overwrite",
                 "--target-size", "0"]) == 0


def test_curate_cli_bad_data(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((10, 4), np.float32))
    np.save(tmp_path / "b.npy", np.ones((10, 5), np.float32))
    assert main(["curate", "--data", str(tmp_path / "a.npy"), str(tmp_path / "b.npy"),
                 "--out", str(tmp_path / "o"), "--levels", "2", "--quiet"]) == 2


def _parsed(config_path, *flags):
    from fastssl.cli import _apply_config, _load_config, command_parser

    parser, _ = command_parser("curate")
    _apply_config(parser, _load_config(str(config_path)), str(config_path))
    return parser.parse_args(list(flags))


@pytest.mark.parametrize("tree, levels, sample_sizes", [
    ("T1", [100_000, 35_000, 350, 62], [None, 50, 50, 50]),
    ("T2", [100_000, 100_000, 10_000, 2048], [None, 50, 17, 5]),
])
def test_paper2_configs_as_shipped(tree, levels, sample_sizes):
    """Paper 2's released trees (lely475/ssl-data-curation 4levels_path_images_T1/T2.yaml)."""
    from importlib.resources import files

    from fastssl.train.curate import tree_config

    path = files("fastssl") / "configs" / f"paper2_{tree}.yaml"
    config = tree_config(_parsed(path, "--data", "x.npy"))
    assert [lv.k for lv in config.levels] == levels and config.split_k == 35
    assert [lv.sample_size for lv in config.levels] == sample_sizes
    assert config.iterations == 50 and config.split_inits == 10 and config.fp64_accumulate
    assert config.resampling_init == "fresh" and config.empty == "keep"  # SDC keeps empties
    assert tree_config(_parsed(path, "--data", "x.npy", "--empty", "reseed")).empty == "reseed"
    assert [config.level_value(d, "sampling_strategy") for d in (1, 2, 3, 4)] == ["closest"] * 4
    # steps as SDC counts them: [1, 10, 10, 10] = level 1 once (+ split), 1 + 9 resampled above
    assert config.steps(1) == ["kmeans", "split"]
    assert config.steps(2) == ["kmeans"] + [f"resample_{i}" for i in range(1, 10)]


def test_paper2_T1_runs_scaled_down(tmp_path):
    """The shipped T1 config end to end with only the sizes scaled (levels, split, sample)."""
    paths, comp, _ = long_tailed_mixture(3000, 8, 30, families=4, seed=1,
                                         out_dir=tmp_path / "emb", shard_rows=1000)
    from importlib.resources import files

    cfg = files("fastssl") / "configs" / "paper2_T1.yaml"
    assert main(["curate", "--config", str(cfg), "--data", *map(str, paths), "--out",
                 str(tmp_path / "out"), "--levels", "100,35,8,3", "--split-k", "3",
                 "--sample-size", "null,3,2,2", "--iterations", "4", "--split-inits", "2",
                 "--resampling-steps", "1,3,3,3", "--quiet"]) == 0
    tree = json.loads((tmp_path / "out" / "tree" / "tree.json").read_text())
    steps = [(s["level"], s["step"]) for s in tree["meta"]["steps"]]
    assert steps[:2] == [(1, "kmeans"), (1, "split")] and (2, "resample_2") in steps
    assert (1, "resample_1") not in steps and tree["meta"]["config"]["resampling_init"] == "fresh"


@pytest.mark.parametrize("flags, message", [
    (["--target-size", "nan"], "target-size"),
    (["--iterations", "-1"], "--iterations"),
    (["--resampling-steps", "-1"], "--resampling-steps"),
    (["--resampling-steps", "0"], "--resampling-steps"),
    (["--sample-size", "0"], "--sample-size"),
    (["--sampling-strategy", "furthest"], "--sampling-strategy"),
    (["--iterations", "5,5"], "2 values for 3 levels"),
    (["--split-inits", "0"], "split-inits"),
])
def test_bad_settings_fail_before_any_work(tmp_path, capsys, caplog, flags, message):
    np.save(tmp_path / "x.npy", np.ones((50, 4), np.float32))
    out = tmp_path / "out"
    # --target-size is checked by the router like every declared range (it was argparse's type=)
    code = main(["curate", "--data", str(tmp_path / "x.npy"), "--out", str(out), "--levels", "8,4,2", *flags])
    assert code == 2
    assert message in capsys.readouterr().err + caplog.text
    assert not out.exists()  # nothing was built


def _router_error(capsys) -> str:
    """The CLI router's error: one line on stderr, in its one format."""
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("fastssl curate: error: "), err
    return err


def test_zero_byte_shard_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty.npy").write_bytes(b"")
    assert main(["curate", "--data", str(tmp_path / "empty.npy"), "--out", str(tmp_path / "o"),
                 "--levels", "2", "--quiet"]) == 2
    err = _router_error(capsys)
    assert "empty.npy" in err and "Traceback" not in err


# ---------------------------------------------------------------- resume identity, lock
def _small_run(tmp_path, *extra):
    x = np.random.default_rng(0).standard_normal((400, 6)).astype(np.float32)
    data = tmp_path / "emb"
    data.mkdir(exist_ok=True)
    if not (data / "x.npy").exists():
        np.save(data / "x.npy", x)
    return ["curate", "--data", str(data / "x.npy"), "--out", str(tmp_path / "out"),
            "--levels", "12,3", "--iterations", "3", "--quiet", *extra]


def test_resaved_shard_is_a_different_run(tmp_path, capsys):
    """11.4: same name, shape and dtype, new values: refused, naming the file."""
    assert main(_small_run(tmp_path)) == 0
    np.save(tmp_path / "emb" / "x.npy",
            np.random.default_rng(1).standard_normal((400, 6)).astype(np.float32))
    assert main(_small_run(tmp_path)) == 2
    err = _router_error(capsys)
    assert "x.npy: content changed" in err
    assert main(_small_run(tmp_path, "--overwrite")) == 0


def test_changed_setting_is_named(tmp_path, capsys):
    """12.12: the refusal names the setting and both values."""
    assert main(_small_run(tmp_path)) == 0
    assert main(_small_run(tmp_path, "--sampling-strategy", "random")) == 2
    err = _router_error(capsys)
    assert "sampling_strategy" in err and '"closest" -> "random"' in err.replace(
        "'", '"')


def test_second_job_into_the_same_out_fails_at_once(tmp_path, capsys):
    """11.8: the output lock (held here as a running job would) refuses a second job."""
    from fastssl.jobs import OutputLock

    with OutputLock(tmp_path / "out"):
        assert main(_small_run(tmp_path)) == 2
    err = _router_error(capsys)
    assert "in use by another job" in err
    assert main(_small_run(tmp_path)) == 0


@pytest.mark.slow  # subprocesses (~15 s of CPU on 2 cores)
def test_sigkill_at_random_moments_then_resume_gives_the_same_tree(tmp_path):
    """Killed (SIGKILL) inside Lloyd steps, the split and resampling, at random moments;
    each rerun resumes from the checkpoints inside the step; the final tree equals an
    uninterrupted run's."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from fastssl.curation import HierarchicalTree

    x, _, _ = long_tailed_mixture(3000, 8, 30, seed=2)
    np.save(tmp_path / "x.npy", x)

    def command(out):
        return [sys.executable, "-m", "fastssl", "curate", "--data", str(tmp_path / "x.npy"),
                "--out", str(out), "--levels", "40,8,3", "--split-k", "3", "--iterations", "12",
                "--split-inits", "3", "--resampling-steps", "3", "--checkpoint-every", "1",
                "--memory-budget-mb", "0.02", "--target-size", "0", "--quiet"]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert main(command(tmp_path / "ref")[3:]) == 0  # uninterrupted, in this process
    rng = np.random.default_rng(7)
    progress = tmp_path / "run" / "tree" / "progress.json"
    kills = 0
    for _ in range(3):
        proc = subprocess.Popen(command(tmp_path / "run"), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not progress.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(float(rng.uniform(0.0, 1.0)))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 1
    assert subprocess.run(command(tmp_path / "run"), env=env, capture_output=True).returncode == 0
    ref = HierarchicalTree.load(tmp_path / "ref" / "tree")
    got = HierarchicalTree.load(tmp_path / "run" / "tree")
    for a, b in zip(ref.levels, got.levels):
        for name in ("centroids", "assignments", "members"):
            np.testing.assert_array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)))


# ---------------------------------------------------------------- plots, labels by path
def test_size_histogram_counts_every_cluster(rng):
    """12.3: the largest cluster used to fall outside the last (rounded) edge."""
    from fastssl.curation.report import size_histogram

    for sizes in (np.array([1, 5, 100]), np.array([0, 3, 999]), rng.integers(1, 10**6, 200),
                  np.array([7])):
        counts, edges = size_histogram(sizes)
        assert counts.sum() == sizes.size and edges[-1] > sizes.max()


def test_plots_and_balance_against_full_and_random(tmp_path, rng):
    pytest.importorskip("matplotlib")
    from fastssl.curation import hierarchical_kmeans, hierarchical_sample
    from fastssl.curation.report import cluster_shares, write_plots

    x, comp, _ = long_tailed_mixture(3000, 8, 30, seed=4)
    tree = hierarchical_kmeans(x, [40, 6], iterations=4, resampling_steps=1, progress=False)
    picked = hierarchical_sample(tree, 300, seed=0)
    shares = cluster_shares(tree, 1, picked)
    for name in ("all", "curated", "random"):
        assert shares[name].shape == (40,) and shares[name].sum() == pytest.approx(1.0)
    full = np.bincount(tree.point_assignments(1), minlength=40)
    np.testing.assert_allclose(shares["all"], np.sort(full)[::-1] / 3000)
    assert shares["curated"].std() < shares["random"].std()  # the sample is flatter
    files = write_plots(tree, tmp_path / "plots", picked)
    assert sorted(p.rsplit("/", 1)[1] for p in files) == [
        "level_1_balance.png", "level_1_sizes.png", "level_2_balance.png", "level_2_sizes.png"]
    assert all((tmp_path / "plots" / p.rsplit("/", 1)[1]).stat().st_size > 1000 for p in files)


def test_labels_matched_by_tile_path_not_row_order(tmp_path, capsys):
    """12.8: a labels CSV in any order gives the report of the labels in index.csv order."""
    import csv

    from fastssl.train.curate import load_labels

    emb = tmp_path / "emb"
    emb.mkdir()
    x, comp, _ = long_tailed_mixture(500, 6, 8, seed=5)
    np.save(emb / "emb_00000.npy", x.astype(np.float16))
    sources = [f"slides/s{i % 7}/tile_{i:04d}.png" for i in range(500)]
    with open(emb / "index.csv", "w", newline="") as handle:
        w = csv.writer(handle)
        w.writerow(["row", "shard", "offset", "source"])
        w.writerows([i, "emb_00000.npy", i, s] for i, s in enumerate(sources))
    (emb / "manifest.json").write_text(json.dumps({"shards": [{"file": "emb_00000.npy"}]}))
    order = np.random.default_rng(0).permutation(500)  # the user's file order
    with open(tmp_path / "labels.csv", "w", newline="") as handle:
        w = csv.writer(handle)
        w.writerow(["source", "label"])
        w.writerows([sources[i], f"tissue_{comp[i]}"] for i in order)
    got = load_labels(str(tmp_path / "labels.csv"), [str(emb)], 500)
    _, want = np.unique([f"tissue_{c}" for c in comp], return_inverse=True)
    np.testing.assert_array_equal(got, want)
    common = ["curate", "--data", str(emb), "--levels", "10,3", "--iterations", "3", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "a"), "--labels",
                 str(tmp_path / "labels.csv")]) == 0
    np.save(tmp_path / "labels.npy", comp.astype(np.int64))
    assert main([*common, "--out", str(tmp_path / "b"), "--labels",
                 str(tmp_path / "labels.npy")]) == 0
    ra = json.loads((tmp_path / "a" / "report.json").read_text())["ground_truth"]
    rb = json.loads((tmp_path / "b" / "report.json").read_text())["ground_truth"]
    assert ra == rb
    rows = (tmp_path / "labels.csv").read_text().splitlines()
    (tmp_path / "short.csv").write_text("\n".join(rows[:-1]) + "\n")  # one tile unlabelled
    assert main([*common, "--out", str(tmp_path / "a"), "--labels",
                 str(tmp_path / "short.csv")]) == 2
    err = _router_error(capsys)
    assert "1 of 500 tiles" in err


def _embed_dir_with_tile_index(tmp_path, n=400, with_tiles=True):
    """A hand-written embed output: two shards, index.csv (row,shard,offset,source), and a
    manifest naming a tiles.csv listed in another order than the rows."""
    import csv

    emb = tmp_path / "emb"
    emb.mkdir()
    x, _, _ = long_tailed_mixture(n, 6, 8, seed=9)
    half = n // 2
    np.save(emb / "emb_r00000_00000.npy", x[:half].astype(np.float16))
    np.save(emb / "emb_r00000_00001.npy", x[half:].astype(np.float16))
    sources = [f"s{i % 5}/tile,{i:04d}" for i in range(n)]  # a comma: CSV quoting matters
    with open(emb / "index.csv", "w", newline="") as handle:
        w = csv.writer(handle)
        w.writerow(["row", "shard", "offset", "source"])
        w.writerows([i, f"emb_r00000_0000{i // half}.npy", i % half, s]
                    for i, s in enumerate(sources))
    tiles = {s: (f"slide_{i % 5}", str(i % 3), str(224 * i), str(7 * i + 1), "224",
                 f"{0.25 * (1 + i % 2):g}") for i, s in enumerate(sources)}
    manifest = {"shards": [{"file": "emb_r00000_00000.npy"}, {"file": "emb_r00000_00001.npy"}]}
    if with_tiles:
        with open(tmp_path / "tiles.csv", "w", newline="") as handle:
            w = csv.writer(handle)
            w.writerow(["tile", "slide", "level", "x", "y", "size", "mpp"])
            w.writerows([s, *tiles[s]] for s in reversed(sources))
        manifest["tile_index"] = str(tmp_path / "tiles.csv")
    (emb / "manifest.json").write_text(json.dumps(manifest))
    return emb, sources, tiles


@pytest.mark.parametrize("with_tiles", [True, False])
def test_curated_tiles_table(tmp_path, with_tiles):
    """21 §3: curated_tiles.csv holds every curated row with its index.csv source, its
    tile-index fields (joined on tile == source; empty without a tile index) and its
    cluster at every level, compared with the tree's own full point_assignments."""
    import csv

    from fastssl.curation import HierarchicalTree

    emb, sources, tiles = _embed_dir_with_tile_index(tmp_path, with_tiles=with_tiles)
    out = tmp_path / "out"
    assert main(["curate", "--data", str(emb), "--out", str(out), "--levels", "24,6,2",
                 "--iterations", "3", "--resampling-steps", "1", "--target-size", "90",
                 "--quiet"]) == 0
    with open(out / "curated_tiles.csv", newline="") as handle:
        table = list(csv.reader(handle))
    assert table[0] == ["row", "source", "slide", "level", "x", "y", "size", "mpp",
                        "cluster_1", "cluster_2", "cluster_3"]
    rows = np.load(out / "curated_indices.npy")
    assert [int(line[0]) for line in table[1:]] == rows.tolist() and rows.size == 90
    tree = HierarchicalTree.load(out / "tree")
    for line in table[1:]:
        r = int(line[0])
        assert line[1] == sources[r]
        assert tuple(line[2:8]) == (tiles[sources[r]] if with_tiles else ("",) * 6)
        assert [int(c) for c in line[8:]] == [int(tree.point_assignments(lv)[r])
                                              for lv in (1, 2, 3)]


def test_curated_tiles_table_bad_tile_index(tmp_path, capsys):
    """A tile index without a curated tile, or with another header: one line naming it."""
    emb, _, _ = _embed_dir_with_tile_index(tmp_path, n=200)
    lines = (tmp_path / "tiles.csv").read_text().splitlines()
    (tmp_path / "tiles.csv").write_text("\n".join(lines[:-40]) + "\n")
    common = ["curate", "--data", str(emb), "--levels", "8,2", "--iterations", "2",
              "--resampling-steps", "1", "--target-size", "100", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 2
    err = _router_error(capsys)
    assert "tiles.csv: " in err and "curated tiles are not in the tile index" in err
    (tmp_path / "tiles.csv").write_text("tile,slide,x,y\n")
    assert main([*common, "--out", str(tmp_path / "a")]) == 2
    err = _router_error(capsys)
    assert "expected 'tile,slide,level,x,y,size,mpp'" in err


def test_one_resume_record_each_shard_hashed_once(tmp_path, monkeypatch):
    """job.json is the job's one resume record: tree/progress.json lists the finished steps
    only, and tree.json's data fingerprint takes job.json's shard hashes (no second read of
    the shards); both name the same sampled sha256, computed here by hand."""
    import hashlib

    from fastssl import jobs

    argv = _small_run(tmp_path)
    shard = tmp_path / "emb" / "x.npy"
    hashed = []
    real = jobs._hash_file
    monkeypatch.setattr(jobs, "_hash_file", lambda path, size, full: hashed.append(path) or real(path, size, full))
    assert main(argv) == 0
    assert hashed == [str(shard)]
    want = hashlib.sha256(shard.read_bytes()).hexdigest()  # 400 x 6 float32: hashed whole
    saved = json.loads((tmp_path / "out" / "job.json").read_text())["inputs"][str(shard)]["sha256"]
    progress = json.loads((tmp_path / "out" / "tree" / "progress.json").read_text())
    assert sorted(progress) == ["complete", "done"] and progress["complete"]
    tree_data = json.loads((tmp_path / "out" / "tree" / "tree.json").read_text())["meta"]["data"]
    assert saved == want and tree_data["parts"] == [[str(shard), 400, "float32", want]]
