"""Command line: parse arguments, call the library. No training logic lives here."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import fields
from pathlib import Path

from . import generate, report_commands
from .config import TrainConfig, applies_to, field_type, flag_help, load_yaml_mapping
from .data import commands as data_commands
from .errors import PreftuneError


def _add_config_flags(parser: argparse.ArgumentParser, stage: str) -> None:
    parser.add_argument("--config", metavar="FILE.yaml", help="Read settings from a YAML file; flags override it.")
    for f in fields(TrainConfig):
        if f.name == "stage":
            continue
        flag = "--" + f.name.replace("_", "-")
        typ = field_type(f)
        # Flags of the other stage stay accepted, so using one is answered by config validation, not "unrecognized".
        shown = flag_help(f, stage) if applies_to(f.name, stage) else argparse.SUPPRESS
        kwargs = {"dest": f.name, "default": argparse.SUPPRESS, "help": shown}
        if typ is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
            parser.add_argument(flag, type=typ, metavar=f.name.upper(), **kwargs)


def config_from_args(args: argparse.Namespace, stage: str) -> TrainConfig:
    """File values, then flag values on top, then validation of the whole."""
    values = load_yaml_mapping(args.config) if getattr(args, "config", None) else {}
    values = dict(values)
    if values.get("stage", stage) != stage:
        raise PreftuneError(f"{args.config}: is a {values['stage']} config; run `preftune {values['stage']}`")
    values["stage"] = stage
    names = {f.name for f in fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return TrainConfig.from_dict(values, where=getattr(args, "config", None) or "flags")


def _cmd_train(args: argparse.Namespace) -> int:
    from .distributed import is_main_process
    from .train import run

    cfg = config_from_args(args, args.stage)
    final = run(cfg)
    if not cfg.quiet and final and "stopped_at_step" not in final and is_main_process():
        from .card import headline_text

        print(f"done: {cfg.output_dir}  {headline_text(final)}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .commands_eval import run_eval

    summary = run_eval(args)
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo.run import run_demo

    run_demo(Path(args.out), quiet=args.quiet, fast=args.fast)
    return 0


class _Parser(argparse.ArgumentParser):
    """A usage mistake is one line, like every other error: what was wrong and where to read more."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="preftune", description="Fine-tune language models on preferences: "
                                                                  "SFT, then DPO.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for stage, text in (("sft", "Supervised fine-tuning on text or conversations."),
                        ("dpo", "Preference optimisation on chosen/rejected pairs.")):
        p = sub.add_parser(stage, help=text, description=text)
        _add_config_flags(p, stage)
        p.set_defaults(func=_cmd_train, stage=stage)

    p = sub.add_parser("eval", help="Preference metrics of a model on pairs (JSON on stdout).")
    p.add_argument("--model", required=True, help="Model folder or Hub id.")
    p.add_argument("--ref-model", help="Reference model; rewards are beta * log-ratio to it.")
    p.add_argument("--data", required=True, help="Preference pairs.")
    p.add_argument("--output", metavar="FILE.jsonl", help="Write one row of log-probs per pair.")
    p.add_argument("--data-format", help="Force a data format instead of detecting it.")
    p.add_argument("--split", default="train", help="Split of a saved dataset or Hub id (default: %(default)s).")
    p.add_argument("--beta", type=float, default=0.1, help="Rewards are beta times the log-ratio to the reference "
                                                            "(default: %(default)s).")
    p.add_argument("--batch-size", type=int, default=8, help="Pairs per forward (default: %(default)s).")
    p.add_argument("--max-length", type=int, default=1024,
                   help="Longest prompt+answer in tokens; answers are cut from the right (default: %(default)s).")
    p.add_argument("--max-prompt-length", type=int, help="Longest prompt in tokens; prompts are cut from the left.")
    p.add_argument("--limit", type=int, help="Evaluate only the first N pairs.")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda or mps (default: %(default)s).")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (bfloat16 on GPUs that "
                                                   "have it, else float32) (default: %(default)s).")
    p.add_argument("--trust-remote-code", action="store_true", help="Allow model code from the folder or Hub to run.")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("demo", help="Offline demo: a tiny model, SFT then DPO on a CPU in a few minutes.")
    p.add_argument("--out", default="demo-run", help="Folder for the demo's runs and summary.json.")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--fast", action="store_true", help="Fewer steps (for tests); numbers move less.")
    p.set_defaults(func=_cmd_demo)

    data_commands.register(sub)
    report_commands.register(sub)
    generate.register(sub)
    return parser


def _version() -> str:
    from . import __version__

    return f"preftune {__version__}"


def main(argv: list[str] | None = None) -> int:
    # Our own loggers only: libraries that print their warnings themselves (transformers, huggingface_hub) would
    # otherwise show each one twice, once more through a root handler.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("preftune: %(message)s"))
    ours = logging.getLogger("preftune")
    ours.handlers, ours.propagate = [handler], False
    ours.setLevel(logging.WARNING)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
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
    except KeyboardInterrupt:
        print("preftune: interrupted", file=sys.stderr)
        return 130
