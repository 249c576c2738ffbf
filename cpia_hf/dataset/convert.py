"""`cpia convert`: catalog -> units -> full shards -> mini shards -> dataset card, resumable."""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..atomic import OutputError, write_atomic
from .catalog import CatalogEntry, subset_slug
from .coverage import Coverage, count_rows, coverage, coverage_markdown, unreadable_shards
from .executor import LocalExecutor as _Executor  # the local executor; cluster runs use another with its interface
from .executor import WorkerKilled
from .mini import (
    DEFAULT_MINI_FRACTION,
    mini_cells,
    mix_group_of,
    pack_mixed,
    read_tile_index,
    roi_transform,
    select_wsi_tiles,
    wsi_transform,
)
from .outlock import output_lock
from .shards import (
    SHARD_BYTES,
    PackResult,
    ShardPlan,
    pack_key,
    pack_subset,
    plan_shards,
    remove_unplanned,
    write_planned_shard,
)
from .units import (
    UNIT_LAYOUT,
    ConvertOptions,
    Unit,
    UnitResult,
    convert_unit,
    discover_units,
    printable,
    read_record,
    unit_paths,
)

CONFIGS = ("full", "mini")
MINI_SUBSETS = "mini-subsets"  # per-subset mini shards under .work, mixed into data/mini
MISSING_LIST = ".work/missing-sources.txt"  # source folders not found by the last run, one a line
logger = logging.getLogger(__name__)


@dataclass
class ConvertReport:
    units: int = 0
    skipped_units: int = 0
    rows: dict[str, dict[str, int]] = field(default_factory=dict)  # config -> folder -> rows
    failures: list[dict] = field(default_factory=list)  # subset, file, reason
    missing: list[str] = field(default_factory=list)  # source folders not found
    skipped: list[dict] = field(default_factory=list)  # subset, file, reason: files that gave no row, no error
    repaired: list[str] = field(default_factory=list)  # damaged published shards rebuilt, with the damage
    coverage: list[Coverage] = field(default_factory=list)  # built vs released, per subset (full only)
    empty: bool = False  # a packing run that built no row at all

    @property
    def ok(self) -> bool:
        return not self.failures and not self.empty


def convert(
    entries: list[CatalogEntry],
    source_root: Path,
    out_dir: Path,
    *,
    configs: Iterable[str] = CONFIGS,
    workers: int = 1,
    options: ConvertOptions = ConvertOptions(),
    mini_fraction: float = DEFAULT_MINI_FRACTION,
    card: bool = True,
    progress: bool = True,
    scheduler: str | None = None,
    verify_shards: bool = False,
) -> ConvertReport:
    """Build (or resume) a CPIA dataset folder in `out_dir` from the sources of `entries`.

    `scheduler` (a Dask scheduler address, or "auto" for DASK_SCHEDULER_ADDRESS) runs the units and
    the packing as tasks of that Dask cluster instead of `workers` local processes (see cluster.py);
    `source_root` and `out_dir` must then be paths every worker sees. A run holds the folder's lock
    (`OutputLocked` when another run has it). `verify_shards` checks the SHA-256 of every published
    shard, not only of those whose size or time changed.
    """
    configs = tuple(configs)
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        raise ValueError(f"unknown config(s) {sorted(unknown)}; choose from {CONFIGS}")
    source_root, out_dir = source_root.absolute(), out_dir.absolute()  # tasks may run in another folder
    with output_lock(out_dir):
        report = ConvertReport()
        units = _discover(entries, source_root, out_dir, report)
        with _executor(workers, scheduler) as executor:
            _convert_units(executor, units, source_root, out_dir / ".work", options, progress, report)
            _pack(executor, entries, units, out_dir, configs, options, mini_fraction, verify_shards, progress, report)
            if not verify_shards and unreadable_shards(out_dir / "data"):  # damage under an unchanged size and time
                _pack(executor, entries, units, out_dir, configs, options, mini_fraction, True, progress, report)
        report.empty = not any(n for rows in report.rows.values() for n in rows.values())
        if report.empty:  # nothing to publish: no card that declares no config
            return report
        if "full" in configs:
            report.coverage = coverage(count_rows(out_dir / "data" / "full"), entries, options.s_per_m)
        if card:
            from .card import write_dataset_card

            write_dataset_card(out_dir, entries, configs=configs, mini_fraction=mini_fraction, options=options)
        return report


def _discover(entries: list[CatalogEntry], source_root: Path, out_dir: Path, report: ConvertReport) -> list[Unit]:
    """The units of all entries; missing source folders and non-files go into the report."""
    units: list[Unit] = []
    outputs: dict[Path, int] = {}  # cpia output folders found inside source folders -> files matched there
    for entry in entries:
        skipped: list[dict] = []
        try:
            units.extend(discover_units(entry, source_root, skipped=skipped, out_dir=out_dir, outputs_found=outputs))
        except FileNotFoundError as error:
            report.missing.append(str(error))
        report.skipped.extend({"subset": entry.name, **s} for s in skipped)
    report.skipped.extend(_output_folder_note(folder, n) for folder, n in sorted(outputs.items()))
    if report.missing:
        write_atomic(out_dir / MISSING_LIST, ("\n".join(report.missing) + "\n").encode())
    else:
        (out_dir / MISSING_LIST).unlink(missing_ok=True)
    report.units = len(units)
    return units


