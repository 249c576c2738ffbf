"""`cpia convert`: catalog -> units -> full shards -> mini shards -> dataset card, resumable."""
from __future__ import annotations

import csv
import io
import logging
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..atomic import OutputError, write_atomic
from .catalog import CatalogEntry, subset_slug
from .coverage import Coverage, count_rows, coverage, coverage_markdown, unreadable_shards
from .executor import Executor, LocalExecutor
from .mini import (
    DEFAULT_MINI_FRACTION,
    MINI_SUBSETS,
    MiniJob,
    mini_cells,
    mix_group_of,
    pack_mini_subset,
    pack_mixed,
)
from .outlock import output_lock
from .results import Failure, Outcome, Skipped, StepFailure
from .shards import SHARD_BYTES, PackResult, ShardPlan, pack_key, plan_shards, remove_unplanned, write_planned_shard
from .errors import WorkerKilled
from .units import (
    UNIT_LAYOUT,
    ConvertOptions,
    Unit,
    UnitRecord,
    convert_unit,
    discover_units,
    merge_pieces,
    piece_of,
    printable,
    roi_files_to_convert,
    unit_paths,
)

CONFIGS = ("full", "mini")
MISSING_LIST = ".work/missing-sources.txt"  # source folders not found by the last run, one a line
FAILURE_LIST = ".work/failures.csv"  # what failed in the last run: kind, subset, file, reason; one record a line
logger = logging.getLogger(__name__)


@dataclass
class ConvertReport:
    units: int = 0
    skipped_units: int = 0
    rows: dict[str, dict[str, int]] = field(default_factory=dict)  # config -> folder -> rows
    failures: list[Failure] = field(default_factory=list)  # source files, with their subset
    step_failures: list[StepFailure] = field(default_factory=list)  # steps that failed as a whole
    missing: list[str] = field(default_factory=list)  # source folders not found
    skipped: list[Skipped] = field(default_factory=list)  # files that gave no row without an error, with their subset
    repaired: list[str] = field(default_factory=list)  # damaged published shards rebuilt, with the damage
    rebuilt_units: list[str] = field(default_factory=list)  # damaged unit files converted again, with the damage
    coverage: list[Coverage] = field(default_factory=list)  # built vs released, per subset (full only)
    empty: bool = False  # a packing run that built no row at all

    @property
    def ok(self) -> bool:
        return not self.failures and not self.step_failures and not self.empty


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
    shard and every unit file it reuses, not only of those whose time changed.
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
            written = _convert_units(executor, units, source_root, out_dir / ".work", options, verify_shards, progress,
                                     report)
            _pack(executor, entries, units, out_dir, configs, options, mini_fraction, verify_shards, written, progress,
                  report)
            if not verify_shards and unreadable_shards(out_dir / "data"):  # damage under an unchanged size and time
                _pack(executor, entries, units, out_dir, configs, options, mini_fraction, True, written, progress,
                      report)
        _write_failure_list(out_dir, report)
        report.empty = not any(n for rows in report.rows.values() for n in rows.values())
        if report.empty:  # nothing to publish: no card that declares no config
            return report
        if "full" in configs:
            report.coverage = coverage(count_rows(out_dir / "data" / "full"), entries, options.s_per_m)
        if card:
            from .card import write_dataset_card

            write_dataset_card(out_dir, entries, configs=configs, mini_fraction=mini_fraction, options=options)
        return report


def _write_failure_list(out_dir: Path, report: ConvertReport) -> None:
    """FAILURE_LIST for scripts and spreadsheets: every failed file and step of this run, each field escaped as
    the summary prints it (so a name with a newline stays one record on one line); removed when nothing failed."""
    path = out_dir / FAILURE_LIST
    if not (report.failures or report.step_failures):
        path.unlink(missing_ok=True)
        return
    text = io.StringIO()
    table = csv.writer(text, lineterminator="\n")
    table.writerow(["kind", "subset", "file", "reason"])
    table.writerows(["file", f.subset or "", printable(f.file), printable(f.reason)] for f in report.failures)
    table.writerows(["step", "", "", step.line()] for step in report.step_failures)
    write_atomic(path, text.getvalue().encode())


