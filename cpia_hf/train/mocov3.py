"""MoCo-v3 (Chen, Xie & He 2021): symmetric InfoNCE between a predictor and a momentum encoder.

Follows facebookresearch/moco-v3 `moco/builder.py` (`MoCo_ViT`) and `main_moco.py`. Keys of every
process are gathered (they come from the momentum encoder under `no_grad`, so the gather needs no
gradient path); queries stay local and each process's positives sit at its own offset. As in the
official loop, each training forward first moves the momentum encoder towards the current encoder
with the momentum m(k) of the current step k (`adjust_moco_momentum` at k / total steps), then
computes the keys with it. Differences from the official code:
- norms and biases get no weight decay (the official ViT recipe decays every parameter);
- BatchNorm is synchronised across processes only on GPU (SyncBatchNorm has no CPU kernel).

`vit_small_patch16_224` with random initialisation is built as MoCo-v3's `vits.vit_small`: 12
attention heads (timm's registered ViT-S has 6); width 384, depth 12 and patch 16 are the same.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from accelerate import PartialState
from accelerate.utils import gather
from timm.models import VisionTransformer
from torch import nn

from ..model.backbone import create_backbone
from .augment import AugmentConfig, TwoViews
from .mae import sincos_pos_embed
from .method import PretrainMethod, ema_update, momentum_schedule


def build_mlp(num_layers: int, input_dim: int, mlp_dim: int, output_dim: int, last_bn: bool = True) -> nn.Sequential:
    """MoCo-v3 MLP: bias-free linears with BN + ReLU between, affine-free BN after the last."""
    layers: list[nn.Module] = []
    for index in range(num_layers):
        dim_in = input_dim if index == 0 else mlp_dim
        dim_out = output_dim if index == num_layers - 1 else mlp_dim
        layers.append(nn.Linear(dim_in, dim_out, bias=False))
        if index < num_layers - 1:
            layers += [nn.BatchNorm1d(dim_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(dim_out, affine=False))
    return nn.Sequential(*layers)


MOCO_VIT_SMALL = "vit_small_patch16_224"


class MoCoV3(PretrainMethod):
    """Base encoder + 3-layer projector + 2-layer predictor against a momentum encoder + projector."""

    name = "mocov3"
    option_help = {
        "temperature": "InfoNCE temperature",
        "momentum": "momentum encoder start momentum (cosine to 1)",
        "mlp_dim": "projector/predictor hidden width",
        "out_dim": "embedding size",
        "freeze_patch_embed": "1: frozen random patch projection, 0: trained",
    }

    def __init__(
        self,
        model: str = "vit_small_patch16_224",
        *,
        img_size: int = 224,
        init: str | None = None,
        model_kwargs: dict | None = None,
        drop_path: float = 0.0,
        temperature: float = 0.2,
        momentum: float = 0.99,
        mlp_dim: int = 4096,
        out_dim: int = 256,
        freeze_patch_embed: bool = True,
    ):
        """`model` (timm ViT, `model_kwargs` overrides, `init` pretrained tag) at `img_size` is the base
        encoder; the options are `main_moco.py`'s (`--moco-t`, `--moco-m`, `--moco-mlp-dim`,
        `--moco-dim`, `--stop-grad-conv1`)."""
        super().__init__()
        self.temperature = temperature
        self.base_momentum = momentum

        model_kwargs = moco_model_kwargs(model, init, model_kwargs)
        # timm's 'moco' init is MoCo-v3's (xavier with the qkv split) except for the patch embedding.
        self.encoder, self.backbone_spec = create_backbone(
            model, img_size=img_size, init=init, model_kwargs=model_kwargs,
            weight_init="moco" if init is None else "", drop_path_rate=drop_path)
        encoder = self.encoder
        dim = encoder.embed_dim
        if init is None:
            patch = encoder.patch_embed.proj
            bound = math.sqrt(6.0 / float(3 * patch.kernel_size[0] * patch.kernel_size[1] + dim))
            nn.init.uniform_(patch.weight, -bound, bound)
            nn.init.zeros_(patch.bias)
            with torch.no_grad():  # MoCo-v3 ViTs use a fixed 2-D sin-cos position table
                encoder.pos_embed.copy_(sincos_pos_embed(encoder.patch_embed.grid_size, dim))
            encoder.pos_embed.requires_grad_(False)
        if freeze_patch_embed:
            encoder.patch_embed.proj.requires_grad_(False)
        self.projector = build_mlp(3, dim, mlp_dim, out_dim)
        self.predictor = build_mlp(2, out_dim, mlp_dim, out_dim)
        self.momentum_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.momentum_projector = copy.deepcopy(self.projector).requires_grad_(False)

    @classmethod
    def make_transform(cls, augment: AugmentConfig) -> Callable:
        return TwoViews(augment)

    def export_backbone(self) -> VisionTransformer:
        return self.encoder

    @property
    def current_momentum(self) -> float:
        return momentum_schedule(self.step, self.total_steps, self.base_momentum)

    def schedule_state(self) -> dict:
        return {"moco_momentum": self.current_momentum}

    def contrastive_loss(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """InfoNCE of this process's queries against the keys of all processes (gathered, no gradient)."""
        keys = gather(F.normalize(keys.float(), dim=1))
        return info_nce(queries, keys, self.temperature, PartialState().process_index)

    def forward_loss(self, q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor) -> torch.Tensor:
        """Symmetric loss: view 1's queries against view 2's keys and back; all (B, out_dim)."""
        return self.contrastive_loss(q1, k2) + self.contrastive_loss(q2, k1)

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Loss of one step; in training mode the momentum encoder is updated first, with this step's
        momentum (`builder.py`: `_update_momentum_encoder(m)` before the keys)."""
        first, second = views
        q1 = self.predictor(self.projector(self.encoder(first)))
        q2 = self.predictor(self.projector(self.encoder(second)))
        with torch.no_grad():
            if self.training:
                self.update_momentum_encoder()
            k1 = self.momentum_projector(self.momentum_encoder(first))
            k2 = self.momentum_projector(self.momentum_encoder(second))
        return self.forward_loss(q1, q2, k1, k2)

    def update_momentum_encoder(self) -> None:
        """Momentum encoder and projector <- m(step) * themselves + (1 - m(step)) * the current ones."""
        momentum = self.current_momentum
        ema_update(self.momentum_encoder, self.encoder, momentum)
        ema_update(self.momentum_projector, self.projector, momentum)


def moco_model_kwargs(model: str, init: str | None, model_kwargs: dict | None) -> dict:
    """timm kwargs of the encoder: ViT-S/16 gets MoCo-v3's 12 heads unless pretrained weights (built
    with timm's 6) or an explicit `num_heads` say otherwise."""
    kwargs = dict(model_kwargs or {})
    if model == MOCO_VIT_SMALL and init is None:
        kwargs.setdefault("num_heads", 12)
    return kwargs


def contrastive_labels(batch: int, process_index: int, device: torch.device | None = None) -> torch.Tensor:
    """Column of each local query's positive among the keys gathered from all processes in rank
    order: this process's keys start at `batch * process_index`."""
    return torch.arange(batch, device=device) + batch * process_index


def info_nce(queries: torch.Tensor, keys: torch.Tensor, temperature: float, process_index: int) -> torch.Tensor:
    """MoCo-v3's `contrastive_loss`: queries (N, D) of this process, L2-normalised keys (P * N, D) of all
    processes; cross-entropy of the cosine logits / T against the positives, scaled by 2 * T."""
    queries = F.normalize(queries.float(), dim=1)
    logits = queries @ keys.T / temperature
    labels = contrastive_labels(queries.shape[0], process_index, queries.device)
    return F.cross_entropy(logits, labels) * (2 * temperature)
