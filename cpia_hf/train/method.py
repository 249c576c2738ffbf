"""What every pre-training method shares: the `PretrainMethod` interface the trainer drives, the
EMA momentum schedule and update (DINO's teacher, MoCo-v3's momentum encoder) and gradient clipping."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import torch
from timm.models import VisionTransformer
from torch import nn

from ..model.card import Method
from ..model.optim import Warmup
from .augment import AugmentConfig
from .config import TrainConfig

if TYPE_CHECKING:
    from accelerate import Accelerator


def momentum_schedule(step: int, total_steps: int, base: float) -> float:
    """EMA momentum rising from `base` to 1 along a half-cosine (DINO, MoCo-v3)."""
    return 1 - (1 - base) * 0.5 * (1 + math.cos(math.pi * step / max(1, total_steps)))


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, parameter by parameter."""
    for ema, param in zip(target.parameters(), online.parameters()):
        ema.lerp_(param.detach(), 1 - momentum)


class PretrainMethod(nn.Module):
    """A self-supervised objective over a timm ViT; the trainer drives it step by step.

    Subclasses take the backbone arguments (`model`, `img_size`, `init`, `model_kwargs`, `drop_path`)
    and their own options as explicit keyword arguments; `from_config` builds one from a run's
    `TrainConfig` (its `method_options` are those keyword arguments).
    """

    name: ClassVar[Method]
    # Whether several micro-batches per step give the same objective as one large batch (not where a loss
    # contrasts or centres over the batch, or BatchNorm sees it).
    allows_grad_accum: ClassVar[bool] = False
    # How the LR warm-up reaches its peak (`cpia_hf.model.optim.cosine_schedule`).
    lr_warmup: ClassVar[Warmup] = "linear"
    # Help text of each keyword option of the class (`cpia train` shows it with the option's default).
    option_help: ClassVar[dict[str, str]] = {}

    def __init__(self) -> None:
        super().__init__()
        self.step, self.total_steps, self.steps_per_epoch = 0, 1, 1
        self.backbone_spec: dict = {}

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> PretrainMethod:
        """The method of a run: backbone from the config, options from `cfg.method_options`."""
        return cls(model=cfg.model, img_size=cfg.augment.img_size, init=cfg.init, model_kwargs=cfg.model_kwargs,
                   drop_path=cfg.drop_path, **cfg.method_options)

    def set_progress(self, step: int, total_steps: int, steps_per_epoch: int) -> None:
        """Tell the method where the run is (for its own schedules)."""
        self.step, self.total_steps, self.steps_per_epoch = step, total_steps, steps_per_epoch

    @property
    def epoch(self) -> int:
        return self.step // max(1, self.steps_per_epoch)

    @classmethod
    def make_transform(cls, augment: AugmentConfig) -> Callable:
        """The view maker applied to each decoded image."""
        raise NotImplementedError

    def export_backbone(self) -> VisionTransformer:
        """The backbone to publish."""
        raise NotImplementedError

    def clip_gradients(self, max_norm: float, accelerator: Accelerator) -> None:
        """Clip the gradients before the update: by their global norm (MAE, MoCo-v3 recipes)."""
        accelerator.clip_grad_norm_(self.parameters(), max_norm)

    def before_optimizer_step(self) -> None:
        """Hook after gradients are final (clipped), before the update."""

    def after_optimizer_step(self) -> None:
        """Hook after the update (EMA encoders)."""

    def schedule_state(self) -> dict:
        """Current values of the method's schedules, for the log."""
        return {}
