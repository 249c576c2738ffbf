"""Slides that claim nonsense are refused fast, naming the file and the reason: default TIFF resolutions,
implausible or upsampling MPPs, catalog MPPs, and pixel bombs."""
from __future__ import annotations

import resource
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile
import yaml

from cpia_hf.dataset.catalog import CatalogError, load_catalog
from cpia_hf.dataset.slide.means import area_mean, integral
from cpia_hf.dataset.slide.header import MAX_MASK_PIXELS, MAX_SLIDE_PIXELS, SlideError
from cpia_hf.dataset.slide.readers import open_slide_info
from cpia_hf.dataset.slide.tiles import iter_slide_tiles
from cpia_hf.demo.synth import corrupt_tile, he_like_image, write_claimed_size_tiff, write_slide


def tiled_tiff(path, width, height, resolution, unit):
    """A generic tiled JPEG TIFF with the given resolution tags, as image tools write them."""
    with tifffile.TiffWriter(path) as tif:
        tif.write(he_like_image(width, height, seed=1), photometric="rgb", tile=(16, 16) if width < 256 else (256, 256),
                  compression="jpeg", resolution=(resolution, resolution), resolutionunit=unit, metadata=None)
    return path


@pytest.mark.parametrize("width, height, resolution, unit", [
    (300, 250, 72, "INCH"),  # OpenSlide's boxes.tiff case: 352.78 um/px
    (300, 250, 72 / 2.54, "CENTIMETER"),
    (48, 48, 72, "INCH"),
    (300, 250, 300, "INCH"),  # 84.7 um/px: a print resolution, not a scan either
])
def test_default_tiff_resolution_is_no_mpp(tmp_path, width, height, resolution, unit):
    path = tiled_tiff(tmp_path / "image.tiff", width, height, resolution, unit)
    with pytest.raises(SlideError, match="no MPP in slide metadata and no catalog mpp") as error:
        open_slide_info(path)
    assert str(path) in str(error.value) and "TIFF resolution tags" in error.value.reason
    with pytest.raises(SlideError, match="no MPP"):
        list(iter_slide_tiles(path, slide_stem="image"))
    assert open_slide_info(path, mpp_override=0.5).mpp == 0.5  # a catalog MPP still serves


@pytest.mark.parametrize("mpp, reason", [(5.0, r"would be upsampled 10\.1x"), (2.0, r"upsampled 4\.0x"),
                                         (0.01, "outside the plausible range")])
def test_implausible_or_upsampling_mpp_is_refused(tmp_path, mpp, reason):
    path = write_slide(tmp_path / "odd.svs", he_like_image(512, 512, seed=2), mpp)
    with pytest.raises(SlideError, match=reason) as error:
        open_slide_info(path)
    assert str(path) in str(error.value)
    with pytest.raises(SlideError, match=reason):
        open_slide_info(write_slide(tmp_path / "none.svs", he_like_image(512, 512, seed=2), None), mpp_override=mpp)


def test_10x_scan_still_converts(tmp_path):
    path = write_slide(tmp_path / "ten.svs", he_like_image(1024, 1024, seed=3, tissue=0.9), 1.0)
    assert open_slide_info(path).std_width == int(1024 / (0.4942 / 1.0))
    assert list(iter_slide_tiles(path, slide_stem="ten"))


def test_catalog_mpp_outside_the_plausible_range_is_refused(tmp_path):
    entry = {"name": "w", "kind": "wsi", "path": "w", "pattern": "*.svs", "organ": "skin", "disease": "unknown",
             "stain": "H&E", "field": "histopathology", "license": "unknown", "homepage": "unknown",
             "citation": "unknown"}
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "entries": [{**entry, "mpp": 0.25}]}))
    assert load_catalog(path)[0].mpp == 0.25
    path.write_text(yaml.safe_dump({"version": 1, "entries": [{**entry, "mpp": 1000}]}))
    with pytest.raises(CatalogError, match=r"entry 0 \('w'\): mpp must be .* 0\.05-5\.0, got 1000") as error:
        load_catalog(path)
    assert str(path) in str(error.value)


def test_pixel_bomb_is_refused_before_allocating(tmp_path):
    """A consistent 10^6 x 10^6 px TIFF (2 MB: every tile entry points at one JPEG tile) and a
    200,000^2 px one at 1.2 um/px whose thumbnail would be too large are refused at once, in bounded memory."""
    bomb = write_claimed_size_tiff(tmp_path / "bomb.tiff", 10**6, 10**6, 0.5)
    coarse = write_claimed_size_tiff(tmp_path / "coarse.tiff", 200_000, 200_000, 1.2)
    assert bomb.stat().st_size < 4_000_000
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(SlideError, match=f"1000000x1000000 px exceeds the limit of {MAX_SLIDE_PIXELS:,} px") as error:
        list(iter_slide_tiles(bomb, slide_stem="bomb"))
    assert str(bomb) in str(error.value)
    with pytest.raises(SlideError, match=f"needs a tissue thumbnail of .* over the limit of {MAX_MASK_PIXELS:,}"):
        list(iter_slide_tiles(coarse, slide_stem="coarse"))
    assert time.perf_counter() - start < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 200_000  # KiB: nothing allocated


