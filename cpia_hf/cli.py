"""The `cpia` command: one subcommand per stage."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand -> (module exposing configure_parser/run, help)
COMMANDS = {
    "convert": ("cpia_hf.convert", "convert source datasets into a CPIA dataset folder"),
    "demo": ("cpia_hf.demo", "generate sample sources and convert them (offline)"),
    "push": ("cpia_hf.hub", "upload a dataset folder to the Hugging Face Hub"),
    "train": ("cpia_hf.train.cli", "self-supervised pre-training (MAE, DINO, MoCo-v3)"),
    "export": ("cpia_hf.export", "export a trained encoder for transformers and timm"),
    "eval": ("cpia_hf.evaluate.cli", "kNN, linear probe or fine-tuning evaluation"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the chosen subcommand's module is imported (training pulls in torch)."""
    parser = argparse.ArgumentParser(prog="cpia", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.configure_parser(sub)
            sub.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except (FileNotFoundError, PermissionError, ValueError) as error:  # bad input: say what, no traceback
        if args.verbose:
            raise
        print(f"cpia {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
