"""`full` is packed shard by shard from a plan made of image sizes alone: the planned shards are the bytes a
sequential ShardSeries writes, each unit file's folders sit in row groups of their own, and unplanned shards go."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from cpia_hf.dataset.shards import (
    ShardSeries,
    folder_rows,
    iter_unit_batches,
    plan_shards,
    remove_unplanned,
    write_planned_shard,
)
from cpia_hf.dataset.units import _write_unit_parquet
from cpia_hf.schema import COLUMNS
from cpia_hf.standard import FOLDERS

GROUP, SHARD = 25_000, 80_000  # bytes: many row groups and shards out of a few hundred small rows


def unit_rows(unit: int, count: int, rng: np.random.Generator) -> list[dict]:
    """Rows of every scale in a shuffled order (as a slide's cells give them), random image bytes."""
    rows = []
    for k in range(count):
        scale = ("XL", "L", "M", "S")[int(rng.integers(0, 4))]
        rows.append({"image": {"bytes": rng.bytes(int(rng.integers(500, 9000))), "path": None},
                     "image_id": f"u{unit}-{k}", "subset": "s", "kind": "wsi", "scale": scale, "organ": "o",
                     "disease": "d", "stain": "H&E", "field": "f", "source_file": f"u{unit}.svs", "x": float(k),
                     "y": 0.0, "width": 1.0, "height": 1.0, "mpp": 0.4942, "tissue_fraction": 1.0, "label": None,
                     "license": "l", "_ix": k, "_iy": 0, "_train": True})
    return rows


@pytest.fixture(scope="module")
def units(tmp_path_factory):
    folder = tmp_path_factory.mktemp("units")
    rng = np.random.default_rng(0)
    paths, rows = [], []
    for unit, count in enumerate((120, 7, 0, 90)):  # an empty unit and a small one between
        unit_list = unit_rows(unit, count, rng)
        _write_unit_parquet(folder / f"u{unit}.parquet", iter(unit_list))
        paths.append(folder / f"u{unit}.parquet")
        rows.extend(unit_list)
    return paths, rows


def test_unit_files_keep_each_folder_in_row_groups_of_its_own(units):
    paths, rows = units
    parquet = pq.ParquetFile(paths[0])
    assert parquet.num_row_groups >= 4
    for index in range(parquet.num_row_groups):
        assert len(set(parquet.read_row_group(index, columns=["scale"]).column(0).to_pylist())) == 1
    # a folder's rows keep their order and their sizes are recorded
    m_rows = [r for r in rows if r["source_file"] == "u0.svs" and r["scale"] == "M"]
    table = next(folder_rows(paths[0], "M", 0, len(m_rows)))
    assert table.column("image_id").to_pylist()[:5] == [r["image_id"] for r in m_rows][:5]
    assert table.column("_size").to_pylist()[:5] == [len(r["image"]["bytes"]) for r in m_rows][:5]


def test_planned_shards_are_the_bytes_a_sequential_series_writes(units, tmp_path):
    paths, _ = units
    plans = plan_shards(paths, ["fp"] * len(paths), "s", shard_bytes=SHARD, group_bytes=GROUP)
    for plan in plans:
        write_planned_shard(plan, tmp_path / "planned", tmp_path / "records")
    by_folder = {f: [p for p in plans if p.folder == f] for f in FOLDERS}
    assert all(len(by_folder[f]) >= 2 for f in FOLDERS)  # several shards per folder
    assert any(len(p.pieces) >= 2 for p in plans)  # some shard spans unit files
    assert any(p.pieces[0][1] > 0 for p in plans)  # some shard starts inside a unit file
    for folder in FOLDERS:
        series = ShardSeries(tmp_path / "sequential" / folder / "s", "s", shard_bytes=SHARD, group_bytes=GROUP)
        for table in iter_unit_batches(paths):
            part = table.filter(np.array([s == folder for s in table.column("scale").to_pylist()]))
            if part.num_rows:
                series.add(part.select(list(COLUMNS)))
        written = series.close()
        planned = sorted((tmp_path / "planned" / folder / "s").iterdir())
        assert [p.name for p in written] == [p.name for p in planned]
        assert all(a.read_bytes() == b.read_bytes() for a, b in zip(written, planned)), folder
        assert sum(p.rows for p in by_folder[folder]) == sum(pq.ParquetFile(p).metadata.num_rows for p in planned)


def test_rerun_skips_intact_shards_and_unplanned_ones_are_removed(units, tmp_path):
    paths, _ = units
    plans = plan_shards(paths, ["fp"] * len(paths), "s", shard_bytes=SHARD, group_bytes=GROUP)
    for plan in plans:
        write_planned_shard(plan, tmp_path / "data", tmp_path / "records")
    first = plans[0]
    shard = tmp_path / "data" / first.name
    stamp = shard.stat().st_mtime_ns
    assert write_planned_shard(first, tmp_path / "data", tmp_path / "records").repaired == []
    assert shard.stat().st_mtime_ns == stamp  # intact: not rewritten
    # the same units with another fingerprint plan other keys: the shard is rewritten (a new file renamed over
    # it, with the same bytes), and its record holds the new key
    changed = plan_shards(paths, ["other"] * len(paths), "s", shard_bytes=SHARD, group_bytes=GROUP)[0]
    assert changed.key != first.key and changed.name == first.name
    before = shard.stat().st_ino, shard.read_bytes()
    assert write_planned_shard(changed, tmp_path / "data", tmp_path / "records").rows == {first.folder: first.rows}
    assert shard.stat().st_ino != before[0] and shard.read_bytes() == before[1]
    record = tmp_path / "records" / first.folder / f"s-{first.index:05d}.json"
    assert json.loads(record.read_text())["key"] == changed.key
    write_planned_shard(first, tmp_path / "data", tmp_path / "records")  # back to the first plan's record
    # fewer units: fewer shards; the others and their records go
    fewer = plan_shards(paths[:1], ["fp"], "s", shard_bytes=SHARD, group_bytes=GROUP)
    remove_unplanned(tmp_path / "data", tmp_path / "records", fewer, "s")
    left = {p.relative_to(tmp_path / "data").as_posix() for p in (tmp_path / "data").rglob("*.parquet")}
    assert left == {p.name for p in fewer} and len(left) < len(plans)
    records = {p.stem for p in (tmp_path / "records").rglob("*.json")}
    assert records == {p.name.rsplit("/", 1)[1].removesuffix(".parquet") for p in fewer}
    assert json.loads((tmp_path / "records" / first.folder / f"s-{first.index:05d}.json").read_text())["key"] == first.key


def test_an_unreadable_unit_file_is_named(units, tmp_path):
    paths, _ = units
    truncated = tmp_path / "u9.parquet"
    truncated.write_bytes(paths[0].read_bytes()[: paths[0].stat().st_size // 2])
    with pytest.raises(ValueError, match=f"{truncated}: unit file unreadable .*delete it"):
        plan_shards([paths[1], truncated], ["fp", "fp"], "s", shard_bytes=SHARD, group_bytes=GROUP)
    with pytest.raises(ValueError, match=f"{truncated}: unit file unreadable"):
        next(folder_rows(truncated, "M", 0, 5))
