"""Per-source work units: discovery, fingerprints and conversion of one unit to a cached Parquet file.

A unit is one slide (WSI: one file, or the files of a multi-file slide, see `slidefiles`) or one chunk
of ROI files of a sub-dataset. Each unit is converted on its own into
`<work>/units/<subset>/<unit>.parquet` plus a `.json` record (fingerprint, row count, failures, the
unit file's stamp), both written atomically; a rerun skips units whose record matches, lists no
failure and whose unit file is intact (failed files are retried on every run, alone when the rest of
their ROI chunk is unchanged; a changed source file size or time changes the record; a damaged unit
file is converted again), so a crash loses at most the units in flight and a cluster executor can
hand units to different machines. An ROI chunk whose worker dies is converted again in pieces
(`piece_of`, `merge_pieces`) so that only the files that kill a worker fail.
"""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import suppress
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Collection, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from .. import __version__
from ..atomic import FREE_SPACE_MARGIN, atomic_path, output_errors, require_free_space, write_atomic
from ..schema import ARROW_SCHEMA, COLUMN_OPTIONS, read_columns
from ..standard import FOLDER_OF_SCALE, SCALE_SIDES, STANDARD_MPP
from .catalog import CatalogEntry, folder_safe, subset_slug
from .imageio import DEFAULT_JPEG_QUALITY, encode_jpeg
from .results import Failure, Skipped, display_name, error_text, is_utf8, printable  # noqa: F401  (re-exported)
from .roi import DEFAULT_MAX_PIXELS, DEFAULT_ROI_MEMORY_GB, RoiError, convert_roi
from .slidefiles import group_slide_files
from .sources import OutputFolders
from .stamps import FileStamp
from .tissue import RuleName

ROW_GROUP_BYTES = 64 * 1024 * 1024
ROI_CHUNK_FILES = 2000
# `source_file` is UTF-8 text: a file whose path is not UTF-8 is refused on its own, named with its odd
# bytes written as \xNN (`display_name`).
NOT_UTF8 = "file name is not valid UTF-8: rename it to convert it"
# Internal columns of unit files: grid indices of a WSI tile at its own scale, whether a ROI belongs to its
# source's training split, and the image's size in bytes (what shard planning reads instead of the images).
# They are dropped when shards are packed.
UNIT_SCHEMA = pa.schema([*ARROW_SCHEMA, pa.field("_ix", pa.int32()), pa.field("_iy", pa.int32()),
                         pa.field("_train", pa.bool_()), pa.field("_size", pa.int32())])
# Unit files keep each scale folder's rows in row groups of their own and carry `_size`; a record of a unit file
# written otherwise (an older version) is not reused.
UNIT_LAYOUT = 2
Row = dict  # one row of a unit file: the columns of UNIT_SCHEMA


def _unit_column_options() -> dict:
    """Parquet column options of unit files: those `datasets` gives the published shards (image bytes PLAIN and
    uncompressed: JPEG bytes neither compress nor repeat, so a dictionary only slows reading a unit file), the
    internal columns dictionary-encoded and snappy-compressed like the other metadata."""
    options = {key: value.copy() for key, value in COLUMN_OPTIONS.items()}
    for name in UNIT_SCHEMA.names[len(ARROW_SCHEMA):]:
        options["compression"][name] = "snappy"
        options["use_dictionary"].append(name)
    return options


UNIT_COLUMN_OPTIONS = _unit_column_options()


class RowGroupBytes:
    """Closes a row group once the image bytes added since the last one reach ROW_GROUP_BYTES."""

    def __init__(self, limit: int = ROW_GROUP_BYTES):
        self.limit = limit
        self.pending = 0  # image bytes of the open row group

    def add(self, size: int) -> int:
        """Count one row of `size` image bytes: the image bytes of the row group it closes, 0 while it stays open."""
        self.pending += size
        if self.pending < self.limit:
            return 0
        closed, self.pending = self.pending, 0
        return closed


