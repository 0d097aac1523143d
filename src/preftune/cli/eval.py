"""`preftune eval`: per-pair log-probs of a model (and a reference) and the preference metrics they give."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import PreftuneError
from ..io import write_jsonl
from .flags import add_data_flags, add_model_flags


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="Preference metrics of a model on pairs (JSON on stdout).")
    add_model_flags(p)
    add_data_flags(p, required=True, help="Preference pairs.")
    p.add_argument("--output", metavar="FILE.jsonl", help="Write one row of log-probs per pair.")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--max-prompt-length", type=int)
    p.add_argument("--limit", type=int, help="Evaluate only the first N pairs.")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    print(json.dumps(run_eval(args), indent=2))
    return 0


def run_eval(args: argparse.Namespace) -> dict:
    """The summary printed on stdout; with --output, per-pair rows written too."""
    # torch, transformers and the models load only when a command needs them, not for `--help`.
    from ..data.load import load_pairs
    from ..data.tokenize import tokenize_all
    from ..evaluate import logps_table, per_pair_rows, preference_metrics
    from ..models.load import freeze, load_model, load_tokenizer
    from ..models.precision import pick_device, pick_dtype

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    pairs, _ = load_pairs(args.data, data_format=args.data_format, split=args.split)
    if args.limit:
        pairs = pairs[: args.limit]
    items, stats = tokenize_all(tokenizer, pairs, max_length=args.max_length,
                                max_prompt_length=args.max_prompt_length)
    if not items:
        raise PreftuneError(f"{args.data}: no pair fits in --max-length {args.max_length}")

    def table(name: str):
        model = load_model(name, device=device, dtype=dtype, trust_remote_code=args.trust_remote_code)
        freeze(model)
        out = logps_table(model, items, pad_id=tokenizer.pad_token_id, device=device, batch_size=args.batch_size)
        del model
        return out

    policy = table(args.model)
    ref = table(args.ref_model) if args.ref_model else None
    summary = preference_metrics(policy, ref, args.beta)
    summary["dropped_pairs"] = stats.dropped
    summary["truncated_pairs"] = stats.truncated
    if args.output:
        write_jsonl(Path(args.output), per_pair_rows(policy, ref, items))
    return summary
