"""Slide readers: one class per backend behind `open_slide`, which checks the MPP and size from the header.

Every reader has the face of the `SlideReader` protocol. `TiffJpegReader` decodes a TIFF's JPEG tiles
directly (Aperio SVS and generic tiled TIFF: tifffile for the layout, Pillow's libjpeg-turbo for the pixels,
shrunk in the DCT domain when the caller averages by 2 or more), only the tiles a region needs, each tile
once while it is needed; `OpenSlideReader` serves every other format OpenSlide opens, with `read_region`.

Hostile input is refused from the header (`header.py`) with one `SlideError` naming the file and the reason.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, get_args

import numpy as np
import openslide
import tifffile
from PIL import Image

from ...standard import STANDARD_MPP
from .header import RGB, SlideError, check_size, is_jpeg_rgb, slide_mpp, tiff_levels

ReaderName = Literal["auto", "tifffile", "openslide"]  # "auto": the tifffile fast path where it serves
ReaderKind = Literal["tifffile", "openslide"]


@dataclass(frozen=True)
class SlideInfo:
    """Level-0 size, MPP, standardised size and the reader used."""

    path: Path
    width: int
    height: int
    mpp: float
    std_width: int
    std_height: int
    reader: ReaderKind

    @property
    def scale(self) -> float:
        """Level-0 source pixels per standardised pixel."""
        return STANDARD_MPP / self.mpp


class SlideReader(Protocol):
    """What every slide reader offers. Where tiles are cut is the grid's business, not the reader's."""

    name: ReaderKind
    info: SlideInfo
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]

    def read(self, level: int, x: int, y: int, width: int, height: int, factor: int = 1) -> Image.Image:
        """The rectangle (x, y, width, height) of `level` averaged `factor` x `factor` (x and y multiples of
        `factor`): ceil(width / factor) x ceil(height / factor) pixels, RGB or RGBX."""

    def forget(self, level: int, right: float, bottom: float) -> None:
        """The reads still to come on `level` start right of `right` or below `bottom` (level pixels)."""

    def recover(self) -> None:
        """Make the reader usable again after a failed read."""

    def close(self) -> None:
        """Release the file."""


class OpenSlideReader:
    """Regions through OpenSlide's `read_region`, any format it supports."""

    name: ReaderKind = "openslide"

    def __init__(self, info: SlideInfo, slide: openslide.OpenSlide):
        self.info = info
        self.slide = slide
        self.level_dimensions = slide.level_dimensions
        self.level_downsamples = slide.level_downsamples

    def read(self, level: int, x: int, y: int, width: int, height: int, factor: int = 1) -> Image.Image:
        """The rectangle (x, y, width, height) of `level`, averaged `factor` x `factor`; transparency becomes white.

        OpenSlide places regions in level-0 coordinates, so above level 0 the origin is rounded.
        """
        downsample = self.level_downsamples[level]
        location = (round(x * downsample), round(y * downsample))
        rgba = np.asarray(self.slide.read_region(location, level, (width, height)))
        alpha = rgba[..., 3:]
        if alpha.min() < 255:  # OpenSlide returns non-premultiplied RGBA: composite on white
            rgb = rgba.astype(np.uint16) * alpha + 255 * (255 - alpha.astype(np.uint16))
            rgba = (rgb // 255).astype(np.uint8)
        # RGBX shares the array with Pillow instead of copying it (the X channel is ignored).
        pixels = Image.frombuffer("RGBX", (width, height), rgba, "raw", "RGBX", 0, 1)
        return pixels.reduce(factor) if factor > 1 else pixels

    def recover(self) -> None:
        """OpenSlide errors are sticky: reopen the slide after a failed read."""
        self.slide.close()
        self.slide = openslide.OpenSlide(self.info.path)

    def forget(self, level: int, right: float, bottom: float) -> None:
        """Nothing to drop: OpenSlide keeps its own bounded tile cache."""

    def close(self) -> None:
        self.slide.close()


class TiffJpegReader:
    """Regions decoded straight from a TIFF's JPEG tiles (the fast path for Aperio SVS and generic tiled
    TIFF): only the tiles a region touches are read.

    Tiles are decoded with Pillow's libjpeg-turbo decoder (faster here than imagecodecs', which
    also clears its output first), shrunk in the DCT domain by the largest power of two (<= 8)
    dividing the requested averaging factor: at 0.25 um/px a tile is decoded straight to half
    size, skipping most of the inverse DCT, the colour conversion and a 2 x 2 average.
    Decoded tiles are kept until `forget` says no later read needs them, so that a tile shared by
    two reads (bands, blocks, neighbouring cells) is decoded once.
    """

    name: ReaderKind = "tifffile"

    def __init__(self, info: SlideInfo, tif: tifffile.TiffFile, pages: list[tifffile.TiffPage],
                 downsamples: tuple[float, ...]):
        self.info = info
        self.tif = tif
        self.pages = pages
        self.level_dimensions = tuple((p.imagewidth, p.imagelength) for p in pages)
        self.level_downsamples = downsamples
        self.decoded: dict[tuple[int, int, int], Image.Image] = {}  # (level, tile index, shrink) -> tile
        # Aperio writes RGB JPEG streams without a JFIF marker: tell libjpeg not to convert from YCbCr.
        self.colorspaces = ["RGB" if p.photometric == RGB and not p.is_jfif else "" for p in pages]

    def dct_shrink(self, level: int, factor: int) -> int:
        """The power of two (<= 8, libjpeg's limit) that `read` shrinks `level`'s tiles by in the DCT domain."""
        page = self.pages[level]
        return next(s for s in (8, 4, 2, 1) if factor % s == 0 and page.tilewidth % s == 0 and page.tilelength % s == 0)

    def decode_tile(self, level: int, index: int, shrink: int) -> Image.Image:
        """Tile `index` of `level` decoded at 1/`shrink` scale (not cached: `read` keeps what it decodes).

        A tile crossing the level's edge off the `shrink` grid is decoded whole, cut at the edge and
        averaged by `Image.reduce`, whose last partial block holds only pixels inside the level
        (a DCT-scaled pixel there would mix in the tile's padding).
        """
        page = self.pages[level]
        tile_w, tile_h = page.tilewidth, page.tilelength
        row, column = divmod(index, -(-page.imagewidth // tile_w))
        inside_w = min(tile_w, page.imagewidth - column * tile_w)
        inside_h = min(tile_h, page.imagelength - row * tile_h)
        self.tif.filehandle.seek(page.dataoffsets[index])
        data = self.tif.filehandle.read(page.databytecounts[index])
        if page.jpegtables:  # abbreviated stream: put the shared tables in front of its frame
            data = page.jpegtables[:-2] + data[2:]
        exact = inside_w % shrink == 0 and inside_h % shrink == 0
        scale = shrink if exact else 1
        tile = Image.new("RGB", (tile_w // scale, tile_h // scale), None)  # not cleared: the decoder fills it
        tile.frombytes(data, "jpeg", "RGBX", self.colorspaces[level], scale)
        return tile if exact else tile.crop((0, 0, inside_w, inside_h)).reduce(shrink)

    def read(self, level: int, x: int, y: int, width: int, height: int, factor: int = 1) -> Image.Image:
        """The rectangle (x, y, width, height) of `level` shrunk `factor` times, from the JPEG tiles covering it.

        `x` and `y` are multiples of `factor`; the result is ceil(width / factor) x ceil(height / factor).
        Pixels are shrunk in the DCT domain as far as a power of two allows, then by `Image.reduce`.
        """
        page = self.pages[level]
        tile_w, tile_h = page.tilewidth, page.tilelength
        shrink = self.dct_shrink(level, factor)
        across = -(-page.imagewidth // tile_w)
        out = Image.new("RGB", (-(-width // shrink), -(-height // shrink)), None)
        rows = range(y // tile_h, (y + height - 1) // tile_h + 1)
        columns = range(x // tile_w, (x + width - 1) // tile_w + 1)
        for row in rows:
            for column in columns:
                key = (level, row * across + column, shrink)
                tile = self.decoded.get(key)
                if tile is None:
                    tile = self.decoded[key] = self.decode_tile(*key)
                out.paste(tile, ((column * tile_w - x) // shrink, (row * tile_h - y) // shrink))  # clipped to `out`
        return out.reduce(factor // shrink) if factor > shrink else out

    def forget(self, level: int, right: float, bottom: float) -> None:
        """Drop the decoded tiles of other levels, and those of `level` lying left of `right` and above
        `bottom` (level pixels): the reads still to come start right of or below them."""
        page = self.pages[level]
        across = -(-page.imagewidth // page.tilewidth)

        def needed(key: tuple[int, int, int]) -> bool:
            row, column = divmod(key[1], across)
            return key[0] == level and ((column + 1) * page.tilewidth > right or (row + 1) * page.tilelength > bottom)

        self.decoded = {key: tile for key, tile in self.decoded.items() if needed(key)}

    def recover(self) -> None:
        """Forget the tiles kept from the failed read."""
        self.decoded = {}

    def close(self) -> None:
        self.tif.close()


def open_slide(path: Path | str, mpp_override: float | None = None, *, reader: ReaderName = "auto") -> SlideReader:
    """Open a slide with the fastest reader that serves it ("auto"), or the one `reader` names; SlideError when
    it cannot be converted. `mpp_override` (the catalog's MPP) takes precedence over the slide's metadata."""
    path = Path(path)
    if reader not in get_args(ReaderName):
        raise ValueError(f"unknown reader {reader!r}")
    try:
        slide = openslide.OpenSlide(path)
    except (openslide.OpenSlideError, OSError) as error:
        raise SlideError(path, f"cannot open slide ({type(error).__name__}: {error})") from error
    try:
        mpp = slide_mpp(path, slide, mpp_override)
        check_size(path, slide.dimensions, mpp)
        try:
            levels = tiff_levels(path, slide)
        except (tifffile.TiffFileError, OSError, ValueError) as error:
            raise SlideError(path, f"cannot read TIFF structure ({type(error).__name__}: {error})") from error
        fast = levels is not None and reader != "openslide" and all(is_jpeg_rgb(page) for page in levels[1])
        if levels is not None and not fast:
            levels[0].close()
        if not fast and reader == "tifffile":
            raise SlideError(path, "not a JPEG-tiled TIFF slide: the tifffile reader cannot serve it")
    except Exception:
        slide.close()
        raise
    width, height = slide.dimensions
    scale = STANDARD_MPP / mpp
    kind = TiffJpegReader.name if fast else OpenSlideReader.name
    info = SlideInfo(path, width, height, mpp, int(width / scale), int(height / scale), kind)
    if not fast:
        return OpenSlideReader(info, slide)
    downsamples = slide.level_downsamples
    slide.close()
    return TiffJpegReader(info, *levels, downsamples)


def open_slide_info(path: Path | str, mpp_override: float | None = None, *, reader: ReaderName = "auto") -> SlideInfo:
    """Size, MPP and standardised size of a slide; SlideError when it cannot be converted."""
    opened = open_slide(path, mpp_override, reader=reader)
    opened.close()
    return opened.info


