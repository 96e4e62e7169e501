"""fastssl.curation.tiles: TileDataset over a curated tile table (slide rows and file rows),
nearest-to-centroid exemplars against a brute-force ordering, and the PNG grids."""
from __future__ import annotations

import csv
import json

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


def test_exemplar_grids_show_the_nearest_tiles_in_order(tmp_path, rng):
    """Each embedding row's tile is a PNG of one flat colour (its identity); the grid of a
    cluster must show the brute-force nearest rows' colours, row-major, on a white rest."""
    points, tree = small_tree(rng)
    emb, cur = tmp_path / "emb", tmp_path / "cur"
    (emb / "tiles").mkdir(parents=True)
    colours = rng.permutation(256 ** 3)[: len(points)]
    colours = np.stack([colours // 65536, colours // 256 % 256, colours % 256], 1).astype(np.uint8)
    for i, colour in enumerate(colours):
        Image.fromarray(np.broadcast_to(colour, (12, 12, 3)).copy()).save(emb / "tiles" / f"{i:03d}.png")
    np.save(emb / "emb_00000.npy", points.astype(np.float16).astype(np.float32))
    with open(emb / "index.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["row", "shard", "offset", "source"]] +
                                     [[i, "emb_00000.npy", i, f"{i:03d}.png"] for i in range(len(points))])
    (emb / "manifest.json").write_text(json.dumps({"source": str(emb / "tiles"), "tile_index": None,
                                                   "shards": [{"file": "emb_00000.npy", "rows": len(points)}]}))
    tree.save(cur / "tree")
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


def test_grid_image_shape(tmp_path, rng):
    tiles = [rng.integers(0, 256, (10, 10, 3), dtype=np.uint8) for _ in range(10)]
    assert grid_image(tiles, 6).shape == (3 * 6, 4 * 6, 3)
    assert grid_image(tiles, 6, columns=5).shape == (2 * 6, 5 * 6, 3)
