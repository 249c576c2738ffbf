"""The shared pre-training loop: accelerate, schedules, checkpoints, logging and the final encoder.

One optimizer step is one `step`: schedules (LR, weight decay, EMA momentum, teacher temperature)
are pure functions of it, and the random state of a step is seeded from (seed, step, process), so a
run resumed from a checkpoint repeats the uninterrupted run's next steps exactly.
"""
from __future__ import annotations

import itertools
import json
import math
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from timm.models import VisionTransformer
from timm.optim import create_optimizer_v2
from tqdm.auto import tqdm

from ..model.backbone import save_backbone
from ..standard import stable_unit_float
from .augment import AugmentConfig
from .data import build_loader, load_pretrain_rows

TRAIN_LOG = "train_log.jsonl"
TRAIN_CONFIG = "train_config.json"
CARD_CONTEXT = "card_context.json"
CHECKPOINTS = "checkpoints"
LR_BATCH_REFERENCE = 256


@dataclass
class TrainConfig:
    """Everything a run needs; method defaults come from the method's `RECIPE`."""

    method: str
    data: str
    out: str
    config: str = "mini"
    model: str = "vit_small_patch16_224"
    model_kwargs: dict = field(default_factory=dict)
    init: str | None = None
    model_name: str | None = None
    scales: list[str] = field(default_factory=list)
    organs: list[str] = field(default_factory=list)
    streaming: bool = False
    cache_dir: str | None = None
    batch_size: int = 64
    grad_accum: int = 1
    epochs: int = 100
    max_steps: int | None = None
    steps_per_epoch: int | None = None
    base_lr: float = 1.5e-4
    lr: float | None = None
    min_lr: float = 0.0
    warmup_epochs: float = 10
    warmup_steps: int | None = None
    weight_decay: float = 0.05
    weight_decay_end: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float | None = None
    drop_path: float = 0.0
    mixed_precision: str | None = None
    cpu: bool = False
    seed: int = 0
    num_workers: int = 4
    log_every: int = 10
    save_every: int = 1000
    keep_checkpoints: int = 3
    resume: str | None = None
    export: bool = True
    push_to_hub: str | None = None  # model repo id to upload the exported folder to
    private: bool = False
    hub_endpoint: str | None = None
    method_options: dict = field(default_factory=dict)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def to_dict(self) -> dict:
        return asdict(self)


def cosine_schedule(step: int, total_steps: int, start: float, end: float, warmup_steps: int = 0) -> float:
    """Linear warmup from 0 to `start` over `warmup_steps`, then half-cosine from `start` to `end`."""
    if step < warmup_steps:
        return start * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * min(1.0, progress)))


def momentum_schedule(step: int, total_steps: int, base: float) -> float:
    """EMA momentum rising from `base` to 1 along a half-cosine (DINO, MoCo-v3)."""
    return 1 - (1 - base) * 0.5 * (1 + math.cos(math.pi * step / max(1, total_steps)))


def build_optimizer(method: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    device: torch.device) -> torch.optim.Optimizer:
    """AdamW whose parameter groups timm builds: 1-D parameters (norms, biases) get no weight decay,
    frozen parameters (EMA encoders, fixed position embeddings) are left out. The fused kernel (CUDA
    and CPU) updates all parameters in one pass, ~3x faster than the per-tensor loop."""
    fused = device.type in ("cuda", "cpu")
    return create_optimizer_v2(method, "adamw", lr=lr, weight_decay=weight_decay, betas=betas,
                               **({"fused": True} if fused else {}))


class PretrainMethod(torch.nn.Module):
    """A self-supervised objective over a timm ViT; the trainer drives it step by step."""

    name: ClassVar[str]
    RECIPE: ClassVar[dict]

    def __init__(self) -> None:
        super().__init__()
        self.step, self.total_steps, self.steps_per_epoch = 0, 1, 1
        self.backbone_spec: dict = {}

    def set_progress(self, step: int, total_steps: int, steps_per_epoch: int) -> None:
        """Tell the method where the run is (for its own schedules)."""
        self.step, self.total_steps, self.steps_per_epoch = step, total_steps, steps_per_epoch

    def make_transform(self, augment: AugmentConfig) -> Callable:
        """The view maker applied to each decoded image."""
        raise NotImplementedError

    def export_backbone(self) -> VisionTransformer:
        """The backbone to publish."""
        raise NotImplementedError

    def before_optimizer_step(self) -> None:
        """Hook after gradients are final (clipped), before the update."""

    def after_optimizer_step(self) -> None:
        """Hook after the update (EMA encoders)."""

    def schedule_state(self) -> dict:
        """Current values of the method's schedules, for the log."""
        return {}


@dataclass
class TrainProgress:
    """Checkpointed run state beside the model/optimizer: step and loss history."""

    step: int = 0
    loss_history: list = field(default_factory=list)

    def state_dict(self) -> dict:
        return {"step": self.step, "loss_history": [list(p) for p in self.loss_history]}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.loss_history = [tuple(p) for p in state["loss_history"]]


