"""Slide standardisation and the nested grid, on small generated slides at the real tile sizes."""
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
from cpia_hf.dataset.slide.readers import SlideError, open_slide, open_slide_info
from cpia_hf.dataset.slide.tiles import iter_slide_tiles
from cpia_hf.dataset.tissue import (
    RELEASE_MARGIN,
    TissueRule,
    otsu_threshold,
    release_is_blank,
    release_keeps_xl,
    release_surely_drops_xl,
    release_surely_keeps_xl,
    tissue_mask,
)
from cpia_hf.demo.synth import he_like_image, write_slide
from cpia_hf.standard import SCALE_SIDES, STANDARD_MPP, tile_name


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def jpeg_roundtrip(pixels: np.ndarray) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(encode_jpeg(pixels, quality=90))).convert("RGB"))


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory):
    """3000x2500 px at 0.25 um/px: 1517x1264 standardised, smaller than one XL tile."""
    path = tmp_path_factory.mktemp("small") / "small.svs"
    return write_slide(path, he_like_image(3000, 2500, seed=1), 0.25)


@pytest.fixture(scope="module")
def large_slide(tmp_path_factory):
    """4200x4000 px at 0.5 um/px (generic TIFF): 4249x4047 standardised, one full XL cell and three partial."""
    path = tmp_path_factory.mktemp("large") / "large.tiff"
    return write_slide(path, he_like_image(4200, 4000, seed=2, tissue=0.75), 0.5, vendor="generic")


RELEASE = TissueRule("release")


@pytest.fixture(scope="module")
def large_tiles(large_slide):
    return list(iter_slide_tiles(large_slide, slide_stem="large", rule=RELEASE))


def test_slide_info_standard_size(small_slide, large_slide):
    info = open_slide_info(small_slide)
    assert (info.width, info.height, info.mpp, info.reader) == (3000, 2500, 0.25, "tifffile")
    assert (info.std_width, info.std_height) == (int(3000 * 0.25 / STANDARD_MPP), int(2500 * 0.25 / STANDARD_MPP))
    assert open_slide_info(large_slide).mpp == pytest.approx(0.5)


def assert_matches_independent_read(path, tiles, mpp):
    """Each tile equals an OpenSlide level-0 read of its region resized with Lanczos.

    Raw PSNR >= 40 dB fails for a region shifted by one standardised pixel (about 34 dB).
    """
    with openslide.OpenSlide(path) as slide:
        for tile in tiles:
            assert tile.pixels.shape == (tile.side, tile.side, 3)
            assert tile.width == tile.height == pytest.approx(tile.side * STANDARD_MPP / mpp, rel=0.005)
            assert (tile.x, tile.y) == pytest.approx((tile.side * tile.x_index * STANDARD_MPP / mpp,
                                                      tile.side * tile.y_index * STANDARD_MPP / mpp))
            left, top = max(0, math.floor(tile.x) - 8), max(0, math.floor(tile.y) - 8)
            right = min(slide.dimensions[0], math.ceil(tile.x + tile.width) + 8)
            bottom = min(slide.dimensions[1], math.ceil(tile.y + tile.height) + 8)
            region = slide.read_region((left, top), 0, (right - left, bottom - top)).convert("RGB")
            box = (tile.x - left, tile.y - top, tile.x + tile.width - left, tile.y + tile.height - top)
            expected = np.asarray(region.resize((tile.side, tile.side), Image.Resampling.LANCZOS, box=box))
            assert psnr(jpeg_roundtrip(tile.pixels), expected) >= 35, tile.image_id
            assert psnr(tile.pixels, expected) >= 40, tile.image_id


def test_tile_pixels_match_independent_read(large_slide, large_tiles):
    by_scale = {scale: [t for t in large_tiles if t.scale == scale] for scale in SCALE_SIDES}
    assert all(by_scale.values()), Counter(t.scale for t in large_tiles)
    sample = [by_scale["XL"][0], by_scale["L"][-1], by_scale["M"][0], by_scale["M"][-1], by_scale["S"][-1]]
    assert_matches_independent_read(large_slide, sample, 0.5)


