"""`cpia sources`: where every catalog entry comes from, what the converter expects, and what a source tree holds.

Per entry: homepage, how it is obtained (catalog `access`), the folder and file pattern under the source root,
the licence, the release's image counts, rough disk and CPU estimates, and, given a source root, whether the
entry is present, partial or missing with its file count.

Estimates (the cost table of docs/sources.md is generated from them, and every other page cites it):
- output pixels: the release's image counts times the stored side squared (WSI tiles keep their side, ROIs
  are 384 px);
- output bytes: OUTPUT_BYTES_PER_PIXEL for JPEG quality 90 of H&E tiles;
- CPU time, from the rates measured by benchmarks/convert.py (docs/benchmarks.md), the one place they are kept:
  WSI output megapixels over WSI_MP_PER_CPU_S (a unit of work: slides with little tissue are the slow end), ROIs
  at ROI_CPU_S_PER_IMAGE each (small TIFF to large PNG), plus packing at PACK_CPU_S_PER_MB of output;
- source bytes: WSIs from the tissue area the L tiles cover, scanned at 40x (0.25 um/px, 3.9x the standard's
  pixels), at SCANNER_BYTES_PER_PIXEL including pyramid levels and background; ROI sources at
  ROI_SOURCE_BYTES per released image. These are orders of magnitude, not quotes: check each homepage.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..standard import ROI_SIDE, SCALE_SIDES, STANDARD_MPP
from .catalog import LICENCE_STATUSES, CatalogEntry

State = Literal["present", "partial", "missing"]
Format = Literal["table", "md", "csv"]

OUTPUT_BYTES_PER_PIXEL = 0.2
# Measured conversion rates (benchmarks/convert.py; docs/benchmarks.md says on what): (slow, fast) each.
WSI_MP_PER_CPU_S = (54.0, 80.0)  # output megapixels per CPU-second of a WSI unit of work
ROI_CPU_S_PER_IMAGE = (0.0387, 0.0056)  # CPU-seconds per ROI: decode, crop, resize, encode
PACK_CPU_S_PER_MB = 0.003  # CPU-seconds per MB of shards written when packing `full`
WORKED_EXAMPLE_CORES = 16  # the machine the docs' wall-time example assumes
SCAN_MPP = 0.25
SCANNER_BYTES_PER_PIXEL = 0.4
ROI_SOURCE_BYTES = 500_000
WORK_FOLDER = ".work"  # every cpia output folder holds its cache and lock here

ACCESS_TEXT = {
    "open": "open download",
    "registration": "registration (account or form)",
    "agreement": "data-use agreement",
    "tcia": "TCIA manifest (NBIA Data Retriever)",
    "gdc": "GDC manifest (gdc-client)",
    "unknown": "unknown",
}


@dataclass(frozen=True)
class SourceRow:
    entry: CatalogEntry
    released: int  # the release's image count, all scales
    output_mp: float
    source_bytes: float
    state: State | None = None  # None without a source root
    files: int | None = None
    expected_files: int | None = None  # ROI entries: one file per released image

    @property
    def output_bytes(self) -> float:
        return self.output_mp * 1e6 * OUTPUT_BYTES_PER_PIXEL

    @property
    def cpu_hours(self) -> tuple[float, float]:
        """(best, worst) CPU-hours of the conversion: the units at the measured rates, then packing."""
        packing = self.output_bytes / 1e6 * PACK_CPU_S_PER_MB
        if self.entry.kind == "wsi":
            slow, fast = WSI_MP_PER_CPU_S
            units = (self.output_mp / fast, self.output_mp / slow)
        else:
            slow, fast = ROI_CPU_S_PER_IMAGE
            units = (self.released * fast, self.released * slow)
        return (units[0] + packing) / 3600, (units[1] + packing) / 3600


def output_megapixels(entry: CatalogEntry) -> float:
    """Megapixels the converter writes for the release's counts of this entry."""
    sides = SCALE_SIDES if entry.kind == "wsi" else {entry.scale: ROI_SIDE}
    return sum(n * sides[scale] ** 2 for scale, n in entry.expected_images.items()) / 1e6


