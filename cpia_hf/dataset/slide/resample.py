"""Resampling a pyramid level's pixels to the standard MPP.

A region is shrunk by an integer k x k first (JPEG DCT scaling on the fast path, else `Image.reduce`), then
the remaining factor is interpolated. The shrink k is taken when the factor is >= k / (1 + PRE_REDUCE_SLACK),
so that every usual 40x MPP (0.2265-0.2718 um/px: Hamamatsu 0.2265, Aperio AT2 0.2527, GT450 0.263) is decoded
at half size in the DCT domain and the remainder lies within 10 % of 1.

A remainder within MAX_WARP_SHRINK of 1 needs no antialiasing: it is linear interpolation by OpenCV's
`warpAffine` of the pixels sharpened by a 3-tap prefilter (SHARPEN), because linear interpolation between
pixel centres averages neighbours and softens the tiles, and OpenCV's cubic and Lanczos warps cost several
times more than the prefilter and the linear warp together. A larger shrink goes through Pillow's antialiased
bilinear filter. `python benchmarks/convert.py` measures each tile against a Lanczos resize from level 0.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import cv2
import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from .readers import SlideReader

RESAMPLE = Image.Resampling.BILINEAR
PRE_REDUCE_SLACK = 0.1  # pre-reduce by k when the factor is >= k / 1.1 (at most 10% upsampling after)
FILTER_SUPPORT = {
    Image.Resampling.BOX: 0.5, Image.Resampling.BILINEAR: 1.0, Image.Resampling.HAMMING: 1.0,
    Image.Resampling.BICUBIC: 2.0, Image.Resampling.LANCZOS: 3.0,
}
# Remainders up to this shrink are warped without antialiasing: after the k x k pre-reduction a slide's
# spectrum is already limited, and the warp is much cheaper than Pillow's antialiased filter.
MAX_WARP_SHRINK = 1 + PRE_REDUCE_SLACK
# The prefilter [-a, 1 + 2a, -a] (each axis) before linear interpolation: with a = 0.1 it restores the contrast
# of fine detail that interpolating between pixel centres loses; a stronger one oversharpens.
SHARPEN = 0.1
SHARPEN_KERNEL = np.array([-SHARPEN, 1 + 2 * SHARPEN, -SHARPEN], np.float32)
# Conversion runs one slide per process: OpenCV's own thread pool would only oversubscribe the cores.
cv2.setNumThreads(1)


def best_level(downsamples: tuple[float, ...], scale: float) -> int:
    """The coarsest level whose downsample does not exceed `scale` (level 0 when none is finer)."""
    fitting = [i for i, d in enumerate(downsamples) if d <= scale * (1 + 1e-9)]
    return max(fitting, key=lambda i: downsamples[i]) if fitting else 0


def pre_reduce_factor(ratio: float) -> int:
    """The integer k x k shrink taken before the filter when resampling shrinks `ratio` times."""
    return max(1, int(ratio * (1 + PRE_REDUCE_SLACK)))


def resample_region(source: SlideReader, level: int, box: tuple[float, float, float, float], size: tuple[int, int],
                    resample: Image.Resampling = RESAMPLE, out: np.ndarray | None = None) -> np.ndarray:
    """Resample the level-`level` rectangle `box` (float level coordinates) of `source` to `size` pixels (into `out`).

    When shrinking by k >= 2, the reader first averages k x k (on a grid anchored at the level's
    origin, in the DCT domain where it can) and the filter does the rest of the way. The integer
    rectangle read around `box` carries the filter's support, so that a region resampled in
    pieces equals the same region resampled whole (up to Pillow's rounding of sub-boxes, +-1 level).
    """
    level_w, level_h = source.level_dimensions[level]
    left, top, right, bottom = box
    ratio = max((right - left) / size[0], (bottom - top) / size[1])
    factor = pre_reduce_factor(ratio)
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

    With RESAMPLE, a factor up to MAX_WARP_SHRINK is the SHARPEN prefilter then linear interpolation by OpenCV's
    `warpAffine` (pixel centres mapped as Pillow maps them, edges replicated as Pillow clamps them: within +-1
    level of Pillow's bilinear `Image.resize` of the prefiltered pixels); a box that maps pixel centres onto
    pixel centres is a plain copy. A larger shrink, or another filter, is Pillow's antialiased `Image.resize`.
    """
    scale_x, scale_y = (box[2] - box[0]) / size[0], (box[3] - box[1]) / size[1]
    if resample == RESAMPLE and max(scale_x, scale_y) <= MAX_WARP_SHRINK:
        source = np.asarray(pixels if pixels.mode == "RGB" else pixels.convert("RGB"))
        matrix = np.array([[scale_x, 0.0, box[0] + scale_x / 2 - 0.5], [0.0, scale_y, box[1] + scale_y / 2 - 0.5]])
        copy = scale_x == scale_y == 1.0 and float(box[0]).is_integer() and float(box[1]).is_integer()
        if not copy:
            source = cv2.sepFilter2D(source, -1, SHARPEN_KERNEL, SHARPEN_KERNEL, borderType=cv2.BORDER_REPLICATE)
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
