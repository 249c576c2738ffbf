"""Dataset card generator: the README.md whose YAML declares the configs over the Parquet shards.

`datasets` 4+ refuses loading scripts, so the dataset is made loadable by this card alone: each
config is a list of file globs over `data/`, which costs no storage (XL, L, M, S and full_clean select
folders of `full`, mini_clean the clean shards of `mini`). Statistics, the composition chart and the
tile gallery are computed from the shards themselves.
"""
from __future__ import annotations

import io
import json
import math
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2
import numpy as np
import pyarrow.parquet as pq
import yaml
from PIL import Image, ImageDraw, ImageFont

from ..resources import DATASET_CARD_TEMPLATE, read_resource
from ..schema import FEATURES_YAML, read_columns
from ..standard import FOLDERS, RELEASE_FOLDERS, SCALE_SIDES, SCALES, STANDARD_MPP, stable_unit_float
from .catalog import CatalogEntry, subset_slug
from .coverage import count_rows, coverage, coverage_section
from .licences import gating_metadata, hub_licence_metadata, licence_file
from .shards import remove_stale
from .tissue import WHITE_LEVEL
from .units import write_atomic

if TYPE_CHECKING:
    from .licences import Clearance

TABLE_COLUMNS = (("wsi", "XL"), ("wsi", "L"), ("roi", "L"), ("wsi", "M"), ("roi", "M"), ("wsi", "S"), ("roi", "S"))
SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"))
GALLERY_PER_SCALE = 8
GALLERY_TILE = 256  # px per gallery tile
DRAFT_SLACK = 0.9  # a tile may be decoded this much below GALLERY_TILE px and enlarged (a cheaper DCT scale)
GALLERY_CROP = {"XL": 960, "L": 480}  # XL/L tiles are shown as a tissue-centred crop of this side (detail visible)
GALLERY_READ_ROWS = 8  # rows per batch read from a shard for the gallery
GALLERY_QUALITY = 90  # JPEG quality of the gallery sheets (the tiles' default)
REPO_PLACEHOLDER = "<this repo>"  # in the built card; the card `cpia push` uploads has the repo id in its place
LICENCE_FILE = "LICENSES.md"
STATS_FILE = "stats.json"  # rows per (subset, organ, kind, scale) of every declared config
LICENCE_KEYS = ("license", "license_name", "license_link", "extra_gated_prompt", "extra_gated_fields",
                "cpia_licence_acknowledgements")
PAPER_URL = "https://doi.org/10.1016/j.bspc.2025.108148"
PREPRINT_URL = "https://arxiv.org/abs/2310.17902"
RELEASE_URL = "https://github.com/zhanglab2021/CPIA_Dataset"


def config_globs(configs: tuple[str, ...], entries: list[CatalogEntry]) -> dict[str, list[str]]:
    """Config name -> data_files globs of its single `train` split (configs without files are dropped later)."""
    globs: dict[str, list[str]] = {}
    clean = [subset_slug(e.name) for e in entries if not e.benchmarks]
    if "full" in configs:
        globs["full"] = ["data/full/*/*/*.parquet"]
        globs.update({folder: [f"data/full/{folder}/*/*.parquet"] for folder in FOLDERS})
        globs["full_clean"] = [f"data/full/*/{slug}/*.parquet" for slug in clean]
    if "mini" in configs:
        globs["mini"] = ["data/mini/*.parquet"]
        globs["mini_clean"] = ["data/mini/*-clean.parquet"]
    return globs


def shard_files(out_dir: Path, globs: list[str] | str) -> list[Path]:
    globs = [globs] if isinstance(globs, str) else globs
    return sorted({path for glob in globs for path in out_dir.glob(glob)})


def read_counts(paths: list[Path]) -> Counter:
    """Rows per (subset, organ, kind, scale), read from the metadata columns only."""
    counts: Counter = Counter()
    for path in paths:
        table = read_columns(path, ["subset", "organ", "kind", "scale"])
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


