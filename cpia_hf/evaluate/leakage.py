"""Benchmark leakage: was the evaluated dataset's source in the encoder's pre-training data?

The model card of a CPIA-trained encoder records its pre-training data (`cpia_pretraining` in the card
metadata: dataset, config, subsets). The catalog names the public benchmarks each subset overlaps
(`benchmarks:`: names and Hub dataset ids). When the evaluated dataset (Hub id, folder name or
--dataset-name) is one of them, or a pre-training subset itself, `cpia eval` names the subset, which of its
splits pre-training used and whether the evaluated split was among them: a warning when it was (or may
have been), a note when only the benchmark's training split was used and the evaluated split is another;
it writes the same into metrics.json, results.md and the model card.
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
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
    """Pre-training subsets whose benchmarks (or own name) match the evaluated dataset: the subset, the
    matched benchmark names other than the subset itself, and `training_split_only` (True: pre-training saw
    only the split the catalog's `train_pattern` names, as the mini configs take labelled ROI sources;
    False: all of it; None: the subset is not in the catalog)."""
    by_name = {e.name: e for e in entries}
    mini = str(pretraining.get("config", "")).startswith("mini")
    leaks = []
    for subset in pretraining.get("subsets", []):
        entry = by_name.get(subset)
        names = [subset, *(entry.benchmarks if entry else ())]
        matched = [n for n in names if dataset_aliases(n) & aliases]
        if matched:
            split_only = None if entry is None else bool(mini and entry.train_pattern is not None)
            leaks.append({"subset": subset, "benchmarks": [n for n in matched if n != subset],
                          "training_split_only": split_only,
                          "train_pattern": entry.train_pattern if entry else None})
    return leaks


@dataclass(frozen=True)
class EvaluatedSplit:
    """The split whose results are reported: in words, and whether it was drawn from the benchmark's own
    training split (the split a mini config takes of a labelled ROI source)."""

    description: str = "test split"
    from_training_split: bool = True  # unknown origin: assume the worst


def leak_text(leak: dict, evaluated: EvaluatedSplit) -> tuple[str, bool]:
    """One leak in words, and whether the evaluated split may hold images seen in pre-training."""
    named = f"{leak['subset']} ({', '.join(leak['benchmarks'])})" if leak["benchmarks"] else leak["subset"]
    if leak["training_split_only"] is None:
        return (f"{named}: which of its splits entered pre-training is unknown (not in the catalog; "
                "`cpia eval --catalog` names the one the data was built from)"), True
    if not leak["training_split_only"]:
        return (f"{named}: all of its images entered pre-training, so the evaluated {evaluated.description} "
                "was among them"), True
    among = evaluated.from_training_split
    verdict = "was among them" if among else "was not among them"
    return (f"{named}: only its training split ({leak['train_pattern']}) entered pre-training; the evaluated "
            f"{evaluated.description} {verdict}"), among


def leakage_warning(model: str, data: str, dataset_name: str | None, catalog: Path | None = None,
                    evaluated: EvaluatedSplit = EvaluatedSplit()) -> tuple[str, bool] | None:
    """The overlap of the evaluated dataset with the model's pre-training data in words, and whether the
    evaluated images may have been seen (a warning) or not (a note); None without overlap."""
    pretraining = read_pretraining(model)
    if not pretraining:
        return None
    entries = load_catalog(catalog or default_catalog_path())
    leaks = find_leaks(pretraining, dataset_aliases(data, dataset_name), entries)
    if not leaks:
        return None
    texts = [leak_text(leak, evaluated) for leak in leaks]
    seen = any(among for _, among in texts)
    sources = "; ".join(text for text, _ in texts)
    head = (f"benchmark leakage: {dataset_name or data} overlaps pre-training data of this model "
            f"({pretraining.get('dataset')}, config {pretraining.get('config')}): {sources}.")
    if seen:
        return (head + " Images of the evaluated split (or of the same source) were seen in pre-training, so these "
                "results are optimistic; pre-train on a `_clean` config to evaluate on this benchmark."), True
    return (head + " The evaluated images were not seen in pre-training; other images of the same source were."), False


def note_leakage(model: str, data: str, dataset_name: str | None, out_dir: Path, card: Path | None,
                 evaluated: EvaluatedSplit = EvaluatedSplit(), catalog: Path | None = None) -> str | None:
    """Print the warning (or the note, when the evaluated split was not seen) and write it into
    out_dir/metrics.json, out_dir/results.md and the card, if any."""
    found = leakage_warning(model, data, dataset_name, catalog, evaluated)
    if found is None:
        return None
    warning, seen = found
    label, key = ("Warning", "leakage_warning") if seen else ("Note", "leakage_note")
    print(f"{label.upper()}: {warning}", file=sys.stderr)
    metrics_path = out_dir / "metrics.json"
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        metrics_path.write_text(json.dumps({**metrics, key: warning}, indent=2))
    results = out_dir / "results.md"
    if results.is_file():
        results.write_text(f"> **{label} — {warning}**\n\n" + results.read_text())
    if card is not None and card.is_file():
        text = card.read_text(encoding="utf-8")
        if CARD_START in text:
            head, rest = text.split(CARD_START, 1)
            text = head + rest.split(CARD_END, 1)[1].lstrip("\n")
        section = f"{CARD_START}\n> **{label} — {warning}**\n{CARD_END}\n\n"
        marker = "<!-- evaluation:start -->"
        text = text.replace(marker, section + marker, 1) if marker in text else text + "\n" + section
        card.write_text(text, encoding="utf-8")
    return warning
