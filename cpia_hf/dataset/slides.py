"""Whole-slide images to CPIA tiles: read the MPP, resample to the standard, cut the nested grid.

A slide is resampled to STANDARD_MPP (0.4942 um/px) exactly, and the standardised slide is cut
into a global grid of XL cells (3840 px). Each cell holds 4x4 L tiles, 10x10 M tiles and, inside
each M tile, 4x4 S positions of which `s_per_m` are kept. L/M/S tiles whose square lies inside
the standardised slide are produced even when their XL cell is not fully inside.

Reading is bounded: a tissue mask from a low-resolution level is computed first, cells without
tissue (or, under the release rule, whose thumbnail colour fails the XL rule by a clear margin)
are never read, under the mask rule only the parts of a cell under kept tiles are read (the mask
decides every tile before any pixel is decoded), and a cell is resampled in bands of at most
BAND_SOURCE_PIXELS source pixels from the pyramid level closest to (not coarser than) the
standard. TIFF slides with JPEG tiles (Aperio SVS, generic tiled TIFF) are decoded directly
(tifffile for the layout, Pillow's libjpeg-turbo for the pixels, shrunk in the DCT domain when the
resampling shrinks by 2 or more) from the tiles a region needs, each tile once per slide; every
other format OpenSlide opens is read with `read_region`. One reader class per backend
(`OpenSlideReader`, `TiffJpegReader`, same methods); the grid's coordinates (`xl_cells`,
`tile_offsets`) are apart from reading.

Hostile input is refused from the header with one `SlideError` naming the file and the reason: an MPP
outside MPP_RANGE or upsampled more than MAX_UPSAMPLING, a TIFF resolution that is a default rather
than a scan's, a size over MAX_SLIDE_PIXELS or a thumbnail over MAX_MASK_PIXELS. A corrupt tile costs
only the tiles whose reads touch it.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal, get_args

import cv2
import numpy as np
import openslide
import tifffile
from PIL import Image

from ..standard import MPP_RANGE, SCALE_SIDES, STANDARD_MPP, stable_unit_float, tile_name
from .tissue import TissueRule, keeps_tile, release_surely_drops_xl, release_surely_keeps_xl, tissue_mask

# Resampling: an integer k x k shrink (JPEG DCT scaling on the fast path, else `Image.reduce`) then a
# bilinear filter for the remaining factor: Pillow's antialiased tent filter when it still shrinks,
# OpenCV's `warpAffine` (the same interpolation, 2.6x faster, no antialiasing needed) when it enlarges.
# On H&E at 0.25 -> 0.4942 um/px this is ~45 dB PSNR from a direct Lanczos resize (as close as k x k
# average + bilinear), at a fraction of its cost; `python benchmarks/convert.py` prints the comparison.
# The shrink k is taken when the factor is >= k / 1.1, so that every usual 40x MPP (0.22-0.2718,
# e.g. Aperio AT2 0.2527, GT450 0.263) is decoded at half size in the DCT domain and then enlarged
# by at most 10 %: measured at 0.2527 um/px, 45.1 dB from Lanczos (49.2 dB decoding at full size)
# for 2.5x less resampling and decoding work.
RESAMPLE = Image.Resampling.BILINEAR
PRE_REDUCE_SLACK = 0.1  # pre-reduce by k when the factor is >= k / 1.1 (at most 10% upsampling after)
FILTER_SUPPORT = {
    Image.Resampling.BOX: 0.5, Image.Resampling.BILINEAR: 1.0, Image.Resampling.HAMMING: 1.0,
    Image.Resampling.BICUBIC: 2.0, Image.Resampling.LANCZOS: 3.0,
}
XL_SIDE, M_SIDE, S_SIDE = (SCALE_SIDES[s] for s in ("XL", "M", "S"))
MASK_PX = 16  # standardised pixels per tissue-mask pixel; every tile side is a multiple of it
BAND_SOURCE_PIXELS = 2**24  # source pixels read per band (64 MB as RGBX): memory stays bounded
# Under the release rule a cell its thumbnail leaves undecided is first read from a level PREVIEW_SHRINK times
# coarser (a scanner's pyramid is box-reduced, so its mean colour is the full resolution's within JPEG error)
# and skipped when that mean fails the XL rule by more than PREVIEW_MARGIN levels (measured on the benchmark
# slides: within 0.1 of the standardised cell's mean; real scanners' pyramid JPEGs may differ more).
PREVIEW_SHRINK = 4
PREVIEW_MARGIN = 2.0
CACHE_MARGIN = 64  # level pixels: decoded tiles this close to the next read are kept for it (its filter margin)
FAST_PATH_VENDORS = ("aperio", "generic-tiff")
# A slide coarser than the standard is upsampled; beyond this factor (MPP > 1.24 um/px) it holds too
# little detail for the standard's tiles and is refused. 10x scans (~1 um/px) still convert.
MAX_UPSAMPLING = 2.5
# Bounds checked from the header, before anything is allocated, so that a worker stays under 1 GB
# whatever a file claims. Level 0: at most 2^36 px (e.g. 262,144 x 262,144). Tissue thumbnail, mask and
# summed-area tables: one pixel per MASK_PX x MASK_PX standardised pixels, at most 2^25 of them
# (~12 bytes each, +12 under the release rule; measured peak 0.41 / 0.75 GB at the bound), i.e. about
# 190,000 x 190,000 px at 0.25 um/px.
MAX_SLIDE_PIXELS = 2**36
MAX_MASK_PIXELS = 2**25
# Under the mask rule a cell is read only where kept tiles lie, decided on a grid of READ_BLOCK x READ_BLOCK
# squares (192 px divides the XL, L and M sides, so every tile covers whole squares), the needed squares merged
# into as few rectangles as possible (a cell of tissue is one rectangle, read in bands).
READ_BLOCK = 192
# Conversion runs one slide per process: OpenCV's own thread pool would only oversubscribe the cores.
cv2.setNumThreads(1)
JPEG, RGB, YCBCR = 7, 2, 6  # TIFF Compression and PhotometricInterpretation values
ReaderName = Literal["auto", "tifffile", "openslide"]  # "auto": the tifffile fast path where it serves


class SlideError(Exception):
    """A slide that cannot be converted; `str()` names the file and the reason."""

    def __init__(self, path: Path | str, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


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


@dataclass
class SlideInfo:
    """Level-0 size, MPP, standardised size and the reader used ("tifffile" or "openslide")."""

    path: Path
    width: int
    height: int
    mpp: float
    std_width: int
    std_height: int
    reader: Literal["tifffile", "openslide"]


class OpenSlideReader:
    """Regions through OpenSlide's `read_region`, any format it supports.

    Every reader has the same face: `name`, `level_dimensions`, `level_downsamples`,
    `read(level, x, y, width, height, factor)` (level pixels averaged `factor` x `factor`, as a Pillow
    image), `forget(level, right, bottom)` when the reads left of `right` and above `bottom` are done,
    `recover()` after a failed read, and `close()`. Where tiles are cut is the grid's business
    (`xl_cells`, `tile_offsets`), not the reader's."""

    name = "openslide"

    def __init__(self, path: Path, slide: openslide.OpenSlide):
        self.path = path
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
        self.slide = openslide.OpenSlide(self.path)

    def forget(self, level: int, right: float, bottom: float) -> None:
        """Nothing to drop: OpenSlide keeps its own bounded tile cache."""

    def close(self) -> None:
        self.slide.close()


