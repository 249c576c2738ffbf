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
from huggingface_hub import ModelCard
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
    view = MAEView(AugmentConfig(img_size=32, crop_scale=(0.2, 1.0)))
    loaders = [build_loader(rows, view, batch_size=4, num_workers=0, seed=0, process_index=rank, num_processes=2)
               for rank in (0, 1)]
    seen = [{row["image_id"] for row in loader.dataset.rows} for loader in loaders]
    assert seen[0].isdisjoint(seen[1]) and len(seen[0] | seen[1]) == IMAGES
    batch = next(iter(loaders[0]))
    assert batch.shape == (4, 3, 32, 32) and batch.dtype == torch.float32


def test_views_are_seeded_per_image_and_epoch(dataset_dir: Path, tmp_path: Path) -> None:
    rows = load_pretrain_rows(str(dataset_dir), "mini", cache_dir=str(tmp_path / "cache"))
    augment = AugmentConfig(img_size=32, crop_scale=(0.4, 1.0), local_size=16, local_crops=3, stain_jitter=0.05)
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
    assert cli.main(train_args("mae", dataset_dir, out, "--max-steps", "2", "--dataset-id", "someone/CPIA")) == 0
    model_dir = out / "model"
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "README.md").is_file()
    card = (model_dir / "README.md").read_text()
    assert "MAE" in card and "mini" in card
    metadata = ModelCard.load(model_dir / "README.md").data
    assert metadata.datasets == ["someone/CPIA"] and metadata.base_model is None
    assert str(dataset_dir) not in card and str(tmp_path) not in card
    assert "depth=2" in card and "embed_dim=32" in card and "patch 8 px, 32x32 px input" in card
    assert "M 0.4942 µm/px" in card and "S 0.1235 µm/px" in card and "CLS token" in card
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


# Losses pinned against independent formulations, and the properties that catch known mutations.

