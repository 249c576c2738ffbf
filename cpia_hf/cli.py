"""The `cpia` command: one subcommand per stage."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from .lifetime import Interrupted, stop_on_signals

# subcommand -> (the stage's cli module, help); the module defines configure_<name>(parser) and run_<name>(args)
COMMANDS = {
    "sources": ("cpia_hf.dataset.cli", "list the source datasets: access, licence, expected folders, presence"),
    "convert": ("cpia_hf.dataset.cli", "convert source datasets into a CPIA dataset folder"),
    "push": ("cpia_hf.dataset.cli", "upload a dataset folder to the Hugging Face Hub"),
    "demo": ("cpia_hf.demo.cli", "generate sample sources and convert them (offline)"),
    "train": ("cpia_hf.train.cli", "self-supervised pre-training (MAE, DINO, MoCo-v3)"),
    "export": ("cpia_hf.model.cli", "export a trained encoder for transformers and timm"),
    "eval": ("cpia_hf.evaluate.cli", "kNN, linear probe or fine-tuning evaluation"),
}
# Commands whose process (and the workers it forks) does no linear algebra: numpy's BLAS gets one thread. The
# threads it starts on import cost CPU in every such process and would oversubscribe the cores of N workers.
ONE_BLAS_THREAD = ("convert",)


def set_up_process(command: str | None) -> None:
    """The process settings of `command`, made before numpy is imported; an explicit setting wins."""
    if command in ONE_BLAS_THREAD:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the chosen subcommand's module is imported (training pulls in torch)."""
    parser = argparse.ArgumentParser(prog="cpia", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            getattr(module, f"configure_{name}")(sub)
            sub.set_defaults(handler=getattr(module, f"run_{name}"))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    set_up_process(command)
    try:
        with stop_on_signals():  # Ctrl-C, SIGTERM, SIGHUP: workers killed, lock released, one line
            return _run(command, argv)
    except Interrupted as stop:
        print(f"{'cpia ' + command if command else 'cpia'}: {stop}", file=sys.stderr)
        return stop.exit_status


def _run(command: str | None, argv: list[str]) -> int:
    args = build_parser(command).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except (FileNotFoundError, PermissionError, ValueError) as error:  # bad input: say what, no traceback
        if args.verbose:
            raise
        print(f"cpia {args.command}: error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:  # a failure at the Hub boundary (push, export, train --push-to-hub): one line
        from .hub import HubError  # already imported by every command that talks to the Hub

        if not isinstance(error, HubError) or args.verbose:
            raise
        print(f"cpia {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
