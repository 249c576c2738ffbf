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


# --- the mixed mini layout: streaming mix, reproducibility, resume --------------------------------------------------

MIX_SUBSETS = {"big": (1200, "clean"), "mid": (500, "clean"), "small": (200, "clean"), "bench": (100, "benchmark")}
BATCHES, BATCH = 10, 64
# |observed - expected| share of the largest subset in the first 640 streamed rows: 4 binomial standard deviations
# of a fair 640-row sample (p = 0.6: 0.077), plus the granularity of the clean/benchmark shard interleave
# (benchmark rows are 5 %: at most a 1/0.95 factor on a clean subset's share, 0.03 here).
MIX_TOLERANCE = 0.11


def _per_subset_files(root):
    """Per-subset mini shards as packing writes them before the mix (rows ordered by slide and position)."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from cpia_hf.schema import FEATURES

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 100, 150)).save(buffer, format="JPEG")
    rng = np.random.default_rng(0)
    groups = {"clean": [], "benchmark": []}
    for subset, (rows, group) in MIX_SUBSETS.items():
        records = [{"image": {"bytes": buffer.getvalue() + rng.bytes(2000), "path": None}, "image_id": f"{subset}-slide{k // 100}-384-{k % 10}-{k // 10}", "subset": subset,
                    "kind": "wsi", "scale": "M", "organ": "breast", "disease": "x", "stain": "H&E",
                    "field": "histopathology", "source_file": f"{subset}/slide{k // 100}.svs", "x": 0.0, "y": 0.0,
                    "width": 1.0, "height": 1.0, "mpp": 1.0, "tissue_fraction": 1.0, "label": None,
                    "license": "CC0-1.0"} for k in range(rows)]
        path = root / "M" / subset / f"{subset}-00000.parquet"
        path.parent.mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(records, schema=FEATURES.arrow_schema), path)
        groups[group].append(path)
    return groups


def _largest_share(files) -> tuple[float, float]:
    """(share of the largest subset in the first 10 batches of 64 streamed rows, its share in all rows)."""
    from collections import Counter

    from datasets import load_dataset

    streamed = load_dataset("parquet", data_files=[str(f) for f in files], split="train", streaming=True)
    first = [row["subset"] for _, row in zip(range(BATCHES * BATCH), streamed.select_columns(["subset"]))]
    every = Counter(row["subset"] for row in streamed.select_columns(["subset"]))
    largest, n = every.most_common(1)[0]
    return first.count(largest) / len(first), n / sum(every.values())


def test_mixed_mini_streams_a_fair_sample(tmp_path, capsys) -> None:
    from cpia_hf.dataset.mini import pack_mixed

    groups = _per_subset_files(tmp_path / "subsets")
    mini = tmp_path / "data" / "mini"
    rows, damage = pack_mixed(groups, mini, tmp_path / "work", seed=0, key="k", shard_bytes=1_200_000)
    assert damage == []
    assert rows == sum(n for n, _ in MIX_SUBSETS.values())
    names = sorted(p.name for p in mini.glob("*.parquet"))
    assert len(names) >= 3 and {n.rsplit("-", 1)[1] for n in names} == {"clean.parquet", "benchmark.parquet"}

    mixed, expected = _largest_share(sorted(mini.glob("*.parquet")))
    clean, clean_expected = _largest_share(sorted(mini.glob("*-clean.parquet")))
    per_subset, _ = _largest_share(sorted(groups["clean"] + groups["benchmark"]))
    with capsys.disabled():
        print(f"\nlargest subset share in the first {BATCHES}x{BATCH} streamed rows: mixed mini {mixed:.3f} "
              f"(config {expected:.3f}); mini_clean {clean:.3f} (config {clean_expected:.3f}); "
              f"per-subset layout {per_subset:.3f}")
    assert abs(mixed - expected) <= MIX_TOLERANCE
    assert abs(clean - clean_expected) <= MIX_TOLERANCE
    assert per_subset - expected > 0.2  # the per-subset layout streams one subset at a time


def test_mixed_mini_is_reproducible_and_resumes(tmp_path) -> None:
    import pyarrow.parquet as pq

    from cpia_hf.dataset.mini import pack_mixed

    groups = _per_subset_files(tmp_path / "subsets")

    def build(out, seed, key="k"):
        pack_mixed(groups, out / "mini", out / "work", seed=seed, key=key, shard_bytes=1_200_000)
        return {p.name: p.read_bytes() for p in sorted((out / "mini").glob("*.parquet"))}

    first = build(tmp_path / "a", 0)
    assert build(tmp_path / "b", 0) == first  # byte-identical from scratch
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a" / "mini").glob("*.parquet")}
    assert build(tmp_path / "a", 0) == first  # same key: nothing rewritten
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a" / "mini").glob("*.parquet")} == stamps
    other = build(tmp_path / "c", 1)
    order = [pq.read_table(tmp_path / "c" / "mini" / n, columns=["image_id"]).column(0).to_pylist() for n in other]
    base = [pq.read_table(tmp_path / "a" / "mini" / n, columns=["image_id"]).column(0).to_pylist() for n in first]
    assert order != base and sorted(sum(order, [])) == sorted(sum(base, []))  # another seed, same rows
    (tmp_path / "a" / "mini" / sorted(first)[0]).unlink()  # a lost shard is rebuilt
    assert build(tmp_path / "a", 0) == first


def test_mixed_mini_removes_shards_of_an_older_layout(tmp_path) -> None:
    from cpia_hf.dataset.mini import pack_mixed

    groups = _per_subset_files(tmp_path / "subsets")
    old = tmp_path / "mini" / "L" / "big" / "big-00000.parquet"  # per-subset mini of the earlier layout
    old.parent.mkdir(parents=True)
    old.write_bytes(b"old")
    pack_mixed(groups, tmp_path / "mini", tmp_path / "work", seed=0, key="k", shard_bytes=10**9)
    assert sorted(p.relative_to(tmp_path / "mini").as_posix() for p in (tmp_path / "mini").rglob("*")) == [
        "mini-00000-clean.parquet", "mini-00001-benchmark.parquet"]
