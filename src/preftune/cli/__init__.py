"""Command line: parse arguments, call the library. No training logic lives here.

One module per command, each with `register(subparsers)`; a command's `func(namespace)` returns the exit code.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import PreftuneError
from . import data, demo, generate, plot, train
from . import eval as eval_command  # `eval` alone would read as the builtin


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="preftune", description="Fine-tune language models on preferences: "
                                                                  "SFT, then DPO.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in (train, eval_command, demo, data, plot, generate):  # the order of `preftune --help`
        command.register(sub)
    return parser


def _version() -> str:
    from ..version import __version__

    return f"preftune {__version__}"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="preftune: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except PreftuneError as exc:
        print(f"preftune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("preftune: interrupted", file=sys.stderr)
        return 130