TINY_KWARGS = {"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}


def perturb(module: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> None:
    """Non-trivial values everywhere (zero biases and unit norms would hide mapping mistakes)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))


def timm_block_to_vit(block, prefix: str) -> dict:
    """A timm Block's weights under transformers' ViT layer names (fused qkv split into q, k, v)."""
    state = {}
    for part in ("weight", "bias"):
        q, k, v = block.attn.qkv.state_dict()[part].chunk(3, dim=0)
        state.update({f"{prefix}attention.q_proj.{part}": q, f"{prefix}attention.k_proj.{part}": k,
                      f"{prefix}attention.v_proj.{part}": v,
                      f"{prefix}attention.o_proj.{part}": block.attn.proj.state_dict()[part],
                      f"{prefix}layernorm_before.{part}": block.norm1.state_dict()[part],
                      f"{prefix}layernorm_after.{part}": block.norm2.state_dict()[part],
                      f"{prefix}mlp.fc1.{part}": block.mlp.fc1.state_dict()[part],
                      f"{prefix}mlp.fc2.{part}": block.mlp.fc2.state_dict()[part]})
    return state


def tiny_mae(norm_pix_loss: bool = True):
    from cpia_hf.train.mae import MAE

    torch.manual_seed(0)
    model = MAE("vit_tiny_patch16_224", img_size=32, model_kwargs=TINY_KWARGS, decoder_dim=16, decoder_depth=1,
                decoder_heads=2, norm_pix_loss=norm_pix_loss)
    perturb(model)
    return model


def reference_mae(model):
    """transformers' ViTMAEForPreTraining holding `model`'s weights (its own sin-cos tables replaced by ours)."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    config = ViTMAEConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=32,
        patch_size=8, layer_norm_eps=1e-6, decoder_hidden_size=16, decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2, decoder_intermediate_size=64, mask_ratio=model.mask_ratio,
        norm_pix_loss=model.norm_pix_loss, hidden_act="gelu", qkv_bias=True)
    reference = ViTMAEForPreTraining(config).eval()
    encoder = model.encoder
    state = {"vit.embeddings.cls_token": encoder.cls_token, "vit.embeddings.position_embeddings": encoder.pos_embed,
             "vit.embeddings.patch_embeddings.projection.weight": encoder.patch_embed.proj.weight,
             "vit.embeddings.patch_embeddings.projection.bias": encoder.patch_embed.proj.bias,
             "vit.layernorm.weight": encoder.norm.weight, "vit.layernorm.bias": encoder.norm.bias,
             "decoder.mask_token": model.mask_token, "decoder.decoder_pos_embed": model.decoder_pos_embed,
             "decoder.decoder_embed.weight": model.decoder_embed.weight,
             "decoder.decoder_embed.bias": model.decoder_embed.bias,
             "decoder.decoder_norm.weight": model.decoder_norm.weight, "decoder.decoder_norm.bias": model.decoder_norm.bias,
             "decoder.decoder_pred.weight": model.decoder_pred.weight, "decoder.decoder_pred.bias": model.decoder_pred.bias}
    for index, block in enumerate(encoder.blocks):
        state.update(timm_block_to_vit(block, f"vit.layers.{index}."))
    for index, block in enumerate(model.decoder_blocks):
        state.update(timm_block_to_vit(block, f"decoder.decoder_layers.{index}."))
    reference.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    return reference


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_mae_loss_equals_transformers_vitmae(norm_pix_loss: bool) -> None:
    model = tiny_mae(norm_pix_loss).eval()
    reference = reference_mae(model)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(images, noise=noise)
        theirs = reference(pixel_values=images, noise=noise).loss
    assert abs(ours.item() - theirs.item()) <= 1e-5, (ours.item(), theirs.item())


def test_mae_loss_scores_masked_patches_only() -> None:
    model = tiny_mae().eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        latent, mask, ids_restore = model.forward_encoder(images, noise)
        pred = model.forward_decoder(latent, ids_restore, mask)
        loss = model.forward_loss(images, pred, mask)
        # Scramble the pixels of the visible patches: the loss of the same prediction must not move.
        patches = model.patchify(images)
        visible = ~mask.bool()
        patches[visible] = torch.randn_like(patches[visible])
        grid = patches.reshape(2, 4, 4, 8, 8, 3).permute(0, 5, 1, 3, 2, 4).reshape(2, 3, 32, 32)
        assert torch.equal(model.patchify(grid), patches)
        assert model.forward_loss(grid, pred, mask).item() == loss.item()
        assert mask.sum().item() == 2 * 12 and pred.shape == (24, 8 * 8 * 3)


def tiny_dino(**options):
    from cpia_hf.train.dino import DINO

    torch.manual_seed(0)
    model = DINO("vit_tiny_patch16_224", img_size=32, model_kwargs=TINY_KWARGS, drop_path=0.1, out_dim=64,
                 hidden_dim=64, bottleneck_dim=32, **options)
    perturb(model.teacher, seed=1)  # a teacher that is no longer the student's copy
    with torch.no_grad():
        model.center.copy_(0.3 * torch.randn(1, 64, generator=torch.Generator().manual_seed(2)))
    return model


def dino_crops(batch: int = 4, local: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randn(batch, 3, 32, 32, generator=generator) for _ in range(2)] + \
        [torch.randn(batch, 3, 16, 16, generator=generator) for _ in range(local)]


def official_interpolate_pos_encoding(pos_embed: torch.Tensor, patch: int, w: int, h: int) -> torch.Tensor:
    """facebookresearch/dino vision_transformer.py `interpolate_pos_encoding`, as published."""
    npatch, n = (w // patch) * (h // patch), pos_embed.shape[1] - 1
    if npatch == n and w == h:
        return pos_embed
    class_pos_embed, patch_pos_embed = pos_embed[:, 0], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0, h0 = w // patch + 0.1, h // patch + 0.1
    patch_pos_embed = torch.nn.functional.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)), mode="bicubic")
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def official_vit_cls(backbone, image: torch.Tensor) -> torch.Tensor:
    """DINO's VisionTransformer.forward on a timm ViT's weights: prepare_tokens, blocks, norm, x[:, 0]."""
    b, _, w, h = image.shape
    x = backbone.patch_embed.proj(image).flatten(2).transpose(1, 2)
    x = torch.cat((backbone.cls_token.expand(b, -1, -1), x), dim=1)
    x = x + official_interpolate_pos_encoding(backbone.pos_embed, backbone.patch_embed.patch_size[0], w, h)
    for block in backbone.blocks:
        x = block(x)
    return backbone.norm(x)[:, 0]


