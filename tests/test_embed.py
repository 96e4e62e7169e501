"""fastssl embed: shard shapes and dtypes, index, rejects, resume, array sources, CLI.

A tiny timm model ("test_vit" at 32x32, random init or a saved state_dict) on CPU."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
from PIL import Image  # noqa: E402

from fastssl.curation.embed import EmbedConfig, build_model, embed_images  # noqa: E402
from fastssl.errors import DataError, OutputLocked, ResumeMismatch  # noqa: E402

MODEL = "test_vit"
SIZE = 32


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def tiles(tmp_path, rng):
    """9 good tiles (grey / RGB PNG, JPG, grey and RGB .npy; some not 32x32) + 1 corrupt PNG."""
    root = tmp_path / "tiles"
    (root / "sub").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / f"rgb_{i}.png")
    Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(root / "sub" / "grey.png")
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / "sub" / "a.jpg")
    np.save(root / "sub" / "t0.npy", rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8))
    np.save(root / "sub" / "t1.npy", rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)).save(root / "z.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "notes.txt").write_text("ignored")
    return root


@pytest.fixture
def weights(tmp_path):
    torch.manual_seed(0)
    net = timm.create_model(MODEL, pretrained=False, num_classes=0, img_size=SIZE)
    path = tmp_path / "w.pth"
    torch.save(net.state_dict(), path)
    return path


def config(weights, **kw):
    base = dict(model=MODEL, weights=str(weights), img_size=SIZE, batch_size=3, shard_size=4,
                workers=0, quiet=True, device="cpu")
    return EmbedConfig(**{**base, **kw})


def test_shards_index_rejects_and_manifest(tiles, weights, tmp_path):
    out = tmp_path / "emb"
    manifest = embed_images(tiles, out, config(weights))
    # 10 images -> shards of 4, 4, 2 items; broken.png (item 0 in sorted order) rejected.
    assert manifest["count"] == 9 and manifest["rejected"] == 1 and manifest["dim"] == 64
    assert [s["rows"] for s in manifest["shards"]] == [3, 4, 2]
    shards = [np.load(out / s["file"]) for s in manifest["shards"]]
    for s in shards:
        assert s.dtype == np.float16 and s.ndim == 2 and s.shape[1] == 64
        assert np.isfinite(s).all()
    index = read_csv(out / "index.csv")
    assert [int(r["row"]) for r in index] == list(range(9))
    sources = [r["source"] for r in index]
    assert "broken.png" not in sources and "notes.txt" not in sources
    assert sources == sorted(sources)
    rejects = read_csv(out / "rejects.csv")
    assert [r["source"] for r in rejects] == ["broken.png"] and rejects[0]["reason"]
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["count"] == 9 and on_disk["model"] == MODEL

    # A row equals the model's own output for that tile (fp16 storage tolerance).
    row = next(r for r in index if r["source"] == "rgb_0.png")
    stored = np.load(out / row["shard"])[int(row["offset"])].astype(np.float32)
    net = build_model(MODEL, str(weights), False, SIZE, 3)
    pixels = np.asarray(Image.open(tiles / "rgb_0.png"), dtype=np.float32) / 255.0
    x = (torch.from_numpy(pixels).permute(2, 0, 1) - 0.5) / 0.5
    with torch.no_grad():
        want = net(x[None])[0].numpy()
    np.testing.assert_allclose(stored, want, rtol=1e-2, atol=1e-2)


def test_resume_skips_finished_shards(tiles, weights, tmp_path):
    out = tmp_path / "emb"
    embed_images(tiles, out, config(weights))
    first = {p.name: (p.stat().st_mtime_ns, np.load(p)) for p in out.glob("emb_*.npy")}
    (out / "emb_00001.npy").unlink()  # as if the job died while writing shard 1
    manifest = embed_images(tiles, out, config(weights, workers=1))
    again = {p.name: (p.stat().st_mtime_ns, np.load(p)) for p in out.glob("emb_*.npy")}
    assert set(again) == set(first)
    assert again["emb_00000.npy"][0] == first["emb_00000.npy"][0]  # untouched
    assert again["emb_00002.npy"][0] == first["emb_00002.npy"][0]
    for name in first:
        np.testing.assert_array_equal(again[name][1], first[name][1])
    assert manifest["count"] == 9 and len(read_csv(out / "index.csv")) == 9


def test_resume_keeps_job_json_and_removes_stale_tmp(tiles, weights, tmp_path):
    out = tmp_path / "emb"
    embed_images(tiles, out, config(weights))
    saved = (out / "job.json").read_text()
    job = json.loads(saved)
    assert job["job"] == "embed" and job["settings"]["img_size"] == SIZE
    assert job["settings"]["tiles"] == 10 and "batch_size" not in job["settings"]
    (out / "emb_00001.npy").unlink()
    dead = 2**22 + 12345  # above Linux's default pid_max: no live process has it
    stale = [out / f".emb_00001.npy.tmp-{dead}", out / "parts" / f".index_00001.csv.tmp-{dead}"]
    for path in stale:
        path.write_bytes(b"torn")
    # another batch size and worker count: the same run, so it resumes
    assert embed_images(tiles, out, config(weights, batch_size=5, workers=1))["count"] == 9
    assert (out / "job.json").read_text() == saved
    assert not any(path.exists() for path in stale)


def test_changed_settings_refuse_to_resume_naming_them(tiles, weights, tmp_path):
    out = tmp_path / "emb"
    embed_images(tiles, out, config(weights))
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ResumeMismatch, match=r"shard_size: 4 -> 5.*--overwrite"):
        embed_images(tiles, out, config(weights, shard_size=5))
    torch.manual_seed(1)  # other weights in the same file
    other = timm.create_model(MODEL, pretrained=False, num_classes=0, img_size=SIZE)
    torch.save(other.state_dict(), tmp_path / "w2.pth")
    with pytest.raises(ResumeMismatch, match=r"w2\.pth: new"):
        embed_images(tiles, out, config(tmp_path / "w2.pth"))
    assert sorted(p.name for p in out.iterdir()) == before  # nothing removed


def test_changed_tile_set_refuses_to_resume(tiles, weights, tmp_path):
    out = tmp_path / "emb"
    embed_images(tiles, out, config(weights))
    np.save(tiles / "sub" / "extra.npy", np.zeros((SIZE, SIZE), np.uint8))
    with pytest.raises(ResumeMismatch, match="tiles: 10 -> 11"):
        embed_images(tiles, out, config(weights))
    (tiles / "sub" / "extra.npy").unlink()
    np.save(tiles / "sub" / "t0.npy", np.zeros((SIZE + 1, SIZE), np.uint8))  # same names, other size
    with pytest.raises(ResumeMismatch, match="tiles: size"):
        embed_images(tiles, out, config(weights))
    np.save(tiles / "sub" / "t0.npy", np.zeros((SIZE, SIZE), np.uint8))  # back to the old size
    embed_images(tiles, out, config(weights))  # tile bytes are not hashed by default: resumes
    a, b = (tiles / "sub" / "t0.npy").read_bytes(), (tiles / "sub" / "t1.npy").read_bytes()
    assert len(a) != len(b)
    (tiles / "sub" / "t0.npy").write_bytes(b)  # same names, count and total size; sizes swapped
    (tiles / "sub" / "t1.npy").write_bytes(a)
    with pytest.raises(ResumeMismatch, match="tiles: content changed"):
        embed_images(tiles, out, config(weights))
    (tiles / "sub" / "renamed.npy").write_bytes((tiles / "sub" / "t1.npy").read_bytes())
    (tiles / "sub" / "t1.npy").unlink()
    with pytest.raises(ResumeMismatch, match="tiles: content changed"):
        embed_images(tiles, out, config(weights))


def test_overwrite_replaces_another_run(tiles, weights, tmp_path):
    out = tmp_path / "emb"
    embed_images(tiles, out, config(weights))
    assert (out / "emb_00002.npy").exists()
    manifest = embed_images(tiles, out, config(weights, shard_size=5, overwrite=True))
    assert json.loads((out / "job.json").read_text())["settings"]["shard_size"] == 5
    assert sorted(p.name for p in out.glob("emb_*.npy")) == ["emb_00000.npy", "emb_00001.npy"]
    assert sorted(p.name for p in (out / "parts").iterdir()) == [
        "index_00000.csv", "index_00001.csv", "rejects_00000.csv", "rejects_00001.csv"]
    assert [s["rows"] for s in manifest["shards"]] == [4, 5]


def test_second_job_into_the_same_out_fails_at_once(tiles, weights, tmp_path):
    from fastssl import jobs

    out = tmp_path / "emb"
    with jobs.OutputLock(out):  # another job holds out
        with pytest.raises(OutputLocked, match="in use by another job"):
            embed_images(tiles, out, config(weights))
    assert sorted(p.name for p in out.iterdir()) == [jobs.LOCK_NAME]  # it wrote nothing


def test_ranks_follow_rank0_verdict(tiles, weights, tmp_path, monkeypatch):
    """Rank 0 refuses -> it tells the others (which write nothing) before raising."""
    from fastssl import jobs
    from fastssl.curation import embed as embed_mod

    out = tmp_path / "emb"
    embed_images(tiles, out, config(weights))
    told = []
    monkeypatch.setattr(jobs, "_share_verdict", lambda verdict, rank, world: told.append(verdict) or verdict)
    with pytest.raises(ResumeMismatch):
        embed_images(tiles, out, config(weights, shard_size=5))
    assert len(told) == 1 and told[0].startswith("refused: ResumeMismatch") and "shard_size" in told[0]
    monkeypatch.setattr(jobs, "_share_verdict", lambda verdict, rank, world: "refused: ResumeMismatch: why")
    monkeypatch.setattr(embed_mod, "_rank_world", lambda: (1, 2))
    with pytest.raises(ValueError, match=r"rank 0 refused this run \(ResumeMismatch: why\)"):
        embed_images(tiles, tmp_path / "other", config(weights))
    assert not (tmp_path / "other").exists()


def test_array_file_source_random_init(tmp_path, rng):
    arr = rng.integers(0, 256, (7, 20, 20), dtype=np.uint8)
    np.save(tmp_path / "tiles.npy", arr)
    manifest = embed_images(tmp_path / "tiles.npy", tmp_path / "emb", model=MODEL, random_init=True,
                            img_size=SIZE, batch_size=4, shard_size=100, workers=0, quiet=True)
    assert manifest["count"] == 7 and len(manifest["shards"]) == 1
    emb = np.load(tmp_path / "emb" / "emb_00000.npy")
    assert emb.shape == (7, 64) and emb.dtype == np.float16
    assert read_csv(tmp_path / "emb" / "index.csv")[3]["source"] == "tiles.npy[3]"


def _all_rows(out, manifest):
    return np.concatenate([np.load(out / s["file"]) for s in manifest["shards"]]).astype(np.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("precision, tol", [("fp32", 2e-3), ("bf16", 0.05)])
def test_cuda_matches_cpu(tiles, weights, tmp_path, precision, tol):
    # The CUDA path (channels_last; TF32 off for fp32, bf16 autocast) against the fp32 CPU path:
    # fp32 within fp16 storage rounding, bf16 within bf16's.
    cpu = embed_images(tiles, tmp_path / "cpu", config(weights))
    gpu = embed_images(tiles, tmp_path / "gpu", config(weights, device="cuda", precision=precision))
    assert gpu["count"] == cpu["count"] == 9 and gpu["precision"] == precision
    a, b = _all_rows(tmp_path / "gpu", gpu), _all_rows(tmp_path / "cpu", cpu)
    rel = np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)
    assert rel.max() < tol, rel


def test_bad_inputs(tmp_path, weights):
    with pytest.raises(ValueError, match="random-init"):
        embed_images(tmp_path, tmp_path / "o", model=MODEL, img_size=SIZE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image tiles"):
        embed_images(tmp_path / "empty", tmp_path / "o", config(weights))
    np.save(tmp_path / "flat.npy", np.zeros(5, np.uint8))
    with pytest.raises(DataError, match="shape"):
        embed_images(tmp_path / "flat.npy", tmp_path / "o", config(weights))
    (tmp_path / "bad.pth").write_bytes(b"junk")
    with pytest.raises(DataError, match="bad.pth"):
        build_model(MODEL, str(tmp_path / "bad.pth"), False, SIZE, 3)
    with pytest.raises(ValueError, match="batch_size"):
        embed_images(tmp_path / "flat.npy", tmp_path / "o", config(weights, batch_size=0))


def test_cli(tiles, tmp_path):
    from fastssl.cli import main

    out = tmp_path / "cli"
    rc = main(["embed", str(tiles), "--out", str(out), "--model", MODEL, "--random-init",
               "--img-size", str(SIZE), "--workers", "0", "--shard-size", "8", "--quiet"])
    assert rc == 0
    assert json.loads((out / "manifest.json").read_text())["count"] == 9
    assert sorted(p.name for p in out.glob("emb_*.npy")) == ["emb_00000.npy", "emb_00001.npy"]
    other = ["embed", str(tiles), "--out", str(out), "--model", MODEL, "--random-init",
             "--img-size", str(SIZE), "--workers", "0", "--shard-size", "16", "--quiet"]
    assert main(other) == 2  # another shard size: refused
    assert main(other + ["--overwrite", "--verify-data"]) == 0
    job = json.loads((out / "job.json").read_text())
    assert job["settings"]["shard_size"] == 16
    assert job["inputs"][str(tiles.resolve())]["hashed"] == "full"


def _rank_main(rank, world, init_file, tiles, weights, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        embed_images(tiles, out, config(weights))
    finally:
        dist.destroy_process_group()


def test_two_ranks_write_rank_suffixed_shards(tiles, weights, tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "dist"
    mp.spawn(_rank_main, args=(2, str(tmp_path / "rdzv"), str(tiles), str(weights), str(out)),
             nprocs=2, join=True)
    manifest = json.loads((out / "manifest.json").read_text())
    # 10 items -> rank 0 items 0-4 (shards of 4 + 1), rank 1 items 5-9.
    assert [s["file"] for s in manifest["shards"]] == [
        "emb_r00000_00000.npy", "emb_r00000_00001.npy", "emb_r00001_00000.npy",
        "emb_r00001_00001.npy"]
    assert manifest["count"] == 9 and manifest["rejected"] == 1
    # Same rows as a single-process run, in the same order.
    single = embed_images(tiles, tmp_path / "one", config(weights))
    a = np.concatenate([np.load(out / s["file"]) for s in manifest["shards"]])
    b = np.concatenate([np.load(tmp_path / "one" / s["file"]) for s in single["shards"]])
    # Batches differ between the runs; BLAS may round differently per batch shape.
    np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=1e-2, atol=1e-2)
    assert [r["source"] for r in read_csv(out / "index.csv")] == \
        [r["source"] for r in read_csv(tmp_path / "one" / "index.csv")]


def test_twelve_ranks_curated_indices_map_to_their_tiles(tmp_path, rng, monkeypatch, weights):
    """12 simulated ranks (names r00000..r00011, which sort like the ranks); curation reads
    the shards in the manifest's order, so every row it numbers is the tile index.csv
    gives for that row. With unpadded names sorted, r10/r11 came before r2."""
    from fastssl.curation import embed as embed_mod
    from fastssl.curation._source import PointSource
    from fastssl.train import curate

    arr = rng.integers(0, 256, (30, 20, 20), dtype=np.uint8)
    np.save(tmp_path / "tiles.npy", arr)
    out = tmp_path / "emb"
    monkeypatch.setattr(embed_mod, "_barrier", lambda: None)
    # rank 0 locks and fingerprints first (the others wait for it), and merges last
    merge = embed_mod._merge
    monkeypatch.setattr(embed_mod, "_merge", lambda *a: {"count": 0, "rejected": 0})
    for rank in list(range(12)) + [0]:
        if rank == 11:
            monkeypatch.setattr(embed_mod, "_merge", merge)
        monkeypatch.setattr(embed_mod, "_rank_world", lambda r=rank: (r, 12))
        embed_images(tmp_path / "tiles.npy", out, config(weights, batch_size=8, shard_size=2))
    index = read_csv(out / "index.csv")
    assert [r["source"] for r in index] == [f"tiles.npy[{i}]" for i in range(30)]
    src = PointSource.from_data(str(out))
    rows = src.take(np.arange(30))
    for i, entry in enumerate(index):  # row i of curation = the shard row index.csv names
        np.testing.assert_array_equal(rows[i], np.load(out / entry["shard"])[int(entry["offset"])])
    # the embedding of tile i is itself: row i equals a one-process embedding of tile i
    monkeypatch.setattr(embed_mod, "_rank_world", lambda: (0, 1))
    single = embed_images(tmp_path / "tiles.npy", tmp_path / "one",
                          config(weights, batch_size=8, shard_size=100))
    ref = np.load(tmp_path / "one" / single["shards"][0]["file"]).astype(np.float32)
    np.testing.assert_allclose(rows.astype(np.float32), ref, rtol=1e-2, atol=1e-2)
    # and the curate job's indices point at those rows
    args = curate_args(tmp_path, str(out))
    assert curate.run(args) == 0
    picked = np.load(tmp_path / "cur" / "curated_indices.npy")
    assert picked.size == 6 and np.unique(picked).size == 6
    np.testing.assert_allclose(src.take(picked).astype(np.float32), ref[picked], rtol=1e-2,
                               atol=1e-2)


def curate_args(tmp_path, data):
    import argparse

    from fastssl.train import curate

    parser = argparse.ArgumentParser()
    curate.add_arguments(parser)
    return parser.parse_args(["--data", data, "--out", str(tmp_path / "cur"), "--levels", "4,2",
                              "--iterations", "3", "--target-size", "6"])


# --------------------------------------------------------------------------- UNI-style checkpoints
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
UNI_ARGS = {"img_size": SIZE, "init_values": 1e-5, "dynamic_img_size": True}  # UNI's get_encoder options


@pytest.fixture
def uni_like(tmp_path):
    """UNI's stand-in: a tiny ViT with LayerScale saved in timm's local-dir format (config.json
    with architecture, model_args, pretrained_cfg + model.safetensors). Its gammas are set far
    from 1 (a trained model's are), so dropping LayerScale changes the features."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    net = timm.create_model(MODEL, pretrained=False, num_classes=0, **UNI_ARGS)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.endswith(".gamma"):
                param.uniform_(0.05, 0.3)
    folder = tmp_path / "uni_like"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))
    cfg = {"architecture": MODEL, "num_classes": 0, "model_args": UNI_ARGS,
           "pretrained_cfg": {"input_size": [3, SIZE, SIZE], "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                              "num_classes": 0, "interpolation": "bicubic", "crop_pct": 1.0}}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture
def rgb_tiles(tmp_path, rng):
    root = tmp_path / "rgb"
    root.mkdir()
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / f"t{i}.png")
    return root


def plain_timm_features(folder, tile_paths):
    """The model's own features, written out independently of fastssl: timm.create_model with
    UNI's options, load_state_dict(strict=True), ImageNet normalisation in float64, fp32 forward."""
    from safetensors.torch import load_file

    net = timm.create_model(MODEL, pretrained=False, num_classes=0, **UNI_ARGS)
    net.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB"), np.float64) / 255.0 for p in tile_paths])
    x = (pixels - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    with torch.no_grad():
        return net.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2)).float()).numpy()


