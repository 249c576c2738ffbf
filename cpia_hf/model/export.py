"""Export a pre-trained ViT encoder as one Hub model repo that timm and transformers both load.

Layout, following how published pathology encoders are packaged (UNI, Virchow, H-optimus: timm
weights and config at the repo root; Phikon: a transformers ``ViTModel``):

    config.json, model.safetensors   timm layout: ``timm.create_model("hf-hub:<id>", pretrained=True)``;
                                     also ``transformers.AutoModel.from_pretrained("<id>")``, which maps
                                     a config holding ``pretrained_cfg`` to ``TimmWrapperModel``
    vit/                             native ``ViTModel``: ``ViTModel.from_pretrained("<id>", subfolder="vit")``
      config.json, model.safetensors, preprocessor_config.json
    README.md, loss_curve.png        model card (cpia_hf.model.card)

timm only reads the repo root, transformers also reads a subfolder, hence timm at the root. The
encoder must be a plain ViT (class token, final norm, no fc_norm, LayerScale or registers) so the
``ViTModel`` conversion is lossless; the image feature is the class token,
``last_hidden_state[:, 0]``. The ``vit/`` folder ships an identity pooler (unit weight, zero bias,
linear activation), so that ``pipeline("image-feature-extraction", pool=True)`` and any ``ViTModel``
load find every weight in the file and pool to the same class token, never to random weights.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import timm
import torch
from timm.layers import Mlp
from timm.models import VisionTransformer, save_for_hf
from timm.models.vision_transformer import Block
from torch import nn
from transformers import ViTConfig, ViTImageProcessor, ViTModel

from .card import LOSS_CURVE_NAME, ModelCardContext, write_model_card

VIT_SUBFOLDER = "vit"


def check_plain_vit(backbone: VisionTransformer) -> None:
    """Raise ValueError naming every part of ``backbone`` that ``ViTModel`` cannot represent."""
    problems = []
    if backbone.cls_token is None:
        problems.append("no class token")
    if backbone.num_reg_tokens:
        problems.append(f"{backbone.num_reg_tokens} register tokens")
    if backbone.pos_embed is None or backbone.no_embed_class:
        problems.append("position embedding does not cover the class token")
    if backbone.num_classes:
        problems.append(f"a {backbone.num_classes}-class head (create it with num_classes=0)")
    if not isinstance(backbone.fc_norm, nn.Identity):
        problems.append("fc_norm")
    if not isinstance(backbone.norm, nn.LayerNorm):
        problems.append(f"final norm {type(backbone.norm).__name__}")
    if not isinstance(backbone.norm_pre, nn.Identity) or not isinstance(backbone.patch_embed.norm, nn.Identity):
        problems.append("pre-norm")
    if backbone.patch_embed.proj.bias is None:
        problems.append("patch embedding without bias")
    for index, block in enumerate(backbone.blocks):
        where = f"block {index}"
        if type(block) is not Block:
            problems.append(f"{where} is {type(block).__name__}")
            continue
        if not (isinstance(block.ls1, nn.Identity) and isinstance(block.ls2, nn.Identity)):
            problems.append(f"{where} LayerScale")
        attn = block.attn
        if attn.qkv.bias is None:
            problems.append(f"{where} qkv without bias")
        if not all(isinstance(m, nn.Identity) for m in (attn.q_norm, attn.k_norm, attn.norm)):
            problems.append(f"{where} attention norms")
        mlp = block.mlp
        if type(mlp) is not Mlp or not isinstance(mlp.norm, nn.Identity):
            problems.append(f"{where} MLP {type(mlp).__name__}")
        elif not (isinstance(mlp.act, nn.GELU) and mlp.act.approximate == "none"):
            problems.append(f"{where} activation {mlp.act}")
    if problems:
        raise ValueError("encoder is not a plain ViT, cannot export it losslessly: " + "; ".join(problems))


def vit_config_from_timm(backbone: VisionTransformer) -> ViTConfig:
    """``ViTConfig`` of the same shape; layer_norm_eps from the model (timm 1e-6, ViTConfig default 1e-12)."""
    block = backbone.blocks[0]
    return ViTConfig(
        hidden_size=backbone.embed_dim,
        num_hidden_layers=len(backbone.blocks),
        num_attention_heads=block.attn.num_heads,
        intermediate_size=block.mlp.fc1.out_features,
        hidden_act="gelu",
        image_size=backbone.patch_embed.img_size[0],
        patch_size=backbone.patch_embed.patch_size[0],
        num_channels=backbone.patch_embed.proj.in_channels,
        layer_norm_eps=backbone.norm.eps,
        qkv_bias=True,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pooler_output_size=backbone.embed_dim,
        pooler_act="linear",
    )


def timm_to_vit_state_dict(backbone: VisionTransformer) -> dict[str, torch.Tensor]:
    """Rename timm ViT weights to ``ViTModel`` (no pooler); the fused qkv is split into q, k, v."""
    source = {k: v.detach() for k, v in backbone.state_dict().items()}
    target = {
        "embeddings.cls_token": source["cls_token"],
        "embeddings.position_embeddings": source["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": source["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": source["patch_embed.proj.bias"],
        "layernorm.weight": source["norm.weight"],
        "layernorm.bias": source["norm.bias"],
    }
    for index in range(len(backbone.blocks)):
        src, dst = f"blocks.{index}.", f"layers.{index}."
        for part in ("weight", "bias"):
            q, k, v = source[f"{src}attn.qkv.{part}"].chunk(3, dim=0)
            target[f"{dst}attention.q_proj.{part}"] = q
            target[f"{dst}attention.k_proj.{part}"] = k
            target[f"{dst}attention.v_proj.{part}"] = v
            target[f"{dst}attention.o_proj.{part}"] = source[f"{src}attn.proj.{part}"]
            target[f"{dst}layernorm_before.{part}"] = source[f"{src}norm1.{part}"]
            target[f"{dst}layernorm_after.{part}"] = source[f"{src}norm2.{part}"]
            target[f"{dst}mlp.fc1.{part}"] = source[f"{src}mlp.fc1.{part}"]
            target[f"{dst}mlp.fc2.{part}"] = source[f"{src}mlp.fc2.{part}"]
    return {k: v.clone().contiguous() for k, v in target.items()}


def identity_pooler(backbone: VisionTransformer) -> dict[str, torch.Tensor]:
    """``ViTPooler`` weights that pass the class token through unchanged (with ``pooler_act="linear"``)."""
    dim = backbone.embed_dim
    return {"pooler.dense.weight": torch.eye(dim), "pooler.dense.bias": torch.zeros(dim)}


def data_config(backbone: VisionTransformer, context: ModelCardContext) -> dict:
    """Eval preprocessing: the training normalisation (context mean/std, else the model's) at native size.

    The whole tile is resized to the input size, aspect ratio not kept (a tile's border is tissue
    too): timm's ``crop_mode="squash"`` with crop_pct 1.0 is exactly ``ViTImageProcessor``'s resize
    to (height, width), so both layouts see the same pixels, square or not.
    """
    return {
        "input_size": (backbone.patch_embed.proj.in_channels, *backbone.patch_embed.img_size),
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "crop_mode": "squash",
        "mean": tuple(context.mean or backbone.pretrained_cfg["mean"]),
        "std": tuple(context.std or backbone.pretrained_cfg["std"]),
    }


def save_timm_layout(backbone: VisionTransformer, out_dir: Path, data_cfg: dict, *, model_name: str,
                     license_id: str) -> None:
    """timm's own ``save_for_hf``, then drop ``model_args.num_classes``.

    transformers' TimmWrapper passes num_classes itself, so keeping it in model_args fails with
    "multiple values for keyword argument 'num_classes'"; timm still reads the top-level num_classes.
    """
    save_for_hf(
        backbone, out_dir, safe_serialization=True, data_config=data_cfg,
        model_config={"pretrained_cfg": {"tag": model_name, "license": license_id}},
    )
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    config.get("model_args", {}).pop("num_classes", None)
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def save_vit_layout(backbone: VisionTransformer, out_dir: Path, data_cfg: dict) -> None:
    """``ViTModel`` (with the identity pooler) and its ``ViTImageProcessor`` in ``out_dir``."""
    model = ViTModel(vit_config_from_timm(backbone), add_pooling_layer=True)
    model.load_state_dict({**timm_to_vit_state_dict(backbone), **identity_pooler(backbone)}, strict=True)
    model.save_pretrained(out_dir)
    height, width = data_cfg["input_size"][1:]
    ViTImageProcessor(
        do_resize=True, size={"height": height, "width": width}, resample=3,  # PIL bicubic, as timm
        image_mean=list(data_cfg["mean"]), image_std=list(data_cfg["std"]),
    ).save_pretrained(out_dir)


def architecture_fields(backbone: VisionTransformer) -> dict:
    """The encoder's real shape for the card: name, width, depth, heads, patch, size, overridden kwargs."""
    architecture = backbone.pretrained_cfg["architecture"]
    with torch.device("meta"):  # the registered shape, without allocating or initialising weights
        defaults = timm.create_model(architecture, pretrained=False, num_classes=0)
    actual = {"embed_dim": backbone.embed_dim, "depth": len(backbone.blocks),
              "num_heads": backbone.blocks[0].attn.num_heads, "patch_size": backbone.patch_embed.patch_size[0],
              "img_size": backbone.patch_embed.img_size[0]}
    registered = {"embed_dim": defaults.embed_dim, "depth": len(defaults.blocks),
                  "num_heads": defaults.blocks[0].attn.num_heads, "patch_size": defaults.patch_embed.patch_size[0],
                  "img_size": defaults.patch_embed.img_size[0]}
    overrides = {key: value for key, value in actual.items() if registered[key] != value}
    return {"architecture": architecture, "num_features": backbone.num_features, "depth": actual["depth"],
            "num_heads": actual["num_heads"], "patch_size": actual["patch_size"],
            "model_overrides": overrides or None}


def export_encoder(backbone: VisionTransformer, out_dir: Path, *, model_name: str,
                   card_context: ModelCardContext | dict | None = None) -> dict[str, Path]:
    """Write the Hub-ready repo folder for ``backbone``; returns the paths of its parts.

    ``model_name`` names the model on its card; ``card_context`` is what the training run
    recorded (``ModelCardContext`` or a dict of its fields), with optional ``mean``/``std``.
    """
    check_plain_vit(backbone)
    context = ModelCardContext.coerce(card_context)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data_cfg = data_config(backbone, context)
    save_timm_layout(backbone, out_dir, data_cfg, model_name=model_name, license_id=context.license)
    save_vit_layout(backbone, out_dir / VIT_SUBFOLDER, data_cfg)
    context = replace(context, model_name=model_name, **architecture_fields(backbone),
                      image_size=list(data_cfg["input_size"][1:]), mean=list(data_cfg["mean"]),
                      std=list(data_cfg["std"]))
    card = write_model_card(out_dir, context, repo_id=context.repo_id)
    paths = {
        "root": out_dir,
        "timm_config": out_dir / "config.json",
        "timm_weights": out_dir / "model.safetensors",
        "vit": out_dir / VIT_SUBFOLDER,
        "card": card,
    }
    if context.loss_history:
        paths["loss_curve"] = out_dir / LOSS_CURVE_NAME
    return paths
