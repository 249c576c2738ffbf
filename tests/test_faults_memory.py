"""The memory bound of one ROI decode: checked from the header before decoding, refused in one line."""
from __future__ import annotations

import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cpia_hf.dataset.roi import RoiError, convert_roi


def compressible_png(path: Path, width: int, height: int) -> Path:
    """A genuine greyscale PNG of width x height black pixels, written row by row (a few MB of memory): large
    dimensions, a small file (30000 x 30000 is under 1 MB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + pixels
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


PEAK_RSS = """
import resource, sys
from pathlib import Path
from cpia_hf.dataset.roi import RoiError, convert_roi
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    convert_roi(Path(sys.argv[1]))
except RoiError as error:
    print(error.reason)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_a_small_png_of_large_dimensions_is_refused_before_decoding(tmp_path: Path) -> None:
    png = compressible_png(tmp_path / "big.png", 30000, 30000)
    assert png.stat().st_size < 1_000_000
    result = subprocess.run([sys.executable, "-c", PEAK_RSS, str(png)], capture_output=True, text=True, check=True)
    reason, grown_mb = result.stdout.splitlines()
    need = 30000 * 30000 * 6  # greyscale: 1 byte decoded + 4 converted to RGB, rounded up
    assert reason == (f"too large to decode within the memory bound: 30000x30000 = 900000000 pixels (L) need about "
                      f"{need / 1e9:.3g} GB, over the 1.5 GB per worker; raise it with --roi-memory-gb")
    assert int(grown_mb) < 100  # refused from the header: nothing decoded


def test_the_bound_is_an_option_and_a_raised_bound_converts(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 255, (1200, 1000, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "rgb.png")
    # RGB: 9 bytes per pixel, 0.0108 GB
    with pytest.raises(RoiError, match=r"1000x1200 = 1200000 pixels \(RGB\) need about 0\.0108 GB, over the 0\.01 GB"):
        convert_roi(tmp_path / "rgb.png", memory_gb=0.01)
    roi = convert_roi(tmp_path / "rgb.png", memory_gb=0.011)
    assert roi.pixels.shape == (384, 384, 3) and (roi.x, roi.y, roi.side) == (0.0, 100.0, 1000.0)


def test_convert_names_the_refused_file_in_one_line_and_converts_the_rest(tmp_path: Path) -> None:
    sources = tmp_path / "sources"
    (sources / "roi").mkdir(parents=True)
    compressible_png(sources / "roi" / "big.png", 30000, 30000)
    Image.fromarray(np.full((300, 400, 3), 120, np.uint8)).save(sources / "roi" / "ok.png")
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"version": 1, "entries": [
        {"name": "r", "kind": "roi", "path": "roi", "pattern": "*.png", "scale": "M", "organ": "breast",
         "disease": "unknown", "stain": "H&E", "field": "histopathology", "license": "unknown", "homepage": "unknown",
         "citation": "unknown"}]}))
    command = [sys.executable, "-m", "cpia_hf.cli", "convert", "--catalog", str(catalog), "--source-root", str(sources),
               "--out", str(tmp_path / "out"), "--configs", "full", "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 1
    failures = [line for line in result.stderr.splitlines() if "roi/big.png" in line]
    assert len(failures) == 1 and "--roi-memory-gb" in failures[0] and "900000000 pixels" in failures[0]
    assert "M 1 rows" in result.stdout  # ok.png converted