@dataclass(frozen=True)
class ConvertOptions:
    """Everything besides the sources that changes what a unit produces."""

    jpeg_quality: int = DEFAULT_JPEG_QUALITY
    tissue_rule: RuleName = "mask"
    min_tissue_fraction: float = 0.25
    s_per_m: int = 1
    seed: int = 0
    max_roi_pixels: int = DEFAULT_MAX_PIXELS
    # Not part of a unit's fingerprint: it only refuses files (failures are retried on every run), it never
    # changes a converted row.
    roi_memory_gb: float = field(default=DEFAULT_ROI_MEMORY_GB, metadata={"fingerprint": False})


@dataclass(frozen=True)
class Unit:
    entry: CatalogEntry
    unit_id: str
    files: tuple[str, ...]  # posix paths relative to the source root; a slide's main file first

    @property
    def key(self) -> str:
        return f"{subset_slug(self.entry.name)}/{self.unit_id}"


@dataclass
class UnitResult:
    key: str
    rows: int
    failures: list[Failure]
    skipped: bool = False  # already done by an earlier run
    skipped_files: list[Skipped] = field(default_factory=list)  # files that gave no row, with the reason
    rebuilt: str | None = None  # the damage of the unit file found and rebuilt, in words that name it


@dataclass(frozen=True)
class UnitRecord:
    """The `.json` record next to a unit file: what made it, its rows, the files that failed or gave none, and the
    unit file's stamp (size, time, SHA-256) taken when it was written."""

    fingerprint: str
    rows: int
    failures: tuple[Failure, ...]
    skipped: tuple[Skipped, ...]
    layout: int | None = UNIT_LAYOUT
    stamp: FileStamp | None = None  # None in a record of an older version

    @classmethod
    def read(cls, path: Path) -> "UnitRecord | None":
        """The record at `path`; None when there is none or it cannot be read."""
        data = read_record(path)
        try:
            stamp = FileStamp.from_dict(data["file"]) if "file" in data else None
            return cls(str(data["fingerprint"]), int(data["rows"]),
                       tuple(Failure.from_dict(f) for f in data["failures"]),
                       tuple(Skipped.from_dict(f) for f in data.get("skipped", [])), data.get("layout"), stamp)
        except (TypeError, KeyError, ValueError, AttributeError):
            return None

    def content(self) -> dict:
        """What the unit file holds, as the mini packs' key reads it (not where or when it was written)."""
        return {"fingerprint": self.fingerprint, "rows": self.rows, "failures": [f.to_dict() for f in self.failures],
                "skipped": [f.to_dict() for f in self.skipped], "layout": self.layout}

    def write(self, path: Path) -> None:
        data = {**self.content(), **({"file": self.stamp.to_dict()} if self.stamp else {})}
        write_atomic(path, json.dumps(data, indent=1).encode())

    def matches(self, fp: str) -> bool:
        """Whether the unit file was made from these inputs, in this version's layout."""
        return self.fingerprint == fp and self.layout == UNIT_LAYOUT

    def file_damage(self, path: Path, verify: bool) -> str | None:
        """What is wrong with the unit file against the stamp (`FileStamp.damage`); None when it is intact. A record
        of an older version has no stamp: its file is taken as it is, and stamped when it is reused."""
        if self.stamp is None:
            return None if path.exists() else f"{path}: missing"
        return self.stamp.damage(path, verify)


class DamagedUnitFile(Exception):
    """A unit file whose content no longer matches the stamp recorded when it was written."""


def require_intact(unit_files: list[Path], written: Collection[Path] = ()) -> None:
    """Before unit files' rows go into a shard: each file's whole content against the SHA-256 recorded when it was
    written (packing reads them anyway, so this costs a hash, not another read from disk). DamagedUnitFile stops
    this packing; the damaged file's record is marked so that the next run checks it and converts its unit again.
    Files in `written` were written, and hashed as they were, by this run: they are not hashed again."""
    for path in unit_files:
        if path in written:
            continue
        record_path = path.with_suffix(".json")
        record = UnitRecord.read(record_path)
        damage = record.file_damage(path, verify=True) if record is not None else None
        if damage:
            replace(record, stamp=replace(record.stamp, mtime_ns=-1)).write(record_path)  # a time no file has
            raise DamagedUnitFile(f"unit file {damage}: not packed; the next run converts it again (rerun the same "
                                  "command)")


