"""A slide seen at the standard MPP: its tissue thumbnail and mask, and the pixels of one XL cell at a time.

Reading is bounded: the tissue thumbnail (one pixel per MASK_PX x MASK_PX standardised pixels) is built first
from the pyramid level closest to its scale, and a cell is resampled in bands of at most BAND_SOURCE_PIXELS
source pixels from the level closest to (not coarser than) the standard. Which cells and blocks are read is
decided by the caller (`tiles.py`); a corrupt tile costs only the reads that touch it.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
from PIL import Image

from ..tissue import tissue_mask
from .grid import M_SIDE, MASK_PX, READ_BLOCK, XL_SIDE, XLCell, block_rectangles
from .means import Colour, area_mean, integral, mean_colour
from .readers import SlideInfo, SlideReader
from .resample import RESAMPLE, best_level, resample_region

BAND_SOURCE_PIXELS = 2**24  # source pixels read per band (64 MB as RGBX): memory stays bounded
# A scanner's pyramid is box-reduced, so a level PREVIEW_SHRINK times coarser than the one cells are read from
# gives a cell's mean colour within JPEG error, for a small part of the cell's decoding.
PREVIEW_SHRINK = 4
CACHE_MARGIN = 64  # level pixels: decoded tiles this close to the next read are kept for it (its filter margin)


class StandardSlide:
    """The standardised slide: its scale, tissue mask and the pixels of one XL cell at a time."""

    def __init__(self, source: SlideReader, on_error: Callable[[str], None] | None = None):
        self.source = source
        self.on_error = on_error
        self.scale = source.info.scale  # level-0 source pixels per standardised pixel
        self.level = best_level(source.level_downsamples, self.scale)
        self.thumbnail = self._thumbnail()
        self.mask_integral = integral(tissue_mask(self.thumbnail), np.int32)  # counts <= MAX_MASK_PIXELS < 2^31
        self._colour_integral: np.ndarray | None = None  # built on first use (the release rule only)

    @property
    def info(self) -> SlideInfo:
        return self.source.info

    def _thumbnail(self) -> np.ndarray:
        """The slide with one pixel per MASK_PX standardised pixels (area average), built in pieces of at most
        BAND_SOURCE_PIXELS source pixels (row bands, cut in columns when a band is wider)."""
        mask_w, mask_h = self.info.std_width // MASK_PX, self.info.std_height // MASK_PX
        level = best_level(self.source.level_downsamples, self.scale * MASK_PX)
        step = self.scale * MASK_PX / self.source.level_downsamples[level]  # level pixels per mask pixel
        rows_per_band = max(1, int(BAND_SOURCE_PIXELS / (self.source.level_dimensions[level][0] * step)))
        columns_per_piece = max(1, int(BAND_SOURCE_PIXELS / (rows_per_band * step * step)))
        thumbnail = np.empty((mask_h, mask_w, 3), np.uint8)
        losses: list[tuple[int, int, int, int, int, str]] = []  # (left, top, right, bottom, squares, error) per piece
        for top in range(0, mask_h, rows_per_band):
            bottom = min(mask_h, top + rows_per_band)
            for left in range(0, mask_w, columns_per_piece):
                right = min(mask_w, left + columns_per_piece)
                losses += self._thumbnail_piece(thumbnail, level, step, left, top, right, bottom)
            self.source.forget(level, math.inf, bottom * step - CACHE_MARGIN)
        self.source.forget(level, math.inf, math.inf)
        if losses:
            self._report_thumbnail_losses(losses)
        return thumbnail

    def _thumbnail_piece(self, thumbnail: np.ndarray, level: int, step: float, left: int, top: int, right: int,
                         bottom: int) -> list[tuple[int, int, int, int, int, str]]:
        """Fill thumbnail[top:bottom, left:right]. When the piece cannot be read (a corrupt tile), its
        MASK_PX x MASK_PX squares are read one by one and the unreadable ones become glass (no tissue);
        returns the loss (none or one entry) for `on_error`; without `on_error` the error propagates."""
        def read(x0: int, y0: int, x1: int, y1: int) -> None:
            box = (x0 * step, y0 * step, x1 * step, y1 * step)
            thumbnail[y0:y1, x0:x1] = resample_region(self.source, level, box, (x1 - x0, y1 - y0), Image.Resampling.BOX)

        try:
            read(left, top, right, bottom)
            return []
        except Exception:
            self.source.recover()
            if self.on_error is None:
                raise
        lost, reason = 0, ""
        for y0 in range(top, bottom, MASK_PX):
            for x0 in range(left, right, MASK_PX):
                x1, y1 = min(right, x0 + MASK_PX), min(bottom, y0 + MASK_PX)
                try:
                    read(x0, y0, x1, y1)
                except Exception as error:
                    self.source.recover()
                    thumbnail[y0:y1, x0:x1] = 255
                    lost += 1
                    reason = reason or f"{type(error).__name__}: {error}"
        return [(left, top, right, bottom, lost, reason)] if lost else []

    def _report_thumbnail_losses(self, losses: list[tuple[int, int, int, int, int, str]]) -> None:
        """One line for every unreadable part of the thumbnail: the region they span, how many squares, the first
        error."""
        f, square = self.scale * MASK_PX, MASK_PX * MASK_PX
        left, top = min(loss[0] for loss in losses), min(loss[1] for loss in losses)
        right, bottom = max(loss[2] for loss in losses), max(loss[3] for loss in losses)
        lost = sum(loss[4] for loss in losses)
        self.on_error(f"thumbnail region x={left * f:.0f} y={top * f:.0f} w={(right - left) * f:.0f} "
                      f"h={(bottom - top) * f:.0f}: {lost} square(s) of {square}x{square} standardised px "
                      f"unreadable, taken as glass ({losses[0][5]})")

    def preview_colour(self, x: int, y: int, width: int, height: int) -> Colour | None:
        """Mean colour of the standardised rectangle from a pyramid level at least PREVIEW_SHRINK times coarser than
        the one cells are read from (decoded DCT-scaled 1/2); None when the pyramid has no such level or the read
        fails (the cell is then read whole, which handles the failure)."""
        downsamples = self.source.level_downsamples
        level = best_level(downsamples, self.scale * PREVIEW_SHRINK)
        if downsamples[level] < downsamples[self.level] * PREVIEW_SHRINK * 0.9:
            return None
        step = self.scale / downsamples[level]
        level_w, level_h = self.source.level_dimensions[level]
        left, top = round(x * step) // 2 * 2, round(y * step) // 2 * 2
        right, bottom = min(level_w, round((x + width) * step)), min(level_h, round((y + height) * step))
        if right - left < 2 or bottom - top < 2:
            return None
        try:
            pixels = self.source.read(level, left, top, right - left, bottom - top, 2)
        except Exception:
            self.source.recover()
            return None
        return mean_colour(np.asarray(pixels.convert("RGB") if pixels.mode != "RGB" else pixels))

    def tissue_fraction(self, x: int, y: int, side: int) -> float:
        """Fraction of the standardised square (x, y, side) that is tissue in the mask."""
        return float(area_mean(self.mask_integral, x // MASK_PX, y // MASK_PX, side // MASK_PX, side // MASK_PX))

    def thumbnail_colour(self, x: int, y: int, width: int, height: int) -> Colour:
        """Mean thumbnail colour of the standardised rectangle (whole mask pixels only)."""
        columns, rows = max(1, width // MASK_PX), max(1, height // MASK_PX)
        if self._colour_integral is None:
            self._colour_integral = integral(self.thumbnail, np.uint32)
        return tuple(area_mean(self._colour_integral, x // MASK_PX, y // MASK_PX, columns, rows))

    @property
    def step(self) -> float:
        """Pixels of the read level per standardised pixel."""
        return self.scale / self.source.level_downsamples[self.level]

    def read(self, x: int, y: int, width: int, height: int, out: np.ndarray | None = None) -> np.ndarray:
        """Standardised pixels of the rectangle (x, y, width, height), resampled band by band (into `out`)."""
        step = self.step
        out = np.empty((height, width, 3), np.uint8) if out is None else out
        band_rows = max(MASK_PX, int(BAND_SOURCE_PIXELS / (width * step * step)))
        for top in range(0, height, band_rows):
            bottom = min(height, top + band_rows)
            box = (x * step, (y + top) * step, (x + width) * step, (y + bottom) * step)
            resample_region(self.source, self.level, box, (width, bottom - top), RESAMPLE, out[top:bottom])
        return out

    def read_cell(self, cell: XLCell, needed: np.ndarray | None = None) -> np.ndarray:
        """A cell's standardised pixels: only the READ_BLOCK squares marked in `needed` (rows x columns; all when
        None), the others white. Read-only."""
        width, height = cell.width, cell.height
        partial = needed is not None and not needed.all()
        pixels = np.full((height, width, 3), 255, np.uint8) if partial else np.empty((height, width, 3), np.uint8)
        if not partial:
            needed = np.ones((-(-height // READ_BLOCK), -(-width // READ_BLOCK)), bool)
        for row, column, rows, columns in block_rectangles(needed):
            top, left = row * READ_BLOCK, column * READ_BLOCK
            bottom, right = min(height, top + rows * READ_BLOCK), min(width, left + columns * READ_BLOCK)
            self.read(cell.x0 + left, cell.y0 + top, right - left, bottom - top, pixels[top:bottom, left:right])
        pixels.flags.writeable = False
        return pixels

    def read_cell_blocks(self, cell: XLCell) -> tuple[np.ndarray, np.ndarray]:
        """A cell read in blocks of M_SIDE px (each with its own filter margin, so a readable block has the
        pixels of a whole read up to Pillow's rounding, +-1) and the grid of blocks that could not be read
        (white in the cell)."""
        width, height = cell.width, cell.height
        pixels = np.full((height, width, 3), 255, np.uint8)
        bad = np.zeros((-(-height // M_SIDE), -(-width // M_SIDE)), bool)
        for row, top in enumerate(range(0, height, M_SIDE)):
            for column, left in enumerate(range(0, width, M_SIDE)):
                w, h = min(M_SIDE, width - left), min(M_SIDE, height - top)
                try:
                    self.read(cell.x0 + left, cell.y0 + top, w, h, pixels[top:top + h, left:left + w])
                except Exception:
                    self.source.recover()
                    bad[row, column] = True
        pixels.flags.writeable = False
        return pixels, bad

    def done_with_cell(self, cell: XLCell) -> None:
        """Let the reader drop the decoded source tiles that no later cell (row-major order) needs."""
        step = self.step
        last_in_row = cell.x0 + cell.width >= self.info.std_width
        right = math.inf if last_in_row else (cell.x0 + XL_SIDE) * step - CACHE_MARGIN
        self.source.forget(self.level, right, (cell.y0 + XL_SIDE) * step - CACHE_MARGIN)
