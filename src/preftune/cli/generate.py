"""`preftune generate`: policy and reference answers to the same prompts, side by side."""

from __future__ import annotations

import argparse

from ..errors import PreftuneError
from ..io import write_jsonl
from .flags import add_data_flags, add_model_flags, checked_output


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="Policy and reference answers side by side.")
    add_model_flags(p)
    p.add_argument("--prompt", help="One prompt (a user turn when the tokenizer has a chat template).")
    add_data_flags(p, required=False, help="Take prompts from a preference data file.")
    p.add_argument("-n", type=int, default=None, help="Prompts to take from --data (default: 3).")
    p.add_argument("--max-new-tokens", type=int, default=64, help="Longest answer in tokens (default: %(default)s).")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="Sampling temperature; 0 decodes greedily (default: %(default)s).")
    p.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling mass (default: %(default)s).")
    p.add_argument("--seed", type=int, default=0, help="Seed for sampling (default: %(default)s).")
    p.add_argument("--output", metavar="FILE.jsonl", help="Also write one row per prompt with both answers.")
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    # torch, transformers and the models load only when a command needs them, not for `--help`.
    from ..generate import generate_answers
    from ..models.load import check_source, freeze, load_model, load_tokenizer
    from ..models.precision import pick_device, pick_dtype

    if (args.prompt is None) == (args.data is None):
        raise PreftuneError("generate: give exactly one of --prompt TEXT or --data FILE")
    if args.prompt is not None and args.n is not None:
        raise PreftuneError("-n: counts prompts taken from --data; --prompt is one prompt, so leave -n out")
    args.n = 3 if args.n is None else args.n
    checks = {"--max-new-tokens": (args.max_new_tokens >= 1, "at least 1"), "-n": (args.n >= 1, "at least 1"),
              "--temperature": (args.temperature >= 0, "0 (greedy) or more"),
              "--top-p": (0 < args.top_p <= 1, "in (0, 1]"), "--seed": (0 <= args.seed < 2 ** 63, "0 to 2**63 - 1")}
    for flag, (ok, want) in checks.items():
        if not ok:
            raise PreftuneError(f"{flag}: must be {want}")
    output = checked_output(args)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    tokenizer = load_tokenizer(args.tokenizer or args.model, trust_remote_code=args.trust_remote_code,
                               flag="--tokenizer" if args.tokenizer else "--model")
    columns = {"policy": (args.model, "--model")}
    if args.ref_model:
        check_source(args.ref_model, "model", "--ref-model")
        columns["reference"] = (args.ref_model, "--ref-model")
    prompts = _prompts(args, tokenizer)
    rows = [{"prompt": prompt, **({"system": system} if system else {})} for prompt, system, _ in prompts]
    for column, (name, flag) in columns.items():
        model = load_model(name, device=device, dtype=dtype, trust_remote_code=args.trust_remote_code, flag=flag)
        freeze(model)
        answers = generate_answers(model, tokenizer, [ids for *_, ids in prompts], max_new_tokens=args.max_new_tokens,
                                   temperature=args.temperature, top_p=args.top_p, seed=args.seed, device=device)
        for row, answer in zip(rows, answers):
            row[column] = answer
        del model
    _show(rows, list(columns))
    if output is not None:
        write_jsonl(output, rows)
    return 0


def _show(rows: list[dict], columns: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_lines=True)
    table.add_column("prompt", overflow="fold", ratio=1)
    for c in columns:
        table.add_column(c, overflow="fold", ratio=2)
    for row in rows:
        shown = row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][-1]["content"]  # its last turn
        table.add_row(shown, *(row[c] for c in columns))
    Console().print(table)


def _prompts(args: argparse.Namespace, tokenizer) -> list[tuple[object, str | None, list[int]]]:
    """(prompt as given: text or messages, system prompt, prompt ids) for each prompt; a plain --prompt is a user
    turn when there is a template."""
    from ..data.encode import encode_prompt

    if args.prompt is not None:
        prompt = args.prompt
        content = [{"role": "user", "content": prompt}] if getattr(tokenizer, "chat_template", None) else prompt
        return [(prompt, None, encode_prompt(tokenizer, content, where="--prompt"))]
    from ..data.load import load_pairs

    from ..data.tokenize import prompt_ids_of

    pairs, _ = load_pairs(args.data, data_format=args.data_format, split=args.split, skip_bad_records=None)
    return [(pair.prompt, pair.system, prompt_ids_of(tokenizer, pair)) for pair in pairs[: args.n]]
