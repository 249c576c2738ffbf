"""The rebuild against the release: the coverage table counts the shards' rows and flags what is off."""
from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

from datasets import load_dataset

from cpia_hf.dataset.catalog import load_catalog
from cpia_hf.dataset.coverage import coverage, coverage_markdown
from cpia_hf.standard import SCALES


def card_coverage(readme: str) -> dict[str, dict[str, str]]:
    """subset -> column -> cell of the card's coverage table."""
    section = readme.split("## Coverage of the release", 1)[1]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return {cells[0]: dict(zip(head, cells)) for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}


def test_card_coverage_equals_rows_of_the_shards(demo_build: Path) -> None:
    dataset = demo_build / "dataset"
    rows = load_dataset(str(dataset), "full", split="train").select_columns(["subset", "scale"]).to_list()
    counted = Counter((r["subset"], r["scale"]) for r in rows)
    table = card_coverage((dataset / "README.md").read_text())
    entries = load_catalog(demo_build / "sources" / "catalog.yaml")
    assert set(table) == {e.name for e in entries}
    for subset, cells in table.items():
        for scale in SCALES:
            n = counted[(subset, scale)]
            assert cells[scale] == (f"{n:,}" if n else "–"), (subset, scale)
        if cells["kind"] == "wsi":
            xl, m = counted[(subset, "XL")], counted[(subset, "M")]
            assert cells["M/XL (release 92.7)"] == (f"{m / xl:.2f}" if xl else "–"), subset
            assert cells["S/M (release 0.97)"] == f"{counted[(subset, 'S')] / m:.2f}", subset
    # both branches are met: a subset with XL tiles and one (a biopsy smaller than a cell) without
    assert {bool(counted[(e.name, "XL")]) for e in entries if e.kind == "wsi"} == {True, False}


def test_coverage_against_released_counts_and_ranges(demo_build: Path) -> None:
    entries = load_catalog(demo_build / "sources" / "catalog.yaml")
    breast, colon, lung, blood = entries
    expected = {
        "demo-breast-wsi": {"XL": 10, "L": 152, "M": 927, "S": 900},
        "demo-lung-roi": {"M": 12},
        "demo-blood-roi": {"S": 7},
    }
    entries = [dataclasses.replace(e, expected_images=expected.get(e.name, {})) for e in entries]
    counts = Counter({("demo-breast-wsi", "XL"): 10, ("demo-breast-wsi", "L"): 100, ("demo-breast-wsi", "M"): 927,
                      ("demo-breast-wsi", "S"): 900, ("demo-colon-wsi", "L"): 4, ("demo-colon-wsi", "M"): 50,
                      ("demo-colon-wsi", "S"): 48, ("demo-lung-roi", "M"): 30})
    rows = {r.subset: r for r in coverage(counts, entries)}
    breast_row = rows["demo-breast-wsi"]
    assert breast_row.ratios == {"L/XL": 10.0, "M/XL": 92.7, "S/M": 900 / 927}
    assert breast_row.flags == ["L/XL 10.00 outside 13.1-15.9"]
    assert rows["demo-colon-wsi"].ratios["L/XL"] is None and rows["demo-colon-wsi"].flags == []
    assert rows["demo-lung-roi"].flags == ["M 250% of the release"]
    assert rows["demo-blood-roi"].flags == ["missing: no rows built (released: 7)"]
    text = coverage_markdown(list(rows.values()))
    assert "| demo-breast-wsi | wsi | 10 / 10 (100%) | 100 / 152 (66%) | 927 / 927 (100%) | 900 / 900 (100%) |" \
           " 10.00 | 92.70 | 0.97 | L/XL 10.00 outside 13.1-15.9 |" in text
