"""Model card (README.md) of an exported encoder, filled from the training run, plus its loss curve.

`ModelCardContext` is the one schema of what a card says about a model: `training_context` fills the
recipe from a training run, `cpia_hf.model.export` the architecture and preprocessing, `cpia eval --card` the results;
it round-trips through `card_context.json` in every checkpoint (`cpia export --card-context FILE`).
"""
from __future__ import annotations

import json
import platform
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from matplotlib.figure import Figure

from ..resources import MODEL_CARD_TEMPLATE, read_resource
from ..standard import MINI_SIDE, SCALE_SIDES, SCALES, STANDARD_MPP

Method = Literal["mae", "dino", "mocov3"]

LOSS_CURVE_NAME = "loss_curve.png"
CARD_CONTEXT = "card_context.json"  # a run's ModelCardContext, in its output folder and each checkpoint
HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
HUB_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # namespace/name: what `datasets:` metadata may name
METHOD_NAMES = {"mae": "MAE", "mocov3": "MoCo v3", "dino": "DINO"}
EVAL_START, EVAL_END = "<!-- evaluation:start -->", "<!-- evaluation:end -->"
# Where the CPIA sources and their licences are listed: the dataset card on the Hub (and its LICENSES.md,
# which `cpia push` writes), else the original release, for a model trained on a local folder.
CPIA_RELEASE_URL = "https://github.com/zhanglab2021/CPIA_Dataset"
DATASET_LICENCE_FILE = "LICENSES.md"
RECIPE_FIELDS = (
    ("method", "Method"), ("dataset", "Data"), ("dataset_config", "Data config"), ("base_model", "Initialised from"),
    ("steps", "Steps"), ("epochs", "Epochs"), ("global_batch_size", "Global batch"), ("lr", "Learning rate"),
    ("weight_decay", "Weight decay"), ("warmup_steps", "Warm-up steps"), ("augmentations", "Augmentations"),
    ("mixed_precision", "Mixed precision"), ("hardware", "Hardware"), ("seed", "Seed"),
)


@dataclass
class ModelCardContext:
    """What a model card says about a model; every field optional except `model_name` at writing time."""

    model_name: str | None = None  # name on the card and in model-index
    repo_id: str | None = None  # Hub model repo, for the usage snippets
    # the encoder (set by cpia_hf.model.export)
    architecture: str | None = None  # timm architecture name
    num_features: int | None = None
    depth: int | None = None  # transformer blocks
    num_heads: int | None = None
    patch_size: int | None = None
    model_overrides: dict[str, Any] | None = None  # timm kwargs that differ from the architecture's defaults
    embedding: str = "CLS token of the last block, after the final LayerNorm"
    image_size: list[int] | None = None  # eval input (H, W)
    mean: list[float] | None = None  # normalisation of the inputs
    std: list[float] | None = None
    # the run (set by the trainer)
    method: Method | None = None
    dataset: str | None = None  # CPIA Hub id (a local folder is shown by its name only)
    dataset_config: str | None = None  # e.g. "mini"
    scales: list[str] | None = None  # CPIA scales trained on (all when empty)
    input_mpp: dict[str, float] | None = None  # µm per stored pixel of each scale's tiles in that config
    base_model: str | None = None  # Hub id of the weights training started from
    init: str | None = None  # timm pretrained tag training started from, "none" for random init
    license: str = "other"  # Hub license id; "other": the terms of the CPIA source datasets
    steps: int | None = None
    epochs: float | None = None
    global_batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | str | None = None  # a number, or "start -> end (cosine)"
    warmup_steps: int | None = None
    augmentations: list[str] | None = None
    hardware: str | None = None
    mixed_precision: str | None = None
    seed: int | None = None
    config: dict[str, Any] | None = None  # the full training config, shown verbatim
    loss_history: list[list[float]] = field(default_factory=list)  # [step, loss] pairs -> loss_curve.png
    final_loss: float | None = None
    steps_done: int | None = None  # set in a checkpoint's copy
    evaluation: list[dict[str, Any]] = field(default_factory=list)  # task, dataset, metric, value[, split, protocol]
    # pre-training data {dataset, config, subsets} (cpia_hf.dataset.card.pretraining_record), card metadata
    # `cpia_pretraining`: `cpia eval` warns when the evaluated benchmark's source is among the subsets
    pretraining: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "card context") -> ModelCardContext:
        """Build from a JSON-like dict; an unknown key is an error naming `source`."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown card context key(s) {unknown}")
        return cls(**{k: v for k, v in values.items() if v is not None})

    @classmethod
    def coerce(cls, value: ModelCardContext | dict[str, Any] | None) -> ModelCardContext:
        """A context from a context, a dict of its fields, or nothing."""
        if isinstance(value, cls):
            return value
        return cls.from_dict(dict(value or {}))

    @classmethod
    def read(cls, path: Path) -> ModelCardContext:
        """Read a `card_context.json`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: card context file not found")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not JSON ({error})") from error
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a JSON object of card context fields")
        return cls.from_dict(values, source=str(path))

    def write(self, path: Path) -> Path:
        """Write as `card_context.json` (indented JSON)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return Path(path)

    def with_losses(self, loss_history: list) -> ModelCardContext:
        """This context with a run's [step, loss] history so far (and its last loss)."""
        return replace(self, loss_history=[list(point) for point in loss_history],
                       final_loss=loss_history[-1][1] if loss_history else None)