def test_claimed_size_tiff_within_bounds_is_read(tmp_path):
    """The bomb writer makes real slides: within the bounds the same file is read, its glass gives no tile."""
    path = write_claimed_size_tiff(tmp_path / "glass.tiff", 6000, 5000, 0.5)
    assert open_slide_info(path).width == 6000
    assert list(iter_slide_tiles(path, slide_stem="glass")) == []
    with tifffile.TiffFile(path) as tif:
        assert np.asarray(tif.pages[0].asarray()[:8, :8]).mean() == pytest.approx(236, abs=2)


def test_wrapping_summed_area_table_gives_exact_means():
    """The colour table is unsigned and may wrap around (uint32 on slides): rectangle means stay exact
    while a rectangle's sum fits the type. Shown with uint16, whose whole-table sums wrap many times."""
    rng = np.random.default_rng(0)
    values = rng.integers(0, 256, (120, 150, 3), dtype=np.uint8)
    table = integral(values, np.uint16)
    assert int(values[..., 0].astype(np.int64).sum()) > 2**16  # the table wrapped
    for column, row, columns, rows in [(0, 0, 10, 10), (37, 80, 15, 16), (140, 110, 10, 10)]:
        expected = values[row:row + rows, column:column + columns].reshape(-1, 3).mean(axis=0)
        assert np.allclose(area_mean(table, column, row, columns, rows), expected)


def convert_wsi_sources(tmp_path):
    """`cpia convert` of `tmp_path/sources/wsi/*` as one WSI subset (full config only)."""
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"version": 1, "entries": [
        {"name": "w", "kind": "wsi", "path": "wsi", "pattern": "*.*", "organ": "skin", "disease": "unknown",
         "stain": "H&E", "field": "histopathology", "license": "unknown", "homepage": "unknown",
         "citation": "unknown"}]}))
    return subprocess.run([sys.executable, "-m", "cpia_hf.cli", "convert", "--catalog", str(catalog),
                           "--source-root", str(tmp_path / "sources"), "--out", str(tmp_path / "out"),
                           "--no-progress", "--configs", "full"], capture_output=True, text=True, timeout=120)


def test_hostile_slides_are_named_and_their_neighbours_convert(tmp_path):
    sources = tmp_path / "sources" / "wsi"
    sources.mkdir(parents=True)
    write_slide(sources / "good.svs", he_like_image(2048, 1536, seed=7, tissue=0.9), 0.5)
    write_claimed_size_tiff(sources / "bomb.tiff", 10**6, 10**6, 0.5)
    tiled_tiff(sources / "boxes.tiff", 300, 250, 72, "INCH")
    write_slide(sources / "coarse.svs", he_like_image(512, 512, seed=2), 5.0)
    result = convert_wsi_sources(tmp_path)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    for name, reason in [("wsi/bomb.tiff", "exceeds the limit"), ("wsi/boxes.tiff", "no MPP"),
                         ("wsi/coarse.svs", "would be upsampled")]:
        assert sum(name in line and reason in line for line in lines) == 1, (name, result.stderr)
    shards = sorted((tmp_path / "out" / "data" / "full").rglob("*.parquet"))
    files = {f for s in shards for f in pq.read_table(s, columns=["source_file"]).column("source_file").to_pylist()}
    assert files == {"wsi/good.svs"}


def edited_size_tiff(path, width, height):
    """A real 2048x2048 generic tiled TIFF whose header is edited to claim width x height px."""
    write_slide(path, he_like_image(2048, 2048, seed=1, tissue=0.9), 0.25, vendor="generic", levels=1)
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tif.pages[0].tags["ImageWidth"].overwrite(width)
        tif.pages[0].tags["ImageLength"].overwrite(height)
    return path


def negative_mpp_svs(path):
    path = write_slide(path, he_like_image(1024, 1024, seed=2, tissue=0.9), 0.25)
    path.write_bytes(path.read_bytes().replace(b"MPP = 0.2500", b"MPP = -0.250"))
    return path


def greyscale_tiff(path):
    grey = he_like_image(2048, 2048, seed=3, tissue=0.9).mean(axis=2).astype(np.uint8)
    with tifffile.TiffWriter(path) as tif:
        tif.write(grey, photometric="minisblack", tile=(256, 256), compression="jpeg", resolution=(4e4, 4e4),
                  resolutionunit="CENTIMETER", metadata=None)
    return path