def _discover(entries: list[CatalogEntry], source_root: Path, out_dir: Path, report: ConvertReport) -> list[Unit]:
    """The units of all entries; missing source folders and non-files go into the report."""
    units: list[Unit] = []
    outputs: dict[Path, int] = {}  # cpia output folders found inside source folders -> files matched there
    for entry in entries:
        skipped: list[Skipped] = []
        try:
            units.extend(discover_units(entry, source_root, skipped=skipped, out_dir=out_dir, outputs_found=outputs))
        except FileNotFoundError as error:
            report.missing.append(str(error))
        report.skipped.extend(s.of_subset(entry.name) for s in skipped)
    report.skipped.extend(_output_folder_note(folder, n) for folder, n in sorted(outputs.items()))
    if report.missing:
        write_atomic(out_dir / MISSING_LIST, ("\n".join(report.missing) + "\n").encode())
    else:
        (out_dir / MISSING_LIST).unlink(missing_ok=True)
    report.units = len(units)
    return units


def _output_folder_note(folder: Path, files: int) -> Skipped:
    return Skipped(str(folder), f"a cpia output folder inside the sources: its {files} matching file(s) are not read "
                   "as sources", subset="sources")


def _convert_units(
    executor: Executor, units: list[Unit], source_root: Path, work_dir: Path, options: ConvertOptions, verify: bool,
    progress: bool, report: ConvertReport,
) -> frozenset[Path]:
    """Convert (or reuse) every unit; failures and skipped files go into the report. Returns the unit files this
    run wrote (hashed as they were written, so packing need not hash them again)."""
    outcomes = executor.map(convert_unit, [(u, source_root, work_dir, options, verify) for u in units],
                            "convert units", progress)
    _stop_on_output_error(outcomes)
    outcomes = _isolate_killers(executor, units, outcomes, source_root, work_dir, options, verify, progress)
    written = set()
    for unit, outcome in zip(units, outcomes):
        subset = unit.entry.name
        if not outcome.ok:
            report.failures.append(Failure(_unit_name(unit), outcome.reason(), subset))
            continue
        result = outcome.value
        if not result.skipped:
            written.add(unit_paths(work_dir, unit)[0])
        report.skipped_units += result.skipped
        if result.rebuilt:
            report.rebuilt_units.append(result.rebuilt)
        report.failures.extend(f.of_subset(subset) for f in result.failures)
        report.skipped.extend(f.of_subset(subset) for f in result.skipped_files)
    return frozenset(written)


