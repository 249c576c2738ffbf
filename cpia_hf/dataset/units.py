"""Per-source work units: discovery, fingerprints and conversion of one unit to a cached Parquet file.

A unit is one slide (WSI: one file, or the files of a multi-file slide, see `slidefiles`) or one chunk
of ROI files of a sub-dataset. Each unit is converted on its own into
`<work>/units/<subset>/<unit>.parquet` plus a `.json` record (fingerprint, row count, failures), both
written atomically; a rerun skips units whose record matches and lists no failure (failed files are
retried on every run, alone when the rest of their ROI chunk is unchanged; a changed file size or time
changes the record), so a crash loses at most the units in flight and a cluster executor can hand
units to different machines.
"""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import suppress
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from datasets.arrow_writer import get_parquet_column_options

from .. import __version__
from ..atomic import FREE_SPACE_MARGIN, atomic_path, output_errors, require_free_space, write_atomic
from ..schema import FEATURES
from ..standard import FOLDER_OF_SCALE, SCALE_SIDES, STANDARD_MPP
from .catalog import CatalogEntry, folder_safe, subset_slug
from .imageio import DEFAULT_JPEG_QUALITY, encode_jpeg
from .roi import DEFAULT_MAX_PIXELS, DEFAULT_ROI_MEMORY_GB, RoiError, convert_roi
from .slidefiles import group_slide_files
from .sources import OutputFolders
from .tissue import RuleName

ROW_GROUP_BYTES = 64 * 1024 * 1024
ROI_CHUNK_FILES = 2000
# `source_file` is UTF-8 text: a file whose path is not UTF-8 is refused on its own, named with its odd
# bytes written as \xNN (`display_name`).
NOT_UTF8 = "file name is not valid UTF-8: rename it to convert it"
# Internal columns of unit files: grid indices of a WSI tile at its own scale, whether a ROI belongs to its
# source's training split, and the image's size in bytes (what shard planning reads instead of the images).
# They are dropped when shards are packed.
UNIT_SCHEMA = pa.schema([*FEATURES.arrow_schema, pa.field("_ix", pa.int32()), pa.field("_iy", pa.int32()),
                         pa.field("_train", pa.bool_()), pa.field("_size", pa.int32())])
# Unit files keep each scale folder's rows in row groups of their own and carry `_size`; a record of a unit file
# written otherwise (an older version) is not reused.
UNIT_LAYOUT = 2


def _unit_column_options() -> dict:
    """Parquet column options of unit files: those `datasets` gives the published shards (image bytes PLAIN and
    uncompressed: JPEG bytes neither compress nor repeat, and dictionary-encoding them made reading a unit file
    30x slower), the internal columns dictionary-encoded and snappy-compressed like the other metadata."""
    options = get_parquet_column_options(FEATURES, FEATURES.arrow_schema)
    for name in UNIT_SCHEMA.names[len(FEATURES):]:
        options["compression"][name] = "snappy"
        options["use_dictionary"].append(name)
    return options


UNIT_COLUMN_OPTIONS = _unit_column_options()


class RowGroupBytes:
    """Closes a row group once the image bytes added since the last one reach ROW_GROUP_BYTES."""

    def __init__(self, limit: int = ROW_GROUP_BYTES):
        self.limit = limit
        self.pending = 0  # image bytes of the open row group

    def add(self, size: int) -> bool:
        """Count one row of `size` image bytes; True when the row group closes after it."""
        self.pending += size
        if self.pending < self.limit:
            return False
        self.pending = 0
        return True


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
    failures: list[dict]
    skipped: bool = False  # already done by an earlier run
    skipped_files: list[dict] = field(default_factory=list)  # files that gave no row, with the reason


