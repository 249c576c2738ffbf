"""Regenerate the dataset card (README.md and assets/) of a built CPIA folder from its shards.

    python loading_script/generate_card.py --repo /data/cpia [--catalog conversion/catalog.yaml]

`cpia convert` writes the card at the end of every build; this script rewrites it alone, e.g. after
editing `dataset_card.md.j2` beside it. `datasets` 4+ refuses loading scripts, so the card's YAML,
which declares the configs as globs over the Parquet files, is what makes the folder loadable.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cpia_hf.dataset.card import write_dataset_card
from cpia_hf.dataset.catalog import default_catalog_path, load_catalog
from cpia_hf.dataset.convert import CONFIGS
from cpia_hf.dataset.mini import DEFAULT_MINI_FRACTION
from cpia_hf.dataset.units import ConvertOptions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, required=True, help="built dataset folder")
    parser.add_argument("--catalog", type=Path, default=None, help="catalog YAML (default: the release catalog)")
    parser.add_argument("--mini-fraction", type=float, default=DEFAULT_MINI_FRACTION)
    args = parser.parse_args(argv)
    if not (args.repo / "data").is_dir():
        print(f"error: {args.repo}: no data/ folder; build it with `cpia convert` first", file=sys.stderr)
        return 2
    configs = tuple(c for c in CONFIGS if (args.repo / "data" / c).is_dir())
    entries = load_catalog(args.catalog or default_catalog_path())
    path = write_dataset_card(args.repo, entries, configs=configs, mini_fraction=args.mini_fraction,
                              options=ConvertOptions())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
