"""The encoder every stage shares: a plain timm ViT, saved as weights plus the spec that rebuilds it.

Training creates it (`create_backbone`) and saves it into each checkpoint and its output folder
(`save_backbone`); export and evaluation load it back (`load_backbone_from_checkpoint`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
from safetensors.torch import load_file, save_file
from timm.models import VisionTransformer

ENCODER_WEIGHTS = "encoder.safetensors"
ENCODER_CONFIG = "encoder_config.json"


def create_backbone(
    model: str,
    *,
    img_size: int,
    init: str | None = None,
    model_kwargs: dict | None = None,
    **overrides: Any,
) -> tuple[VisionTransformer, dict]:
    """A plain timm ViT (class token, final norm, no fc_norm, no LayerScale, token pool, no head).

    Returns the backbone and the creation spec (`{"model", "kwargs"}`) that rebuilds it.
    `init` names pretrained timm weights (e.g. `vit_small_patch16_224.augreg_in21k`) to start from.
    """
    kwargs = dict(model_kwargs or {})
    kwargs.update(img_size=img_size, num_classes=0, global_pool="token", class_token=True, fc_norm=False,
                  init_values=None, **overrides)
    name = init or model
    backbone = timm.create_model(name, pretrained=bool(init), **kwargs)
    if not isinstance(backbone, VisionTransformer) or backbone.num_prefix_tokens != 1:
        raise ValueError(f"{name}: pre-training needs a timm VisionTransformer with one class token")
    spec_kwargs = {k: v for k, v in kwargs.items() if k not in ("drop_path_rate", "weight_init")}
    return backbone, {"model": name.split(".")[0], "kwargs": spec_kwargs}


def save_backbone(backbone: VisionTransformer, spec: dict, out_dir: Path) -> Path:
    """Write the backbone's timm state dict and its creation spec into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    save_file(state, str(out_dir / ENCODER_WEIGHTS), metadata={"format": "pt"})
    (out_dir / ENCODER_CONFIG).write_text(json.dumps(spec, indent=2) + "\n")
    return out_dir / ENCODER_WEIGHTS


def load_backbone_from_checkpoint(ckpt_dir: str | Path) -> VisionTransformer:
    """The timm backbone saved in a checkpoint folder (or a finished run's output folder)."""
    ckpt_dir = Path(ckpt_dir)
    weights, config = ckpt_dir / ENCODER_WEIGHTS, ckpt_dir / ENCODER_CONFIG
    for path in (weights, config):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; not a cpia training checkpoint or output folder")
    spec = json.loads(config.read_text())
    backbone = timm.create_model(spec["model"], pretrained=False, **spec["kwargs"])
    backbone.load_state_dict(load_file(str(weights)))
    return backbone.eval()


def backbone_from_weights(weights: Path, model: str, model_args: dict | None = None) -> VisionTransformer:
    """timm ``model`` without head (``model_args`` override its defaults) holding a safetensors state dict."""
    if not Path(weights).is_file():
        raise FileNotFoundError(f"{weights}: weights file not found")
    state_dict = load_file(weights)
    backbone = timm.create_model(model, pretrained=False, **{"num_classes": 0, "global_pool": "token",
                                                             **(model_args or {})})
    try:
        backbone.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{weights}: does not fit timm model {model!r} {model_args or ''}: {error}") from error
    return backbone
