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
