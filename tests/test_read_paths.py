"""The conversion's fast paths: OpenCV resampling, each source tile decoded once within a bounded cache,
only the blocks under kept tiles read (mask rule), strided tile encoding and plain image columns in unit files."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cpia_hf.dataset.catalog import CatalogEntry
from cpia_hf.dataset.imageio import rgb_image
from cpia_hf.dataset.slide.cells import StandardSlide
from cpia_hf.dataset.slide.grid import XL_SIDE, XLCell
from cpia_hf.dataset.slide.readers import TiffJpegReader, open_slide
from cpia_hf.dataset.slide.resample import MAX_WARP_SHRINK, SHARPEN, resample_image
from cpia_hf.dataset.slide.tiles import iter_slide_tiles
from cpia_hf.dataset.tissue import TissueRule
from cpia_hf.dataset.units import ConvertOptions, Unit, convert_unit
from cpia_hf.demo.synth import he_like_image, real_texture_image, write_slide

MASK = TissueRule("mask")


@pytest.fixture(scope="module")
def two_by_two_slide(tmp_path_factory):
    """8600x8000 px at 0.25 um/px: 4350x4046 standardised, 2x2 XL cells (three partial), DCT 1/2 decode."""
    path = tmp_path_factory.mktemp("cells") / "cells.svs"
    return write_slide(path, he_like_image(8600, 8000, seed=3, tissue=0.9), 0.25)


@pytest.fixture(scope="module")
def corner_slide(tmp_path_factory):
    """4200x4000 px at 0.5 um/px, white glass but for a 1100x1000 px tissue patch in the top-left corner."""
    pixels = np.full((4000, 4200, 3), 236, np.uint8)
    pixels[:1000, :1100] = he_like_image(1100, 1000, seed=4, tissue=1.0)
    return write_slide(tmp_path_factory.mktemp("corner") / "corner.tiff", pixels, 0.5, vendor="generic")


def test_larger_shrinks_keep_pillow_antialiasing():
    source = Image.fromarray(np.random.default_rng(1).integers(0, 256, (200, 260, 3), np.uint8))
    box = (1.5, 2.5, 1.5 + 100 * 1.3, 2.5 + 80 * 1.3)
    expected = np.asarray(source.resize((100, 80), Image.Resampling.BILINEAR, box=box))
    assert np.array_equal(resample_image(source, box, (100, 80)), expected)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def sharpened(image: Image.Image, a: float) -> np.ndarray:
    """The prefilter [-a, 1 + 2a, -a] on each axis, edges replicated, back to 8-bit values (written out here,
    independently of OpenCV)."""
    pixels = np.pad(np.asarray(image).astype(np.float64), ((1, 1), (1, 1), (0, 0)), mode="edge")
    rows = -a * pixels[:-2] + (1 + 2 * a) * pixels[1:-1] - a * pixels[2:]
    return np.clip(np.rint(-a * rows[:, :-2] + (1 + 2 * a) * rows[:, 1:-1] - a * rows[:, 2:]), 0, 255)


def bilinear(pixels: np.ndarray, box: tuple[float, float, float, float], size: tuple[int, int]) -> np.ndarray:
    """Linear interpolation at Pillow's pixel-centre mapping of `box` onto `size`, edges clamped, no antialiasing."""
    def axis(start: float, end: float, count: int, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        centre = start + (np.arange(count) + 0.5) * (end - start) / count - 0.5
        low = np.floor(centre)
        weight = centre - low
        return np.clip(low, 0, length - 1).astype(int), np.clip(low + 1, 0, length - 1).astype(int), weight

    x0, x1, wx = axis(box[0], box[2], size[0], pixels.shape[1])
    y0, y1, wy = axis(box[1], box[3], size[1], pixels.shape[0])
    rows = pixels[y0] * (1 - wy)[:, None, None] + pixels[y1] * wy[:, None, None]
    return rows[:, x0] * (1 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]


@pytest.mark.parametrize("box, size", [
    ((3.25, 7.6, 3.25 + 120 * 0.6, 7.6 + 90 * 0.6), (120, 90)),  # enlarging 1.67x from a fractional origin
    ((10.5, 0.0, 10.5 + 200 * 0.978, 150 * 0.978), (200, 150)),  # the remainder of 0.2527 um/px after DCT 1/2
    ((4.7, 2.2, 4.7 + 160 * 1.0909, 2.2 + 150 * 1.0909), (160, 150)),  # 0.2265 um/px after DCT 1/2: a shrink
])
def test_small_remainders_are_sharpened_linear_interpolation(box, size):
    """Within MAX_WARP_SHRINK of 1 the resampler is the SHARPEN prefilter then linear interpolation (Pillow's
    mapping of pixel centres, no antialiasing), written into the caller's view."""
    assert max((box[2] - box[0]) / size[0], (box[3] - box[1]) / size[1]) <= MAX_WARP_SHRINK
    source = Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 260, 3), np.uint8))
    expected = bilinear(sharpened(source, SHARPEN), box, size)
    unsharpened = bilinear(np.asarray(source).astype(np.float64), box, size)
    canvas = np.zeros((size[1] + 10, size[0] + 20, 3), np.uint8)
    result = resample_image(source, box, size, out=canvas[5:5 + size[1], 7:7 + size[0]])
    assert np.shares_memory(result, canvas)  # written in place, into a view with the canvas' row stride
    got = canvas[5:5 + size[1], 7:7 + size[0]].astype(int)
    assert np.abs(got - expected).max() <= 1.5 and np.abs(got - expected).mean() < 0.5  # rounding, fixed point
    assert np.abs(got - unsharpened).mean() > 5  # the prefilter is applied
    assert not canvas[:5].any() and not canvas[:, :7].any()  # nothing written outside the view


