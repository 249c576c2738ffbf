"""How fair a sample the first streamed batches of `mini` are, per-subset shards vs the mixed layout, at release scale.

    python benchmarks/mini_mix.py [--rows-per-shard 20000 --buffer 10000 --out DIR]

The composition is the mini rule applied to the release catalog's counts (WSI: the organ-balanced cell quota
of 4 % of the XL cells, 81 images per cell: 1 XL, 16 L, 32 M, 32 S, capped by the release's counts; ROI:
unlabelled sources whole, labelled ones with a training split at 70 % of their images (the split sizes are not
in the catalog: an assumption), others none). Only a `subset` column is written, in shards of
--rows-per-shard rows (500 MB of 384-px JPEGs at ~25 kB); per-subset shards are ordered as the per-subset
layout lists them, mixed shards follow the seeded global rank (the key `cpia_hf.dataset.mini` uses). Each
layout is streamed with `datasets` as a trainer does (no shuffle, and `.shuffle(buffer_size=--buffer)`), and the
share of the largest subset in the first 10 batches of 64 rows is compared with its share of the config.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpia_hf.dataset.catalog import default_catalog_path, load_catalog, subset_slug  # noqa: E402
from cpia_hf.dataset.mini import DEFAULT_MINI_FRACTION, cell_quota, mix_group_of  # noqa: E402

PER_CELL = 1 + 16 + 32 + 32
TRAIN_SHARE = 0.7


def mini_composition() -> dict[str, tuple[int, str]]:
    """Subset -> (estimated mini rows, mix group)."""
    entries = load_catalog(default_catalog_path())
    wsi = {e.name: e.expected_images.get("XL", 0) for e in entries if e.kind == "wsi"}
    quota = cell_quota(wsi, {e.name: e.organ for e in entries}, DEFAULT_MINI_FRACTION)
    rows = {}
    for entry in entries:
        released = sum(entry.expected_images.values())
        if entry.kind == "wsi":
            n = min(quota.get(entry.name, 0) * PER_CELL, released)
        elif entry.label_from is None:
            n = released
        else:
            n = int(released * TRAIN_SHARE) if entry.train_pattern else 0
        if n:
            rows[entry.name] = (n, mix_group_of(entry))
    return rows


def write_layouts(rows: dict[str, tuple[int, str]], out: Path, per_shard: int, seed: int) -> dict[str, list[Path]]:
    names = np.array([name for name, (n, _) in rows.items() for _ in range(n)])
    groups = np.array([group for _, (n, group) in rows.items() for _ in range(n)])
    layouts: dict[str, list[Path]] = {"per-subset": [], "mixed": []}
    for name in sorted(rows, key=subset_slug):  # per-subset layout: one series of shards per subset
        subset_rows = names[names == name]
        for k in range(0, len(subset_rows), per_shard):
            path = out / "per-subset" / subset_slug(name) / f"{k // per_shard:05d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table({"subset": subset_rows[k:k + per_shard]}), path)
            layouts["per-subset"].append(path)
    rng = np.random.default_rng(seed)  # the seeded global rank, per group
    shards = []
    for group in ("clean", "benchmark"):
        members = names[groups == group][rng.permutation(int((groups == group).sum()))]
        count = max(1, -(-len(members) // per_shard))
        shards += [((k + 0.5) / count, group, members[k * per_shard:(k + 1) * per_shard]) for k in range(count)]
    for index, (_, group, members) in enumerate(sorted(shards, key=lambda s: s[:2])):
        path = out / "mixed" / f"mini-{index:05d}-{group}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"subset": members}), path)
        layouts["mixed"].append(path)
    return layouts


def first_batches(files: list[Path], buffer: int | None, seed: int) -> list[str]:
    from datasets import load_dataset

    stream = load_dataset("parquet", data_files=[str(f) for f in files], split="train", streaming=True)
    if buffer:
        stream = stream.shuffle(seed=seed, buffer_size=buffer)
    return [row["subset"] for _, row in zip(range(640), stream)]


def total_variation(first: list[str], rows: dict[str, tuple[int, str]]) -> float:
    """Half the L1 distance between the subset shares of `first` and of the config."""
    total = sum(n for n, _ in rows.values())
    seen = Counter(first)
    return 0.5 * sum(abs(seen[name] / len(first) - n / total) for name, (n, _) in rows.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows-per-shard", type=int, default=20_000)
    parser.add_argument("--buffer", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = mini_composition()
    total = sum(n for n, _ in rows.values())
    largest, (n_largest, _) = max(rows.items(), key=lambda item: item[1][0])
    print(f"estimated mini: {total:,} rows in {len(rows)} subsets; largest {largest}: {n_largest / total:.3f} of the "
          f"config; benchmark subsets {sum(n for n, g in rows.values() if g == 'benchmark') / total:.3f}")
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        layouts = write_layouts(rows, Path(tmp), args.rows_per_shard, args.seed)
        for layout, files in layouts.items():
            for buffer in (None, args.buffer):
                firsts = [first_batches(files, buffer, seed) for seed in range(3 if buffer else 1)]
                shares = ", ".join(f"{f.count(largest) / len(f):.3f}" for f in firsts)
                distances = ", ".join(f"{total_variation(f, rows):.2f}" for f in firsts)
                subsets = ", ".join(str(len(set(f))) for f in firsts)
                print(f"{layout:10s} {len(files):4d} shards, buffer {buffer or 0:6d}: first 10x64 rows: largest subset "
                      f"{shares} (config {n_largest / total:.3f}); subsets seen {subsets} of {len(rows)}; "
                      f"total variation from the config {distances}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