def discover_units(
    entry: CatalogEntry, source_root: Path, roi_chunk: int = ROI_CHUNK_FILES, skipped: list[Skipped] | None = None,
    out_dir: Path | None = None, outputs_found: dict[Path, int] | None = None,
) -> list[Unit]:
    """The units of one catalog entry, in a stable order (sorted relative paths).

    Paths that match the pattern but are no regular file (a dangling symlink, a folder) are added to
    `skipped`. Files inside `out_dir` or another cpia output folder are not sources: they are counted per
    output folder in `outputs_found`.
    """
    folder = source_root / entry.path
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: source folder of '{entry.name}' not found")
    files = []
    outputs = OutputFolders(folder, own=out_dir)
    for path in sorted(folder.glob(entry.pattern)):
        output = outputs.of(path)
        if output is not None:
            if outputs_found is not None:
                outputs_found[output] = outputs_found.get(output, 0) + 1
            continue
        relative = path.relative_to(source_root).as_posix()
        if path.is_file():
            files.append(relative)
        elif skipped is not None:
            skipped.append(Skipped(relative, _not_a_file(path)))
    if entry.kind == "wsi":
        return [Unit(entry, _wsi_unit_id(Path(group[0]).relative_to(entry.path)), group)
                for group in group_slide_files(files, source_root)]
    return [
        Unit(entry, f"roi-{k // roi_chunk:05d}", tuple(files[k : k + roi_chunk])) for k in range(0, len(files), roi_chunk)
    ]


def _not_a_file(path: Path) -> str:
    if path.is_symlink() and not path.exists():
        return f"dangling symbolic link (to {os.readlink(path)})"
    if path.is_dir():
        return "a folder, not a slide or image file"
    return "not a regular file"


def _wsi_unit_id(relative: Path) -> str:
    return folder_safe(relative.with_suffix("").as_posix().replace("/", "__"))


def slide_stem(file: str) -> str:
    """Slide name used by the naming rule: the file name up to its first dot (TCGA `<barcode>.<uuid>.svs`)."""
    return Path(file).name.split(".")[0]


