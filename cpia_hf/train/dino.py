"""DINO (Caron et al. 2021): self-distillation between a student and an EMA teacher over multi-crops.

Follows facebookresearch/dino `main_dino.py` and `vision_transformer.py` (`DINOHead`, `DINOLoss`,
`MultiCropWrapper`). Local crops go through the same timm ViT built with `dynamic_img_size=True`,
which resamples the position table to each crop's grid. The published backbone is the teacher, as
in the official evaluation. Differences from the official code:
- weight normalisation uses `torch.nn.utils.parametrizations.weight_norm` (the old hook-based
  `weight_norm` is deprecated); the g parameter is frozen at 1 when `norm_last_layer` is set;
- the centre is averaged over processes with accelerate's `reduce` instead of a raw all_reduce.
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from accelerate.utils import reduce
from timm.layers import trunc_normal_
from timm.models import VisionTransformer
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from ..model.backbone import create_backbone
from .augment import AugmentConfig, MultiCrop
from .trainer import PretrainMethod, TrainConfig, momentum_schedule


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> weight-normalised prototypes."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
        for _ in range(nlayers - 2):
            layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
        layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1)
        magnitude.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


class DINO(PretrainMethod):
    """Student/teacher self-distillation with centring, sharpening and multi-crop."""

    name = "dino"
    # main_dino.py defaults (ViT-S/16, 100 epochs): lr 5e-4 per 256, min_lr 1e-6, wd 0.04 -> 0.4,
    # 10 warmup epochs, clip 3.0, drop-path 0.1, out_dim 65536, teacher momentum 0.996,
    # teacher temperature 0.04 (no warmup), 8 local crops, global crops (0.4, 1), local (0.05, 0.4),
    # last layer frozen for 1 epoch, batch 64 per GPU.
    RECIPE = dict(base_lr=5e-4, min_lr=1e-6, weight_decay=0.04, weight_decay_end=0.4, betas=(0.9, 0.999),
                  warmup_epochs=10, epochs=100, clip_grad=3.0, drop_path=0.1, batch_size=64,
                  crop_scale=(0.4, 1.0), allows_grad_accum=False)

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        options = cfg.method_options
        self.out_dim = options.get("out_dim", 65536)
        self.momentum_teacher = options.get("momentum_teacher", 0.996)
        self.student_temp = options.get("student_temp", 0.1)
        self.teacher_temp = options.get("teacher_temp", 0.04)
        self.warmup_teacher_temp = options.get("warmup_teacher_temp", 0.04)
        self.warmup_teacher_temp_epochs = options.get("warmup_teacher_temp_epochs", 0)
        self.center_momentum = options.get("center_momentum", 0.9)
        self.freeze_last_layer_epochs = options.get("freeze_last_layer", 1)

        backbone, self.backbone_spec = create_backbone(
            cfg.model, img_size=cfg.augment.img_size, init=cfg.init, model_kwargs=cfg.model_kwargs,
            dynamic_img_size=True, drop_path_rate=cfg.drop_path)
        head = DINOHead(backbone.embed_dim, self.out_dim, hidden_dim=options.get("hidden_dim", 2048),
                        bottleneck_dim=options.get("bottleneck_dim", 256),
                        norm_last_layer=options.get("norm_last_layer", True))
        self.student = nn.ModuleDict({"backbone": backbone, "head": head})
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, self.out_dim))

    def train(self, mode: bool = True) -> DINO:
        super().train(mode)
        self.teacher.eval()  # no drop-path in the teacher
        return self

    def make_transform(self, augment: AugmentConfig) -> Callable:
        return MultiCrop(augment)

    def export_backbone(self) -> VisionTransformer:
        return self.teacher["backbone"]

    @property
    def current_teacher_temp(self) -> float:
        warmup = self.warmup_teacher_temp_epochs * self.steps_per_epoch
        if self.step < warmup:
            return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * self.step / warmup
        return self.teacher_temp

    @property
    def current_momentum(self) -> float:
        return momentum_schedule(self.step, self.total_steps, self.momentum_teacher)

    def schedule_state(self) -> dict:
        return {"teacher_temp": self.current_teacher_temp, "teacher_momentum": self.current_momentum}

    @staticmethod
    def _multi_crop(network: nn.ModuleDict, crops: list[torch.Tensor]) -> torch.Tensor:
        """Run crops grouped by resolution (one backbone pass per size), heads on all at once."""
        features, start = [], 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-1] == crops[start].shape[-1]:
                end += 1
            features.append(network["backbone"](torch.cat(crops[start:end])))
            start = end
        return network["head"](torch.cat(features))

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            teacher_out = self._multi_crop(self.teacher, crops[:2]).float()
        student_out = self._multi_crop(self.student, crops).float()

        teacher_probs = F.softmax((teacher_out - self.center) / self.current_teacher_temp, dim=-1).chunk(2)
        student_logp = F.log_softmax(student_out / self.student_temp, dim=-1).chunk(len(crops))
        total, pairs = 0.0, 0
        for t_index, target in enumerate(teacher_probs):
            for s_index, logp in enumerate(student_logp):
                if s_index == t_index:
                    continue  # never match a view with itself
                total = total + torch.sum(-target * logp, dim=-1).mean()
                pairs += 1
        self._update_center(teacher_out)
        return total / pairs

    @torch.no_grad()
    def _update_center(self, teacher_out: torch.Tensor) -> None:
        batch_center = reduce(teacher_out.mean(dim=0, keepdim=True), reduction="mean")
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)

    def before_optimizer_step(self) -> None:
        if self.step < self.freeze_last_layer_epochs * self.steps_per_epoch:
            for param in self.student["head"].last_layer.parameters():
                param.grad = None

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        momentum = self.current_momentum
        for teacher, student in zip(self.teacher.parameters(), self.student.parameters()):
            teacher.lerp_(student.detach(), 1 - momentum)
