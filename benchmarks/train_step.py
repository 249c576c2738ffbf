"""Images/s of one pre-training step (forward, backward, AdamW update, EMA) for MAE, DINO and MoCo-v3,
and of transformers' ViTMAEForPreTraining at the same size, batch and mask ratio as the MAE reference;
optionally compiled (`--compile`), and beside the data pipeline's images/s (`--data-pipeline`).

    python benchmarks/train_step.py                       # ViT-S/16, 224 px, batch 8 on CPU / 64 on GPU
    python benchmarks/train_step.py --batch-size 16 --steps 5
    # on a GPU: bf16 (default there), eager and torch.compile, ViT-S/16 and ViT-B/16, and the loader
    python benchmarks/train_step.py --model vit_small_patch16_224 --compile both --data-pipeline --num-workers 16 \
        --json out/train_step_vit_s16.json

Steps of ours and of the reference alternate, so that load from other programs hits both alike;
figures are the median and the best (least disturbed) of the timed steps. Subnormal floats are flushed to zero (see main).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

# ViTMAEForPreTraining's initialisation yields subnormal floats on CPU, which slow its matmuls and
# norms several-fold; flushing them to zero gives the reference its best case (ours is unaffected).
# Set before any other import starts the CPU thread pool: worker threads inherit the flag at creation.
torch.set_flush_denormal(True)

from transformers import ViTMAEConfig, ViTMAEForPreTraining  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpia_hf.model.workers import available_cpus  # noqa: E402
from cpia_hf.train import METHODS  # noqa: E402
from cpia_hf.train.cli import build_config, configure_train  # noqa: E402
from cpia_hf.train.trainer import build_optimizer  # noqa: E402

REFERENCE = "transformers ViTMAEForPreTraining"


def method_step(method: str, args: argparse.Namespace, device: torch.device) -> tuple[Callable[[], None], int]:
    """A closure running one training step of `method` on a fixed random batch, and its image count."""
    cfg = build_config(configure_and_parse(method, args))
    model = METHODS[method].from_config(cfg).to(device).train()
    optimizer = build_optimizer(model, 1e-4, cfg.weight_decay, cfg.betas, device)  # as the trainer builds it
    batch_size, size = args.batch_size, args.img_size
    images = torch.randn(batch_size, 3, size, size, device=device)
    if method == "mae":
        batch = images
    elif method == "mocov3":
        batch = [images, torch.randn_like(images)]
    else:
        local = torch.randn(batch_size, 3, args.local_size, args.local_size, device=device)
        batch = [images, torch.randn_like(images)] + [torch.randn_like(local) for _ in range(args.local_crops)]
    model.set_progress(0, 100, 100)

    forward = torch.compile(model) if args.compiled else model

    def step() -> None:
        with autocast(device, args.bf16):
            loss = forward(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        model.before_optimizer_step()
        optimizer.step()
        model.after_optimizer_step()

    return step, batch_size


def reference_mae_step(args: argparse.Namespace, device: torch.device) -> tuple[Callable[[], None], int]:
    """The same step for ViTMAEForPreTraining configured as our MAE (ViT-S/16 encoder, 8x512 decoder)."""
    encoder = {"vit_small_patch16_224": (384, 6), "vit_base_patch16_224": (768, 12)}
    if args.model not in encoder:
        raise SystemExit(f"reference MAE is configured for {sorted(encoder)}, not {args.model}")
    width, heads = encoder[args.model]
    config = ViTMAEConfig(
        hidden_size=width, num_hidden_layers=12, num_attention_heads=heads, intermediate_size=4 * width,
        image_size=args.img_size, patch_size=16, layer_norm_eps=1e-6, decoder_hidden_size=512,
        decoder_num_hidden_layers=8, decoder_num_attention_heads=16, decoder_intermediate_size=2048,
        mask_ratio=0.75, norm_pix_loss=True, attn_implementation="sdpa")
    model = ViTMAEForPreTraining(config).to(device).train()
    forward = torch.compile(model) if args.compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type in ("cuda", "cpu"))  # Trainer default
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)

    def step() -> None:
        with autocast(device, args.bf16):
            loss = forward(pixel_values=images).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, args.batch_size


def data_pipeline_rate(method: str, args: argparse.Namespace) -> float:
    """Images/s of the training DataLoader (JPEG decode + the method's views, `--num-workers` workers)
    over synthetic 384-px tissue-like tiles, as the mini config stores them."""
    import numpy as np
    from datasets import Dataset, Features, Image

    from cpia_hf.dataset.imageio import encode_jpeg
    from cpia_hf.train.data import build_loader

    rng = np.random.default_rng(0)
    count = args.batch_size * (args.pipeline_batches + 1)
    tiles = [{"bytes": encode_jpeg(rng.integers(60, 230, (384, 384, 3), dtype=np.uint8)), "path": None}
             for _ in range(min(count, 256))]
    rows = Dataset.from_dict({"image": [tiles[i % len(tiles)] for i in range(count)],
                              "image_id": [f"tile-{i}" for i in range(count)]},
                             features=Features({"image": Image(), "image_id": datasets_value("string")}))
    cfg = build_config(configure_and_parse(method, args))
    transform = METHODS[method].make_transform(cfg.augment)
    loader = build_loader(rows, transform, batch_size=args.batch_size, num_workers=args.num_workers, seed=0)
    batches = iter(loader)
    next(batches)  # workers started, first batch made
    start = time.perf_counter()
    for _ in range(args.pipeline_batches):
        next(batches)
    return args.pipeline_batches * args.batch_size / (time.perf_counter() - start)


def datasets_value(dtype: str):
    from datasets import Value

    return Value(dtype)


def configure_and_parse(method: str, args: argparse.Namespace) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    configure_train(parser)
    return parser.parse_args([
        "--method", method, "--data", "unused", "--out", "unused", "--model", args.model,
        "--img-size", str(args.img_size), "--local-crops", str(args.local_crops)])


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def timed(step: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(args: argparse.Namespace, device: torch.device) -> dict[str, dict[str, float]]:
    """Median and best images/s of every method (and the reference MAE) under the current settings."""
    runs = {name: method_step(name, args, device) for name in args.methods}
    if "mae" in runs:
        runs[REFERENCE] = reference_mae_step(args, device)
    for _ in range(args.warmup):
        for step, _ in runs.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(max(args.steps, args.mae_steps)):
        for name, (step, _) in runs.items():
            wanted = args.mae_steps if name in ("mae", REFERENCE) else args.steps
            if round_index < wanted:
                times[name].append(timed(step, device))
    return {name: {"median": runs[name][1] / statistics.median(values), "best": runs[name][1] / min(values)}
            for name, values in times.items()}


def report(rates: dict[str, dict[str, float]], args: argparse.Namespace, label: str) -> None:
    print(f"{label:34s} {'median':>8s} {'best':>8s}  images/s")
    for name, rate in rates.items():
        extra = f" (2 x {args.img_size} + {args.local_crops} x {args.local_size} crops)" if name == "dino" else ""
        extra = " (2 views)" if name == "mocov3" else extra
        print(f"{name:34s} {rate['median']:8.2f} {rate['best']:8.2f}{extra}")
    if "mae" in rates:
        ratio = rates["mae"]["median"] / rates[REFERENCE]["median"]
        best_ratio = rates["mae"]["best"] / rates[REFERENCE]["best"]
        verdict = "goal met" if min(ratio, best_ratio) >= 1.0 else "below goal 1.0"
        print(f"MAE ours / ViTMAEForPreTraining: {ratio:.2f}x (median), {best_ratio:.2f}x (best step): {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, help="default: 8 on CPU, 64 on GPU")
    parser.add_argument("--local-crops", type=int, default=8, help="DINO local crops (official: 8)")
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--steps", type=int, default=3, help="timed steps of DINO and MoCo-v3")
    parser.add_argument("--mae-steps", type=int, default=8, help="timed steps of our MAE and the reference")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (compilation happens here)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", nargs="*", default=["mae", "dino", "mocov3"], choices=sorted(METHODS))
    parser.add_argument("--precision", choices=["bf16", "fp32"], help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--compile", choices=["no", "yes", "both"], default="no", help="torch.compile the step's model")
    parser.add_argument("--data-pipeline", action="store_true", help="also time the DataLoader of each method")
    parser.add_argument("--num-workers", type=int, default=4, help="DataLoader workers for --data-pipeline")
    parser.add_argument("--pipeline-batches", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    device = torch.device(args.device)
    args.batch_size = args.batch_size or (64 if device.type == "cuda" else 8)
    args.bf16 = (args.precision or ("bf16" if device.type == "cuda" else "fp32")) == "bf16"
    torch.manual_seed(0)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"device {device} ({where}), "
          f"{args.model} at {args.img_size} px, batch {args.batch_size}, {'bf16' if args.bf16 else 'fp32'}, "
          f"median of {args.mae_steps} (MAE, reference) / {args.steps} (others) steps after {args.warmup} warm-up")
    results: dict = {"device": where, "model": args.model, "img_size": args.img_size, "batch_size": args.batch_size,
                     "precision": "bf16" if args.bf16 else "fp32", "steps": {}}
    for compiled in {"no": [False], "yes": [True], "both": [False, True]}[args.compile]:
        args.compiled = compiled
        label = "torch.compile" if compiled else "eager"
        rates = measure(args, device)
        report(rates, args, label)
        results["steps"][label] = rates
    if args.data_pipeline:
        results["data_pipeline"] = {}
        for method in args.methods:
            rate = data_pipeline_rate(method, args)
            results["data_pipeline"][method] = rate
            workers = min(args.num_workers, available_cpus())  # build_loader caps the workers at the CPUs
            print(f"data pipeline {method:20s} {rate:8.2f} images/s ({workers} workers)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