def test_local_dir_checkpoint_gives_the_models_own_features(uni_like, rgb_tiles, tmp_path):
    manifest = embed_images(rgb_tiles, tmp_path / "emb", model=f"local-dir:{uni_like}", img_size=None,
                            batch_size=2, shard_size=3, workers=0, quiet=True, device="cpu")
    rows = read_csv(tmp_path / "emb" / "index.csv")
    expected = plain_timm_features(uni_like, [rgb_tiles / r["source"] for r in rows])
    got = _all_rows(tmp_path / "emb", manifest)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-3 * scale)  # fp16 storage rounding
    assert manifest["mean"] == list(IMAGENET_MEAN) and manifest["std"] == list(IMAGENET_STD)
    assert manifest["precision"] == "fp32" and manifest["weights"] == str(uni_like / "model.safetensors")
    job = json.loads((tmp_path / "emb" / "job.json").read_text())
    assert job["settings"]["precision"] == "fp32"
    assert str((uni_like / "config.json").resolve()) in job["inputs"]
    # bf16 is a switch: recorded, close to fp32 but not equal to it
    bf16 = embed_images(rgb_tiles, tmp_path / "bf16", model=f"local-dir:{uni_like}", precision="bf16",
                        batch_size=2, workers=0, quiet=True, device="cpu")
    rel = np.linalg.norm(_all_rows(tmp_path / "bf16", bf16) - expected, axis=1) / np.linalg.norm(expected, axis=1)
    assert bf16["precision"] == "bf16" and 1e-4 < rel.max() < 0.05, rel