def test_downsampled_tiles_match_independent_read(small_slide):
    tiles = list(iter_slide_tiles(small_slide, slide_stem="small", rule=TissueRule("mask", 0.3)))
    by_scale = {scale: [t for t in tiles if t.scale == scale] for scale in SCALE_SIDES}
    sample = by_scale["L"][:1] + by_scale["M"][:2] + by_scale["S"][-2:]
    assert len(sample) == 5
    assert_matches_independent_read(small_slide, sample, 0.25)


def test_nesting_naming_and_bounds(large_slide, large_tiles):
    info = open_slide_info(large_slide)
    kept_m = {(t.x_index, t.y_index) for t in large_tiles if t.scale == "M"}
    s_per_m = Counter()
    for tile in large_tiles:
        side = tile.side
        assert tile.image_id == tile_name("large", side, tile.x_index, tile.y_index)
        left, top = side * tile.x_index, side * tile.y_index
        assert left + side <= info.std_width and top + side <= info.std_height
        cell = (left // 3840, top // 3840)
        assert ((left + side - 1) // 3840, (top + side - 1) // 3840) == cell  # inside its XL cell
        if tile.scale == "S":
            m = (left // 384, top // 384)
            assert m in kept_m and (left + side - 1) // 384 == m[0] and (top + side - 1) // 384 == m[1]
            s_per_m[m] += 1
    assert set(s_per_m.values()) == {1}
    assert len(s_per_m) >= 0.9 * len(kept_m)
    assert len({t.image_id for t in large_tiles}) == len(large_tiles)


def test_order_is_cell_by_cell_and_deterministic(large_slide, large_tiles):
    cells = [(t.y_index * t.side // 3840, t.x_index * t.side // 3840) for t in large_tiles]
    assert cells == sorted(cells)
    first_cell = [t.scale for t, cell in zip(large_tiles, cells) if cell == (0, 0)]
    assert first_cell == sorted(first_cell, key=["XL", "L", "M", "S"].index)
    again = list(iter_slide_tiles(large_slide, slide_stem="large", rule=RELEASE))
    assert [t.image_id for t in again] == [t.image_id for t in large_tiles]
    reseeded = {t.image_id for t in iter_slide_tiles(large_slide, slide_stem="large", seed=1, rule=RELEASE)
                if t.scale == "S"}
    assert reseeded != {t.image_id for t in large_tiles if t.scale == "S"}


def test_full_global_grid_beyond_whole_cells(large_slide):
    """With every tile kept, each position inside the slide appears, partial XL cells included."""
    info = open_slide_info(large_slide)
    tiles = list(iter_slide_tiles(large_slide, slide_stem="large", rule=TissueRule("mask", 0.0), s_per_m=16))
    counts = Counter(t.scale for t in tiles)
    for scale in ("XL", "L", "M"):
        side = SCALE_SIDES[scale]
        positions = {(t.x_index, t.y_index) for t in tiles if t.scale == scale}
        assert counts[scale] == len(positions) == (info.std_width // side) * (info.std_height // side), scale
    assert counts["S"] == len({t.image_id for t in tiles if t.scale == "S"}) == 16 * counts["M"]
    assert max(t.x_index for t in tiles if t.scale == "M") == info.std_width // 384 - 1 == 10


def test_small_slide_has_no_xl_but_l_m_s(small_slide):
    info = open_slide_info(small_slide)
    counts = Counter(t.scale for t in iter_slide_tiles(small_slide, slide_stem="small", rule=TissueRule("mask", 0.0)))
    assert counts["XL"] == 0
    assert counts["L"] == (info.std_width // 960) * (info.std_height // 960) == 1
    assert counts["M"] == (info.std_width // 384) * (info.std_height // 384) == 9
    assert counts["S"] == counts["M"]


def test_release_rule_uses_mean_colours(large_tiles):
    for tile in large_tiles:
        mean = tuple(tile.pixels.reshape(-1, 3).mean(axis=0))
        if tile.scale == "XL":
            assert release_keeps_xl(mean)
        else:
            assert not release_is_blank(mean)
        assert 0.0 <= tile.tissue_fraction <= 1.0


def test_mask_rule_records_fraction_and_drops_background(large_slide, large_tiles):
    kept = list(iter_slide_tiles(large_slide, slide_stem="large", rule=TissueRule("mask", 0.5)))
    everything = list(iter_slide_tiles(large_slide, slide_stem="large", rule=TissueRule("mask", 0.0)))
    assert 0 < len(kept) < len(everything)
    assert all(t.tissue_fraction >= 0.5 for t in kept)
    assert any(t.tissue_fraction == 0.0 for t in everything if t.scale == "M")
    for tile in [t for t in everything if t.scale in ("L", "M")][::3]:
        # the mask fraction agrees with the share of coloured pixels in the tile itself
        coloured = tissue_mask(tile.pixels).mean()
        assert abs(coloured - tile.tissue_fraction) < 0.2, tile.image_id


def test_no_mpp_raises_and_override_works(tmp_path):
    path = write_slide(tmp_path / "nompp.svs", he_like_image(1000, 1000, seed=5), None)
    with pytest.raises(SlideError, match="no MPP in slide metadata and no catalog mpp") as error:
        open_slide_info(path)
    assert error.value.path == path and str(path) in str(error.value)
    with pytest.raises(SlideError):
        next(iter_slide_tiles(path, slide_stem="nompp"))
    info = open_slide_info(path, mpp_override=0.4942)
    assert (info.mpp, info.std_width, info.std_height) == (0.4942, 1000, 1000)
    tiles = list(iter_slide_tiles(path, slide_stem="nompp", mpp_override=0.4942, rule=TissueRule("mask", 0.0)))
    assert Counter(t.scale for t in tiles)["M"] == 4 and tiles[0].width == pytest.approx(tiles[0].side)


def overlaps(tile, left, top, right, bottom) -> bool:
    """Whether the tile's level-0 source rectangle meets the rectangle (left, top, right, bottom)."""
    return tile.x < right and left < tile.x + tile.width and tile.y < bottom and top < tile.y + tile.height


@pytest.mark.parametrize("reader, levels", [("tifffile", None), ("openslide", None), ("tifffile", 1), ("openslide", 1)])
def test_corrupt_tile_costs_only_the_tiles_it_touches(large_slide, large_tiles, tmp_path, reader, levels):
    """The level-0 tile (256 px) under a kept M tile of cell (0, 0) is garbage: the tiles whose reads touch it
    (at the granularity of one M block, 384 standardised px) are lost, every other tile is the same as from
    the intact slide. A single-level TIFF builds its thumbnail from the corrupt level too: not lost either."""
    pixels = he_like_image(4200, 4000, seed=2, tissue=0.75)
    if levels is None:
        reference = large_tiles
    else:
        intact = write_slide(tmp_path / "intact.tiff", pixels, 0.5, vendor="generic", levels=levels)
        reference = list(iter_slide_tiles(intact, slide_stem="large", reader=reader, rule=RELEASE))
    m = next(t for t in reference if t.scale == "M" and 2 <= t.x_index <= 7 and 2 <= t.y_index <= 7)
    column, row = int((m.x + m.width / 2) // 256), int((m.y + m.height / 2) // 256)
    path = write_slide(tmp_path / "corrupt.tiff", pixels, 0.5, vendor="generic", corrupt_tile_at=(column, row),
                       levels=levels)
    errors = []
    tiles = list(iter_slide_tiles(path, slide_stem="large", on_cell_error=errors.append, reader=reader, rule=RELEASE))
    assert any(e.startswith("cell (0,0) region") and " of 100 blocks of 384 px unreadable" in e for e in errors)
    assert all(e.startswith(("cell (0,0)", "thumbnail region")) for e in errors) and len(errors) <= 3, errors
    corrupt = (256 * column, 256 * row, 256 * column + 256, 256 * row + 256)
    near = (corrupt[0] - 390, corrupt[1] - 390, corrupt[2] + 390, corrupt[3] + 390)  # one M block around it
    got = {t.image_id: t for t in tiles}
    lost = [t for t in reference if t.image_id not in got]
    assert lost and all(overlaps(t, *near) for t in lost), [t.image_id for t in lost if not overlaps(t, *near)]
    assert m in lost and any(t.scale == "L" and overlaps(t, *corrupt) for t in lost)
    assert not any(overlaps(t, *corrupt) for t in tiles if t.scale == "M")
    assert len(lost) < 0.05 * len(reference)
    far = [t for t in reference if not overlaps(t, *near)]
    assert far and all(t.image_id in got for t in far)
    # cell (0, 0) was read again block by block: the same resampling, up to Pillow's rounding of sub-boxes
    assert max(np.abs(t.pixels.astype(int) - got[t.image_id].pixels.astype(int)).max() for t in far) <= 1
    with pytest.raises(SlideError, match=r"cell \(0,0\)|thumbnail"):
        list(iter_slide_tiles(path, slide_stem="large", reader=reader, rule=RELEASE))


def test_truncated_or_foreign_file_raises_naming_it(small_slide, tmp_path):
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(small_slide.read_bytes()[:200_000])
    not_a_slide = tmp_path / "notes.svs"
    not_a_slide.write_text("not a slide")
    for path in (truncated, not_a_slide, tmp_path / "missing.svs"):
        with pytest.raises(SlideError) as error:
            list(iter_slide_tiles(path, slide_stem="x"))
        assert str(path) in str(error.value) and error.value.reason


def test_tile_data_past_end_of_file_is_detected(small_slide, tmp_path):
    path = tmp_path / "short.svs"
    path.write_bytes(small_slide.read_bytes())
    with tifffile.TiffFile(path, mode="r+b") as tif:
        page = tif.pages[0]
        offsets = list(page.dataoffsets)
        offsets[-1] = path.stat().st_size - 10
        page.tags["TileOffsets"].overwrite(offsets)
    with pytest.raises(SlideError, match="truncated") as error:
        open_slide_info(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("name, max_difference, min_psnr", [("small", 8, 50), ("large", 1, 60)])
def test_fast_path_matches_openslide(request, name, max_difference, min_psnr):
    """The tifffile reader gives the tiles of OpenSlide's `read_region` path, up to decoding.

    At 0.5 um/px ("large") both decode at full size with libjpeg-turbo: equal up to rounding. At
    0.25 um/px ("small") the fast path decodes at half size in the DCT domain where the OpenSlide
    path averages 2 x 2 decoded pixels: about 54 dB apart, while one standardised pixel of shift is ~34 dB.
    """
    path = request.getfixturevalue(f"{name}_slide")
    every = TissueRule("mask", 0.0)
    fast = list(iter_slide_tiles(path, slide_stem=name, rule=every, reader="tifffile"))
    slow = list(iter_slide_tiles(path, slide_stem=name, rule=every, reader="openslide"))
    assert [t.image_id for t in fast] == [t.image_id for t in slow] and fast
    for a, b in zip(fast, slow):
        assert np.abs(a.pixels.astype(int) - b.pixels.astype(int)).max() <= max_difference
        assert psnr(a.pixels, b.pixels) >= min_psnr


def split_jpeg_tables(jpeg: bytes) -> tuple[bytes, bytes]:
    """(tables-only stream, abbreviated image stream) of a baseline JPEG, as TIFF's JPEGTables holds them."""
    tables, image, pos = [b"\xff\xd8"], [b"\xff\xd8"], 2
    while True:
        marker, length = jpeg[pos:pos + 2], int.from_bytes(jpeg[pos + 2:pos + 4], "big")
        (tables if marker in (b"\xff\xdb", b"\xff\xc4") else image).append(jpeg[pos:pos + 2 + length])
        pos += 2 + length
        if marker == b"\xff\xda":  # start of scan: the entropy-coded data and EOI follow
            return b"".join(tables) + b"\xff\xd9", b"".join(image) + jpeg[pos:]


def test_fast_path_reads_shared_jpeg_tables(tmp_path):
    """Scanner SVS files keep quantisation and Huffman tables once per page (JPEGTables) and
    abbreviated tile streams; the fast path must decode them as OpenSlide does."""
    width, height, side = 2304, 2048, 256
    pixels = he_like_image(width, height, seed=5, tissue=0.9)
    streams = [split_jpeg_tables(encode_jpeg(pixels[y:y + side, x:x + side]))
               for y in range(0, height, side) for x in range(0, width, side)]
    tables = streams[0][0]
    assert all(t == tables for t, _ in streams)
    path = tmp_path / "tables.svs"
    with tifffile.TiffWriter(path) as tif:
        tif.write(iter([s for _, s in streams]), shape=(height, width, 3), dtype=np.uint8, tile=(side, side),
                  compression="jpeg", photometric="ycbcr", subsampling=(2, 2), metadata=None,
                  description=f"Aperio Image Library v12.0\r\n{width}x{height} (256x256) JPEG/RGB Q=90|MPP = 0.2500",
                  extratags=[(347, 7, len(tables), tables, True)])
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].jpegtables == tables
    assert open_slide_info(path).reader == "tifffile"
    every = TissueRule("mask", 0.0)
    fast = list(iter_slide_tiles(path, slide_stem="t", rule=every, reader="tifffile"))
    slow = list(iter_slide_tiles(path, slide_stem="t", rule=every, reader="openslide"))
    assert [t.image_id for t in fast] == [t.image_id for t in slow] and {"L", "M"} <= {t.scale for t in fast}
    for a, b in zip(fast, slow):
        assert psnr(a.pixels, b.pixels) >= 50


def test_half_size_decode_stops_at_odd_level_edge(tmp_path):
    """Averaging 2 x 2 over a level of odd size: the last row and column hold only pixels inside it."""
    path = write_slide(tmp_path / "odd.svs", he_like_image(1201, 901, seed=3), 0.25, levels=1)
    fast, slow = open_slide(path, reader="tifffile"), open_slide(path, reader="openslide")
    width, height = fast.level_dimensions[0]
    shrunk = np.asarray(fast.read(0, 0, 0, width, height, 2)).astype(int)
    averaged = np.asarray(slow.read(0, 0, 0, width, height, 2))[..., :3].astype(int)
    fast.close(), slow.close()
    assert shrunk.shape == averaged.shape == (451, 601, 3)
    assert np.abs(shrunk[-1] - averaged[-1]).max() <= 1 and np.abs(shrunk[:, -1] - averaged[:, -1]).max() <= 1
    assert psnr(shrunk, averaged) >= 50


def test_tissue_mask_separates_stain_from_glass():
    rng = np.random.default_rng(0)
    glass = rng.normal(240, 3, (40, 40, 3))
    stain = rng.normal((200, 120, 170), 10, (40, 40, 3))
    thumbnail = np.clip(np.concatenate([glass, stain], axis=1), 0, 255).astype(np.uint8)
    mask = tissue_mask(thumbnail)
    assert mask[:, :40].mean() < 0.02 and mask[:, 40:].mean() > 0.98
    values = np.concatenate([rng.normal(0.1, 0.02, 1000), rng.normal(0.6, 0.05, 1000)]).clip(0, 1)
    assert 0.2 < otsu_threshold(values) < 0.45


def test_unread_cells_are_ones_the_release_drops():
    """A cell skipped on its thumbnail colour fails release_keeps_xl for any colour within the margin."""
    rng = np.random.default_rng(0)
    colours = rng.uniform(0, 255, (20000, 3))
    skipped = [c for c in colours if release_surely_drops_xl(tuple(c))]
    assert 0 < len(skipped) < len(colours)
    for colour in skipped[:2000]:
        for delta in rng.uniform(-RELEASE_MARGIN, RELEASE_MARGIN, (20, 3)):
            assert not release_keeps_xl(tuple(colour + delta))
    assert not any(release_surely_drops_xl(tuple(c)) for c in colours if release_keeps_xl(tuple(c)))
    kept = [c for c in colours if release_surely_keeps_xl(tuple(c))]
    assert 0 < len(kept) < len(colours)
    for colour in kept[:2000]:
        for delta in rng.uniform(-RELEASE_MARGIN, RELEASE_MARGIN, (20, 3)):
            assert release_keeps_xl(tuple(colour + delta))


def test_bad_arguments_are_refused(small_slide):
    with pytest.raises(ValueError, match="s_per_m"):
        next(iter_slide_tiles(small_slide, slide_stem="small", s_per_m=17))
    with pytest.raises(ValueError, match="tissue rule"):
        TissueRule("otsu")