def test_a_box_on_pixel_centres_is_a_copy():
    source = Image.fromarray(np.random.default_rng(3).integers(0, 256, (200, 260, 3), np.uint8))
    assert np.array_equal(resample_image(source, (4.0, 3.0, 260.0, 195.0), (256, 192)), np.asarray(source)[3:195, 4:260])


def test_sharpened_remainder_is_closer_to_lanczos_on_real_texture(real_slide):
    """On the real slide's texture, shrunk 2x (as a DCT 1/2 decode does) then enlarged by the 0.2527 um/px
    remainder, the sharpened linear interpolation is nearer a direct Lanczos resize than plain bilinear."""
    full = Image.fromarray(real_texture_image(real_slide, 1600, 1600, 0.2527))
    half = full.reduce(2)
    scale, side = 0.4942 / 0.2527, 600
    box = (20.0, 20.0, 20 + side * scale, 20 + side * scale)
    reference = np.asarray(full.resize((side, side), Image.Resampling.LANCZOS, box=box))
    ours = resample_image(half, tuple(v / 2 for v in box), (side, side))
    plain = np.asarray(half.resize((side, side), Image.Resampling.BILINEAR, box=tuple(v / 2 for v in box)))
    assert psnr(ours, reference) > psnr(plain, reference) + 1.5


def record_decodes(monkeypatch) -> tuple[Counter, list[int]]:
    """Count every tile decode by (level, index, shrink), and the reader's cache size after each `forget`."""
    decodes: Counter = Counter()
    kept_after_forget: list[int] = []
    decode, forget, close = TiffJpegReader.decode_tile, TiffJpegReader.forget, TiffJpegReader.close

    def counting_decode(self, level, index, shrink):
        decodes[(level, index, shrink)] += 1
        return decode(self, level, index, shrink)

    def recording_forget(self, level, right, bottom):
        forget(self, level, right, bottom)
        kept_after_forget.append(len(self.decoded))

    def recording_close(self):
        kept_after_forget.append(len(self.decoded))  # what the last cell left
        close(self)

    monkeypatch.setattr(TiffJpegReader, "decode_tile", counting_decode)
    monkeypatch.setattr(TiffJpegReader, "close", recording_close)
    monkeypatch.setattr(TiffJpegReader, "forget", recording_forget)
    return decodes, kept_after_forget


