"""Benchmark leakage: was the evaluated dataset's source in the encoder's pre-training data?

The model card of a CPIA-trained encoder records its pre-training data (`cpia_pretraining` in the card
metadata: dataset, config, subsets). The catalog names the public benchmarks each subset overlaps
(`benchmarks:`: names and Hub dataset ids). When the evaluated dataset (Hub id, folder name or
--dataset-name) is one of them, or a pre-training subset itself, `cpia eval` prints a warning and writes it
into metrics.json, results.md and the model card.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

from ..dataset.catalog import CatalogEntry, default_catalog_path, load_catalog

CARD_START, CARD_END = "<!-- leakage:start -->", "<!-- leakage:end -->"


def normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def dataset_aliases(*names: str | None) -> set[str]:
    """Normalised forms of the evaluated dataset's identifiers: as given, and a Hub id's or path's last part."""
    aliases = set()
    for name in filter(None, names):
        aliases.update({normalise(name), normalise(re.split(r"[/\\]", name.rstrip("/\\"))[-1])})
    return aliases - {""}


def read_pretraining(model: str) -> dict | None:
    """`cpia_pretraining` of the model's card (folder or Hub id); None when the card or the record is absent."""
    path = Path(model) / "README.md"
    if not path.is_file():
        if Path(model).exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", model):
            return None
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(model, "README.md"))
        except Exception:  # a timm name, offline, or no card: nothing to compare with
            return None
    text = path.read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        return None
    metadata = yaml.safe_load(text[4:].split("\n---\n", 1)[0]) or {}
    return metadata.get("cpia_pretraining")


def find_leaks(pretraining: dict, aliases: set[str], entries: list[CatalogEntry]) -> list[dict]:
    """Pre-training subsets whose benchmarks (or own name) match the evaluated dataset."""
    by_name = {e.name: e for e in entries}
    leaks = []
    for subset in pretraining.get("subsets", []):
        names = [subset, *(by_name[subset].benchmarks if subset in by_name else ())]
        matched = [n for n in names if dataset_aliases(n) & aliases]
        if matched:
            leaks.append({"subset": subset, "benchmarks": matched})
    return leaks


def leakage_warning(model: str, data: str, dataset_name: str | None, catalog: Path | None = None) -> str | None:
    pretraining = read_pretraining(model)
    if not pretraining:
        return None
    entries = load_catalog(catalog or default_catalog_path())
    leaks = find_leaks(pretraining, dataset_aliases(data, dataset_name), entries)
    if not leaks:
        return None
    sources = "; ".join(f"{leak['subset']} ({', '.join(leak['benchmarks'])})" for leak in leaks)
    return (f"benchmark leakage: {dataset_name or data} overlaps pre-training data of this model "
            f"({pretraining.get('dataset')}, config {pretraining.get('config')}): {sources}. Its images (or images of "
            f"the same source) were seen in pre-training, so these results are optimistic; pre-train on a `_clean` "
            f"config to evaluate on this benchmark.")


def note_leakage(model: str, data: str, dataset_name: str | None, out_dir: Path, card: Path | None) -> str | None:
    """Print the warning and write it into out_dir/metrics.json, out_dir/results.md and the card, if any."""
    warning = leakage_warning(model, data, dataset_name)
    if warning is None:
        return None
    print(f"WARNING: {warning}", file=sys.stderr)
    metrics_path = out_dir / "metrics.json"
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        metrics_path.write_text(json.dumps({**metrics, "leakage_warning": warning}, indent=2))
    results = out_dir / "results.md"
    if results.is_file():
        results.write_text(f"> **Warning — {warning}**\n\n" + results.read_text())
    if card is not None and card.is_file():
        text = card.read_text(encoding="utf-8")
        if CARD_START in text:
            head, rest = text.split(CARD_START, 1)
            text = head + rest.split(CARD_END, 1)[1].lstrip("\n")
        section = f"{CARD_START}\n> **Warning — {warning}**\n{CARD_END}\n\n"
        marker = "<!-- evaluation:start -->"
        text = text.replace(marker, section + marker, 1) if marker in text else text + "\n" + section
        card.write_text(text, encoding="utf-8")
    return warning
