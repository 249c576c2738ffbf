"""`TrainConfig`: every setting of a pre-training run, each declared once.

A setting is a dataclass field whose metadata holds its help text (and its flag group); the `cpia train`
flags, their help and the recipe keys are generated from these fields. A field without a default takes
the method's value from `METHOD_DEFAULTS`, the one place where the official recipe of each method lives;
a method named there for a field that has a default overrides it for that method only.
"""
from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass
from typing import Any, Literal, get_args

from ..model.card import Method
from .augment import AugmentConfig
from .settings import setting

MixedPrecision = Literal["no", "bf16", "fp16"]
METHOD_NAMES: tuple[Method, ...] = get_args(Method)


@dataclass(kw_only=True)
class TrainConfig:
    """Everything a run needs. `cpia train` fills unset values from a `--recipe` file, else from the
    method's defaults (`METHOD_DEFAULTS`), else the field's default; the whole config is saved as
    `train_config.json`."""

    method: Method = setting(help="pre-training objective (required here or in the recipe)", group="data")
    data: str = setting(help="CPIA dataset folder or Hub id (required here or in the recipe)", group="data")
    out: str = setting(help="output folder: checkpoints, log, encoder, Hub folder (required here or in the recipe)",
                       group="data")
    config: str = setting("mini", help="dataset config (mini, mini_clean, XL, L, M, S, full, full_clean)",
                          group="data")
    dataset_id: str | None = setting(None, group="data", shown="--data when it is a Hub id",
                                     help="Hub id of the data for the model card")
    model: str = setting("vit_small_patch16_224", help="timm ViT architecture", group="model")
    model_kwargs: dict[str, Any] = setting(default_factory=dict, group="model", shown="none", metavar="JSON",
                                           help='extra timm kwargs, e.g. \'{"depth": 2, "embed_dim": 64}\'')
    init: str | None = setting(None, group="model", shown="random init",
                               help="pretrained timm weights to start from")
    model_name: str | None = setting(None, group="model", shown="<arch>.cpia_<method>_<config>",
                                     help="name of the published model")
    scales: list[str] = setting(default_factory=list, group="data", shown="all",
                                help="keep only these scales (XL L M S)")
    organs: list[str] = setting(default_factory=list, group="data", shown="all", help="keep only these organs")
    streaming: bool = setting(False, help="stream the config instead of downloading it (large configs)", group="data")
    cache_dir: str | None = setting(None, help="datasets cache folder", shown="the datasets library's", group="data")
    batch_size: int = setting(help="images per process per micro-batch", group="optimisation")
    grad_accum: int = setting(1, help="micro-batches per optimizer step (MAE only)", group="optimisation")
    epochs: int = setting(help="passes over the data (sets the schedules' length)", group="optimisation")
    max_steps: int | None = setting(None, group="optimisation", shown="all epochs",
                                    help="stop, and end the schedules, after this many steps")
    steps_per_epoch: int | None = setting(None, group="optimisation", shown="from the split size",
                                          help="epoch length for streaming data")
    base_lr: float = setting(help="peak LR per 256 images (lr = base_lr * global batch / 256)", group="optimisation")
    lr: float | None = setting(None, help="absolute peak LR", shown="from --base-lr", group="optimisation")
    min_lr: float = setting(help="LR at the end of the cosine", group="optimisation")
    warmup_epochs: float = setting(help="linear LR warm-up, in epochs", group="optimisation")
    warmup_steps: int | None = setting(None, help="LR warm-up in steps", shown="from --warmup-epochs",
                                       group="optimisation")
    weight_decay: float = setting(help="AdamW weight decay (not on norms and biases)", group="optimisation")
    weight_decay_end: float | None = setting(None, group="optimisation", shown="none, constant",
                                             help="cosine weight-decay target")
    betas: tuple[float, float] = setting(help="AdamW betas", metavar="B1,B2", group="optimisation")
    clip_grad: float | None = setting(None, group="optimisation", shown="off",
                                      help="gradient clipping threshold, the method's rule (0: off)")
    drop_path: float = setting(0.0, help="stochastic depth of the trained encoder", group="model")
    mixed_precision: MixedPrecision | None = setting(None, group="optimisation", help="mixed precision",
                                                     shown="bf16 on GPUs that support it, else no")
    cpu: bool = setting(False, help="train on CPU even when a GPU is present", group="optimisation")
    seed: int = setting(0, help="seeds weights, data order, views, masks and drop-path", group="optimisation")
    num_workers: int = setting(4, help="DataLoader workers per process (capped at the CPUs available)")
    log_every: int = setting(10, help="steps between log lines in train_log.jsonl")
    progress: bool = setting(True, help="no progress bars (training, export, downloads)")
    save_every: int = setting(1000, help="steps between checkpoints (and at the end)")
    keep_checkpoints: int = setting(3, help="newest checkpoints kept")
    resume: str | None = setting(None, help="checkpoint folder, or 'latest' in --out", shown="start afresh")
    export: bool = setting(True, help="write the encoder but not the Hub folder and model card")
    push_to_hub: str | None = setting(None, help="upload the exported model folder to this repo", shown="no upload",
                                      metavar="REPO_ID", group="hub")
    private: bool = setting(False, help="create the Hub repo private", group="hub")
    hub_endpoint: str | None = setting(None, flag="--endpoint", aliases=("--hub-endpoint",), group="hub",
                                       metavar="URL", help="Hub endpoint", shown="HF_ENDPOINT or huggingface.co")
    method_options: dict[str, Any] = setting(default_factory=dict, flag="",
                                             help="keyword arguments of the method class (flags: method options)")
    augment: AugmentConfig = setting(help="view settings", flag="")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def for_method(cls, method: Method, *, augment: dict[str, Any] | None = None, **values: Any) -> TrainConfig:
        """The config of a `method` run: `values` (and `augment` settings) over the method's defaults."""
        if method not in METHOD_DEFAULTS:
            raise ValueError(f"unknown method {method!r}, one of {list(METHOD_NAMES)}")
        defaults = dict(METHOD_DEFAULTS[method])
        view = AugmentConfig(**{**defaults.pop("augment", {}), **(augment or {})})
        return cls(method=method, augment=view, **{**defaults, **values})