def _output_folder_note(folder: Path, files: int) -> dict:
    return {"subset": "sources", "file": str(folder),
            "reason": f"a cpia output folder inside the sources: its {files} matching file(s) are not read as sources"}


def _convert_units(
    executor, units: list[Unit], source_root: Path, work_dir: Path, options: ConvertOptions, progress: bool,
    report: ConvertReport,
) -> None:
    results = executor.map(convert_unit, [(u, source_root, work_dir, options) for u in units], "convert units", progress)
    _stop_on_output_error(results)
    for unit, result in zip(units, results):
        if isinstance(result, BaseException):
            result = UnitResult(unit.key, 0, [{"file": _unit_name(unit), "reason": _reason(result)}])
        report.skipped_units += result.skipped
        report.failures.extend({"subset": unit.entry.name, **f} for f in result.failures)
        report.skipped.extend({"subset": unit.entry.name, **f} for f in result.skipped_files)


def _pack(
    executor, entries: list[CatalogEntry], units: list[Unit], out_dir: Path, configs: tuple[str, ...],
    options: ConvertOptions, mini_fraction: float, verify: bool, progress: bool, report: ConvertReport,
) -> None:
    """Pack the converted units of every entry into the shards of each config."""
    work_dir = out_dir / ".work"
    done = {e.name: _unit_files(work_dir, [u for u in units if u.entry is e]) for e in entries}
    if "full" in configs:
        report.rows["full"] = _pack_full(executor, entries, done, out_dir / "data" / "full", work_dir / "pack" / "full",
                                         verify, progress, report)
    if "mini" in configs:
        quota = mini_cells(entries, {name: files for name, (files, _) in done.items()}, mini_fraction)
        jobs = [
            (files, work_dir / MINI_SUBSETS, e, work_dir, pack_key(key, quota.get(e.name)), quota.get(e.name),
             options, verify)
            for e, (files, key) in _mini_keys(entries, done)
        ]
        report.rows["mini"] = _sum_rows(executor.map(_pack_mini_job, jobs, "pack mini", progress), report)
        _mix_mini(entries, out_dir, work_dir, jobs, options.seed, verify, report)


def _pack_full(executor, entries: list[CatalogEntry], done: dict, config_dir: Path, record_dir: Path, verify: bool,
               progress: bool, report: ConvertReport) -> dict[str, int]:
    """Plan every subset's shards (a job per subset, reading only the unit files' image sizes), write each shard as
    a job of its own, then remove the shards no longer planned."""
    slugs = [subset_slug(e.name) for e in entries]
    plan_jobs = [(files, [r["fingerprint"] for r in records], slug)
                 for (files, records), slug in zip((done[e.name] for e in entries), slugs)]
    planned = executor.map(plan_shards, plan_jobs, "plan full", progress)
    _stop_on_output_error(planned)
    for entry, result in zip(entries, planned):
        if isinstance(result, BaseException):
            report.failures.append({"subset": entry.name, "file": "", "reason": f"planning shards failed: {_reason(result)}"})
    plans: list[ShardPlan] = [p for result in planned if not isinstance(result, BaseException) for p in result]
    rows = _sum_rows(executor.map(write_planned_shard, [(p, config_dir, record_dir, verify) for p in plans],
                                  "pack full", progress), report)
    for slug, result in zip(slugs, planned):
        if not isinstance(result, BaseException):
            remove_unplanned(config_dir, record_dir, result, slug)
    return rows


def _executor(workers: int, scheduler: str | None):
    """The local executor, or the Dask one when a scheduler is named (same `map` interface)."""
    if scheduler is None:
        return _Executor(workers)
    from .cluster import DaskExecutor

    return DaskExecutor(scheduler)


def _unit_name(unit: Unit) -> str:
    """A slide's (main) file, or the range of an ROI chunk."""
    if unit.entry.kind == "wsi" or len(unit.files) == 1:
        return unit.files[0]
    return f"{unit.files[0]} .. {unit.files[-1]} ({len(unit.files)} files)"


def _reason(error: BaseException) -> str:
    return str(error) if isinstance(error, WorkerKilled) else repr(error)


def _unit_files(work_dir: Path, units: list[Unit]) -> tuple[list[Path], list[dict]]:
    """Existing unit parquet files sorted by unit id, with their records (what the packs depend on)."""
    files, records = [], []
    for unit in sorted(units, key=lambda u: u.unit_id):
        parquet_path, record_path = unit_paths(work_dir, unit)
        record = read_record(record_path)
        if record and record.get("layout") == UNIT_LAYOUT and parquet_path.exists():  # not an older version's file
            files.append(parquet_path)
            records.append(record)
    return files, records


def _mini_keys(entries: list[CatalogEntry], done: dict):
    for entry in entries:
        files, records = done[entry.name]
        yield entry, (files, pack_key("mini", records))


