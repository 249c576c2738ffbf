"""Pixel encoding shared by every stage that stores an image."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

DEFAULT_JPEG_QUALITY = 90


def encode_jpeg(pixels: np.ndarray | Image.Image, quality: int = DEFAULT_JPEG_QUALITY) -> bytes:
    """JPEG bytes of an RGB image (HxWx3 uint8 array or PIL image), 4:2:0, optimised Huffman off for speed."""
    image = pixels if isinstance(pixels, Image.Image) else rgb_image(pixels)
    buffer = io.BytesIO()
    (image if image.mode == "RGB" else image.convert("RGB")).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def rgb_image(pixels: np.ndarray) -> Image.Image:
    """A Pillow RGB image of an HxWx3 uint8 array, also of a view into a larger image (a tile of a cell).

    Rows are unpacked straight from the array's memory with their stride: unlike `Image.fromarray`, no
    contiguous copy and no zero-filled image first, which on small tiles cost a noticeable share of encoding.
    """
    height, width, channels = pixels.shape
    if pixels.dtype != np.uint8 or channels != 3 or pixels.strides[1:] != (3, 1) or pixels.strides[0] < 3 * width:
        return Image.fromarray(np.ascontiguousarray(pixels, np.uint8), "RGB")
    stride = pixels.strides[0]
    span = stride * (height - 1) + 3 * width  # from the first pixel to the last, rows `stride` bytes apart
    memory = np.lib.stride_tricks.as_strided(pixels, shape=(span,), strides=(1,), writeable=False)
    image = Image.new("RGB", (width, height), None)  # None: not cleared, the unpacker fills every row
    image.frombytes(memory, "raw", ("RGB", stride))
    return image
