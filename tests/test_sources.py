"""`cpia sources`: provenance, access and licence per entry; present / partial / missing on a source tree."""
from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import pytest
import yaml

from cpia_hf.cli import main
from cpia_hf.dataset.catalog import ACCESS, default_catalog_path, load_catalog
from cpia_hf.dataset.sources import (
    OUTPUT_BYTES_PER_PIXEL,
    PACK_CPU_S_PER_MB,
    ROI_CPU_S_PER_IMAGE,
    WSI_MP_PER_CPU_S,
    cost_table,
    cpu_hours_text,
    output_megapixels,
    rates_text,
    render,
    survey,
)

DOCS = Path(__file__).parents[1] / "docs"
README = Path(__file__).parents[1] / "README.md"

COMMON = {"organ": "breast", "disease": "unknown", "stain": "H&E", "field": "histopathology",
          "license": "CC-BY-4.0", "homepage": "https://example.org/data", "citation": "x"}


@pytest.fixture
def partial_tree(tmp_path):
    root = tmp_path / "sources"
    (root / "slides" / "a").mkdir(parents=True)
    for name in ("s1.svs", "a/s2.svs"):
        (root / "slides" / name).write_bytes(b"II*\x00")
    (root / "slides" / "notes.txt").write_text("not a slide")
    (root / "rois").mkdir()
    for k in range(3):
        (root / "rois" / f"r{k}.png").write_bytes(b"\x89PNG")
    (root / "empty").mkdir()
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"version": 1, "entries": [
        {"name": "wsi-here", "kind": "wsi", "path": "slides", "pattern": "**/*.svs", "access": "gdc",
         "expected_images": {"XL": 2, "L": 30, "M": 180, "S": 170}, **COMMON},
        {"name": "roi-half", "kind": "roi", "path": "rois", "pattern": "*.png", "scale": "M", "access": "open",
         "expected_images": {"M": 5}, **{**COMMON, "license": "unknown"}},
        {"name": "roi-complete", "kind": "roi", "path": "rois", "pattern": "*.png", "scale": "S",
         "expected_images": {"S": 3}, **COMMON},
        {"name": "wsi-wrong-layout", "kind": "wsi", "path": "empty", "pattern": "*.svs", **COMMON},
        {"name": "gone", "kind": "wsi", "path": "not-downloaded", "pattern": "*.svs", "access": "tcia", **COMMON},
    ]}))
    return root, catalog


def test_states_and_counts_on_a_partial_tree(partial_tree):
    root, catalog = partial_tree
    rows = {r.entry.name: r for r in survey(load_catalog(catalog), root)}
    assert {n: (r.state, r.files) for n, r in rows.items()} == {
        "wsi-here": ("present", 2), "roi-half": ("partial", 3), "roi-complete": ("present", 3),
        "wsi-wrong-layout": ("partial", 0), "gone": ("missing", 0)}
    assert rows["roi-half"].expected_files == 5 and rows["wsi-here"].expected_files is None
    # output pixels: 2 XL of 3840^2, 30 L of 960^2, 180 M of 384^2, 170 S of 96^2
    expected_mp = (2 * 3840**2 + 30 * 960**2 + 180 * 384**2 + 170 * 96**2) / 1e6
    assert rows["wsi-here"].output_mp == pytest.approx(expected_mp)
    packing_s = expected_mp * 1e6 * OUTPUT_BYTES_PER_PIXEL / 1e6 * PACK_CPU_S_PER_MB
    slow, fast = WSI_MP_PER_CPU_S
    best, worst = rows["wsi-here"].cpu_hours
    assert best == pytest.approx((expected_mp / fast + packing_s) / 3600)
    assert worst == pytest.approx((expected_mp / slow + packing_s) / 3600)
    roi_slow, roi_fast = ROI_CPU_S_PER_IMAGE  # ROIs: per image, not per output pixel
    packing_s = 5 * 384**2 * OUTPUT_BYTES_PER_PIXEL / 1e6 * PACK_CPU_S_PER_MB
    assert rows["roi-half"].cpu_hours == pytest.approx(((5 * roi_fast + packing_s) / 3600, (5 * roi_slow + packing_s) / 3600))


