"""fastssl.curation.tiles: TileDataset over a curated tile table (slide rows and file rows),
nearest-to-centroid exemplars against a brute-force ordering, and the PNG grids."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from fastssl.curation.tiles import TileDataset, grid_image, nearest_points, write_exemplar_grids
from fastssl.curation.tree import HierarchicalTree, TreeLevel
from fastssl.errors import DataError

COLUMNS = ["row", "source", "slide", "level", "x", "y", "size", "mpp", "cluster_1", "cluster_2"]


def write_table(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    return path


def test_reads_file_rows_and_array_rows(tmp_path, rng):
    root = tmp_path / "embedded"
    (root / "a").mkdir(parents=True)
    rgb = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (17, 17), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "a" / "t.png")
    Image.fromarray(grey).save(root / "g.png")
    stack = rng.integers(0, 256, (3, 9, 9, 3), dtype=np.uint8)
    np.save(root / "stack.npy", stack)
    table = write_table(tmp_path / "curated_tiles.csv", [
        [4, "a/t.png", "", "", "", "", "", "", 2, 0],
        [7, "g.png", "", "", "", "", "", "", 1, 1],
        [9, "stack.npy[2]", "", "", "", "", "", "", 0, 1]])
    ds = TileDataset(table, tiles_root=root)
    assert len(ds) == 3
    pixels, row = ds[0]
    np.testing.assert_array_equal(pixels, rgb)
    assert row["row"] == 4 and row["cluster_1"] == 2 and row["source"] == "a/t.png" and row["slide"] == ""
    np.testing.assert_array_equal(ds[1][0], np.repeat(grey[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(ds[2][0], stack[2])
    flipped = TileDataset(table, tiles_root=root, transform=lambda p: p[:, ::-1])
    np.testing.assert_array_equal(flipped[0][0], rgb[:, ::-1])


def test_reads_slide_rows_from_the_tile_index(tmp_path, rng):
    pytest.importorskip("tiffslide")
    from slide_factory import pyramid, slide_pixels, write_slide

    levels = pyramid(slide_pixels(512, 384, [(64, 64, 320, 256)], rng), 2)
    write_slide(tmp_path / "s.tif", levels, 0.25)
    index = tmp_path / "tiles"
    index.mkdir()
    (index / "slides.csv").write_text(f"slide,path,mpp,width,height,tiles\ncase/s,{tmp_path / 's.tif'},0.25,512,384,2\n")
    table = write_table(tmp_path / "t.csv", [
        [0, "case/s/128_64", "case/s", 1, 128, 64, 32, 0.5, 0, 0],
        [5, "case/s/64_192", "case/s", 0, 64, 192, 16, 0.25, 1, 0]])
    ds = TileDataset(table, tiles_root=index)
    pixels, row = ds[0]
    assert row["level"] == 1 and row["mpp"] == 0.5 and row["x"] == 128
    np.testing.assert_array_equal(pixels, levels[1][32:64, 64:96])   # level-1 crop at corner / 2
    np.testing.assert_array_equal(ds[1][0], levels[0][192:208, 64:80])
    import pickle  # DataLoader workers get a copy: open slides are not carried, reopened on use

    copy = pickle.loads(pickle.dumps(ds))
    assert copy._cache.open == {} and ds._cache.open
    np.testing.assert_array_equal(copy[0][0], levels[1][32:64, 64:96])
    with pytest.raises(ValueError, match="tiles_root"):
        TileDataset(table)[0]
    (index / "slides.csv").write_text("slide,path,mpp,width,height,tiles\nother,x.tif,0.25,1,1,0\n")
    with pytest.raises(DataError, match="'case/s' of row 0 is not listed"):
        TileDataset(table, tiles_root=index)[0]


def test_missing_column_is_named(tmp_path):
    (tmp_path / "t.csv").write_text("row,source\n0,a.png\n")
    with pytest.raises(DataError, match=r"missing columns \['slide'"):
        TileDataset(tmp_path / "t.csv")


def small_tree(rng, n=60, d=5):
    """Points and a 2-level tree (6 then 2 clusters) built by hand with argmin assignments."""
    points = rng.normal(size=(n, d)).astype(np.float32)
    c1 = points[rng.choice(n, 6, replace=False)] + 0.1
    d1 = ((points[:, None].astype(np.float64) - c1[None]) ** 2).sum(-1)
    l1 = TreeLevel.from_assignments(c1, d1.argmin(1), d1.min(1))
    c2 = rng.normal(size=(2, d)).astype(np.float32)
    d2 = ((c1[:, None].astype(np.float64) - c2[None]) ** 2).sum(-1)
    l2 = TreeLevel.from_assignments(c2, d2.argmin(1), d2.min(1))
    return points, HierarchicalTree([l1, l2])


def test_nearest_points_match_brute_force(rng):
    from fastssl.curation._source import PointSource

    points, tree = small_tree(rng)
    x = points.astype(np.float64)
    label1 = ((x[:, None] - tree.levels[0].centroids[None].astype(np.float64)) ** 2).sum(-1).argmin(1)
    label2 = np.asarray(tree.levels[1].assignments)[label1]
    for level, labels in ((1, label1), (2, label2)):
        for c in range(tree.levels[level - 1].k):
            under = np.flatnonzero(labels == c)
            dist = ((x[under] - tree.levels[level - 1].centroids[c].astype(np.float64)) ** 2).sum(1)
            want = under[np.argsort(dist, kind="stable")][:7]
            got = nearest_points(tree, level, c, 7, PointSource.from_data(points))
            np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="level 2 has clusters 0..1"):
        nearest_points(tree, 2, 2, 3, PointSource.from_data(points))


def write_index(emb, sources):
    """embed's index.csv: embedding row i is the tile file sources[i]."""
    with open(emb / "index.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["row", "shard", "offset", "source"]] +
                                     [[i, "emb_00000.npy", i, s] for i, s in enumerate(sources)])