def discover_units(
    entry: CatalogEntry, source_root: Path, roi_chunk: int = ROI_CHUNK_FILES, skipped: list[dict] | None = None,
    out_dir: Path | None = None, outputs_found: dict[Path, int] | None = None,
) -> list[Unit]:
    """The units of one catalog entry, in a stable order (sorted relative paths).

    Paths that match the pattern but are no regular file (a dangling symlink, a folder) are appended
    to `skipped` as {"file", "reason"}. Files inside `out_dir` or another cpia output folder are not
    sources: they are counted per output folder in `outputs_found`.
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
            skipped.append({"file": relative, "reason": _not_a_file(path)})
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


def is_utf8(file: str) -> bool:
    """Whether a path found on disk decodes as UTF-8 (else Python holds its odd bytes as surrogates)."""
    try:
        file.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def display_name(file: str) -> str:
    """A printable form of any path found on disk: bytes that are not UTF-8 written as \\xNN."""
    return os.fsencode(file).decode("utf-8", "backslashreplace")


def printable(text: str) -> str:
    """`text` on one line with nothing a terminal acts on: control characters (newlines, escape sequences) and
    bytes that are not UTF-8 written as backslash escapes, as Python writes them in a string's repr."""
    text = display_name(text) if not is_utf8(text) else text
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def error_text(error: BaseException) -> str:
    """One line for an unexpected error of one file: its type and message, or what an empty message means."""
    text = printable(" ".join(str(error).split()))
    if isinstance(error, MemoryError):
        return f"out of memory while converting it{' (' + text + ')' if text else ''}: give each worker more memory"
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


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
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_current(record: dict | None, fp: str) -> bool:
    """A unit's record can be reused when its inputs are unchanged and it had no failures: failed files are
    retried on every run (a fixed permission or a re-downloaded file converts without touching its stats).
    A record of a unit file in another layout (an older version's) is not."""
    return (bool(record) and record.get("fingerprint") == fp and not record.get("failures")
            and record.get("layout") == UNIT_LAYOUT)


def convert_unit(unit: Unit, source_root: Path, work_dir: Path, options: ConvertOptions) -> UnitResult:
    """Convert one unit unless its cached record matches; returns rows written and failures."""
    parquet_path, record_path = unit_paths(work_dir, unit)
    fp = fingerprint(unit, source_root, options)
    record = read_record(record_path)
    if is_current(record, fp) and parquet_path.exists():
        return UnitResult(unit.key, record["rows"], record["failures"], skipped=True,
                          skipped_files=record.get("skipped", []))
    with output_errors(parquet_path):  # a full disk stops the run before the unit's work, not after it
        require_free_space(parquet_path.parent, FREE_SPACE_MARGIN + ROW_GROUP_BYTES)
    failures: list[dict] = []
    if _retry_only_failed(unit, record, fp, parquet_path):
        rows = _merged_rows(unit, record, parquet_path, source_root, options, failures)
    else:
        rows = _unit_rows(unit, source_root, options, failures)
    count = _write_unit_parquet(parquet_path, rows)
    skipped = _empty_slide(unit, source_root, options) if count == 0 and not failures else []
    record = {"fingerprint": fp, "rows": count, "failures": failures, "skipped": skipped, "layout": UNIT_LAYOUT}
    write_atomic(record_path, json.dumps(record, indent=1).encode())
    return UnitResult(unit.key, count, failures, skipped_files=skipped)


def _retry_only_failed(unit: Unit, record: dict | None, fp: str, parquet_path: Path) -> bool:
    """An ROI chunk whose inputs are unchanged needs only its failed files converted again."""
    return unit.entry.kind == "roi" and bool(record) and record.get("fingerprint") == fp and parquet_path.exists()


def _merged_rows(
    unit: Unit, record: dict, parquet_path: Path, source_root: Path, options: ConvertOptions, failures: list[dict]
) -> Iterator[dict]:
    """The chunk's cached rows plus those of its failed files converted again, in the chunk's file order
    (so the packed shards equal those of a clean run)."""
    failed = {f["file"] for f in record["failures"]}
    retry = Unit(unit.entry, unit.unit_id, tuple(f for f in unit.files if f in failed))
    rows = pq.read_table(parquet_path).to_pylist() + list(_unit_rows(retry, source_root, options, failures))
    order = {file: k for k, file in enumerate(unit.files)}
    return iter(sorted(rows, key=lambda row: order[row["source_file"]]))