def test_dino_loss_equals_the_published_equation() -> None:
    model = tiny_dino().eval()  # eval: no drop-path in the student either, so both sides see the same network
    crops = dino_crops()
    center = model.center.clone()
    with torch.no_grad():
        ours = model(crops).item()
        teacher = [model.teacher["head"](official_vit_cls(model.teacher["backbone"], c)) for c in crops[:2]]
        student = [model.student["head"](official_vit_cls(model.student["backbone"], c)) for c in crops]
    # L = 1 / (2 (V - 1)) * sum over global crops i and crops v != i of
    #     mean over images b of  - sum_k P_t(i, b)_k log P_s(v, b)_k,
    # P_t = softmax((g_t - C) / tau_t), P_s = softmax(g_s / tau_s), tau_t = 0.04, tau_s = 0.1 (DINO eq. 1, alg. 1)
    total, pairs = 0.0, 0
    for i in range(2):
        p_teacher = torch.softmax((teacher[i] - center) / 0.04, dim=-1)
        for v in range(len(crops)):
            if v == i:
                continue
            log_p_student = torch.log_softmax(student[v] / 0.1, dim=-1)
            per_image = [-(p_teacher[b] * log_p_student[b]).sum() for b in range(p_teacher.shape[0])]
            total += sum(per_image) / len(per_image)
            pairs += 1
    assert pairs == 2 * (len(crops) - 1)
    assert abs(ours - total.item() / pairs) <= 1e-5, (ours, total.item() / pairs)
    # the centre moved afterwards: C <- m C + (1 - m) mean of the teacher outputs
    expected_center = 0.9 * center + 0.1 * torch.cat(teacher).mean(0, keepdim=True)
    torch.testing.assert_close(model.center, expected_center, atol=1e-6, rtol=0)


def test_dino_teacher_sees_global_crops_only() -> None:
    model = tiny_dino()
    seen: dict[str, list] = {"teacher": [], "student": []}
    for name in seen:
        getattr(model, name)["backbone"].patch_embed.register_forward_hook(
            lambda module, args, output, name=name: seen[name].append(tuple(args[0].shape)))
    model(dino_crops(batch=2, local=3))
    assert seen["teacher"] == [(4, 3, 32, 32)]  # both global crops, batched together, nothing else
    assert seen["student"] == [(4, 3, 32, 32), (6, 3, 16, 16)]


def test_dino_teacher_is_deterministic_whatever_the_mode_and_seed() -> None:
    model = tiny_dino()  # as the trainer leaves it: never switched with train() / eval()
    crops = dino_crops()
    outputs = []
    for seed, mode in ((0, None), (1, None), (2, True), (3, False)):
        if mode is not None:
            model.train(mode)
        torch.manual_seed(seed)
        student, teacher = model.forward_heads(crops)
        outputs.append((student, teacher))
    for _, teacher in outputs[1:]:
        assert torch.equal(teacher, outputs[0][1])
    assert not torch.equal(outputs[0][0], outputs[1][0])  # the student does drop paths (0.1)


