"""`TrainConfig`: everything a pre-training run needs, as `cpia train` and the recipes fill it."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ..model.card import Method
from .augment import AugmentConfig

MixedPrecision = Literal["no", "bf16", "fp16"]


@dataclass
class TrainConfig:
    """Everything a run needs. `cpia train` fills unset values from a `--recipe` file, else from the
    method's `RECIPE` (the official settings); the whole config is saved as `train_config.json`."""

    method: Method  # pre-training objective
    data: str  # CPIA dataset folder or Hub id
    out: str  # output folder: checkpoints, log, encoder, exported model
    config: str = "mini"  # dataset config (mini, mini_clean, XL, L, M, S, full, full_clean)
    dataset_id: str | None = None  # Hub id of the data for the model card (default: `data` when it is one)
    model: str = "vit_small_patch16_224"  # timm ViT architecture
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm kwargs (depth, embed_dim, ...)
    init: str | None = None  # pretrained timm weights to start from (None: random init)
    model_name: str | None = None  # published name (default <arch>.cpia_<method>_<config>)
    scales: list[str] = field(default_factory=list)  # keep only these scales (empty: all)
    organs: list[str] = field(default_factory=list)  # keep only these organs (empty: all)
    streaming: bool = False  # stream the config instead of downloading it
    cache_dir: str | None = None  # datasets cache folder
    batch_size: int = 64  # images per process per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step (MAE only)
    epochs: int = 100  # passes over the data (sets the schedules' length)
    max_steps: int | None = None  # stop, and end the schedules, after this many steps
    steps_per_epoch: int | None = None  # epoch length for streaming data (default: from the split size)
    base_lr: float = 1.5e-4  # peak LR per 256 images (lr = base_lr * global batch / 256)
    lr: float | None = None  # absolute peak LR, overrides base_lr
    min_lr: float = 0.0  # LR at the end of the cosine
    warmup_epochs: float = 10  # linear LR warm-up
    warmup_steps: int | None = None  # overrides warmup_epochs
    weight_decay: float = 0.05  # AdamW weight decay (not on norms and biases)
    weight_decay_end: float | None = None  # cosine weight-decay target (None: constant)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    clip_grad: float | None = None  # gradient clipping threshold (the method's rule; None: off)
    drop_path: float = 0.0  # stochastic depth of the trained encoder
    mixed_precision: MixedPrecision | None = None  # None: bf16 on GPUs that support it, else no
    cpu: bool = False  # train on CPU even when a GPU is present
    seed: int = 0  # seeds weights, data order, views, masks and drop-path
    num_workers: int = 4  # DataLoader workers per process
    log_every: int = 10  # steps between log lines in train_log.jsonl
    progress: bool = True  # show a progress bar on the terminal
    save_every: int = 1000  # steps between checkpoints (and at the end)
    keep_checkpoints: int = 3  # newest checkpoints kept
    resume: str | None = None  # checkpoint folder, or "latest" in `out`
    export: bool = True  # write the Hub folder and model card after training
    push_to_hub: str | None = None  # model repo id to upload the exported folder to
    private: bool = False  # create that repo private
    hub_endpoint: str | None = None  # Hub endpoint (default: HF_ENDPOINT or huggingface.co)
    method_options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the method class
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # view settings

    def to_dict(self) -> dict:
        return asdict(self)