# The official recipe of each method: every field without a default, and the defaults it changes.
METHOD_DEFAULTS: dict[Method, dict[str, Any]] = {
    # Official ViT-B/L pre-training recipe (facebookresearch/mae main_pretrain.py / PRETRAIN.md): blr 1.5e-4
    # per 256, AdamW(0.9, 0.95), wd 0.05, 40 warm-up epochs, 800 epochs, crops (0.2, 1). The official code
    # has no ViT-S recipe; the same settings are used for it.
    "mae": dict(base_lr=1.5e-4, min_lr=0.0, weight_decay=0.05, betas=(0.9, 0.95), warmup_epochs=40, epochs=800,
                batch_size=256, augment=dict(crop_scale=(0.2, 1.0))),
    # facebookresearch/dino main_dino.py defaults (ViT-S/16, 100 epochs): lr 5e-4 per 256, min_lr 1e-6,
    # wd 0.04 -> 0.4, 10 warm-up epochs, clip 3.0, drop-path 0.1, global crops (0.4, 1), batch 64 per GPU.
    "dino": dict(base_lr=5e-4, min_lr=1e-6, weight_decay=0.04, weight_decay_end=0.4, betas=(0.9, 0.999),
                 warmup_epochs=10, epochs=100, clip_grad=3.0, drop_path=0.1, batch_size=64,
                 augment=dict(crop_scale=(0.4, 1.0))),
    # facebookresearch/moco-v3 main_moco.py ViT-S/16 recipe (CONFIG.md): lr 1.5e-4 per 256, AdamW, wd 0.1,
    # 40 warm-up epochs, 300 epochs, crops (0.08, 1), batch 4096 (256 here per process).
    "mocov3": dict(base_lr=1.5e-4, min_lr=0.0, weight_decay=0.1, betas=(0.9, 0.999), warmup_epochs=40, epochs=300,
                   batch_size=256, augment=dict(crop_scale=(0.08, 1.0))),
}


def method_default_text(name: str, default: Any, shown: str | None = None, *, augment: bool = False) -> str:
    """The default of a setting as `--help` shows it: its own value (or `shown`) and the methods that change it."""
    per_method = {method: (values.get("augment", {}) if augment else values).get(name, MISSING)
                  for method, values in METHOD_DEFAULTS.items()}
    changed = [f"{method} {_text(value)}" for method, value in per_method.items() if value is not MISSING]
    if default is MISSING:
        return ", ".join(changed)
    own = shown or ("none" if default is None else _text(default))
    return "; ".join([own] + changed)


def _text(value: Any) -> str:
    """A default as its flag would take it (pairs as `A,B`)."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
