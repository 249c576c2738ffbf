"""`cpia convert`: catalog -> units -> full shards -> mini shards -> dataset card, resumable."""
from __future__ import annotations

import logging
import sys
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from tqdm.auto import tqdm

from .catalog import CatalogEntry, subset_slug
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
from .shards import SHARD_BYTES, pack_key, pack_subset
from .units import ConvertOptions, Unit, UnitResult, convert_unit, discover_units, read_record, unit_paths

CONFIGS = ("full", "mini")
MINI_SUBSETS = "mini-subsets"  # per-subset mini shards under .work, mixed into data/mini
logger = logging.getLogger(__name__)


@dataclass
class ConvertReport:
    units: int = 0
    skipped_units: int = 0
    rows: dict[str, dict[str, int]] = field(default_factory=dict)  # config -> folder -> rows
    failures: list[dict] = field(default_factory=list)  # subset, file, reason
    missing: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


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
) -> ConvertReport:
    """Build (or resume) a CPIA dataset folder in `out_dir` from the sources of `entries`.

    `scheduler` (a Dask scheduler address, or "auto" for DASK_SCHEDULER_ADDRESS) runs the units and
    the packing as tasks of that Dask cluster instead of `workers` local processes (see cluster.py);
    `source_root` and `out_dir` must then be paths every worker sees.
    """
    configs = tuple(configs)
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        raise ValueError(f"unknown config(s) {sorted(unknown)}; choose from {CONFIGS}")
    source_root, out_dir = source_root.absolute(), out_dir.absolute()  # tasks may run in another folder
    work_dir = out_dir / ".work"
    report = ConvertReport()
    units: list[Unit] = []
    for entry in entries:
        try:
            units.extend(discover_units(entry, source_root))
        except FileNotFoundError as error:
            report.missing.append(str(error))
            logger.warning("%s", error)
    report.units = len(units)
    with _executor(workers, scheduler) as executor:
        results = executor.map(
            convert_unit, [(u, source_root, work_dir, options) for u in units], "convert units", progress
        )
        for unit, result in zip(units, results):
            if isinstance(result, BaseException):
                result = UnitResult(unit.key, 0, [{"file": ",".join(unit.files[:1]), "reason": repr(result)}])
            report.skipped_units += result.skipped
            report.failures.extend({"subset": unit.entry.name, **f} for f in result.failures)
        done = {e.name: _unit_files(work_dir, [u for u in units if u.entry is e]) for e in entries}
        if "full" in configs:
            jobs = [
                (files, out_dir / "data" / "full", e, work_dir, key, None, options)
                for e, (files, key) in _keyed(entries, done, "full")
            ]
            report.rows["full"] = _sum_rows(executor.map(_pack_job, jobs, "pack full", progress), report)
        if "mini" in configs:
            quota = mini_cells(entries, {name: files for name, (files, _) in done.items()}, mini_fraction)
            jobs = [
                (files, work_dir / MINI_SUBSETS, e, work_dir, pack_key(key, quota.get(e.name)), quota.get(e.name), options)
                for e, (files, key) in _keyed(entries, done, "mini")
            ]
            report.rows["mini"] = _sum_rows(executor.map(_pack_job, jobs, "pack mini", progress), report)
            _mix_mini(entries, out_dir, work_dir, jobs, options.seed, report)
    if card:
        from .card import write_dataset_card

        write_dataset_card(out_dir, entries, configs=configs, mini_fraction=mini_fraction, options=options)
    return report


def _unit_files(work_dir: Path, units: list[Unit]) -> tuple[list[Path], list[str]]:
    """Existing unit parquet files sorted by unit id, with their fingerprints."""
    files, fingerprints = [], []
    for unit in sorted(units, key=lambda u: u.unit_id):
        parquet_path, record_path = unit_paths(work_dir, unit)
        record = read_record(record_path)
        if record and parquet_path.exists():
            files.append(parquet_path)
            fingerprints.append(record["fingerprint"])
    return files, fingerprints


def _keyed(entries: list[CatalogEntry], done: dict, config: str):
    for entry in entries:
        files, fingerprints = done[entry.name]
        yield entry, (files, pack_key(config, fingerprints))


