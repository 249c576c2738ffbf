"""Whole-slide images to CPIA tiles; each step a module with a public interface.

- `readers`: `open_slide` checks a slide's MPP and size from its header and returns a `SlideReader`
  (`TiffJpegReader` for JPEG-tiled TIFF, `OpenSlideReader` for every other format OpenSlide opens).
- `resample`: a pyramid level's pixels to the standard MPP (0.4942 um/px).
- `grid`: where XL cells and their nested L/M/S tiles lie, in standardised pixels (no pixel read).
- `means`: exact mean colours of images, blocks and summed-area-table rectangles.
- `cells`: the standardised slide (`StandardSlide`): tissue thumbnail and mask, one XL cell's pixels at a time.
- `tiles`: which tiles the tissue rule keeps (`iter_slide_tiles`, the entry point of a conversion).
"""