class TiffJpegReader:
    """Regions decoded straight from a TIFF's JPEG tiles (the fast path for Aperio SVS and generic tiled
    TIFF): only the tiles a region touches are read. Same face as `OpenSlideReader`.

    Tiles are decoded with Pillow's libjpeg-turbo decoder (faster here than imagecodecs', which
    also clears its output first), shrunk in the DCT domain by the largest power of two (<= 8)
    dividing the requested averaging factor: at 0.25 um/px a tile is decoded straight to half
    size, skipping most of the inverse DCT, the colour conversion and a 2 x 2 average.
    Decoded tiles are kept until `forget` says no later read needs them, so that a tile shared by
    two reads (bands, blocks, neighbouring cells) is decoded once.
    """

    name = "tifffile"

    def __init__(self, path: Path, tif: tifffile.TiffFile, pages: list[tifffile.TiffPage],
                 downsamples: tuple[float, ...]):
        self.path = path
        self.tif = tif
        self.pages = pages
        self.level_dimensions = tuple((p.imagewidth, p.imagelength) for p in pages)
        self.level_downsamples = downsamples
        self.decoded: dict[tuple[int, int, int], Image.Image] = {}  # (level, tile index, shrink) -> tile
        # Aperio writes RGB JPEG streams without a JFIF marker: tell libjpeg not to convert from YCbCr.
        self.colorspaces = ["RGB" if p.photometric == RGB and not p.is_jfif else "" for p in pages]

    @classmethod
    def open(cls, path: Path, slide: openslide.OpenSlide) -> TiffJpegReader | None:
        """The fast reader when every OpenSlide level is a JPEG-tiled RGB TIFF page, else None."""
        if slide.properties.get(openslide.PROPERTY_NAME_VENDOR) not in FAST_PATH_VENDORS:
            return None
        tif = tifffile.TiffFile(path)
        by_size = {}
        for page in tif.pages:
            if (page.is_tiled and page.compression == JPEG and page.photometric in (RGB, YCBCR)
                    and page.samplesperpixel == 3 and page.bitspersample == 8 and page.planarconfig == 1 and page.imagedepth == 1):
                by_size.setdefault((page.imagewidth, page.imagelength), page)
        pages = [by_size.get(size) for size in slide.level_dimensions]
        if any(page is None for page in pages):
            tif.close()
            return None
        file_size = os.path.getsize(path)
        for page in pages:
            end = max(o + c for o, c in zip(page.dataoffsets, page.databytecounts))
            if end > file_size:
                tif.close()
                raise SlideError(path, f"file truncated: tile data of a {page.imagewidth}x{page.imagelength} "
                                       f"level ends at byte {end}, file has {file_size}")
        return cls(path, tif, pages, slide.level_downsamples)

    def dct_shrink(self, level: int, factor: int) -> int:
        """The power of two (<= 8, libjpeg's limit) that `read` shrinks `level`'s tiles by in the DCT domain."""
        page = self.pages[level]
        return next(s for s in (8, 4, 2, 1) if factor % s == 0 and page.tilewidth % s == 0 and page.tilelength % s == 0)

    def _decode(self, level: int, index: int, shrink: int) -> Image.Image:
        """Tile `index` of `level` decoded at 1/`shrink` scale.

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
                    tile = self.decoded[key] = self._decode(*key)
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


SlideReader = OpenSlideReader | TiffJpegReader


def xl_cells(std_width: int, std_height: int) -> Iterator[tuple[int, int, int, int, int, int]]:
    """The global grid's XL cells of a standardised slide, row-major: (cx, cy, x0, y0, width, height),
    width and height clipped to the slide (partial cells at the right and bottom borders)."""
    for cy in range(-(-std_height // XL_SIDE)):
        for cx in range(-(-std_width // XL_SIDE)):
            x0, y0 = cx * XL_SIDE, cy * XL_SIDE
            yield cx, cy, x0, y0, min(XL_SIDE, std_width - x0), min(XL_SIDE, std_height - y0)


def tile_offsets(width: int, height: int, side: int) -> list[tuple[int, int]]:
    """Offsets (i, j) of the `side` tiles lying fully inside a width x height cell, row-major."""
    return [(i, j) for j in range(0, height - side + 1, side) for i in range(0, width - side + 1, side)]


def _slide_mpp(path: Path, slide: openslide.OpenSlide, mpp_override: float | None) -> float:
    """The catalog MPP when given, else the slide's; never guessed; refused when implausible."""
    if mpp_override is not None:
        mpp, source = float(mpp_override), "catalog mpp"
    else:
        mpp, source = _metadata_mpp(path, slide), "slide metadata"
    if not math.isfinite(mpp) or not MPP_RANGE[0] <= mpp <= MPP_RANGE[1]:
        raise SlideError(path, f"MPP {mpp:g} um/px ({source}) is outside the plausible range "
                               f"{MPP_RANGE[0]}-{MPP_RANGE[1]} um/px")
    if mpp / STANDARD_MPP > MAX_UPSAMPLING:
        raise SlideError(path, f"MPP {mpp:g} um/px ({source}) would be upsampled {mpp / STANDARD_MPP:.1f}x to "
                               f"{STANDARD_MPP} um/px; at most {MAX_UPSAMPLING}x is allowed")
    return mpp


