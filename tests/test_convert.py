"""End-to-end conversion: layout, configs, mini composition, card counts, robustness and resume."""
from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import yaml
from datasets import load_dataset
from interrupt import kill_after_first_unit
from PIL import Image

from cpia_hf.dataset.catalog import load_catalog
from cpia_hf.dataset.convert import convert
from cpia_hf.dataset.mini import CELL_DIVISOR, M_PER_CELL
from cpia_hf.demo.synth import he_like_image, write_slide
from cpia_hf.standard import FOLDER_OF_SCALE, SCALE_SIDES, STANDARD_MPP

CONFIGS = ("full", "XL", "L", "M", "S", "full_clean", "mini", "mini_clean")
BENCHMARK_SUBSETS = {"demo-lung-roi"}  # the demo catalog's entry with `benchmarks:`


def card_metadata(dataset: Path) -> dict:
    text = (dataset / "README.md").read_text()
    return yaml.safe_load(text.split("---\n")[1])


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and ".work" not in p.parts
    }


def read_rows(dataset: Path, config: str, columns: list[str]) -> list[dict]:
    return load_dataset(str(dataset), config, split="train").select_columns(columns).to_list()


def test_layout_and_all_configs_load_offline(demo_build: Path) -> None:
    dataset = demo_build / "dataset"
    declared = {c["config_name"]: c for c in card_metadata(dataset)["configs"]}
    assert set(declared) == set(CONFIGS)
    assert declared["full"].get("default") is True
    info = {i["config_name"]: i["splits"][0]["num_examples"] for i in card_metadata(dataset)["dataset_info"]}
    for config in CONFIGS:
        ds = load_dataset(str(dataset), config, split="train")
        assert len(ds) == info[config] > 0, config
        assert ds.features["image"].__class__.__name__ == "Image"
        streamed = load_dataset(str(dataset), config, split="train", streaming=True)
        first = next(iter(streamed))
        assert isinstance(first["image"], Image.Image)
        assert first["scale"] in SCALE_SIDES and first["organ"] and first["subset"]
        if config in ("XL", "L", "M", "S"):  # one folder per scale: an L user downloads no XL tile
            assert set(ds["scale"]) == {config}
        if config.endswith("_clean"):
            assert not set(ds["subset"]) & BENCHMARK_SUBSETS
    # folder layout: data/full/<XL|L|M|S>/<subset>/<subset>-NNNNN.parquet, data/mini/mini-NNNNN-<group>.parquet
    for shard in (dataset / "data" / "full").rglob("*.parquet"):
        folder, slug, name = shard.relative_to(dataset / "data" / "full").parts
        assert folder in FOLDER_OF_SCALE.values() and name.startswith(slug + "-")
    minis = sorted(p.name for p in (dataset / "data" / "mini").iterdir())
    assert minis == ["mini-00000-clean.parquet", "mini-00001-benchmark.parquet"]


def test_clean_configs_and_release_grouping(demo_build: Path) -> None:
    dataset = demo_build / "dataset"
    columns = ["subset", "image_id", "scale"]
    for config in ("full", "mini"):
        every = read_rows(dataset, config, columns)
        clean = read_rows(dataset, f"{config}_clean", columns)
        assert {r["subset"] for r in every} & BENCHMARK_SUBSETS, config  # the demo has a benchmark subset
        assert sorted(map(str, clean)) == sorted(str(r) for r in every if r["subset"] not in BENCHMARK_SUBSETS)
    # the release's L folder (XL + L) as the documented glob pair
    globs = [str(dataset / "data/full/XL/*/*.parquet"), str(dataset / "data/full/L/*/*.parquet")]
    release_l = load_dataset("parquet", data_files=globs, split="train").select_columns(columns).to_list()
    full = read_rows(dataset, "full", columns)
    assert sorted(map(str, release_l)) == sorted(str(r) for r in full if r["scale"] in ("XL", "L"))