def _write_unit_parquet(path: Path, rows: Iterator[dict]) -> int:
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


def _row_batches(rows: Iterator[dict]) -> Iterator[list[dict]]:
    """Row groups of one scale folder each: each folder's rows in their order, closed by RowGroupBytes per folder
    (the open ones last, by folder name); an empty unit gives one empty batch."""
    open_groups: dict[str, tuple[list[dict], RowGroupBytes]] = {}
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


def _empty_slide(unit: Unit, source_root: Path, options: ConvertOptions) -> list[dict]:
    """Why a slide that converted without error gave no tile: too small, or no tissue under the rule."""
    if unit.entry.kind != "wsi":
        return []
    from .slides import SlideError, open_slide_info

    file = unit.files[0]
    try:
        info = open_slide_info(source_root / file, unit.entry.mpp)
    except SlideError as error:
        return [{"file": file, "reason": f"no tile kept ({error.reason})"}]
    side = SCALE_SIDES["M"]
    if min(info.std_width, info.std_height) < side:
        reason = (f"no tile kept: too small, {info.std_width}x{info.std_height} px at {STANDARD_MPP} um/px "
                  f"is less than one M tile ({side} px)")
    else:
        reason = f"no tile kept: no tissue found by the '{options.tissue_rule}' tissue rule (blank or faint slide)"
    return [{"file": file, "reason": reason}]


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


def _unit_rows(unit: Unit, source_root: Path, options: ConvertOptions, failures: list[dict]) -> Iterator[dict]:
    if unit.entry.kind == "wsi":
        yield from _wsi_rows(unit, source_root, options, failures)
    else:
        yield from _roi_rows(unit, source_root, options, failures)


def _wsi_rows(unit: Unit, source_root: Path, options: ConvertOptions, failures: list[dict]) -> Iterator[dict]:
    from .slides import SlideError, iter_slide_tiles
    from .tissue import TissueRule  # slide readers load only where slides are converted

    file = unit.files[0]  # the main file of a multi-file slide (DICOM series, MIRAX, VMS)
    if not is_utf8(file):
        failures.append({"file": display_name(file), "reason": NOT_UTF8})
        return
    meta = _metadata(unit.entry)
    rule = TissueRule(name=options.tissue_rule, min_fraction=options.min_tissue_fraction)
    tiles = iter_slide_tiles(
        source_root / file,
        slide_stem=slide_stem(file),
        mpp_override=unit.entry.mpp,
        rule=rule,
        s_per_m=options.s_per_m,
        seed=options.seed,
        on_cell_error=lambda reason: failures.append({"file": file, "reason": reason}),
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
        failures.append({"file": file, "reason": error.reason})


def _roi_rows(unit: Unit, source_root: Path, options: ConvertOptions, failures: list[dict]) -> Iterator[dict]:
    entry = unit.entry
    meta = _metadata(entry)
    train_files = None
    if entry.train_pattern is not None:
        train_files = {p.relative_to(source_root).as_posix() for p in (source_root / entry.path).glob(entry.train_pattern)}
    for file in unit.files:
        path = source_root / file
        if not is_utf8(file):
            failures.append({"file": display_name(file), "reason": NOT_UTF8})
            continue
        try:
            roi = convert_roi(path, max_pixels=options.max_roi_pixels, memory_gb=options.roi_memory_gb)
            image_bytes = encode_jpeg(roi.pixels, options.jpeg_quality)
        except RoiError as error:
            failures.append({"file": file, "reason": error.reason})
            continue
        except Exception as error:  # any other failure of one file costs only that file
            failures.append({"file": file, "reason": error_text(error)})
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
