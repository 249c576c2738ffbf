"""DINO (Caron et al. 2021): self-distillation between a student and an EMA teacher over multi-crops.

Follows facebookresearch/dino `main_dino.py`, `utils.py` and `vision_transformer.py` (`DINOHead`,
`DINOLoss`, `MultiCropWrapper`, `interpolate_pos_encoding`, `clip_gradients`,
`cancel_gradients_last_layer`), with the official rules by default:
- the teacher never drops paths: it is built from the student and kept in eval mode whatever
  `train()`/`eval()` calls the trainer makes, so its targets depend only on its weights and inputs;
- each parameter's gradient is clipped to norm `clip_grad` (3.0) on its own, then the last layer's
  gradients are dropped during the first `freeze_last_layer` epochs;
- local crops see the 2-D position table resampled as the official code does (bicubic by scale
  factor (n + 0.1) / N, no antialiasing), not timm's antialiased resample to the exact size;
- the teacher temperature warms up per epoch (`np.linspace` over the warm-up epochs), not per step;
- with random initialisation the class token is drawn from a truncated normal with std 0.02.
The published backbone is the teacher, as in the official evaluation. Differences from the
official code:
- weight normalisation uses `torch.nn.utils.parametrizations.weight_norm` (the old hook-based
  `weight_norm` is deprecated); the g parameter is frozen at 1 when `norm_last_layer` is set;
- the centre is averaged over processes with accelerate's `reduce` instead of a raw all_reduce;
- norms and biases get no weight decay, as in the official code (`utils.get_params_groups`).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import reduce
from timm.layers import trunc_normal_
from timm.models import VisionTransformer
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from ..model.backbone import create_backbone
from .augment import AugmentConfig, MultiCrop
from .method import PretrainMethod, ema_update, momentum_schedule


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
    lr_warmup = "linspace"  # utils.cosine_scheduler: np.linspace(0, lr, warm-up steps), peak on its last step
    option_help = {
        "out_dim": "prototypes",
        "hidden_dim": "head hidden width",
        "bottleneck_dim": "head bottleneck",
        "norm_last_layer": "1: freeze the prototypes' weight-norm magnitude, 0: learn it",
        "momentum_teacher": "teacher EMA start momentum (cosine to 1)",
        "student_temp": "student temperature",
        "teacher_temp": "teacher temperature after warm-up",
        "warmup_teacher_temp": "teacher temperature at step 0",
        "warmup_teacher_temp_epochs": "teacher temperature warm-up epochs (per epoch)",
        "center_momentum": "EMA momentum of the teacher centre",
        "freeze_last_layer": "epochs with the last head layer frozen",
    }

    def __init__(
        self,
        model: str = "vit_small_patch16_224",
        *,
        img_size: int = 224,
        init: str | None = None,
        model_kwargs: dict | None = None,
        drop_path: float = 0.1,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        norm_last_layer: bool = True,
        momentum_teacher: float = 0.996,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 0,
        center_momentum: float = 0.9,
        freeze_last_layer: float = 1,
    ):
        """`model` (timm ViT, `model_kwargs` overrides, `init` pretrained tag) at `img_size` is the
        backbone of student and teacher; the options are `main_dino.py`'s arguments of the same names."""
        super().__init__()
        self.out_dim = out_dim
        self.momentum_teacher = momentum_teacher
        self.student_temp = student_temp
        self.teacher_temp = teacher_temp
        self.warmup_teacher_temp = warmup_teacher_temp
        self.warmup_teacher_temp_epochs = int(warmup_teacher_temp_epochs)
        self.center_momentum = center_momentum
        self.freeze_last_layer_epochs = freeze_last_layer

        backbone, self.backbone_spec = create_backbone(
            model, img_size=img_size, init=init, model_kwargs=model_kwargs, dynamic_img_size=True,
            drop_path_rate=drop_path)
        if init is None:
            trunc_normal_(backbone.cls_token, std=0.02)  # vision_transformer.py; timm draws it with std 1e-6
        head = DINOHead(backbone.embed_dim, out_dim, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim,
                        norm_last_layer=norm_last_layer)
        self.student = nn.ModuleDict({"backbone": backbone, "head": head})
        self.teacher = copy.deepcopy(self.student).requires_grad_(False).eval()
        self.register_buffer("center", torch.zeros(1, out_dim))

    def train(self, mode: bool = True) -> DINO:
        super().train(mode)
        self.teacher.eval()  # no drop-path in the teacher
        return self

    @classmethod
    def make_transform(cls, augment: AugmentConfig) -> Callable:
        return MultiCrop(augment)

    def export_backbone(self) -> VisionTransformer:
        return self.teacher["backbone"]

    @property
    def current_teacher_temp(self) -> float:
        """Official schedule: `np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs)` per epoch."""
        warmup, epoch = self.warmup_teacher_temp_epochs, self.epoch
        if epoch >= warmup:
            return self.teacher_temp
        if warmup == 1:
            return self.warmup_teacher_temp
        return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * epoch / (warmup - 1)

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
            features.append(backbone_features(network["backbone"], torch.cat(crops[start:end])))
            start = end
        return network["head"](torch.cat(features))

    def forward_heads(self, crops: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """crops: 2 global (B, 3, G, G) then local (B, 3, l, l) -> student outputs (len(crops) * B, K) of
        every crop and teacher outputs (2 * B, K) of the global crops only, crop-major."""
        self.teacher.eval()
        with torch.no_grad():
            teacher_out = self._multi_crop(self.teacher, crops[:2]).float()
        student_out = self._multi_crop(self.student, crops).float()
        return student_out, teacher_out

    def forward_loss(self, student_out: torch.Tensor, teacher_out: torch.Tensor, crops: int) -> torch.Tensor:
        """DINOLoss: cross-entropy of the centred, sharpened teacher distribution of each global crop
        against the student's of every other crop, averaged over the pairs (student_out (crops * B, K),
        teacher_out (2 * B, K))."""
        teacher_probs = F.softmax((teacher_out - self.center) / self.current_teacher_temp, dim=-1).chunk(2)
        student_logp = F.log_softmax(student_out / self.student_temp, dim=-1).chunk(crops)
        total, pairs = 0.0, 0
        for t_index, target in enumerate(teacher_probs):
            for s_index, logp in enumerate(student_logp):
                if s_index == t_index:
                    continue  # never match a view with itself
                total = total + torch.sum(-target * logp, dim=-1).mean()
                pairs += 1
        return total / pairs

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        student_out, teacher_out = self.forward_heads(crops)
        loss = self.forward_loss(student_out, teacher_out, len(crops))
        self._update_center(teacher_out)
        return loss

    @torch.no_grad()
    def _update_center(self, teacher_out: torch.Tensor) -> None:
        batch_center = reduce(teacher_out.mean(dim=0, keepdim=True), reduction="mean")
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)

    def clip_gradients(self, max_norm: float, accelerator: Accelerator) -> None:
        """`utils.clip_gradients`: each parameter's gradient scaled down to norm `max_norm` on its own."""
        accelerator.unscale_gradients()
        clip_each_gradient(self.student.parameters(), max_norm)

    def before_optimizer_step(self) -> None:
        if self.step < self.freeze_last_layer_epochs * self.steps_per_epoch:  # cancel_gradients_last_layer
            for param in self.student["head"].last_layer.parameters():
                param.grad = None

    def after_optimizer_step(self) -> None:
        ema_update(self.teacher, self.student, self.current_momentum)


