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
shards; a pack record skips the work entirely when nothing changed.
"""
from __future__ import annotations

import hashlib
import json
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets.arrow_writer import ParquetWriter

from ..atomic import atomic_path, write_atomic
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


class _ShardSeries:
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
            self._writer = ParquetWriter(path=str(tmp), features=FEATURES)
        table = pa.concat_tables(self._pending)
        self._writer.write_table(table, writer_batch_size=table.num_rows)
        self.rows += table.num_rows
        self._shard_bytes += self._pending_bytes
        self._pending, self._pending_bytes = [], 0
        if self._shard_bytes >= self.shard_bytes:
            self._close_shard()

    def _close_shard(self) -> None:
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


def pack_subset(
    unit_files: list[Path], config_dir: Path, slug: str, record_dir: Path, key: str, transform: RowFilter | None = None
) -> dict[str, int]:
    """Pack one subset's unit files into shards under `config_dir/<folder>/<slug>/`; returns rows per folder.

    `key` identifies the inputs (unit fingerprints and selection); when the pack record under
    `record_dir` holds the same key and the shards are in place, nothing is rewritten.
    """
    key = pack_key(key, FOLDER_OF_SCALE)  # a change of folder layout repacks (and removes the old files)
    record_path = record_dir / f"{slug}.json"
    record = read_record(record_path)
    if record and record.get("key") == key and all((config_dir / f).exists() for f in record["files"]):
        return record["rows"]
    series: dict[str, _ShardSeries] = {}
    try:
        for table in iter_unit_batches(unit_files, transform):
            table = table.select(list(COLUMNS))
            scales = table.column("scale").to_pylist()
            for folder in sorted({FOLDER_OF_SCALE[s] for s in scales}):
                mask = pa.array([FOLDER_OF_SCALE[s] == folder for s in scales])
                part = table.filter(mask)
                series.setdefault(folder, _ShardSeries(config_dir / folder / slug, slug)).add(part)
        written = {folder: s.close() for folder, s in sorted(series.items())}
    except BaseException as error:
        for s in series.values():
            s.abort(error)
        raise
    rows = {folder: s.rows for folder, s in sorted(series.items())}
    # Remove shards left by an earlier pack of this subset that are no longer part of it.
    keep = {p for paths in written.values() for p in paths}
    for folder_dir in config_dir.glob(f"*/{slug}"):
        for stale in folder_dir.glob("*.parquet*"):
            if stale not in keep:
                stale.unlink()
        if not any(folder_dir.iterdir()):
            folder_dir.rmdir()
    files = sorted(p.relative_to(config_dir).as_posix() for p in keep)
    write_atomic(record_path, json.dumps({"key": key, "files": files, "rows": rows}, indent=1).encode())
    return rows


def pack_key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
