"""`cpia train`: pre-train a ViT on CPIA with MAE, DINO or MoCo-v3 (also under `accelerate launch`)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import timm
from accelerate import PartialState

from ..hub import push_folder
from ..model.backbone import load_backbone_from_checkpoint
from ..model.export import export_encoder
from . import METHODS
from .augment import AugmentConfig
from .trainer import TrainConfig, train

HUB_FOLDER = "model"  # the exported, Hub-ready folder inside a run's output folder

# Method options: flag -> (methods it applies to, type, help). Unset flags keep the method's default.
METHOD_OPTIONS = {
    "mask_ratio": (("mae",), float, "fraction of patches hidden from the encoder (0.75)"),
    "norm_pix_loss": (("mae",), int, "1: per-patch normalised pixel targets (default), 0: raw pixels"),
    "decoder_dim": (("mae",), int, "decoder width (512)"),
    "decoder_depth": (("mae",), int, "decoder blocks (8)"),
    "decoder_heads": (("mae",), int, "decoder attention heads (16)"),
    "out_dim": (("dino", "mocov3"), int, "DINO prototypes (65536) / MoCo-v3 embedding size (256)"),
    "hidden_dim": (("dino",), int, "DINO head hidden width (2048)"),
    "bottleneck_dim": (("dino",), int, "DINO head bottleneck (256)"),
    "norm_last_layer": (("dino",), int, "1: freeze the prototypes' weight-norm magnitude (default)"),
    "momentum_teacher": (("dino",), float, "teacher EMA start momentum (0.996, cosine to 1)"),
    "teacher_temp": (("dino",), float, "teacher temperature after warmup (0.04)"),
    "warmup_teacher_temp": (("dino",), float, "teacher temperature at step 0 (0.04)"),
    "warmup_teacher_temp_epochs": (("dino",), float, "teacher temperature warmup epochs (0)"),
    "freeze_last_layer": (("dino",), float, "epochs with the last head layer frozen (1)"),
    "center_momentum": (("dino",), float, "EMA momentum of the teacher centre (0.9)"),
    "mlp_dim": (("mocov3",), int, "projector/predictor hidden width (4096)"),
    "momentum": (("mocov3",), float, "momentum encoder start momentum (0.99, cosine to 1)"),
    "temperature": (("mocov3",), float, "InfoNCE temperature (0.2)"),
    "freeze_patch_embed": (("mocov3",), int, "1: frozen random patch projection (default)"),
}
SWITCHES = ("norm_pix_loss", "norm_last_layer", "freeze_patch_embed")


def _pair(text: str) -> tuple[float, float]:
    low, high = (float(v) for v in text.split(","))
    return low, high


def configure_train(parser: argparse.ArgumentParser) -> None:
    """Add the `cpia train` arguments."""
    parser.add_argument("--method", required=True, choices=sorted(METHODS))
    parser.add_argument("--data", required=True, help="dataset folder or Hub id")
    parser.add_argument("--config", default="mini", help="dataset config (mini, mini_M, L, M, S, full, ...)")
    parser.add_argument("--out", required=True, help="output folder (checkpoints, log, encoder, Hub folders)")
    parser.add_argument("--scales", nargs="*", default=[], help="keep only these scales (XL L M S)")
    parser.add_argument("--organs", nargs="*", default=[], help="keep only these organs")
    parser.add_argument("--streaming", action="store_true", help="stream the config (large configs)")
    parser.add_argument("--cache-dir", help="datasets cache folder")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default="vit_small_patch16_224", help="timm ViT architecture")
    model.add_argument("--model-kwargs", type=json.loads, default={},
                       help='JSON of extra timm kwargs, e.g. \'{"depth": 2, "embed_dim": 64}\'')
    model.add_argument("--img-size", type=int, default=224)
    model.add_argument("--init", help="pretrained timm weights to start from (default: random init)")
    model.add_argument("--model-name", help="name of the published model (default: <arch>.cpia_<method>_<config>)")
    model.add_argument("--drop-path", type=float)

    optim = parser.add_argument_group("optimisation (unset: the method's official recipe)")
    optim.add_argument("--batch-size", type=int, help="images per process per micro-batch")
    optim.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (MAE only)")
    optim.add_argument("--epochs", type=int)
    optim.add_argument("--max-steps", type=int, help="stop (and end the schedules) after this many steps")
    optim.add_argument("--steps-per-epoch", type=int, help="epoch length for streaming data")
    optim.add_argument("--base-lr", type=float, help="LR per 256 images (lr = base_lr * global_batch / 256)")
    optim.add_argument("--lr", type=float, help="absolute peak LR (overrides --base-lr)")
    optim.add_argument("--min-lr", type=float)
    optim.add_argument("--warmup-epochs", type=float)
    optim.add_argument("--warmup-steps", type=int, help="overrides --warmup-epochs")
    optim.add_argument("--weight-decay", type=float)
    optim.add_argument("--weight-decay-end", type=float, help="cosine weight-decay target (DINO: 0.4)")
    optim.add_argument("--clip-grad", type=float, help="max gradient norm (0: off)")
    optim.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"],
                       help="default: bf16 on GPUs that support it, else no")
    optim.add_argument("--seed", type=int, default=0)
    optim.add_argument("--cpu", action="store_true", help="train on CPU even when a GPU is present")

    run = parser.add_argument_group("run")
    run.add_argument("--num-workers", type=int, default=4, help="DataLoader workers per process")
    run.add_argument("--log-every", type=int, default=10)
    run.add_argument("--save-every", type=int, default=1000, help="checkpoint every N steps (and at the end)")
    run.add_argument("--keep-checkpoints", type=int, default=3)
    run.add_argument("--resume", help="checkpoint folder, or 'latest' in --out")
    run.add_argument("--no-export", dest="export", action="store_false",
                     help="write the encoder but not the Hub folders and model card")
    run.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the exported model folder to this repo")
    run.add_argument("--private", action="store_true", help="create the Hub repo private")
    run.add_argument("--hub-endpoint", help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")

    augment = parser.add_argument_group("augmentation")
    augment.add_argument("--crop-scale", type=_pair, help="RandomResizedCrop scale MIN,MAX (method default)")
    augment.add_argument("--local-crops", type=int, default=8, help="DINO local crops")
    augment.add_argument("--local-size", type=int, default=96, help="DINO local crop side")
    augment.add_argument("--local-crop-scale", type=_pair, default=(0.05, 0.4))
    augment.add_argument("--color-jitter", type=float, default=0.2, help="brightness/contrast jitter strength")
    augment.add_argument("--stain-jitter", type=float, default=0.0, help="HED stain jitter sigma (e.g. 0.05)")
    augment.add_argument("--grayscale", type=float, default=0.1, help="grayscale probability")
    augment.add_argument("--no-blur", dest="blur", action="store_false")
    augment.add_argument("--solarize", action="store_true", help="solarize the second view (off by default)")

    options = parser.add_argument_group("method options")
    for name, (methods, kind, text) in METHOD_OPTIONS.items():
        options.add_argument("--" + name.replace("_", "-"), type=kind, help=f"[{'/'.join(methods)}] {text}")


def build_config(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from parsed arguments, unset values taken from the method's recipe."""
    recipe = METHODS[args.method].RECIPE

    def pick(name: str, recipe_key: str | None = None, default=None):
        value = getattr(args, name)
        return value if value is not None else recipe.get(recipe_key or name, default)

    if args.push_to_hub and not args.export:
        raise ValueError("--push-to-hub uploads the exported folder; drop --no-export")
    method_options = {}
    for name, (methods, kind, _) in METHOD_OPTIONS.items():
        value = getattr(args, name)
        if value is None:
            continue
        if args.method not in methods:
            raise ValueError(f"--{name.replace('_', '-')} applies to {'/'.join(methods)}, not {args.method}")
        method_options[name] = bool(value) if name in SWITCHES else value
    augment = AugmentConfig(
        img_size=args.img_size, crop_scale=pick("crop_scale"), local_crop_scale=args.local_crop_scale,
        local_size=args.local_size, local_crops=args.local_crops, color_jitter=args.color_jitter,
        stain_jitter=args.stain_jitter, grayscale=args.grayscale, blur=args.blur, solarize=args.solarize)
    if args.init:  # keep the normalisation the pretrained weights were trained with
        pretrained = timm.models.get_pretrained_cfg(args.init)
        if pretrained is None:
            raise ValueError(f"--init {args.init}: unknown timm pretrained weights")
        augment.mean, augment.std = tuple(pretrained.mean), tuple(pretrained.std)
    return TrainConfig(
        method=args.method, data=args.data, out=args.out, config=args.config, model=args.model,
        model_kwargs=args.model_kwargs, init=args.init, model_name=args.model_name, scales=args.scales,
        organs=args.organs, streaming=args.streaming, cache_dir=args.cache_dir,
        batch_size=pick("batch_size"), grad_accum=args.grad_accum, epochs=pick("epochs"),
        max_steps=args.max_steps, steps_per_epoch=args.steps_per_epoch, base_lr=pick("base_lr"), lr=args.lr,
        min_lr=pick("min_lr"), warmup_epochs=pick("warmup_epochs"), warmup_steps=args.warmup_steps,
        weight_decay=pick("weight_decay"), weight_decay_end=pick("weight_decay_end"), betas=recipe["betas"],
        clip_grad=pick("clip_grad") or None, drop_path=pick("drop_path", default=0.0),
        mixed_precision=args.mixed_precision, cpu=args.cpu, seed=args.seed, num_workers=args.num_workers,
        log_every=args.log_every, save_every=args.save_every, keep_checkpoints=args.keep_checkpoints,
        resume=args.resume, export=args.export, push_to_hub=args.push_to_hub, private=args.private,
        hub_endpoint=args.hub_endpoint, method_options=method_options, augment=augment)


