"""The shared pre-training loop: accelerate, schedules, checkpoints, logging and the final encoder.

One optimizer step is one `step`: schedules (LR, weight decay, EMA momentum, teacher temperature)
are pure functions of it, and the random state of a step is seeded from (seed, step, process), so a
run resumed from a checkpoint repeats the uninterrupted run's next steps exactly.

`train` reads as its three parts: `set_up` (processes, method, data, optimizer, schedule, resume),
`run_steps` (the loop; one optimizer step is `train_step`) and `finish` (encoder and card context, which
`cpia_hf.model.card.training_context` builds from the config and the set-up's `RunFacts`).
"""
from __future__ import annotations

import itertools
import json
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from timm.optim import create_optimizer_v2
from tqdm.auto import tqdm

from ..model.backbone import save_backbone
from ..model.card import CARD_CONTEXT, ModelCardContext, RunFacts, hardware_description, training_context
from ..model.optim import Warmup, cosine_schedule, scaled_lr
from .config import MixedPrecision, TrainConfig
from .data import build_loader, derive_seed, load_pretrain_rows
from .method import PretrainMethod

TRAIN_LOG = "train_log.jsonl"
TRAIN_CONFIG = "train_config.json"
CHECKPOINTS = "checkpoints"


@dataclass
class Schedule:
    """Length of a run and its per-step LR and weight decay."""

    total_steps: int
    steps_per_epoch: int
    warmup_steps: int
    global_batch: int
    lr: float
    min_lr: float
    weight_decay: float
    weight_decay_end: float
    warmup: Warmup = "linear"  # the method's warm-up rule

    def lr_at(self, step: int) -> float:
        return cosine_schedule(step, self.total_steps, self.lr, self.min_lr, self.warmup_steps, self.warmup)

    def weight_decay_at(self, step: int) -> float:
        return cosine_schedule(step, self.total_steps, self.weight_decay, self.weight_decay_end)


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


@dataclass
class Run:
    """A set-up run: what the loop and the finish need."""

    cfg: TrainConfig
    accelerator: Accelerator
    model: torch.nn.Module  # as prepared by accelerate (DDP in several processes)
    method: PretrainMethod  # the same, unwrapped
    optimizer: torch.optim.Optimizer
    loader: Any
    schedule: Schedule
    progress: TrainProgress
    context: ModelCardContext

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)


def build_optimizer(method: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    device: torch.device) -> torch.optim.Optimizer:
    """AdamW whose parameter groups timm builds: 1-D parameters (norms, biases) get no weight decay,
    frozen parameters (EMA encoders, fixed position embeddings) are left out. The fused kernel (CUDA
    and CPU) updates all parameters in one pass, ~3x faster than the per-tensor loop."""
    fused = device.type in ("cuda", "cpu")
    optimizer = create_optimizer_v2(method, "adamw", lr=lr, weight_decay=weight_decay, betas=betas,
                                    **({"fused": True} if fused else {}))
    for group in optimizer.param_groups:
        group["decayed"] = group["weight_decay"] > 0
    return optimizer


