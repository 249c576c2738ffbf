"""Real-looking slides (light grey glass, faint eosin with R - G < 20, scanner MPPs, single-level TIFF)
keep their tissue under the default tissue rule; blank glass gives nothing."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from cpia_hf.dataset.slide.tiles import iter_slide_tiles
from cpia_hf.dataset.tissue import TissueRule
from cpia_hf.dataset.units import ConvertOptions
from cpia_hf.demo.synth import FAINT, he_like_image, tissue_truth, write_slide
from cpia_hf.standard import SCALE_SIDES, STANDARD_MPP

# (vendor, mpp, width, height, levels): a 20x skin biopsy as SVS pyramid, a 40x single-level generic TIFF.
SLIDES = {
    "biopsy-20x-svs": ("aperio", 0.499, 2200, 3000, None),
    "biopsy-40x-single-level-tiff": ("generic", 0.263, 4400, 5600, 1),
}


def write_faint(path, vendor, mpp, width, height, levels, tissue, seed=11):
    pixels = he_like_image(width, height, seed=seed, tissue=tissue, stain=FAINT)
    return write_slide(path, pixels, mpp, vendor=vendor, levels=levels), pixels


def true_fractions(truth: np.ndarray, mpp: float, scale: str) -> dict[tuple[int, int], float]:
    """Share of each `scale` grid square (inside the standardised slide) that is tissue in the drawing."""
    side = SCALE_SIDES[scale]
    f = STANDARD_MPP / mpp  # source pixels per standardised pixel
    columns, rows = int(truth.shape[1] / f) // side, int(truth.shape[0] / f) // side
    fractions = {}
    for j in range(rows):
        for i in range(columns):
            x0, y0, x1, y1 = (round(v * side * f) for v in (i, j, i + 1, j + 1))
            fractions[(i, j)] = float(truth[y0:y1, x0:x1].mean())
    return fractions


def test_the_default_rule_is_the_mask_rule():
    assert TissueRule().name == ConvertOptions().tissue_rule == "mask"


@pytest.mark.parametrize("name", sorted(SLIDES))
def test_faint_biopsy_keeps_its_tissue_tiles(tmp_path, name):
    vendor, mpp, width, height, levels = SLIDES[name]
    path, pixels = write_faint(tmp_path / f"{name}.tif", vendor, mpp, width, height, levels, tissue=0.5)
    truth = tissue_truth(width, height, seed=11, tissue=0.5)
    tissue_mean = pixels[truth].mean(axis=0)
    assert 0.4 < truth.mean() < 0.6 and tissue_mean[0] - tissue_mean[1] < 20  # faint eosin on half the glass
    assert np.abs(pixels[~truth].mean(axis=0) - 235).max() < 3  # light grey glass

    tiles = list(iter_slide_tiles(path, slide_stem="b"))
    for scale in ("L", "M"):
        kept = {(t.x_index, t.y_index) for t in tiles if t.scale == scale}
        fractions = true_fractions(truth, mpp, scale)
        tissue = {p for p, v in fractions.items() if v >= 0.5}
        glass = {p for p, v in fractions.items() if v <= 0.05}
        assert tissue and tissue <= kept, (scale, sorted(tissue - kept))
        assert not kept & glass, (scale, sorted(kept & glass))
        expected = sum(v >= 0.25 for v in fractions.values())  # the rule's threshold on the true fractions
        assert abs(len(kept) - expected) <= max(1, 0.15 * expected), (scale, len(kept), expected)
    counts = Counter(t.scale for t in tiles)
    assert counts["S"] == counts["M"] > 0
    # The released processing's XL colour rule drops every tile of these slides: why it is not the default.
    assert not list(iter_slide_tiles(path, slide_stem="b", rule=TissueRule("release")))


def test_blank_glass_gives_no_tiles(tmp_path):
    path, _ = write_faint(tmp_path / "blank.tiff", "generic", 0.499, 2200, 3000, 1, tissue=0.0)
    assert list(iter_slide_tiles(path, slide_stem="blank")) == []


def test_card_records_the_tissue_rule(demo_build):
    card = (demo_build / "dataset" / "README.md").read_text()
    assert "Tissue rule `mask`" in card and "thumbnail mask" in card


def test_tma_cores_keep_their_tiles(tmp_path):
    """A tissue micro-array: faint round cores (0.4 mm) on light grey glass, a 20x single-level TIFF.
    Every M tile mostly inside a core is kept, none on the glass between them."""
    width, height, mpp = 4000, 3000, 0.499
    tissue = he_like_image(width, height, seed=21, tissue=1.0, stain=FAINT)
    pixels = np.full_like(tissue, 235)
    yy, xx = np.mgrid[0:height, 0:width]
    centres = [(600 + 1400 * i, 700 + 1500 * j) for i in range(3) for j in range(2)]
    cores = np.zeros((height, width), bool)
    for cx, cy in centres:
        cores |= (xx - cx) ** 2 + (yy - cy) ** 2 <= 400**2
    pixels[cores] = tissue[cores]
    path = write_slide(tmp_path / "tma.tiff", pixels, mpp, vendor="generic", levels=1)
    kept = {(t.x_index, t.y_index) for t in iter_slide_tiles(path, slide_stem="tma") if t.scale == "M"}
    fractions = true_fractions(cores, mpp, "M")
    mostly_core = {p for p, v in fractions.items() if v >= 0.5}
    glass = {p for p, v in fractions.items() if v <= 0.05}
    assert len(mostly_core) >= 6 and mostly_core <= kept
    assert glass and not kept & glass
    centre_tiles = {(round(x * mpp / STANDARD_MPP) // 384, round(y * mpp / STANDARD_MPP) // 384) for x, y in centres}
    assert centre_tiles <= kept  # each core keeps at least the M tile at its centre


def test_real_slide_keeps_its_tissue_and_drops_its_glass(real_slide):
    """On the real H&E region (skin, glass on its left) the default rule keeps every M tile that is mostly
    tissue and none that is glass; tissue is judged independently, on level 0: a pixel whose darkest channel
    is below 200 (stain absorbs; bright glass does not)."""
    import openslide

    with openslide.OpenSlide(real_slide) as slide:
        level0 = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    stained = level0.min(axis=2) < 200
    everything = [t for t in iter_slide_tiles(real_slide, slide_stem="cmu", rule=TissueRule("mask", 0.0))
                  if t.scale == "M"]
    kept = {(t.x_index, t.y_index) for t in iter_slide_tiles(real_slide, slide_stem="cmu") if t.scale == "M"}
    truth = {}
    for tile in everything:
        x0, y0 = round(tile.x), round(tile.y)
        truth[(tile.x_index, tile.y_index)] = stained[y0:y0 + round(tile.height), x0:x0 + round(tile.width)].mean()
        assert abs(tile.tissue_fraction - truth[(tile.x_index, tile.y_index)]) < 0.15, tile.image_id
    tissue = {p for p, v in truth.items() if v >= 0.5}
    glass = {p for p, v in truth.items() if v <= 0.1}
    assert len(tissue) >= 10 and len(glass) >= 10
    assert tissue <= kept and not kept & glass
