"""Model card (README.md) of an exported encoder, filled from the training run, plus its loss curve.

``card_context`` keys (all optional unless noted):
    model_name (str, required)          name on the card and in model-index
    repo_id                             Hub model repo, used by cpia_hf.model.export for the usage snippets
    architecture, num_features          timm architecture and feature size (set by cpia_hf.model.export)
    image_size, mean, std               eval preprocessing (set by cpia_hf.model.export)
    method                              "mae" | "mocov3" | "dino"
    dataset, dataset_config             CPIA Hub id or local data folder, and its config (e.g. "mini")
    base_model                          Hub id of the weights training started from
    license                             Hub license id (default "other": the weights follow the
                                        terms of the CPIA source datasets)
    steps, epochs, global_batch_size, lr, weight_decay, warmup_steps, augmentations (list),
    hardware, mixed_precision, seed     the training recipe actually used
    config (dict)                       the full training config, shown verbatim
    loss_history (list of [step, loss]) drawn to loss_curve.png
    evaluation (list of dicts)          task, dataset, metric, value (optional split), from cpia eval
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from matplotlib.figure import Figure

from ..resources import MODEL_CARD_TEMPLATE, read_resource
from ..standard import STANDARD_MPP

LOSS_CURVE_NAME = "loss_curve.png"
HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
METHOD_NAMES = {"mae": "MAE", "mocov3": "MoCo v3", "dino": "DINO"}
EVAL_START, EVAL_END = "<!-- evaluation:start -->", "<!-- evaluation:end -->"
RECIPE_FIELDS = (
    ("method", "Method"), ("dataset", "Data"), ("dataset_config", "Data config"), ("base_model", "Initialised from"),
    ("steps", "Steps"), ("epochs", "Epochs"), ("global_batch_size", "Global batch"), ("lr", "Learning rate"),
    ("weight_decay", "Weight decay"), ("warmup_steps", "Warm-up steps"), ("augmentations", "Augmentations"),
    ("mixed_precision", "Mixed precision"), ("hardware", "Hardware"), ("seed", "Seed"),
)


def plot_loss_curve(loss_history: list, path: Path) -> Path:
    """Training loss against step as a PNG; ``loss_history`` is a list of [step, loss]."""
    if not loss_history:
        raise ValueError("loss_history is empty, nothing to plot")
    steps, losses = zip(*((float(step), float(loss)) for step, loss in loss_history))
    # Figure without pyplot: no global backend state, renders with Agg in any thread
    figure = Figure(figsize=(6, 3.5), dpi=100)
    axes = figure.subplots()
    axes.plot(steps, losses, linewidth=1.2)
    axes.set_xlabel("step")
    axes.set_ylabel("training loss")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


def eval_results(model_name: str, results: list[dict]) -> list[EvalResult]:
    """Hub model-index entries of ``results`` (downstream tasks are image classification)."""
    entries = []
    for index, result in enumerate(results):
        missing = [key for key in ("task", "dataset", "metric", "value") if key not in result]
        if missing:
            raise ValueError(f"evaluation result {index} of {model_name} lacks {', '.join(missing)}: {result}")
        entries.append(EvalResult(
            task_type="image-classification", task_name=str(result["task"]),
            dataset_type=str(result["dataset"]), dataset_name=str(result["dataset"]),
            dataset_split=result.get("split"), metric_type=str(result["metric"]),
            metric_name=metric_label(result) if result.get("protocol") else None, metric_value=result["value"],
        ))
    return entries


def metric_label(result: dict) -> str:
    """Metric name shown on the Hub for a result of a named protocol (knn, linear, finetune)."""
    return f"{result['metric']} ({result['protocol']})"


def protocol_of(metric_name: str | None) -> str | None:
    """Inverse of `metric_label` for results read back from a card."""
    match = re.fullmatch(r".+ \((\w+)\)", metric_name or "")
    return match.group(1) if match else None


def evaluation_table(results: list[dict]) -> str:
    """Markdown table of ``results`` between the markers that ``update_model_card_evaluation`` replaces."""
    if results:
        rows = ["| Task | Dataset | Split | Protocol | Metric | Value |", "| --- | --- | --- | --- | --- | --- |"]
        for result in results:
            value = result["value"]
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            rows.append(f"| {result['task']} | {result['dataset']} | {result.get('split', '')} "
                        f"| {result.get('protocol', '')} | {result['metric']} | {shown} |")
        body = "\n".join(rows)
    else:
        body = "No evaluation recorded yet (`cpia eval ... --card README.md` adds it here)."
    return f"{EVAL_START}\n{body}\n{EVAL_END}"


def dataset_name(dataset: str) -> str:
    """A Hub id as is; a local folder by its name (a card must not show the machine's paths)."""
    return dataset if HUB_ID.match(dataset) else Path(dataset).name


def card_data(card_context: dict) -> ModelCardData:
    """Hub metadata of the card."""
    method = card_context.get("method")
    license_id = card_context.get("license", "other")
    dataset = card_context.get("dataset")
    evaluation = card_context.get("evaluation") or []
    return ModelCardData(
        license=license_id,
        license_name="cpia-source-licenses" if license_id == "other" else None,
        library_name="timm",
        pipeline_tag="image-feature-extraction",
        tags=["pathology", "histology", "self-supervised", "vision-transformer", "cpia"]
        + ([method] if method else []),
        datasets=[dataset] if dataset else None,
        base_model=card_context.get("base_model"),
        model_name=card_context["model_name"],
        eval_results=eval_results(card_context["model_name"], evaluation) if evaluation else None,
    )


def training_recipe(card_context: dict) -> list[tuple[str, str]]:
    """(label, value) rows of the recipe fields the run recorded."""
    rows = []
    for key, label in RECIPE_FIELDS:
        value = card_context.get(key)
        if value is None:
            continue
        rows.append((label, ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)))
    return rows


