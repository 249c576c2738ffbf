"""Slide readers: one class per backend behind `open_slide`, which checks the MPP and size from the header.

Every reader has the face of the `SlideReader` protocol. `TiffJpegReader` decodes a TIFF's JPEG tiles
directly (Aperio SVS and generic tiled TIFF: tifffile for the layout, Pillow's libjpeg-turbo for the pixels,
shrunk in the DCT domain when the caller averages by 2 or more), only the tiles a region needs, each tile
once while it is needed; `OpenSlideReader` serves every other format OpenSlide opens, with `read_region`.

Hostile input is refused from the header with one `SlideError` naming the file and the reason: an MPP
outside MPP_RANGE or upsampled more than MAX_UPSAMPLING, a TIFF resolution that is a default rather
than a scan's, a size over MAX_SLIDE_PIXELS or a tissue thumbnail over MAX_MASK_PIXELS.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, get_args

import numpy as np
import openslide
import tifffile
from PIL import Image

from ...standard import MPP_RANGE, STANDARD_MPP
from .grid import MASK_PX

FAST_PATH_VENDORS = ("aperio", "generic-tiff")
# A slide coarser than the standard is upsampled; beyond this factor (MPP > 1.24 um/px) it holds too
# little detail for the standard's tiles and is refused. 10x scans (~1 um/px) still convert.
MAX_UPSAMPLING = 2.5
# Bounds checked from the header, before anything is allocated, so that a worker's memory stays bounded
# whatever a file claims (`python benchmarks/slide_memory.py` measures the peak at the bound). Level 0: at
# most 2^36 px (e.g. 262,144 x 262,144). Tissue thumbnail, mask and summed-area tables: one pixel per
# MASK_PX x MASK_PX standardised pixels, at most 2^25 of them (~12 bytes each, +12 under the release rule),
# i.e. about 190,000 x 190,000 px at 0.25 um/px.
MAX_SLIDE_PIXELS = 2**36
MAX_MASK_PIXELS = 2**25
JPEG, RGB, YCBCR = 7, 2, 6  # TIFF Compression and PhotometricInterpretation values
ReaderName = Literal["auto", "tifffile", "openslide"]  # "auto": the tifffile fast path where it serves
ReaderKind = Literal["tifffile", "openslide"]


class SlideError(Exception):
    """A slide that cannot be converted; `str()` names the file and the reason."""

    def __init__(self, path: Path | str, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


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


def tiff_levels(path: Path, slide: openslide.OpenSlide) -> tuple[tifffile.TiffFile, list[tifffile.TiffPage]] | None:
    """For a slide OpenSlide reads as a TIFF (FAST_PATH_VENDORS), the open TIFF and the tiled page of each level,
    its header checked (`check_tiff_level`); None for other formats or when a level has no tiled page."""
    if slide.properties.get(openslide.PROPERTY_NAME_VENDOR) not in FAST_PATH_VENDORS:
        return None
    tif = tifffile.TiffFile(path)
    try:
        by_size = {}
        for page in tif.pages:
            if page.is_tiled:
                by_size.setdefault((page.imagewidth, page.imagelength), page)
        pages = [by_size.get(size) for size in slide.level_dimensions]
        if any(page is None for page in pages):
            tif.close()
            return None
        file_size = os.path.getsize(path)
        for page in pages:
            check_tiff_level(path, page, file_size)
    except Exception:
        tif.close()
        raise
    return tif, pages


def is_jpeg_rgb(page: tifffile.TiffPage) -> bool:
    """Whether the fast reader decodes this page: JPEG tiles of 8-bit RGB (or YCbCr) pixels, interleaved."""
    return (page.compression == JPEG and page.photometric in (RGB, YCBCR) and page.samplesperpixel == 3
            and page.bitspersample == 8 and page.planarconfig == 1 and page.imagedepth == 1)


def check_tiff_level(path: Path, page: tifffile.TiffPage, file_size: int) -> None:
    """Refuse, from the header, a level that is greyscale, whose tile table is shorter than its claimed size needs,
    or whose tile data runs past the end of the file."""
    if page.samplesperpixel == 1:
        raise SlideError(path, f"greyscale image ({page.photometric.name.lower()}, one sample per pixel), not an H&E "
                               f"colour scan: CPIA converts H&E slides; leave it out of the catalog entry's pattern")
    across, down = -(-page.imagewidth // page.tilewidth), -(-page.imagelength // page.tilelength)
    needed = across * down * (page.samplesperpixel if page.planarconfig == 2 else 1)
    if len(page.dataoffsets) < needed:
        raise SlideError(path, f"the header claims {page.imagewidth}x{page.imagelength} px, but its tile table holds "
                               f"{len(page.dataoffsets)} of the {needed} tiles that size needs (a damaged or edited "
                               f"header): re-export or re-copy the slide")
    end = max(o + c for o, c in zip(page.dataoffsets, page.databytecounts))
    if end > file_size:
        raise SlideError(path, f"file truncated: tile data of a {page.imagewidth}x{page.imagelength} "
                               f"level ends at byte {end}, file has {file_size}")


def slide_mpp(path: Path, slide: openslide.OpenSlide, mpp_override: float | None) -> float:
    """The catalog MPP when given, else the slide's; never guessed; refused when implausible."""
    if mpp_override is not None:
        mpp, source = float(mpp_override), "catalog mpp"
    else:
        mpp, source = metadata_mpp(path, slide), "slide metadata"
    if not math.isfinite(mpp) or not MPP_RANGE[0] <= mpp <= MPP_RANGE[1]:
        raise SlideError(path, f"MPP {mpp:g} um/px ({source}) is outside the plausible range "
                               f"{MPP_RANGE[0]}-{MPP_RANGE[1]} um/px")
    if mpp / STANDARD_MPP > MAX_UPSAMPLING:
        raise SlideError(path, f"MPP {mpp:g} um/px ({source}) would be upsampled {mpp / STANDARD_MPP:.1f}x to "
                               f"{STANDARD_MPP} um/px; at most {MAX_UPSAMPLING}x is allowed")
    return mpp