@torch.no_grad()
def clip_each_gradient(parameters, max_norm: float) -> None:
    """Scale every gradient whose L2 norm exceeds `max_norm` to `max_norm` (DINO's `clip_gradients`)."""
    for param in parameters:
        if param.grad is not None:
            clip_coef = max_norm / (param.grad.norm(2) + 1e-6)
            if clip_coef < 1:
                param.grad.mul_(clip_coef)


def official_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """DINO's `interpolate_pos_encoding`: the (1, 1 + N*N, D) table for a (h, w) patch grid, resampled
    bicubically by scale factor ((h + 0.1) / N, (w + 0.1) / N) without antialiasing; as is when the grid
    is the table's own."""
    n = int(math.sqrt(pos_embed.shape[1] - 1))
    height, width = grid
    if (height, width) == (n, n):
        return pos_embed
    dim = pos_embed.shape[-1]
    patch_pos = F.interpolate(
        pos_embed[:, 1:].reshape(1, n, n, dim).permute(0, 3, 1, 2),
        scale_factor=((height + 0.1) / n, (width + 0.1) / n), mode="bicubic")
    if patch_pos.shape[-2:] != (height, width):
        raise ValueError(f"position table resampled to {tuple(patch_pos.shape[-2:])}, not {grid}")
    return torch.cat([pos_embed[:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def backbone_features(backbone: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Class token of a timm ViT (built with `dynamic_img_size`) for images of any size, with the
    official DINO position-table interpolation: (B, 3, H, W) -> (B, D)."""
    x = backbone.patch_embed(images)  # (B, h, w, D)
    b, height, width, dim = x.shape
    x = torch.cat([backbone.cls_token.expand(b, -1, -1), x.reshape(b, height * width, dim)], dim=1)
    x = backbone.pos_drop(x + official_pos_embed(backbone.pos_embed, (height, width)))
    x = backbone.norm_pre(backbone.patch_drop(x))
    return backbone.norm(backbone.blocks(x))[:, 0]
