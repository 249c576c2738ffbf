"""Peak memory of a worker on the largest slide the converter accepts (MAX_MASK_PIXELS thumbnail).

Writes a small TIFF claiming 180,000 x 180,000 px at 0.25 um/px (5 levels, blank glass), builds its
tissue thumbnail, mask and summed-area tables (the colour table too with --rule release), converts it,
and prints the peak resident memory. Usage: python benchmarks/slide_memory.py [--rule mask|release]
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from cpia_hf.dataset.slide.cells import StandardSlide
from cpia_hf.dataset.slide.grid import XL_SIDE
from cpia_hf.dataset.slide.header import MAX_MASK_PIXELS
from cpia_hf.dataset.slide.readers import open_slide
from cpia_hf.dataset.slide.tiles import iter_slide_tiles
from cpia_hf.dataset.tissue import TissueRule
from cpia_hf.demo.synth import write_claimed_size_tiff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rule", choices=("mask", "release"), default="mask")
    parser.add_argument("--side", type=int, default=180_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = write_claimed_size_tiff(Path(folder) / "huge.tiff", args.side, args.side, 0.25, levels=5)
        start = time.perf_counter()
        source = open_slide(path)
        grid = StandardSlide(source)
        if args.rule == "release":
            grid.thumbnail_colour(0, 0, XL_SIDE, XL_SIDE)  # builds the colour table
        mask_pixels = grid.thumbnail.shape[0] * grid.thumbnail.shape[1]
        source.close()
        del grid, source  # the conversion below builds its own
        tiles = sum(1 for _ in iter_slide_tiles(path, slide_stem="huge", rule=TissueRule(args.rule)))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.side}x{args.side} px, {mask_pixels:,} thumbnail px (limit {MAX_MASK_PIXELS:,}), rule "
          f"{args.rule}: peak RSS {peak:.0f} MB, {time.perf_counter() - start:.1f} s, {tiles} tiles")


if __name__ == "__main__":
    main()
