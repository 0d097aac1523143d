"""`preftune score`: the reward of every answer in a file under a reward model (JSON summary on stdout)."""

from __future__ import annotations

import argparse
import json

from ..io import write_jsonl
from .flags import add_data_flags, add_model_flags, checked_output, say_cut


def register(subparsers) -> None:
    p = subparsers.add_parser("score", help="Rewards of answers under a reward model (JSON on stdout).",
                              description="The reward of every answer in --data under the reward model --model "
                                          "(a `preftune rm` run folder). For pairs, whether the reward model "
                                          "agrees with the label; the summary goes to stdout as JSON.")
    add_model_flags(p, reference=False, model_help="Reward model folder or Hub id (a scalar score head).")
    add_data_flags(p, required=True, help="Preference pairs, or single answers (prompt/completion, with or "
                                           "without a label).")
    p.add_argument("--output", metavar="FILE.jsonl", help="Write one row per pair (or answer) with its rewards.")
    p.add_argument("--batch-size", type=int, default=8, help="Pairs (or answers) per forward (default: "
                                                             "%(default)s).")
    p.add_argument("--max-length", type=int, default=1024,
                   help="Longest prompt+answer in tokens; answers are cut from the right (default: %(default)s).")
    p.add_argument("--max-prompt-length", type=int, help="Longest prompt in tokens; prompts are cut from the left.")
    p.add_argument("--limit", type=int, help="Score only the first N records.")
    p.set_defaults(func=_cmd_score)


def _cmd_score(args: argparse.Namespace) -> int:
    from ..api import score  # torch and transformers load only when a command needs them, not for `--help`

    output = checked_output(args)
    report = score(args.model, args.data, tokenizer=args.tokenizer, data_format=args.data_format, split=args.split,
                   batch_size=args.batch_size, max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                   limit=args.limit, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    if output is not None:
        write_jsonl(output, report.rows)
    say_cut("records", report.summary["dropped"], report.summary["truncated"], args)
    print(json.dumps(report.summary, indent=2))
    return 0
