"""fastssl tile: a synthetic pyramidal TIFF with known tissue rectangles -> tiles.csv whose
coordinates are the grid cells computed by hand, pixels equal to direct crops of the written
levels, rejects, per-slide resume, the CLI; and fastssl embed reading the tile index."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

pytest.importorskip("tiffslide")
from PIL import Image  # noqa: E402

from fastssl.curation import tile as tile_mod  # noqa: E402
from slide_factory import pyramid, slide_pixels, write_slide  # noqa: E402

MPP0, W, H = 0.25, 1024, 768
# Level-0 rectangles: A covers grid cells i = 2..6, j = 3..5 of the 64-px grid (tiles of 32 px at
# 0.5 µm/px = 64 level-0 px); B covers 75% of cell (10, 1); C covers 25% of cell (12, 1).
RECTS = [(128, 192, 448, 384), (640, 64, 688, 128), (768, 64, 784, 128)]
EXPECTED = [(640, 64)] + [(64 * i, 64 * j) for j in range(3, 6) for i in range(2, 7)]
SETTINGS = dict(mpp=0.5, size=32, thumbnail_size=256, quiet=True)


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def slides(tmp_path, rng):
    """s1.tif (the rectangles, 3 levels), sub/blank.tif (no tissue), bad.svs (not a TIFF),
    nompp.tif (no resolution tags); returns (folder, the levels of s1)."""
    root = tmp_path / "slides"
    (root / "sub").mkdir(parents=True)
    levels = pyramid(slide_pixels(W, H, RECTS, rng), 3)
    write_slide(root / "s1.tif", levels, MPP0)
    write_slide(root / "sub" / "blank.tif", pyramid(slide_pixels(256, 256, [], rng), 2), MPP0)
    write_slide(root / "nompp.tif", pyramid(slide_pixels(256, 256, RECTS[:1], rng), 2), None)
    (root / "bad.svs").write_bytes(b"II*\x00 this is not a slide")
    return root, levels


def test_tiles_follow_the_tissue_geometry_and_crop_the_level(slides, tmp_path):
    root, levels = slides
    summary = tile_mod.tile_slides(root, tmp_path / "t", **SETTINGS)
    rows = read_csv(tmp_path / "t" / "tiles.csv")
    assert list(rows[0]) == ["tile", "slide", "level", "x", "y", "size", "mpp"]
    assert [(int(r["x"]), int(r["y"])) for r in rows] == EXPECTED
    assert {r["slide"] for r in rows} == {"s1"} and {r["level"] for r in rows} == {"1"}
    assert rows[0]["tile"] == "s1/640_64" and {r["size"] for r in rows} == {"32"}
    assert {float(r["mpp"]) for r in rows} == {0.5}
    slides_csv = {r["slide"]: r for r in read_csv(tmp_path / "t" / "slides.csv")}
    assert sorted(slides_csv) == ["s1", "sub/blank"] and slides_csv["sub/blank"]["tiles"] == "0"
    s1 = slides_csv["s1"]
    assert (float(s1["mpp"]), int(s1["width"]), int(s1["height"]), int(s1["tiles"])) == (MPP0, W, H, 16)
    rejects = {r["slide"]: r["reason"] for r in read_csv(tmp_path / "t" / "rejects.csv")}
    assert sorted(rejects) == ["bad", "nompp"] and "microns-per-pixel" in rejects["nompp"]
    assert summary == {"slides": 2, "tiles": 16, "rejected": 2}
    # level 1 is 0.5 µm/px: a tile is the level-1 crop itself (corner / 2, side 32)
    slide = tile_mod.open_slide(root / "s1.tif")
    got = tile_mod.read_tile(slide, 1, 128, 192, 32, 0.5, MPP0)
    np.testing.assert_array_equal(got, levels[1][96:128, 64:96])


def test_coarser_target_reads_the_finer_level_and_resamples(slides, tmp_path):
    root, levels = slides
    tile_mod.tile_slides(root, tmp_path / "t", **{**SETTINGS, "mpp": 0.75})
    rows = read_csv(tmp_path / "t" / "tiles.csv")
    # 0.75 µm/px: level 1 (0.5) is the coarsest not coarser; the grid step is 96 level-0 px
    assert {r["level"] for r in rows if r["slide"] == "s1"} == {"1"}
    corners = {(int(r["x"]), int(r["y"])) for r in rows}
    # A spans x 128..448, y 192..384: columns [96, 192) and [384, 480) are 2/3 covered (>= 0.5),
    # [192, 288) and [288, 384) fully; rows [192, 288) and [288, 384) fully. B and C cover <= 1/9.
    assert corners == {(x, y) for x in (96, 192, 288, 384) for y in (192, 288)}
    slide = tile_mod.open_slide(root / "s1.tif")
    got = tile_mod.read_tile(slide, 1, 192, 192, 32, 0.75, MPP0)
    crop = levels[1][96:144, 96:144]  # 48 level-1 px = 36 µm = 32 px at 0.75
    want = np.asarray(Image.fromarray(crop).resize((32, 32), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(got, want)
    assert abs(got.astype(np.float64).mean() - crop.astype(np.float64).mean()) < 1.0


def test_otsu_threshold_matches_brute_force(rng):
    values = np.concatenate([rng.normal(0.1, 0.03, 500), rng.normal(0.6, 0.1, 300)]).clip(0, 1)
    hist, edges = np.histogram(values, bins=256, range=(0, 1))
    best, best_t = -1.0, None
    for k in range(1, 256):  # split after bin k-1: between-class variance from the bins themselves
        lo, hi = values[values < edges[k]], values[values >= edges[k]]
        if lo.size and hi.size:
            centres = (edges[:-1] + edges[1:]) / 2
            m0 = (hist[:k] * centres[:k]).sum() / hist[:k].sum()
            m1 = (hist[k:] * centres[k:]).sum() / hist[k:].sum()
            score = hist[:k].sum() * hist[k:].sum() * (m0 - m1) ** 2
            if score > best:
                best, best_t = score, edges[k]
    assert tile_mod.otsu_threshold(values) == pytest.approx(best_t)


def test_a_killed_run_resumes_per_slide(slides, tmp_path, monkeypatch):
    root, _ = slides
    whole = tmp_path / "whole"
    tile_mod.tile_slides(root, whole, **SETTINGS)
    real, calls = tile_mod.tile_slide, []

    def dies_on_second(path, sid, cfg):
        calls.append(sid)
        if len(calls) == 3:  # bad, nompp, s1 (sorted): killed while tiling s1
            raise KeyboardInterrupt
        return real(path, sid, cfg)

    monkeypatch.setattr(tile_mod, "tile_slide", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        tile_mod.tile_slides(root, tmp_path / "t", **SETTINGS)
    monkeypatch.setattr(tile_mod, "tile_slide", lambda *a: (calls.append(a[1]), real(*a))[1])
    tile_mod.tile_slides(root, tmp_path / "t", **SETTINGS)
    # rejects are retried; the finished slides are not redone
    assert calls == ["bad", "nompp", "s1", "bad", "nompp", "s1", "sub/blank"]
    calls.clear()
    tile_mod.tile_slides(root, tmp_path / "t", **SETTINGS)
    assert calls == ["bad", "nompp"]
    for name in ("tiles.csv", "slides.csv", "rejects.csv"):
        assert (tmp_path / "t" / name).read_text() == (whole / name).read_text()


def test_cli_config_and_refused_settings(slides, tmp_path):
    from fastssl.cli import main

    root, _ = slides
    out = tmp_path / "t"
    (tmp_path / "c.yaml").write_text("mpp: 0.5\nsize: 32\nthumbnail_size: 256\nmin_tissue: 0.5\n")
    assert main(["tile", str(root), "--out", str(out), "--config", str(tmp_path / "c.yaml"), "--quiet"]) == 0
    assert [(int(r["x"]), int(r["y"])) for r in read_csv(out / "tiles.csv")] == EXPECTED
    assert json.loads((out / "job.json").read_text())["settings"]["size"] == 32
    assert main(["tile", str(root), "--out", str(out), "--size", "48", "--thumbnail-size", "256",
                 "--quiet"]) == 2  # another size into the same folder: refused
    assert main(["tile", str(root), "--out", str(out), "--min-tissue", "1.5", "--quiet"]) == 2


def test_embed_reads_the_tile_index(slides, tmp_path):
    """embed TILES: index.csv's source = tile names, manifest source/tile_index, and each row
    equals the embedding of the tile's direct crop saved as a PNG file."""
    timm = pytest.importorskip("timm")
    import torch

    from fastssl.curation.embed import embed_images

    root, levels = slides
    tile_mod.tile_slides(root, tmp_path / "t", **SETTINGS)
    torch.save(timm.create_model("test_vit", num_classes=0, img_size=32).state_dict(), tmp_path / "w.pth")
    kw = dict(model="test_vit", weights=str(tmp_path / "w.pth"), img_size=32, batch_size=5, shard_size=7, workers=0,
              quiet=True, device="cpu")
    manifest = embed_images(tmp_path / "t", tmp_path / "emb", **kw)
    index = read_csv(tmp_path / "emb" / "index.csv")
    names = [r["tile"] for r in read_csv(tmp_path / "t" / "tiles.csv")]
    assert [r["source"] for r in index] == names and manifest["count"] == 16
    assert manifest["tile_index"] == str((tmp_path / "t" / "tiles.csv").resolve())
    assert manifest["source"] == str((tmp_path / "t").resolve())
    crops = tmp_path / "crops"
    crops.mkdir()
    for k, (x, y) in enumerate(EXPECTED):
        Image.fromarray(levels[1][y // 2: y // 2 + 32, x // 2: x // 2 + 32]).save(crops / f"{k:02d}.png")
    ref = embed_images(crops, tmp_path / "ref", **kw)
    a = np.concatenate([np.load(tmp_path / "emb" / s["file"]) for s in manifest["shards"]])
    b = np.concatenate([np.load(tmp_path / "ref" / s["file"]) for s in ref["shards"]])
    np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=1e-2, atol=1e-2)
    assert ref["tile_index"] is None


def test_blank_slide_gives_no_tissue(slides):
    # Glass only: Otsu alone splits the noise (about half the pixels); the saturation floor
    # (0.05, twice the background's 0.025) keeps nearly all of them out.
    root, _ = slides
    slide = tile_mod.open_slide(root / "sub" / "blank.tif")
    mask, threshold = tile_mod.tissue_mask(slide, 256, 0.05)
    assert threshold >= 0.05 and mask.mean() < 0.05
    assert tile_mod.tile_grid(mask, 256, 256, 64, 0.5) == []


def test_level_choice_by_hand():
    # levels at 0.2527 / 0.5054 / 1.0108 µm/px (a "40x" scanner)
    assert tile_mod.choose_level(0.2527, [1, 2, 4], 0.5) == 1      # 1% coarser: within the 2% slack
    assert tile_mod.choose_level(0.2527, [1, 2, 4], 0.45) == 0     # level 1 would be 12% coarser
    assert tile_mod.choose_level(0.25, [1, 2, 4], 1.0) == 2
    assert tile_mod.choose_level(0.25, [1, 4.0, 2], 1.0) == 1      # by downsample, not by position
    with pytest.raises(ValueError, match="coarser than the requested 0.5"):
        tile_mod.choose_level(1.0, [1, 2], 0.5)


def test_embed_without_the_slide_reader_stops_with_its_name(slides, tmp_path, monkeypatch):
    from fastssl.curation.embed import embed_images
    from fastssl.errors import MissingDependencyError

    root, _ = slides
    tile_mod.tile_slides(root, tmp_path / "t", **SETTINGS)
    monkeypatch.setitem(__import__("sys").modules, "tiffslide", None)  # import tiffslide fails
    with pytest.raises(MissingDependencyError, match="tiffslide"):
        embed_images(tmp_path / "t" / "tiles.csv", tmp_path / "emb", model="test_vit", random_init=True,
                     img_size=32, workers=0, quiet=True, device="cpu")
    assert not (tmp_path / "emb" / "index.csv").exists()
