"""The global grid of a standardised slide: where XL cells and their nested tiles lie, in standardised pixels.

Pure coordinates: nothing here reads a pixel. A slide resampled to STANDARD_MPP is cut into XL cells of
XL_SIDE px in row-major order; each cell holds L, M and S tiles on the same global grid, those lying fully
inside the standardised slide (partial cells at the right and bottom borders hold partial rows of tiles).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ...standard import SCALE_SIDES

XL_SIDE, M_SIDE, S_SIDE = (SCALE_SIDES[s] for s in ("XL", "M", "S"))
MASK_PX = 16  # standardised pixels per tissue-mask pixel; every tile side is a multiple of it
# Under the mask rule a cell is read only where kept tiles lie, decided on a grid of READ_BLOCK x READ_BLOCK
# squares (192 px divides the XL, L and M sides, so every tile covers whole squares), the needed squares merged
# into as few rectangles as possible (a cell of tissue is one rectangle, read in bands).
READ_BLOCK = 192


@dataclass(frozen=True)
class XLCell:
    """One XL cell of the global grid: its index (column, row), its top-left corner (x0, y0) and its size,
    clipped to the standardised slide."""

    column: int
    row: int
    x0: int
    y0: int
    width: int
    height: int


def xl_cells(std_width: int, std_height: int) -> Iterator[XLCell]:
    """The global grid's XL cells of a standardised slide, row-major, partial cells at the right and bottom."""
    for row in range(-(-std_height // XL_SIDE)):
        for column in range(-(-std_width // XL_SIDE)):
            x0, y0 = column * XL_SIDE, row * XL_SIDE
            yield XLCell(column, row, x0, y0, min(XL_SIDE, std_width - x0), min(XL_SIDE, std_height - y0))


def tile_offsets(width: int, height: int, side: int) -> list[tuple[int, int]]:
    """Offsets (i, j) of the `side` tiles lying fully inside a width x height cell, row-major."""
    return [(i, j) for j in range(0, height - side + 1, side) for i in range(0, width - side + 1, side)]


def block_rectangles(needed: np.ndarray) -> list[tuple[int, int, int, int]]:
    """The True cells of a boolean grid as rectangles (row, column, rows, columns): each row's runs, a run merged
    with the same run of the rows below it."""
    rectangles, open_runs = [], {}  # (first column, end column) -> first row
    for row in range(needed.shape[0] + 1):
        runs = set()
        if row < needed.shape[0]:
            padded = np.concatenate(([False], needed[row], [False])).astype(np.int8)
            edges = np.flatnonzero(np.diff(padded))
            runs = set(zip(edges[::2].tolist(), edges[1::2].tolist()))
        for run in sorted(set(open_runs) - runs):
            first = open_runs.pop(run)
            rectangles.append((first, run[0], row - first, run[1] - run[0]))
        for run in runs - set(open_runs):
            open_runs[run] = row
    return sorted(rectangles)
