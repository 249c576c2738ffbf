"""Optimisation rules that pre-training and fine-tuning share: the LR scaling and the cosine schedule.

Both follow facebookresearch/mae (`main_pretrain.py`, `main_finetune.py`, `util/lr_sched.py`):
the peak LR is a base LR per 256 images times the global batch, reached by a linear warm-up and
followed by a half-cosine to a floor.
"""
from __future__ import annotations

import math

LR_BATCH_REFERENCE = 256  # base LRs are quoted per this many images


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """Peak LR of a run: `base_lr` per `LR_BATCH_REFERENCE` images, scaled linearly to `global_batch`."""
    return base_lr * global_batch / LR_BATCH_REFERENCE


def cosine_schedule(step: int, total_steps: int, start: float, end: float, warmup_steps: int = 0) -> float:
    """Linear warmup from 0 to `start` over `warmup_steps`, then half-cosine from `start` to `end`."""
    if step < warmup_steps:
        return start * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * min(1.0, progress)))
