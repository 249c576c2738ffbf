"""The rebuild against the release: rows built per subset and scale next to the release's counts.

For every catalog subset the built count of each scale is set against the catalog's
`expected_images` (the release's count), and for WSI subsets the tiles per XL tile are set against
the ranges measured over the release's 55 WSI sources (`../shared/reference/README.md`):
L/XL 15.2 (13.1-15.9), M/XL 92.7 (77-99), S/M 0.97 (0.94-1.00, times `s_per_m`). A subset is
flagged when it has no rows although the release has some, when a count is below half or above
twice the release's, or when a per-XL ratio falls outside the release's range.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..schema import read_columns
from ..standard import SCALES
from .catalog import CatalogEntry

# ratio -> (numerator scale, denominator scale, release mean, release min, release max)
RELEASE_RATIOS = {
    "L/XL": ("L", "XL", 15.2, 13.1, 15.9),
    "M/XL": ("M", "XL", 92.7, 77.0, 99.0),
    "S/M": ("S", "M", 0.97, 0.94, 1.00),
}
COUNT_RANGE = (0.5, 2.0)  # built / released outside this range is flagged


@dataclass
class Coverage:
    subset: str
    kind: str
    built: dict[str, int]  # scale -> rows built
    expected: dict[str, int]  # scale -> rows released (catalog expected_images)
    ratios: dict[str, float | None] = field(default_factory=dict)  # "L/XL" ... -> built ratio (WSI only)
    flags: list[str] = field(default_factory=list)


def count_rows(config_dir: Path) -> Counter:
    """Rows per (subset, scale) in the shards of one config, read from two metadata columns.

    A shard that cannot be read raises ValueError naming it (one line; `--verify-shards` rebuilds it).
    """
    counts: Counter = Counter()
    for path in sorted(config_dir.glob("*/*/*.parquet")):
        try:
            table = read_columns(path, ["subset", "scale"])
        except (OSError, ValueError, pa.ArrowException) as error:
            raise ValueError(f"{path}: unreadable shard ({_first_line(error)}); rerun with --verify-shards to "
                             "rebuild it") from None
        counts.update(zip(table.column("subset").to_pylist(), table.column("scale").to_pylist()))
    return counts


def unreadable_shards(data_dir: Path) -> list[str]:
    """Published shards whose Parquet footer cannot be read, each with the reason: damage that an unchanged size
    and modification time hide from the cheap check of a rerun."""
    found = []
    for path in sorted(data_dir.rglob("*.parquet")):
        try:
            pq.read_metadata(path)
        except (OSError, ValueError, pa.ArrowException) as error:
            found.append(f"{path}: {_first_line(error)}")
    return found


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def coverage(counts: Counter, entries: list[CatalogEntry], s_per_m: int = 1) -> list[Coverage]:
    """One Coverage per catalog entry, in catalog order."""
    rows = []
    for entry in entries:
        built = {scale: counts[(entry.name, scale)] for scale in SCALES if counts[(entry.name, scale)]}
        row = Coverage(entry.name, entry.kind, built, dict(entry.expected_images))
        if entry.kind == "wsi":
            for name, (top, bottom, _mean, low, high) in RELEASE_RATIOS.items():
                scale = s_per_m if name == "S/M" else 1
                value = built.get(top, 0) / built[bottom] if built.get(bottom) else None
                row.ratios[name] = value
                if value is not None and not low * scale <= value <= high * scale:
                    row.flags.append(f"{name} {value:.2f} outside {low * scale:g}-{high * scale:g}")
        row.flags[:0] = _count_flags(built, row.expected)
        rows.append(row)
    return rows


def _count_flags(built: dict[str, int], expected: dict[str, int]) -> list[str]:
    if not built:
        return ["missing: no rows built" + (" (released: {:,})".format(sum(expected.values())) if expected else "")]
    flags = []
    for scale, released in expected.items():
        ratio = built.get(scale, 0) / released if released else None
        if ratio is not None and not COUNT_RANGE[0] <= ratio <= COUNT_RANGE[1]:
            flags.append(f"{scale} {ratio:.0%} of the release")
    return flags


def _cell(row: Coverage, scale: str) -> str:
    built = row.built.get(scale, 0)
    released = row.expected.get(scale)
    if released is None:
        return f"{built:,}" if built else "–"
    return f"{built:,} / {released:,} ({built / released:.0%})" if released else f"{built:,} / 0"


def coverage_markdown(rows: list[Coverage]) -> str:
    """The coverage table as Markdown: cells are `built / released (ratio)`."""
    ratio_names = list(RELEASE_RATIOS)
    head = ["subset", "kind", *SCALES, *(f"{n} (release {RELEASE_RATIOS[n][2]:g})" for n in ratio_names), "check"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        ratios = [f"{row.ratios[n]:.2f}" if row.ratios.get(n) is not None else "–" for n in ratio_names]
        check = "; ".join(row.flags) or "ok"
        lines.append("| " + " | ".join([row.subset, row.kind, *(_cell(row, s) for s in SCALES), *ratios, check]) + " |")
    return "\n".join(lines) + "\n"


def coverage_section(rows: list[Coverage]) -> str:
    """The dataset card's section on the rebuild against the release."""
    flagged = sum(1 for r in rows if r.flags)
    ranges = ", ".join(f"{name} {low:g}–{high:g}" for name, (*_, low, high) in RELEASE_RATIOS.items())
    return (
        "\n## Coverage of the release\n\n"
        "Rows of `full` per subset and scale, as `built / released (ratio)` where the release's count is\n"
        f"known, and tiles per XL tile against the release's ranges ({ranges}).\n"
        f"{flagged} of {len(rows)} subsets are flagged: missing, a count below {COUNT_RANGE[0]:.0%} or above\n"
        f"{COUNT_RANGE[1]:.0%} of the release's, or a ratio outside the release's range.\n\n" + coverage_markdown(rows)
    )
