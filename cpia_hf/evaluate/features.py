"""Frozen features of every split, computed once and cached by model, data and split fingerprint."""
from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..model.workers import loader_workers
from .data import ImageDataset, LabelledSplit
from .models import Encoder


def encoder_fingerprint(encoder: Encoder) -> str:
    """Hash of every weight and the preprocessing: the same weights under any name share a cache."""
    digest = hashlib.sha256(repr(sorted(asdict(encoder.preprocessing).items())).encode())
    for name, tensor in encoder.module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def extract_features(
        encoder: Encoder,
        split: LabelledSplit,
        accelerator: Accelerator,
        cache_dir: Path,
        model_fingerprint: str,
        batch_size: int = 64,
        num_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, D) and class ids (N,) of a split, in row order, read from the cache when present."""
    key = hashlib.sha256(f"{model_fingerprint}\x1f{split.fingerprint()}".encode()).hexdigest()[:32]
    cache_file = Path(cache_dir) / f"{split.name}-{key}.safetensors"
    if cache_file.is_file():
        cached = load_file(cache_file)
        return cached["features"], cached["labels"]
    loader = accelerator.prepare(torch.utils.data.DataLoader(
        ImageDataset(split, encoder.preprocessing.eval_transform()),
        batch_size=batch_size, shuffle=False, **loader_workers(num_workers)))
    module = encoder.module.to(accelerator.device)
    features, labels = predict(module, loader, accelerator, f"features ({split.name})")
    if accelerator.is_main_process:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        save_file({"features": features, "labels": labels}, cache_file)
    return features, labels


def predict(
        module: nn.Module, loader: torch.utils.data.DataLoader, accelerator: Accelerator, description: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs and labels of a module over a prepared loader, gathered from all processes, float32 on the CPU."""
    module.eval()
    outputs, labels = [], []
    with torch.inference_mode(), accelerator.autocast():
        for images, targets in tqdm(loader, desc=description, disable=not accelerator.is_local_main_process):
            batch_outputs, batch_labels = accelerator.gather_for_metrics((module(images), targets))
            outputs.append(batch_outputs.float().cpu())
            labels.append(batch_labels.cpu())
    return torch.cat(outputs), torch.cat(labels)
