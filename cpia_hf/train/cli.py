"""`cpia train`: pre-train a ViT on CPIA with MAE, DINO or MoCo-v3 (also under `accelerate launch`)."""
from __future__ import annotations

import argparse
import inspect
import json
import sys
from dataclasses import MISSING, fields, replace
from pathlib import Path

import timm
import yaml
from accelerate import PartialState

from ..dataset.card import pretraining_record
from ..hub import push_folder, require_push_access
from ..model.backbone import load_backbone_from_checkpoint
from ..model.card import ModelCardContext
from ..model.export import export_encoder
from . import METHODS
from .augment import AugmentConfig
from .config import TrainConfig
from .trainer import train

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
    "warmup_teacher_temp_epochs": (("dino",), int, "teacher temperature warmup epochs, per epoch (0)"),
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
    """Add the `cpia train` arguments. Unset flags take the `--recipe` value, else the method's
    official recipe, else the TrainConfig / AugmentConfig default (shown in brackets)."""
    parser.add_argument("--recipe", type=Path, help="YAML of TrainConfig values (recipes/*.yaml); flags override it")
    parser.add_argument("--method", choices=sorted(METHODS), help="required here or in the recipe")
    parser.add_argument("--data", help="dataset folder or Hub id (required here or in the recipe)")
    parser.add_argument("--dataset-id", help="Hub id of the data for the model card (default: --data when it is one)")
    parser.add_argument("--config", help="dataset config (mini, mini_clean, XL, L, M, S, full, full_clean) [mini]")
    parser.add_argument("--out", help="output folder: checkpoints, log, encoder, Hub folders (required here or in the recipe)")
    parser.add_argument("--scales", nargs="*", help="keep only these scales (XL L M S)")
    parser.add_argument("--organs", nargs="*", help="keep only these organs")
    parser.add_argument("--streaming", action="store_const", const=True, help="stream the config (large configs)")
    parser.add_argument("--cache-dir", help="datasets cache folder")

    model = parser.add_argument_group("model")
    model.add_argument("--model", help="timm ViT architecture [vit_small_patch16_224]")
    model.add_argument("--model-kwargs", type=json.loads,
                       help='JSON of extra timm kwargs, e.g. \'{"depth": 2, "embed_dim": 64}\'')
    model.add_argument("--img-size", type=int, help="input side [224]")
    model.add_argument("--init", help="pretrained timm weights to start from (default: random init)")
    model.add_argument("--model-name", help="name of the published model (default: <arch>.cpia_<method>_<config>)")
    model.add_argument("--drop-path", type=float)

    optim = parser.add_argument_group("optimisation (unset: the recipe, else the method's official recipe)")
    optim.add_argument("--batch-size", type=int, help="images per process per micro-batch")
    optim.add_argument("--grad-accum", type=int, help="micro-batches per step (MAE only) [1]")
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
    optim.add_argument("--clip-grad", type=float, help="gradient clipping threshold (0: off; DINO: per parameter)")
    optim.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"],
                       help="default: bf16 on GPUs that support it, else no")
    optim.add_argument("--seed", type=int, help="[0]")
    optim.add_argument("--cpu", action="store_const", const=True, help="train on CPU even when a GPU is present")

    run = parser.add_argument_group("run")
    run.add_argument("--num-workers", type=int, help="DataLoader workers per process [4]")
    run.add_argument("--log-every", type=int, help="[10]")
    run.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no progress bar")
    run.add_argument("--save-every", type=int, help="checkpoint every N steps (and at the end) [1000]")
    run.add_argument("--keep-checkpoints", type=int, help="[3]")
    run.add_argument("--resume", help="checkpoint folder, or 'latest' in --out")
    run.add_argument("--no-export", dest="export", action="store_const", const=False,
                     help="write the encoder but not the Hub folders and model card")
    run.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the exported model folder to this repo")
    run.add_argument("--private", action="store_const", const=True, help="create the Hub repo private")
    run.add_argument("--hub-endpoint", help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")

    augment = parser.add_argument_group("augmentation")
    augment.add_argument("--crop-scale", type=_pair, help="RandomResizedCrop scale MIN,MAX (method default)")
    augment.add_argument("--local-crops", type=int, help="DINO local crops [8]")
    augment.add_argument("--local-size", type=int, help="DINO local crop side [96]")
    augment.add_argument("--local-crop-scale", type=_pair, help="[0.05,0.4]")
    augment.add_argument("--color-jitter", type=float, help="brightness/contrast jitter strength [0.2]")
    augment.add_argument("--stain-jitter", type=float, help="HED stain jitter sigma, e.g. 0.05 [0]")
    augment.add_argument("--grayscale", type=float, help="grayscale probability [0.1]")
    augment.add_argument("--no-blur", dest="blur", action="store_const", const=False)
    augment.add_argument("--solarize", action="store_const", const=True, help="solarize the second view (off by default)")

    options = parser.add_argument_group("method options")
    for name, (methods, kind, text) in METHOD_OPTIONS.items():
        options.add_argument("--" + name.replace("_", "-"), type=kind, help=f"[{'/'.join(methods)}] {text}")


AUGMENT_FLAGS = ("img_size", "crop_scale", "local_crop_scale", "local_size", "local_crops", "color_jitter",
                 "stain_jitter", "grayscale", "blur", "solarize")
RUN_FLAGS = ("data", "dataset_id", "out", "config", "model", "model_kwargs", "init", "model_name", "scales",
             "organs", "streaming", "cache_dir", "batch_size", "grad_accum", "epochs", "max_steps",
             "steps_per_epoch", "base_lr", "lr", "min_lr", "warmup_epochs", "warmup_steps", "weight_decay",
             "weight_decay_end", "clip_grad", "drop_path", "mixed_precision", "cpu", "seed", "num_workers",
             "log_every", "progress", "save_every", "keep_checkpoints", "resume", "export", "push_to_hub", "private",
             "hub_endpoint")


def load_recipe(path: Path) -> dict:
    """A recipe file: TrainConfig fields, with `augment` and `method_options` as mappings."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: recipe file not found")
    recipe = yaml.safe_load(path.read_text()) or {}
    if not isinstance(recipe, dict):
        raise ValueError(f"{path}: a recipe is a mapping of TrainConfig fields")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(recipe) - known)
    if unknown:
        raise ValueError(f"{path}: unknown recipe key(s) {unknown}; known: {sorted(known)}")
    unknown = sorted(set(recipe.get("augment") or {}) - {f.name for f in fields(AugmentConfig)})
    if unknown:
        raise ValueError(f"{path}: unknown augment key(s) {unknown}")
    return recipe


def build_config(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from parsed arguments; unset values from the recipe file, then the method's recipe."""
    recipe = load_recipe(args.recipe) if getattr(args, "recipe", None) else {}
    method = args.method or recipe.get("method")
    if method not in METHODS:
        raise ValueError(f"--method is required (here or in the recipe), one of {sorted(METHODS)}; got {method!r}")
    official = METHODS[method].RECIPE
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
    augment_recipe = recipe.get("augment") or {}
    augment_defaults = AugmentConfig()

    def pick(name: str):
        value = getattr(args, name)
        if value is not None:
            return value
        for source in (recipe, official):
            if source.get(name) is not None:
                return source[name]
        return defaults.get(name)

    def pick_augment(name: str):
        value = getattr(args, name)
        if value is not None:
            return value
        if augment_recipe.get(name) is not None:
            return augment_recipe[name]
        return official.get(name, getattr(augment_defaults, name))

    values = {name: pick(name) for name in RUN_FLAGS}
    for required in ("data", "out"):
        if not values[required]:
            raise ValueError(f"--{required} is required (here or in the recipe)")
    if values["push_to_hub"] and not values["export"]:
        raise ValueError("--push-to-hub uploads the exported folder; drop --no-export")
    augment = AugmentConfig(**{name: pick_augment(name) for name in AUGMENT_FLAGS})
    augment.crop_scale, augment.local_crop_scale = tuple(augment.crop_scale), tuple(augment.local_crop_scale)
    if values["init"]:  # keep the normalisation the pretrained weights were trained with
        pretrained = timm.models.get_pretrained_cfg(values["init"])
        if pretrained is None:
            raise ValueError(f"--init {values['init']}: unknown timm pretrained weights")
        augment.mean, augment.std = tuple(pretrained.mean), tuple(pretrained.std)
    values["clip_grad"] = values["clip_grad"] or None
    values["drop_path"] = values["drop_path"] or 0.0
    values["model_kwargs"] = dict(values["model_kwargs"] or {})
    values["scales"], values["organs"] = list(values["scales"] or []), list(values["organs"] or [])
    return TrainConfig(method=method, betas=tuple(recipe.get("betas") or official["betas"]),
                       method_options=method_options(args, method, recipe.get("method_options") or {}),
                       augment=augment, **values)


def method_options(args: argparse.Namespace, method: str, from_recipe: dict) -> dict:
    """Keyword arguments of the method class: the recipe's, overridden by flags; each checked against it."""
    options = dict(from_recipe)
    for name, (methods, _, _) in METHOD_OPTIONS.items():
        value = getattr(args, name)
        if value is None:
            continue
        if method not in methods:
            raise ValueError(f"--{name.replace('_', '-')} applies to {'/'.join(methods)}, not {method}")
        options[name] = bool(value) if name in SWITCHES else value
    accepted = inspect.signature(METHODS[method]).parameters
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"{method}: unknown method option(s) {unknown}")
    return options


