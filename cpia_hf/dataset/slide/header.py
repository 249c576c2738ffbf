"""What a slide's header must say before any pixel is read: a plausible square-pixel MPP, a size within the
bounds a worker's memory allows, and, for TIFF slides, colour levels whose tile tables cover their claimed size.

Each refusal is one `SlideError` naming the file, what is wrong and what to do.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import openslide
import tifffile

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


class SlideError(Exception):
    """A slide that cannot be converted; `str()` names the file and the reason."""

    def __init__(self, path: Path | str, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


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