def default_mixed_precision() -> str:
    """bf16 on GPUs that support it, full precision elsewhere."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def hardware_description(accelerator: Accelerator) -> str:
    """Process count and device name for the model card, e.g. `2 x NVIDIA A100-SXM4-80GB`."""
    if accelerator.device.type == "cuda":
        name = torch.cuda.get_device_name(accelerator.device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()})"
    return f"{accelerator.num_processes} x {name}"


def step_seed(seed: int, step: int, process_index: int) -> int:
    """Seed of one step's random draws (masks, drop-path) in one process."""
    return int(stable_unit_float("step", seed, step, process_index) * 2**62)


def checkpoint_dirs(out: Path) -> list[Path]:
    """Checkpoint folders of a run, oldest first."""
    return sorted((out / CHECKPOINTS).glob("step-*"))


def resolve_resume(cfg: TrainConfig) -> Path | None:
    """The checkpoint to resume from: a folder, `latest` (newest in `out`), or none."""
    if not cfg.resume:
        return None
    if cfg.resume == "latest":
        found = checkpoint_dirs(Path(cfg.out))
        return found[-1] if found else None
    path = Path(cfg.resume)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: checkpoint folder not found")
    return path


def train(cfg: TrainConfig, method_cls: type[PretrainMethod]) -> dict:
    """Run pre-training; returns the card context (also written into `out`)."""
    cfg.mixed_precision = cfg.mixed_precision or default_mixed_precision()
    if cfg.grad_accum > 1 and not method_cls.RECIPE.get("allows_grad_accum", False):
        raise ValueError(
            f"{cfg.method}: gradient accumulation would change the objective (batch-wise contrast, "
            "centring or BatchNorm statistics see micro-batches only); raise --batch-size instead"
        )
    accelerator = Accelerator(
        # Without cpu=True accelerate runs a torchrun-launched CPU process group as separate
        # single processes; with it, they form a gloo group (MULTI_CPU).
        cpu=cfg.cpu or not torch.cuda.is_available(),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
    )
    out = Path(cfg.out)
    set_seed(cfg.seed)  # identical initial weights in every process
    method = method_cls(cfg)
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)

    with accelerator.main_process_first():
        rows = load_pretrain_rows(cfg.data, cfg.config, scales=cfg.scales, organs=cfg.organs,
                                  streaming=cfg.streaming, cache_dir=cfg.cache_dir)
    loader = build_loader(rows, method.make_transform(cfg.augment), batch_size=cfg.batch_size,
                          num_workers=cfg.num_workers, seed=cfg.seed,
                          process_index=accelerator.process_index, num_processes=accelerator.num_processes)

    global_batch = cfg.batch_size * accelerator.num_processes * cfg.grad_accum
    lr = cfg.lr if cfg.lr is not None else cfg.base_lr * global_batch / LR_BATCH_REFERENCE
    weight_decay_end = cfg.weight_decay if cfg.weight_decay_end is None else cfg.weight_decay_end
    optimizer = build_optimizer(method, lr, cfg.weight_decay, cfg.betas, accelerator.device)
    for group in optimizer.param_groups:
        group["decayed"] = group["weight_decay"] > 0
    model, optimizer = accelerator.prepare(method, optimizer)
    if not cfg.streaming:
        loader = accelerator.prepare(loader)
    unwrapped = accelerator.unwrap_model(model)

    steps_per_epoch = _steps_per_epoch(cfg, loader, rows, global_batch)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup_steps = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_epochs * steps_per_epoch)
    # A run cut short with --max-steps keeps at least half of its steps after warmup.
    warmup_steps = min(warmup_steps, total_steps // 2)

    progress = TrainProgress()
    accelerator.register_for_checkpointing(progress)
    resume_dir = resolve_resume(cfg)
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir))

    card_context = {
        "method": cfg.method, "dataset": cfg.data, "dataset_config": cfg.config,
        "base_model": f"timm/{cfg.init}" if cfg.init else None, "init": cfg.init or "none",
        "steps": total_steps, "epochs": round(total_steps / steps_per_epoch, 3), "global_batch_size": global_batch,
        "lr": lr, "weight_decay": cfg.weight_decay if weight_decay_end == cfg.weight_decay
        else f"{cfg.weight_decay} -> {weight_decay_end} (cosine)",
        "warmup_steps": warmup_steps, "augmentations": cfg.augment.describe(cfg.method),
        "mean": list(cfg.augment.mean), "std": list(cfg.augment.std),
        "hardware": hardware_description(accelerator), "mixed_precision": accelerator.mixed_precision, "seed": cfg.seed,
        "config": json.loads(json.dumps({**cfg.to_dict(), "num_processes": accelerator.num_processes,
                                         "steps_per_epoch": steps_per_epoch}, default=str)),
    }
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / TRAIN_CONFIG).write_text(json.dumps(card_context["config"], indent=2) + "\n")

    bar = tqdm(total=total_steps, initial=progress.step, disable=not accelerator.is_main_process,
               desc=f"{cfg.method} pre-training", unit="step")
    log_path = out / TRAIN_LOG
    interval_start, interval_steps = time.perf_counter(), 0
    losses = []
    while progress.step < total_steps:
        epoch, step_in_epoch = divmod(progress.step, steps_per_epoch)
        loader.dataset.set_epoch(epoch)
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        skip = step_in_epoch * cfg.grad_accum
        if skip and not cfg.streaming:
            batches = iter(accelerator.skip_first_batches(loader, skip))
        else:
            batches = itertools.islice(loader, skip, None)
        for _ in range(step_in_epoch, steps_per_epoch):
            if progress.step >= total_steps:
                break
            step = progress.step
            step_lr = cosine_schedule(step, total_steps, lr, cfg.min_lr, warmup_steps)
            step_wd = cosine_schedule(step, total_steps, cfg.weight_decay, weight_decay_end)
            for group in optimizer.param_groups:
                group["lr"] = step_lr
                if group["decayed"]:
                    group["weight_decay"] = step_wd
            unwrapped.set_progress(step, total_steps, steps_per_epoch)
            torch.manual_seed(step_seed(cfg.seed, step, accelerator.process_index))
            step_loss = torch.zeros((), device=accelerator.device)
            for _ in range(cfg.grad_accum):
                batch = next(batches, None)
                if batch is None:
                    raise ValueError(f"{cfg.data}: data ran out in epoch {epoch} before {steps_per_epoch} steps; "
                                     "lower --steps-per-epoch")
                if cfg.streaming:
                    batch = _to_device(batch, accelerator.device)
                with accelerator.accumulate(model):
                    loss = model(batch)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        if cfg.clip_grad:
                            accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                        unwrapped.before_optimizer_step()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                step_loss += loss.detach().float() / cfg.grad_accum
            unwrapped.after_optimizer_step()
            progress.step += 1
            interval_steps += 1
            bar.update(1)
            if progress.step % cfg.log_every == 0 or progress.step == total_steps:
                mean_loss = accelerator.reduce(step_loss, reduction="mean").item()
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(f"step {progress.step}: loss is {mean_loss}; lower the LR or use bf16")
                elapsed = time.perf_counter() - interval_start
                record = {"step": progress.step, "epoch": epoch, "loss": mean_loss, "lr": step_lr,
                          "weight_decay": step_wd, "images_per_s": interval_steps * global_batch / elapsed,
                          **unwrapped.schedule_state()}
                progress.loss_history.append((progress.step, mean_loss))
                losses.append(mean_loss)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{step_lr:.2e}")
                if accelerator.is_main_process:
                    with log_path.open("a") as log:
                        log.write(json.dumps(record) + "\n")
                interval_start, interval_steps = time.perf_counter(), 0
            if progress.step % cfg.save_every == 0 or progress.step == total_steps:
                _with_losses(card_context, progress)
                save_checkpoint(accelerator, unwrapped, out, progress.step, cfg.keep_checkpoints, card_context)
    bar.close()

    _with_losses(card_context, progress)
    if accelerator.is_main_process:
        backbone = unwrapped.export_backbone()
        save_backbone(backbone, unwrapped.backbone_spec, out)
        (out / CARD_CONTEXT).write_text(json.dumps(card_context, indent=2) + "\n")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return card_context