def default_mixed_precision() -> MixedPrecision:
    """bf16 on GPUs that support it, full precision elsewhere."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


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


def train(cfg: TrainConfig, method_cls: type[PretrainMethod]) -> ModelCardContext:
    """Run pre-training; returns the card context (also written into `out`)."""
    run = set_up(cfg, method_cls)
    run_steps(run)
    return finish(run)


# set-up


def set_up(cfg: TrainConfig, method_cls: type[PretrainMethod]) -> Run:
    """Processes, method, data, optimizer, schedule and progress (restored when resuming). The run holds a
    copy of `cfg` with the mixed precision settled; `cfg` itself is left as given."""
    cfg = replace(cfg, mixed_precision=cfg.mixed_precision or default_mixed_precision())
    if cfg.grad_accum > 1 and not method_cls.allows_grad_accum:
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
    set_seed(cfg.seed)  # identical initial weights in every process
    method = method_cls.from_config(cfg)
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)

    with accelerator.main_process_first():
        rows = load_pretrain_rows(cfg.data, cfg.config, scales=cfg.scales, organs=cfg.organs,
                                  streaming=cfg.streaming, cache_dir=cfg.cache_dir)
    loader = build_loader(rows, method.make_transform(cfg.augment), batch_size=cfg.batch_size,
                          num_workers=cfg.num_workers, seed=cfg.seed,
                          process_index=accelerator.process_index, num_processes=accelerator.num_processes)
    global_batch = cfg.batch_size * accelerator.num_processes * cfg.grad_accum
    lr = cfg.lr if cfg.lr is not None else scaled_lr(cfg.base_lr, global_batch)
    optimizer = build_optimizer(method, lr, cfg.weight_decay, cfg.betas, accelerator.device)
    model, optimizer = accelerator.prepare(method, optimizer)
    if not cfg.streaming:
        loader = accelerator.prepare(loader)
    schedule = make_schedule(cfg, _steps_per_epoch(cfg, loader, rows, global_batch), global_batch, lr,
                             method_cls.lr_warmup)

    progress = TrainProgress()
    accelerator.register_for_checkpointing(progress)
    resume_dir = resolve_resume(cfg)
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir))
    facts = RunFacts(total_steps=schedule.total_steps, steps_per_epoch=schedule.steps_per_epoch,
                     global_batch=global_batch, lr=lr, weight_decay_end=schedule.weight_decay_end,
                     warmup_steps=schedule.warmup_steps, num_processes=accelerator.num_processes,
                     hardware=hardware_description(accelerator.num_processes, accelerator.device),
                     mixed_precision=accelerator.mixed_precision, augmentations=cfg.augment.describe(cfg.method))
    run = Run(cfg, accelerator, model, accelerator.unwrap_model(model), optimizer, loader, schedule, progress,
              training_context(cfg.to_dict(), facts))
    if accelerator.is_main_process:
        run.out.mkdir(parents=True, exist_ok=True)
        (run.out / TRAIN_CONFIG).write_text(json.dumps(run.context.config, indent=2) + "\n")
    return run


def make_schedule(cfg: TrainConfig, steps_per_epoch: int, global_batch: int, lr: float,
                  warmup: Warmup = "linear") -> Schedule:
    """The run's length and LR / weight-decay schedules."""
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup_steps = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_epochs * steps_per_epoch)
    # A run cut short with --max-steps keeps at least half of its steps after warmup.
    warmup_steps = min(warmup_steps, total_steps // 2)
    weight_decay_end = cfg.weight_decay if cfg.weight_decay_end is None else cfg.weight_decay_end
    return Schedule(total_steps=total_steps, steps_per_epoch=steps_per_epoch, warmup_steps=warmup_steps,
                    global_batch=global_batch, lr=lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
                    weight_decay_end=weight_decay_end, warmup=warmup)


# the loop


def run_steps(run: Run) -> None:
    """Optimizer steps from `run.progress.step` to the end, logging and checkpointing on the way."""
    cfg, progress, schedule = run.cfg, run.progress, run.schedule
    log = StepLog(run)
    while progress.step < schedule.total_steps:
        epoch, step_in_epoch = divmod(progress.step, schedule.steps_per_epoch)
        batches = epoch_batches(run, epoch, step_in_epoch)
        for _ in range(step_in_epoch, schedule.steps_per_epoch):
            if progress.step >= schedule.total_steps:
                break
            step_loss = train_step(run, batches, epoch)
            progress.step += 1
            log.step_done(epoch, step_loss)
            if progress.step % cfg.save_every == 0 or progress.step == schedule.total_steps:
                save_checkpoint(run)
    log.close()


def epoch_batches(run: Run, epoch: int, step_in_epoch: int) -> Iterator[Any]:
    """Batches of `epoch` from step `step_in_epoch` on (a resumed run skips what it has seen)."""
    loader = run.loader
    loader.dataset.set_epoch(epoch)
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    skip = step_in_epoch * run.cfg.grad_accum
    if skip and not run.cfg.streaming:
        return iter(run.accelerator.skip_first_batches(loader, skip))
    return itertools.islice(loader, skip, None)


def train_step(run: Run, batches: Iterator[Any], epoch: int) -> torch.Tensor:
    """One optimizer step (its `grad_accum` micro-batches); returns the step's mean loss on this process."""
    cfg, accelerator, method, step = run.cfg, run.accelerator, run.method, run.progress.step
    weight_decay = run.schedule.weight_decay_at(step)
    for group in run.optimizer.param_groups:
        group["lr"] = run.schedule.lr_at(step)
        if group["decayed"]:
            group["weight_decay"] = weight_decay
    method.set_progress(step, run.schedule.total_steps, run.schedule.steps_per_epoch)
    torch.manual_seed(derive_seed("step", cfg.seed, step, accelerator.process_index))
    step_loss = torch.zeros((), device=accelerator.device)
    for _ in range(cfg.grad_accum):
        batch = next(batches, None)
        if batch is None:
            raise ValueError(f"{cfg.data}: data ran out in epoch {epoch} before {run.schedule.steps_per_epoch} "
                             "steps; lower --steps-per-epoch")
        if cfg.streaming:
            batch = _to_device(batch, accelerator.device)
        with accelerator.accumulate(run.model):
            loss = run.model(batch)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                if cfg.clip_grad:
                    method.clip_gradients(cfg.clip_grad, accelerator)
                method.before_optimizer_step()
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        step_loss += loss.detach().float() / cfg.grad_accum
    method.after_optimizer_step()
    return step_loss


class StepLog:
    """Progress bar, loss history and `train_log.jsonl` lines (every `log_every` steps and the last)."""

    def __init__(self, run: Run):
        self.run = run
        self.bar = tqdm(total=run.schedule.total_steps, initial=run.progress.step, unit="step",
                        disable=not (run.cfg.progress and run.accelerator.is_main_process),
                        desc=f"{run.cfg.method} pre-training")
        self.interval_start, self.interval_steps = time.perf_counter(), 0

    def step_done(self, epoch: int, step_loss: torch.Tensor) -> None:
        run, step = self.run, self.run.progress.step
        self.interval_steps += 1
        self.bar.update(1)
        if step % run.cfg.log_every and step != run.schedule.total_steps:
            return
        mean_loss = run.accelerator.reduce(step_loss, reduction="mean").item()
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"step {step}: loss is {mean_loss}; lower the LR or use bf16")
        elapsed = time.perf_counter() - self.interval_start
        record = {"step": step, "epoch": epoch, "loss": mean_loss, "lr": run.schedule.lr_at(step - 1),
                  "weight_decay": run.schedule.weight_decay_at(step - 1),
                  "images_per_s": self.interval_steps * run.schedule.global_batch / elapsed,
                  **run.method.schedule_state()}
        run.progress.loss_history.append((step, mean_loss))
        self.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{record['lr']:.2e}")
        if run.accelerator.is_main_process:
            with (run.out / TRAIN_LOG).open("a") as log:
                log.write(json.dumps(record) + "\n")
        self.interval_start, self.interval_steps = time.perf_counter(), 0

    def close(self) -> None:
        self.bar.close()


