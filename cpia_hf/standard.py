"""The CPIA standard: physical scale, the nested multi-scale grid and the naming rule.

Every number here is the released processing's (see the dataset card): WSIs are resampled to
0.4942 um/px, XL tiles of 3840 px are cut into 4x4 L tiles (960 px) and 10x10 M tiles (384 px),
and each M tile into 4x4 S tiles (96 px). The release's tissue (blank-tile) rule and its thresholds
live with the other tissue rules in `cpia_hf.dataset.tissue`.
"""
from __future__ import annotations

import hashlib

STANDARD_MPP = 0.4942
# Plausible pixel sizes of a microscope scan, um/px (100x oil immersion ~0.05 to 2x overview ~5). A slide
# or catalog MPP outside is refused: it is a unit mix-up or a default (a TIFF's 72 dpi is 352.78 um/px).
MPP_RANGE = (0.05, 5.0)
SCALES = ("XL", "L", "M", "S")
SCALE_SIDES = {"XL": 3840, "L": 960, "M": 384, "S": 96}
# One folder per scale, so that a config of one scale downloads only its own bytes (an L user no XL tile).
# The release grouped XL with L in one folder; the release folders are RELEASE_FOLDERS (documented as globs in the card).
FOLDER_OF_SCALE = {"XL": "XL", "L": "L", "M": "M", "S": "S"}
FOLDERS = ("XL", "L", "M", "S")
RELEASE_FOLDERS = {"L": ("XL", "L"), "M": ("M",), "S": ("S",)}
ROI_SIDE = 384
MINI_SIDE = 384


def tile_name(slide_stem: str, side: int, x_index: int, y_index: int) -> str:
    """Release naming rule: `<slide>-<side>-<x>-<y>`, top-left corner at (side*x, side*y)."""
    return f"{slide_stem}-{side}-{x_index}-{y_index}"


def stable_unit_float(*parts: object) -> float:
    """A reproducible pseudo-random number in [0, 1) from the given parts (seeded sampling)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