def run_train(args: argparse.Namespace) -> int:
    """Run `cpia train`; returns the exit status."""
    cfg = build_config(args)
    context = train(cfg, METHODS[cfg.method])
    if PartialState().is_main_process:
        print(f"{cfg.method}: {context['steps']} steps, final loss {context['final_loss']:.4f}, output in {cfg.out}")
        if cfg.export:
            publish_run(cfg, context)
    return 0


def publish_run(cfg: TrainConfig, card_context: dict) -> Path:
    """Export the finished run's encoder as the Hub folder `<out>/model` (and push it when asked)."""
    backbone = load_backbone_from_checkpoint(cfg.out)
    model_name = cfg.model_name or (cfg.push_to_hub.split("/")[-1] if cfg.push_to_hub else
                                    f"{backbone.pretrained_cfg['architecture']}.cpia_{cfg.method}_{cfg.config}")
    hub_context = {**card_context, "repo_id": cfg.push_to_hub} if cfg.push_to_hub else card_context
    model_dir = Path(cfg.out) / HUB_FOLDER
    export_encoder(backbone, model_dir, model_name=model_name, card_context=hub_context)
    if cfg.push_to_hub:
        url = push_folder(model_dir, cfg.push_to_hub, repo_type="model", private=cfg.private,
                          commit_message=f"Upload {model_name}", endpoint=cfg.hub_endpoint)
        print(f"pushed to {url}")
    return model_dir


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m cpia_hf.train` and `accelerate launch -m cpia_hf.train`."""
    parser = argparse.ArgumentParser(prog="cpia train", description=__doc__)
    configure_train(parser)
    return run_train(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