def _with_losses(card_context: dict, progress: TrainProgress) -> None:
    """Add the loss history (and last loss) so far to the card context."""
    card_context["loss_history"] = [list(point) for point in progress.loss_history]
    card_context["final_loss"] = progress.loss_history[-1][1] if progress.loss_history else None


def save_checkpoint(accelerator: Accelerator, method: PretrainMethod, out: Path, step: int, keep: int,
                    card_context: dict) -> Path:
    """accelerate state (model incl. EMA encoders and centre, optimizer, RNG, progress), the timm
    backbone and the card context, so that `cpia export --checkpoint` can publish any checkpoint."""
    ckpt = out / CHECKPOINTS / f"step-{step:07d}"
    accelerator.save_state(str(ckpt))
    if accelerator.is_main_process:
        save_backbone(method.export_backbone(), method.backbone_spec, ckpt)
        (ckpt / CARD_CONTEXT).write_text(json.dumps({**card_context, "steps_done": step}, indent=2) + "\n")
        for old in checkpoint_dirs(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return ckpt


def _steps_per_epoch(cfg: TrainConfig, loader: Any, rows: Any, global_batch: int) -> int:
    """Optimizer steps in one pass over the data (streaming: from the split size or --steps-per-epoch)."""
    if cfg.steps_per_epoch:
        return cfg.steps_per_epoch
    if not cfg.streaming:
        return max(1, len(loader) // cfg.grad_accum)
    split = rows.info.splits.get("train") if rows.info.splits else None
    if split is None or not split.num_examples or cfg.scales or cfg.organs:
        raise ValueError(f"{cfg.data}: streaming size unknown; pass --steps-per-epoch")
    return max(1, split.num_examples // global_batch)


def _to_device(batch: Any, device: torch.device) -> Any:
    """Move a (nested list of) tensor batch to `device`."""
    if isinstance(batch, (list, tuple)):
        return [_to_device(b, device) for b in batch]
    return batch.to(device, non_blocking=True)
