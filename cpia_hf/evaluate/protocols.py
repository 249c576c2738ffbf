"""The three evaluation protocols: weighted kNN and linear probe on frozen features, and full fine-tuning.

Every protocol returns class probabilities for the validation and test rows; `cli` turns them into
metrics. kNN and the linear probe read cached features; fine-tuning reads images every epoch.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from sklearn.neighbors import KNeighborsClassifier
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn
from tqdm.auto import tqdm

from ..model.optim import cosine_schedule, scaled_lr
from ..model.workers import loader_workers
from .data import ImageDataset, LabelledData
from .features import predict
from .metrics import classification_metrics
from .models import Encoder

FeatureSplits = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class KnnSettings:
    k: int = 20
    temperature: float = 0.07


@dataclass
class LinearSettings:
    lr: float = 1e-3
    weight_decay: float = 1e-4
    max_epochs: int = 100
    patience: int = 10
    batch_size: int = 256


@dataclass
class FinetuneSettings:
    epochs: int = 50
    base_lr: float = 5e-4  # per 256 images, scaled by the global batch size (MAE's rule)
    layer_decay: float = 0.65
    weight_decay: float = 0.05
    warmup_epochs: int = 5
    min_lr: float = 1e-6
    label_smoothing: float = 0.1
    batch_size: int = 64
    num_workers: int = 0


def knn(features: FeatureSplits, num_classes: int, settings: KnnSettings) -> dict:
    """Cosine-similarity kNN whose neighbours vote with weight exp(similarity / temperature) (DINO's protocol)."""
    train_features, train_labels = features["train"]
    k = min(settings.k, len(train_labels))
    classifier = KNeighborsClassifier(
        n_neighbors=k,
        metric="cosine",
        algorithm="brute",
        # scikit-learn gives cosine distances d = 1 - similarity
        weights=lambda distances: np.exp((1.0 - distances) / settings.temperature),
    )
    classifier.fit(train_features.numpy(), train_labels.numpy())
    probabilities = {}
    for split in ("validation", "test"):
        seen = classifier.predict_proba(features[split][0].numpy())
        # classes absent from train get no column from scikit-learn: put them back as zeros
        probabilities[split] = np.zeros((len(seen), num_classes))
        probabilities[split][:, classifier.classes_] = seen
    return {"probabilities": probabilities}


def linear_probe(features: FeatureSplits, num_classes: int, seed: int, settings: LinearSettings, device) -> dict:
    """A linear layer on standardised frozen features, AdamW, early stopping on validation accuracy."""
    generator = torch.Generator().manual_seed(seed)
    train_features, train_labels = features["train"]
    # standardising with train statistics is MAE's BatchNorm-without-affine before the linear head
    mean, std = train_features.mean(0), train_features.std(0) + 1e-6
    inputs = {split: ((x - mean) / std).to(device) for split, (x, _) in features.items()}
    targets = {split: y.to(device) for split, (_, y) in features.items()}

    torch.manual_seed(seed)
    head = nn.Linear(train_features.shape[1], num_classes).to(device)
    nn.init.trunc_normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    criterion = nn.CrossEntropyLoss()

    best_score, best_state, best_epoch, stale = None, None, 0, 0
    for epoch in range(1, settings.max_epochs + 1):
        head.train()
        for rows in torch.randperm(len(train_labels), generator=generator).split(settings.batch_size):
            rows = rows.to(device)
            loss = criterion(head(inputs["train"][rows]), targets["train"][rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        head.eval()
        with torch.no_grad():
            logits = head(inputs["validation"])
            accuracy = (logits.argmax(1) == targets["validation"]).float().mean().item()
            score = (accuracy, -criterion(logits, targets["validation"]).item())
        if best_score is None or score > best_score:
            best_score, best_epoch, stale = score, epoch, 0
            best_state = copy.deepcopy(head.state_dict())
        else:
            stale += 1
            if stale >= settings.patience:
                break
    head.load_state_dict(best_state)
    with torch.no_grad():
        probabilities = {split: head(inputs[split]).softmax(1).cpu().numpy() for split in ("validation", "test")}
    return {"best_epoch": best_epoch, "epochs_run": epoch, "probabilities": probabilities}


class Classifier(nn.Module):
    """An encoder with a linear head on its features."""

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(num_features, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # MAE's fine-tuning head initialisation
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def layer_decay_param_groups(model: Classifier, weight_decay: float, layer_decay: float) -> list[dict]:
    """timm's layer-wise LR decay groups: the head at full LR, each layer below it `layer_decay` times less.

    timm groups a headless backbone with its last block on top; with the head as one more layer above
    it (as timm and MAE group a ViT with its head), every backbone scale gains one factor `layer_decay`.
    """
    no_weight_decay = getattr(model.backbone, "no_weight_decay", set)()
    groups = param_groups_layer_decay(
        model.backbone, weight_decay=weight_decay, no_weight_decay_list=no_weight_decay, layer_decay=layer_decay)
    for group in groups:
        group["lr_scale"] *= layer_decay
    for group in param_groups_weight_decay(model.head, weight_decay=weight_decay):
        groups.append({**group, "lr_scale": 1.0})
    return groups


def finetune(
        encoder: Encoder, data: LabelledData, accelerator: Accelerator, seed: int, settings: FinetuneSettings,
) -> dict:
    """Fine-tune the whole encoder and a new head; report validation every epoch and test at the best one."""
    set_seed(seed)
    model = Classifier(copy.deepcopy(encoder.module).cpu(), encoder.num_features, data.num_classes)
    lr = scaled_lr(settings.base_lr, settings.batch_size * accelerator.num_processes)
    optimizer = torch.optim.AdamW(
        layer_decay_param_groups(model, settings.weight_decay, settings.layer_decay), lr=lr)
    preprocessing = encoder.preprocessing
    loaders = {
        split: torch.utils.data.DataLoader(
            ImageDataset(data.splits[split],
                         preprocessing.train_transform() if split == "train" else preprocessing.eval_transform()),
            batch_size=settings.batch_size,
            shuffle=split == "train",
            **loader_workers(settings.num_workers),
            generator=torch.Generator().manual_seed(seed) if split == "train" else None,
        )
        for split in ("train", "validation", "test")
    }
    model, optimizer, train_loader, validation_loader, test_loader = accelerator.prepare(
        model, optimizer, loaders["train"], loaders["validation"], loaders["test"])
    total_updates = settings.epochs * len(train_loader)
    warmup_updates = min(settings.warmup_epochs * len(train_loader), total_updates - 1)
    for group in optimizer.param_groups:
        group.setdefault("lr_scale", 1.0)
    criterion = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)

    history, best_accuracy, best_epoch, best_state, best_validation = [], None, 0, None, None
    updates = 0
    for epoch in range(1, settings.epochs + 1):
        model.train()
        loss_sum, seen = 0.0, 0
        progress = tqdm(train_loader, desc=f"fine-tune epoch {epoch}/{settings.epochs}",
                        disable=not accelerator.is_local_main_process)
        for images, targets in progress:
            with accelerator.autocast():
                loss = criterion(model(images), targets)
            optimizer.zero_grad()
            accelerator.backward(loss)
            update_lr = cosine_schedule(updates, total_updates, lr, settings.min_lr, warmup_updates)
            for group in optimizer.param_groups:
                group["lr"] = update_lr * group["lr_scale"]
            optimizer.step()
            updates += 1
            loss_sum += loss.item() * len(targets)
            seen += len(targets)
            progress.set_postfix(loss=f"{loss.item():.4f}")
        logits, labels = predict(model, validation_loader, accelerator, "validation")
        probabilities = logits.softmax(1).numpy()
        validation = classification_metrics(labels.numpy(), probabilities)
        history.append({"epoch": epoch, "train_loss": loss_sum / max(seen, 1), "validation": validation})
        if best_accuracy is None or validation["accuracy"] > best_accuracy:
            best_accuracy, best_epoch, best_validation = validation["accuracy"], epoch, probabilities
            best_state = {name: value.detach().cpu().clone()
                          for name, value in accelerator.unwrap_model(model).state_dict().items()}
    accelerator.unwrap_model(model).load_state_dict(best_state)
    logits, _ = predict(model, test_loader, accelerator, "test")
    accelerator.free_memory()
    return {
        "best_epoch": best_epoch,
        "epochs": history,
        "probabilities": {"validation": best_validation, "test": logits.softmax(1).numpy()},
    }