CHART_SERIES = (("WSI XL", "wsi", ("XL",)), ("WSI L", "wsi", ("L",)), ("WSI M", "wsi", ("M",)),
                ("WSI S", "wsi", ("S",)), ("ROI", "roi", ("L", "M", "S")))


CHART_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")  # one per CHART_SERIES
CHART_WIDTH = 800  # px
CHART_BAR = 11  # px per bar; an organ's band holds one bar per series and a gap of one bar
CHART_FONT_SIZE = 13


@dataclass(frozen=True)
class LogAxis:
    """The chart's x axis: whole decades from `low` to `high` (powers of ten) over the pixels `left`..`right`."""

    low: int
    high: int
    left: int
    right: int

    @classmethod
    def spanning(cls, values: list[int], left: int, right: int) -> "LogAxis":
        """Decades that hold every positive value; the axis starts at least half a decade below the smallest one,
        so that its bar stays visible."""
        positive = [v for v in values if v > 0] or [1]
        low = math.floor(math.log10(min(positive)) - 0.5)
        high = max(math.ceil(math.log10(max(positive))), low + 1)
        return cls(low, high, left, right)

    def x(self, value: float) -> int:
        return round(self.left + (math.log10(value) - self.low) / (self.high - self.low) * (self.right - self.left))


def series_counts(counts: Counter, organs: list[str]) -> list[list[int]]:
    """Images per organ (inner list, in `organs` order) of each CHART_SERIES."""
    by_cell: Counter = Counter()
    for (_, organ, kind, scale), n in counts.items():
        by_cell[(organ, kind, scale)] += n
    return [[sum(by_cell[(organ, kind, scale)] for scale in scales) for organ in organs]
            for _, kind, scales in CHART_SERIES]


