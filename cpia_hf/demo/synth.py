"""Generated sample slides: H&E-like pixels written as tiled JPEG TIFFs (pyramidal SVS or generic TIFF,
single-level too) that OpenSlide reads.

Used by the tests, the demo and the benchmarks, so that no real slide has to be downloaded. Two stains:
`STRONG` (saturated pink and purple on near-white) and `FAINT` as many real scans look: light grey glass
(~235, 235, 235) and pale eosin whose red exceeds green by less than 20 (tissue mean ~(214, 195, 208)).
"""
from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, ImageDraw, ImageFilter


@dataclass(frozen=True)
class Stain:
    """Colours of a generated slide: glass, light and dark eosin (stroma), haematoxylin (nuclei)."""

    background: tuple[int, int, int]
    eosin_light: tuple[int, int, int]
    eosin_dark: tuple[int, int, int]
    haematoxylin: tuple[int, int, int]


STRONG = Stain((241, 240, 238), (228, 152, 196), (190, 88, 146), (78, 50, 128))
FAINT = Stain((235, 235, 235), (227, 213, 220), (211, 189, 204), (155, 125, 175))
# Scanner objective and MPP pairs seen in public sources (Aperio, Hamamatsu, 3DHistech at 40x; 20x).
REAL_MPPS = (0.2527, 0.263, 0.2265, 0.499)
# Pixels are first drawn at 1/COARSE of the target size and upsampled (fast, and nuclei get soft edges).
COARSE = 4
APERIO_DESCRIPTION = "Aperio Image Library v12.0.15"


def _smooth_noise(rng: np.random.Generator, width: int, height: int, feature_px: float) -> np.ndarray:
    """Smooth noise in [0, 1] with blobs about `feature_px` wide: a random grid upsampled bicubically."""
    grid_w = max(2, int(np.ceil(width / feature_px)) + 1)
    grid_h = max(2, int(np.ceil(height / feature_px)) + 1)
    grid = Image.fromarray(rng.random((grid_h, grid_w), dtype=np.float32), "F")
    return np.asarray(grid.resize((width, height), Image.Resampling.BICUBIC)).clip(0.0, 1.0)


def _nuclei_mask(rng: np.random.Generator, tissue: np.ndarray, nucleus_px: float) -> np.ndarray:
    """Soft mask in [0, 1] of elliptic nuclei, denser where `tissue` is high (drawn with Pillow)."""
    height, width = tissue.shape
    count = int(width * height / (3.0 * nucleus_px) ** 2)
    xs = rng.random(count) * width
    ys = rng.random(count) * height
    keep = rng.random(count) < tissue[ys.astype(int), xs.astype(int)] ** 2
    radii = nucleus_px * (0.35 + 0.35 * rng.random((count, 2)))
    shades = (140 + 115 * rng.random(count)).astype(int)
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for x, y, (rx, ry), shade in zip(xs[keep], ys[keep], radii[keep], shades[keep]):
        draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=int(shade))
    canvas = canvas.filter(ImageFilter.GaussianBlur(0.6))
    return np.asarray(canvas, dtype=np.float32) / 255.0