def fingerprint(unit: Unit, source_root: Path, options: ConvertOptions) -> str:
    """Hash of what determines a unit's output: catalog entry, options, code version, file sizes and times."""
    stats = []
    for f in unit.files:
        try:
            st = (source_root / f).stat()
            stats.append((f, st.st_size, st.st_mtime_ns))
        except OSError:
            stats.append((f, None, None))
    payload = json.dumps(
        [__version__, unit.entry.to_dict(), _fingerprinted(options), unit.unit_id, stats], sort_keys=True, default=str
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _fingerprinted(options: ConvertOptions) -> dict:
    return {f.name: getattr(options, f.name) for f in fields(options) if f.metadata.get("fingerprint", True)}


def unit_paths(work_dir: Path, unit: Unit) -> tuple[Path, Path]:
    base = work_dir / "units" / unit.key
    return base.with_suffix(".parquet"), base.with_suffix(".json")


def read_record(path: Path) -> dict | None:
    """A JSON record (unit, pack, lock owner); None when there is none or it cannot be read."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def convert_unit(unit: Unit, source_root: Path, work_dir: Path, options: ConvertOptions,
                 verify: bool = False) -> UnitResult:
    """Convert one unit unless its record matches its inputs, lists no failure and its unit file is intact (failed
    files are retried on every run: a fixed permission or a re-downloaded file converts without touching its
    stats; a damaged unit file is converted again, and named); returns rows written and failures. `verify`
    checks the SHA-256 of a unit file reused even when its time is the recorded one."""
    parquet_path, record_path = unit_paths(work_dir, unit)
    fp = fingerprint(unit, source_root, options)
    cached, damage = _reusable(parquet_path, record_path, fp, verify)
    if cached is not None and not cached.failures:
        _keep_stamp(cached, parquet_path, record_path)
        return UnitResult(unit.key, cached.rows, [], skipped=True, skipped_files=list(cached.skipped))
    with output_errors(parquet_path):  # a full disk stops the run before the unit's work, not after it
        require_free_space(parquet_path.parent, FREE_SPACE_MARGIN + ROW_GROUP_BYTES)
    if cached is not None and unit.entry.kind == "roi":  # an ROI chunk: only its failed files again
        items = _merged_items(unit, cached, parquet_path, source_root, options)
    else:
        items = _unit_items(unit, source_root, options)
    return replace(_write_unit(unit, fp, items, source_root, work_dir, options), rebuilt=damage)


def _reusable(parquet_path: Path, record_path: Path, fp: str, verify: bool) -> tuple[UnitRecord | None, str | None]:
    """(the record, when its unit file can be reused: same inputs, this layout, intact; the damage of the unit file
    when that is why it cannot)."""
    record = UnitRecord.read(record_path)
    if record is None or not record.matches(fp):
        return None, None
    damage = record.file_damage(parquet_path, verify)
    return (None, damage) if damage else (record, None)


def _write_unit(unit: Unit, fp: str, items: Iterator[Row | Failure], source_root: Path, work_dir: Path,
                options: ConvertOptions) -> UnitResult:
    """Write a unit file from its items, then its record (with the file's stamp)."""
    parquet_path, record_path = unit_paths(work_dir, unit)
    rows = _Rows(items)
    count = _write_unit_parquet(parquet_path, iter(rows))
    skipped = _empty_slide(unit, source_root, options) if count == 0 and not rows.failures else []
    UnitRecord(fp, count, tuple(rows.failures), tuple(skipped), stamp=FileStamp.of(parquet_path)).write(record_path)
    return UnitResult(unit.key, count, rows.failures, skipped_files=skipped)


# --- an ROI chunk whose worker died: converted again in pieces, so that only the files that kill a worker fail ---


def roi_files_to_convert(unit: Unit, source_root: Path, work_dir: Path, options: ConvertOptions,
                         verify: bool = False) -> tuple[str, ...]:
    """The files of an ROI chunk that `convert_unit` converts: its failed ones when its unit file is reused, else
    all of them."""
    parquet_path, record_path = unit_paths(work_dir, unit)
    cached, _ = _reusable(parquet_path, record_path, fingerprint(unit, source_root, options), verify)
    if cached is None:
        return unit.files
    failed = {f.file for f in cached.failures}
    return tuple(f for f in unit.files if f in failed)


def piece_of(unit: Unit, files: tuple[str, ...]) -> Unit:
    """Some files of an ROI chunk as a unit of their own (converted with `convert_unit`, merged by `merge_pieces`),
    named after the chunk and its files."""
    digest = hashlib.sha256("\n".join(files).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return Unit(unit.entry, f"{unit.unit_id}-piece-{digest}", files)


def merge_pieces(unit: Unit, pieces: tuple[Unit, ...], killed: tuple[Failure, ...], source_root: Path,
                 work_dir: Path, options: ConvertOptions, verify: bool = False) -> UnitResult:
    """Write an ROI chunk's unit file from its converted pieces, and from its cached rows of the files converted
    before, in the chunk's file order (the bytes of a run in which the `killed` files failed); its record lists
    the pieces' failures and the files that killed their worker. The pieces' files are then removed."""
    parquet_path, record_path = unit_paths(work_dir, unit)
    fp = fingerprint(unit, source_root, options)
    cached, _ = _reusable(parquet_path, record_path, fp, verify)
    redone = {file for piece in pieces for file in piece.files} | {f.file for f in killed}
    rows, failures = [], list(killed)
    if cached is not None:  # what the files not converted again gave before
        rows = [r for r in read_columns(parquet_path).to_pylist() if r["source_file"] not in redone]
        failures.extend(f for f in cached.failures if f.file not in redone)
    for piece in pieces:
        piece_path, piece_record = unit_paths(work_dir, piece)
        rows.extend(read_columns(piece_path).to_pylist())
        failures.extend(UnitRecord.read(piece_record).failures)
    order = {file: k for k, file in enumerate(unit.files)}
    failures.sort(key=lambda f: order.get(f.file, len(order)))
    rows.sort(key=lambda row: order[row["source_file"]])
    result = _write_unit(unit, fp, iter([*failures, *rows]), source_root, work_dir, options)
    for piece in pieces:
        for path in unit_paths(work_dir, piece):
            path.unlink(missing_ok=True)
    return result


def _keep_stamp(record: UnitRecord, parquet_path: Path, record_path: Path) -> None:
    """Stamp a reused unit file whose record has none (an older version's), or record its current time once its
    content is verified (a copied or restored output), so that the next run trusts it without reading it."""
    if record.stamp is None:
        stamp = FileStamp.of(parquet_path)
    else:
        stamp = record.stamp.refreshed(parquet_path)
        if stamp == record.stamp:
            return
    replace(record, stamp=stamp).write(record_path)


class _Rows:
    """The rows among a unit's items, for the writer; the failures among them are kept, in order."""

    def __init__(self, items: Iterator[Row | Failure]):
        self.items = items
        self.failures: list[Failure] = []

    def __iter__(self) -> Iterator[Row]:
        for item in self.items:
            if isinstance(item, Failure):
                self.failures.append(item)
            else:
                yield item


def _merged_items(
    unit: Unit, record: UnitRecord, parquet_path: Path, source_root: Path, options: ConvertOptions
) -> Iterator[Row | Failure]:
    """The chunk's cached rows plus those of its failed files converted again, in the chunk's file order
    (so the packed shards equal those of a clean run); the files that fail again first."""
    failed = {f.file for f in record.failures}
    retry = Unit(unit.entry, unit.unit_id, tuple(f for f in unit.files if f in failed))
    rows = read_columns(parquet_path).to_pylist()
    for item in _unit_items(retry, source_root, options):
        if isinstance(item, Failure):
            yield item
        else:
            rows.append(item)
    order = {file: k for k, file in enumerate(unit.files)}
    yield from sorted(rows, key=lambda row: order[row["source_file"]])


def _write_unit_parquet(path: Path, rows: Iterator[Row]) -> int:
    """Write rows in row groups of one scale folder each, of about ROW_GROUP_BYTES of images (so that packing a
    folder reads only its row groups), with each image's size in `_size`; an empty unit gets an empty file."""
    count = 0
    with atomic_path(path) as tmp:
        with output_errors(path):
            writer = pq.ParquetWriter(tmp, UNIT_SCHEMA, **UNIT_COLUMN_OPTIONS)
        try:
            for batch in _row_batches(rows):
                for row in batch:
                    row["_size"] = len(row["image"]["bytes"])
                table = pa.Table.from_pylist(batch, schema=UNIT_SCHEMA)
                with output_errors(path):
                    writer.write_table(table)
                count += len(batch)
        except BaseException:
            with suppress(Exception):
                writer.close()
            raise
        with output_errors(path):
            writer.close()
    return count


def _row_batches(rows: Iterator[Row]) -> Iterator[list[Row]]:
    """Row groups of one scale folder each: each folder's rows in their order, closed by RowGroupBytes per folder
    (the open ones last, by folder name); an empty unit gives one empty batch."""
    open_groups: dict[str, tuple[list[Row], RowGroupBytes]] = {}
    emitted = False
    for row in rows:
        folder = FOLDER_OF_SCALE[row["scale"]]
        batch, groups = open_groups.setdefault(folder, ([], RowGroupBytes()))
        batch.append(row)
        if groups.add(len(row["image"]["bytes"])):
            yield batch
            emitted = True
            open_groups[folder] = ([], groups)
    for folder in sorted(open_groups):
        if open_groups[folder][0]:
            yield open_groups[folder][0]
            emitted = True
    if not emitted:
        yield []


def _empty_slide(unit: Unit, source_root: Path, options: ConvertOptions) -> list[Skipped]:
    """Why a slide that converted without error gave no tile: too small, or no tissue under the rule."""
    if unit.entry.kind != "wsi":
        return []
    from .slide.readers import SlideError, open_slide_info

    file = unit.files[0]
    try:
        info = open_slide_info(source_root / file, unit.entry.mpp)
    except SlideError as error:
        return [Skipped(file, f"no tile kept ({error.reason})")]
    side = SCALE_SIDES["M"]
    if min(info.std_width, info.std_height) < side:
        reason = (f"no tile kept: too small, {info.std_width}x{info.std_height} px at {STANDARD_MPP} um/px "
                  f"is less than one M tile ({side} px)")
    else:
        reason = f"no tile kept: no tissue found by the '{options.tissue_rule}' tissue rule (blank or faint slide)"
    return [Skipped(file, reason)]


def _metadata(entry: CatalogEntry) -> dict:
    return {
        "subset": entry.name,
        "kind": entry.kind,
        "organ": entry.organ,
        "disease": entry.disease,
        "stain": entry.stain,
        "field": entry.field,
        "license": entry.license,
    }


def _unit_items(unit: Unit, source_root: Path, options: ConvertOptions) -> Iterator[Row | Failure]:
    """A unit's rows, and one Failure for each file that gives none or, for a slide with unreadable regions, not all
    of them, in the order met."""
    if unit.entry.kind == "wsi":
        yield from _wsi_items(unit, source_root, options)
    else:
        yield from _roi_items(unit, source_root, options)


def _wsi_items(unit: Unit, source_root: Path, options: ConvertOptions) -> Iterator[Row | Failure]:
    from .slide.readers import SlideError
    from .slide.tiles import iter_slide_tiles
    from .tissue import TissueRule  # slide readers load only where slides are converted

    file = unit.files[0]  # the main file of a multi-file slide (DICOM series, MIRAX, VMS)
    if not is_utf8(file):
        yield Failure(display_name(file), NOT_UTF8)
        return
    cell_errors: list[str] = []  # the slide reader reports a failed cell through a callback, mid-iteration
    meta = _metadata(unit.entry)
    rule = TissueRule(name=options.tissue_rule, min_fraction=options.min_tissue_fraction)
    tiles = iter_slide_tiles(
        source_root / file,
        slide_stem=slide_stem(file),
        mpp_override=unit.entry.mpp,
        rule=rule,
        s_per_m=options.s_per_m,
        seed=options.seed,
        on_cell_error=cell_errors.append,
    )
    try:
        for tile in tiles:
            yield {
                "image": {"bytes": encode_jpeg(tile.pixels, options.jpeg_quality), "path": None},
                "image_id": tile.image_id,
                "scale": tile.scale,
                "source_file": file,
                "x": tile.x,
                "y": tile.y,
                "width": tile.width,
                "height": tile.height,
                "mpp": STANDARD_MPP,
                "tissue_fraction": tile.tissue_fraction,
                "label": None,
                "_ix": tile.x_index,
                "_iy": tile.y_index,
                "_train": True,
                **meta,
            }
    except SlideError as error:
        yield Failure(file, _read_errors_reason([error.reason, *cell_errors]))
        return
    if cell_errors:
        yield Failure(file, _read_errors_reason(cell_errors))


def _read_errors_reason(reasons: list[str]) -> str:
    """One reason for every read error of a slide (the summary gives a file one line): the first, and how many more
    regions failed (the rest of the slide is converted; the whole slide is tried again on the next run)."""
    more = len(reasons) - 1
    return reasons[0] + (f" (and {more} more unreadable region{'s' if more > 1 else ''} in this slide)" if more else "")


def _roi_items(unit: Unit, source_root: Path, options: ConvertOptions) -> Iterator[Row | Failure]:
    entry = unit.entry
    meta = _metadata(entry)
    train_files = None
    if entry.train_pattern is not None:
        train_files = {p.relative_to(source_root).as_posix() for p in (source_root / entry.path).glob(entry.train_pattern)}
    for file in unit.files:
        path = source_root / file
        if not is_utf8(file):
            yield Failure(display_name(file), NOT_UTF8)
            continue
        try:
            roi = convert_roi(path, max_pixels=options.max_roi_pixels, memory_gb=options.roi_memory_gb)
            image_bytes = encode_jpeg(roi.pixels, options.jpeg_quality)
        except RoiError as error:
            yield Failure(file, error.reason)
            continue
        except Exception as error:  # any other failure of one file costs only that file
            yield Failure(file, error_text(error))
            continue
        label = path.parent.name if entry.label_from == "parent" else None
        stem = Path(file).stem
        yield {
            "image": {"bytes": image_bytes, "path": None},
            "image_id": f"{label}-{stem}" if label else stem,
            "scale": entry.scale,
            "source_file": file,
            "x": roi.x,
            "y": roi.y,
            "width": roi.side,
            "height": roi.side,
            "mpp": None,
            "tissue_fraction": None,
            "label": label,
            "_ix": -1,
            "_iy": -1,
            "_train": train_files is None or file in train_files,
            **meta,
        }
