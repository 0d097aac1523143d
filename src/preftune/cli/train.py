"""`preftune sft`, `preftune dpo` and `preftune kto`: a TrainConfig from a YAML file and flags (one flag per config field), then
a training run."""

from __future__ import annotations

import argparse
from dataclasses import fields

from ..config import TrainConfig, applies_to, field_type, flag_help, load_yaml_mapping
from ..errors import PreftuneError

STAGES = (("sft", "Supervised fine-tuning on text or conversations."),
          ("dpo", "Preference optimisation on chosen/rejected pairs."),
          ("kto", "KTO on unpaired feedback: answers each rated desirable or undesirable."),
          ("rm", "A Bradley-Terry reward model (a scalar head on a causal LM) on chosen/rejected pairs."))


def register(subparsers) -> None:
    for stage, text in STAGES:
        p = subparsers.add_parser(stage, help=text, description=text)
        _add_config_flags(p, stage)
        p.set_defaults(func=_cmd_train, stage=stage)


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
    # torch and transformers load only when a run starts, not for `--help`.
    import shlex
    import sys

    from ..api import train_from_config
    from ..dist.env import is_main_process
    from ..report.progress import describe_final
    from ..training.signals import resume_command

    cfg = config_from_args(args, args.stage)
    cfg.require_paths()  # from the shell a run without --output-dir would train and keep nothing
    command = shlex.join(["preftune", *sys.argv[1:]])
    result = train_from_config(cfg, command=command, resume_hint=resume_command(command), load_finished=False)
    if result.metrics and result.stopped_at_step is None and is_main_process():  # the final line, quiet or not
        print(describe_final(cfg.output_dir, result.metrics))
    return 0