# checkpoints and the finish


def context_with_losses(run: Run) -> ModelCardContext:
    """The card context with the loss history (and last loss) so far."""
    run.context = run.context.with_losses(run.progress.loss_history)
    return run.context


def save_checkpoint(run: Run) -> Path:
    """accelerate state (model incl. EMA encoders and centre, optimizer, RNG, progress), the timm
    backbone and the card context, so that `cpia export --checkpoint` can publish any checkpoint."""
    accelerator, step = run.accelerator, run.progress.step
    ckpt = run.out / CHECKPOINTS / f"step-{step:07d}"
    accelerator.save_state(str(ckpt))
    if accelerator.is_main_process:
        save_backbone(run.method.export_backbone(), run.method.backbone_spec, ckpt)
        context = context_with_losses(run)
        ModelCardContext.from_dict({**context.to_dict(), "steps_done": step}).write(ckpt / CARD_CONTEXT)
        keep = run.cfg.keep_checkpoints
        for old in checkpoint_dirs(run.out)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return ckpt


def finish(run: Run) -> ModelCardContext:
    """Save the published backbone and the card context into `out`; end the processes' run."""
    context = context_with_losses(run)
    if run.accelerator.is_main_process:
        save_backbone(run.method.export_backbone(), run.method.backbone_spec, run.out)
        context.write(run.out / CARD_CONTEXT)
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    return context


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
