"""`preftune demo`: the demo (preftune/demo/) from the command line."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="Demo: a tiny model, SFT then offline and online DPO on a CPU in about "
                                            "a minute.")
    p.add_argument("--out", default="demo-run", help="Folder for the demo's runs and summary.json.")
    p.add_argument("--quiet", action="store_true", help="Print only the final summary.")
    p.add_argument("--fast", action="store_true", help="Fewer steps (for tests); numbers move less.")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..demo.run import run_demo  # the demo's data and models load only when it runs

    run_demo(Path(args.out), quiet=args.quiet, fast=args.fast)
    return 0
