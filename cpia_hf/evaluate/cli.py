"""`cpia eval`: kNN, linear probe and fine-tuning of a ViT on a labelled image dataset.

Writes into `--out`: `splits.json` (where every split came from and its rows), `metrics.json`
(settings, per-run and summary metrics, confusion matrices) and `results.md` (the table).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
from accelerate import Accelerator

from ..model.cli import show_defaults
from .data import LabelledData, load_labelled_data
from .features import encoder_fingerprint, extract_features
from .leakage import EvaluatedSplit, note_leakage
from .metrics import (
    METRIC_NAMES,
    METRIC_TITLES,
    classification_metrics,
    confusion,
    evaluation_results,
    format_percent,
    summarize,
)
from .models import load_encoder
from .protocols import FinetuneSettings, KnnSettings, LinearSettings, finetune, knn, linear_probe

PROTOCOLS = ("knn", "linear", "finetune")


def configure_eval(parser: argparse.ArgumentParser) -> None:
    """Arguments of `cpia eval`."""
    parser.add_argument("--model", required=True,
                        help="model folder (timm or transformers layout), Hub repo id, or timm model name")
    parser.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                        help="for a timm model name: load its pretrained weights (--no-pretrained: random init)")
    parser.add_argument("--data", required=True, help="labelled dataset: folder or Hub dataset id")
    parser.add_argument("--config", default=None, help="dataset configuration name (default: the dataset's default)")
    parser.add_argument("--label-column", default="label", help="column of the class labels")
    parser.add_argument("--image-column", default=None, help="default: 'image', else the first image column")
    parser.add_argument("--dataset-name", default=None,
                        help="name recorded in the results and model card (default: the Hub id or folder name)")
    parser.add_argument("--protocol", nargs="+", choices=PROTOCOLS, default=["knn"],
                        help="one or more of knn, linear, finetune")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--cache-dir", type=Path, default=None, help="feature cache (default: OUT/cache)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits made and of the first run")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (features and fine-tuning)")
    parser.add_argument("--num-workers", type=int, default=4,
                        help="DataLoader workers (capped at the CPUs available)")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no", help="mixed precision")
    parser.add_argument("--catalog", type=Path, default=None,
                        help="source catalog for the benchmark-leakage check (default: the project's catalog)")
    parser.add_argument("--card", type=Path, default=None,
                        help="model card (README.md) to fold the results into (default: none)")
    knn_args = parser.add_argument_group("kNN")
    knn_args.add_argument("--knn-k", type=int, default=KnnSettings.k, help="neighbours")
    knn_args.add_argument("--knn-temperature", type=float, default=KnnSettings.temperature,
                          help="temperature of the similarity weights")
    linear_args = parser.add_argument_group("linear probe")
    linear_args.add_argument("--linear-seeds", type=int, default=5, help="number of seeds (runs)")
    linear_args.add_argument("--linear-lr", type=float, default=LinearSettings.lr, help="learning rate")
    linear_args.add_argument("--linear-weight-decay", type=float, default=LinearSettings.weight_decay,
                             help="weight decay")
    linear_args.add_argument("--linear-max-epochs", type=int, default=LinearSettings.max_epochs, help="most epochs")
    linear_args.add_argument("--linear-patience", type=int, default=LinearSettings.patience,
                             help="epochs without validation gain before stopping")
    finetune_args = parser.add_argument_group("fine-tuning")
    finetune_args.add_argument("--finetune-seeds", type=int, default=1, help="number of seeds (runs)")
    finetune_args.add_argument("--epochs", type=int, default=FinetuneSettings.epochs, help="epochs")
    finetune_args.add_argument("--lr", type=float, default=FinetuneSettings.base_lr,
                               help="base learning rate per 256 images")
    finetune_args.add_argument("--layer-decay", type=float, default=FinetuneSettings.layer_decay,
                               help="layer-wise LR decay")
    finetune_args.add_argument("--weight-decay", type=float, default=FinetuneSettings.weight_decay, help="weight decay")
    finetune_args.add_argument("--warmup-epochs", type=int, default=FinetuneSettings.warmup_epochs,
                               help="linear LR warm-up epochs")
    finetune_args.add_argument("--label-smoothing", type=float, default=FinetuneSettings.label_smoothing,
                               help="label smoothing")
    show_defaults(parser)


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate, write splits.json, metrics.json and results.md, and fold them into a card if asked."""
    try:
        data = load_labelled_data(args.data, args.config, args.label_column, args.image_column, args.seed,
                                  args.dataset_name)
        encoder = load_encoder(args.model, pretrained=args.pretrained)
    except (FileNotFoundError, ValueError) as error:
        print(f"cpia eval: error: {error}", file=sys.stderr)
        return 2
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    args.out.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        _write_json(args.out / "splits.json", data.record())

    protocols = {}
    if {"knn", "linear"} & set(args.protocol):
        fingerprint = encoder_fingerprint(encoder)
        cache_dir = args.cache_dir or args.out / "cache"
        features = {
            split: extract_features(encoder, data.splits[split], accelerator, cache_dir, fingerprint,
                                    args.batch_size, args.num_workers)
            for split in data.splits
        }
    if "knn" in args.protocol:
        settings = KnnSettings(args.knn_k, args.knn_temperature)
        protocols["knn"] = _outcome(settings, [(None, knn(features, data.num_classes, settings))], data)
    if "linear" in args.protocol:
        settings = LinearSettings(args.linear_lr, args.linear_weight_decay, args.linear_max_epochs,
                                  args.linear_patience)
        seeds = range(args.seed, args.seed + args.linear_seeds)
        runs = [(seed, linear_probe(features, data.num_classes, seed, settings, accelerator.device))
                for seed in seeds]
        protocols["linear"] = _outcome(settings, runs, data)
    if "finetune" in args.protocol:
        settings = FinetuneSettings(args.epochs, args.lr, args.layer_decay, args.weight_decay, args.warmup_epochs,
                                    label_smoothing=args.label_smoothing, batch_size=args.batch_size,
                                    num_workers=args.num_workers)
        seeds = range(args.seed, args.seed + args.finetune_seeds)
        runs = [(seed, finetune(encoder, data, accelerator, seed, settings)) for seed in seeds]
        protocols["finetune"] = _outcome(settings, runs, data)

    metrics = {
        "model": args.model,
        "dataset": data.name,
        "data": data.data,
        "config": data.config,
        "classes": data.class_names,
        "split_sizes": {name: len(split) for name, split in data.splits.items()},
        "feature_dim": encoder.num_features,
        "protocols": protocols,
    }
    if accelerator.is_main_process:
        _write_json(args.out / "metrics.json", metrics)
        table = results_markdown(metrics, data)
        (args.out / "results.md").write_text(table)
        print(table)
        if args.card is not None:
            from cpia_hf.model.card import update_model_card_evaluation

            try:
                update_model_card_evaluation(args.card, evaluation_results(metrics, spread=True))
            except (FileNotFoundError, ValueError) as error:
                print(f"cpia eval: error: results written to {args.out}, but not to the card: {error}",
                      file=sys.stderr)
                return 2
        note_leakage(args.model, args.data, args.dataset_name, args.out, args.card,  # pre-training held the benchmark?
                     evaluated_split(data), args.catalog)
    return 0


