"""`cpia demo`: generate sample sources, convert them, pre-train, export and load back a tiny MAE."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..dataset.convert import print_report
from .demo import build_demo, demo_features, train_demo_model


def configure_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for sources, dataset and model")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--convert-only", action="store_true", help="stop after the dataset conversion")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (conversion, training, export, loading back)")


def run_demo(args: argparse.Namespace) -> int:
    report = build_demo(args.out, workers=args.workers, progress=not args.no_progress)
    status = print_report(report, args.out / "dataset")
    if status or args.convert_only:
        return status
    model_dir = train_demo_model(args.out / "dataset", args.out / "mae-tiny", progress=not args.no_progress)
    features = demo_features(model_dir, args.out / "dataset", progress=not args.no_progress)
    print(f"model exported to {model_dir}; AutoModel.from_pretrained features of 4 mini tiles: {tuple(features.shape)}")
    return 0