def test_full_rows_follow_the_standard(demo_build: Path) -> None:
    dataset = demo_build / "dataset"
    ds = load_dataset(str(dataset), "full", split="train")
    rows = ds.remove_columns("image").to_list()
    mpp_of = {"BRCA-0001": 0.25, "BRCA-0002": 0.5, "COAD-0001": 0.2525}
    scales = Counter()
    for row in rows:
        assert row["organ"] and row["scale"] and row["kind"] in ("wsi", "roi")
        if row["kind"] == "wsi":
            scales[row["scale"]] += 1
            stem, side, x, y = row["image_id"].rsplit("-", 3)
            assert int(side) == SCALE_SIDES[row["scale"]]
            source_mpp = mpp_of[stem]
            expected = int(side) * STANDARD_MPP / source_mpp
            assert row["width"] == pytest.approx(expected, rel=0.005)
            assert row["x"] == pytest.approx(int(side) * int(x) * STANDARD_MPP / source_mpp, rel=0.005, abs=0.5)
            assert row["mpp"] == pytest.approx(STANDARD_MPP)
            assert 0.0 <= row["tissue_fraction"] <= 1.0
    assert set(scales) == {"XL", "L", "M", "S"}
    # the biopsy (smaller than one XL tile) still yields L/M/S tiles
    biopsy = {r["scale"] for r in rows if r["image_id"].startswith("COAD-0001-")}
    assert "XL" not in biopsy and {"L", "M", "S"} <= biopsy
    for row in ds.select(range(0, len(ds), max(1, len(ds) // 60))):
        side = SCALE_SIDES[row["scale"]] if row["kind"] == "wsi" else 384
        assert row["image"].size == (side, side)


def test_mini_composition(demo_build: Path) -> None:
    dataset = demo_build / "dataset"
    mini = load_dataset(str(dataset), "mini", split="train")
    assert {img.size for img in mini["image"]} == {(384, 384)}
    rows = mini.remove_columns("image").to_list()
    cells = defaultdict(Counter)
    m_tiles = set()
    for row in rows:
        if row["kind"] != "wsi":
            continue
        stem, side, x, y = row["image_id"].rsplit("-", 3)
        scale = row["scale"]
        cells[(stem, int(x) // CELL_DIVISOR[scale], int(y) // CELL_DIVISOR[scale])][scale] += 1
        assert row["mpp"] == pytest.approx(STANDARD_MPP * SCALE_SIDES[scale] / 384)
        if scale == "M":
            m_tiles.add((stem, int(x), int(y)))
    assert cells, "mini has no WSI tiles"
    for counts in cells.values():
        assert counts["XL"] <= 1 and counts["L"] <= 16 and counts["M"] <= M_PER_CELL
        assert counts["S"] <= counts["M"]
    for row in rows:
        if row["kind"] == "wsi" and row["scale"] == "S":
            stem, side, x, y = row["image_id"].rsplit("-", 3)
            assert (stem, int(x) // 4, int(y) // 4) in m_tiles
    full_ids = set(load_dataset(str(dataset), "full", split="train")["image_id"])
    assert {r["image_id"] for r in rows} <= full_ids
    # every WSI subset contributes; ROI: labelled source only its training split, unlabelled whole
    assert {r["subset"] for r in rows} == {"demo-breast-wsi", "demo-colon-wsi", "demo-lung-roi", "demo-blood-roi"}
    lung = [r for r in rows if r["subset"] == "demo-lung-roi"]
    assert lung and all(r["source_file"].startswith("demo-lung-roi/train/") for r in lung)
    assert all(r["label"] == r["source_file"].split("/")[2] and r["image_id"].startswith(r["label"] + "-") for r in lung)
    assert {r["label"] for r in lung} == {"adenocarcinoma", "normal"}
    assert all(r["label"] is None for r in rows if r["subset"] == "demo-blood-roi")
    assert len(lung) == 12
    assert len([r for r in rows if r["subset"] == "demo-blood-roi"]) == 7


def test_card_counts_equal_rows(demo_build: Path) -> None:
    dataset = demo_build / "dataset"
    text = (dataset / "README.md").read_text()
    rows = load_dataset(str(dataset), "full", split="train").remove_columns("image").to_list()
    by_organ = Counter(r["organ"] for r in rows)
    for organ, n in by_organ.items():
        line = next(l for l in text.splitlines() if l.startswith(f"| {organ} |"))
        assert line.rstrip(" |").split("|")[-1].strip() == str(n)
    total = next(l for l in text.splitlines() if l.startswith("| **Total** |"))
    assert total.rstrip(" |").split("|")[-1].strip() == str(len(rows))
    assets = {"organ_composition.png": "PNG", **{f"gallery_{scale}.jpg": "JPEG" for scale in ("XL", "L", "M", "S")}}
    for name, image_format in assets.items():
        assert Image.open(dataset / "assets" / name).format == image_format
        assert f"assets/{name}" in text


def test_rerun_after_success_changes_nothing(demo_build: Path) -> None:
    dataset = demo_build / "dataset"
    before = tree_digest(dataset)
    entries = load_catalog(demo_build / "sources" / "catalog.yaml")
    report = convert(entries, demo_build / "sources", dataset, workers=1, progress=False)
    assert report.ok and report.skipped_units == report.units
    assert tree_digest(dataset) == before


def test_kill_then_rerun_equals_clean_run(demo_build: Path, tmp_path: Path) -> None:
    out = tmp_path / "dataset"
    command = [sys.executable, "-m", "cpia_hf.cli", "convert", "--catalog", str(demo_build / "sources" / "catalog.yaml"),
               "--source-root", str(demo_build / "sources"), "--out", str(out), "--workers", "1", "--no-progress"]
    kill_after_first_unit(command, out)
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert tree_digest(out) == tree_digest(demo_build / "dataset")


def test_corrupt_slide_and_truncated_roi_are_reported(tmp_path: Path) -> None:
    sources = tmp_path / "sources"
    (sources / "wsi").mkdir(parents=True)
    (sources / "roi").mkdir()
    write_slide(sources / "wsi" / "good.svs", he_like_image(2048, 1536, seed=7, tissue=0.9), 0.5)
    (sources / "wsi" / "broken.svs").write_bytes(b"II*\x00" + os.urandom(4000))
    write_slide(sources / "wsi" / "nompp.tiff", he_like_image(1024, 1024, seed=8), None, vendor="generic")
    for k in range(3):
        Image.fromarray(he_like_image(300, 200, seed=k)).save(sources / "roi" / f"ok_{k}.png")
    full = io.BytesIO()
    Image.fromarray(he_like_image(400, 300, seed=9)).save(full, format="PNG")
    (sources / "roi" / "truncated.png").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    catalog = tmp_path / "catalog.yaml"
    common = {"organ": "breast", "disease": "unknown", "stain": "H&E", "field": "histopathology",
              "license": "unknown", "homepage": "unknown", "citation": "unknown"}
    catalog.write_text(yaml.safe_dump({"version": 1, "entries": [
        {"name": "w", "kind": "wsi", "path": "wsi", "pattern": "*.*", **common},
        {"name": "r", "kind": "roi", "path": "roi", "pattern": "*.png", "scale": "M", **common},
    ]}))
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "cpia_hf.cli", "convert", "--catalog", str(catalog), "--source-root",
                             str(sources), "--out", str(out), "--no-progress"], capture_output=True, text=True)
    assert result.returncode == 1
    assert "wsi/broken.svs" in result.stderr and "roi/truncated.png" in result.stderr
    assert "wsi/nompp.tiff" in result.stderr and "MPP" in result.stderr
    rows = load_dataset(str(out), "full", split="train").remove_columns("image").to_list()
    files = Counter(r["source_file"] for r in rows)
    assert set(files) == {"wsi/good.svs", "roi/ok_0.png", "roi/ok_1.png", "roi/ok_2.png"}


def test_bad_catalog_is_named(tmp_path: Path) -> None:
    catalog = tmp_path / "bad.yaml"
    catalog.write_text(yaml.safe_dump({"version": 1, "entries": [{"name": "x", "kind": "slide"}]}))
    result = subprocess.run([sys.executable, "-m", "cpia_hf.cli", "convert", "--catalog", str(catalog), "--source-root",
                             str(tmp_path), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "bad.yaml" in result.stderr and "x" in result.stderr
