"""`preftune eval`: per-pair log-probs of a model (and a reference) and the preference metrics they give."""

from __future__ import annotations

import argparse
import json

from ..io import write_jsonl
from .flags import add_data_flags, add_model_flags, checked_output, say_cut


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="Preference metrics of a model on pairs (JSON on stdout).")
    add_model_flags(p)
    add_data_flags(p, required=True, help="Preference pairs.")
    p.add_argument("--output", metavar="FILE.jsonl", help="Write one row of log-probs per pair.")
    p.add_argument("--beta", type=float, help="Rewards are beta times the log-ratio to the reference (default: the "
                                              "run's, when --model is a preftune DPO or KTO run folder, else 0.1).")
    p.add_argument("--batch-size", type=int, default=8, help="Pairs per forward (default: %(default)s).")
    p.add_argument("--max-length", type=int, default=1024,
                   help="Longest prompt+answer in tokens; answers are cut from the right (default: %(default)s).")
    p.add_argument("--max-prompt-length", type=int, help="Longest prompt in tokens; prompts are cut from the left.")
    p.add_argument("--limit", type=int, help="Evaluate only the first N pairs.")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    print(json.dumps(run_eval(args), indent=2))
    return 0


def run_eval(args: argparse.Namespace) -> dict:
    """`preftune.evaluate` on the command's arguments; writes the per-pair rows with --output."""
    from ..api import evaluate  # torch and transformers load only when a command needs them, not for `--help`

    output = checked_output(args)
    report = evaluate(model=args.model, ref_model=args.ref_model, tokenizer=args.tokenizer, data=args.data,
                      data_format=args.data_format, split=args.split, beta=args.beta, batch_size=args.batch_size,
                      max_length=args.max_length, max_prompt_length=args.max_prompt_length, limit=args.limit,
                      device=args.device,
                      dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    if output is not None:
        write_jsonl(output, report.rows)
    say_cut("pairs", report.summary["dropped_pairs"], report.summary["truncated_pairs"], args)
    return report.summary