def grids_inputs(tmp_path, rng):
    """A curate dir (cur/tree: small_tree) and an embed dir (emb) whose row i is a 12 x 12
    PNG of one flat colour, colours[i] -> (points, tree, cur, emb, colours (n, 3) uint8)."""
    points, tree = small_tree(rng)
    emb, cur = tmp_path / "emb", tmp_path / "cur"
    (emb / "tiles").mkdir(parents=True)
    colours = rng.permutation(256 ** 3)[: len(points)]
    colours = np.stack([colours // 65536, colours // 256 % 256, colours % 256], 1).astype(np.uint8)
    for i, colour in enumerate(colours):
        Image.fromarray(np.broadcast_to(colour, (12, 12, 3)).copy()).save(emb / "tiles" / f"{i:03d}.png")
    np.save(emb / "emb_00000.npy", points.astype(np.float16).astype(np.float32))
    write_index(emb, [f"{i:03d}.png" for i in range(len(points))])
    (emb / "manifest.json").write_text(json.dumps({"source": str(emb / "tiles"), "tile_index": None,
                                                   "shards": [{"file": "emb_00000.npy", "rows": len(points)}]}))
    tree.save(cur / "tree")
    return points, tree, cur, emb, colours


def test_exemplar_grids_show_the_nearest_tiles_in_order(tmp_path, rng):
    """Each embedding row's tile is a PNG of one flat colour (its identity); the grid of a
    cluster must show the brute-force nearest rows' colours, row-major, on a white rest."""
    points, tree, cur, emb, colours = grids_inputs(tmp_path, rng)
    paths = write_exemplar_grids(cur, emb, level=2, per_cluster=5, tile_px=8)
    assert [p.name for p in paths] == ["cluster_0.png", "cluster_1.png"]
    x = points.astype(np.float16).astype(np.float64)
    label1 = ((x[:, None] - tree.levels[0].centroids[None].astype(np.float64)) ** 2).sum(-1).argmin(1)
    for c, path in enumerate(paths):
        under = np.flatnonzero(np.asarray(tree.levels[1].assignments)[label1] == c)
        dist = ((x[under] - tree.levels[1].centroids[c].astype(np.float64)) ** 2).sum(1)
        want = under[np.argsort(dist, kind="stable")][:5]
        png = np.asarray(Image.open(path).convert("RGB"))
        assert png.shape == (2 * 8, 3 * 8, 3)  # 5 tiles: ceil(sqrt 5) = 3 columns, 2 rows
        for k, r in enumerate(want):
            cell = png[(k // 3) * 8 + 4, (k % 3) * 8 + 4]
            np.testing.assert_array_equal(cell, colours[r])
        assert (png[8:, 16:] == 255).all()  # the sixth cell is empty
    from fastssl.cli import main

    assert main(["grids", str(cur), "--embeddings", str(emb), "--level", "2", "--per-cluster", "5",
                 "--tile-px", "8", "--out", str(tmp_path / "cli"), "--quiet"]) == 0
    assert (tmp_path / "cli" / "level_2" / "cluster_1.png").read_bytes() == paths[1].read_bytes()
    level1 = write_exemplar_grids(cur, emb, level=1, per_cluster=4, tile_px=8, clusters=[3])
    png = np.asarray(Image.open(level1[0]).convert("RGB"))
    firsts = np.asarray(tree.levels[0].members_of(3))[:4]
    assert png.shape == (16, 16, 3)
    for k, r in enumerate(firsts):
        np.testing.assert_array_equal(png[(k // 2) * 8 + 4, (k % 2) * 8 + 4], colours[r])


def test_grids_level_folder_is_a_job_resumed_refused_or_overwritten(tmp_path, rng, capsys):
    """OUT/level_L is opened by fastssl.jobs.open_job: the same command redraws equal PNGs; the
    grids of another level live beside it; other settings, other clusters or a changed
    embeddings index are refused naming them, touching nothing; --overwrite empties the level's
    folder; a foreign folder and a held lock are refused; a bad --clusters leaves no record.
    Planted: --per-cluster or the embeddings' index.csv left out of job.json, or one folder for
    every level -> this test fails."""
    from fastssl import jobs
    from fastssl.cli import main

    _, _, cur, emb, _ = grids_inputs(tmp_path, rng)
    out = tmp_path / "grids"

    def grids(*extra, where=out):
        capsys.readouterr()
        code = main(["grids", str(cur), "--embeddings", str(emb), "--level", "2", "--per-cluster", "5",
                     "--tile-px", "8", "--out", str(where), "--quiet", *extra])
        return code, capsys.readouterr().err

    def files(where=out / "level_2"):
        return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in where.iterdir() if p.name != jobs.LOCK_NAME}

    assert grids() == (0, "")
    first = files()
    assert set(first) == {"job.json", "cluster_0.png", "cluster_1.png"}
    (out / "level_2" / "cluster_0.png").unlink()              # a rerun redraws: the file comes back, equal
    assert grids() == (0, "")
    assert {k: v[0] for k, v in files().items()} == {k: v[0] for k, v in first.items()}
    assert grids("--level", "1", "--per-cluster", "3") == (0, "")          # another level: its own folder
    assert len(list((out / "level_1").glob("cluster_*.png"))) == 6
    first = files()
    for extra, named in ((["--per-cluster", "4"], "per_cluster: 5 -> 4"), (["--tile-px", "9"], "tile_px: 8 -> 9"),
                         (["--clusters", "1"], "clusters: [0, 1] -> [1]")):
        code, err = grids(*extra)
        assert code == 2 and err.startswith("fastssl grids: error: ") and named in err and "--overwrite" in err, err
        assert files() == first                                   # refused before any write
    write_index(emb, [f"{i:03d}.png" for i in reversed(range(60))])   # other tiles for the same rows
    code, err = grids()
    assert code == 2 and f"input {emb / 'index.csv'}: content changed" in err and files() == first, err
    assert grids("--clusters", "1", "--overwrite") == (0, "")
    assert set(files()) == {"job.json", "cluster_1.png"}      # the old cluster_0.png went
    code, err = grids("--clusters", "2")
    assert code == 2 and "--clusters 2: level 2 has clusters 0..1" in err
    code, err = grids("--clusters", "2", where=tmp_path / "typo")
    assert code == 2 and not (tmp_path / "typo").exists()
    foreign = tmp_path / "foreign"
    (foreign / "level_2").mkdir(parents=True)
    (foreign / "level_2" / "notes.txt").write_text("mine")
    code, err = grids(where=foreign)
    assert code == 2 and "is not empty and has no job.json" in err
    assert set(os.listdir(foreign / "level_2")) - {jobs.LOCK_NAME} == {"notes.txt"}
    held = tmp_path / "held"
    with jobs.OutputLock(held / "level_2"):
        code, err = grids(where=held)
    assert code == 2 and "is in use by another job" in err and os.listdir(held / "level_2") == [jobs.LOCK_NAME]


def test_grid_image_shape(tmp_path, rng):
    tiles = [rng.integers(0, 256, (10, 10, 3), dtype=np.uint8) for _ in range(10)]
    assert grid_image(tiles, 6).shape == (3 * 6, 4 * 6, 3)
    assert grid_image(tiles, 6, columns=5).shape == (2 * 6, 5 * 6, 3)