def _metadata_mpp(path: Path, slide: openslide.OpenSlide) -> float:
    """The slide's own square-pixel MPP. A generic TIFF's MPP comes from its resolution tags, which most
    writers fill with a screen default (72 dpi = 352.78 um/px): outside MPP_RANGE it means "no MPP"."""
    properties = slide.properties
    mpp_x = properties.get(openslide.PROPERTY_NAME_MPP_X)
    if mpp_x is None:
        raise SlideError(path, "no MPP in slide metadata and no catalog mpp")
    mpp = float(mpp_x)
    from_tags = properties.get(openslide.PROPERTY_NAME_VENDOR) == "generic-tiff"
    if from_tags and not MPP_RANGE[0] <= mpp <= MPP_RANGE[1]:
        resolution, unit = properties.get("tiff.XResolution"), properties.get("tiff.ResolutionUnit")
        raise SlideError(path, f"no MPP in slide metadata and no catalog mpp (the TIFF resolution tags say "
                               f"{resolution} pixels per {unit}, {mpp:g} um/px: a default, not a scan)")
    mpp_y = properties.get(openslide.PROPERTY_NAME_MPP_Y)
    if mpp_y is not None and abs(float(mpp_y) - mpp) > 0.01 * mpp:
        raise SlideError(path, f"non-square pixels: mpp-x {mpp_x}, mpp-y {mpp_y}")
    return mpp


