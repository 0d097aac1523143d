"""`preftune eval`: per-pair log-probs of a model (and a reference) and the preference metrics they give."""

from __future__ import annotations

import argparse
from pathlib import Path

from .data.load import load_pairs
from .data.tokenize import tokenize_all
from .errors import PreftuneError
from .evaluate import logps_table, per_pair_rows, preference_metrics
from .io import write_jsonl
from .models import check_source, freeze, load_model, load_tokenizer, pick_device, pick_dtype


def run_eval(args: argparse.Namespace) -> dict:
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    if args.ref_model:  # a mistyped reference fails now, not after the policy's pass over the data
        check_source(args.ref_model, "model", "--ref-model")
    pairs, _ = load_pairs(args.data, data_format=args.data_format, split=args.split)
    if args.limit:
        pairs = pairs[: args.limit]
    items, stats = tokenize_all(tokenizer, pairs, max_length=args.max_length,
                                max_prompt_length=args.max_prompt_length)
    if not items:
        raise PreftuneError(f"{args.data}: no pair fits in --max-length {args.max_length}")

    def table(name: str, flag: str):
        model = load_model(name, device=device, dtype=dtype, trust_remote_code=args.trust_remote_code, flag=flag)
        freeze(model)
        out = logps_table(model, items, pad_id=tokenizer.pad_token_id, device=device, batch_size=args.batch_size)
        del model
        return out

    policy = table(args.model, "--model")
    ref = table(args.ref_model, "--ref-model") if args.ref_model else None
    summary = preference_metrics(policy, ref, args.beta)
    summary["dropped_pairs"] = stats.dropped
    summary["truncated_pairs"] = stats.truncated
    if args.output:
        write_jsonl(Path(args.output), per_pair_rows(policy, ref, items))
    return summary
