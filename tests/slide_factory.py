"""Synthetic whole-slide images for the tile / embed / TileDataset tests: a pyramidal tiled
TIFF (tifffile) with mpp metadata, a pale background and coloured "tissue" rectangles at
known level-0 coordinates. Level k is the 2^k x 2^k block mean of level 0."""
from __future__ import annotations

import numpy as np

BACKGROUND = (236, 233, 239)   # glass: grey-white, saturation ~0.03
TISSUE = (182, 92, 150)        # eosin-pink, saturation ~0.5


def slide_pixels(width: int, height: int, rects, rng) -> np.ndarray:
    """(height, width, 3) uint8 level 0: noisy background, noisy tissue in each rectangle
    rects = [(x0, y0, x1, y1)] (level-0 pixels, end exclusive)."""
    img = np.empty((height, width, 3), np.float64)
    img[:] = BACKGROUND
    for x0, y0, x1, y1 in rects:
        img[y0:y1, x0:x1] = TISSUE
    img += rng.normal(0, 4, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def pyramid(level0: np.ndarray, levels: int) -> list[np.ndarray]:
    """[level 0, level 1, ...]: level k = 2^k block means of level 0, rounded to uint8."""
    out = [level0]
    for k in range(1, levels):
        f = 2 ** k
        h, w = level0.shape[0] // f, level0.shape[1] // f
        blocks = level0[: h * f, : w * f].astype(np.float64).reshape(h, f, w, f, 3).mean(axis=(1, 3))
        out.append(np.rint(blocks).astype(np.uint8))
    return out


def write_slide(path, levels: list[np.ndarray], mpp: float | None, tile: int = 64) -> None:
    """A pyramidal TIFF: level 0 with its reductions as SubIFDs, resolution tags in cm."""
    import tifffile

    def res(k):
        return {} if mpp is None else {"resolution": (1e4 / (mpp * 2 ** k),) * 2, "resolutionunit": "CENTIMETER"}

    with tifffile.TiffWriter(path) as tif:
        tif.write(levels[0], tile=(tile, tile), subifds=len(levels) - 1, photometric="rgb",
                  compression="zlib", **res(0))
        for k, level in enumerate(levels[1:], start=1):
            tif.write(level, tile=(tile, tile), subfiletype=1, photometric="rgb", compression="zlib", **res(k))
