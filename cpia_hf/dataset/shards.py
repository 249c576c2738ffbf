"""Packing of unit files into the published Parquet shards `data/full/<XL|L|M|S>/<subset>/<subset>-NNNNN.parquet`
(the mini config is mixed across subsets afterwards, see `cpia_hf.dataset.mini.pack_mixed`).

Shards are written as `datasets`' ParquetWriter writes them (`cpia_hf.schema.open_shard_writer`: typed
`huggingface` schema metadata, page index, content-defined chunking so re-uploads deduplicate on the
Hub's storage). Sizes, chosen for the Hub:
- row groups close at 64 MiB of rows: far below the viewer's ~286 MiB uncompressed limit per row
  group and several of them fit in the 300 MB it scans, so the first rows show quickly even for
  XL tiles, the largest images;
- shards close at 500 MB (the Hub's recommended file size), which keeps the full release at a few
  ten thousand files, under the 100k files per repo, and every subset folder under 10k entries.
Packing is a pure function of the unit files (sorted by unit id), so a rerun writes byte-identical
shards; a pack record skips the work entirely when nothing changed, and a published shard found
damaged (size, or SHA-256 when its time changed) is rebuilt.

The `full` config is packed shard by shard: where each shard of a (folder, subset) series starts and
ends follows from the image sizes in the unit records alone (`plan_shards` applies the rolling rule
of `ShardSeries` to them), so every shard is an independent job (`write_planned_shard`), run in
parallel locally or on a cluster, and gives the bytes a sequential `ShardSeries` would. A subset
of terabytes (TCGA) is then not one serial job at the end of a run.
"""
from __future__ import annotations

import hashlib
import json
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..atomic import FREE_SPACE_MARGIN, atomic_path, output_errors, require_free_space, write_atomic
from ..schema import COLUMNS, open_shard_writer, write_shard_table
from ..standard import FOLDER_OF_SCALE, FOLDERS
from .stamps import FileStamp
from .units import ROW_GROUP_BYTES, RowGroupBytes, read_record, require_intact

SHARD_BYTES = 500 * 1000 * 1000

RowFilter = Callable[[pa.Table], pa.Table]
Rows = TypeVar("Rows", int, dict)  # what a pack record counts: rows of one file set, or per folder


def iter_unit_batches(unit_files: Iterable[Path], transform: RowFilter | None = None) -> Iterator[pa.Table]:
    """Row groups of the given unit files in order, optionally transformed (selection, resizing)."""
    for path in unit_files:
        parquet = pq.ParquetFile(path)
        for index in range(parquet.num_row_groups):
            table = parquet.read_row_group(index)
            if transform is not None:
                table = transform(table)
            if table.num_rows:
                yield table


class Rolling:
    """The rolling rule of a shard series, on image sizes alone: a row group closes when RowGroupBytes says so, a
    shard at the first row-group close that brings it to `shard_bytes` or more (never when `shard_bytes` is None:
    one file)."""

    def __init__(self, shard_bytes: int | None = SHARD_BYTES, group_bytes: int = ROW_GROUP_BYTES):
        self.shard_bytes = shard_bytes
        self.groups = RowGroupBytes(group_bytes)
        self.shard = 0  # image bytes of the open shard's closed row groups

    def add(self, size: int) -> tuple[int, bool]:
        """Count one row: (the image bytes of the row group it closes, 0 while that stays open; whether its shard
        closes after it)."""
        closed = self.groups.add(size)
        if not closed:
            return 0, False
        self.shard += closed
        if self.shard_bytes is None or self.shard < self.shard_bytes:
            return closed, False
        self.shard = 0
        return closed, True


