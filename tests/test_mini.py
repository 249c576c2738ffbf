"""Mini selection rule: organ-balanced water-filling and the per-cell tile choice."""
from __future__ import annotations

from cpia_hf.dataset.mini import M_PER_CELL, cell_quota, select_wsi_tiles, water_fill


def test_water_fill_shares_equally_and_respects_capacity() -> None:
    assert water_fill({"a": 100, "b": 100, "c": 100}, 30) == {"a": 10, "b": 10, "c": 10}
    assert water_fill({"a": 2, "b": 100, "c": 100}, 30) == {"a": 2, "b": 14, "c": 14}
    assert water_fill({"a": 2, "b": 3}, 50) == {"a": 2, "b": 3}
    assert sum(water_fill({"a": 7, "b": 9, "c": 4}, 11).values()) == 11


def test_cell_quota_balances_organs_before_subsets() -> None:
    cells = {"lung-1": 1000, "lung-2": 1000, "lung-3": 1000, "skin-1": 1000}
    organ = {"lung-1": "lung", "lung-2": "lung", "lung-3": "lung", "skin-1": "skin"}
    quota = cell_quota(cells, organ, fraction=0.03)  # budget 120 cells
    assert quota["skin-1"] == 60
    assert sum(quota[s] for s in ("lung-1", "lung-2", "lung-3")) == 60
    assert min(quota.values()) >= 20


def test_cell_quota_gives_every_subset_a_cell() -> None:
    quota = cell_quota({"a": 3, "b": 500}, {"a": "x", "b": "y"}, fraction=0.0)
    assert quota == {"a": 1, "b": 1}


def test_select_wsi_tiles_nests_and_is_seeded() -> None:
    keys = []
    for cx in range(3):  # three XL cells of one slide, each complete
        keys.append(("s.svs", "XL", cx, 0))
        keys += [("s.svs", "L", 4 * cx + i, j) for i in range(4) for j in range(4)]
        keys += [("s.svs", "M", 10 * cx + i, j) for i in range(10) for j in range(10)]
        keys += [("s.svs", "S", 4 * (10 * cx + i), 4 * j + 1) for i in range(10) for j in range(10)]
    chosen = select_wsi_tiles(keys, "subset", 2, seed=0)
    assert chosen == select_wsi_tiles(keys, "subset", 2, seed=0)
    assert chosen != select_wsi_tiles(keys, "subset", 2, seed=1)
    by_scale = {s: [k for k in chosen if k[1] == s] for s in ("XL", "L", "M", "S")}
    assert len(by_scale["XL"]) == 2 and len(by_scale["L"]) == 32 and len(by_scale["M"]) == 2 * M_PER_CELL
    assert len(by_scale["S"]) == 2 * M_PER_CELL
    m_set = {(k[2], k[3]) for k in by_scale["M"]}
    assert all((x // 4, y // 4) in m_set for _, _, x, y in by_scale["S"])
    cells = {k[2] for k in by_scale["XL"]}
    assert all(x // 10 in cells for _, _, x, _ in by_scale["M"])


def test_roi_mini_keeps_training_split_and_drops_labelled_sources_without_one() -> None:
    import numpy as np
    import pyarrow as pa

    from cpia_hf.dataset.catalog import CatalogEntry
    from cpia_hf.dataset.imageio import encode_jpeg
    from cpia_hf.dataset.mini import roi_transform
    from cpia_hf.dataset.units import UNIT_SCHEMA

    jpeg = encode_jpeg(np.full((384, 384, 3), 128, np.uint8))
    rows = [{"image": {"bytes": jpeg, "path": None}, "scale": "M", "kind": "roi", "_train": k < 2, "_ix": -1, "_iy": -1}
            for k in range(3)]
    table = pa.Table.from_pylist(rows, schema=UNIT_SCHEMA)
    base = dict(kind="roi", path="p", pattern="*", organ="lung", disease="d", stain="H&E", field="histopathology",
                license="l", homepage="h", citation="c", scale="M")
    unlabelled = CatalogEntry(name="a", **base)
    with_split = CatalogEntry(name="b", label_from="parent", train_pattern="train/*", **base)
    without_split = CatalogEntry(name="c", label_from="parent", **base)
    assert roi_transform(unlabelled, 90)(table).num_rows == 3
    assert roi_transform(with_split, 90)(table).num_rows == 2
    assert roi_transform(without_split, 90)(table).num_rows == 0
