"""Command line: parse arguments, call the library. No training logic lives here.

One module per command, each with `register(subparsers)`; a command's `func(namespace)` returns the exit code.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from ..errors import PreftuneError, Terminated
from . import data, demo, generate, online, plot, score, train
from . import eval as eval_command  # `eval` alone would read as the builtin


class _Parser(argparse.ArgumentParser):
    """A usage mistake is one line, like every other error: what was wrong and where to read more.

    Flags are taken only as spelt: with argparse's prefix matching, `data check --data FILE` read `--data` as
    `--data-format` and named FILE an invalid format."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="preftune", description="Fine-tune language models on preferences: SFT, then DPO.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in (train, online, eval_command, score, demo, data, plot, generate):  # the order of `preftune --help`
        command.register(sub)
    return parser


def _version() -> str:
    from ..version import __version__

    return f"preftune {__version__}"


def main(argv: list[str] | None = None) -> int:
    # Our own loggers only: libraries that print their warnings themselves (transformers, huggingface_hub) would
    # otherwise show each one twice, once more through a root handler.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("preftune: %(message)s"))
    ours = logging.getLogger("preftune")
    ours.handlers, ours.propagate = [handler], False
    ours.setLevel(logging.WARNING)
    try:  # building the parser imports torch (the loss names in --help): a second or so to interrupt
        parser = build_parser()
    except KeyboardInterrupt:
        print("preftune: interrupted", file=sys.stderr)
        return 130
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    # transformers' warnings below errors off for the whole process (when imported; a setting of the user's
    # wins): the library turns them off for its own calls only.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader that left early (`| head`) shows up here, not at interpreter exit
        return code
    except BrokenPipeError:
        # The reader has what it wanted: end quietly, and stop Python's own flush at exit from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool that stops at a closed pipe
    except PreftuneError as exc:
        print(f"preftune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # the machine under the run: a folder removed or turned read-only, a device error
        where = f"{exc.filename}: " if exc.filename else ""
        trains = args.command in ("sft", "dpo", "kto", "rm", "online")
        resumes = " (--resume continues from the last checkpoint, if one was written)" if trains else ""
        print(f"preftune: error: {where}{exc.strerror or exc}; fix that and run again{resumes}", file=sys.stderr)
        return 2
    except Terminated:
        print("preftune: SIGTERM received before the first step; stopped (nothing to checkpoint yet)",
              file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("preftune: interrupted", file=sys.stderr)
        return 130