def write_model_card(out_dir: Path, card_context: dict, *, repo_id: str | None = None) -> Path:
    """Write ``out_dir``/README.md (and loss_curve.png when the run has a loss history); returns its path."""
    if "model_name" not in card_context:
        raise ValueError("card_context needs model_name")
    if card_context.get("dataset"):
        card_context = {**card_context, "dataset": dataset_name(str(card_context["dataset"]))}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loss_history = card_context.get("loss_history") or []
    if loss_history:
        plot_loss_curve(loss_history, out_dir / LOSS_CURVE_NAME)
    template = read_resource(MODEL_CARD_TEMPLATE)
    config = card_context.get("config")
    if config:  # the recipe, without this machine's paths
        config = {k: dataset_name(str(v)) if k == "data" else v for k, v in config.items() if k not in ("out", "cache_dir")}
    card = ModelCard.from_template(
        card_data(card_context),
        template_str=template,
        context=card_context,
        method_name=METHOD_NAMES.get(card_context.get("method"), card_context.get("method")),
        repo_id=repo_id,
        timm_ref=f"hf-hub:{repo_id}" if repo_id else f"local-dir:./{out_dir.name}",
        transformers_ref=repo_id or f"./{out_dir.name}",
        recipe=training_recipe(card_context),
        config_yaml=yaml.safe_dump(config, sort_keys=False).strip() if config else None,
        loss_curve=LOSS_CURVE_NAME if loss_history else None,
        evaluation_table=evaluation_table(card_context.get("evaluation") or []),
        standard_mpp=STANDARD_MPP,
    )
    path = out_dir / "README.md"
    card.save(path)
    return path


def update_model_card_evaluation(card_path: Path, results: list[dict]) -> None:
    """Fold ``results`` into an existing card: its evaluation table and Hub model-index.

    A result replaces an earlier one of the same task, dataset, split, protocol and metric; others are kept.
    """
    card_path = Path(card_path)
    card = ModelCard.load(card_path)
    if EVAL_START not in card.text or EVAL_END not in card.text:
        raise ValueError(f"{card_path}: no evaluation section ({EVAL_START} ... {EVAL_END})")
    model_name = card.data.model_name or card_path.parent.name
    known = [
        {"task": r.task_name or r.task_type, "dataset": r.dataset_name, "metric": r.metric_type,
         "value": r.metric_value, **({"split": r.dataset_split} if r.dataset_split else {}),
         **({"protocol": protocol_of(r.metric_name)} if protocol_of(r.metric_name) else {})}
        for r in card.data.eval_results or []
    ]

    def key(result: dict) -> tuple:
        return result["task"], result["dataset"], result.get("split"), result.get("protocol"), result["metric"]

    new_keys = {key(result) for result in results}
    merged = [result for result in known if key(result) not in new_keys] + list(results)
    card.data.model_name = model_name
    card.data.eval_results = eval_results(model_name, merged)
    head, rest = card.text.split(EVAL_START, 1)
    card.text = head + evaluation_table(merged) + rest.split(EVAL_END, 1)[1]
    card.save(card_path)
