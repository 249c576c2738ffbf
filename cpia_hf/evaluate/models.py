"""Frozen image encoders for evaluation: a timm or transformers ViT from a folder, the Hub or the timm registry.

`load_encoder` returns a module that maps normalised images (B, 3, H, W) to one feature vector per
image, together with the preprocessing the weights expect:

- a timm-layout folder or Hub repo (config.json with `architecture`, as `timm.models.save_for_hf`
  and the CPIA export write it) is built by `timm.create_model(..., num_classes=0)`;
- a transformers folder or Hub repo (config.json with `model_type`) by `AutoModel`: the CLS token
  of `last_hidden_state` for ViT-like models, `pooler_output` for the others; a timm model wrapped
  by transformers (`TimmWrapperModel`) gives its timm model;
- a bare timm name (`vit_base_patch16_224`) by the timm registry, with or without its weights.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode, v2

# Pathology tiles have no canonical orientation or framing: fine-tuning sees random crops of at
# least half the tile and random flips in both axes.
TRAIN_CROP_SCALE = (0.5, 1.0)


@dataclass(frozen=True)
class Preprocessing:
    """What the encoder's weights expect: input size (H, W), normalisation and resize filter."""

    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    def eval_transform(self) -> v2.Compose:
        """Resize the whole tile to the input size (no centre crop: a tile's border is tissue too)."""
        return v2.Compose([
            v2.Lambda(_to_rgb),
            v2.Resize(self.input_size, interpolation=InterpolationMode(self.interpolation), antialias=True),
            *self._to_normalised_tensor(),
        ])

    def train_transform(self) -> v2.Compose:
        """Random resized crop and flips, for fine-tuning."""
        return v2.Compose([
            v2.Lambda(_to_rgb),
            v2.RandomResizedCrop(self.input_size, scale=TRAIN_CROP_SCALE,
                                 interpolation=InterpolationMode(self.interpolation), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            *self._to_normalised_tensor(),
        ])

    def _to_normalised_tensor(self) -> list[v2.Transform]:
        """PIL image -> float tensor in [0, 1] -> normalised (what v1's ToTensor + Normalize did)."""
        return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]


def _to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


@dataclass
class Encoder:
    """A feature extractor, its preprocessing, its feature width and where it came from."""

    module: nn.Module
    preprocessing: Preprocessing
    num_features: int
    source: str


class TransformersEncoder(nn.Module):
    """A transformers vision model as a feature extractor: CLS token of a ViT, pooled output otherwise."""

    def __init__(self, model: nn.Module, use_cls_token: bool):
        super().__init__()
        self.model = model
        self.use_cls_token = use_cls_token
        if use_cls_token and getattr(model, "pooler", None) is not None:
            # The pooler does not reach the CLS feature; frozen, it stays out of optimisers and DDP.
            model.pooler.requires_grad_(False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        output = self.model(pixel_values=pixel_values)
        if self.use_cls_token:
            return output.last_hidden_state[:, 0]
        return output.pooler_output.flatten(1)

    def no_weight_decay(self) -> set[str]:
        """Token and position embeddings stay out of weight decay, as in timm's ViT."""
        return {"*cls_token", "*position_embeddings", "*mask_token", "*register_tokens"}

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer groups for layer-wise LR decay (timm convention): embeddings, then each block, then the norm."""
        return dict(
            stem=r"^model\.embeddings",
            blocks=[(r"^model\.(?:encoder\.)?layers?\.(\d+)", None), (r"^model\.(?:layernorm|norm)", (99999,))],
        )


def load_encoder(model: str, pretrained: bool = True) -> Encoder:
    """Load a frozen encoder (eval mode) from a local folder, a Hub repo id or a timm model name.

    `pretrained` only matters for a bare timm name: False gives the randomly initialised architecture.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        config = _read_config(path / "config.json")
        if "model_type" in config:
            return _load_transformers(str(path), model)
        return _load_timm(f"local-dir:{path}", True, model)
    if model.startswith(("hf-hub:", "local-dir:")):
        return _load_timm(model, True, model)
    if "/" in model:
        from huggingface_hub import hf_hub_download

        config = _read_config(Path(hf_hub_download(model, "config.json")))
        if "model_type" in config:
            return _load_transformers(model, model)
        return _load_timm(f"hf-hub:{model}", True, model)
    if not timm.is_model(model):
        raise ValueError(f"model {model!r} is neither a folder, a Hub repo id (owner/name) nor a timm model name")
    return _load_timm(model, pretrained, model)


def _read_config(config_file: Path) -> dict:
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: no config.json, so this folder is neither a timm nor a transformers model")
    config = json.loads(config_file.read_text())
    if "model_type" not in config and "architecture" not in config:
        raise ValueError(f"{config_file}: names neither `architecture` (timm) nor `model_type` (transformers)")
    return config


def _load_timm(name: str, pretrained: bool, source: str) -> Encoder:
    module = timm.create_model(name, pretrained=pretrained, num_classes=0)
    return _encoder(module, _timm_preprocessing(module), source)


def _timm_preprocessing(module: nn.Module) -> Preprocessing:
    data_config = timm.data.resolve_model_data_config(module)
    return Preprocessing(
        input_size=tuple(data_config["input_size"][1:]),
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
        interpolation=data_config.get("interpolation", "bicubic"),
    )


def _load_transformers(name: str, source: str) -> Encoder:
    from transformers import AutoImageProcessor, AutoModel, TimmWrapperModel

    model = AutoModel.from_pretrained(name)
    if isinstance(model, TimmWrapperModel):
        return _encoder(model.timm_model, _timm_preprocessing(model.timm_model), source)
    processor = AutoImageProcessor.from_pretrained(name)
    preprocessing = Preprocessing(
        input_size=_processor_input_size(processor, name),
        mean=tuple(processor.image_mean),
        std=tuple(processor.image_std),
        interpolation=Image.Resampling(int(getattr(processor, "resample", Image.Resampling.BICUBIC))).name.lower(),
    )
    model.eval()
    with torch.inference_mode():
        probe = model(pixel_values=torch.zeros(1, 3, *preprocessing.input_size))
    use_cls_token = probe.last_hidden_state.ndim == 3
    return _encoder(TransformersEncoder(model, use_cls_token), preprocessing, source)


def _processor_input_size(processor, name: str) -> tuple[int, int]:
    """The image size the model sees: the crop when the processor crops, else the resize target."""
    size = processor.crop_size if getattr(processor, "do_center_crop", False) else processor.size
    if size.get("height") and size.get("width"):
        return int(size["height"]), int(size["width"])
    if size.get("shortest_edge"):
        return int(size["shortest_edge"]), int(size["shortest_edge"])
    raise ValueError(f"{name}: cannot read an input size from its preprocessor_config.json ({size!r})")


def _encoder(module: nn.Module, preprocessing: Preprocessing, source: str) -> Encoder:
    module.eval()
    with torch.inference_mode():
        num_features = module(torch.zeros(1, 3, *preprocessing.input_size)).shape[-1]
    return Encoder(module=module, preprocessing=preprocessing, num_features=int(num_features), source=source)