def test_each_source_tile_is_decoded_once_and_the_cache_stays_bounded(two_by_two_slide, monkeypatch):
    decodes, kept_after_forget = record_decodes(monkeypatch)
    tiles = list(iter_slide_tiles(two_by_two_slide, slide_stem="cells", rule=MASK))
    assert Counter(t.scale for t in tiles)["XL"] >= 1
    level0 = [key for key in decodes if key[0] == 0]
    assert len(level0) > 500  # the cells were read from level 0 (34 x 32 tiles of 256 px)
    assert max(decodes.values()) == 1, [key for key, n in decodes.items() if n > 1][:5]
    # After each cell only the tiles the next cells share are kept: at most a tile row across the slide
    # and a tile column down a cell (plus their filter margins), never a whole cell (~30 x 30 tiles).
    across, down = -(-8600 // 256), -(-8000 // 256)
    assert len(kept_after_forget) >= 4 + 1 and max(kept_after_forget) <= 2 * across + 2 * down
    assert kept_after_forget[-1] == 0  # nothing is needed after the last cell


def test_forget_keeps_only_tiles_right_of_or_below_the_next_reads(two_by_two_slide):
    reader = open_slide(two_by_two_slide, reader="tifffile")
    try:
        across = -(-reader.level_dimensions[0][0] // 256)
        reader.read(0, 0, 0, 1200, 1100)  # tiles of rows 0-4 and columns 0-4
        assert len(reader.decoded) == 25
        reader.forget(0, 3 * 256 + 10, 3 * 256 + 10)  # keep what reaches past x=778 or y=778
        kept = {divmod(index, across) for _, index, _ in reader.decoded}
        assert kept == {(row, column) for row in range(5) for column in range(5) if row >= 3 or column >= 3}
        reader.forget(0, float("inf"), float("inf"))
        assert reader.decoded == {}
    finally:
        reader.close()


def test_mask_rule_reads_only_the_blocks_under_kept_tiles(corner_slide, monkeypatch):
    decodes, _ = record_decodes(monkeypatch)
    tiles = list(iter_slide_tiles(corner_slide, slide_stem="corner", rule=MASK))
    assert tiles and not [t for t in tiles if t.scale == "XL"]
    # kept tiles lie on the tissue patch (1100x1000 source px = ~1113x1012 standardised)
    assert max(t.x + t.width for t in tiles) <= 1100 + 400 and max(t.y + t.height for t in tiles) <= 1000 + 400
    level0 = [key for key in decodes if key[0] == 0]
    total = -(-4200 // 256) * -(-4000 // 256)
    # the kept tiles cover ~1152x1152 standardised px: 5x5 of the slide's 17x16 source tiles of 256 px are decoded
    assert 0 < len(level0) <= 36 < 0.15 * total
    # and each kept tile has the pixels of a whole-cell read
    reader = open_slide(corner_slide)
    try:
        whole = StandardSlide(reader).read_cell(XLCell(0, 0, 0, 0, XL_SIDE, XL_SIDE))
    finally:
        reader.close()
    for tile in tiles:
        left, top = tile.x_index * tile.side, tile.y_index * tile.side
        assert np.array_equal(tile.pixels, whole[top:top + tile.side, left:left + tile.side]), tile.image_id


@pytest.mark.parametrize("rows, columns", [(slice(0, 500), slice(0, 700)), (slice(10, 106), slice(20, 116)),
                                           (slice(499, 500), slice(699, 700)), (slice(3, 100), slice(5, 6))])
def test_rgb_image_of_a_view_has_its_pixels(rows, columns):
    cell = np.random.default_rng(2).integers(0, 256, (500, 700, 3), np.uint8)
    view = cell[rows, columns]
    assert np.array_equal(np.asarray(rgb_image(view)), view)
    assert np.array_equal(np.asarray(rgb_image(cell[::2, ::3])), cell[::2, ::3])  # other strides: copied


def test_unit_files_store_images_plain_and_uncompressed(two_by_two_slide, tmp_path):
    entry = CatalogEntry(name="cells", kind="wsi", path=".", pattern="*.svs", organ="breast", disease="unknown",
                         stain="H&E", field="histopathology", license="unknown", homepage="unknown",
                         citation="unknown")
    unit = Unit(entry, "cells", (two_by_two_slide.name,))
    result = convert_unit(unit, two_by_two_slide.parent, tmp_path, ConvertOptions(s_per_m=1))
    path = next((tmp_path / "units").rglob("*.parquet"))
    metadata = pq.ParquetFile(path).metadata
    assert metadata.num_rows == result.rows > 0
    columns = {metadata.row_group(0).column(i).path_in_schema: metadata.row_group(0).column(i)
               for i in range(metadata.num_columns)}
    image = columns["image.bytes"]
    assert image.compression == "UNCOMPRESSED" and "RLE_DICTIONARY" not in image.encodings
    assert "RLE_DICTIONARY" in columns["subset"].encodings and columns["subset"].compression == "SNAPPY"


def test_release_rule_skips_cells_a_coarser_level_decides(tmp_path, monkeypatch):
    """A cell whose thumbnail colour fails the XL rule by less than RELEASE_MARGIN but by more than PREVIEW_MARGIN
    (R - G = 13 < 20) is decided on a level 4x coarser and never decoded at level 0; the tiles are the same."""
    rng = np.random.default_rng(5)
    pixels = np.empty((7700, 15400, 3), np.uint8)  # 0.25 um/px: 7790x3895 standardised, cells (0, 0) and (1, 0)
    pixels[:, :7591] = (200, 187, 140)  # cell (0, 0): dropped by the release rule
    pixels[:, 7591:] = (200, 150, 140)  # cell (1, 0) from 3840 * 0.4942 / 0.25 = 7591 px on: kept
    pixels += rng.integers(0, 4, pixels.shape, dtype=np.uint8)
    path = write_slide(tmp_path / "pair.svs", pixels, 0.25)
    release = TissueRule("release")
    decodes, _ = record_decodes(monkeypatch)
    tiles = list(iter_slide_tiles(path, slide_stem="pair", rule=release))
    previewed = {key for key in decodes if key[0] == 0}
    assert tiles and {t.x_index * t.side // XL_SIDE for t in tiles} == {1}  # only cell (1, 0) is kept
    decodes.clear()
    monkeypatch.setattr(StandardSlide, "preview_colour", lambda *args: None)
    unpreviewed = list(iter_slide_tiles(path, slide_stem="pair", rule=release))
    whole = {key for key in decodes if key[0] == 0}
    assert [t.image_id for t in unpreviewed] == [t.image_id for t in tiles]
    assert all(np.array_equal(a.pixels, b.pixels) for a, b in zip(unpreviewed, tiles))
    across = -(-15400 // 256)
    # with the preview no level-0 tile left of cell (1, 0) (7591 px, 7579 with the filter margin) is decoded
    assert previewed and all(index % across >= 7579 // 256 for _, index, _ in previewed)
    assert len(whole) - len(previewed) >= 29 * 29  # without it, cell (0, 0)'s 30 x 30 tiles are
