"""ROI conversion: centred square, 384x384, colour modes, bad files."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cpia_hf.dataset.roi import RoiError, convert_roi
from cpia_hf.demo.synth import he_like_image


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_largest_centred_square_is_resized(tmp_path: Path) -> None:
    pixels = he_like_image(600, 400, seed=3, tissue=0.9)
    pixels[:, :100] = (0, 255, 0)  # outside the centred 400x400 square (columns 100..499)
    pixels[:, 500:] = (0, 0, 255)
    path = tmp_path / "wide.png"
    Image.fromarray(pixels).save(path)
    roi = convert_roi(path)
    assert roi.pixels.shape == (384, 384, 3)
    assert (roi.x, roi.y, roi.side) == (100.0, 0.0, 400.0)
    expected = np.asarray(Image.fromarray(pixels[:, 100:500]).resize((384, 384), Image.Resampling.BICUBIC))
    assert psnr(roi.pixels, expected) > 35


def test_tall_jpeg_uses_its_centre(tmp_path: Path) -> None:
    pixels = he_like_image(500, 1700, seed=4, tissue=0.9)
    path = tmp_path / "tall.jpg"
    Image.fromarray(pixels).save(path, quality=95)
    roi = convert_roi(path)
    assert (roi.x, roi.y, roi.side) == (0.0, 600.0, 500.0)
    decoded = np.asarray(Image.open(path).convert("RGB"))[600:1100]
    expected = np.asarray(Image.fromarray(decoded).resize((384, 384), Image.Resampling.BICUBIC))
    assert psnr(roi.pixels, expected) > 30


@pytest.mark.parametrize(
    "mode, fill, expected",
    [
        ("RGBA", (10, 20, 30, 0), (255, 255, 255)),  # transparent -> white background
        ("RGBA", (10, 20, 30, 255), (10, 20, 30)),
        ("L", 77, (77, 77, 77)),
        ("P", None, (200, 40, 90)),
    ],
)
def test_colour_modes_become_rgb(tmp_path: Path, mode: str, fill, expected) -> None:
    if mode == "P":
        image = Image.new("RGB", (50, 70), (200, 40, 90)).convert("P", palette=Image.Palette.ADAPTIVE)
    else:
        image = Image.new(mode, (50, 70), fill)
    path = tmp_path / f"img_{mode}.png"
    image.save(path)
    roi = convert_roi(path)
    assert np.abs(roi.pixels.reshape(-1, 3).mean(0) - np.array(expected)).max() < 1.5


def test_16bit_tiff_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.full((64, 64), 32896, np.uint16)  # 128 * 257
    values[:, :32] = 65535
    path = tmp_path / "gray16.tif"
    Image.fromarray(values).save(path)
    roi = convert_roi(path)
    assert roi.pixels[:, :150].mean() == pytest.approx(255, abs=1)
    assert roi.pixels[:, 250:].mean() == pytest.approx(128, abs=1)


def test_truncated_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.png"
    Image.fromarray(he_like_image(200, 200, seed=1)).save(path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(RoiError, match="cut.png"):
        convert_roi(path)


def test_decompression_bomb_is_refused(tmp_path: Path) -> None:
    # A valid PNG header claiming 100000 x 100000 pixels, with a tiny body.
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    path = tmp_path / "bomb.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b""))
    with pytest.raises(RoiError, match="decompression bomb"):
        convert_roi(path)


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A valid PNG header claiming width x height RGB pixels, with a tiny body."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 10))
                     + chunk(b"IEND", b""))
    return path


def test_one_pixel_limit_for_pillow_and_the_converter(tmp_path: Path) -> None:
    """A genuine 16000 x 12500 ROI (200 Mpx, over Pillow's default 179 Mpx bomb limit) converts; one over
    2^30 px is refused with the converter's own reason; Pillow's global limit is left as it was."""
    before = Image.MAX_IMAGE_PIXELS
    image = Image.new("L", (16000, 12500), 40)
    image.paste(220, (8000, 0, 16000, 12500))
    image.save(tmp_path / "large.jpg", quality=90)
    del image
    roi = convert_roi(tmp_path / "large.jpg")
    assert (roi.x, roi.y, roi.side) == (1750.0, 0.0, 12500.0)
    assert abs(roi.pixels[:, :180].mean() - 40) < 3 and abs(roi.pixels[:, 204:].mean() - 220) < 3
    limit = r"decompression bomb: 32768x32769 = 1073774592 pixels exceeds the limit of 1073741824"
    with pytest.raises(RoiError, match=limit):
        convert_roi(png_claiming(tmp_path / "over.png", 32768, 32769))
    assert Image.MAX_IMAGE_PIXELS == before


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    """Stored 600x400 with a red left half and a blue right half, EXIF orientation 6 (rotate 90 degrees
    clockwise to view): the viewed image is 400x600 with red on top and blue below."""
    stored = np.zeros((400, 600, 3), np.uint8)
    stored[:, :300] = (220, 30, 30)
    stored[:, 300:] = (30, 30, 220)
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    roi = convert_roi(tmp_path / "rotated.jpg")
    assert (roi.x, roi.y, roi.side) == (0.0, 100.0, 400.0)  # the centred square of the 400x600 viewed image
    red, blue = np.array((220, 30, 30)), np.array((30, 30, 220))
    assert np.abs(roi.pixels[:180].reshape(-1, 3).mean(0) - red).max() < 4
    assert np.abs(roi.pixels[204:].reshape(-1, 3).mean(0) - blue).max() < 4
