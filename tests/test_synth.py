"""Generated slides: H&E-like pixels and pyramidal TIFFs that OpenSlide reads back."""
from __future__ import annotations

import numpy as np
import openslide
import pytest
from PIL import Image

from cpia_hf.demo.synth import he_like_image, real_texture_image, write_slide


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return he_like_image(1200, 1000, seed=3)


def test_he_like_image_is_deterministic_with_tissue_and_background(pixels):
    assert pixels.shape == (1000, 1200, 3) and pixels.dtype == np.uint8
    assert np.array_equal(pixels, he_like_image(1200, 1000, seed=3))
    assert not np.array_equal(pixels, he_like_image(1200, 1000, seed=4))
    rgb = pixels.reshape(-1, 3).astype(int)
    background = (rgb.min(axis=1) > 220).mean()
    eosin = ((rgb[:, 0] > rgb[:, 1] + 40) & (rgb[:, 0] > 150)).mean()
    nuclei = ((rgb[:, 2] > rgb[:, 0]) & (rgb[:, 0] < 140)).mean()
    assert 0.2 < background < 0.6 and eosin > 0.2 and nuclei > 0.005


def test_tissue_fraction_controls_coverage():
    sparse = he_like_image(800, 800, seed=0, tissue=0.2).min(axis=2) > 220
    dense = he_like_image(800, 800, seed=0, tissue=0.8).min(axis=2) > 220
    assert sparse.mean() > 0.6 and dense.mean() < 0.35


@pytest.mark.parametrize("vendor", ["aperio", "generic"])
def test_openslide_reads_every_level_and_mpp(tmp_path, pixels, vendor):
    path = write_slide(tmp_path / f"slide.{'svs' if vendor == 'aperio' else 'tiff'}", pixels, 0.25, vendor=vendor)
    with openslide.OpenSlide(path) as slide:
        assert slide.properties[openslide.PROPERTY_NAME_VENDOR] == ("aperio" if vendor == "aperio" else "generic-tiff")
        assert slide.dimensions == (1200, 1000)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25)
        assert slide.level_dimensions[:2] == ((1200, 1000), (300, 250))
        level0 = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
        assert psnr(level0, pixels) > 35
        expected = np.asarray(Image.fromarray(pixels).reduce(4))
        for level in range(1, slide.level_count):
            region = np.asarray(slide.read_region((0, 0), level, slide.level_dimensions[level]).convert("RGB"))
            assert region.shape[:2] == slide.level_dimensions[level][::-1]
        level1 = np.asarray(slide.read_region((0, 0), 1, slide.level_dimensions[1]).convert("RGB"))
        assert psnr(level1, expected) > 30


@pytest.mark.parametrize("vendor", ["aperio", "generic"])
def test_no_mpp_written_when_unknown(tmp_path, pixels, vendor):
    path = write_slide(tmp_path / "slide.tiff", pixels[:300, :300], None, vendor=vendor, levels=1)
    with openslide.OpenSlide(path) as slide:
        assert openslide.PROPERTY_NAME_MPP_X not in slide.properties
        assert slide.level_count == 1


def test_corrupt_tile_fails_only_there(tmp_path, pixels):
    path = write_slide(tmp_path / "slide.svs", pixels, 0.5, corrupt_tile_at=(2, 1))
    with openslide.OpenSlide(path) as slide:
        good = np.asarray(slide.read_region((0, 0), 0, (256, 256)).convert("RGB"))
        assert psnr(good, pixels[:256, :256]) > 35
        with pytest.raises(openslide.OpenSlideError):
            slide.read_region((512, 256), 0, (256, 256))


def test_real_texture_image_is_the_real_slide_resampled_and_mirrored(real_slide) -> None:
    with openslide.OpenSlide(str(real_slide)) as slide:
        mpp = float(slide.properties[openslide.PROPERTY_NAME_MPP_X])
        original = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    same_scale = real_texture_image(real_slide, 2 * original.shape[1] + 10, original.shape[0] + 7, mpp)
    assert same_scale.shape == (original.shape[0] + 7, 2 * original.shape[1] + 10, 3)
    width = original.shape[1]
    assert np.array_equal(same_scale[: original.shape[0], :width], original)  # the slide itself
    assert np.array_equal(same_scale[: original.shape[0], width: 2 * width], original[:, ::-1])  # mirrored beside it
    assert np.array_equal(same_scale[original.shape[0]:, :width], original[::-1][:7])  # mirrored below it
    doubled = real_texture_image(real_slide, 400, 300, mpp / 2)
    reference = np.asarray(Image.fromarray(original[:150, :200]).resize((400, 300), Image.Resampling.LANCZOS))
    assert psnr(doubled[:280, :380].astype(float), reference[:280, :380]) > 30  # resampled to the new MPP
