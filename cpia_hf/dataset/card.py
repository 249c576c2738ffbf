"""Dataset card generator: the README.md whose YAML declares the configs over the Parquet shards.

`datasets` 4+ refuses loading scripts, so the dataset is made loadable by this card alone: each
config is a list of file globs over `data/`, which costs no storage (L, M and S select folders of
`full`). Statistics, the organ chart and the tile gallery are computed from the shards themselves.
"""
from __future__ import annotations

import io
import json
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path

import jinja2
import pyarrow.parquet as pq
import yaml
from PIL import Image

from ..resources import DATASET_CARD_TEMPLATE, read_resource
from ..schema import FEATURES
from ..standard import FOLDERS, SCALE_SIDES, SCALES, STANDARD_MPP
from .catalog import CatalogEntry, subset_slug
from .units import write_atomic

TABLE_COLUMNS = (("wsi", "XL"), ("wsi", "L"), ("roi", "L"), ("wsi", "M"), ("roi", "M"), ("wsi", "S"), ("roi", "S"))
SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"))
GALLERY_PER_SCALE = 8
REPO_PLACEHOLDER = "<this repo>"  # in a card written without --repo-id; `cpia push` fills it in
LICENCE_FILE = "LICENSES.md"
LICENCE_KEYS = ("license", "license_name", "license_link", "extra_gated_prompt", "extra_gated_fields")


def config_globs(configs: tuple[str, ...]) -> dict[str, str]:
    """Config name -> data_files glob of its single `train` split."""
    globs = {}
    for config in configs:
        globs[config] = f"data/{config}/*/*/*.parquet"
        for folder in FOLDERS:
            name = folder if config == "full" else f"{config}_{folder}"
            globs[name] = f"data/{config}/{folder}/*/*.parquet"
    return globs


def shard_files(out_dir: Path, glob: str) -> list[Path]:
    return sorted(out_dir.glob(glob))


def read_counts(paths: list[Path]) -> Counter:
    """Rows per (subset, organ, kind, scale), read from the metadata columns only."""
    counts: Counter = Counter()
    for path in paths:
        table = pq.read_table(path, columns=["subset", "organ", "kind", "scale"])
        counts.update(zip(*(table.column(c).to_pylist() for c in table.column_names)))
    return counts


def split_info(paths: list[Path]) -> dict:
    """Rows, uncompressed bytes and file bytes of a split, from each shard's footer read once."""
    footers = [pq.read_metadata(p) for p in paths]
    return {
        "num_examples": sum(m.num_rows for m in footers),
        "num_bytes": sum(m.row_group(i).total_byte_size for m in footers for i in range(m.num_row_groups)),
        "download_size": sum(p.stat().st_size for p in paths),
    }


def organ_table(counts: Counter, entries: list[CatalogEntry]) -> list[dict]:
    """Table I of the paper computed from rows: per organ, sub-datasets and images per kind and scale."""
    by_organ: dict[str, Counter] = defaultdict(Counter)
    subsets: dict[str, set] = defaultdict(set)
    for (subset, organ, kind, scale), n in counts.items():
        by_organ[organ][(kind, scale)] += n
        subsets[organ].add(subset)
    rows = []
    for organ in sorted(by_organ):
        cells = by_organ[organ]
        rows.append({"organ": organ, "subsets": len(subsets[organ]),
                     "cells": [cells[c] for c in TABLE_COLUMNS], "total": sum(cells.values())})
    total_cells = [sum(r["cells"][i] for r in rows) for i in range(len(TABLE_COLUMNS))]
    rows.append({"organ": "**Total**", "subsets": len({s for (s, *_rest) in counts}),
                 "cells": total_cells, "total": sum(total_cells)})
    return rows