def metadata_mpp(path: Path, slide: openslide.OpenSlide) -> float:
    """The slide's own square-pixel MPP. A generic TIFF's MPP comes from its resolution tags, which most
    writers fill with a screen default (72 dpi = 352.78 um/px): outside MPP_RANGE it means "no MPP"."""
    properties = slide.properties
    mpp_x, mpp_y = properties.get(openslide.PROPERTY_NAME_MPP_X), properties.get(openslide.PROPERTY_NAME_MPP_Y)
    if mpp_x is None:
        raise SlideError(path, "no MPP in slide metadata and no catalog mpp")
    values = [metadata_number(path, name, value) for name, value in (("mpp-x", mpp_x), ("mpp-y", mpp_y))
              if value is not None]
    if not all(v > 0 for v in values):  # negative, zero or NaN: not a pixel size at all
        kind = "negative" if any(v < 0 for v in values) else "not positive"
        raise SlideError(path, f"invalid MPP in slide metadata (mpp-x {mpp_x}, mpp-y {mpp_y}: {kind}): give the "
                               f"scan's MPP as the catalog entry's mpp")
    mpp = values[0]
    from_tags = properties.get(openslide.PROPERTY_NAME_VENDOR) == "generic-tiff"
    if from_tags and not MPP_RANGE[0] <= mpp <= MPP_RANGE[1]:
        resolution, unit = properties.get("tiff.XResolution"), properties.get("tiff.ResolutionUnit")
        raise SlideError(path, f"no MPP in slide metadata and no catalog mpp (the TIFF resolution tags say "
                               f"{resolution} pixels per {unit}, {mpp:g} um/px: a default, not a scan)")
    if len(values) == 2 and abs(values[1] - mpp) > 0.01 * mpp:
        raise SlideError(path, f"non-square pixels: mpp-x {mpp_x}, mpp-y {mpp_y}")
    return mpp


def metadata_number(path: Path, name: str, value: str) -> float:
    """A metadata MPP as a number; SlideError naming the value when it is not one."""
    try:
        return float(value)
    except ValueError:
        raise SlideError(path, f"invalid MPP in slide metadata ({name} {value!r} is not a number): give the scan's "
                               f"MPP as the catalog entry's mpp") from None


def check_size(path: Path, dimensions: tuple[int, int], mpp: float) -> None:
    """Refuse a slide whose level 0 or tissue thumbnail exceeds the bounds, before reading any pixel."""
    width, height = dimensions
    if width * height > MAX_SLIDE_PIXELS:
        raise SlideError(path, f"{width}x{height} px exceeds the limit of {MAX_SLIDE_PIXELS:,} px per slide")
    scale = STANDARD_MPP / mpp
    mask_pixels = (int(width / scale) // MASK_PX) * (int(height / scale) // MASK_PX)
    if mask_pixels > MAX_MASK_PIXELS:
        raise SlideError(path, f"{width}x{height} px at {mpp:g} um/px needs a tissue thumbnail of {mask_pixels:,} px, "
                               f"over the limit of {MAX_MASK_PIXELS:,}")
