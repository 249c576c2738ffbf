"""CPIA-Mini: a category-balanced, seeded selection of grid cells with every image resized to 384x384.

Selection rule (documented in the card):
1. A WSI *cell* is one XL position of one slide (whether or not the XL tile itself exists: cells at
   slide borders and in biopsies smaller than an XL tile count too).
2. Budget: `fraction` of all cells (default 4 %, what the release's 3.38M images imply), at least
   one per WSI subset.
3. Balance: the budget is shared equally between organs, then equally between the subsets of an
   organ, capped by what each has; what a capped group cannot use is shared again (water-filling).
4. Within a subset, cells are taken in the order of a seeded hash of their name; per chosen cell:
   the XL tile, its 16 L tiles, 32 of its M tiles (seeded hash order) and the S crop of each chosen
   M tile (XL:L:M:S = 1:16:32:32).
5. ROI sources: unlabelled ones whole; labelled ones only the training split that the catalog's
   `train_pattern` names (none without it), so downstream evaluation never sees pre-training images.
"""
from __future__ import annotations

import io
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from ..schema import read_columns
from ..standard import MINI_SIDE, SCALE_SIDES, STANDARD_MPP, stable_unit_float
from .catalog import CatalogEntry, subset_slug
from .imageio import encode_jpeg
from .shards import PackResult, ShardSeries, cached_output, pack_subset
from .units import ConvertOptions

DEFAULT_MINI_FRACTION = 0.04
MINI_SUBSETS = "mini-subsets"  # per-subset mini shards under .work, mixed into data/mini
M_PER_CELL = 32
CELL_DIVISOR = {"XL": 1, "L": 4, "M": 10, "S": 40}

TileKey = tuple[str, str, int, int]  # source_file, scale, x index, y index


