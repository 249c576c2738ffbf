"""Pre-training: tiny ViTs on a generated CPIA folder, on CPU (overfit, exact resume, 2 processes)."""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from timm.models import VisionTransformer
from timm.optim import create_optimizer_v2

from cpia_hf.dataset.imageio import encode_jpeg
from cpia_hf.model.backbone import load_backbone_from_checkpoint
from cpia_hf.schema import FEATURES
from cpia_hf.train import METHODS, cli
from cpia_hf.train.augment import AugmentConfig, MAEView, MultiCrop, RandomHEDJitter, RandomRotate90
from cpia_hf.train.data import build_loader, load_pretrain_rows, make_views

REPO = Path(__file__).resolve().parents[1]
IMAGES = 32
TINY_VIT = json.dumps({"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2})
METHOD_FLAGS = {
    "mae": ["--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2"],
    "dino": ["--out-dim", "64", "--hidden-dim", "64", "--bottleneck-dim", "32", "--local-crops", "2",
             "--local-size", "16", "--freeze-last-layer", "0"],
    "mocov3": ["--mlp-dim", "64", "--out-dim", "32"],
}


def tissue_like(rng: np.random.Generator, side: int) -> np.ndarray:
    """A pink/purple smooth texture, different per image."""
    yy, xx = np.mgrid[0:side, 0:side] / side
    freq, phase = rng.uniform(2, 6, size=3), rng.uniform(0, 6, size=3)
    waves = np.stack([np.sin(freq[c] * xx * 6 + phase[c]) * np.cos(freq[c] * yy * 4) for c in range(3)], -1)
    return (128 + 100 * waves * [0.6, 0.3, 0.5] + [80, 0, 40]).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CPIA-layout folder: config `mini`, 16 M and 16 S images (64 px), organs Breast/Kidney."""
    root = tmp_path_factory.mktemp("cpia_train")
    rng = np.random.default_rng(0)
    rows: dict[str, list] = {name: [] for name in FEATURES}
    for index in range(IMAGES):
        rows["image"].append({"bytes": encode_jpeg(tissue_like(rng, 64)), "path": None})
        rows["image_id"].append(f"slide-{index}")
        rows["scale"].append("M" if index % 2 == 0 else "S")
        rows["organ"].append("Breast" if index % 4 < 2 else "Kidney")
        for name in ("subset", "kind", "disease", "stain", "field", "source_file", "license"):
            rows[name].append("roi" if name == "kind" else "test")
        for name, value in (("x", 0.0), ("y", 0.0), ("width", 64.0), ("height", 64.0), ("mpp", 0.4942)):
            rows[name].append(value)
        rows["tissue_fraction"].append(None)
        rows["label"].append(None)
    table = Dataset.from_dict(rows, features=FEATURES)
    for scale in ("M", "S"):
        folder = root / "data" / "mini" / scale / "test"
        folder.mkdir(parents=True)
        table.filter(lambda s: s == scale, input_columns="scale").to_parquet(str(folder / "test-00000.parquet"))
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: mini\n  data_files:\n  - split: train\n    path: data/mini/**/*.parquet\n---\n"
    )
    return root


def train_args(method: str, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--method", method, "--data", str(data), "--out", str(out), "--cache-dir", str(out.parent / "hf_cache"),
        "--model", "vit_tiny_patch16_224", "--model-kwargs", TINY_VIT, "--img-size", "32",
        "--batch-size", "8", "--warmup-steps", "1", "--lr", "1e-3", "--num-workers", "0", "--log-every", "1",
        *METHOD_FLAGS[method], *extra,
    ]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.configure_train(parser)
    return parser.parse_args(argv)


def read_log(out: Path) -> dict[int, float]:
    lines = (out / "train_log.jsonl").read_text().splitlines()
    return {record["step"]: record["loss"] for record in map(json.loads, lines)}


def test_filters_and_errors(dataset_dir: Path, tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    assert len(load_pretrain_rows(str(dataset_dir), "mini", cache_dir=cache)) == IMAGES
    kidney_s = load_pretrain_rows(str(dataset_dir), "mini", scales=["S"], organs=["Kidney"], cache_dir=cache)
    assert len(kidney_s) == IMAGES // 4
    assert all(int(image_id.split("-")[1]) % 4 == 3 for image_id in kidney_s["image_id"])
    with pytest.raises(ValueError, match="unknown scale"):
        load_pretrain_rows(str(dataset_dir), "mini", scales=["XXL"], cache_dir=cache)
    with pytest.raises(ValueError, match="nope"):
        load_pretrain_rows(str(dataset_dir), "nope", cache_dir=cache)


def test_streaming_is_split_across_processes(dataset_dir: Path, tmp_path: Path, monkeypatch) -> None:
    # datasets sleeps 5 s after each pass over several Parquet files (pyarrow thread shutdown).
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
    rows = load_pretrain_rows(str(dataset_dir), "mini", streaming=True, cache_dir=str(tmp_path / "cache"))
    view = MAEView(AugmentConfig(img_size=32))
    loaders = [build_loader(rows, view, batch_size=4, num_workers=0, seed=0, process_index=rank, num_processes=2)
               for rank in (0, 1)]
    seen = [{row["image_id"] for row in loader.dataset.rows} for loader in loaders]
    assert seen[0].isdisjoint(seen[1]) and len(seen[0] | seen[1]) == IMAGES
    batch = next(iter(loaders[0]))
    assert batch.shape == (4, 3, 32, 32) and batch.dtype == torch.float32


def test_views_are_seeded_per_image_and_epoch(dataset_dir: Path, tmp_path: Path) -> None:
    rows = load_pretrain_rows(str(dataset_dir), "mini", cache_dir=str(tmp_path / "cache"))
    augment = AugmentConfig(img_size=32, local_size=16, local_crops=3, stain_jitter=0.05)
    crops = MultiCrop(augment)
    first = make_views(rows[0], 0, crops, seed=1, epoch=0)
    assert [tuple(c.shape) for c in first] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    torch.manual_seed(123)
    again = make_views(rows[0], 0, crops, seed=1, epoch=0)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], make_views(rows[0], 0, crops, seed=1, epoch=1)[0])
    # Seeding an image's views leaves the caller's random stream alone.
    torch.manual_seed(5)
    make_views(rows[0], 0, crops, seed=1, epoch=0)
    after = torch.rand(1)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(1))


def test_rotation_and_stain_jitter_keep_pixels_valid() -> None:
    image = torch.rand(3, 8, 8)
    rotations = {RandomRotate90()(image).flatten()[0].item() for _ in range(64)}
    corners = {image[0, row, col].item() for row in (0, -1) for col in (0, -1)}
    assert rotations == corners  # each of the 4 rotations puts a different corner first
    jittered = RandomHEDJitter(0.05)(image)
    assert jittered.shape == image.shape and 0 <= jittered.min() and jittered.max() <= 1
    assert torch.allclose(RandomHEDJitter(0.0)(image), image, atol=1e-4)  # HED round trip is lossless


@pytest.mark.parametrize("method", sorted(METHODS))
def test_loss_falls_on_a_fixed_batch(method: str, dataset_dir: Path, tmp_path: Path) -> None:
    # DINO's target moves with the teacher EMA and the centre; holding both makes the objective fixed.
    fixed_target = ["--momentum-teacher", "1.0", "--center-momentum", "1.0"] if method == "dino" else []
    cfg = cli.build_config(parse(train_args(method, dataset_dir, tmp_path / "out", *fixed_target)))
    torch.manual_seed(0)
    model = METHODS[method].from_config(cfg)
    rows = load_pretrain_rows(cfg.data, cfg.config, cache_dir=cfg.cache_dir)
    batch = next(iter(build_loader(rows, model.make_transform(cfg.augment), batch_size=8, num_workers=0, seed=0)))
    lr = 3e-4 if method == "dino" else 1e-3  # the sharp teacher target overshoots at 1e-3
    optimizer = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
    losses = []
    for step in range(12):
        model.set_progress(step, 100, 100)
        torch.manual_seed(0)  # same masks / drop-path every step: a fixed objective
        loss = model(batch)
        optimizer.zero_grad()
        loss.backward()
        model.before_optimizer_step()
        optimizer.step()
        model.after_optimizer_step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < 0.9 * losses[0], losses


@pytest.mark.parametrize("method", sorted(METHODS))
def test_resume_repeats_the_uninterrupted_run(method: str, dataset_dir: Path, tmp_path: Path) -> None:
    # 32 images / batch 8 = 4 steps per epoch: resuming at step 3 crosses an epoch boundary.
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert cli.main(train_args(method, dataset_dir, full, "--max-steps", "6", "--save-every", "3", "--no-export")) == 0
    checkpoint = full / "checkpoints" / "step-0000003"
    assert cli.main(train_args(method, dataset_dir, resumed, "--max-steps", "6", "--resume", str(checkpoint),
                               "--no-export")) == 0
    full_losses, resumed_losses = read_log(full), read_log(resumed)
    assert sorted(full_losses) == list(range(1, 7)) and sorted(resumed_losses) == [4, 5, 6]
    assert all(math.isfinite(v) for v in full_losses.values())
    for step in (4, 5, 6):
        assert resumed_losses[step] == pytest.approx(full_losses[step], rel=1e-5, abs=1e-6)
    final_full = load_file(str(full / "encoder.safetensors"))
    final_resumed = load_file(str(resumed / "encoder.safetensors"))
    assert all(torch.allclose(final_full[k], final_resumed[k], atol=1e-6) for k in final_full)

    backbone = load_backbone_from_checkpoint(checkpoint)
    assert isinstance(backbone, VisionTransformer) and backbone.num_classes == 0
    saved = load_file(str(checkpoint / "encoder.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in backbone.state_dict().items())
    assert not torch.equal(saved["blocks.0.attn.qkv.weight"], final_full["blocks.0.attn.qkv.weight"])
    context = json.loads((resumed / "card_context.json").read_text())
    assert [step for step, _ in context["loss_history"]] == list(range(1, 7))
    assert context["method"] == method and context["global_batch_size"] == 8


def test_export_writes_the_hub_folder(dataset_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert cli.main(train_args("mae", dataset_dir, out, "--max-steps", "2")) == 0
    model_dir = out / "model"
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "README.md").is_file()
    card = (model_dir / "README.md").read_text()
    assert "MAE" in card and "mini" in card
    exported = load_file(str(model_dir / "model.safetensors"))
    encoder = load_file(str(out / "encoder.safetensors"))
    assert torch.equal(exported["blocks.1.mlp.fc2.weight"], encoder["blocks.1.mlp.fc2.weight"])


def test_accelerate_two_processes(dataset_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # accelerate 1.15 runs `launch --cpu` through its single-process launcher (several CPU processes
    # need mpirun there); --multi_gpu starts torchrun, and on a machine without GPU the trainer forms
    # a gloo CPU group.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "cpia_hf.train",
               *train_args("mocov3", dataset_dir, out, "--batch-size", "4", "--max-steps", "3", "--save-every", "2",
                           "--cpu", "--no-export")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    losses = read_log(out)
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())
    config = json.loads((out / "train_config.json").read_text())
    assert config["num_processes"] == 2 and config["steps_per_epoch"] == IMAGES // 8
    context = json.loads((out / "card_context.json").read_text())
    assert context["global_batch_size"] == 8 and context["hardware"].startswith("2 x ")
    backbone = load_backbone_from_checkpoint(out)
    assert backbone(torch.rand(1, 3, 32, 32)).shape == (1, 32)
    assert (out / "checkpoints" / "step-0000002" / "model.safetensors").is_file()