def _tissue_alpha(rng: np.random.Generator, width: int, height: int, tissue: float) -> np.ndarray:
    """Where the tissue lies, in [0, 1]: a smooth field thresholded so that about `tissue` of it is 1."""
    field = 0.6 * _smooth_noise(rng, width, height, 250.0) + 0.4 * _smooth_noise(rng, width, height, 60.0)
    if tissue <= 0.0:
        return np.zeros_like(field)
    level = np.quantile(field[:: max(1, height // 256), :: max(1, width // 256)], 1.0 - tissue)
    return np.clip((field - level) / 0.03, 0.0, 1.0)


def _coarse_image(width: int, height: int, seed: int, tissue: float, stain: Stain) -> np.ndarray:
    """The H&E-like picture at 1/COARSE resolution, float32 RGB in [0, 255]."""
    rng = np.random.default_rng(seed)
    tissue_alpha = _tissue_alpha(rng, width, height, tissue)
    density = 0.55 * _smooth_noise(rng, width, height, 30.0) + 0.45 * _smooth_noise(rng, width, height, 6.0)
    nuclei = _nuclei_mask(rng, np.clip(tissue_alpha * (0.4 + density), 0.0, 1.0), nucleus_px=3.5)
    light, dark, hema, background = (np.array(c, np.float32) for c in
                                     (stain.eosin_light, stain.eosin_dark, stain.haematoxylin, stain.background))
    stroma = light + density[..., None] * (dark - light)
    stained = stroma + nuclei[..., None] * (hema - stroma)
    return background + tissue_alpha[..., None] * (stained - background)


def tissue_truth(width: int, height: int, seed: int, tissue: float = 0.6) -> np.ndarray:
    """HxW bool: where `he_like_image(width, height, seed, tissue)` draws tissue (alpha >= 0.5)."""
    coarse_w, coarse_h = max(2, -(-width // COARSE)), max(2, -(-height // COARSE))
    alpha = _tissue_alpha(np.random.default_rng(seed), coarse_w, coarse_h, tissue)
    crop = (0.0, 0.0, width / COARSE, height / COARSE)
    full = Image.fromarray(alpha.astype(np.float32), "F").resize((width, height), Image.Resampling.BILINEAR, box=crop)
    return np.asarray(full) >= 0.5


def he_like_image(width: int, height: int, seed: int, tissue: float = 0.6, stain: Stain = STRONG) -> np.ndarray:
    """HxWx3 uint8 H&E-like image: eosin stroma, haematoxylin nuclei, fine texture, glass background.

    `tissue` is the approximate fraction of the area covered by tissue (`tissue_truth` says where);
    `stain` the colours (STRONG or FAINT). Deterministic for a seed.
    The layout is drawn at 1/4 resolution, upsampled bilinearly, and a tiled fine-grain noise layer
    is added band by band so that memory stays at about the size of the output.
    """
    if width <= 0 or height <= 0 or not 0.0 <= tissue <= 1.0:
        raise ValueError(f"invalid image size {width}x{height} or tissue fraction {tissue}")
    coarse_w, coarse_h = max(2, -(-width // COARSE)), max(2, -(-height // COARSE))
    coarse = _coarse_image(coarse_w, coarse_h, seed, tissue, stain)
    coarse_rgb = Image.fromarray(np.clip(coarse + 0.5, 0, 255).astype(np.uint8), "RGB")
    rng = np.random.default_rng([seed, 1])
    grain = rng.integers(-7, 8, size=(509, 509, 1), dtype=np.int16)  # odd period avoids visible 256-px tiling
    out = np.empty((height, width, 3), np.uint8)
    band = 1024
    for top in range(0, height, band):
        bottom = min(height, top + band)
        crop = (0.0, top / COARSE, width / COARSE, bottom / COARSE)
        part = np.asarray(coarse_rgb.resize((width, bottom - top), Image.Resampling.BILINEAR, box=crop), np.int16)
        rows = np.arange(top, bottom) % grain.shape[0]
        noise = np.take(grain, rows, axis=0)
        noise = np.tile(noise, (1, -(-width // grain.shape[1]), 1))[:, :width]
        np.clip(part + noise, 0, 255, out=part)
        out[top:bottom] = part
    return out


def _pyramid(pixels: np.ndarray, tile: int, levels: int | None) -> list[np.ndarray]:
    """Level 0 and its 4x box-reduced levels, down to the first level that fits in one tile."""
    pyramid = [pixels]
    def wanted() -> bool:
        return len(pyramid) < levels if levels is not None else max(pyramid[-1].shape[:2]) > tile
    while wanted():
        pyramid.append(np.asarray(Image.fromarray(pyramid[-1]).reduce(4)))
    return pyramid


def _aperio_description(width: int, height: int, tile: int, quality: int, mpp: float | None) -> str:
    """SVS ImageDescription: OpenSlide reads `key = value` pairs after the first `|` as aperio.* properties."""
    fields = [f"{APERIO_DESCRIPTION}\r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) JPEG/RGB Q={quality}"]
    if mpp is not None:
        fields += [f"AppMag = {10.0 / mpp:g}", f"MPP = {mpp:.4f}"]
    return "|".join(fields)


def corrupt_tile(path: Path, column: int, row: int, seed: int = 0) -> None:
    """Overwrite the bytes of one level-0 tile with garbage (same length), for robustness tests."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        across = -(-page.imagewidth // page.tilewidth)
        index = row * across + column
        offset, count = page.dataoffsets[index], page.databytecounts[index]
    garbage = np.random.default_rng(seed).integers(0, 256, count, dtype=np.uint8).tobytes()
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(garbage)


def write_slide(
    path: Path,
    pixels: np.ndarray,
    mpp: float | None,
    *,
    vendor: str = "aperio",
    tile: int = 256,
    quality: int = 90,
    levels: int | None = None,
    corrupt_tile_at: tuple[int, int] | None = None,
) -> Path:
    """Write `pixels` as a pyramidal tiled JPEG TIFF that OpenSlide opens; return `path`.

    vendor="aperio": an SVS file (Aperio ImageDescription with `MPP` and `AppMag` when `mpp` is given).
    vendor="generic": a generic tiled TIFF; `mpp` goes into the resolution tags in centimetres,
    which OpenSlide 4 reports as `openslide.mpp-x`/`openslide.mpp-y`.
    Levels are reduced by 4x down to one tile unless `levels` fixes their number.
    `corrupt_tile_at=(column, row)` overwrites that level-0 tile with garbage after writing.
    """
    if vendor not in ("aperio", "generic"):
        raise ValueError(f"{path}: unknown vendor {vendor!r} (expected 'aperio' or 'generic')")
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"{path}: pixels must be HxWx3 uint8, got {pixels.shape} {pixels.dtype}")
    path = Path(path)
    height, width = pixels.shape[:2]
    with tifffile.TiffWriter(path, bigtiff=pixels.nbytes > 2**31) as tif:
        for level, image in enumerate(_pyramid(pixels, tile, levels)):
            options = dict(
                photometric="rgb", tile=(tile, tile), compression="jpeg",
                compressionargs={"level": quality}, metadata=None, maxworkers=2,
            )
            if vendor == "aperio":
                options["description"] = _aperio_description(width, height, tile, quality, mpp)
            else:
                # OpenSlide's generic TIFF reader only takes later directories marked reduced-resolution.
                options["subfiletype"] = 1 if level else 0
            if vendor == "generic" and mpp is not None:
                pixels_per_cm = 1e4 / (mpp * (height / image.shape[0]))
                options.update(resolution=(pixels_per_cm, pixels_per_cm), resolutionunit="CENTIMETER")
            tif.write(image, **options)
    if corrupt_tile_at is not None:
        corrupt_tile(path, *corrupt_tile_at)
    return path


def write_claimed_size_tiff(path: Path, width: int, height: int, mpp: float, tile: int = 2048) -> Path:
    """A small, valid tiled JPEG TIFF claiming `width` x `height` px: every tile entry points at the same
    light-grey tile (a pixel bomb, for robustness tests). Classic TIFF, so at most ~4 GB of offsets."""
    buffer = io.BytesIO()
    Image.new("RGB", (tile, tile), (236, 236, 236)).save(buffer, format="JPEG", quality=90)
    jpeg = buffer.getvalue()
    count = -(-width // tile) * -(-height // tile)
    pixels_per_cm = round(1e4 / mpp)
    entries = [  # (tag, type, values): SHORT=3, LONG=4, RATIONAL=5; YCbCr JPEG, 4:2:0 as Pillow writes it
        (256, 4, [width]), (257, 4, [height]), (258, 3, [8, 8, 8]), (259, 3, [7]), (262, 3, [6]),
        (277, 3, [3]), (282, 5, [pixels_per_cm, 1]), (283, 5, [pixels_per_cm, 1]), (284, 3, [1]),
        (296, 3, [3]), (322, 3, [tile]), (323, 3, [tile]), (324, 4, None), (325, 4, [len(jpeg)] * count),
        (530, 3, [2, 2]),
    ]
    ifd_size = 2 + 12 * len(entries) + 4
    data, blobs = 8 + ifd_size, []
    layout = []
    for tag, kind, values in entries:
        n = count if tag == 324 else (len(values) // 2 if kind == 5 else len(values))
        size = {3: 2, 4: 4, 5: 8}[kind] * n
        if size > 4:
            layout.append((tag, kind, n, data))
            blobs.append((tag, kind, values, data))
            data += size + size % 2
        else:
            layout.append((tag, kind, n, values))
    jpeg_offset = data
    out = [b"II*\x00", struct.pack("<I", 8), struct.pack("<H", len(entries))]
    for tag, kind, n, value in layout:
        if isinstance(value, int):
            out.append(struct.pack("<HHII", tag, kind, n, value))
        else:
            packed = struct.pack(f"<{len(value)}{'H' if kind == 3 else 'I'}", *value)
            out.append(struct.pack("<HHI", tag, kind, n) + packed.ljust(4, b"\x00"))
    out.append(struct.pack("<I", 0))
    for tag, kind, values, _ in blobs:
        values = [jpeg_offset] * count if tag == 324 else values
        packed = struct.pack(f"<{len(values)}{'H' if kind == 3 else 'I'}", *values)
        out.append(packed + b"\x00" * (len(packed) % 2))
    Path(path).write_bytes(b"".join(out) + jpeg)
    return Path(path)