def water_fill(capacity: dict[str, int], budget: int) -> dict[str, int]:
    """Share `budget` as equally as possible between keys, none above its capacity (sorted-key order for ties)."""
    share = {key: 0 for key in capacity}
    open_keys = sorted(k for k, c in capacity.items() if c > 0)
    remaining = min(budget, sum(capacity.values()))
    while remaining > 0 and open_keys:
        each = max(1, remaining // len(open_keys))
        for key in list(open_keys):
            give = min(each, capacity[key] - share[key], remaining)
            share[key] += give
            remaining -= give
            if share[key] == capacity[key]:
                open_keys.remove(key)
            if remaining == 0:
                break
    return share


def cell_quota(cells_per_subset: dict[str, int], organ_of: dict[str, str], fraction: float) -> dict[str, int]:
    """Cells to take per WSI subset: organ-balanced, then subset-balanced, at least one per subset."""
    present = {s: n for s, n in cells_per_subset.items() if n > 0}
    budget = max(len(present), round(fraction * sum(present.values())))
    organ_capacity: dict[str, int] = defaultdict(int)
    for subset, n in present.items():
        organ_capacity[organ_of[subset]] += n
    quota = {}
    for organ, organ_budget in water_fill(dict(organ_capacity), budget).items():
        members = {s: n for s, n in present.items() if organ_of[s] == organ}
        quota.update(water_fill(members, max(organ_budget, len(members))))
    return quota


def read_tile_index(unit_files: list[Path]) -> list[TileKey]:
    """(source_file, scale, x, y) of every row of the given unit files, without reading pixels."""
    keys: list[TileKey] = []
    for path in unit_files:
        table = read_columns(path, ["source_file", "scale", "_ix", "_iy"])
        keys.extend(zip(*(table.column(c).to_pylist() for c in table.column_names)))
    return keys


def cell_of(key: TileKey) -> tuple[str, int, int]:
    source, scale, x, y = key
    divisor = CELL_DIVISOR[scale]
    return source, x // divisor, y // divisor


def select_wsi_tiles(keys: list[TileKey], subset: str, n_cells: int, seed: int) -> set[TileKey]:
    """The mini tiles of one WSI subset: `n_cells` seeded cells, and per cell XL, L, 32 M and their S."""
    cells = sorted({cell_of(k) for k in keys}, key=lambda c: stable_unit_float(seed, subset, *c))
    chosen_cells = set(cells[:n_cells])
    m_tiles = defaultdict(list)
    for key in keys:
        if key[1] == "M" and cell_of(key) in chosen_cells:
            m_tiles[cell_of(key)].append(key)
    chosen_m = set()
    for cell_m in m_tiles.values():
        chosen_m.update(sorted(cell_m, key=lambda k: stable_unit_float(seed, subset, *k))[:M_PER_CELL])
    selected = set(chosen_m)
    for key in keys:
        source, scale, x, y = key
        if scale in ("XL", "L") and cell_of(key) in chosen_cells:
            selected.add(key)
        elif scale == "S" and (source, "M", x // 4, y // 4) in chosen_m:
            selected.add(key)
    return selected


def mini_cells(
    entries: list[CatalogEntry], unit_files: dict[str, list[Path]], fraction: float
) -> dict[str, int]:
    """Cells per WSI subset (name -> count) for the given unit files."""
    cells = {
        e.name: len({cell_of(k) for k in read_tile_index(unit_files.get(e.name, []))}) for e in entries if e.kind == "wsi"
    }
    return cell_quota(cells, {e.name: e.organ for e in entries}, fraction)


def resize_image_bytes(data: bytes, side: int, quality: int) -> bytes:
    """Decode a stored JPEG, resize it to side x side (DCT downscale first when large), re-encode."""
    image = Image.open(io.BytesIO(data))
    if image.size == (side, side):
        return data
    image.draft("RGB", (side, side))
    return encode_jpeg(image.convert("RGB").resize((side, side), Image.Resampling.LANCZOS), quality)


def wsi_transform(selected: set[TileKey], quality: int):
    """Row transform for packing: keep the selected WSI tiles, resized to MINI_SIDE."""

    def transform(table: pa.Table) -> pa.Table:
        columns = ["source_file", "scale", "_ix", "_iy"]
        keys = zip(*(table.column(c).to_pylist() for c in columns))
        table = table.filter(pa.array([k in selected for k in keys], pa.bool_()))
        return _resized(table, quality)

    return transform


def roi_transform(entry: CatalogEntry, quality: int):
    """Row transform for packing: unlabelled ROI sources whole, labelled ones their training split only
    (none when the catalog names no training files: its images may be someone's test set)."""

    def transform(table: pa.Table) -> pa.Table:
        if entry.train_pattern is not None:
            table = table.filter(table.column("_train"))
        elif entry.label_from is not None:
            return table.slice(0, 0)
        return _resized(table, quality)

    return transform


@dataclass(frozen=True)
class MiniJob:
    """One subset's mini shards to pack: its selected cells or training ROIs, resized, under .work/mini-subsets."""

    entry: CatalogEntry
    unit_files: tuple[Path, ...]  # in unit order
    key: str  # the subset's inputs: its unit records and its cell quota
    cells: int | None  # cells to select (WSI subsets)
    options: ConvertOptions
    work_dir: Path
    verify: bool = False
    written: frozenset[Path] = frozenset()  # unit files this run wrote (`units.require_intact`)


def pack_mini_subset(job: MiniJob) -> PackResult:
    """Pack one subset's mini shards (mixed across subsets afterwards, `pack_mixed`); a job of the executor."""
    files = list(job.unit_files)
    if job.entry.kind == "wsi":
        selected = select_wsi_tiles(read_tile_index(files), job.entry.name, job.cells or 0, job.options.seed)
        transform = wsi_transform(selected, job.options.jpeg_quality)
    else:
        transform = roi_transform(job.entry, job.options.jpeg_quality)
    return pack_subset(files, job.work_dir / MINI_SUBSETS, subset_slug(job.entry.name),
                       job.work_dir / "pack" / MINI_SUBSETS, job.key, transform, job.verify, job.written)


def _resized(table: pa.Table, quality: int) -> pa.Table:
    images = table.column("image").to_pylist()
    resized = [{"bytes": resize_image_bytes(img["bytes"], MINI_SIDE, quality), "path": None} for img in images]
    scales = table.column("scale").to_pylist()
    kinds = table.column("kind").to_pylist()
    mpp = [STANDARD_MPP * SCALE_SIDES[s] / MINI_SIDE if k == "wsi" else None for s, k in zip(scales, kinds)]
    image_field = table.schema.field("image")
    table = table.set_column(table.schema.get_field_index("image"), image_field, pa.array(resized, image_field.type))
    return table.set_column(table.schema.get_field_index("mpp"), table.schema.field("mpp"), [pa.array(mpp, pa.float64())])


# --- the published mini: one seeded, global shuffle of all subsets -------------------------------------------------
#
# Per-subset mini shards (rows ordered by slide) are packed first under .work/mini-subsets; they are then mixed into
# `data/mini/mini-NNNNN-<group>.parquet`: every row gets a seeded pseudo-random rank, the rows of a group are cut in
# rank order into shards of about SHARD_BYTES, each shard sorted by rank. Groups: "clean" (subsets without a
# benchmark) and "benchmark"; their shards are numbered in one interleaved sequence, so that `mini`
# (data/mini/*.parquet) streams both groups in proportion and `mini_clean` (data/mini/*-clean.parquet) is a glob.
MIX_GROUPS = ("clean", "benchmark")
MIX_KEY_COLUMNS = ["subset", "source_file", "image_id", "scale"]


def mix_group_of(entry: CatalogEntry) -> str:
    return "benchmark" if entry.benchmarks else "clean"


def row_ranks(files: list[Path], seed: int) -> list[list[int]]:
    """Per file, the global rank of each row in the seeded shuffle of all rows of `files`."""
    keys = []  # (key, file, row): ties (practically none) fall back to the stable input order
    for index, path in enumerate(files):
        table = read_columns(path, MIX_KEY_COLUMNS)
        for row, parts in enumerate(zip(*(table.column(c).to_pylist() for c in MIX_KEY_COLUMNS))):
            keys.append((stable_unit_float(seed, "mini-mix", *parts), index, row))
    keys.sort()
    ranks = [[0] * pq.ParquetFile(path).metadata.num_rows for path in files]
    for rank, (_, index, row) in enumerate(keys):
        ranks[index][row] = rank
    return ranks


def mix_group(files: list[Path], tmp_dir: Path, group: str, seed: int, shard_bytes: int) -> list[Path]:
    """Shuffle the rows of `files` into ceil(bytes / shard_bytes) shards under `tmp_dir`; returns them in order."""
    ranks = row_ranks(files, seed)
    total = sum(len(r) for r in ranks)
    if total == 0:
        return []
    n_shards = max(1, -(-sum(p.stat().st_size for p in files) // shard_bytes))
    buckets = tmp_dir / f"{group}-buckets"
    buckets.mkdir(parents=True, exist_ok=True)
    writers: dict[int, pq.ParquetWriter] = {}
    for path, file_ranks in zip(files, ranks):  # pass 1: rows into per-shard bucket files, with their rank
        parquet, start = pq.ParquetFile(path), 0
        for group_index in range(parquet.num_row_groups):
            table = parquet.read_row_group(group_index)
            rank = pa.array(file_ranks[start:start + table.num_rows], pa.int64())
            start += table.num_rows
            table = table.append_column("_rank", rank)
            shard_of = [r * n_shards // total for r in rank.to_pylist()]
            for shard in sorted(set(shard_of)):
                part = table.filter(pa.array([s == shard for s in shard_of]))
                if shard not in writers:
                    # temporary files read once: plain and uncompressed is cheapest (JPEG bytes do not shrink)
                    writers[shard] = pq.ParquetWriter(buckets / f"{shard:05d}.parquet", part.schema,
                                                      compression="none", use_dictionary=False)
                writers[shard].write_table(part)
    for writer in writers.values():
        writer.close()
    written = []
    for shard in sorted(writers):  # pass 2: each bucket sorted by rank into one shard
        bucket = buckets / f"{shard:05d}.parquet"
        table = read_columns(bucket)
        table = table.take(pc.sort_indices(table, [("_rank", "ascending")])).drop_columns(["_rank"])
        series = ShardSeries.one_file(tmp_dir, f"{group}-{shard:05d}")
        series.add(table)
        written.extend(series.close())
        bucket.unlink()
    buckets.rmdir()
    return written


def interleave(counts: dict[str, int]) -> list[tuple[str, int]]:
    """(group, index) of every shard, ordered so that each group is spread evenly over the sequence."""
    slots = [((k + 0.5) / n, MIX_GROUPS.index(group), group, k) for group, n in counts.items() for k in range(n)]
    return [(group, k) for _, _, group, k in sorted(slots)]


def pack_mixed(groups: dict[str, list[Path]], mini_dir: Path, work_dir: Path, seed: int, key: str,
               shard_bytes: int, *, verify: bool = False) -> tuple[int, list[str]]:
    """Write `mini_dir/mini-NNNNN-<group>.parquet` from the per-subset mini shards: (rows, damaged shards found).

    Resumable and reproducible, a cached output (`shards.cached_output`) whose record under `work_dir/pack`
    holds `key` (the inputs' pack keys and the seed): the shards are rebuilt into a temporary folder and
    moved in, and shards of an earlier mix that are no longer part of it are removed.
    """
    return cached_output(work_dir / "pack" / "mini-mixed.json", mini_dir, key, verify,
                         lambda: _write_mixed(groups, mini_dir, work_dir / "mini-mix", seed, shard_bytes),
                         stale="**/*.parquet*")  # earlier mixes, and per-subset folders of older layouts


def _write_mixed(groups: dict[str, list[Path]], mini_dir: Path, tmp_dir: Path, seed: int,
                 shard_bytes: int) -> tuple[list[Path], int]:
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    mixed = {group: mix_group(files, tmp_dir, group, seed, shard_bytes) for group, files in groups.items()}
    final = []
    mini_dir.mkdir(parents=True, exist_ok=True)
    for index, (group, k) in enumerate(interleave({g: len(paths) for g, paths in mixed.items()})):
        target = mini_dir / f"mini-{index:05d}-{group}.parquet"
        os.replace(mixed[group][k], target)
        final.append(target)
    shutil.rmtree(tmp_dir)
    return final, sum(pq.ParquetFile(path).metadata.num_rows for path in final)