def _pack_mini_job(
    files: list[Path],
    mini_subsets_dir: Path,
    entry: CatalogEntry,
    work_dir: Path,
    key: str,
    mini_cell_count: int | None,
    options: ConvertOptions,
    verify: bool = False,
) -> PackResult:
    """One subset's mini shards (its selected cells or train ROIs, resized) under .work/mini-subsets, mixed across
    subsets afterwards; top-level so that it can run in a worker process."""
    if entry.kind == "wsi":
        selected = select_wsi_tiles(read_tile_index(files), entry.name, mini_cell_count or 0, options.seed)
        transform = wsi_transform(selected, options.jpeg_quality)
    else:
        transform = roi_transform(entry, options.jpeg_quality)
    slug = subset_slug(entry.name)
    return pack_subset(files, mini_subsets_dir, slug, work_dir / "pack" / MINI_SUBSETS, key, transform, verify)


def _stop_on_output_error(results: list) -> None:
    """An output that cannot be written (disk full, read-only folder) stops the run: raise the first one."""
    error = next((r for r in results if isinstance(r, OutputError)), None)
    if error is not None:
        raise error


def _mix_mini(entries: list[CatalogEntry], out_dir: Path, work_dir: Path, jobs: list, seed: int, verify: bool,
              report: ConvertReport) -> None:
    """Mix the per-subset mini shards into data/mini (see cpia_hf.dataset.mini.pack_mixed)."""
    groups: dict[str, list[Path]] = {}
    for entry in entries:
        files = sorted((work_dir / MINI_SUBSETS).glob(f"*/{subset_slug(entry.name)}/*.parquet"))
        groups.setdefault(mix_group_of(entry), []).extend(files)
    if not any(groups.values()):  # nothing to mix (an empty build is reported as such)
        return
    key = pack_key("mini-mixed", seed, [job[4] for job in jobs], {g: [p.name for p in f] for g, f in groups.items()})
    try:
        pack_mixed(groups, out_dir / "data" / "mini", work_dir, seed, key, SHARD_BYTES, verify=verify,
                   damaged=report.repaired)
    except OutputError:  # disk full, read-only output: the run stops with one line
        raise
    except OSError as error:  # the mix reads and writes only this run's outputs
        raise OutputError.of(out_dir / "data" / "mini", error) from error
    except Exception as error:  # reported like any packing failure; the per-subset shards stay for a rerun
        logger.exception("mixing mini failed")
        report.failures.append({"subset": "", "file": "", "reason": f"mixing mini failed: {error!r}"})


def _sum_rows(results: list, report: ConvertReport) -> dict[str, int]:
    _stop_on_output_error(results)
    total: dict[str, int] = {}
    for result in results:
        if isinstance(result, BaseException):
            report.failures.append({"subset": "", "file": "", "reason": f"packing failed: {_reason(result)}"})
            continue
        report.repaired.extend(result.repaired)
        for folder, n in result.rows.items():
            total[folder] = total.get(folder, 0) + n
    return total


def select_entries(entries: list[CatalogEntry], subsets: str | None) -> list[CatalogEntry]:
    if not subsets:
        return entries
    wanted = [s.strip() for s in subsets.split(",") if s.strip()]
    names = {e.name for e in entries}
    unknown = [s for s in wanted if s not in names]
    if unknown:
        raise SystemExit(f"unknown subset(s) {unknown}; see the catalog for names")
    return [e for e in entries if e.name in wanted]


def print_report(report: ConvertReport, out_dir: Path, verbose: bool = False) -> int:
    """Summary for the terminal; the exit status is 1 when any file failed or no row was built."""
    for config, rows in report.rows.items():
        print(f"{config}: " + (", ".join(f"{folder} {n} rows" for folder, n in sorted(rows.items())) or "no rows"))
    print(f"units: {report.units} ({report.skipped_units} already done)")
    _print_missing([printable(line) for line in report.missing], out_dir, verbose)
    for skipped in report.skipped:
        print(f"skipped: [{skipped['subset']}] {printable(skipped['file'])}: {printable(skipped['reason'])}")
    for damage in report.repaired:
        print(f"rebuilt damaged shard {printable(damage)}")
    if report.coverage:
        print("coverage of the release (built / released):")
        print(coverage_markdown(report.coverage), end="")
    if report.failures:
        print(f"FAILED: {len(report.failures)} file(s) could not be converted (the rest was):", file=sys.stderr)
        for failure in report.failures:
            print(f"  [{failure['subset']}] {printable(failure['file'])}: {printable(failure['reason'])}",
                  file=sys.stderr)
        return 1
    if report.empty:
        print(f"error: no rows were built from the sources (see above); no dataset card written to {out_dir}",
              file=sys.stderr)
        return 1
    print(f"dataset written to {out_dir}")
    return 0


def _print_missing(missing: list[str], out_dir: Path, verbose: bool, inline: int = 5) -> None:
    if len(missing) <= inline or verbose:
        for line in missing:
            print(f"skipped: {line}")
    else:
        print(f"skipped: {len(missing)} source folders not found, e.g. {missing[0]} "
              f"(all listed in {out_dir / MISSING_LIST}; -v prints them)")
