"""`cpia train`: pre-train a ViT on CPIA with MAE, DINO or MoCo-v3 (also under `accelerate launch`)."""
from __future__ import annotations

import argparse
import inspect
import json
import sys
from dataclasses import Field, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import timm
import yaml
from accelerate import PartialState

from ..dataset.card import pretraining_record
from ..dataset.catalog import read_yaml
from ..hub import push_folder, require_push_access
from ..model.backbone import load_backbone_from_checkpoint
from ..model.card import ModelCardContext
from ..model.export import export_encoder
from ..model.progress import library_progress
from . import METHODS
from .augment import AugmentConfig
from .config import TrainConfig, method_default_text
from .settings import field_default
from .trainer import train

HUB_FOLDER = "model"  # the exported, Hub-ready folder inside a run's output folder
BACKBONE_ARGS = ("model", "img_size", "init", "model_kwargs", "drop_path")  # from_config passes these
GROUP_TITLES = {"data": "data", "model": "model", "optimisation": "optimisation", "run": "run",
                "hub": "Hugging Face Hub", "augmentation": "augmentation"}


def _pair(text: str) -> tuple[float, float]:
    low, high = (float(v) for v in text.split(","))
    return low, high


def _switch(value: str) -> bool:
    if value not in ("0", "1"):
        raise argparse.ArgumentTypeError(f"expected 0 or 1, got {value!r}")
    return value == "1"


@dataclass(frozen=True)
class MethodOption:
    """A keyword argument of one or more method classes, as one `cpia train` flag."""

    name: str
    kind: Any  # the annotated type (bool options take 0 / 1 on the command line)
    per_method: dict[str, tuple[Any, str]]  # method -> (default, help)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def help_text(self) -> str:
        def shown(default: Any) -> Any:
            return int(default) if isinstance(default, bool) else default

        return "; ".join(f"[{method}] {text} (default: {shown(default)})"
                         for method, (default, text) in self.per_method.items())


def method_options_table() -> dict[str, MethodOption]:
    """Every method option, from the keyword-only arguments of the method classes and their `option_help`."""
    found: dict[str, dict[str, tuple[Any, str]]] = {}
    kinds: dict[str, Any] = {}
    for method, method_cls in sorted(METHODS.items()):
        hints = get_type_hints(method_cls.__init__)
        for name, parameter in inspect.signature(method_cls.__init__).parameters.items():
            if parameter.kind is not inspect.Parameter.KEYWORD_ONLY or name in BACKBONE_ARGS:
                continue
            found.setdefault(name, {})[method] = (parameter.default, method_cls.option_help[name])
            kinds[name] = hints[name]
    return {name: MethodOption(name, kinds[name], per_method) for name, per_method in found.items()}


def flag_of(item: Field) -> str:
    """The flag of a setting: its own, else `--<name>`, or `--no-<name>` for a setting on by default."""
    if item.metadata["flag"]:
        return item.metadata["flag"]
    dashed = item.name.replace("_", "-")
    return f"--no-{dashed}" if item.default is True else f"--{dashed}"


def argument_of(item: Field, kind: Any, default_text: str) -> dict[str, Any]:
    """argparse keyword arguments of a setting of type `kind` (unset: None, so a recipe can fill it)."""
    options: dict[str, Any] = {"dest": item.name, "default": None}
    if type(None) in get_args(kind):  # `X | None`: the flag takes an X
        kind = next(arg for arg in get_args(kind) if arg is not type(None))
    origin = get_origin(kind)
    if kind is bool:
        return {**options, "action": "store_const", "const": not item.default, "help": item.metadata["help"]}
    if origin is list:
        options["nargs"] = "*"
    elif origin is tuple:
        options["type"] = _pair
    elif origin is dict:
        options["type"] = json.loads
    elif origin is Literal:
        options["choices"] = list(get_args(kind))
    else:
        options["type"] = kind
    if item.metadata["metavar"]:
        options["metavar"] = item.metadata["metavar"]
    text = item.metadata["help"] + (f" (default: {default_text})" if default_text else "")
    return {**options, "help": text}


def add_settings(parser: argparse.ArgumentParser, groups: dict, cls: type, *, augment: bool = False) -> None:
    """One flag per setting of the dataclass `cls` that has one (and its hidden older names)."""
    hints = get_type_hints(cls)
    for item in fields(cls):
        if item.metadata.get("flag") == "":
            continue
        text = method_default_text(item.name, field_default(item), item.metadata["shown"], augment=augment)
        options = argument_of(item, hints[item.name], text)
        group = groups[item.metadata["group"]]
        group.add_argument(flag_of(item), **options)
        for alias in item.metadata["aliases"]:
            group.add_argument(alias, **{**options, "help": argparse.SUPPRESS})