def test_cli_formats(partial_tree, capsys):
    root, catalog = partial_tree
    assert main(["sources", "--catalog", str(catalog), "--source-root", str(root), "--format", "csv"]) == 0
    records = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    by_name = {r["name"]: r for r in records}
    assert by_name["roi-half"]["state"] == "partial" and by_name["roi-half"]["files"] == "3 / 5"
    assert by_name["gone"]["state"] == "missing" and by_name["gone"]["access"].startswith("TCIA")
    assert by_name["wsi-here"]["access"].startswith("GDC") and by_name["roi-half"]["license"] == "unknown"
    assert by_name["wsi-here"]["folder"] == "slides" and by_name["wsi-here"]["pattern"] == "**/*.svs"
    assert by_name["roi-half"]["license status"] == "unknown"
    assert by_name["wsi-here"]["license status"] == "not recorded"  # a licence without recorded evidence

    assert main(["sources", "--catalog", str(catalog), "--source-root", str(root), "--format", "md"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("| name |") and "| gone | wsi |" in text
    assert "2 present, 2 partial, 1 missing" in text

    assert main(["sources", "--catalog", str(catalog)]) == 0  # no source root: no state column
    text = capsys.readouterr().out
    assert "state" not in text.splitlines()[0] and "released images" in text.splitlines()[0]
    assert "license status" in text.splitlines()[0] and "licence status: 1 unknown, 4 not recorded" in text

    assert main(["sources", "--catalog", str(catalog), "--source-root", str(root / "nope")]) == 2


def test_release_catalog_is_described(capsys):
    entries = load_catalog(default_catalog_path())
    assert all(e.access in ACCESS for e in entries)
    assert sum(e.homepage == "unknown" for e in entries) <= 4
    by_name = {e.name: e for e in entries}
    assert by_name["TCGA-BRCA"].access == "gdc" and by_name["CPTAC-LUAD"].access == "tcia"
    assert by_name["PAIP2019"].access == "agreement"
    assert main(["sources", "--format", "csv"]) == 0
    records = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(records) == 108
    assert sum(int(r["released images"].replace(",", "")) for r in records) == 148_962_586
    assert output_megapixels(by_name["PCam"]) == pytest.approx(220025 * 384**2 / 1e6)


def test_release_licence_status_shown(capsys):
    assert main(["sources"]) == 0
    lines = capsys.readouterr().out.splitlines()
    status_at = lines[0].index("license status")
    rows = {line.split("  ")[0]: line[status_at:].split("  ")[0] for line in lines[2:] if line.strip()}
    assert rows["CATCH dataset"] == "second-hand" and rows["CoNSeP"] == "conflict"
    assert rows["LYON19"] == "unknown" and rows["TCGA-BRCA"] == "owner"
    assert lines[-1].endswith("licence status: 71 owner, 15 second-hand, 7 conflict, 15 unknown")


def test_docs_cite_one_cost():
    """docs/sources.md holds the generated tables; every CPU-hour figure in the README and docs is the same one."""
    rows = survey(load_catalog(default_catalog_path()))
    sources_md = (DOCS / "sources.md").read_text(encoding="utf-8")
    assert cost_table(rows) in sources_md
    assert render(rows, "md", with_state=False) in sources_md
    assert " ".join(rates_text().split()) in " ".join(sources_md.split())  # the rates behind it
    total = cpu_hours_text(rows).split(" CPU-hours")[0]
    pages = [README, *sorted(DOCS.glob("*.md"))]
    figures = {(page.name, f) for page in pages
               for f in re.findall(r"(\d[\d,.]*[–-]\d[\d,.]*) CPU-hours", page.read_text(encoding="utf-8"))}
    assert figures and {f for _, f in figures} == {total}, figures
