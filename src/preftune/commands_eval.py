"""`preftune eval`: per-pair log-probs of a model (and a reference) and the preference metrics they give."""

from __future__ import annotations

import argparse
from pathlib import Path

from .api import evaluate
from .io import write_jsonl


def run_eval(args: argparse.Namespace) -> dict:
    """`preftune.evaluate` on the command's arguments; writes the per-pair rows with --output."""
    report = evaluate(model=args.model, ref_model=args.ref_model, data=args.data, data_format=args.data_format,
                      split=args.split, beta=args.beta, batch_size=args.batch_size, max_length=args.max_length,
                      max_prompt_length=args.max_prompt_length, limit=args.limit, device=args.device,
                      dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    if args.output:
        write_jsonl(Path(args.output), report.rows)
    return report.summary