@dataclass(frozen=True)
class RunFacts:
    """What a trainer settles at set-up that the card states beside the run's config."""

    total_steps: int
    steps_per_epoch: int
    global_batch: int
    lr: float  # peak LR
    weight_decay_end: float
    warmup_steps: int
    num_processes: int
    hardware: str  # e.g. `2 x NVIDIA A100-SXM4-80GB` (`hardware_description`)
    mixed_precision: str
    augmentations: list[str]  # the views in words


def hardware_description(num_processes: int, device: torch.device) -> str:
    """Process count and device name for the model card, e.g. `2 x NVIDIA A100-SXM4-80GB`."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()})"
    return f"{num_processes} x {name}"


def card_dataset(data: str, dataset_id: str | None) -> str:
    """The data as the card names it: `dataset_id`, else `data` (a local folder shows its name only)."""
    if dataset_id:
        return dataset_id
    return Path(data).name if Path(data).exists() else data


def input_mpp(config: str, scales: list[str]) -> dict[str, float]:
    """µm per stored pixel of the WSI tiles of each scale in `config` (mini resizes every tile to 384 px)."""
    resized = config.startswith("mini")
    return {scale: round(STANDARD_MPP * SCALE_SIDES[scale] / MINI_SIDE, 4) if resized else STANDARD_MPP
            for scale in (scales or SCALES)}


def training_context(config: dict[str, Any], facts: RunFacts) -> ModelCardContext:
    """What the card says about a training run: its config (a `TrainConfig` as a dict) and set-up facts."""
    weight_decay: float | str = config["weight_decay"]
    if facts.weight_decay_end != config["weight_decay"]:
        weight_decay = f"{config['weight_decay']} -> {facts.weight_decay_end} (cosine)"
    recorded = {**config, "num_processes": facts.num_processes, "steps_per_epoch": facts.steps_per_epoch}
    augment, init = config["augment"], config["init"]
    return ModelCardContext(
        method=config["method"], dataset=card_dataset(config["data"], config["dataset_id"]),
        dataset_config=config["config"], scales=list(config["scales"]) or None,
        input_mpp=input_mpp(config["config"], config["scales"]),
        base_model=f"timm/{init}" if init else None, init=init or "none",
        steps=facts.total_steps, epochs=round(facts.total_steps / facts.steps_per_epoch, 3),
        global_batch_size=facts.global_batch, lr=facts.lr, weight_decay=weight_decay,
        warmup_steps=facts.warmup_steps, augmentations=facts.augmentations,
        mean=list(augment["mean"]), std=list(augment["std"]), hardware=facts.hardware,
        mixed_precision=facts.mixed_precision, seed=config["seed"],
        config=json.loads(json.dumps(recorded, default=str)),
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
            metric_args=spread_of(result),
        ))
    return entries


def spread_of(result: dict) -> dict | None:
    """`{"std", "runs"}` of a result made by several runs (kept in model-index `metric_args`), else None."""
    if result.get("std") is None or not result.get("runs"):
        return None
    return {"std": float(result["std"]), "runs": int(result["runs"])}


def metric_label(result: dict) -> str:
    """Metric name shown on the Hub for a result of a named protocol (knn, linear, finetune)."""
    return f"{result['metric']} ({result['protocol']})"


def protocol_of(metric_name: str | None) -> str | None:
    """Inverse of `metric_label` for results read back from a card."""
    match = re.fullmatch(r".+ \((\w+)\)", metric_name or "")
    return match.group(1) if match else None


def shown_value(result: dict) -> str:
    """A result's value (a fraction in [0, 1]) and, when several runs made it, `± std` in the same unit."""
    value = result["value"]
    shown = f"{value:.4g}" if isinstance(value, float) else str(value)
    if result.get("std") is not None and (result.get("runs") or 0) > 1:
        shown += f" ± {float(result['std']):.2g} ({result['runs']} runs)"
    return shown


