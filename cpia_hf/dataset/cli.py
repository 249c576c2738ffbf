"""`cpia sources`, `cpia convert` and `cpia push`: find the sources, build a CPIA dataset folder, upload it."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..atomic import OutputError
from ..schema import arrow_without_pandas
from .catalog import CatalogError, default_catalog_path, load_catalog
from .errors import ClusterError
from .convert import convert, print_report, select_entries
from .mini import DEFAULT_MINI_FRACTION
from .tissue import RULES
from .units import ConvertOptions, printable


def configure_convert(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--catalog", type=Path, default=None, help="catalog YAML (default: the release catalog)")
    parser.add_argument("--source-root", type=Path, required=True, help="folder holding the source datasets")
    parser.add_argument("--out", type=Path, required=True, help="dataset folder to write (Hub layout)")
    parser.add_argument("--configs", default="full,mini", help="comma-separated: full, mini (default: %(default)s)")
    parser.add_argument("--subsets", default=None, help="comma-separated catalog names to convert (default: all)")
    parser.add_argument("--workers", type=int, default=1,
                        help="local worker processes, one unit (a slide, or a batch of ROIs) each (default: %(default)s)")
    parser.add_argument("--scheduler", default=None, metavar="tcp://HOST:8786|auto",
                        help="run units and packing on this Dask cluster (auto: $DASK_SCHEDULER_ADDRESS) instead of "
                             "local processes; --source-root and --out must be shared by all workers "
                             "(see docs/cluster.md; memory per worker: dask worker --memory-limit; default: local "
                             "processes)")
    parser.add_argument("--jpeg-quality", type=int, default=ConvertOptions.jpeg_quality,
                        help="JPEG quality (1-100) of the stored tiles and ROIs (default: %(default)s)")
    parser.add_argument("--tissue-rule", choices=RULES, default=ConvertOptions.tissue_rule,
                        help="mask: keep each tile with enough tissue in a thumbnail mask; release: keep XL cells "
                             "by mean colour, as the released processing did (default: %(default)s)")
    parser.add_argument("--min-tissue-fraction", type=float, default=ConvertOptions.min_tissue_fraction,
                        help="mask rule: keep a tile when this fraction of it is tissue (default: %(default)s)")
    parser.add_argument("--s-per-m", type=int, default=ConvertOptions.s_per_m, choices=(1, 16),
                        help="S crops kept per M tile; the release keeps 1 (default: %(default)s)")
    parser.add_argument("--mini-fraction", type=float, default=DEFAULT_MINI_FRACTION,
                        help="share of WSI grid cells taken into mini (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=ConvertOptions.seed,
                        help="seed of every random choice: S crops, the mini selection and its shuffle, the card's "
                             "gallery (default: %(default)s)")
    parser.add_argument("--roi-memory-gb", type=float, default=ConvertOptions.roi_memory_gb, metavar="GB",
                        help="memory a worker may spend decoding one ROI image, checked from its header before "
                             "decoding; a larger image is refused and named (default: %(default)s)")
    parser.add_argument("--verify-shards", action="store_true",
                        help="check the SHA-256 of every published shard and reused unit file (default: of those "
                             "whose time changed)")
    parser.add_argument("--no-progress", action="store_true", help="show no progress bars (default: shown)")


def options_from_args(args: argparse.Namespace) -> ConvertOptions:
    if not 1 <= args.jpeg_quality <= 100:
        raise SystemExit(f"--jpeg-quality must be within 1..100, got {args.jpeg_quality}")
    return ConvertOptions(
        jpeg_quality=args.jpeg_quality,
        tissue_rule=args.tissue_rule,
        min_tissue_fraction=args.min_tissue_fraction,
        s_per_m=args.s_per_m,
        seed=args.seed,
        roi_memory_gb=args.roi_memory_gb,
    )


def run_convert(args: argparse.Namespace) -> int:
    try:
        entries = load_catalog(args.catalog or default_catalog_path())
    except CatalogError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not args.source_root.is_dir():
        print(f"error: source root {args.source_root} is not a folder", file=sys.stderr)
        return 2
    if args.scheduler is None:  # local workers are forks of this process, which only converts
        arrow_without_pandas()
    try:
        report = convert(
            select_entries(entries, args.subsets),
            args.source_root,
            args.out,
            configs=[c.strip() for c in args.configs.split(",") if c.strip()],
            workers=args.workers,
            options=options_from_args(args),
            mini_fraction=args.mini_fraction,
            progress=not args.no_progress,
            scheduler=args.scheduler,
            verify_shards=args.verify_shards,
        )
    except ClusterError as error:
        print(f"error: {printable(str(error))}", file=sys.stderr)
        return 2
    except OutputError as error:  # disk full, read-only output, a locked folder: one line, nothing left behind
        print(f"cpia convert: error: {printable(str(error))}", file=sys.stderr)
        return 2
    return print_report(report, args.out, verbose=getattr(args, "verbose", False))


def configure_sources(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--catalog", type=Path, default=None, help="catalog YAML (default: the release catalog)")
    parser.add_argument("--source-root", type=Path, default=None,
                        help="folder holding the source datasets: report each entry present, partial or missing "
                             "(default: no presence check)")
    parser.add_argument("--format", choices=("table", "md", "csv"), default="table",
                        help="output: aligned table, Markdown, or CSV with every column incl. the licence evidence "
                             "(default: %(default)s)")
    parser.add_argument("--subsets", default=None, help="comma-separated catalog names (default: all)")


def run_sources(args: argparse.Namespace) -> int:
    from .sources import render, survey

    try:
        entries = select_entries(load_catalog(args.catalog or default_catalog_path()), args.subsets)
    except CatalogError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.source_root is not None and not args.source_root.is_dir():
        print(f"error: source root {args.source_root} is not a folder", file=sys.stderr)
        return 2
    rows = survey(entries, args.source_root)
    sys.stdout.write(render(rows, args.format, with_state=args.source_root is not None))
    return 0


def configure_push(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", type=Path, required=True, help="built dataset folder (cpia convert / cpia demo)")
    parser.add_argument("--repo-id", required=True, help="Hub dataset repo, e.g. user/CPIA")
    parser.add_argument("--public", action="store_true", help="make a new repo public (default: private)")
    parser.add_argument("--include-restricted", default="",
                        help="comma-separated subsets to push although their licence is unknown, conflicting or does not "
                             "allow redistribution (you must hold the right to publish them)")
    parser.add_argument("--accept-second-hand", default="", metavar="NAME,...",
                        help="comma-separated subsets to push although their licence is known only second-hand (a "
                             "mirror or third-party catalogue; see cpia sources and docs/sources.md): you confirmed "
                             "it, and the card records that you did")
    parser.add_argument("--catalog", type=Path, default=None,
                        help="catalog YAML the folder was built with: licence evidence and homepages "
                             "(default: the release catalog)")
    parser.add_argument("--endpoint", help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")


def run_push(args: argparse.Namespace) -> int:
    """Check the licences of the folder's subsets, upload the folder with the card rendered for the repo id.

    Resumable: a rerun after an interruption skips what earlier runs committed (see cpia_hf.hub)."""
    from ..hub import DATASET_IGNORE_PATTERNS, HubError, push_folder  # the Hub client only where it is used
    from .card import card_for_repo, subset_licences
    from .licences import LicenceRefused, clear_for_push

    licences = subset_licences(args.repo)
    if not licences:
        raise ValueError(f"{args.repo}: no shards under data/; build it with `cpia convert` first")
    entries = load_catalog(args.catalog or default_catalog_path())
    try:
        # absent from a namespace built by another caller: no acknowledgement, the safe reading
        accepted = getattr(args, "accept_second_hand", "")
        clearance = clear_for_push(args.repo, licences, entries, args.include_restricted, accepted)
    except LicenceRefused as refusal:
        print(refusal, file=sys.stderr)
        return 2
    named = set(clearance.included_restricted)
    homepages = {e.name: e.homepage for e in entries}
    try:
        result = push_folder(args.repo, args.repo_id, repo_type="dataset", private=not args.public,
                             commit_message=f"Upload {args.repo.name} with cpia-hf",
                             ignore_patterns=DATASET_IGNORE_PATTERNS, endpoint=args.endpoint,
                             replacements=card_for_repo(args.repo, args.repo_id, licences, homepages, clearance),
                             resumable=True)
    except HubError as error:
        print(f"cpia push: error: {error}", file=sys.stderr)
        return 2
    resumed = f", {len(result.skipped)} already there from an earlier push" if result.skipped else ""
    print(f"pushed {args.repo} to {result.url} ({'public' if args.public else 'private'}; "
          f"{len(licences)} subsets{', incl. restricted ' + ', '.join(sorted(named)) if named else ''}; "
          f"{len(result.sent)} files in {result.commits} commits{resumed})")
    return 0
