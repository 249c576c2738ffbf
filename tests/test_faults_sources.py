"""An output folder inside a source folder is not read as sources (its card's images would match ROI patterns)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from cpia_hf.dataset.catalog import load_catalog
from cpia_hf.dataset.sources import count_files


def rows_by_file(out: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for path in sorted((out / "data" / "full").rglob("*.parquet")):
        for file in pq.read_table(path, columns=["source_file"]).column("source_file").to_pylist():
            counts[file] = counts.get(file, 0) + 1
    return counts


def test_output_inside_the_sources_is_not_read_back(demo_build: Path, tmp_path: Path) -> None:
    sources = tmp_path / "sources"
    shutil.copytree(demo_build / "sources", sources, ignore=shutil.ignore_patterns("*wsi*"))
    out = sources / "demo-lung-roi" / "built"
    command = [sys.executable, "-m", "cpia_hf.cli", "convert", "--catalog", str(sources / "catalog.yaml"),
               "--source-root", str(sources), "--out", str(out), "--subsets", "demo-lung-roi", "--configs", "full",
               "--no-progress"]
    first = subprocess.run(command, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    built_pngs = sorted(out.rglob("*.png"))
    assert built_pngs, "the output holds no PNG that the source pattern (**/*.png) would match"
    expected = rows_by_file(out)
    assert len(expected) == 16 and not any("built/" in file for file in expected)
    second = subprocess.run(command, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    assert rows_by_file(out) == expected
    notes = [line for line in second.stdout.splitlines() if "cpia output folder inside the sources" in line]
    assert notes == [f"skipped: [sources] {out}: a cpia output folder inside the sources: its {len(built_pngs)} "
                     "matching file(s) are not read as sources"]
    entry = next(e for e in load_catalog(sources / "catalog.yaml") if e.name == "demo-lung-roi")
    assert count_files(entry, sources) == 16  # `cpia sources` counts the same files
