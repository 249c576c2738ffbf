"""Tissue rules: which WSI tiles are kept.

Two rules:
- "mask" (the default) keeps a tile when at least `min_fraction` of its area is tissue in a
  low-resolution tissue mask (see `tissue_mask`). Every tile is judged on its own, so partial XL
  cells, slide borders, small biopsies and TMA cores keep their tissue, faintly stained too.
- "release" reproduces the released processing's counts: an XL tile is kept when its mean colour
  looks stained (`release_keeps_xl`); an L/M/S tile inside a kept XL tile is dropped only when its
  mean colour is blank (`release_is_blank`). It is a colour test on the whole XL cell, not a tissue
  detector: a faint eosin biopsy (R - G < 20) or a cell mostly of glass loses every tile.
Every tile records its mask tissue fraction, whichever rule decides.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

RuleName = Literal["mask", "release"]  # the first is the default
RULES: tuple[str, ...] = get_args(RuleName)
# The release's thresholds on a tile's mean colour (0-255), used only here.
WHITE_LEVEL = 220  # a channel above this is blank glass
MIN_RED = 100  # an XL tile needs R > 100 ...
MIN_BLUE = 30  # ... B > 30 ...
MIN_RED_OVER_GREEN = 20  # ... and R > G + 20 (eosin)
# Otsu's threshold on saturation is clamped to this range, so that a slide that is all tissue or
# all background (one mode only) still gets a sensible split.
MIN_SATURATION = 0.05
MAX_SATURATION = 0.2
# A thumbnail's mean colour differs from the full-resolution mean by a few levels (pyramid and JPEG
# error); an XL cell is dropped unread only when the release rule fails by more than this margin.
RELEASE_MARGIN = 8.0
# Near-black pixels (pen marks, scanner borders) are never tissue.
MIN_BRIGHTNESS = 30
# A greyscale image (a scan saved in grey, a fluorescence channel) has content darker than glass but no colour:
# the saturation mask can find no tissue in it, and it is not H&E. A pixel whose channels differ by at most
# GREY_SPREAD has no colour (JPEG's chroma error stays below it); content is a pixel whose darkest channel is
# below CONTENT_LEVEL, and at least MIN_CONTENT of the thumbnail must be content.
GREY_SPREAD = 4
CONTENT_LEVEL = 200
MIN_CONTENT = 0.01


@dataclass(frozen=True)
class TissueRule:
    """How tiles are kept: `name` is "release" or "mask"; `min_fraction` is the mask rule's threshold."""

    name: RuleName = "mask"
    min_fraction: float = 0.25

    def __post_init__(self) -> None:
        if self.name not in RULES:
            raise ValueError(f"unknown tissue rule {self.name!r} (expected one of {RULES})")
        if not 0.0 <= self.min_fraction <= 1.0:
            raise ValueError(f"tissue rule min_fraction must lie in [0, 1], got {self.min_fraction}")


def release_keeps_xl(mean_rgb: tuple[float, float, float]) -> bool:
    """The release keeps an XL tile when its mean colour looks like stained tissue."""
    r, g, b = mean_rgb
    return max(r, g, b) < WHITE_LEVEL and r > MIN_RED and b > MIN_BLUE and r > g + MIN_RED_OVER_GREEN


def release_is_blank(mean_rgb: tuple[float, float, float]) -> bool:
    """The release drops an L/M/S tile only when all three mean channels are above WHITE_LEVEL."""
    return all(c > WHITE_LEVEL for c in mean_rgb)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]: the split maximising the between-class variance.

    Between two well separated modes every split in the gap is maximal: take the middle one.
    """
    counts, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(counts * centres)
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    return float(edges[int(best[len(best) // 2]) + 1])


def tissue_mask(thumbnail: np.ndarray) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail: HSV saturation above a clamped Otsu threshold.

    Stained tissue is coloured while glass and background are grey or white, so saturation
    (max - min) / max separates them regardless of stain intensity.
    """
    brightest = thumbnail.max(axis=2)
    saturation = (brightest - thumbnail.min(axis=2)).astype(np.float32) / np.maximum(brightest, 1)
    threshold = float(np.clip(otsu_threshold(saturation), MIN_SATURATION, MAX_SATURATION)) if saturation.size else 0.0
    return (saturation >= threshold) & (brightest >= MIN_BRIGHTNESS)


def is_greyscale(thumbnail: np.ndarray) -> bool:
    """Whether an RGB thumbnail shows content (darker than glass) but no pixel with colour."""
    darkest, brightest = thumbnail.min(axis=2), thumbnail.max(axis=2)
    content = float((darkest < CONTENT_LEVEL).mean()) if darkest.size else 0.0
    return content >= MIN_CONTENT and int((brightest - darkest).max()) <= GREY_SPREAD


def keeps_tile(rule: TissueRule, scale: str, tissue_fraction: float,
               mean_rgb: tuple[float, float, float] | None) -> bool:
    """Whether `rule` keeps a tile of `scale` with this mask fraction and mean colour.

    Under the release rule an XL decision uses `release_keeps_xl` and an L/M/S decision
    `release_is_blank`; the caller only asks about L/M/S tiles of XL cells the rule kept.
    """
    if rule.name == "mask":
        return tissue_fraction >= rule.min_fraction
    if mean_rgb is None:
        raise ValueError("the release tissue rule needs the tile's mean colour")
    return release_keeps_xl(mean_rgb) if scale == "XL" else not release_is_blank(mean_rgb)


def release_surely_drops_xl(mean_rgb: tuple[float, float, float], margin: float = RELEASE_MARGIN) -> bool:
    """Whether `release_keeps_xl` fails for every colour within `margin` of `mean_rgb` in each channel.

    Same thresholds as `release_keeps_xl`; the R - G test moves by up to twice the margin.
    """
    r, g, b = mean_rgb
    return (max(r, g, b) >= WHITE_LEVEL + margin or r <= MIN_RED - margin or b <= MIN_BLUE - margin
            or r <= g + MIN_RED_OVER_GREEN - 2 * margin)


def release_surely_keeps_xl(mean_rgb: tuple[float, float, float], margin: float = RELEASE_MARGIN) -> bool:
    """Whether `release_keeps_xl` holds for every colour within `margin` of `mean_rgb` in each channel."""
    r, g, b = mean_rgb
    return (max(r, g, b) < WHITE_LEVEL - margin and r > MIN_RED + margin and b > MIN_BLUE + margin
            and r > g + MIN_RED_OVER_GREEN + 2 * margin)
