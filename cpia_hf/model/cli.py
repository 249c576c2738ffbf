"""`cpia export`: publish a trained encoder as one Hub model repo that timm and transformers load."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..hub import HubError, push_folder, require_push_access
from .backbone import backbone_from_weights, load_backbone_from_checkpoint
from .card import CARD_CONTEXT, ModelCardContext
from .export import export_encoder
from .progress import library_progress


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Append `(default: X)` to the help of every option that takes a value, has a default and does not
    already say what happens without it."""
    for action in parser._actions:
        if action.help in (None, argparse.SUPPRESS) or action.nargs == 0 or action.required:
            continue
        if "default" in action.help or action.default is None:
            continue
        value = action.default
        shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
        action.help += f" (default: {shown})"


def configure_export(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="training checkpoint folder (cpia train)")
    source.add_argument("--weights", type=Path, help="safetensors state dict of a timm ViT")
    parser.add_argument("--model", required=True,
                        help="timm architecture, e.g. vit_base_patch16_224 (checked against a checkpoint)")
    parser.add_argument("--model-args", type=json.loads, default={}, metavar="JSON",
                        help='timm model arguments for --weights, e.g. \'{"img_size": 384}\' (default: none)')
    parser.add_argument("--out", type=Path, required=True, help="output repo folder")
    parser.add_argument("--name", help="model name on the card (default: repo id or output folder name)")
    parser.add_argument("--card-context", type=Path,
                        help="JSON of the training run for the card (default: <checkpoint>/card_context.json)")
    parser.add_argument("--push-to-hub", metavar="REPO_ID",
                        help="upload the folder to this model repo (default: no upload)")
    parser.add_argument("--private", action="store_true", help="create the Hub repo private")
    parser.add_argument("--endpoint", metavar="URL", help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (writing the weights, upload)")
    show_defaults(parser)


def run_export(args: argparse.Namespace) -> int:
    require_push_access(args.push_to_hub, "model", endpoint=args.endpoint, private=args.private, command="cpia export")
    if args.checkpoint is not None:
        backbone = load_backbone_from_checkpoint(args.checkpoint)
        architecture = backbone.pretrained_cfg["architecture"]
        if architecture != args.model:
            raise ValueError(f"{args.checkpoint}: holds a {architecture}, not {args.model}")
    else:
        backbone = backbone_from_weights(args.weights, args.model, args.model_args)
    context_file = args.card_context
    if context_file is None and args.checkpoint is not None and (args.checkpoint / CARD_CONTEXT).is_file():
        context_file = args.checkpoint / CARD_CONTEXT
    card_context = ModelCardContext.read(context_file) if context_file is not None else ModelCardContext()
    if args.push_to_hub:
        card_context.repo_id = args.push_to_hub
    model_name = args.name or (args.push_to_hub.split("/")[-1] if args.push_to_hub else args.out.name)
    with library_progress(not args.no_progress):
        paths = export_encoder(backbone, args.out, model_name=model_name, card_context=card_context)
        print(f"exported {model_name} to {paths['root']}")
        if args.push_to_hub:
            try:
                result = push_folder(args.out, args.push_to_hub, repo_type="model", private=args.private,
                                     commit_message=f"Upload {model_name}", endpoint=args.endpoint)
            except HubError as error:
                print(f"cpia export: error: {error}; the exported folder {args.out} is kept", file=sys.stderr)
                return 2
            print(f"pushed to {result.url}")
    return 0