class ShardSeries:
    """Consecutive shards of one (folder, subset): rolls over at SHARD_BYTES, row groups at ROW_GROUP_BYTES.
    `first_index` numbers the first shard; `one_file` makes a series that never rolls over."""

    def __init__(self, folder: Path, slug: str, shard_bytes: int | None = SHARD_BYTES, first_index: int = 0,
                 group_bytes: int = ROW_GROUP_BYTES):
        self.folder, self.slug = folder, slug
        self.first_index = first_index
        self.written: list[Path] = []
        self.rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._final: Path | None = None
        self._stack = ExitStack()  # holds the open shard's atomic_path
        self._pending: list[pa.Table] = []  # rows of the open row group
        self._rolling = Rolling(shard_bytes, group_bytes)

    @classmethod
    def one_file(cls, folder: Path, slug: str, index: int = 0, group_bytes: int = ROW_GROUP_BYTES) -> "ShardSeries":
        """A series written as the single shard `index` (a planned shard, a mixed mini shard)."""
        return cls(folder, slug, shard_bytes=None, first_index=index, group_bytes=group_bytes)

    def add(self, table: pa.Table) -> None:
        sizes = pc.binary_length(pc.struct_field(table.column("image"), "bytes")).to_pylist()  # chunk by chunk: no copy
        start = 0
        for end, size in enumerate(sizes, start=1):
            group_bytes, shard_closes = self._rolling.add(size)
            if group_bytes:
                self._pending.append(table.slice(start, end - start))
                start = end
                self._flush(group_bytes)
            if shard_closes:
                self._close_shard()
        if start < table.num_rows:
            self._pending.append(table.slice(start))

    def _flush(self, image_bytes: int) -> None:
        """Write the open row group (`image_bytes` of images) to the open shard."""
        if not self._pending:
            return
        if self._writer is None:
            self._final = self.folder / shard_name(self.slug, self.first_index + len(self.written))
            tmp = self._stack.enter_context(atomic_path(self._final))
            with output_errors(self._final):
                self._writer = open_shard_writer(tmp)
        table = pa.concat_tables(self._pending)
        with output_errors(self._final):
            require_free_space(self.folder, 2 * image_bytes + FREE_SPACE_MARGIN)
            write_shard_table(self._writer, table, table.num_rows)
        self.rows += table.num_rows
        self._pending = []

    def _close_shard(self) -> None:
        with output_errors(self._final):
            require_free_space(self.folder, FREE_SPACE_MARGIN)
            self._writer.close()
        self._stack.close()  # renames the temporary file to the shard
        self.written.append(self._final)
        self._writer = None

    def close(self) -> list[Path]:
        self._flush(self._rolling.groups.pending)
        if self._writer is not None:
            self._close_shard()
        return self.written

    def abort(self, error: BaseException) -> None:
        """Remove the open shard's temporary file after a failure."""
        if self._writer is not None:
            with suppress(Exception):
                self._writer.close()
        self._stack.__exit__(type(error), error, error.__traceback__)


def shard_name(slug: str, index: int) -> str:
    return f"{slug}-{index:05d}.parquet"


@dataclass(frozen=True)
class ShardPlan:
    """One planned shard of `full`: rows [start, end) of the folder's rows of each unit file, in order."""

    folder: str
    slug: str
    index: int
    pieces: tuple[tuple[str, int, int], ...]  # (unit parquet path, start, end)
    rows: int
    key: str  # identifies the inputs: unit fingerprints, row ranges, layout
    group_bytes: int = ROW_GROUP_BYTES

    def unit_files(self) -> set[Path]:
        return {Path(path) for path, _, _ in self.pieces}

    @property
    def name(self) -> str:
        return f"{self.folder}/{self.slug}/{shard_name(self.slug, self.index)}"


def plan_shards(unit_files: list[Path], fingerprints: list[str], slug: str, shard_bytes: int = SHARD_BYTES,
                group_bytes: int = ROW_GROUP_BYTES) -> list[ShardPlan]:
    """Every shard of a subset's `full` series, per folder, planned from the unit files' `_size` column (read
    without the images, each file once) under the rolling rule of `ShardSeries`; unit files in unit order."""
    planners = {folder: _SeriesPlanner(folder, slug, Rolling(shard_bytes, group_bytes)) for folder in FOLDERS}
    for path, fingerprint in zip(unit_files, fingerprints):
        for folder, sizes in unit_sizes(path).items():
            planners[folder].add_unit(str(path), fingerprint, sizes)
    return [plan for folder in FOLDERS for plan in planners[folder].finish()]