def _check_size(path: Path, dimensions: tuple[int, int], mpp: float) -> None:
    """Refuse a slide whose level 0 or tissue thumbnail exceeds the bounds, before reading any pixel."""
    width, height = dimensions
    if width * height > MAX_SLIDE_PIXELS:
        raise SlideError(path, f"{width}x{height} px exceeds the limit of {MAX_SLIDE_PIXELS:,} px per slide")
    scale = STANDARD_MPP / mpp
    mask_pixels = (int(width / scale) // MASK_PX) * (int(height / scale) // MASK_PX)
    if mask_pixels > MAX_MASK_PIXELS:
        raise SlideError(path, f"{width}x{height} px at {mpp:g} um/px needs a tissue thumbnail of {mask_pixels:,} px, "
                               f"over the limit of {MAX_MASK_PIXELS:,}")


def _open(path: Path, mpp_override: float | None, reader: ReaderName) -> tuple[SlideInfo, SlideReader]:
    """Open a slide with the fastest reader that serves it (`reader`: "auto", "tifffile", "openslide")."""
    path = Path(path)
    if reader not in get_args(ReaderName):
        raise ValueError(f"unknown reader {reader!r}")
    try:
        slide = openslide.OpenSlide(path)
    except (openslide.OpenSlideError, OSError) as error:
        raise SlideError(path, f"cannot open slide ({type(error).__name__}: {error})") from error
    try:
        mpp = _slide_mpp(path, slide, mpp_override)
        _check_size(path, slide.dimensions, mpp)
        fast = None
        if reader != "openslide":
            try:
                fast = TiffJpegReader.open(path, slide)
            except (tifffile.TiffFileError, OSError, ValueError) as error:
                raise SlideError(path, f"cannot read TIFF structure ({type(error).__name__}: {error})") from error
            if fast is None and reader == "tifffile":
                raise SlideError(path, "not a JPEG-tiled TIFF slide: the tifffile reader cannot serve it")
    except Exception:
        slide.close()
        raise
    width, height = slide.dimensions
    if fast is not None:
        slide.close()
    scale = STANDARD_MPP / mpp
    info = SlideInfo(path, width, height, mpp, int(width / scale), int(height / scale),
                     fast.name if fast is not None else OpenSlideReader.name)
    return info, fast if fast is not None else OpenSlideReader(path, slide)


def open_slide_info(path: Path, mpp_override: float | None = None, *, reader: ReaderName = "auto") -> SlideInfo:
    """Size, MPP and standardised size of a slide; SlideError when it cannot be converted.

    `mpp_override` (the catalog's MPP) takes precedence over the slide's metadata.
    """
    info, opened = _open(path, mpp_override, reader)
    opened.close()
    return info


def _best_level(downsamples: tuple[float, ...], scale: float) -> int:
    """The coarsest level whose downsample does not exceed `scale` (level 0 when none is finer)."""
    fitting = [i for i, d in enumerate(downsamples) if d <= scale * (1 + 1e-9)]
    return max(fitting, key=lambda i: downsamples[i]) if fitting else 0


def _resampled(source, level: int, box: tuple[float, float, float, float], size: tuple[int, int],
               resample: Image.Resampling, out: np.ndarray | None = None) -> np.ndarray:
    """Resample the level-`level` rectangle `box` (float level coordinates) to `size` pixels (into `out`).

    When shrinking by k >= 2, the reader first averages k x k (on a grid anchored at the level's
    origin, in the DCT domain where it can) and the filter does the rest of the way. The integer
    rectangle read around `box` carries the filter's support, so that a region resampled in
    pieces equals the same region resampled whole (up to Pillow's rounding of sub-boxes, +-1 level).
    """
    level_w, level_h = source.level_dimensions[level]
    left, top, right, bottom = box
    ratio = max((right - left) / size[0], (bottom - top) / size[1])
    factor = max(1, int(ratio * (1 + PRE_REDUCE_SLACK)))
    margin = factor * (math.ceil(FILTER_SUPPORT[resample] * max(1.0, ratio / factor)) + 2)
    x0, y0 = max(0, math.floor(left) - margin), max(0, math.floor(top) - margin)
    x0, y0 = x0 - x0 % factor, y0 - y0 % factor
    x1, y1 = min(level_w, math.ceil(right) + margin), min(level_h, math.ceil(bottom) + margin)
    pixels = source.read(level, x0, y0, x1 - x0, y1 - y0, factor)
    relative = tuple(v / factor for v in (left - x0, top - y0, min(right, x1) - x0, min(bottom, y1) - y0))
    return resample_image(pixels, relative, size, resample, out)


def resample_image(pixels: Image.Image, box: tuple[float, float, float, float], size: tuple[int, int],
                   resample: Image.Resampling = RESAMPLE, out: np.ndarray | None = None) -> np.ndarray:
    """The rectangle `box` (float pixel coordinates) of `pixels` resampled to `size` (width, height), as a
    height x width x 3 array, written into `out` when given (any array of that shape with contiguous rows).

    Enlarging with RESAMPLE is bilinear interpolation, done by OpenCV's `warpAffine` (pixel centres mapped
    as Pillow maps them, edges replicated as Pillow clamps them: within +-1 level of `Image.resize`);
    shrinking needs Pillow's antialiased filter.
    """
    scale_x, scale_y = (box[2] - box[0]) / size[0], (box[3] - box[1]) / size[1]
    if resample == RESAMPLE and max(scale_x, scale_y) <= 1.0:
        source = np.asarray(pixels if pixels.mode == "RGB" else pixels.convert("RGB"))
        matrix = np.array([[scale_x, 0.0, box[0] + scale_x / 2 - 0.5], [0.0, scale_y, box[1] + scale_y / 2 - 0.5]])
        warped = cv2.warpAffine(source, matrix, size, dst=out, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                borderMode=cv2.BORDER_REPLICATE)
    else:
        resized = pixels.resize(size, resample, box=box)
        warped = np.frombuffer(resized.tobytes("raw", "RGB"), np.uint8).reshape(size[1], size[0], 3)
    if out is None:
        return warped
    if warped is not out:  # Pillow's result, or OpenCV had to allocate its own
        out[...] = warped
    return out


class _Grid:
    """The standardised slide: its scale, tissue mask and the pixels of one XL cell at a time."""

    def __init__(self, info: SlideInfo, source: SlideReader,
                 on_error: Callable[[str], None] | None = None):
        self.info = info
        self.source = source
        self.on_error = on_error
        self.scale = STANDARD_MPP / info.mpp  # level-0 source pixels per standardised pixel
        self.level = _best_level(source.level_downsamples, self.scale)
        self.thumbnail = self._thumbnail()
        self.mask_integral = _integral(tissue_mask(self.thumbnail), np.int32)  # counts <= MAX_MASK_PIXELS < 2^31
        self._colour_integral: np.ndarray | None = None  # built on first use (the release rule only)

    def _thumbnail(self) -> np.ndarray:
        """The slide with one pixel per MASK_PX standardised pixels (area average), built in pieces of at most
        BAND_SOURCE_PIXELS source pixels (row bands, cut in columns when a band is wider)."""
        mask_w, mask_h = self.info.std_width // MASK_PX, self.info.std_height // MASK_PX
        level = _best_level(self.source.level_downsamples, self.scale * MASK_PX)
        step = self.scale * MASK_PX / self.source.level_downsamples[level]  # level pixels per mask pixel
        rows_per_band = max(1, int(BAND_SOURCE_PIXELS / (self.source.level_dimensions[level][0] * step)))
        columns_per_piece = max(1, int(BAND_SOURCE_PIXELS / (rows_per_band * step * step)))
        thumbnail = np.empty((mask_h, mask_w, 3), np.uint8)
        for top in range(0, mask_h, rows_per_band):
            bottom = min(mask_h, top + rows_per_band)
            for left in range(0, mask_w, columns_per_piece):
                right = min(mask_w, left + columns_per_piece)
                self._thumbnail_piece(thumbnail, level, step, left, top, right, bottom)
            self.source.forget(level, math.inf, bottom * step - CACHE_MARGIN)
        self.source.forget(level, math.inf, math.inf)
        return thumbnail

    def _thumbnail_piece(self, thumbnail: np.ndarray, level: int, step: float,
                         left: int, top: int, right: int, bottom: int) -> None:
        """Fill thumbnail[top:bottom, left:right]. When the piece cannot be read (a corrupt tile), its
        MASK_PX x MASK_PX squares are read one by one and the unreadable ones become glass (no tissue),
        reported to `on_error`; without `on_error` the error propagates."""
        def read(x0: int, y0: int, x1: int, y1: int) -> None:
            box = (x0 * step, y0 * step, x1 * step, y1 * step)
            thumbnail[y0:y1, x0:x1] = _resampled(self.source, level, box, (x1 - x0, y1 - y0), Image.Resampling.BOX)

        try:
            return read(left, top, right, bottom)
        except Exception:
            self.source.recover()
            if self.on_error is None:
                raise
        lost = 0
        for y0 in range(top, bottom, MASK_PX):
            for x0 in range(left, right, MASK_PX):
                x1, y1 = min(right, x0 + MASK_PX), min(bottom, y0 + MASK_PX)
                try:
                    read(x0, y0, x1, y1)
                except Exception as error:
                    self.source.recover()
                    thumbnail[y0:y1, x0:x1] = 255
                    lost += 1
                    reason = f"{type(error).__name__}: {error}"
        if lost:
            f, square = self.scale * MASK_PX, MASK_PX * MASK_PX
            self.on_error(f"thumbnail region x={left * f:.0f} y={top * f:.0f} w={(right - left) * f:.0f} "
                          f"h={(bottom - top) * f:.0f}: {lost} square(s) of {square}x{square} standardised px "
                          f"unreadable, taken as glass ({reason})")

    def preview_colour(self, x: int, y: int, width: int, height: int) -> tuple[float, float, float] | None:
        """Mean colour of the standardised rectangle from a pyramid level at least PREVIEW_SHRINK times coarser than
        the one cells are read from (decoded DCT-scaled 1/2: a few percent of the cell's decoding); None when the
        pyramid has no such level or the read fails (the cell is then read whole, which handles the failure)."""
        downsamples = self.source.level_downsamples
        level = _best_level(downsamples, self.scale * PREVIEW_SHRINK)
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
        return _mean_colour(np.asarray(pixels.convert("RGB") if pixels.mode != "RGB" else pixels))

    def tissue_fraction(self, x: int, y: int, side: int) -> float:
        """Fraction of the standardised square (x, y, side) that is tissue in the mask."""
        return float(_area_mean(self.mask_integral, x // MASK_PX, y // MASK_PX, side // MASK_PX, side // MASK_PX))

    def thumbnail_colour(self, x: int, y: int, width: int, height: int) -> tuple[float, float, float]:
        """Mean thumbnail colour of the standardised rectangle (whole mask pixels only)."""
        columns, rows = max(1, width // MASK_PX), max(1, height // MASK_PX)
        if self._colour_integral is None:
            self._colour_integral = _integral(self.thumbnail, np.uint32)
        return tuple(_area_mean(self._colour_integral, x // MASK_PX, y // MASK_PX, columns, rows))

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
            _resampled(self.source, self.level, box, (width, bottom - top), RESAMPLE, out[top:bottom])
        return out

    def read_cell(self, x0: int, y0: int, width: int, height: int, needed: np.ndarray | None = None) -> np.ndarray:
        """A cell's standardised pixels: only the READ_BLOCK squares marked in `needed` (rows x columns; all when
        None), the others white. Read-only."""
        partial = needed is not None and not needed.all()
        cell = np.full((height, width, 3), 255, np.uint8) if partial else np.empty((height, width, 3), np.uint8)
        if not partial:
            needed = np.ones((-(-height // READ_BLOCK), -(-width // READ_BLOCK)), bool)
        for row, column, rows, columns in _rectangles(needed):
            top, left = row * READ_BLOCK, column * READ_BLOCK
            bottom, right = min(height, top + rows * READ_BLOCK), min(width, left + columns * READ_BLOCK)
            self.read(x0 + left, y0 + top, right - left, bottom - top, cell[top:bottom, left:right])
        cell.flags.writeable = False
        return cell

    def done_with_cell(self, x0: int, y0: int, width: int) -> None:
        """Let the reader drop the decoded source tiles that no later cell (row-major order) needs."""
        step = self.step
        last_in_row = x0 + width >= self.info.std_width
        right = math.inf if last_in_row else (x0 + XL_SIDE) * step - CACHE_MARGIN
        self.source.forget(self.level, right, (y0 + XL_SIDE) * step - CACHE_MARGIN)


def _rectangles(needed: np.ndarray) -> list[tuple[int, int, int, int]]:
    """The True cells of a boolean grid as rectangles (row, column, rows, columns): each row's runs, a run merged
    with the same run of the rows below it."""
    rectangles, open_runs = [], {}  # (first column, end column) -> first row
    for row in range(needed.shape[0] + 1):
        runs = set()
        if row < needed.shape[0]:
            padded = np.concatenate(([False], needed[row], [False])).astype(np.int8)
            edges = np.flatnonzero(np.diff(padded))
            runs = set(zip(edges[::2].tolist(), edges[1::2].tolist()))
        for run in sorted(set(open_runs) - runs):
            first = open_runs.pop(run)
            rectangles.append((first, run[0], row - first, run[1] - run[0]))
        for run in runs - set(open_runs):
            open_runs[run] = row
    return sorted(rectangles)


def _integral(values: np.ndarray, dtype: type) -> np.ndarray:
    """Summed-area table with a zero first row and column, accumulated in place (one array of `dtype`).

    An unsigned table may wrap around: `_area_mean` subtracts in the same modular arithmetic, so a
    rectangle's sum stays exact while it fits the type (uint32 colour sums: rectangles of up to 16.8M
    mask pixels, far above an XL cell's 57,600).
    """
    table = np.zeros((values.shape[0] + 1, values.shape[1] + 1) + values.shape[2:], dtype)
    table[1:, 1:] = values
    np.cumsum(table, axis=0, out=table)
    np.cumsum(table, axis=1, out=table)
    return table


def _area_mean(table: np.ndarray, column: int, row: int, columns: int, rows: int) -> np.ndarray:
    """Mean of the values in a rectangle of a summed-area table."""
    bottom, right = row + rows, column + columns
    total = table[bottom, right] - table[row, right] - table[bottom, column] + table[row, column]  # may wrap
    return total / (columns * rows)


def _read_blocks(grid: _Grid, x0: int, y0: int, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """A cell read in blocks of M_SIDE px (each with its own filter margin, so a readable block has the
    pixels of a whole read up to Pillow's rounding, +-1) and the grid of blocks that could not be read
    (white in the cell)."""
    cell = np.full((height, width, 3), 255, np.uint8)
    bad = np.zeros((-(-height // M_SIDE), -(-width // M_SIDE)), bool)
    for row, top in enumerate(range(0, height, M_SIDE)):
        for column, left in enumerate(range(0, width, M_SIDE)):
            w, h = min(M_SIDE, width - left), min(M_SIDE, height - top)
            try:
                grid.read(x0 + left, y0 + top, w, h, cell[top:top + h, left:left + w])
            except Exception:
                grid.source.recover()
                bad[row, column] = True
    cell.flags.writeable = False
    return cell, bad


def _mean_colour(pixels: np.ndarray, bad: np.ndarray | None = None) -> tuple[float, float, float]:
    """Exact mean colour of an image (integer column sums first: much faster than a float mean); without
    the unreadable M_SIDE blocks marked in `bad` when given."""
    if bad is not None and bad.any():
        good = ~np.repeat(np.repeat(bad, M_SIDE, 0), M_SIDE, 1)[:pixels.shape[0], :pixels.shape[1]]
        return tuple(float(v) for v in pixels[good].mean(axis=0)) if good.any() else (255.0, 255.0, 255.0)
    height, width = pixels.shape[:2]
    sums = pixels.reshape(height, width * 3).sum(axis=0, dtype=np.uint32).reshape(width, 3).sum(axis=0)
    return tuple(float(v) / (height * width) for v in sums)


def _block_means(cell: np.ndarray, block: int) -> np.ndarray:
    """Mean colour of every full `block` x `block` square of `cell`, shape (rows, columns, 3), exact."""
    rows, columns = cell.shape[0] // block, cell.shape[1] // block
    part = cell[:rows * block, :columns * block]
    column_sums = part.reshape(rows, block, columns * block * 3).sum(axis=1, dtype=np.uint32)
    sums = column_sums.reshape(rows, columns, block, 3).sum(axis=2)
    return sums / float(block * block)


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
    info, source = _open(path, mpp_override, reader)
    try:
        try:
            grid = _Grid(info, source, on_cell_error)
        except Exception as error:  # any decoder/IO failure of the thumbnail makes the slide unusable
            raise SlideError(info.path, f"cannot read tissue thumbnail ({type(error).__name__}: {error})") from error
        for xl in xl_cells(info.std_width, info.std_height):
            yield from _cell_tiles(grid, xl, slide_stem, rule, s_per_m, seed, on_cell_error)
            grid.done_with_cell(xl[2], xl[3], xl[4])
    finally:
        source.close()


def _blocks_under_kept_tiles(grid: _Grid, x0: int, y0: int, width: int, height: int, rule: TissueRule) -> np.ndarray:
    """The READ_BLOCK squares of a cell that a tile kept by the mask rule overlaps, decided from the tissue
    mask alone before any pixel of the cell is decoded (S tiles lie inside kept M tiles)."""
    needed = np.zeros((-(-height // READ_BLOCK), -(-width // READ_BLOCK)), bool)
    for scale in ("XL", "L", "M"):
        side = SCALE_SIDES[scale]
        for i, j in tile_offsets(width, height, side):
            if keeps_tile(rule, scale, grid.tissue_fraction(x0 + i, y0 + j, side), None):
                needed[j // READ_BLOCK:-(-(j + side) // READ_BLOCK), i // READ_BLOCK:-(-(i + side) // READ_BLOCK)] = True
    return needed


def _cell_tiles(grid: _Grid, xl: tuple[int, int, int, int, int, int], slide_stem: str, rule: TissueRule,
                s_per_m: int, seed: int, on_cell_error: Callable[[str], None] | None) -> Iterator[Tile]:
    """The kept tiles of one XL cell (as `xl_cells` gives it)."""
    info, f = grid.info, grid.scale
    cx, cy, x0, y0, width, height = xl
    if width < S_SIDE or height < S_SIDE:
        return
    release = rule.name == "release"
    needed = None  # the release rule judges the XL tile on the whole cell's pixels
    if release:
        s_fractions = np.array([[grid.tissue_fraction(x0 + i * S_SIDE, y0 + j * S_SIDE, S_SIDE)
                                 for i in range(width // S_SIDE)] for j in range(height // S_SIDE)])
        thumbnail = grid.thumbnail_colour(x0, y0, width, height)
        unread = not s_fractions.any() or release_surely_drops_xl(thumbnail)
        if not unread and not release_surely_keeps_xl(thumbnail):  # undecided: a coarser level's read may decide
            preview = grid.preview_colour(x0, y0, width, height)
            unread = preview is not None and release_surely_drops_xl(preview, PREVIEW_MARGIN)
    else:
        needed = _blocks_under_kept_tiles(grid, x0, y0, width, height, rule)
        unread = not needed.any()
    if unread:
        return  # no tile of this cell can be kept: never read it
    try:
        cell, bad = grid.read_cell(x0, y0, width, height, needed), None
    except Exception as error:  # a corrupt region must not stop the slide: read the cell block by block
        grid.source.recover()
        message = (f"cell ({cx},{cy}) region x={x0 * f:.0f} y={y0 * f:.0f} w={width * f:.0f} h={height * f:.0f}: "
                   f"{type(error).__name__}: {error}")
        if on_cell_error is None:
            raise SlideError(info.path, message) from error
        cell, bad = _read_blocks(grid, x0, y0, width, height)
        on_cell_error(f"{message}; {int(bad.sum())} of {bad.size} blocks of {M_SIDE} px unreadable, "
                      f"the tiles touching them are dropped")

    s_means = _block_means(cell, S_SIDE) if release else None
    if release and not keeps_tile(rule, "XL", float(s_fractions.mean()), _mean_colour(cell, bad)):
        return  # the release drops the whole XL cell (judged on its part inside the slide)

    def kept(scale: str, i: int, j: int) -> Tile | None:
        """The tile of `scale` at cell-relative pixel offset (i, j) when the rule keeps it."""
        side = SCALE_SIDES[scale]
        if bad is not None and bad[j // M_SIDE:-(-(j + side) // M_SIDE), i // M_SIDE:-(-(i + side) // M_SIDE)].any():
            return None  # touches an unreadable block
        x, y = x0 + i, y0 + j
        fraction = grid.tissue_fraction(x, y, side)
        if release:  # XL was judged on the whole cell above
            n, si, sj = side // S_SIDE, i // S_SIDE, j // S_SIDE
            mean = tuple(s_means[sj:sj + n, si:si + n].mean(axis=(0, 1)))
            keep = scale == "XL" or keeps_tile(rule, scale, fraction, mean)
        else:
            keep = keeps_tile(rule, scale, fraction, None)
        if not keep:
            return None
        return Tile(scale, side, x // side, y // side, tile_name(slide_stem, side, x // side, y // side),
                    cell[j:j + side, i:i + side], x * f, y * f, side * f, side * f, fraction)

    tiles = [kept(scale, i, j) for scale in ("XL", "L", "M")
             for i, j in tile_offsets(width, height, SCALE_SIDES[scale])]
    yield from (t for t in tiles if t is not None)
    for m in (t for t in tiles if t is not None and t.scale == "M"):
        mi, mj = m.x_index * M_SIDE - x0, m.y_index * M_SIDE - y0
        candidates = [kept("S", mi + a, mj + b) for b in range(0, M_SIDE, S_SIDE) for a in range(0, M_SIDE, S_SIDE)]
        candidates = [t for t in candidates if t is not None]
        chosen = sorted(candidates, key=lambda t: stable_unit_float(seed, t.image_id))[:s_per_m]
        yield from sorted(chosen, key=lambda t: (t.y_index, t.x_index))