def evaluation_table(results: list[dict]) -> str:
    """Markdown table of ``results`` between the markers that ``update_model_card_evaluation`` replaces.

    Values are fractions in [0, 1] (accuracy 0.9758, not 97.58 %), mean ± sample std over runs.
    """
    if results:
        rows = ["Values are fractions in [0, 1]: mean ± sample standard deviation over runs (seeds / folds).", "",
                "| Task | Dataset | Split | Protocol | Metric | Value |", "| --- | --- | --- | --- | --- | --- |"]
        for result in results:
            shown = shown_value(result)
            rows.append(f"| {result['task']} | {result['dataset']} | {result.get('split', '')} "
                        f"| {result.get('protocol', '')} | {result['metric']} | {shown} |")
        body = "\n".join(rows)
    else:
        body = "No evaluation recorded yet (`cpia eval ... --card README.md` adds it here)."
    return f"{EVAL_START}\n{body}\n{EVAL_END}"


def dataset_name(dataset: str) -> str:
    """A Hub id as is; a local folder by its name (a card must not show the machine's paths)."""
    return dataset if HUB_ID.match(dataset) else Path(dataset).name


def dataset_card_url(dataset: str | None) -> str:
    """The card that lists the CPIA sources and their licences: the Hub dataset's, else the release's."""
    if dataset and HUB_REPO_ID.match(dataset):
        return f"https://huggingface.co/datasets/{dataset}"
    return CPIA_RELEASE_URL


def licence_link(dataset: str | None) -> str:
    """`license_link` of a card under the sources' terms: the Hub dataset's licence file, else the release."""
    if dataset and HUB_REPO_ID.match(dataset):
        return f"{dataset_card_url(dataset)}/blob/main/{DATASET_LICENCE_FILE}"
    return CPIA_RELEASE_URL


def card_data(context: ModelCardContext) -> ModelCardData:
    """Hub metadata of the card."""
    license_id = context.license
    return ModelCardData(
        license=license_id,
        license_name="cpia-source-licenses" if license_id == "other" else None,
        license_link=licence_link(context.dataset) if license_id == "other" else None,
        library_name="timm",
        pipeline_tag="image-feature-extraction",
        tags=["pathology", "histology", "self-supervised", "vision-transformer", "cpia"]
        + ([context.method] if context.method else []),
        # Hub metadata names Hub repos only; a local folder (shown by name in the text) is left out
        datasets=[context.dataset] if context.dataset and HUB_REPO_ID.match(context.dataset) else None,
        base_model=context.base_model,
        model_name=context.model_name,
        eval_results=eval_results(context.model_name, context.evaluation) if context.evaluation else None,
        cpia_pretraining=context.pretraining,
    )


def training_recipe(context: ModelCardContext) -> list[tuple[str, str]]:
    """(label, value) rows of the recipe fields the run recorded."""
    rows = []
    for key, label in RECIPE_FIELDS:
        value = getattr(context, key)
        if value is None:
            continue
        rows.append((label, ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)))
    return rows


def write_model_card(out_dir: Path, card_context: ModelCardContext | dict, *, repo_id: str | None = None) -> Path:
    """Write ``out_dir``/README.md (and loss_curve.png when the run has a loss history); returns its path."""
    context = ModelCardContext.coerce(card_context)
    if not context.model_name:
        raise ValueError("card_context needs model_name")
    if context.dataset:
        context = replace(context, dataset=dataset_name(str(context.dataset)))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if context.loss_history:
        plot_loss_curve(context.loss_history, out_dir / LOSS_CURVE_NAME)
    config = context.config
    if config:  # the recipe, without this machine's paths
        config = {k: dataset_name(str(v)) if k == "data" else v for k, v in config.items() if k not in ("out", "cache_dir")}
    card = ModelCard.from_template(
        card_data(context),
        template_str=read_resource(MODEL_CARD_TEMPLATE),
        context=context,
        method_name=METHOD_NAMES.get(context.method, context.method),
        repo_id=repo_id,
        timm_ref=f"hf-hub:{repo_id}" if repo_id else f"local-dir:./{out_dir.name}",
        transformers_ref=repo_id or f"./{out_dir.name}",
        recipe=training_recipe(context),
        config_yaml=yaml.safe_dump(config, sort_keys=False).strip() if config else None,
        loss_curve=LOSS_CURVE_NAME if context.loss_history else None,
        evaluation_table=evaluation_table(context.evaluation),
        standard_mpp=STANDARD_MPP,
        dataset_card_url=dataset_card_url(context.dataset),
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
         **({"protocol": protocol_of(r.metric_name)} if protocol_of(r.metric_name) else {}),
         **(spread_of(r.metric_args or {}) or {})}
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