@dataclass
class _KillerSearch:
    """The search for the files of an ROI chunk that kill their worker: pieces converted, killers found, pieces
    still to try."""

    unit: Unit
    pieces: list[Unit] = field(default_factory=list)
    killers: list[Failure] = field(default_factory=list)
    todo: list[tuple[str, ...]] = field(default_factory=list)

    def settle(self, files: tuple[str, ...], outcome: Outcome) -> None:
        """Take what converting `files` together gave: a piece, halves to try when several killed their worker,
        or a failure of each."""
        if outcome.ok:
            self.pieces.append(piece_of(self.unit, files))
        elif isinstance(outcome.error, WorkerKilled) and len(files) > 1:
            self.todo.extend((files[: len(files) // 2], files[len(files) // 2 :]))
        else:
            self.killers.extend(Failure(file, outcome.reason()) for file in files)

    def take(self) -> list[tuple[str, ...]]:
        todo, self.todo = self.todo, []
        return todo


def _isolate_killers(
    executor: Executor, units: list[Unit], outcomes: list[Outcome], source_root: Path, work_dir: Path,
    options: ConvertOptions, verify: bool, progress: bool,
) -> list[Outcome]:
    """The outcomes, with those of the ROI chunks whose worker died replaced: such a chunk's files are converted
    again in halves, a half whose worker dies again in halves of its own, until each death is one file's; the
    chunk's unit file is then merged from its pieces, the files that killed a worker listed as its failures."""
    searches = {k: _KillerSearch(unit) for k, (unit, outcome) in enumerate(zip(units, outcomes))
                if unit.entry.kind == "roi" and isinstance(outcome.error, WorkerKilled)}
    if not searches:
        return outcomes
    for k, search in searches.items():
        search.settle(roi_files_to_convert(search.unit, source_root, work_dir, options, verify), outcomes[k])
    while any(search.todo for search in searches.values()):
        tries = [(search, files) for search in searches.values() for files in search.take()]
        results = executor.map(convert_unit, [(piece_of(search.unit, files), source_root, work_dir, options)
                                              for search, files in tries], "isolate killer files", progress)
        _stop_on_output_error(results)
        for (search, files), outcome in zip(tries, results):
            search.settle(files, outcome)
    merged = executor.map(merge_pieces, [(s.unit, tuple(s.pieces), tuple(s.killers), source_root, work_dir, options,
                                          verify) for s in searches.values()], "merge pieces", progress)
    _stop_on_output_error(merged)
    outcomes = list(outcomes)
    for k, outcome in zip(searches, merged):
        outcomes[k] = outcome
    return outcomes


def _pack(
    executor: Executor, entries: list[CatalogEntry], units: list[Unit], out_dir: Path, configs: tuple[str, ...],
    options: ConvertOptions, mini_fraction: float, verify: bool, written: frozenset[Path], progress: bool,
    report: ConvertReport,
) -> None:
    """Pack the converted units of every entry into the shards of each config (`written`: the unit files this run
    wrote, see `units.require_intact`)."""
    work_dir = out_dir / ".work"
    done = {e.name: _unit_files(work_dir, [u for u in units if u.entry is e]) for e in entries}
    if "full" in configs:
        report.rows["full"] = _pack_full(executor, entries, done, out_dir / "data" / "full", work_dir / "pack" / "full",
                                         verify, written, progress, report)
    if "mini" in configs:
        quota = mini_cells(entries, {name: files for name, (files, _) in done.items()}, mini_fraction)
        jobs = [_mini_job(e, *done[e.name], quota.get(e.name), options, work_dir, verify, written) for e in entries]
        report.rows["mini"] = _sum_rows(executor.map(pack_mini_subset, [(job,) for job in jobs], "pack mini", progress),
                                        report)
        _mix_mini(entries, out_dir, work_dir, jobs, options.seed, verify, report)


def _pack_full(executor: Executor, entries: list[CatalogEntry], done: dict[str, tuple[list[Path], list[UnitRecord]]],
               config_dir: Path, record_dir: Path, verify: bool, written: frozenset[Path], progress: bool,
               report: ConvertReport) -> dict[str, int]:
    """Plan every subset's shards (a job per subset, reading only the unit files' image sizes), write each shard as
    a job of its own, then remove the shards no longer planned."""
    slugs = [subset_slug(e.name) for e in entries]
    plan_jobs = [(files, [r.fingerprint for r in records], slug)
                 for (files, records), slug in zip((done[e.name] for e in entries), slugs)]
    planned = executor.map(plan_shards, plan_jobs, "plan full", progress)
    _stop_on_output_error(planned)
    for entry, outcome in zip(entries, planned):
        if not outcome.ok:
            report.step_failures.append(StepFailure(f"[{entry.name}] planning shards", outcome.reason()))
    plans: list[ShardPlan] = [plan for outcome in planned if outcome.ok for plan in outcome.value]
    jobs = [(plan, config_dir, record_dir, verify, written & plan.unit_files()) for plan in plans]
    rows = _sum_rows(executor.map(write_planned_shard, jobs,
                                  "pack full", progress), report)
    for slug, outcome in zip(slugs, planned):
        if outcome.ok:
            remove_unplanned(config_dir, record_dir, outcome.value, slug)
    return rows


def _mini_job(entry: CatalogEntry, files: list[Path], records: list[UnitRecord], cells: int | None,
              options: ConvertOptions, work_dir: Path, verify: bool, written: frozenset[Path]) -> MiniJob:
    key = pack_key(pack_key("mini", [r.content() for r in records]), cells)
    return MiniJob(entry, tuple(files), key, cells, options, work_dir, verify, written.intersection(files))


def _executor(workers: int, scheduler: str | None) -> Executor:
    """The local executor, or the Dask one when a scheduler is named."""
    if scheduler is None:
        return LocalExecutor(workers)
    from .cluster import DaskExecutor

    return DaskExecutor(scheduler)


def _unit_name(unit: Unit) -> str:
    """A slide's (main) file, or the range of an ROI chunk."""
    if unit.entry.kind == "wsi" or len(unit.files) == 1:
        return unit.files[0]
    return f"{unit.files[0]} .. {unit.files[-1]} ({len(unit.files)} files)"


def _unit_files(work_dir: Path, units: list[Unit]) -> tuple[list[Path], list[UnitRecord]]:
    """Existing unit parquet files sorted by unit id, with their records (what the packs depend on)."""
    files, records = [], []
    for unit in sorted(units, key=lambda u: u.unit_id):
        parquet_path, record_path = unit_paths(work_dir, unit)
        record = UnitRecord.read(record_path)
        if record is not None and record.layout == UNIT_LAYOUT and parquet_path.exists():  # not an older version's
            files.append(parquet_path)
            records.append(record)
    return files, records


def _stop_on_output_error(outcomes: list[Outcome]) -> None:
    """An output that cannot be written (disk full, read-only folder) stops the run: raise the first one."""
    error = next((o.error for o in outcomes if isinstance(o.error, OutputError)), None)
    if error is not None:
        raise error


def _mix_mini(entries: list[CatalogEntry], out_dir: Path, work_dir: Path, jobs: list[MiniJob], seed: int,
              verify: bool, report: ConvertReport) -> None:
    """Mix the per-subset mini shards into data/mini (see cpia_hf.dataset.mini.pack_mixed)."""
    groups: dict[str, list[Path]] = {}
    for entry in entries:
        files = sorted((work_dir / MINI_SUBSETS).glob(f"*/{subset_slug(entry.name)}/*.parquet"))
        groups.setdefault(mix_group_of(entry), []).extend(files)
    if not any(groups.values()):  # nothing to mix (an empty build is reported as such)
        return
    key = pack_key("mini-mixed", seed, [job.key for job in jobs], {g: [p.name for p in f] for g, f in groups.items()})
    try:
        _, damage = pack_mixed(groups, out_dir / "data" / "mini", work_dir, seed, key, SHARD_BYTES, verify=verify)
        report.repaired.extend(damage)
    except OutputError:  # disk full, read-only output: the run stops with one line
        raise
    except OSError as error:  # the mix reads and writes only this run's outputs
        raise OutputError.of(out_dir / "data" / "mini", error) from error
    except Exception as error:  # reported like any packing failure; the per-subset shards stay for a rerun
        logger.exception("mixing mini failed")
        report.step_failures.append(StepFailure("mixing mini", repr(error)))


def _sum_rows(outcomes: list[Outcome[PackResult]], report: ConvertReport) -> dict[str, int]:
    _stop_on_output_error(outcomes)
    total: dict[str, int] = {}
    for outcome in outcomes:
        if not outcome.ok:
            report.step_failures.append(StepFailure("packing", outcome.reason()))
            continue
        result = outcome.value
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
        print(f"skipped: {skipped.line()}")
    for damage in report.rebuilt_units:
        print(f"rebuilt damaged unit file {printable(damage)}")
    for damage in report.repaired:
        print(f"rebuilt damaged shard {printable(damage)}")
    if report.coverage:
        print("coverage of the release (built / released):")
        print(coverage_markdown(report.coverage), end="")
    if report.failures:
        print(f"FAILED: {len(report.failures)} file(s) could not be converted (the rest was; listed in "
              f"{out_dir / FAILURE_LIST}):", file=sys.stderr)
        for failure in report.failures:
            print(f"  {failure.line()}", file=sys.stderr)
    for line, jobs in Counter(step.line() for step in report.step_failures).items():  # one line per cause
        print(f"FAILED: {line}{f' ({jobs} jobs)' if jobs > 1 else ''}", file=sys.stderr)
    if report.failures or report.step_failures:
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