@pytest.mark.parametrize("reader", ["auto", "openslide"])
def test_header_claiming_more_than_its_tiles_is_refused(tmp_path, reader):
    path = edited_size_tiff(tmp_path / "claims.tiff", 65535, 65535)
    with pytest.raises(SlideError, match=r"claims 65535x65535 px, but its tile table holds 64 of the 65536 tiles"):
        open_slide_info(path, reader=reader)


def test_negative_mpp_is_named_invalid_not_non_square(tmp_path):
    path = negative_mpp_svs(tmp_path / "negative.svs")
    with pytest.raises(SlideError, match=r"invalid MPP in slide metadata \(mpp-x -0.25, mpp-y -0.25: negative\)"):
        open_slide_info(path)
    assert open_slide_info(path, mpp_override=0.25).mpp == 0.25  # the catalog's MPP still serves


def test_greyscale_slides_are_named_greyscale(tmp_path):
    with pytest.raises(SlideError, match=r"greyscale image \(minisblack, one sample per pixel\), not an H&E"):
        open_slide_info(greyscale_tiff(tmp_path / "grey.tiff"))
    grey = he_like_image(2048, 2048, seed=3, tissue=0.9).mean(axis=2).astype(np.uint8)
    as_rgb = write_slide(tmp_path / "grey-rgb.svs", np.repeat(grey[..., None], 3, axis=2), 0.25)  # R = G = B
    with pytest.raises(SlideError, match=r"greyscale image \(no pixel of the tissue thumbnail has colour\)"):
        list(iter_slide_tiles(as_rgb, slide_stem="grey"))
    assert list(iter_slide_tiles(write_claimed_size_tiff(tmp_path / "glass.tiff", 4000, 4000, 0.5), slide_stem="g")) == []


def test_an_unreadable_thumbnail_is_one_line(tmp_path):
    """Every tile of a claimed-size TIFF is the same broken JPEG: the thumbnail, built in several bands, is all
    glass, reported once."""
    path = write_claimed_size_tiff(tmp_path / "broken.tiff", 8000, 8000, 0.25)
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[0].dataoffsets[0]
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(b"\x00" * 16)  # no JPEG start marker: every decode fails
    errors = []
    assert list(iter_slide_tiles(path, slide_stem="broken", on_cell_error=errors.append)) == []
    info = open_slide_info(path)
    extent = f"{info.std_width // 16 * 16 * 0.4942 / 0.25:.0f}"  # the thumbnail's whole mask pixels, in level-0 px
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"thumbnail region x=0 y=0 w={extent} h={extent}: ") and "taken as glass" in errors[0]


def test_each_slide_fault_is_one_line_of_the_run(tmp_path):
    sources = tmp_path / "sources" / "wsi"
    sources.mkdir(parents=True)
    edited_size_tiff(sources / "claims.tiff", 65535, 65535)
    negative_mpp_svs(sources / "negative.svs")
    greyscale_tiff(sources / "grey.tiff")
    write_slide(sources / "good.svs", he_like_image(2048, 1536, seed=7, tissue=0.9), 0.5)
    result = convert_wsi_sources(tmp_path)
    assert result.returncode == 1
    lines = (result.stdout + result.stderr).splitlines()
    for name, reason in [("wsi/claims.tiff", "tile table holds 64 of the 65536 tiles"),
                         ("wsi/negative.svs", "invalid MPP in slide metadata"),
                         ("wsi/grey.tiff", "greyscale image")]:
        assert [line for line in lines if name in line] == [line for line in lines if name in line and reason in line]
        assert len([line for line in lines if name in line]) == 1, (name, result.stdout, result.stderr)


def test_a_slide_with_several_unreadable_regions_is_one_line_of_the_run(tmp_path):
    """Damaged level-0 tiles in two XL cells: the slide's readable tiles convert, and the run names the slide once,
    with its first read error and how many more there were."""
    sources = tmp_path / "sources" / "wsi"
    sources.mkdir(parents=True)
    damaged = write_slide(sources / "damaged.svs", he_like_image(4200, 4000, seed=2, tissue=0.9), 0.5)
    for column, row in ((2, 2), (15, 3)):  # in cells (0,0) and (1,0)
        corrupt_tile(damaged, column, row)
    write_slide(sources / "good.svs", he_like_image(2048, 1536, seed=7, tissue=0.9), 0.5)
    result = convert_wsi_sources(tmp_path)
    assert result.returncode == 1, result.stderr
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "damaged.svs" in line]
    assert len(lines) == 1, lines
    assert lines[0].startswith("  [w] wsi/damaged.svs: cell (0,0) region x=0 y=0 w=3795 h=3795: "), lines
    assert lines[0].endswith("blocks of 384 px unreadable, the tiles touching them are dropped (and 1 more "
                             "unreadable region in this slide)"), lines
    files = {name for path in (tmp_path / "out" / "data" / "full").rglob("*.parquet")
             for name in pq.read_table(path, columns=["source_file"]).column("source_file").to_pylist()}
    assert files == {"wsi/damaged.svs", "wsi/good.svs"}  # the rest of the damaged slide converted
