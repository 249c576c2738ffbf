"""Optimisation rules that pre-training and fine-tuning share: the LR scaling and the cosine schedule.

Both follow facebookresearch/mae (`main_pretrain.py`, `main_finetune.py`, `util/lr_sched.py`): the peak
LR is a base LR per 256 images times the global batch, reached by a linear warm-up and followed by a
half-cosine to a floor. DINO's warm-up (`utils.cosine_scheduler`) reaches the peak one step earlier.
"""
from __future__ import annotations

import math
from typing import Literal

# How a linear warm-up over W steps climbs from 0: "linear" reaches the peak at step W (MAE's and MoCo v3's
# `lr * epoch / warmup_epochs`), "linspace" at step W - 1 (DINO's `np.linspace(0, lr, W)`).
Warmup = Literal["linear", "linspace"]
LR_BATCH_REFERENCE = 256  # base LRs are quoted per this many images


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """Peak LR of a run: `base_lr` per `LR_BATCH_REFERENCE` images, scaled linearly to `global_batch`."""
    return base_lr * global_batch / LR_BATCH_REFERENCE


def cosine_schedule(step: int, total_steps: int, start: float, end: float, warmup_steps: int = 0,
                    warmup: Warmup = "linear") -> float:
    """Linear warmup from 0 to `start` over `warmup_steps` (as `warmup` says), then half-cosine from `start`
    to `end` over the remaining steps."""
    if step < warmup_steps:
        last = warmup_steps - 1 if warmup == "linspace" else warmup_steps
        return start * step / last if last else 0.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * min(1.0, progress)))