def organ_chart(counts: Counter, path: Path) -> None:
    """Horizontal stacked bar chart of images per organ and scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    organs = sorted({organ for (_, organ, _, _) in counts})
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(organs) + 1.5))
    left = [0] * len(organs)
    for scale in SCALES:
        values = [sum(n for (_, o, _, s), n in counts.items() if o == organ and s == scale) for organ in organs]
        ax.barh(organs, values, left=left, label=scale)
        left = [a + b for a, b in zip(left, values)]
    ax.set_xlabel("images")
    ax.set_title("CPIA composition by organ and scale")
    ax.legend(title="scale")
    ax.invert_yaxis()
    fig.tight_layout()
    _save_png_atomic(fig, path)
    plt.close(fig)


def first_image(shard: Path, scale: str) -> Image.Image | None:
    """The first image of the given scale in a shard, reading only the row group that holds it."""
    parquet = pq.ParquetFile(shard)
    for index in range(parquet.num_row_groups):
        scales = parquet.read_row_group(index, columns=["scale"]).column("scale").to_pylist()
        if scale in scales:
            image = parquet.read_row_group(index, columns=["image"]).column("image")[scales.index(scale)].as_py()
            return Image.open(io.BytesIO(image["bytes"])).convert("RGB")
    return None


def gallery(paths: list[Path], scale: str, path: Path, per_scale: int = GALLERY_PER_SCALE) -> bool:
    """A strip of tiles of one scale, one per shard (so spread over subsets); False when there is none."""
    thumbs: list[Image.Image] = []
    for shard in paths:
        image = first_image(shard, scale)
        if image is not None:
            thumbs.append(image.resize((128, 128), Image.Resampling.LANCZOS))
        if len(thumbs) >= per_scale:
            break
    if not thumbs:
        return False
    sheet = Image.new("RGB", (132 * len(thumbs) - 4, 128), "white")
    for i, thumb in enumerate(thumbs):
        sheet.paste(thumb, (i * 132, 0))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    write_atomic(path, buffer.getvalue())
    return True


def write_dataset_card(
    out_dir: Path, entries: list[CatalogEntry], *, configs: tuple[str, ...], mini_fraction: float, options
) -> Path:
    """Write README.md (YAML configs + dataset_info + statistics) and its PNG assets into `out_dir`."""
    globs = {name: glob for name, glob in config_globs(configs).items() if shard_files(out_dir, glob)}
    infos = {name: split_info(shard_files(out_dir, glob)) for name, glob in globs.items()}
    counts = {config: read_counts(shard_files(out_dir, f"data/{config}/*/*/*.parquet")) for config in configs}
    main = "full" if "full" in configs else configs[0]
    organ_chart(counts[main], out_dir / "assets" / "organ_composition.png")
    galleries = [s for s in SCALES if gallery(shard_files(out_dir, f"data/{main}/*/*/*.parquet"), s,
                                              out_dir / "assets" / f"gallery_{s}.png")]
    present = {subset for (subset, *_rest) in counts[main]}
    features_yaml = FEATURES._to_yaml_list()
    metadata = {
        "license": "other",
        "license_name": "cpia-source-licenses",
        "pretty_name": "CPIA",
        "task_categories": ["image-feature-extraction", "image-classification"],
        "tags": ["pathology", "histopathology", "cytopathology", "whole-slide-images", "medical",
                 "self-supervised-learning", "multi-scale"],
        "size_categories": [_size_category(infos[main]["num_examples"])] if main in infos else [],
        "configs": [
            {"config_name": name, **({"default": True} if name == main else {}),
             "data_files": [{"split": "train", "path": glob}]}
            for name, glob in globs.items()
        ],
        "dataset_info": [
            {"config_name": name, "features": features_yaml,
             "splits": [{"name": "train", "num_bytes": info["num_bytes"], "num_examples": info["num_examples"]}],
             "download_size": info["download_size"], "dataset_size": info["num_bytes"]}
            for name, info in infos.items()
        ],
    }
    template = jinja2.Template(read_resource(DATASET_CARD_TEMPLATE))
    body = template.render(
        configs=[{"name": n, "glob": g, **infos[n]} for n, g in globs.items()],
        tables={c: organ_table(counts[c], entries) for c in configs if counts[c]},
        table_columns=[f"{k.upper()} {s}" for k, s in TABLE_COLUMNS],
        galleries=galleries,
        scale_sides=SCALE_SIDES,
        standard_mpp=STANDARD_MPP,
        mini_fraction=mini_fraction,
        options=asdict(options),
        subsets=[{**e.to_dict(), "slug": subset_slug(e.name),
                  "rows": sum(n for (s, *_r), n in counts[main].items() if s == e.name)}
                 for e in entries if e.name in present],
    )
    path = out_dir / "README.md"
    write_atomic(path, _card_text(metadata, body).encode())
    write_atomic(out_dir / "stats.json", json.dumps(
        {c: [[*k, n] for k, n in sorted(counts[c].items())] for c in configs}, indent=0).encode())
    return path


class _PlainDumper(yaml.SafeDumper):
    """Writes repeated structures (the features of every config) in full: no YAML anchors."""

    def ignore_aliases(self, data) -> bool:
        return True


def _size_category(n: int) -> str:
    return next((label for bound, label in SIZE_CATEGORIES if n < bound), "n>1B")


def _save_png_atomic(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    write_atomic(path, buffer.getvalue())


def subset_licences(out_dir: Path) -> dict[str, str]:
    """Subset -> licence of every row under `out_dir/data`, read from the two metadata columns only."""
    licences: dict[str, str] = {}
    for path in sorted((out_dir / "data").glob("**/*.parquet")):
        table = pq.read_table(path, columns=["subset", "license"]).group_by(["subset", "license"]).aggregate([])
        for subset, licence in zip(table.column("subset").to_pylist(), table.column("license").to_pylist()):
            if licences.setdefault(subset, licence) != licence:
                raise ValueError(f"{path}: subset {subset!r} has rows under two licences ({licences[subset]!r}, "
                                 f"{licence!r})")
    return licences


def split_card(text: str) -> tuple[dict, str]:
    """(YAML metadata, Markdown body) of a card."""
    if not text.startswith("---\n"):
        return {}, text
    head, _, body = text[4:].partition("\n---\n")
    return yaml.safe_load(head) or {}, body


def finalize_card(out_dir: Path, repo_id: str, licences: dict[str, str], homepages: dict[str, str]) -> Path:
    """Make the card of `out_dir` ready for the Hub repo `repo_id`: the repo id in place of the placeholder,
    licence metadata of the included subsets (+ LICENSES.md) and gating when a licence asks for terms."""
    from .licences import gating_metadata, hub_licence_metadata, licence_file

    path = out_dir / "README.md"
    metadata, body = split_card(path.read_text(encoding="utf-8"))
    kept = {key: value for key, value in metadata.items() if key not in LICENCE_KEYS}
    metadata = {**hub_licence_metadata(licences, LICENCE_FILE), **kept, **gating_metadata(licences)}
    write_atomic(out_dir / LICENCE_FILE, licence_file(licences, homepages).encode())
    write_atomic(path, _card_text(metadata, body.replace(REPO_PLACEHOLDER, repo_id)).encode())
    return path


def _card_text(metadata: dict, body: str) -> str:
    return "---\n" + yaml.dump(metadata, Dumper=_PlainDumper, sort_keys=False, allow_unicode=True) + "---\n" + body