def evaluated_split(data: LabelledData) -> EvaluatedSplit:
    """The test split: where its images come from (the dataset's `train` split is its training split)."""
    test = data.splits["test"]
    how = "made from" if test.made else "which is"
    return EvaluatedSplit(f"test split ({how} split `{test.source_split}` of {data.name})",
                          from_training_split=test.source_split == "train")


def _outcome(settings, runs: list[tuple[int | None, dict]], data: LabelledData) -> dict:
    """Metrics of each run on validation and test, and their summary over runs."""
    records = []
    for seed, result in runs:
        record = {"seed": seed}
        record.update({key: value for key, value in result.items() if key != "probabilities"})
        for split, probabilities in result["probabilities"].items():
            labels = data.splits[split].labels
            record[split] = classification_metrics(labels, probabilities)
            record[f"{split}_confusion_matrix"] = confusion(labels, probabilities)
        records.append(record)
    return {
        "settings": asdict(settings),
        "runs": records,
        "summary": {split: summarize([record[split] for record in records]) for split in ("validation", "test")},
    }


def results_markdown(metrics: dict, data: LabelledData) -> str:
    """A Markdown table of the test metrics (percent, mean ± std over seeds) and how the splits were made."""
    metric_names = [name for name in METRIC_NAMES
                    if any(name in outcome["summary"]["test"] for outcome in metrics["protocols"].values())]
    lines = [
        f"Evaluation of `{metrics['model']}` on `{metrics['dataset']}`"
        + (f" (config `{metrics['config']}`)" if metrics["config"] else "") + ".",
        "",
        "| Protocol | " + " | ".join(METRIC_TITLES[name] for name in metric_names) + " |",
        "| --- | " + " | ".join("---:" for _ in metric_names) + " |",
    ]
    for protocol, outcome in metrics["protocols"].items():
        cells = [format_percent(outcome["summary"]["test"][name]) if name in outcome["summary"]["test"] else "–"
                 for name in metric_names]
        lines.append(f"| {_protocol_title(protocol, outcome)} | " + " | ".join(cells) + " |")
    lines += ["", "Test split, percent; mean ± standard deviation over seeds where there are several runs.", ""]
    for name, split in data.splits.items():
        origin = f"made from split `{split.source_split}` (stratified, seed {data.seed})" if split.made \
            else f"split `{split.source_split}` of the dataset"
        lines.append(f"- {name}: {len(split)} images, {origin}")
    lines.append(f"- classes: {', '.join(data.class_names)}")
    return "\n".join(lines) + "\n"


def _protocol_title(protocol: str, outcome: dict) -> str:
    settings = outcome["settings"]
    seeds = f"{len(outcome['runs'])} seed" + ("s" if len(outcome["runs"]) > 1 else "")
    if protocol == "knn":
        return f"kNN (k={settings['k']}, T={settings['temperature']})"
    if protocol == "linear":
        return f"Linear probe ({seeds})"
    return f"Fine-tuning ({settings['epochs']} epochs, {seeds})"


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")