def test_dino_clips_each_gradient_and_freezes_the_last_layer_in_epoch_one() -> None:
    from accelerate import Accelerator

    model = tiny_dino(freeze_last_layer=1)
    params = [p for p in model.student.parameters() if p.requires_grad]
    for index, param in enumerate(params):
        param.grad = torch.full_like(param, 1.0 if index % 2 else 1e-4)
    norms = [p.grad.norm().item() for p in params]
    model.clip_gradients(3.0, Accelerator(cpu=True))
    for param, before in zip(params, norms):
        expected = min(before, 3.0 / (1 + 1e-6 / before)) if before > 3.0 else before
        assert param.grad.norm().item() == pytest.approx(expected, rel=1e-5)
    model.set_progress(3, 100, steps_per_epoch=4)  # epoch 0: last layer frozen
    model.before_optimizer_step()
    assert all(p.grad is None for p in model.student["head"].last_layer.parameters())
    model.set_progress(4, 100, steps_per_epoch=4)  # epoch 1: free
    for param in model.student["head"].last_layer.parameters():
        param.grad = torch.ones_like(param)
    model.before_optimizer_step()
    assert all(p.grad is not None for p in model.student["head"].last_layer.parameters() if p.requires_grad)


def test_dino_local_crop_positions_and_schedules_follow_the_official_code() -> None:
    from cpia_hf.train.dino import backbone_features

    model = tiny_dino(teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=3).eval()
    backbone = model.student["backbone"]
    local = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(backbone_features(backbone, local), official_vit_cls(backbone, local),
                                   atol=1e-6, rtol=0)
        # timm's own (antialiased, exact-size) resample is a different table
        assert (backbone(local) - official_vit_cls(backbone, local)).abs().max() > 1e-4
    expected = np.linspace(0.04, 0.07, 3)  # main_dino.py teacher_temp_schedule, one value per epoch
    for step in range(0, 20):
        model.set_progress(step, 100, steps_per_epoch=4)
        want = expected[step // 4] if step // 4 < 3 else 0.07
        assert model.current_teacher_temp == pytest.approx(want, abs=1e-12)
    # random init: class token drawn with std 0.02 (timm's own is 1e-6)
    from cpia_hf.train.dino import DINO

    torch.manual_seed(0)
    fresh = DINO("vit_tiny_patch16_224", img_size=32, model_kwargs={"patch_size": 8, "depth": 1},
                 out_dim=16, hidden_dim=16, bottleneck_dim=8)
    assert 0.015 < fresh.student["backbone"].cls_token.std().item() < 0.025


def plain_info_nce(queries: torch.Tensor, keys: torch.Tensor, temperature: float, first_row: int) -> torch.Tensor:
    """MoCo-v3 (Chen et al. 2021, eq. 1 and alg. 1): for query i, with q and k L2-normalised,
    L_i = -log( exp(q_i . k_{first_row + i} / T) / sum_j exp(q_i . k_j / T) ), averaged, times 2T."""
    q = queries / queries.norm(dim=1, keepdim=True)
    k = keys / keys.norm(dim=1, keepdim=True)
    losses = []
    for i in range(q.shape[0]):
        logits = [torch.dot(q[i], k[j]) / temperature for j in range(k.shape[0])]
        positive = logits[first_row + i]
        losses.append(-(positive - torch.logsumexp(torch.stack(logits), dim=0)))
    return torch.stack(losses).mean() * 2 * temperature


def tiny_moco():
    from cpia_hf.train.mocov3 import MoCoV3

    torch.manual_seed(0)
    model = MoCoV3("vit_tiny_patch16_224", img_size=32, model_kwargs=TINY_KWARGS, mlp_dim=32, out_dim=16)
    perturb(model.momentum_encoder, seed=1)
    perturb(model.momentum_projector, seed=2)
    return model


def test_mocov3_loss_equals_the_published_equation() -> None:
    model = tiny_moco()
    generator = torch.Generator().manual_seed(7)
    views = [torch.randn(6, 3, 32, 32, generator=generator) for _ in range(2)]
    with torch.no_grad():
        ours = model(views).item()
        q1, q2 = (model.predictor(model.projector(model.encoder(v))) for v in views)
        k1, k2 = (model.momentum_projector(model.momentum_encoder(v)) for v in views)
    expected = plain_info_nce(q1, k2, 0.2, 0) + plain_info_nce(q2, k1, 0.2, 0)
    assert abs(ours - expected.item()) <= 1e-5, (ours, expected.item())


def test_mocov3_positives_sit_at_the_process_offset() -> None:
    from cpia_hf.train.mocov3 import contrastive_labels, info_nce

    # Two processes of 4 queries each; the keys of both are gathered in rank order.
    generator = torch.Generator().manual_seed(8)
    queries, keys = torch.randn(8, 16, generator=generator), torch.randn(8, 16, generator=generator)
    normalised_keys = torch.nn.functional.normalize(keys, dim=1)
    assert contrastive_labels(4, 1).tolist() == [4, 5, 6, 7]
    for rank in (0, 1):
        local = queries[4 * rank: 4 * rank + 4]
        ours = info_nce(local, normalised_keys, 0.2, process_index=rank)
        assert abs(ours.item() - plain_info_nce(local, keys, 0.2, first_row=4 * rank).item()) <= 1e-5
    wrong = plain_info_nce(queries[4:], keys, 0.2, first_row=0)
    assert abs(info_nce(queries[4:], normalised_keys, 0.2, process_index=1).item() - wrong.item()) > 1e-3


def test_mocov3_vit_small_has_the_official_twelve_heads() -> None:
    from cpia_hf.train.mocov3 import MoCoV3

    model = MoCoV3("vit_small_patch16_224", img_size=224, mlp_dim=32, out_dim=16)
    encoder = model.encoder
    assert (encoder.embed_dim, len(encoder.blocks), encoder.patch_embed.patch_size) == (384, 12, (16, 16))
    assert {block.attn.num_heads for block in encoder.blocks} == {12}
    assert model.backbone_spec["kwargs"]["num_heads"] == 12  # saved with the encoder, so export rebuilds it
    from cpia_hf.model.export import architecture_fields

    fields = architecture_fields(encoder)  # what the model card states
    assert (fields["num_heads"], fields["depth"], fields["model_overrides"]) == (12, 12, {"num_heads": 12})


RECIPES = sorted((REPO / "recipes").glob("*_vit_*.yaml"))


def test_recipes_cover_the_model_family() -> None:
    names = {path.stem for path in RECIPES}
    assert names == {f"{method}_vit_{size}16" for method in ("mae", "mocov3", "dino") for size in "sb"}
    assert (REPO / "recipes" / "accelerate_2gpu.yaml").is_file()


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.stem)
def test_each_recipe_parses_into_a_train_config(recipe: Path) -> None:
    import yaml

    cfg = cli.build_config(parse(["--recipe", str(recipe), "--data", "someone/CPIA"]))
    method, size = recipe.stem.split("_vit_")
    per_gpu = {"mae": 1024, "mocov3": 512, "dino": 256}[method]  # CPIA paper, Table II (2 GPUs)
    assert cfg.method == method and cfg.batch_size == per_gpu and cfg.augment.img_size == 224
    assert cfg.model == {"s16": "vit_small_patch16_224", "b16": "vit_base_patch16_224"}[size]
    assert cfg.config == "mini" and cfg.data == "someone/CPIA" and cfg.mixed_precision == "bf16"
    values = yaml.safe_load(recipe.read_text())
    assert cfg.epochs == values["epochs"] and cfg.base_lr == values["base_lr"]
    assert cfg.method_options == values["method_options"] and cfg.betas == tuple(values["betas"])
    assert cfg.augment.crop_scale == tuple(values["augment"]["crop_scale"])
    import inspect

    assert set(cfg.method_options) <= set(inspect.signature(METHODS[method]).parameters)
    # flags override the recipe
    small = cli.build_config(parse(["--recipe", str(recipe), "--data", "x", "--batch-size", "8", "--epochs", "2",
                                    "--out", "elsewhere", "--img-size", "64"]))
    assert (small.batch_size, small.epochs, small.out, small.augment.img_size) == (8, 2, "elsewhere", 64)