class _SeriesPlanner:
    """Cuts one (folder, subset) series into ShardPlans as the unit files' sizes come in."""

    def __init__(self, folder: str, slug: str, rolling: Rolling):
        self.folder, self.slug, self.rolling = folder, slug, rolling
        self.plans: list[ShardPlan] = []
        self.pieces: list[tuple[str, int, int]] = []  # of the open shard
        self.prints: dict[str, str] = {}  # unit fingerprints of the open shard

    def add_unit(self, path: str, fingerprint: str, sizes: list[int]) -> None:
        start = 0
        for row, size in enumerate(sizes, start=1):
            if self.rolling.add(size)[1]:
                self._add_piece(path, fingerprint, start, row)
                self._close_shard()
                start = row
        if start < len(sizes):
            self._add_piece(path, fingerprint, start, len(sizes))

    def finish(self) -> list[ShardPlan]:
        if self.pieces:
            self._close_shard()
        return self.plans

    def _add_piece(self, path: str, fingerprint: str, start: int, end: int) -> None:
        self.pieces.append((path, start, end))
        self.prints[path] = fingerprint

    def _close_shard(self) -> None:
        index, limit = len(self.plans), self.rolling.groups.limit
        # the unit files by name, not path: an output folder copied elsewhere plans the same keys
        pieces = [(Path(path).name, start, end) for path, start, end in self.pieces]
        prints = {Path(path).name: fingerprint for path, fingerprint in self.prints.items()}
        key = pack_key("planned-shard", self.folder, self.slug, index, pieces, prints, FOLDER_OF_SCALE,
                       COLUMNS, self.rolling.shard_bytes, limit)
        rows = sum(end - start for _, start, end in self.pieces)
        self.plans.append(ShardPlan(self.folder, self.slug, index, tuple(self.pieces), rows, key, limit))
        self.pieces, self.prints = [], {}


def unit_sizes(path: Path) -> dict[str, list[int]]:
    """Per folder, the image sizes of its rows of a unit file, in order, read from the `_size` column only."""
    parquet, folders = _open_unit(path)
    groups: dict[str, list[int]] = {}
    for index, folder in enumerate(folders):
        if folder is not None:
            groups.setdefault(folder, []).append(index)
    return {folder: parquet.read_row_groups(indexes, columns=["_size"]).column(0).to_pylist()
            for folder, indexes in groups.items()}


def folder_rows(path: Path, folder: str, start: int, end: int) -> Iterator[pa.Table]:
    """Rows [start, end) of `folder`'s rows of a unit file, reading only the row groups that hold them (unit files
    keep each folder's rows in row groups of their own; the `scale` statistics say whose a group is)."""
    parquet, folders = _open_unit(path)
    seen = 0
    for index, group_folder in enumerate(folders):
        if group_folder != folder:
            continue
        rows = parquet.metadata.row_group(index).num_rows
        if seen < end and seen + rows > start:
            first = max(start, seen)
            yield parquet.read_row_group(index).slice(first - seen, min(end, seen + rows) - first)
        seen += rows
        if seen >= end:
            return


def _open_unit(path: Path) -> tuple[pq.ParquetFile, list[str | None]]:
    """A unit file and the folder of each of its row groups (None for an empty one); a file that cannot be read is
    named, with what to do."""
    try:
        parquet = pq.ParquetFile(path)
        schema = parquet.metadata.schema
        leaf = next(i for i in range(len(schema)) if schema.column(i).path == "scale")
        return parquet, [_group_folder(parquet, index, leaf) for index in range(parquet.num_row_groups)]
    except (OSError, ValueError, StopIteration, KeyError) as error:  # ArrowInvalid is a ValueError
        raise ValueError(f"{path}: unit file unreadable ({type(error).__name__}: {error}); delete it and its .json "
                         f"record, and run again to convert its unit again") from error


