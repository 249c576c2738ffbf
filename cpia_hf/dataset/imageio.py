"""Pixel encoding shared by every stage that stores an image."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

DEFAULT_JPEG_QUALITY = 90


def encode_jpeg(pixels: np.ndarray | Image.Image, quality: int = DEFAULT_JPEG_QUALITY) -> bytes:
    """JPEG bytes of an RGB image (HxWx3 uint8 array or PIL image), 4:2:0, optimised Huffman off for speed."""
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(np.ascontiguousarray(pixels), "RGB")
    buffer = io.BytesIO()
    (image if image.mode == "RGB" else image.convert("RGB")).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