def test_recipe_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: mae\nbatchsize: 8\n")
    with pytest.raises(ValueError, match="bad.yaml: unknown recipe key.*batchsize"):
        cli.build_config(parse(["--recipe", str(bad), "--data", "x", "--out", "y"]))
    bad.write_text("method: mae\nmethod_options: {temperature: 0.2}\n")
    with pytest.raises(ValueError, match="mae: unknown method option.*temperature"):
        cli.build_config(parse(["--recipe", str(bad), "--data", "x", "--out", "y"]))
    bad.write_text("method: mae\nepochs: 400\nbase_lr: 1.5e-4\nepochs: 4\n")  # plain YAML would take 4 silently
    with pytest.raises(ValueError, match="bad.yaml: line 4: duplicate key 'epochs' \\(first given at line 2\\)"):
        cli.build_config(parse(["--recipe", str(bad), "--data", "x", "--out", "y"]))


def test_train_runs_from_a_recipe(dataset_dir: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        f"method: mae\nconfig: mini\nout: {tmp_path / 'run'}\nmodel: vit_tiny_patch16_224\n"
        f"model_kwargs: {TINY_VIT}\nbatch_size: 8\nnum_workers: 0\nwarmup_steps: 1\nlr: 1.0e-3\n"
        f"cache_dir: {tmp_path / 'hf_cache'}\naugment: {{img_size: 32}}\n"
        "method_options: {decoder_dim: 32, decoder_depth: 1, decoder_heads: 2}\n")
    assert cli.main(["--recipe", str(recipe), "--data", str(dataset_dir), "--max-steps", "2", "--no-export"]) == 0
    config = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert config["method_options"]["decoder_dim"] == 32 and config["max_steps"] == 2
    assert sorted(read_log(tmp_path / "run")) == [2]  # log_every 10: the last step only


