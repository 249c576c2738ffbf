"""Packing of unit files into the published Parquet shards `data/full/<XL|L|M|S>/<subset>/<subset>-NNNNN.parquet`
(the mini config is mixed across subsets afterwards, see `cpia_hf.dataset.mini.pack_mixed`).

Shards are written with `datasets`' ParquetWriter (typed `huggingface` schema metadata, page index,
content-defined chunking so re-uploads deduplicate on the Hub's storage). Sizes, chosen for the Hub:
- row groups close at 64 MiB of rows: far below the viewer's ~286 MiB uncompressed limit per row
  group and several of them fit in the 300 MB it scans, so the first rows show quickly even for
  XL tiles (~2-4 MB each, ~20 per group);
- shards close at 500 MB (the Hub's recommended file size), which keeps the full release at a few
  ten thousand files, under the 100k files per repo, and every subset folder under 10k entries.
Packing is a pure function of the unit files (sorted by unit id), so a rerun writes byte-identical
shards; a pack record skips the work entirely when nothing changed, and a published shard found
damaged (size, or SHA-256 when its time changed) is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets.arrow_writer import ParquetWriter

from ..atomic import FREE_SPACE_MARGIN, atomic_path, output_errors, require_free_space, write_atomic
from ..schema import COLUMNS, FEATURES
from ..standard import FOLDER_OF_SCALE
from .units import RowGroupBytes, read_record

SHARD_BYTES = 500 * 1000 * 1000

RowFilter = Callable[[pa.Table], pa.Table]


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


class ShardSeries:
    """Consecutive shards of one (folder, subset): rolls over at SHARD_BYTES, row groups at ROW_GROUP_BYTES."""

    def __init__(self, folder: Path, slug: str, shard_bytes: int = SHARD_BYTES):
        self.folder, self.slug, self.shard_bytes = folder, slug, shard_bytes
        self.written: list[Path] = []
        self.rows = 0
        self._writer: ParquetWriter | None = None
        self._final: Path | None = None
        self._stack = ExitStack()  # holds the open shard's atomic_path
        self._shard_bytes = 0
        self._pending: list[pa.Table] = []
        self._pending_bytes = 0
        self._groups = RowGroupBytes()

    def add(self, table: pa.Table) -> None:
        sizes = pc.binary_length(table.column("image").combine_chunks().field("bytes")).to_pylist()
        start = 0
        for end, size in enumerate(sizes, start=1):
            self._pending_bytes += size
            if self._groups.add(size):
                self._pending.append(table.slice(start, end - start))
                start = end
                self._flush()
        if start < table.num_rows:
            self._pending.append(table.slice(start))

    def _flush(self) -> None:
        if not self._pending:
            return
        if self._writer is None:
            self._final = self.folder / f"{self.slug}-{len(self.written):05d}.parquet"
            tmp = self._stack.enter_context(atomic_path(self._final))
            with output_errors(self._final):
                self._writer = ParquetWriter(path=str(tmp), features=FEATURES)
        table = pa.concat_tables(self._pending)
        with output_errors(self._final):
            require_free_space(self.folder, 2 * self._pending_bytes + FREE_SPACE_MARGIN)
            self._writer.write_table(table, writer_batch_size=table.num_rows)
        self.rows += table.num_rows
        self._shard_bytes += self._pending_bytes
        self._pending, self._pending_bytes = [], 0
        if self._shard_bytes >= self.shard_bytes:
            self._close_shard()

    def _close_shard(self) -> None:
        with output_errors(self._final):
            require_free_space(self.folder, FREE_SPACE_MARGIN)
            self._writer.finalize()
        self._stack.close()  # renames the temporary file to the shard
        self.written.append(self._final)
        self._writer, self._shard_bytes = None, 0

    def close(self) -> list[Path]:
        self._flush()
        if self._writer is not None:
            self._close_shard()
        return self.written

    def abort(self, error: BaseException) -> None:
        """Remove the open shard's temporary file after a failure."""
        if self._writer is not None:
            with suppress(Exception):
                self._writer.close()
        self._stack.__exit__(type(error), error, error.__traceback__)


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
) -> PackResult:
    """Pack one subset's unit files into shards under `config_dir/<folder>/<slug>/`.

    `key` identifies the inputs (unit records and selection); when the pack record under
    `record_dir` holds the same key and its shards are intact, nothing is rewritten. Intact means the
    recorded size, and the recorded SHA-256 where the file's modification time changed (every shard
    when `verify`); a damaged or missing shard is named in the result and the subset is packed again,
    which rebuilds it byte for byte.
    """
    key = pack_key(key, FOLDER_OF_SCALE)  # a change of folder layout repacks (and removes the old files)
    record_path = record_dir / f"{slug}.json"
    record = read_record(record_path)
    damage: list[str] = []
    if record and record.get("key") == key and "shards" in record:
        damage = damaged_shards(config_dir, record["shards"], verify)
        if not damage:
            return PackResult(record["rows"])
    written, rows = _write_shards(unit_files, config_dir, slug, transform)
    # Remove shards left by an earlier pack of this subset that are no longer part of it.
    keep = {p for paths in written.values() for p in paths}
    for folder_dir in config_dir.glob(f"*/{slug}"):
        for stale in folder_dir.glob("*.parquet*"):
            if stale not in keep:
                stale.unlink()
        if not any(folder_dir.iterdir()):
            folder_dir.rmdir()
    shards = {p.relative_to(config_dir).as_posix(): shard_stamp(p) for p in sorted(keep)}
    write_atomic(record_path, json.dumps({"key": key, "shards": shards, "rows": rows}, indent=1).encode())
    return PackResult(rows, damage)


def _write_shards(
    unit_files: list[Path], config_dir: Path, slug: str, transform: RowFilter | None
) -> tuple[dict[str, list[Path]], dict[str, int]]:
    series: dict[str, ShardSeries] = {}
    try:
        for table in iter_unit_batches(unit_files, transform):
            table = table.select(list(COLUMNS))
            scales = table.column("scale").to_pylist()
            for folder in sorted({FOLDER_OF_SCALE[s] for s in scales}):
                mask = pa.array([FOLDER_OF_SCALE[s] == folder for s in scales])
                part = table.filter(mask)
                series.setdefault(folder, ShardSeries(config_dir / folder / slug, slug)).add(part)
        written = {folder: s.close() for folder, s in sorted(series.items())}
    except BaseException as error:
        for s in series.values():
            s.abort(error)
        raise
    return written, {folder: s.rows for folder, s in sorted(series.items())}


def shard_stamp(path: Path) -> dict:
    """What a published shard is checked against on a rerun: size, modification time, SHA-256."""
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": file_sha256(path)}


def damaged_shards(config_dir: Path, stamps: dict[str, dict], verify: bool) -> list[str]:
    """The recorded shards that are missing or differ from their record, each with what is wrong."""
    damage = []
    for name, stamp in stamps.items():
        path = config_dir / name
        try:
            stat = path.stat()
        except FileNotFoundError:
            damage.append(f"{path}: missing")
            continue
        if stat.st_size != stamp["size"]:
            damage.append(f"{path}: {stat.st_size} bytes, {stamp['size']} recorded")
        elif (verify or stat.st_mtime_ns != stamp["mtime_ns"]) and file_sha256(path) != stamp["sha256"]:
            damage.append(f"{path}: content differs from the recorded SHA-256")
    return damage


def file_sha256(path: Path) -> str:
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def pack_key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