def run_train(args: argparse.Namespace) -> int:
    """Run `cpia train`; returns the exit status."""
    cfg = build_config(args)
    require_push_access(cfg.push_to_hub, "model", endpoint=cfg.hub_endpoint, private=cfg.private,
                        command="cpia train")
    context = train(cfg, METHODS[cfg.method])
    if PartialState().is_main_process:
        print(f"{cfg.method}: {context.steps} steps, final loss {context.final_loss:.4f}, output in {cfg.out}")
        if cfg.export:
            publish_run(cfg, context)
    return 0


def publish_run(cfg: TrainConfig, card_context: ModelCardContext) -> Path:
    """Export the finished run's encoder as the Hub folder `<out>/model` (and push it when asked)."""
    backbone = load_backbone_from_checkpoint(cfg.out)
    model_name = cfg.model_name or (cfg.push_to_hub.split("/")[-1] if cfg.push_to_hub else
                                    f"{backbone.pretrained_cfg['architecture']}.cpia_{cfg.method}_{cfg.config}")
    card_context = replace(card_context, pretraining=pretraining_record(cfg.data, cfg.config))  # subsets on the card
    hub_context = replace(card_context, repo_id=cfg.push_to_hub) if cfg.push_to_hub else card_context
    model_dir = Path(cfg.out) / HUB_FOLDER
    if not cfg.dataset_id and Path(cfg.data).exists():
        print(f"model card: trained on the local folder {card_context.dataset!r}, so the card's `datasets:` "
              "metadata stays empty; pass --dataset-id <user>/CPIA to name the Hub dataset")
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