# Schedules against the published formulations

def official_moco_momentum(step: int, total: int, base: float) -> float:
    """main_moco.py `adjust_moco_momentum` at epoch k / iterations per epoch (epochs = total / per epoch)."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * step / total)) * (1.0 - base)


def test_mocov3_momentum_encoder_moves_with_this_steps_momentum_before_the_keys() -> None:
    from cpia_hf.train.mocov3 import MoCoV3

    torch.manual_seed(0)
    model = MoCoV3("vit_tiny_patch16_224", img_size=32, model_kwargs=TINY_KWARGS, mlp_dim=32, out_dim=16,
                   momentum=0.6)
    perturb(model.momentum_encoder, seed=1)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    generator = torch.Generator().manual_seed(9)
    expected = {name: value.detach().clone().double() for name, value in model.momentum_encoder.named_parameters()}
    total = 4
    for step in range(total):
        views = [torch.randn(4, 3, 32, 32, generator=generator) for _ in range(2)]
        online = {name: value.detach().clone().double() for name, value in model.encoder.named_parameters()}
        # builder.py: before the keys of step k, key <- m(k) key + (1 - m(k)) base, with the base encoder as it
        # stands at the start of step k (before that step's optimizer update)
        m = official_moco_momentum(step, total, 0.6)
        expected = {name: m * expected[name] + (1 - m) * online[name] for name in expected}
        model.set_progress(step, total, total)
        loss = model(views)
        keys_seen = {name: value.detach().clone().double() for name, value in model.momentum_encoder.named_parameters()}
        optimizer.zero_grad()
        loss.backward()
        model.before_optimizer_step()
        optimizer.step()
        model.after_optimizer_step()
        for name, value in keys_seen.items():  # the keys of step k came from the encoder updated with m(k)
            torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=1e-6)
    moved = max((online[n] - expected[n]).abs().max().item() for n in expected)
    assert moved > 1e-3  # the two encoders differ, so an update with the wrong step or weights shows


def official_cosine_scheduler(base: float, final: float, total: int, warmup: int) -> np.ndarray:
    """facebookresearch/dino utils.cosine_scheduler per step: np.linspace warm-up from 0, then a half-cosine."""
    warm = np.linspace(0, base, warmup) if warmup > 0 else np.array([])
    iters = np.arange(total - warmup)
    return np.concatenate((warm, final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_lr_schedule_follows_each_methods_published_warm_up(method: str) -> None:
    from cpia_hf.train.trainer import make_schedule

    cfg = cli.build_config(parse(["--method", method, "--data", "x", "--out", "y", "--warmup-epochs", "3",
                                  "--epochs", "10", "--min-lr", "1e-6"]))
    schedule = make_schedule(cfg, steps_per_epoch=7, global_batch=64, lr=1e-3, warmup=METHODS[method].lr_warmup)
    ours = np.array([schedule.lr_at(step) for step in range(70)])
    if method == "dino":
        expected = official_cosine_scheduler(1e-3, 1e-6, 70, 21)
        assert ours.argmax() == 20  # peak on the last warm-up step
    else:  # MAE util/lr_sched.py and MoCo v3 adjust_learning_rate: lr * epoch / warmup_epochs, epoch = k / 7
        epoch = np.arange(70) / 7
        expected = np.where(epoch < 3, 1e-3 * epoch / 3,
                            1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + np.cos(np.pi * (epoch - 3) / (10 - 3))))
        assert ours.argmax() == 21
    np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-15)


# One declaration per setting

def test_each_setting_is_declared_once_and_its_default_is_live() -> None:
    from dataclasses import MISSING, fields

    from cpia_hf.train.config import METHOD_DEFAULTS, TrainConfig

    names = {item.name: item for item in fields(TrainConfig)}
    augment_names = {item.name for item in fields(AugmentConfig)}
    for method, values in METHOD_DEFAULTS.items():
        assert set(values) - {"augment"} <= set(names) and set(values["augment"]) <= augment_names
        assert METHODS[method].name == method
    required = {name for name, item in names.items()
                if item.default is MISSING and item.default_factory is MISSING}
    per_method = required - {"method", "data", "out", "augment"}
    assert per_method and all(per_method <= set(values) for values in METHOD_DEFAULTS.values())
    # a field default that every method replaces would be dead from the command line
    for name, item in names.items():
        if name not in required:
            assert not all(name in values for values in METHOD_DEFAULTS.values()), name
    cfg = cli.build_config(parse(["--method", "mae", "--data", "x", "--out", "y"]))
    assert (cfg.num_workers, cfg.save_every, cfg.drop_path, cfg.clip_grad) == (4, 1000, 0.0, None)
    assert (cfg.batch_size, cfg.betas, cfg.augment.crop_scale) == (256, (0.9, 0.95), (0.2, 1.0))
    dino = cli.build_config(parse(["--method", "dino", "--data", "x", "--out", "y"]))
    assert (dino.drop_path, dino.clip_grad, dino.weight_decay_end) == (0.1, 3.0, 0.4)
    assert METHODS["mae"].allows_grad_accum and not METHODS["dino"].allows_grad_accum


def help_lines(command: str) -> tuple[dict[str, str], argparse.ArgumentParser]:
    """Option -> its help text, and the parser of `cpia <command>`."""
    from cpia_hf.cli import build_parser

    parser = build_parser(command)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    helps = {flag: action.help or "" for action in sub._actions if action.help != argparse.SUPPRESS
             for flag in action.option_strings}
    return helps, sub


@pytest.mark.parametrize("command", ["train", "eval", "export"])
def test_help_shows_every_default(command: str) -> None:
    helps, parser = help_lines(command)
    text = " ".join(parser.format_help().split())
    one_of = {a.dest for group in parser._mutually_exclusive_groups if group.required for a in group._group_actions}
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or "-h" in action.option_strings:
            continue
        assert action.help, action.option_strings
        needed = action.required or action.dest in one_of | {"method", "data", "out", "recipe"}
        if action.nargs != 0 and not needed:
            assert "default" in action.help, action.option_strings
        assert " ".join(action.help.split()) in text
    expected = {"train": ("--seed", "--no-progress"), "eval": ("--seed",), "export": ("--no-progress",)}[command]
    assert all(helps[flag] for flag in expected)


def test_endpoint_flag_has_one_name_and_the_old_one_still_works() -> None:
    helps, parser = help_lines("train")
    assert "--endpoint" in helps and "--hub-endpoint" not in parser.format_help()
    for flag in ("--endpoint", "--hub-endpoint"):
        cfg = cli.build_config(parse(["--method", "mae", "--data", "x", "--out", "y", flag, "http://hub.local"]))
        assert cfg.hub_endpoint == "http://hub.local"


def test_set_up_leaves_the_config_alone(dataset_dir: Path, tmp_path: Path) -> None:
    import copy

    from cpia_hf.train.trainer import set_up

    cfg = cli.build_config(parse(train_args("mae", dataset_dir, tmp_path / "out", "--max-steps", "1")))
    before = copy.deepcopy(cfg)
    run = set_up(cfg, METHODS["mae"])
    assert cfg == before and cfg.mixed_precision is None
    assert run.cfg.mixed_precision == "no" and run.cfg is not cfg
    run.accelerator.end_training()
    dino = cli.build_config(parse(train_args("dino", dataset_dir, tmp_path / "dino", "--grad-accum", "2")))
    with pytest.raises(ValueError, match="gradient accumulation"):
        set_up(dino, METHODS["dino"])


def test_worker_count_is_capped_at_the_cpus_and_said_once(dataset_dir: Path, tmp_path: Path, capsys) -> None:
    import warnings

    from cpia_hf.model import workers

    rows = load_pretrain_rows(str(dataset_dir), "mini", cache_dir=str(tmp_path / "cache"))
    cpus = workers.available_cpus()
    assert cpus == len(os.sched_getaffinity(0))
    workers._capped_once.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaders = [build_loader(rows, MAEView(AugmentConfig(img_size=32, crop_scale=(0.2, 1.0))), batch_size=8,
                                num_workers=cpus + 14, seed=0) for _ in range(2)]
        next(iter(loaders[0]))
    assert [loader.num_workers for loader in loaders] == [cpus, cpus]
    assert not [w for w in caught if "worker processes" in str(w.message)]  # torch's "will create N workers"
    err = capsys.readouterr().err
    assert err.count(f"num_workers {cpus + 14} is more than the {cpus} CPUs") == 1
    assert build_loader(rows, MAEView(AugmentConfig(img_size=32, crop_scale=(0.2, 1.0))), batch_size=8,
                        num_workers=0, seed=0).num_workers == 0


def children_of(pid: int) -> list[int]:
    import psutil

    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_dataloader_workers_die_with_a_killed_train(sig: str, dataset_dir: Path, tmp_path: Path) -> None:
    import signal
    import time

    command = [sys.executable, "-m", "cpia_hf.train", *train_args("mae", dataset_dir, tmp_path / "out"),
               "--num-workers", "2", "--max-steps", "100000", "--no-export", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while len(children_of(process.pid)) < 2 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        workers = children_of(process.pid)
        assert len(workers) >= 2, process.stderr.read().decode()[-2000:] if process.poll() is not None else workers
        while not (tmp_path / "out" / "train_log.jsonl").is_file() and time.monotonic() < deadline:
            time.sleep(0.2)  # the workers are busy loading batches
        os.kill(process.pid, getattr(signal, sig))
        process.wait(timeout=30)
        killed = time.monotonic()
        while any(alive(pid) for pid in workers) and time.monotonic() < killed + 5:
            time.sleep(0.05)
        # torch's own worker loop notices a dead parent at its next poll, up to 5 s later; the kernel's
        # parent-death signal ends them at once (the bound leaves room for a loaded machine)
        assert [pid for pid in workers if alive(pid)] == [] and time.monotonic() - killed < 2.5
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
