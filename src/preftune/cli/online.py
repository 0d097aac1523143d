"""`preftune online`: rounds of generate, judge, pair and DPO steps (online/rounds.py). Flags: the rounds'
settings, then every DPO setting of `preftune dpo` that a round does not set itself."""

from __future__ import annotations

import argparse
from dataclasses import fields

from ..config import TrainConfig, field_type, flag_help
from ..online.config import NOT_DPO_KEYS, OnlineConfig, field_names, online_field

HELP = "Online DPO: rounds of sampling from the policy, judging, pairing best vs worst, and DPO steps."


def register(subparsers) -> None:
    p = subparsers.add_parser("online", help=HELP, description=HELP)
    p.add_argument("--config", metavar="FILE.yaml", help="Read settings from a YAML file; flags override it.")
    rounds = p.add_argument_group("rounds")
    for name in field_names():
        _add_flag(rounds, online_field(name), online_field(name).metadata["help"])
    dpo = p.add_argument_group("DPO steps of each round (as `preftune dpo`)")
    own = set(field_names())
    for f in fields(TrainConfig):
        if f.name not in own and f.name not in NOT_DPO_KEYS:
            _add_flag(dpo, f, flag_help(f, "dpo"))
    p.set_defaults(func=_cmd_online)


def _add_flag(group, f, help_text: str) -> None:
    flag = "--" + f.name.replace("_", "-")
    kwargs = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
    typ = field_type(f)
    if typ is bool:
        group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        return
    if f.metadata.get("choices"):
        kwargs["choices"] = f.metadata["choices"]
    group.add_argument(flag, type=typ, metavar=f.name.upper(), **kwargs)


def config_from_args(args: argparse.Namespace) -> OnlineConfig:
    from ..config import load_yaml_mapping
    from ..errors import ConfigError

    values = dict(load_yaml_mapping(args.config)) if getattr(args, "config", None) else {}
    if values.pop("stage", "online") != "online":
        raise ConfigError(f"{args.config}: is not an online config; run `preftune {values.get('stage')}`")
    values.update({k: v for k, v in vars(args).items() if k not in ("config", "func", "command")})
    return OnlineConfig.from_dict(values, where=getattr(args, "config", None) or "flags")


def _cmd_online(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from ..online.rounds import run_online
    from ..training.signals import resume_command

    cfg = config_from_args(args)
    command = shlex.join(["preftune", *sys.argv[1:]])
    result = run_online(cfg, resume_hint=resume_command(command))
    if result.stopped_at is None:  # the final line, quiet or not
        row = result.metrics
        score = f"; held-out greedy score {row['eval_score']:.4g}" if "eval_score" in row else ""
        print(f"done: {cfg.rounds} rounds in {cfg.output_dir}{score}")
    return 0