def _pack_job(
    files: list[Path],
    config_dir: Path,
    entry: CatalogEntry,
    work_dir: Path,
    key: str,
    mini_cell_count: int | None,
    options: ConvertOptions,
) -> dict[str, int]:
    """One subset's packing; top-level so that it can run in a worker process."""
    config = config_dir.name
    transform = None
    if config == MINI_SUBSETS:
        if entry.kind == "wsi":
            selected = select_wsi_tiles(read_tile_index(files), entry.name, mini_cell_count or 0, options.seed)
            transform = wsi_transform(selected, options.jpeg_quality)
        else:
            transform = roi_transform(entry, options.jpeg_quality)
    return pack_subset(files, config_dir, subset_slug(entry.name), work_dir / "pack" / config, key, transform)


def _mix_mini(entries: list[CatalogEntry], out_dir: Path, work_dir: Path, jobs: list, seed: int,
              report: ConvertReport) -> None:
    """Mix the per-subset mini shards into data/mini (see cpia_hf.dataset.mini.pack_mixed)."""
    groups: dict[str, list[Path]] = {}
    for entry in entries:
        files = sorted((work_dir / MINI_SUBSETS).glob(f"*/{subset_slug(entry.name)}/*.parquet"))
        groups.setdefault(mix_group_of(entry), []).extend(files)
    key = pack_key("mini-mixed", seed, [job[4] for job in jobs], {g: [p.name for p in f] for g, f in groups.items()})
    try:
        pack_mixed(groups, out_dir / "data" / "mini", work_dir, seed, key, SHARD_BYTES)
    except Exception as error:  # reported like any packing failure; the per-subset shards stay for a rerun
        logger.exception("mixing mini failed")
        report.failures.append({"subset": "", "file": "", "reason": f"mixing mini failed: {error!r}"})


def _sum_rows(results: list, report: ConvertReport) -> dict[str, int]:
    total: dict[str, int] = {}
    for result in results:
        if isinstance(result, BaseException):
            report.failures.append({"subset": "", "file": "", "reason": f"packing failed: {result!r}"})
            continue
        for folder, n in result.items():
            total[folder] = total.get(folder, 0) + n
    return total


class _Executor:
    """Runs jobs in this process (workers <= 1) or a process pool, with a progress bar; errors are returned."""

    def __init__(self, workers: int):
        self.workers = workers
        self.pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> "_Executor":
        if self.workers > 1:
            self.pool = ProcessPoolExecutor(max_workers=self.workers)
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    def map(self, fn: Callable, arg_tuples: list[tuple], desc: str, progress: bool) -> list:
        bar = tqdm(total=len(arg_tuples), desc=desc, unit="unit", disable=not progress, file=sys.stderr)
        results: list = []
        if self.pool is None:
            for args in arg_tuples:
                results.append(_call(fn, args))
                bar.update()
        else:
            futures: list[Future] = [self.pool.submit(_call, fn, args) for args in arg_tuples]
            for future in futures:
                try:
                    results.append(future.result())
                except Exception as error:  # a worker killed (e.g. out of memory) breaks the pool
                    results.append(error)
                bar.update()
        bar.close()
        return results


def _executor(workers: int, scheduler: str | None):
    """The local executor, or the Dask one when a scheduler is named (same `map` interface)."""
    if scheduler is None:
        return _Executor(workers)
    from .cluster import DaskExecutor

    return DaskExecutor(scheduler)


def _call(fn: Callable, args: tuple):
    try:
        return fn(*args)
    except Exception as error:  # one unit's unexpected error must not stop the others
        logger.exception("%s failed", fn.__name__)
        return error


def select_entries(entries: list[CatalogEntry], subsets: str | None) -> list[CatalogEntry]:
    if not subsets:
        return entries
    wanted = [s.strip() for s in subsets.split(",") if s.strip()]
    names = {e.name for e in entries}
    unknown = [s for s in wanted if s not in names]
    if unknown:
        raise SystemExit(f"unknown subset(s) {unknown}; see the catalog for names")
    return [e for e in entries if e.name in wanted]


def print_report(report: ConvertReport, out_dir: Path) -> int:
    """Summary for the terminal; the exit status is 1 when any file failed."""
    for config, rows in report.rows.items():
        print(f"{config}: " + ", ".join(f"{folder} {n} rows" for folder, n in sorted(rows.items())))
    print(f"units: {report.units} ({report.skipped_units} already done)")
    for missing in report.missing:
        print(f"skipped: {missing}")
    if report.failures:
        print(f"FAILED: {len(report.failures)} file(s) could not be converted (the rest was):", file=sys.stderr)
        for failure in report.failures:
            print(f"  [{failure['subset']}] {failure['file']}: {failure['reason']}", file=sys.stderr)
        return 1
    print(f"dataset written to {out_dir}")
    return 0