def _group_folder(parquet: pq.ParquetFile, index: int, leaf: int) -> str | None:
    """The folder of a unit file's row group (None when it is empty), from the statistics of its `scale` column
    (`leaf`), or its rows when there are none."""
    group = parquet.metadata.row_group(index)
    if group.num_rows == 0:
        return None
    statistics = group.column(leaf).statistics
    if statistics is not None and statistics.has_min_max:
        folders = {FOLDER_OF_SCALE[statistics.min], FOLDER_OF_SCALE[statistics.max]}
    else:
        folders = {FOLDER_OF_SCALE[s] for s in parquet.read_row_group(index, columns=["scale"]).column(0).to_pylist()}
    if len(folders) != 1:
        raise ValueError(f"row group {index} mixes folders {sorted(folders)}")
    return folders.pop()


def shard_record_path(record_dir: Path, folder: str, shard_file: str) -> Path:
    """Where the record of a planned shard (`<slug>-NNNNN.parquet` in `folder`) is kept."""
    return record_dir / folder / Path(shard_file).with_suffix(".json").name


def write_planned_shard(plan: ShardPlan, config_dir: Path, record_dir: Path, verify: bool = False,
                        written: frozenset[Path] = frozenset()) -> PackResult:
    """Write one planned shard unless its record holds the same key and the shard is intact (a damaged one is
    named in the result and rebuilt byte for byte). `written`: unit files this run wrote (`require_intact`)."""
    record_path = shard_record_path(record_dir, plan.folder, shard_name(plan.slug, plan.index))
    rows, damage = cached_output(record_path, config_dir, plan.key, verify,
                                 lambda: _write_plan(plan, config_dir, written))
    return PackResult({plan.folder: rows}, damage)


def _write_plan(plan: ShardPlan, config_dir: Path, written: frozenset[Path]) -> tuple[list[Path], int]:
    require_intact(sorted(plan.unit_files()), written)
    series = ShardSeries.one_file(config_dir / plan.folder / plan.slug, plan.slug, plan.index, plan.group_bytes)
    try:
        for path, start, end in plan.pieces:
            for table in folder_rows(Path(path), plan.folder, start, end):
                series.add(table.select(list(COLUMNS)))
        written = series.close()
    except BaseException as error:
        series.abort(error)
        raise
    if series.rows != plan.rows or len(written) != 1:
        raise RuntimeError(f"{plan.name}: wrote {series.rows} rows in {len(written)} file(s), planned {plan.rows}")
    return written, plan.rows


def remove_unplanned(config_dir: Path, record_dir: Path, plans: list[ShardPlan], slug: str) -> None:
    """Remove the shards (and their records) of a subset's series that are no longer planned: left by an earlier
    run whose units or layout differed, in any folder."""
    planned = {config_dir / plan.name for plan in plans}
    for path in remove_stale(config_dir, f"*/{slug}/*.parquet*", planned):
        shard_record_path(record_dir, path.parent.parent.name, path.name).unlink(missing_ok=True)


@dataclass
class PackResult:
    rows: dict[str, int]  # folder -> rows
    repaired: list[str] = field(default_factory=list)  # damaged published shards found (and rebuilt), with the damage


def pack_subset(
    unit_files: list[Path],
    config_dir: Path,
    slug: str,
    record_dir: Path,
    key: str,
    transform: RowFilter | None = None,
    verify: bool = False,
    written: frozenset[Path] = frozenset(),
) -> PackResult:
    """Pack one subset's unit files into shards under `config_dir/<folder>/<slug>/` (a cached output, see
    `cached_output`; shards left by an earlier pack of the subset that are no longer part of it are removed).

    `key` identifies the inputs (unit records and selection); `written`: unit files this run wrote
    (`require_intact`).
    """
    key = pack_key(key, FOLDER_OF_SCALE)  # a change of folder layout repacks (and removes the old files)
    rows, damage = cached_output(record_dir / f"{slug}.json", config_dir, key, verify,
                                 lambda: _write_shards(unit_files, config_dir, slug, transform, written),
                                 stale=f"*/{slug}/*.parquet*")
    return PackResult(rows, damage)


