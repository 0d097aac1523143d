"""`preftune plot RUN_DIR`: draw a run's figures again from its metrics file (mid-run, or after a style change)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import PreftuneError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the report subcommands to the CLI's subparsers; each sets `func(namespace) -> exit code`."""
    parser = subparsers.add_parser(
        "plot", help="draw a run's plots from its metrics.jsonl",
        description="Re-render RUN_DIR/plots/*.png from RUN_DIR/metrics.jsonl; works while the run is training.")
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder holding metrics.jsonl")
    parser.set_defaults(func=_plot)


def _plot(args: argparse.Namespace) -> int:
    try:  # matplotlib loads in ~0.5 s; only this command should pay for it
        import matplotlib.figure  # noqa: F401 - what the figures are drawn with
    except Exception as exc:  # noqa: BLE001 - not installed, or a broken backend setting (MPLBACKEND)
        raise PreftuneError(f"plot: matplotlib cannot be loaded ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}); check its installation and "
                            "MPLBACKEND") from None
    from ..report.plots import write_plots

    for path in write_plots(args.run_dir):  # a missing or empty metrics file raises PreftuneError
        print(path)
    return 0