def configure_train(parser: argparse.ArgumentParser) -> None:
    """Add the `cpia train` arguments, generated from `TrainConfig`, `AugmentConfig` and the method classes.
    Unset flags take the `--recipe` value, else the method's default, else the setting's default."""
    parser.add_argument("--recipe", type=Path, help="YAML of TrainConfig values (recipes/*.yaml); flags override it")
    groups = {key: parser.add_argument_group(title) for key, title in GROUP_TITLES.items()}
    add_settings(parser, groups, TrainConfig)
    add_settings(parser, groups, AugmentConfig, augment=True)
    options = parser.add_argument_group("method options (applies to the methods in brackets)")
    for option in method_options_table().values():
        kind = _switch if option.kind is bool else option.kind
        options.add_argument(option.flag, dest=option.name, type=kind, default=None, help=option.help_text())


def setting_names(cls: type) -> list[str]:
    """The settings of `cls` that have a flag."""
    return [item.name for item in fields(cls) if item.metadata.get("flag") != ""]


def load_recipe(path: Path) -> dict:
    """A recipe file: TrainConfig fields, with `augment` and `method_options` as mappings."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: recipe file not found")
    try:
        recipe = read_yaml(path) or {}
    except yaml.YAMLError as error:  # a duplicate key (which plain YAML would keep the last of) or bad syntax
        raise ValueError(f"{path}: {' '.join(str(error).split())}") from error
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


def given_values(args: argparse.Namespace, recipe: dict, names: list[str]) -> dict[str, Any]:
    """The settings that the recipe or the flags give (flags win); unset ones are left to the defaults."""
    values = {name: value for name, value in recipe.items() if value is not None}
    values.update({name: getattr(args, name) for name in names if getattr(args, name, None) is not None})
    return values


def build_config(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from parsed arguments; unset values from the recipe file, then the method's defaults."""
    recipe = load_recipe(args.recipe) if getattr(args, "recipe", None) else {}
    method = args.method or recipe.get("method")
    if method not in METHODS:
        raise ValueError(f"--method is required (here or in the recipe), one of {sorted(METHODS)}; got {method!r}")
    run_recipe = {k: v for k, v in recipe.items() if k not in ("method", "augment", "method_options")}
    values = given_values(args, run_recipe, [n for n in setting_names(TrainConfig) if n != "method"])
    augment = given_values(args, recipe.get("augment") or {}, setting_names(AugmentConfig))
    for required in ("data", "out"):
        if not values.get(required):
            raise ValueError(f"--{required} is required (here or in the recipe)")
    if values.get("push_to_hub") and values.get("export") is False:
        raise ValueError("--push-to-hub uploads the exported folder; drop --no-export")
    for name in ("crop_scale", "local_crop_scale", "mean", "std"):
        if name in augment:
            augment[name] = tuple(augment[name])
    if values.get("init"):  # keep the normalisation the pretrained weights were trained with
        pretrained = timm.models.get_pretrained_cfg(values["init"])
        if pretrained is None:
            raise ValueError(f"--init {values['init']}: unknown timm pretrained weights")
        augment.update(mean=tuple(pretrained.mean), std=tuple(pretrained.std))
    if "clip_grad" in values:
        values["clip_grad"] = values["clip_grad"] or None  # 0: off
    for name, kind in (("drop_path", float), ("model_kwargs", dict), ("scales", list), ("organs", list),
                       ("betas", tuple)):
        if name in values:
            values[name] = kind(values[name] or kind())
    options = method_options(args, method, recipe.get("method_options") or {})
    return TrainConfig.for_method(method, augment=augment, method_options=options, **values)


def method_options(args: argparse.Namespace, method: str, from_recipe: dict) -> dict:
    """Keyword arguments of the method class: the recipe's, overridden by flags; each checked against it."""
    options = dict(from_recipe)
    for name, option in method_options_table().items():
        value = getattr(args, name, None)
        if value is None:
            continue
        if method not in option.per_method:
            raise ValueError(f"{option.flag} applies to {'/'.join(option.per_method)}, not {method}")
        options[name] = value
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
    with library_progress(cfg.progress):
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
    """Entry point of `python -m cpia_hf.train` and `accelerate launch -m cpia_hf.train`: the `cpia train` command,
    with its one-line errors and its handling of Ctrl-C and SIGTERM."""
    from ..cli import main as cpia_main

    return cpia_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
