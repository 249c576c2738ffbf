"""Tile selection: which tiles of each XL cell the tissue rule keeps, and the kept tiles' pixels.

The mask decides every tile of a cell before any pixel is decoded: cells without tissue (or, under the
release rule, whose thumbnail colour fails the XL rule by a clear margin) are never read, and under the
mask rule only the parts of a cell under kept tiles are read. L/M/S tiles whose square lies inside the
standardised slide are produced even when their XL cell is not fully inside.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ...standard import SCALE_SIDES, stable_unit_float, tile_name
from ..tissue import TissueRule, is_greyscale, keeps_tile, release_surely_drops_xl, release_surely_keeps_xl
from .cells import StandardSlide
from .grid import M_SIDE, READ_BLOCK, S_SIDE, XLCell, tile_offsets, xl_cells
from .means import block_means, mean_colour
from .readers import ReaderName, SlideError, open_slide

# Under the release rule a cell its thumbnail leaves undecided is previewed from a coarser level (see
# `StandardSlide.preview_colour`) and skipped when that mean fails the XL rule by more than PREVIEW_MARGIN
# levels: the preview's mean differs from the standardised cell's by JPEG and pyramid error only, and real
# scanners' pyramid JPEGs may differ more than generated ones, hence a margin well above that error.
PREVIEW_MARGIN = 2.0


@dataclass
class Tile:
    """One standardised tile and the level-0 source region it shows."""

    scale: str
    side: int
    x_index: int
    y_index: int
    image_id: str
    pixels: np.ndarray = field(repr=False)  # side x side x 3 uint8 at STANDARD_MPP, read-only view
    x: float
    y: float
    width: float
    height: float
    tissue_fraction: float


def iter_slide_tiles(
    path: Path,
    *,
    slide_stem: str,
    mpp_override: float | None = None,
    rule: TissueRule = TissueRule(),
    s_per_m: int = 1,
    seed: int = 0,
    on_cell_error: Callable[[str], None] | None = None,
    reader: ReaderName = "auto",
) -> Iterator[Tile]:
    """Yield the kept tiles of a slide, XL cell by XL cell in row-major order (XL, L, M, S within a cell).

    `s_per_m` S tiles are kept per kept M tile, chosen among its non-blank S positions by
    `stable_unit_float(seed, image_id)`. A cell that fails to read is skipped and reported to
    `on_cell_error` (SlideError when it is None). `reader` forces "tifffile" or "openslide".
    """
    if not 1 <= s_per_m <= (M_SIDE // S_SIDE) ** 2:
        raise ValueError(f"s_per_m must lie in [1, 16], got {s_per_m}")
    source = open_slide(path, mpp_override, reader=reader)
    info = source.info
    try:
        try:
            slide = StandardSlide(source, on_cell_error)
        except Exception as error:  # any decoder/IO failure of the thumbnail makes the slide unusable
            raise SlideError(info.path, f"cannot read tissue thumbnail ({type(error).__name__}: {error})") from error
        if is_greyscale(slide.thumbnail):
            raise SlideError(info.path, "greyscale image (no pixel of the tissue thumbnail has colour), not an H&E "
                                        "colour scan: CPIA converts H&E slides; leave it out of the catalog entry's pattern")
        for cell in xl_cells(info.std_width, info.std_height):
            yield from cell_tiles(slide, cell, slide_stem, rule, s_per_m, seed, on_cell_error)
            slide.done_with_cell(cell)
    finally:
        source.close()


def blocks_under_kept_tiles(slide: StandardSlide, cell: XLCell, rule: TissueRule) -> np.ndarray:
    """The READ_BLOCK squares of a cell that a tile kept by the mask rule overlaps, decided from the tissue
    mask alone before any pixel of the cell is decoded (S tiles lie inside kept M tiles)."""
    needed = np.zeros((-(-cell.height // READ_BLOCK), -(-cell.width // READ_BLOCK)), bool)
    for scale in ("XL", "L", "M"):
        side = SCALE_SIDES[scale]
        for i, j in tile_offsets(cell.width, cell.height, side):
            if keeps_tile(rule, scale, slide.tissue_fraction(cell.x0 + i, cell.y0 + j, side), None):
                needed[j // READ_BLOCK:-(-(j + side) // READ_BLOCK), i // READ_BLOCK:-(-(i + side) // READ_BLOCK)] = True
    return needed


def cell_tiles(slide: StandardSlide, cell: XLCell, slide_stem: str, rule: TissueRule,
               s_per_m: int, seed: int, on_cell_error: Callable[[str], None] | None) -> Iterator[Tile]:
    """The kept tiles of one XL cell."""
    info, f = slide.info, slide.scale
    x0, y0, width, height = cell.x0, cell.y0, cell.width, cell.height
    if width < S_SIDE or height < S_SIDE:
        return
    release = rule.name == "release"
    needed = None  # the release rule judges the XL tile on the whole cell's pixels
    if release:
        s_fractions = np.array([[slide.tissue_fraction(x0 + i * S_SIDE, y0 + j * S_SIDE, S_SIDE)
                                 for i in range(width // S_SIDE)] for j in range(height // S_SIDE)])
        thumbnail = slide.thumbnail_colour(x0, y0, width, height)
        unread = not s_fractions.any() or release_surely_drops_xl(thumbnail)
        if not unread and not release_surely_keeps_xl(thumbnail):  # undecided: a coarser level's read may decide
            preview = slide.preview_colour(x0, y0, width, height)
            unread = preview is not None and release_surely_drops_xl(preview, PREVIEW_MARGIN)
    else:
        needed = blocks_under_kept_tiles(slide, cell, rule)
        unread = not needed.any()
    if unread:
        return  # no tile of this cell can be kept: never read it
    try:
        pixels, bad = slide.read_cell(cell, needed), None
    except Exception as error:  # a corrupt region must not stop the slide: read the cell block by block
        slide.source.recover()
        message = (f"cell ({cell.column},{cell.row}) region x={x0 * f:.0f} y={y0 * f:.0f} w={width * f:.0f} "
                   f"h={height * f:.0f}: {type(error).__name__}: {error}")
        if on_cell_error is None:
            raise SlideError(info.path, message) from error
        pixels, bad = slide.read_cell_blocks(cell)
        on_cell_error(f"{message}; {int(bad.sum())} of {bad.size} blocks of {M_SIDE} px unreadable, "
                      f"the tiles touching them are dropped")

    s_means = block_means(pixels, S_SIDE) if release else None
    if release and not keeps_tile(rule, "XL", float(s_fractions.mean()), mean_colour(pixels, bad, M_SIDE)):
        return  # the release drops the whole XL cell (judged on its part inside the slide)

    def kept(scale: str, i: int, j: int) -> Tile | None:
        """The tile of `scale` at cell-relative pixel offset (i, j) when the rule keeps it."""
        side = SCALE_SIDES[scale]
        if bad is not None and bad[j // M_SIDE:-(-(j + side) // M_SIDE), i // M_SIDE:-(-(i + side) // M_SIDE)].any():
            return None  # touches an unreadable block
        x, y = x0 + i, y0 + j
        fraction = slide.tissue_fraction(x, y, side)
        if release:  # XL was judged on the whole cell above
            n, si, sj = side // S_SIDE, i // S_SIDE, j // S_SIDE
            mean = tuple(s_means[sj:sj + n, si:si + n].mean(axis=(0, 1)))
            keep = scale == "XL" or keeps_tile(rule, scale, fraction, mean)
        else:
            keep = keeps_tile(rule, scale, fraction, None)
        if not keep:
            return None
        return Tile(scale, side, x // side, y // side, tile_name(slide_stem, side, x // side, y // side),
                    pixels[j:j + side, i:i + side], x * f, y * f, side * f, side * f, fraction)

    tiles = [kept(scale, i, j) for scale in ("XL", "L", "M")
             for i, j in tile_offsets(width, height, SCALE_SIDES[scale])]
    yield from (t for t in tiles if t is not None)
    for m in (t for t in tiles if t is not None and t.scale == "M"):
        mi, mj = m.x_index * M_SIDE - x0, m.y_index * M_SIDE - y0
        candidates = [kept("S", mi + a, mj + b) for b in range(0, M_SIDE, S_SIDE) for a in range(0, M_SIDE, S_SIDE)]
        candidates = [t for t in candidates if t is not None]
        chosen = sorted(candidates, key=lambda t: stable_unit_float(seed, t.image_id))[:s_per_m]
        yield from sorted(chosen, key=lambda t: (t.y_index, t.x_index))
