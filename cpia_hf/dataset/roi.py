"""ROI conversion: largest centred square, resized to 384x384, any Pillow-readable image as RGB, EXIF
orientation applied (coordinates are in the oriented image)."""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps

from ..standard import ROI_SIDE

# One pixel limit for ROIs, applied to Pillow's own decompression-bomb check too (its default, 179 Mpx,
# would refuse a genuine 16000 x 12500 ROI): ROI sources include large images (e.g. 40k x 20k). JPEGs
# are decoded downscaled in the DCT domain; other formats need ~3 bytes per pixel while converting.
DEFAULT_MAX_PIXELS = 1 << 30
# The memory one worker may spend decoding and converting one ROI (`cpia convert --roi-memory-gb`), checked
# against the size the header declares (after a JPEG's DCT downscaling) before any pixel is decoded: a small,
# well-compressed PNG of large dimensions would otherwise take gigabytes. The default leaves room for the
# worker's own memory within what docs/cluster.md gives each Dask worker.
DEFAULT_ROI_MEMORY_GB = 1.5
ROI_MEMORY_OPTION = "--roi-memory-gb"
# Peak bytes per decoded pixel while an image of each mode is decoded and converted to RGB (Pillow keeps
# 4 bytes per pixel for 3- and 4-channel modes; alpha is composited over white, 16-bit and float values are
# scaled in float64), rounded up from peak RSS measured on 16-Mpx images; other modes count as RGB.
DECODE_BYTES_PER_PIXEL = {"RGB": 9, "1": 6, "L": 6, "P": 6, "RGBA": 21, "LA": 21, "PA": 21, "RGBa": 21, "La": 21,
                          "I": 29, "I;16": 29, "I;16B": 29, "I;16L": 29, "I;16N": 29, "F": 17}
ORIENTATION = 0x0112  # EXIF tag; values 5-8 swap width and height
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


class RoiError(Exception):
    """An ROI file that cannot be converted; str() names the file and the reason."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass
class RoiImage:
    """An ROI at the standard size and the centred square of the source it shows."""

    pixels: np.ndarray  # ROI_SIDE x ROI_SIDE x 3 uint8
    x: float  # the centred square, in source pixels
    y: float
    side: float


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB view of any Pillow mode: alpha over white, palette expanded, 16/32-bit scaled to 8 bits."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image)
        if image.mode == "F":
            top = float(values.max()) if values.size else 1.0
            values = values / (top if top > 0 else 1.0) * 255.0
        else:
            # Pillow's own I;16 -> L conversion clips at 255; scale the 16-bit range instead.
            values = values.astype(np.float64) / 257.0
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")  # no copy of an RGB image


def convert_roi(path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                memory_gb: float = DEFAULT_ROI_MEMORY_GB) -> RoiImage:
    """Read an ROI image, crop the largest centred square and resize it to ROI_SIDE x ROI_SIDE."""
    side = ROI_SIDE
    with _without_pillow_pixel_limit():
        image, x0, y0, square, scale = _open_roi(path, side, max_pixels, memory_gb)
        rgb = to_rgb(image)
    box = (x0 / scale, y0 / scale, (x0 + square) / scale, (y0 + square) / scale)
    resized = rgb.resize((side, side), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
    return RoiImage(np.asarray(resized), x0, y0, float(square))


@contextmanager
def _without_pillow_pixel_limit() -> Iterator[None]:
    """Pillow's own bomb check off (it warns above MAX_IMAGE_PIXELS and fails at twice that): `_open_roi`
    applies the converter's single limit to the size the header declares, before decoding."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def decode_bytes(image: Image.Image) -> int:
    """Peak bytes of decoding `image` (at its current, possibly drafted, size) and converting it to RGB."""
    per_pixel = DECODE_BYTES_PER_PIXEL.get(image.mode, DECODE_BYTES_PER_PIXEL["RGB"])
    if image.mode == "P" and "transparency" in image.info:
        per_pixel = DECODE_BYTES_PER_PIXEL["RGBA"]
    return image.size[0] * image.size[1] * per_pixel


def _check_memory(path: Path, image: Image.Image, memory_gb: float) -> None:
    need = decode_bytes(image)
    if need > memory_gb * 1e9:
        width, height = image.size
        raise RoiError(path, f"too large to decode within the memory bound: {width}x{height} = {width * height} "
                             f"pixels ({image.mode}) need about {need / 1e9:.3g} GB, over the {memory_gb:g} GB per "
                             f"worker; raise it with {ROI_MEMORY_OPTION}")


def _open_roi(path: Path, side: int, max_pixels: int,
              memory_gb: float = DEFAULT_ROI_MEMORY_GB) -> tuple[Image.Image, float, float, int, float]:
    """The decoded image (EXIF orientation applied, JPEGs DCT-downscaled) and its centred square
    (x0, y0, side in source pixels) with the decoded image's downscale factor."""
    try:
        image = Image.open(path)
        width, height = image.size
        if width * height > max_pixels:
            raise RoiError(path, f"decompression bomb: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}")
        if width < 1 or height < 1:
            raise RoiError(path, f"empty image ({width}x{height})")
        square = min(width, height)
        if image.format == "JPEG":
            # DCT-domain downscaling: decode at the smallest scale that still covers the output.
            image.draft("RGB", (-(-width * side // square), -(-height * side // square)))
        scale = width / image.size[0]
        _check_memory(path, image, memory_gb)
        image.load()
        if image.getexif().get(ORIENTATION, 1) in TRANSPOSING_ORIENTATIONS:
            width, height = height, width
        image = ImageOps.exif_transpose(image)  # as cameras and viewers show it; the square is in that frame
    except RoiError:
        raise
    except Image.DecompressionBombError as error:
        raise RoiError(path, f"decompression bomb: {error}") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise RoiError(path, f"unreadable image: {error}") from error
    return image, (width - square) / 2, (height - square) / 2, square, scale
