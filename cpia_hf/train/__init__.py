"""Self-supervised pre-training of ViT encoders on CPIA: MAE, DINO and MoCo-v3 over one trainer.

Pieces come from libraries where they fit: timm (backbone, AdamW parameter groups, sin-cos tables,
MoCo-v3 init), accelerate (processes, mixed precision, accumulation, checkpoint state, gathers),
datasets (loading, filters, streaming, node split) and torchvision (augmentations). The method
heads and losses are written here, after the official repositories: `lightly` would add a
dependency for three small modules, and its wrappers do not keep the plain timm backbone that the
export needs (class token, final norm, no fc_norm) nor our per-step seeding for exact resume.

Modules: `config` (`TrainConfig`, each setting declared once, and `METHOD_DEFAULTS`, each method's
official recipe), `settings` (the field helper the flags are generated from), `method` (the
`PretrainMethod` interface, its capabilities, EMA update and momentum schedule), `mae` / `dino` /
`mocov3` (one method each, with `forward_loss`), `trainer` (`train` = `set_up`, `run_steps`,
`finish`), `data` (loading, sharding, seeded views), `augment` (views) and `cli` (`cpia train`,
generated from the settings, `--recipe`, and `publish_run`, which exports and pushes a run).
"""
from .config import TrainConfig
from .dino import DINO
from .mae import MAE
from .method import PretrainMethod
from .mocov3 import MoCoV3
from .trainer import train

METHODS: dict[str, type[PretrainMethod]] = {"mae": MAE, "dino": DINO, "mocov3": MoCoV3}

__all__ = ["METHODS", "PretrainMethod", "TrainConfig", "train"]
