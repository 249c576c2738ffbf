"""The grid, its coordinates and tile fidelity on real tissue: the real Aperio slide region in tests/data, and
larger real-texture slides built from it at 40x scanner MPPs."""
from __future__ import annotations

import io
import math
from collections import Counter

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from cpia_hf.dataset.imageio import encode_jpeg
from cpia_hf.dataset.slide.readers import open_slide_info
from cpia_hf.dataset.slide.tiles import iter_slide_tiles
from cpia_hf.dataset.tissue import TissueRule
from cpia_hf.demo.synth import real_texture_image, write_slide
from cpia_hf.standard import SCALE_SIDES, STANDARD_MPP

EVERY_TILE = TissueRule("mask", 0.0)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def jpeg_roundtrip(pixels: np.ndarray, quality: int = 90) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(encode_jpeg(pixels, quality=quality))).convert("RGB"))


def lanczos_reference(level0: np.ndarray, x: float, y: float, width: float, side: int, shift: int = 0) -> np.ndarray:
    """The square (x, y, width) of level 0 resized to `side` px with Lanczos; `shift` moves it by whole
    standardised pixels (a negative control: a tile one pixel off)."""
    step = width / side
    x, y = x + shift * step, y + shift * step
    left, top = max(0, math.floor(x) - 8), max(0, math.floor(y) - 8)
    right, bottom = min(level0.shape[1], math.ceil(x + width) + 8), min(level0.shape[0], math.ceil(y + width) + 8)
    region = Image.fromarray(level0[top:bottom, left:right])
    return np.asarray(region.resize((side, side), Image.Resampling.LANCZOS, box=(x - left, y - top, x + width - left,
                                                                                y + width - top)))


def whole_level0(path) -> np.ndarray:
    with openslide.OpenSlide(path) as slide:
        return np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))


def test_info_matches_the_aperio_header(real_slide):
    with tifffile.TiffFile(real_slide) as tif:
        page = tif.pages[0]
        width, height = page.imagewidth, page.imagelength
        mpp = float(page.description.split("MPP = ")[1].split("|")[0])
    info = open_slide_info(real_slide)
    assert (info.width, info.height, info.mpp, info.reader) == (width, height, mpp, "tifffile") == (2220, 2967, 0.499,
                                                                                                    "tifffile")
    assert (info.std_width, info.std_height) == (int(width * mpp / STANDARD_MPP), int(height * mpp / STANDARD_MPP))


def test_grid_and_coordinates_on_the_real_slide(real_slide):
    """With every tile kept, each L/M/S position inside the standardised slide appears once, at its level-0
    square, and its pixels are that square's Lanczos resize: nearer to it than to the square one pixel off."""
    info = open_slide_info(real_slide)
    tiles = list(iter_slide_tiles(real_slide, slide_stem="cmu", rule=EVERY_TILE, s_per_m=16))
    counts = Counter(t.scale for t in tiles)
    for scale in ("L", "M"):
        side = SCALE_SIDES[scale]
        positions = {(t.x_index, t.y_index) for t in tiles if t.scale == scale}
        assert counts[scale] == len(positions) == (info.std_width // side) * (info.std_height // side)
    assert counts["XL"] == 0 and counts["S"] == 16 * counts["M"] == 16 * 35
    level0 = whole_level0(real_slide)
    f = STANDARD_MPP / info.mpp
    for tile in [t for t in tiles if t.scale in ("L", "M")] + [t for t in tiles if t.scale == "S"][::37]:
        assert (tile.x, tile.y, tile.width) == pytest.approx((tile.x_index * tile.side * f, tile.y_index * tile.side * f,
                                                              tile.side * f))
        reference = lanczos_reference(level0, tile.x, tile.y, tile.width, tile.side)
        if tile.x + 2 * tile.width > level0.shape[1] or tile.y + 2 * tile.width > level0.shape[0]:
            continue  # no room for the shifted control
        off_by_one = lanczos_reference(level0, tile.x, tile.y, tile.width, tile.side, shift=1)
        assert psnr(tile.pixels, reference) > psnr(tile.pixels, off_by_one) + 6, tile.image_id


@pytest.fixture(scope="module", params=[0.2527, 0.2265])
def real_texture_slide(request, tmp_path_factory, real_slide):
    """A 4000x4000 px real-texture SVS at a 40x scanner MPP (DCT 1/2 decode, then a small remainder)."""
    mpp = request.param
    path = tmp_path_factory.mktemp("texture") / f"texture-{mpp}.svs"
    return write_slide(path, real_texture_image(real_slide, 4000, 4000, mpp), mpp), mpp


def test_tiles_are_within_1_db_of_lanczos_then_jpeg(real_texture_slide):
    """Each M tile after JPEG q90, judged against a Lanczos resize from level 0, loses at most about 1 dB (median)
    more than that Lanczos resize itself after JPEG q90."""
    path, mpp = real_texture_slide
    level0 = whole_level0(path)
    gaps = []
    for tile in iter_slide_tiles(path, slide_stem="t", rule=EVERY_TILE):
        if tile.scale != "M":
            continue
        reference = lanczos_reference(level0, tile.x, tile.y, tile.width, tile.side)
        ideal = psnr(jpeg_roundtrip(reference), reference)
        gaps.append(ideal - psnr(jpeg_roundtrip(tile.pixels), reference))
    assert len(gaps) == (int(4000 * mpp / STANDARD_MPP) // 384) ** 2
    assert np.median(gaps) <= 1.0 and max(gaps) <= 2.0, (np.median(gaps), max(gaps))