def source_bytes(entry: CatalogEntry) -> float:
    """Rough size of the source as downloaded (see the module docstring for the assumptions)."""
    if entry.kind == "roi":
        return sum(entry.expected_images.values()) * ROI_SOURCE_BYTES
    tissue_px = entry.expected_images.get("L", 0) * SCALE_SIDES["L"] ** 2
    return tissue_px * (STANDARD_MPP / SCAN_MPP) ** 2 * SCANNER_BYTES_PER_PIXEL


def count_files(entry: CatalogEntry, source_root: Path) -> int | None:
    """Files matching the entry's pattern under its folder (outside cpia output folders); None when the folder
    is absent."""
    folder = source_root / entry.path
    if not folder.is_dir():
        return None
    outputs = OutputFolders(folder)
    return sum(1 for p in folder.glob(entry.pattern) if p.is_file() and outputs.of(p) is None)


class OutputFolders:
    """The cpia output folders that files found under a source folder lie in, so that they are not read as sources.

    An output folder is the run's own `--out` (`own`) or any folder holding a `.work` folder (every output has
    one); with `--out` inside a source folder, its gallery PNGs and shards would otherwise match the source
    patterns. Answers are cached per folder: one stat per folder, not per file.
    """

    def __init__(self, top: Path, own: Path | None = None):
        self.top = top
        self.own = own
        self._cache: dict[Path, Path | None] = {}

    def of(self, path: Path) -> Path | None:
        """The output folder `path` lies in (between the source folder and it), or None."""
        return self._folder(path.parent)

    def _folder(self, folder: Path) -> Path | None:
        if folder not in self._cache:
            inside = folder != self.top and self.top in folder.parents
            outer = self._folder(folder.parent) if inside else None
            own = folder == self.own or (folder / WORK_FOLDER).is_dir()
            self._cache[folder] = outer or (folder if own else None)
        return self._cache[folder]


def state_of(files: int | None, expected: int | None) -> State:
    """missing: no folder; partial: a folder without matching files or with fewer than expected; else present."""
    if files is None:
        return "missing"
    if files == 0 or (expected is not None and files < expected):
        return "partial"
    return "present"


def survey(entries: list[CatalogEntry], source_root: Path | None = None) -> list[SourceRow]:
    rows = []
    for entry in entries:
        row = dict(entry=entry, released=sum(entry.expected_images.values()), output_mp=output_megapixels(entry),
                   source_bytes=source_bytes(entry))
        if source_root is not None:
            expected = sum(entry.expected_images.values()) or None if entry.kind == "roi" else None
            files = count_files(entry, source_root)
            row.update(state=state_of(files, expected), files=files or 0, expected_files=expected)
        rows.append(SourceRow(**row))
    return rows


def _record(row: SourceRow, with_state: bool) -> dict[str, str]:
    entry = row.entry
    best, worst = row.cpu_hours
    record = {
        "name": entry.name, "kind": entry.kind, "access": ACCESS_TEXT[entry.access], "homepage": entry.homepage,
        "folder": entry.path, "pattern": entry.pattern, "license": entry.license,
        "license status": entry.license_status or "not recorded", "license source": entry.license_source or "",
        "license evidence": entry.license_evidence or "", "released images": f"{row.released:,}", "source GB (est.)": f"{row.source_bytes / 1e9:,.1f}",
        "output GB (est.)": f"{row.output_bytes / 1e9:,.1f}", "CPU-hours (est.)": f"{best:,.1f}-{worst:,.1f}",
    }
    if with_state:
        expected = f" / {row.expected_files:,}" if row.expected_files else ""
        record.update({"state": row.state, "files": f"{row.files:,}{expected}"})
    return record


# Columns too long for a table: the terminal shows the licence status only, Markdown adds its source, CSV has all.
HIDDEN: dict[str, tuple[str, ...]] = {"table": ("license source", "license evidence"), "md": ("license evidence",),
                                      "csv": ()}


