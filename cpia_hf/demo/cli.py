"""`cpia demo`: generate sample sources, convert them, pre-train, export and load back a tiny MAE."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..dataset.convert import ConvertReport, print_report
from .demo import build_demo, demo_features, train_demo_model


def configure_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("demo_out"),
                        help="folder for sources, dataset and model (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2,
                        help="local worker processes for the conversion (default: %(default)s)")
    parser.add_argument("--convert-only", action="store_true", help="stop after the dataset conversion")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (conversion, training, export, loading back)")


def sample_data_note(report: ConvertReport) -> str | None:
    """What the coverage flags mean on the demo's generated data, when any subset is flagged."""
    flagged = sum(1 for row in report.coverage if row.flags)
    if not flagged:
        return None
    return (f"note: the coverage check flags {flagged} of {len(report.coverage)} demo subsets, as expected: the demo "
            "converts a few small generated slides and ROIs, so its counts and tiles per XL tile differ from the "
            "release's. On a real rebuild a flag points at a missing or partial source.")


def run_demo(args: argparse.Namespace) -> int:
    report = build_demo(args.out, workers=args.workers, progress=not args.no_progress)
    status = print_report(report, args.out / "dataset")
    note = sample_data_note(report)
    if note:
        print(note)
    if status or args.convert_only:
        return status
    model_dir = train_demo_model(args.out / "dataset", args.out / "mae-tiny", progress=not args.no_progress)
    features = demo_features(model_dir, args.out / "dataset", progress=not args.no_progress)
    print(f"model exported to {model_dir}; AutoModel.from_pretrained features of 4 mini tiles: {tuple(features.shape)}")
    return 0