def test_strict_loading_names_missing_and_unexpected_keys(uni_like, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(uni_like / "model.safetensors"))
    # UNI's weights under the plain timm name (no LayerScale): its gammas are unexpected
    with pytest.raises(DataError, match=r"unexpected keys blocks\.0\.ls1\.gamma"):
        build_model(MODEL, str(uni_like / "model.safetensors"), False, SIZE, 3)
    missing = {k: v for k, v in state.items() if k != "blocks.1.ls2.gamma"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(DataError, match=r"missing\.safetensors.*missing keys blocks\.1\.ls2\.gamma$"):
        build_model(f"local-dir:{uni_like}", str(tmp_path / "missing.safetensors"), False, None, 3)
    save_file({**state, "extra.weight": torch.ones(2)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(DataError, match=r"unexpected keys extra\.weight$"):
        build_model(f"local-dir:{uni_like}", str(tmp_path / "extra.safetensors"), False, None, 3)
    # a classifier head is the one thing dropped: features are taken before it
    head = {**state, "head.weight": torch.ones(4, 64), "head.bias": torch.zeros(4)}
    save_file(head, str(tmp_path / "head.safetensors"))
    net = build_model(f"local-dir:{uni_like}", str(tmp_path / "head.safetensors"), False, None, 3)
    assert torch.equal(net.blocks[1].ls2.gamma, state["blocks.1.ls2.gamma"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((uni_like / "config.json").read_text())
    with pytest.raises(DataError, match="no weights file"):
        build_model(f"local-dir:{tmp_path / 'empty'}", None, False, None, 3)


def test_virchow_style_mlp_layer_named_in_config_json(tmp_path, rgb_tiles):
    """config.json cannot hold a class: "mlp_layer": "SwiGLUPacked" (Virchow's MLP) is taken
    from timm.layers; the features equal a plain timm model built with the class itself."""
    from safetensors.torch import save_file

    args = {"img_size": SIZE, "init_values": 1e-5, "act_layer": "silu", "mlp_ratio": 4.0}
    torch.manual_seed(2)
    net = timm.create_model(MODEL, pretrained=False, num_classes=0, mlp_layer=timm.layers.SwiGLUPacked, **args)
    folder = tmp_path / "virchow_like"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architecture": MODEL, "num_classes": 0, "model_args": {**args, "mlp_layer": "SwiGLUPacked"},
        "pretrained_cfg": {"input_size": [3, SIZE, SIZE], "mean": IMAGENET_MEAN, "std": IMAGENET_STD}}))
    built = build_model(f"local-dir:{folder}", None, False, None, 3)
    assert isinstance(built.blocks[0].mlp, timm.layers.GluMlp)
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(built(x), net.eval()(x), rtol=1e-5, atol=1e-5)
    (folder / "config.json").write_text(json.dumps({"architecture": MODEL, "model_args": {"mlp_layer": "Nope"}}))
    with pytest.raises(DataError, match="mlp_layer 'Nope'"):
        build_model(f"local-dir:{folder}", None, False, None, 3)