def organ_chart(counts: Counter, path: Path) -> None:
    """Grouped horizontal bars of images per organ, per WSI scale and ROIs, each with its count, on a log axis (XL
    and ROI bars are orders of magnitude below M and S at real scale and would vanish on a linear one). Drawn with
    Pillow: a conversion never imports a plotting library."""
    organs = sorted({organ for (_, organ, _, _) in counts})
    values = series_counts(counts, organs)
    font = ImageFont.load_default(size=CHART_FONT_SIZE)
    small = ImageFont.load_default(size=CHART_FONT_SIZE - 3)
    band = CHART_BAR * (len(CHART_SERIES) + 1)
    left = max((round(font.getlength(organ)) for organ in organs), default=0) + 20
    top = 64
    image = Image.new("RGB", (CHART_WIDTH, top + band * len(organs) + 48), "white")
    draw = ImageDraw.Draw(image)
    axis = LogAxis.spanning([v for row in values for v in row], left, CHART_WIDTH - 70)
    _chart_frame(draw, font, axis, top, top + band * len(organs))
    for k, organ in enumerate(organs):
        middle = top + k * band + band // 2
        draw.text((left - 8, middle), organ, fill="black", font=font, anchor="rm")
        _chart_bars(draw, small, axis, [row[k] for row in values], middle - CHART_BAR * len(CHART_SERIES) // 2)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_atomic(path, buffer.getvalue())


def _chart_frame(draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont, axis: LogAxis, top: int, bottom: int) -> None:
    """Title, legend, the decade grid with its labels, the axis lines and the axis title."""
    draw.text((CHART_WIDTH // 2, 8), "CPIA composition by organ, scale and kind", fill="black", font=font, anchor="mt")
    x = axis.left
    for (label, _, _), colour in zip(CHART_SERIES, CHART_COLOURS):
        draw.rectangle((x, 36, x + 14, 46), fill=colour)
        draw.text((x + 20, 41), label, fill="black", font=font, anchor="lm")
        x += 40 + round(font.getlength(label))
    for decade in range(axis.low, axis.high + 1):
        gx = axis.x(10**decade)
        draw.line((gx, top, gx, bottom), fill="#dddddd")
        draw.line((gx, bottom, gx, bottom + 4), fill="black")
        draw.text((gx, bottom + 6), f"{10**decade:,}", fill="black", font=font, anchor="mt")
    draw.line((axis.left, top, axis.left, bottom), fill="black")
    draw.line((axis.left, bottom, axis.right, bottom), fill="black")
    draw.text(((axis.left + axis.right) // 2, bottom + 26), "images (log scale)", fill="black", font=font, anchor="mt")


def _chart_bars(draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont, axis: LogAxis, values: list[int],
                top: int) -> None:
    """One organ's bars, one per series from `top` down, each followed by its count; an absent series leaves a
    gap."""
    for k, (value, colour) in enumerate(zip(values, CHART_COLOURS)):
        if value <= 0:
            continue
        y = top + k * CHART_BAR
        end = axis.x(value)
        draw.rectangle((axis.left + 1, y, end, y + CHART_BAR - 2), fill=colour)
        draw.text((end + 4, y + CHART_BAR // 2 - 1), f"{value:,}", fill="#444444", font=font, anchor="lm")


def gallery_candidates(paths: list[Path]) -> dict[str, list[dict]]:
    """Per scale, every row's location and metadata (shard, row group, index, subset, organ, tissue fraction)."""
    candidates: dict[str, list[dict]] = defaultdict(list)
    columns = ["subset", "organ", "scale", "kind", "tissue_fraction", "image_id"]
    for path in paths:
        parquet = pq.ParquetFile(path)
        for group in range(parquet.num_row_groups):
            table = parquet.read_row_group(group, columns=columns).to_pylist()
            for index, row in enumerate(table):
                candidates[row["scale"]].append({**row, "path": path, "group": group, "index": index})
    return candidates


def pick_gallery(candidates: list[dict], seed: int, count: int = GALLERY_PER_SCALE) -> list[dict]:
    """Up to `count` rows spread over organs and subsets (round robin in seeded order); WSI tiles that are mostly
    tissue first, others only when those run out."""
    tissue = [r for r in candidates if r["kind"] == "roi" or (r["tissue_fraction"] or 0) >= 0.5]
    rest = [r for r in candidates if not (r["kind"] == "roi" or (r["tissue_fraction"] or 0) >= 0.5)]
    picked = _round_robin(tissue, seed, count)
    return picked + _round_robin(rest, seed, count - len(picked))


def _round_robin(pool: list[dict], seed: int, count: int) -> list[dict]:
    by_organ: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in sorted(pool, key=lambda r: stable_unit_float(seed, "gallery", r["subset"], r["image_id"])):
        by_organ[row["organ"]][row["subset"]].append(row)
    organs = sorted(by_organ, key=lambda o: stable_unit_float(seed, "gallery-organ", o))
    picked: list[dict] = []
    round_index = 0
    while len(picked) < count and any(rows for subsets in by_organ.values() for rows in subsets.values()):
        for organ in organs:  # one tile per organ per round, rotating through the organ's subsets
            subsets = [s for s in sorted(by_organ[organ]) if by_organ[organ][s]]
            if subsets and len(picked) < count:
                picked.append(by_organ[organ][subsets[round_index % len(subsets)]].pop(0))
        round_index += 1
    return picked


def tissue_crop(image: Image.Image, side: int) -> Image.Image:
    """A `side` square centred on the tissue (pixels darker than the white level) of `image`."""
    if side >= min(image.size):
        return image
    thumb = np.asarray(image.resize((64, 64), Image.Resampling.BOX), dtype=np.float32)
    mask = thumb.mean(axis=2) < WHITE_LEVEL
    cy, cx = (np.argwhere(mask).mean(axis=0) + 0.5) / 64 if mask.any() else (0.5, 0.5)
    left = int(min(max(cx * image.width - side / 2, 0), image.width - side))
    top = int(min(max(cy * image.height - side / 2, 0), image.height - side))
    return image.crop((left, top, left + side, top + side))


def load_images(rows: list[dict]) -> list[Image.Image]:
    """The (still encoded, lazily decoded) images of gallery rows. Each shard row group is read once, in batches of
    GALLERY_READ_ROWS rows up to the last row wanted: a whole row group's images (up to 64 MB) are never held."""
    wanted: dict[tuple[Path, int], set[int]] = defaultdict(set)
    for row in rows:
        wanted[(row["path"], row["group"])].add(row["index"])
    encoded: dict[tuple[Path, int, int], bytes] = {}
    for (path, group), indexes in wanted.items():
        start = 0
        for batch in pq.ParquetFile(path).iter_batches(GALLERY_READ_ROWS, row_groups=[group], columns=["image"]):
            images = batch.column("image")
            for index in indexes & set(range(start, start + batch.num_rows)):
                encoded[(path, group, index)] = images[index - start]["bytes"].as_py()
            start += batch.num_rows
            if start > max(indexes):
                break
    return [Image.open(io.BytesIO(encoded[(row["path"], row["group"], row["index"])])) for row in rows]


def gallery_tile(encoded: Image.Image, crop: int | None) -> tuple[Image.Image, int | None]:
    """The GALLERY_TILE square shown for an encoded tile (a tissue-centred crop of `crop` px when the tile is
    larger), and the crop's side in the tile's pixels (None when the tile is shown whole)."""
    full_width = encoded.width
    shown = min(crop or full_width, *encoded.size)
    # a JPEG is decoded shrunk in the DCT domain (1/2, 1/4, 1/8) to the scale nearest the shown size
    reduce = max((r for r in (1, 2, 4, 8) if shown >= r * GALLERY_TILE * DRAFT_SLACK), default=1)
    encoded.draft("RGB", (encoded.width // reduce, encoded.height // reduce))
    decoded = encoded if encoded.mode == "RGB" else encoded.convert("RGB")
    reduce = full_width / decoded.width  # what the decoder did
    image = tissue_crop(decoded, round(crop / reduce)) if crop else decoded
    crop_side = round(image.width * reduce) if image.size != decoded.size else None
    return image.resize((GALLERY_TILE, GALLERY_TILE), Image.Resampling.LANCZOS), crop_side


def gallery_path(out_dir: Path, scale: str) -> Path:
    return out_dir / "assets" / f"gallery_{scale}.jpg"


def gallery(rows: list[dict], scale: str, path: Path) -> list[dict]:
    """A sheet of the picked tiles (XL/L as tissue-centred crops) at GALLERY_TILE px; returns the captions."""
    if not rows:
        return []
    per_row = 4
    lines = -(-len(rows) // per_row)
    sheet = Image.new("RGB", ((GALLERY_TILE + 4) * min(per_row, len(rows)) - 4, (GALLERY_TILE + 4) * lines - 4),
                      "white")
    captions = []
    for k, (row, encoded) in enumerate(zip(rows, load_images(rows))):
        tile, crop_side = gallery_tile(encoded, GALLERY_CROP.get(scale))
        sheet.paste(tile, ((k % per_row) * (GALLERY_TILE + 4), (k // per_row) * (GALLERY_TILE + 4)))
        captions.append({"subset": row["subset"], "organ": row["organ"], "image_id": row["image_id"],
                         "crop": crop_side})
    buffer = io.BytesIO()
    sheet.save(buffer, format="JPEG", quality=GALLERY_QUALITY)  # a photo sheet of JPEG tiles: a fraction of PNG's cost
    write_atomic(path, buffer.getvalue())
    return captions


def write_dataset_card(
    out_dir: Path, entries: list[CatalogEntry], *, configs: tuple[str, ...], mini_fraction: float, options,
    repo_id: str | None = None,
) -> Path:
    """Write README.md (YAML configs + dataset_info + statistics + licence metadata), LICENSES.md and the card's
    PNG assets into `out_dir`."""
    main = "full" if "full" in configs else configs[0]
    main_files = shard_files(out_dir, config_globs((main,), [])[main])
    counts = {main: read_counts(main_files)}  # stats.json: every declared config's rows per subset/organ/kind/scale
    present = {subset for (subset, *_rest) in counts[main]}
    present_entries = [e for e in entries if e.name in present]
    globs = {name: g for name, g in config_globs(configs, present_entries).items() if g and shard_files(out_dir, g)}
    infos = {name: split_info(shard_files(out_dir, g)) for name, g in globs.items()}
    per_file = {path: read_counts([path]) for g in globs.values() for path in shard_files(out_dir, g)}
    counts.update({name: sum((per_file[p] for p in shard_files(out_dir, g)), Counter()) for name, g in globs.items()})
    organ_chart(counts[main], out_dir / "assets" / "organ_composition.png")
    candidates = gallery_candidates(main_files)
    galleries = {}
    for scale in SCALES:
        captions = gallery(pick_gallery(candidates.get(scale, []), options.seed), scale, gallery_path(out_dir, scale))
        if captions:
            galleries[scale] = captions
    # sheets this card does not show: a scale without rows now, an earlier version's PNG sheets
    remove_stale(out_dir / "assets", "gallery_*", {gallery_path(out_dir, scale) for scale in galleries})
    metadata = {
        "pretty_name": "CPIA",
        "task_categories": ["image-feature-extraction", "image-classification"],
        "tags": ["pathology", "histopathology", "cytopathology", "whole-slide-images", "medical",
                 "self-supervised-learning", "multi-scale"],
        "size_categories": [_size_category(infos[main]["num_examples"])] if main in infos else [],
        "configs": [
            {"config_name": name, **({"default": True} if name == main else {}),
             "data_files": [{"split": "train", "path": g[0] if len(g) == 1 else g}]}
            for name, g in globs.items()
        ],
        "dataset_info": [
            {"config_name": name, "features": FEATURES_YAML,
             "splits": [{"name": "train", "num_bytes": info["num_bytes"], "num_examples": info["num_examples"]}],
             "download_size": info["download_size"], "dataset_size": info["num_bytes"]}
            for name, info in infos.items()
        ],
    }
    template = jinja2.Template(read_resource(DATASET_CARD_TEMPLATE))
    body = template.render(
        repo_id=repo_id or REPO_PLACEHOLDER,
        configs=[{"name": n, "globs": g, **infos[n]} for n, g in globs.items()],
        tables={c: organ_table(counts[c], entries) for c in ("full", "mini") if counts.get(c)},
        table_columns=[f"{k.upper()} {s}" for k, s in TABLE_COLUMNS],
        galleries=galleries,
        gallery_crop=GALLERY_CROP,
        scale_sides=SCALE_SIDES,
        folders=FOLDERS,
        release_folders=RELEASE_FOLDERS,
        standard_mpp=STANDARD_MPP,
        mini_fraction=mini_fraction,
        options=asdict(options),
        benchmark_subsets=[{"name": e.name, "benchmarks": list(e.benchmarks)} for e in present_entries if e.benchmarks],
        subsets=[{**e.to_dict(), "slug": subset_slug(e.name),
                  "rows": sum(n for (s, *_r), n in counts[main].items() if s == e.name)}
                 for e in present_entries],
        paper_url=PAPER_URL, preprint_url=PREPRINT_URL, release_url=RELEASE_URL,
    )
    if "full" in configs:  # the rebuild against the release's counts
        body += coverage_section(coverage(count_rows(out_dir / "data" / "full"), entries, options.s_per_m))
    metadata, licence_text = with_licences(metadata, subset_licences(out_dir), {e.name: e.homepage for e in entries})
    write_atomic(out_dir / LICENCE_FILE, licence_text.encode())
    path = out_dir / "README.md"
    write_atomic(path, _card_text(metadata, body).encode())
    write_atomic(out_dir / STATS_FILE, json.dumps(
        {c: [[*k, n] for k, n in sorted(counts[c].items())] for c in counts}, indent=0).encode())
    return path


class _PlainDumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # libyaml's emitter where PyYAML has it
    """Writes repeated structures (the features of every config) in full: no YAML anchors."""

    def ignore_aliases(self, data) -> bool:
        return True


def _size_category(n: int) -> str:
    return next((label for bound, label in SIZE_CATEGORIES if n < bound), "n>1B")


def config_subsets(data: str, config: str) -> list[str] | None:
    """Subsets of a config of a CPIA dataset (folder or Hub id), from its stats.json; None when unknown."""
    path = Path(data) / STATS_FILE
    if not path.is_file():
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(data, STATS_FILE, repo_type="dataset"))
        except Exception:  # not a CPIA dataset, offline, or no such repo: nothing to record
            return None
    try:
        stats = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return sorted({row[0] for row in stats[config]}) if config in stats else None


def pretraining_record(data: str, config: str) -> dict | None:
    """What a model card records of a run trained on `config` of `data`: {dataset, config, subsets}; None when
    the data is not a CPIA dataset (no stats.json)."""
    subsets = config_subsets(data, config)
    if subsets is None:
        return None
    name = data if not Path(data).exists() else Path(data).name
    return {"dataset": name, "config": config, "subsets": subsets}


def subset_licences(out_dir: Path) -> dict[str, str]:
    """Subset -> licence of every row under `out_dir/data`, read from the two metadata columns only."""
    licences: dict[str, str] = {}
    for path in sorted((out_dir / "data").glob("**/*.parquet")):
        table = read_columns(path, ["subset", "license"])
        for subset, licence in dict.fromkeys(zip(*(table.column(c).to_pylist() for c in table.column_names))):
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


def with_licences(metadata: dict, licences: dict[str, str], homepages: dict[str, str],
                  clearance: Clearance | None = None) -> tuple[dict, str]:
    """Card metadata carrying the licences of `licences` (subset -> licence): `license`, `license_link` to
    LICENSES.md (always: each subset keeps its own licence), gating when a licence asks for terms and what the
    publisher acknowledged (the licence gate's `clearance`); and the text of LICENSES.md."""
    kept = {key: value for key, value in metadata.items() if key not in LICENCE_KEYS}
    licence_keys = {**hub_licence_metadata(licences, LICENCE_FILE), "license_link": LICENCE_FILE}
    acknowledged = clearance.card_metadata() if clearance else {}
    metadata = {**licence_keys, **kept, **gating_metadata(licences), **acknowledged}
    return metadata, licence_file(licences, homepages, clearance)


def card_for_repo(out_dir: Path, repo_id: str, licences: dict[str, str], homepages: dict[str, str],
                  clearance: Clearance | None = None) -> dict[str, bytes]:
    """README.md and LICENSES.md as the Hub repo `repo_id` gets them (repo path -> bytes): the built card with
    the repo id in place of the placeholder, the licence metadata of the pushed subsets and the licence gate's
    `clearance`. Rendered in memory at every push: the folder stays as built, so a push to another id starts
    from the same card."""
    metadata, body = split_card((out_dir / "README.md").read_text(encoding="utf-8"))
    metadata, licence_text = with_licences(metadata, licences, homepages, clearance)
    return {"README.md": _card_text(metadata, body.replace(REPO_PLACEHOLDER, repo_id)).encode(),
            LICENCE_FILE: licence_text.encode()}


def _card_text(metadata: dict, body: str) -> str:
    return "---\n" + yaml.dump(metadata, Dumper=_PlainDumper, sort_keys=False, allow_unicode=True) + "---\n" + body