# --- cached outputs: published files rebuilt only when their inputs changed or they were damaged ----------------


@dataclass(frozen=True)
class PackRecord:
    """What a packing wrote: the key of its inputs, each file's stamp (by its path under the output folder), the
    rows."""

    key: str
    shards: dict[str, FileStamp]
    rows: int | dict[str, int]

    @classmethod
    def read(cls, path: Path) -> "PackRecord | None":
        data = read_record(path)
        try:
            return cls(data["key"], {name: FileStamp.from_dict(s) for name, s in data["shards"].items()}, data["rows"])
        except (TypeError, KeyError, ValueError, AttributeError):
            return None

    def write(self, path: Path) -> None:
        data = {"key": self.key, "shards": {name: s.to_dict() for name, s in self.shards.items()}, "rows": self.rows}
        write_atomic(path, json.dumps(data, indent=1).encode())


def cached_output(record_path: Path, folder: Path, key: str, verify: bool,
                  build: Callable[[], tuple[list[Path], Rows]], stale: str | None = None) -> tuple[Rows, list[str]]:
    """The one write path of published files: (rows, damage found).

    When the record at `record_path` holds `key` and every file it stamps under `folder` is intact
    (`stamps.FileStamp`: its recorded size, and its SHA-256 where its modification time changed or when
    `verify`), nothing is written (but the record's times, when a file was found intact under another
    time: copied or restored). Otherwise `build()` writes the files (returning them and their rows),
    the files under `folder` that match the glob `stale` and were not written are removed, and the record
    is written last, so that a run killed before it rebuilds. The damage names the files rebuilt, and why.
    """
    record = PackRecord.read(record_path)
    damage: list[str] = []
    if record is not None and record.key == key:
        damage = [d for name, stamp in record.shards.items() if (d := stamp.damage(folder / name, verify))]
        if not damage:
            _refresh_times(record, folder, record_path)
            return record.rows, []
    written, rows = build()
    if stale is not None:
        remove_stale(folder, stale, set(written))
    stamps = {path.relative_to(folder).as_posix(): FileStamp.of(path) for path in sorted(written)}
    PackRecord(key, stamps, rows).write(record_path)
    return rows, damage


def _refresh_times(record: PackRecord, folder: Path, record_path: Path) -> None:
    """Record the current times of intact files found under other times, so that the next run trusts them."""
    stamps = {name: stamp.refreshed(folder / name) for name, stamp in record.shards.items()}
    if stamps != record.shards:
        PackRecord(record.key, stamps, record.rows).write(record_path)


def remove_stale(root: Path, pattern: str, keep: set[Path]) -> list[Path]:
    """Remove the files under `root` that match the glob `pattern` and are not in `keep`, then the folders under
    `root` that this leaves empty; returns the files removed."""
    removed = [path for path in sorted(root.glob(pattern)) if path not in keep]
    for path in removed:
        path.unlink()
    folders = {folder for path in removed for folder in path.parents if root in folder.parents}
    for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return removed


def _write_shards(
    unit_files: list[Path], config_dir: Path, slug: str, transform: RowFilter | None, written: frozenset[Path]
) -> tuple[list[Path], dict[str, int]]:
    require_intact(unit_files, written)
    series: dict[str, ShardSeries] = {}
    try:
        for table in iter_unit_batches(unit_files, transform):
            table = table.select(list(COLUMNS))
            scales = table.column("scale").to_pylist()
            for folder in sorted({FOLDER_OF_SCALE[s] for s in scales}):
                mask = pa.array([FOLDER_OF_SCALE[s] == folder for s in scales])
                part = table.filter(mask)
                series.setdefault(folder, ShardSeries(config_dir / folder / slug, slug)).add(part)
        written = [path for _, s in sorted(series.items()) for path in s.close()]
    except BaseException as error:
        for s in series.values():
            s.abort(error)
        raise
    return written, {folder: s.rows for folder, s in sorted(series.items())}


def pack_key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
