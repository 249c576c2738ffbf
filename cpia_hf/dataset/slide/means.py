"""Exact mean colours: of an image, of its blocks, and of rectangles of a summed-area table."""
from __future__ import annotations

import numpy as np

Colour = tuple[float, float, float]


def integral(values: np.ndarray, dtype: type) -> np.ndarray:
    """Summed-area table with a zero first row and column, accumulated in place (one array of `dtype`).

    An unsigned table may wrap around: `area_mean` subtracts in the same modular arithmetic, so a
    rectangle's sum stays exact while it fits the type (uint32 colour sums: rectangles of up to 16.8M
    values, far above an XL cell's mask pixels).
    """
    table = np.zeros((values.shape[0] + 1, values.shape[1] + 1) + values.shape[2:], dtype)
    table[1:, 1:] = values
    np.cumsum(table, axis=0, out=table)
    np.cumsum(table, axis=1, out=table)
    return table


def area_mean(table: np.ndarray, column: int, row: int, columns: int, rows: int) -> np.ndarray:
    """Mean of the values in a rectangle of a summed-area table."""
    bottom, right = row + rows, column + columns
    total = table[bottom, right] - table[row, right] - table[bottom, column] + table[row, column]  # may wrap
    return total / (columns * rows)


def mean_colour(pixels: np.ndarray, bad: np.ndarray | None = None, block: int = 1) -> Colour:
    """Exact mean colour of an image (integer column sums first: a float mean costs more); without the
    `block` x `block` squares marked in `bad` when given."""
    if bad is not None and bad.any():
        good = ~np.repeat(np.repeat(bad, block, 0), block, 1)[:pixels.shape[0], :pixels.shape[1]]
        return tuple(float(v) for v in pixels[good].mean(axis=0)) if good.any() else (255.0, 255.0, 255.0)
    height, width = pixels.shape[:2]
    sums = pixels.reshape(height, width * 3).sum(axis=0, dtype=np.uint32).reshape(width, 3).sum(axis=0)
    return tuple(float(v) / (height * width) for v in sums)


def block_means(cell: np.ndarray, block: int) -> np.ndarray:
    """Mean colour of every full `block` x `block` square of `cell`, shape (rows, columns, 3), exact."""
    rows, columns = cell.shape[0] // block, cell.shape[1] // block
    part = cell[:rows * block, :columns * block]
    column_sums = part.reshape(rows, block, columns * block * 3).sum(axis=1, dtype=np.uint32)
    sums = column_sums.reshape(rows, columns, block, 3).sum(axis=2)
    return sums / float(block * block)
