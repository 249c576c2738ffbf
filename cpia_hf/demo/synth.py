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


def real_texture_image(source: Path, width: int, height: int, mpp: float) -> np.ndarray:
    """A `width` x `height` RGB image at `mpp` µm/px made of a real slide's texture.

    The whole level 0 of `source` (a small real slide, e.g. the suite's CMU-1-Small-Region.svs) is
    resampled with Lanczos from its own MPP to `mpp`, then mirrored into a mosaic (each copy flipped so
    that edges meet without seams) and cropped to the requested size.
    """
    import openslide  # a slide reader, imported only where a real slide is read

    with openslide.OpenSlide(str(source)) as slide:
        source_mpp = float(slide.properties[openslide.PROPERTY_NAME_MPP_X])
        region = slide.read_region((0, 0), 0, slide.dimensions).convert("RGB")
    factor = source_mpp / mpp
    block = np.asarray(region.resize((round(region.width * factor), round(region.height * factor)),
                                     Image.Resampling.LANCZOS))
    out = np.empty((height, width, 3), np.uint8)
    side_y, side_x = block.shape[:2]
    for j, y in enumerate(range(0, height, side_y)):
        for i, x in enumerate(range(0, width, side_x)):
            mirrored = block[:: -1 if j % 2 else 1, :: -1 if i % 2 else 1]
            out[y:y + side_y, x:x + side_x] = mirrored[: height - y, : width - x]
    return out


def write_claimed_size_tiff(path: Path, width: int, height: int, mpp: float, tile: int = 2048,
                            levels: int = 1) -> Path:
    """A small, valid tiled JPEG TIFF claiming `width` x `height` px (and `levels` - 1 reduced levels, 4x
    each): every tile entry points at one light-grey tile. A pixel bomb for robustness tests, or a
    huge blank slide that is quick to read at its coarse levels. Classic TIFF: offsets below 4 GB."""
    buffer = io.BytesIO()
    Image.new("RGB", (tile, tile), (236, 236, 236)).save(buffer, format="JPEG", quality=90)
    jpeg = buffer.getvalue()
    sizes = [(max(1, width // 4**k), max(1, height // 4**k)) for k in range(levels)]
    counts = [-(-w // tile) * -(-h // tile) for w, h in sizes]
    entry_count = 16
    ifd_bytes = 2 + 12 * entry_count + 4
    # layout: header, the JPEG tile, then per level: IFD, BitsPerSample, resolutions, offsets, byte counts
    level_bytes = [ifd_bytes + 6 + 16 + 8 * n for n in counts]
    jpeg_at = 8
    ifd_at = [jpeg_at + len(jpeg) + (len(jpeg) % 2) + sum(level_bytes[:k]) for k in range(levels)]
    out = [b"II*\x00", struct.pack("<I", ifd_at[0]), jpeg + b"\x00" * (len(jpeg) % 2)]
    for k, ((w, h), n) in enumerate(zip(sizes, counts)):
        base = ifd_at[k] + ifd_bytes
        bits_at, xres_at, yres_at, offsets_at, counts_at = base, base + 6, base + 14, base + 22, base + 22 + 4 * n
        pixels_per_cm = round(1e4 / (mpp * 4**k))
        entries = [  # (tag, type, count, value or offset): SHORT=3, LONG=4, RATIONAL=5; YCbCr JPEG as Pillow writes
            (254, 4, 1, 1 if k else 0), (256, 4, 1, w), (257, 4, 1, h), (258, 3, 3, bits_at), (259, 3, 1, 7),
            (262, 3, 1, 6), (277, 3, 1, 3), (282, 5, 1, xres_at), (283, 5, 1, yres_at), (284, 3, 1, 1),
            (296, 3, 1, 3), (322, 3, 1, tile), (323, 3, 1, tile), (324, 4, n, offsets_at if n > 1 else jpeg_at),
            (325, 4, n, counts_at if n > 1 else len(jpeg)), (530, 3, 2, 2 | 2 << 16),
        ]
        assert len(entries) == entry_count
        out.append(struct.pack("<H", entry_count))
        out += [struct.pack("<HHII", *entry) for entry in entries]
        out.append(struct.pack("<I", ifd_at[k + 1] if k + 1 < levels else 0))
        out.append(struct.pack("<3H", 8, 8, 8) + struct.pack("<4I", pixels_per_cm, 1, pixels_per_cm, 1))
        out.append(struct.pack(f"<{n}I", *[jpeg_at] * n) + struct.pack(f"<{n}I", *[len(jpeg)] * n))
    Path(path).write_bytes(b"".join(out))
    return Path(path)
