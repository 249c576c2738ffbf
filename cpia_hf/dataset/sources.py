"""`cpia sources`: where every catalog entry comes from, what the converter expects, and what a source tree holds.

Per entry: homepage, how it is obtained (catalog `access`), the folder and file pattern under the source root,
the licence, the release's image counts, rough disk and CPU estimates, and, given a source root, whether the
entry is present, partial or missing with its file count.

Estimates (also stated in docs/sources.md):
- output pixels: the release's image counts times the stored side squared (WSI tiles keep their side, ROIs
  are 384 px);
- output bytes: OUTPUT_BYTES_PER_PIXEL for JPEG quality 90 of H&E tiles (XL tiles of 14.7 MP store as 2-4 MB);
- CPU time: output megapixels over the measured conversion throughput, 14 (slow) to 45 (fast) output MP
  per CPU-second (README benchmarks);
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
from .catalog import CatalogEntry

State = Literal["present", "partial", "missing"]
Format = Literal["table", "md", "csv"]

OUTPUT_BYTES_PER_PIXEL = 0.2
THROUGHPUT_MP_PER_CPU_S = (14.0, 45.0)  # slow, fast
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
        """(best, worst) CPU-hours of the conversion."""
        slow, fast = THROUGHPUT_MP_PER_CPU_S
        return self.output_mp / fast / 3600, self.output_mp / slow / 3600


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
        "released images": f"{row.released:,}", "source GB (est.)": f"{row.source_bytes / 1e9:,.1f}",
        "output GB (est.)": f"{row.output_bytes / 1e9:,.1f}", "CPU-hours (est.)": f"{best:,.1f}-{worst:,.1f}",
    }
    if with_state:
        expected = f" / {row.expected_files:,}" if row.expected_files else ""
        record.update({"state": row.state, "files": f"{row.files:,}{expected}"})
    return record


def totals(rows: list[SourceRow]) -> dict[str, float]:
    best = sum(r.cpu_hours[0] for r in rows)
    worst = sum(r.cpu_hours[1] for r in rows)
    return {"entries": len(rows), "released": sum(r.released for r in rows),
            "source_tb": sum(r.source_bytes for r in rows) / 1e12, "output_tb": sum(r.output_bytes for r in rows) / 1e12,
            "cpu_hours_best": best, "cpu_hours_worst": worst}


def render(rows: list[SourceRow], fmt: Format, with_state: bool) -> str:
    """The survey as an aligned terminal table, a Markdown table or CSV, followed (table/md) by totals."""
    records = [_record(r, with_state) for r in rows]
    header = list(records[0]) if records else []
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=header, lineterminator="\n")
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


def summary(rows: list[SourceRow], with_state: bool) -> str:
    t = totals(rows)
    text = (f"{t['entries']} entries, {t['released']:,} released images; estimated sources {t['source_tb']:,.1f} TB, "
            f"output {t['output_tb']:,.1f} TB, conversion {t['cpu_hours_best']:,.0f}-{t['cpu_hours_worst']:,.0f} "
            f"CPU-hours")
    if with_state:
        counts = {s: sum(r.state == s for r in rows) for s in ("present", "partial", "missing")}
        text += "; " + ", ".join(f"{n} {s}" for s, n in counts.items())
    return text
