"""One bad file costs only itself inside a batch of ROI files, and is blamed by its own name."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import yaml
from PIL import Image

from cpia_hf.dataset import units
from cpia_hf.dataset.catalog import load_catalog
from cpia_hf.dataset.units import ConvertOptions, convert_unit, discover_units, unit_paths
from cpia_hf.demo.synth import he_like_image

COMMON = {"organ": "breast", "disease": "unknown", "stain": "H&E", "field": "histopathology",
          "license": "unknown", "homepage": "unknown", "citation": "unknown"}
ODD_NAME = b"caf\xe9.png"  # Latin-1 bytes: not UTF-8


def roi_sources(root: Path) -> Path:
    """roi/ with three good PNGs, one good PNG under a non-UTF-8 name, one truncated PNG, one that explodes."""
    folder = root / "sources" / "roi"
    folder.mkdir(parents=True)
    for k in range(3):
        Image.fromarray(he_like_image(300, 200, seed=k)).save(folder / f"ok_{k}.png")
    data = io.BytesIO()
    Image.fromarray(he_like_image(300, 200, seed=5)).save(data, format="PNG")
    with open(os.path.join(os.fsencode(folder), ODD_NAME), "wb") as handle:
        handle.write(data.getvalue())
    (folder / "cut.png").write_bytes(data.getvalue()[:400])
    (folder / "boom.png").write_bytes(data.getvalue())
    catalog = root / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"version": 1, "entries": [
        {"name": "r", "kind": "roi", "path": "roi", "pattern": "*.png", "scale": "M", **COMMON}]}))
    return catalog


def pillow_error(path: Path) -> str:
    """What Pillow itself says when it decodes `path`."""
    try:
        Image.open(path).load()
    except OSError as error:
        return str(error)
    raise AssertionError(f"{path} decodes")


def test_each_bad_file_costs_only_itself(tmp_path, monkeypatch):
    (entry,) = load_catalog(roi_sources(tmp_path))
    (unit,) = discover_units(entry, tmp_path / "sources")
    assert len(unit.files) == 6
    real = units.convert_roi

    def convert_roi(path, **kwargs):
        if Path(path).name == "boom.png":
            raise RuntimeError("decoder crashed")
        return real(path, **kwargs)

    monkeypatch.setattr(units, "convert_roi", convert_roi)
    result = convert_unit(unit, tmp_path / "sources", tmp_path / "work", ConvertOptions())
    reasons = {f.file: f.reason for f in result.failures}
    assert reasons == {
        "roi/boom.png": "RuntimeError: decoder crashed",
        "roi/caf\\xe9.png": units.NOT_UTF8,
        "roi/cut.png": f"unreadable image: {pillow_error(tmp_path / 'sources' / 'roi' / 'cut.png')}",
    }
    parquet_path, _ = unit_paths(tmp_path / "work", unit)
    rows = pq.read_table(parquet_path, columns=["source_file"]).column("source_file").to_pylist()
    assert result.rows == 3 and rows == ["roi/ok_0.png", "roi/ok_1.png", "roi/ok_2.png"]


def test_non_utf8_name_is_named_in_the_summary(tmp_path):
    catalog = roi_sources(tmp_path)
    result = subprocess.run([sys.executable, "-m", "cpia_hf.cli", "convert", "--catalog", str(catalog), "--source-root",
                             str(tmp_path / "sources"), "--out", str(tmp_path / "out"), "--no-progress",
                             "--configs", "full"], capture_output=True, text=True)
    assert result.returncode == 1, result.stderr
    assert "roi/caf\\xe9.png: file name is not valid UTF-8" in result.stderr
    assert "roi/cut.png" in result.stderr and "Traceback" not in result.stderr
    shards = sorted((tmp_path / "out" / "data" / "full").rglob("*.parquet"))
    files = [f for s in shards for f in pq.read_table(s, columns=["source_file"]).column("source_file").to_pylist()]
    assert sorted(files) == ["roi/boom.png", "roi/ok_0.png", "roi/ok_1.png", "roi/ok_2.png"]