def totals(rows: list[SourceRow]) -> dict[str, float]:
    best = sum(r.cpu_hours[0] for r in rows)
    worst = sum(r.cpu_hours[1] for r in rows)
    return {"entries": len(rows), "released": sum(r.released for r in rows),
            "source_tb": sum(r.source_bytes for r in rows) / 1e12, "output_tb": sum(r.output_bytes for r in rows) / 1e12,
            "cpu_hours_best": best, "cpu_hours_worst": worst}


def render(rows: list[SourceRow], fmt: Format, with_state: bool) -> str:
    """The survey as an aligned terminal table, a Markdown table or CSV, followed (table/md) by totals."""
    records = [_record(r, with_state) for r in rows]
    header = [h for h in (records[0] if records else []) if h not in HIDDEN[fmt]]
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=header, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
        return buffer.getvalue()
    if fmt == "md":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r[h].replace("|", "\\|") for h in header) + " |" for r in records]
    else:
        widths = {h: max(len(h), *(len(r[h]) for r in records)) for h in header}
        lines = ["  ".join(h.ljust(widths[h]) for h in header), "  ".join("-" * widths[h] for h in header)]
        lines += ["  ".join(r[h].ljust(widths[h]) for h in header) for r in records]
    lines += ["", summary(rows, with_state)]
    return "\n".join(lines) + "\n"


def rates_text() -> str:
    """The measured rates behind the CPU-time estimate, as docs/sources.md states them."""
    (wsi_slow, wsi_fast), (roi_slow, roi_fast) = WSI_MP_PER_CPU_S, ROI_CPU_S_PER_IMAGE
    return (f"a WSI unit of work at {wsi_slow:g}–{wsi_fast:g} output megapixels per CPU-second, an ROI at "
            f"{roi_fast * 1e3:g}–{roi_slow * 1e3:g} CPU-ms, packing at {PACK_CPU_S_PER_MB * 1e3:g} CPU-ms per MB written")


def cpu_hours_text(rows: list[SourceRow]) -> str:
    """The conversion cost of `rows` as the docs state it: CPU-hours, and hours on the worked example's cores."""
    t = totals(rows)
    best, worst = t["cpu_hours_best"], t["cpu_hours_worst"]
    cores = WORKED_EXAMPLE_CORES
    return f"{best:,.0f}–{worst:,.0f} CPU-hours ({best / cores:.2g}–{worst / cores:.2g} hours on {cores} cores)"


def licence_counts(rows: list[SourceRow]) -> dict[str, int]:
    """Entries per licence status, in the order owner, second-hand, conflict, unknown, not recorded."""
    statuses = [r.entry.license_status or "not recorded" for r in rows]
    return {s: statuses.count(s) for s in (*LICENCE_STATUSES, "not recorded") if s in statuses}


def summary(rows: list[SourceRow], with_state: bool) -> str:
    t = totals(rows)
    licences = ", ".join(f"{n} {s}" for s, n in licence_counts(rows).items())
    text = (f"{t['entries']} entries, {t['released']:,} released images; estimated sources {t['source_tb']:,.1f} TB, "
            f"output {t['output_tb']:,.1f} TB, conversion {cpu_hours_text(rows)}; licence status: {licences}")
    if with_state:
        counts = {s: sum(r.state == s for r in rows) for s in ("present", "partial", "missing")}
        text += "; " + ", ".join(f"{n} {s}" for s, n in counts.items())
    return text


def cost_table(rows: list[SourceRow]) -> str:
    """Markdown table of size and conversion cost per kind and in total: the one the docs cite."""
    lines = ["| | entries | released images | sources (est.) | CPIA output (est.) | conversion (CPU-hours) |",
             "|---|---|---|---|---|---|"]
    for label, part in (("WSI", [r for r in rows if r.entry.kind == "wsi"]),
                        ("ROI", [r for r in rows if r.entry.kind == "roi"]), ("**total**", rows)):
        t = totals(part)
        lines.append(f"| {label} | {t['entries']} | {t['released']:,} | {t['source_tb']:,.1f} TB | "
                     f"{t['output_tb']:,.2f} TB | {t['cpu_hours_best']:,.0f}–{t['cpu_hours_worst']:,.0f} |")
    return "\n".join(lines) + "\n"
