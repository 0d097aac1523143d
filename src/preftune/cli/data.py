"""The `preftune data` command: `check` a data file, `show` its records as the model will see them.

`register(subparsers)` adds it to the CLI's argparse subparsers; each subcommand's `func` takes the parsed
namespace and returns the exit code. User mistakes raise `PreftuneError`, which the CLI prints as one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..data.check import check_pairs, render_report
from ..data.detect import FORMAT_NAMES
from ..data.load import (SFTData, UnpairedData, load_pairs, read_sft_source, read_unpaired_source,
                         require_some)
from ..data.rows import NOT_TRAINED
from ..data.unpaired import UNPAIRED_FORMATS
from ..errors import ConfigError, ModelError

_DEFAULT_MAX_LENGTH = next(f.default for f in dataclasses.fields(TrainConfig) if f.name == "max_length")


def register(subparsers: Any) -> None:
    data = subparsers.add_parser("data", help="Check data (pairs, unpaired feedback or SFT), or show it as the "
                                              "model will see it.")
    commands = data.add_subparsers(dest="data_command", metavar="{check,show}", required=True)

    check = commands.add_parser("check", help="List every problem in a data file; exit 1 if any.")
    _add_source_args(check)
    check.add_argument("--model", help="Model or tokenizer folder: adds token lengths and truncation checks.")
    check.add_argument("--all", action="store_true", help="List every problem, not the first few of each kind.")
    _add_length_args(check)
    check.set_defaults(func=run_check)

    show = commands.add_parser("show", help="Print a few pairs (or unpaired or SFT examples) as the model will see "
                                            "them, with token counts.")
    _add_source_args(show)
    show.add_argument("-n", type=int, default=3, help="How many records (default: %(default)s).")
    show.add_argument("--model", help="Model or tokenizer folder whose chat template to apply (adds token counts).")
    _add_length_args(show)
    show.set_defaults(func=run_show)


def _add_source_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", nargs="?", help="Data file (.jsonl/.json/.parquet/.csv/.tsv, optionally .gz), folder "
                        "or Hub id.")
    parser.add_argument("--data", dest="data_file", metavar="FILE", help="The same, named as the training "
                        "commands name it.")
    parser.add_argument("--data-format", choices=FORMAT_NAMES + UNPAIRED_FORMATS + ("sft",),
                        help="Force a format instead of detecting it (sft: read the records as SFT data).")
    parser.add_argument("--split", default="train", help="Split of a saved dataset or Hub id (default: train).")


def _add_length_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-length", type=int, default=_DEFAULT_MAX_LENGTH,
                        help="Longest prompt+answer in tokens (default: %(default)s).")
    parser.add_argument("--max-prompt-length", type=int, default=None, help="Longest prompt in tokens.")
    parser.add_argument("--raw-text-prompts", action="store_true",
                        help="Feed orca/alpaca-style records as raw text, not through the chat template.")


def _source(args: argparse.Namespace) -> str:
    """The data file, given as the positional argument or as --data (once)."""
    if args.file and args.data_file and args.file != args.data_file:
        raise ConfigError(f"two data files ({args.file}, --data {args.data_file}): name one")
    if not (args.file or args.data_file):
        raise ConfigError(f"data {args.data_command}: name the data file (preftune data {args.data_command} FILE)")
    return args.file or args.data_file


def _check_lengths(args: argparse.Namespace) -> None:
    if args.max_length < 2:
        raise ConfigError(f"--max-length: must be at least 2 (a prompt token and an answer token), got "
                          f"{args.max_length}")
    if args.max_prompt_length is not None and args.max_prompt_length < 1:
        raise ConfigError(f"--max-prompt-length: must be at least 1, got {args.max_prompt_length}")


def run_check(args: argparse.Namespace) -> int:
    _check_lengths(args)
    args.file = _source(args)
    tokenizer = local_tokenizer(args.model) if args.model else None
    result = check_pairs(args.file, data_format=args.data_format, split=args.split, tokenizer=tokenizer,
                         max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                         raw_text_prompts=args.raw_text_prompts)
    print(render_report(result, forced=args.data_format is not None, show_all=args.all))
    if tokenizer is None:
        print("(pass --model DIR to check token lengths and truncation too)")
    return 0 if result.clean else 1


def run_show(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise ConfigError(f"-n: must be at least 1, got {args.n}")
    _check_lengths(args)
    args.file = _source(args)
    tokenizer = local_tokenizer(args.model) if args.model else None
    try:
        if args.data_format in UNPAIRED_FORMATS:
            raise UnpairedData("forced")
        if args.data_format == "sft":
            raise SFTData("forced")
        pairs, report = load_pairs(args.file, data_format=args.data_format, split=args.split, skip_bad_records=True)
    except SFTData:
        examples, report = read_sft_source(args.file, split=args.split, skip_bad_records=True)
        return _show_all(args, report, examples, "examples", tokenizer, _show_sft,
                         "SFT data: one answer a record; it is data for `preftune sft`, not for DPO")
    except UnpairedData:
        examples, report = read_unpaired_source(args.file, data_format=args.data_format, split=args.split,
                                                skip_bad_records=True)
        return _show_all(args, report, examples, "records", tokenizer, _show_unpaired,
                         "unpaired feedback: each record rates one answer; it is data for KTO, not for DPO")
    return _show_all(args, report, pairs, "pairs", tokenizer, _show_pair)


def _show_all(args: argparse.Namespace, report, items: list, noun: str, tokenizer, show, note: str = "") -> int:
    """The header, `note`, then the first -n `items`, each by `show`; a source of no usable item is an error."""
    require_some(items, report)
    _show_header(args, report, noun, len(items), tokenizer)
    if note:
        print(f"({note})")
    for item in items[:args.n]:
        show(item, tokenizer, args)
    return 0


def _show_header(args: argparse.Namespace, report, noun: str, count: int, tokenizer) -> None:
    print(f"format: {report.format}; showing {min(args.n, count)} of {count} {noun}")
    for note in (report.detection, report.unused_line()):
        if note:
            print(f"({note})")
    if report.skipped:
        print(f"({len(report.skipped)} records skipped as unreadable; `preftune data check` lists them)")
    if tokenizer is None:
        print("(the records as read; pass --model DIR to see them through its chat template, with token counts)")


def _show_pair(pair, tokenizer, args: argparse.Namespace) -> None:
    from ..data.tokenize import tokenize_pair

    print(f"\n=== {pair.where}")
    if tokenizer is None:
        _show_head(pair)
        for name in ("prompt", "chosen", "rejected"):
            print(f"--- {name}\n{_as_text(getattr(pair, name))}")
        return
    tokens = tokenize_pair(tokenizer, pair, max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                           raw_text_prompts=args.raw_text_prompts)
    if tokens is None:
        print(f"(dropped: the prompt alone does not fit in --max-length {args.max_length})")
        return
    for name, cut in zip(("prompt", "chosen", "rejected"), tokens.cut):
        ids = getattr(tokens, f"{name}_ids")
        limit = "--max-prompt-length" if name == "prompt" else "--max-length"
        print(f"--- {name}: {len(ids)} tokens{f' (truncated to fit {limit})' if cut else ''}")
        print(tokenizer.decode(ids, skip_special_tokens=False))


def _show_unpaired(example, tokenizer, args: argparse.Namespace) -> None:
    """One rated answer; with a tokenizer, its prompt and completion ids as a pair's would be (untruncated, with
    a note where --max-length / --max-prompt-length would cut them)."""
    from ..data.tokenize import encode_unpaired

    rating = "desirable" if example.label else "undesirable"
    print(f"\n=== {example.where}")
    if tokenizer is None:
        _show_head(example)
        print(f"--- prompt\n{_as_text(example.prompt)}")
        print(f"--- completion ({rating})\n{_as_text(example.completion)}")
        return
    prompt_ids, answer_ids = encode_unpaired(tokenizer, example, args.raw_text_prompts)  # as training encodes it
    long_prompt = args.max_prompt_length is not None and len(prompt_ids) > args.max_prompt_length
    prompt_kept = min(len(prompt_ids), args.max_prompt_length) if long_prompt else len(prompt_ids)
    print(f"--- prompt: {len(prompt_ids)} tokens{' (longer than --max-prompt-length)' if long_prompt else ''}")
    print(tokenizer.decode(prompt_ids, skip_special_tokens=False))
    long_answer = prompt_kept + len(answer_ids) > args.max_length
    print(f"--- completion ({rating}): {len(answer_ids)} tokens"
          f"{' (would be cut to fit --max-length)' if long_answer else ''}")
    print(tokenizer.decode(answer_ids, skip_special_tokens=False))


def _show_sft(example, tokenizer, args: argparse.Namespace) -> None:
    """One SFT example; with a tokenizer, its prompt and completion as training cuts them, the completion's masked
    turns (not trained) in [masked: ...]."""
    from ..data.tokenize import tokenize_example

    print(f"\n=== {example.where}")
    if tokenizer is None:
        _show_head(example)
        if example.prompt:
            print(f"--- prompt\n{_as_text(example.prompt)}")
        print(f"--- completion\n{_as_text(example.completion)}")
        return
    tokens = tokenize_example(tokenizer, example, max_length=args.max_length,
                              max_prompt_length=args.max_prompt_length, raw_text_prompts=args.raw_text_prompts)
    if tokens is None:
        print(f"(dropped: the prompt alone does not fit in --max-length {args.max_length})")
        return
    whole = tokenize_example(tokenizer, example, max_length=10**9, raw_text_prompts=args.raw_text_prompts)
    cut_prompt, cut_answer = (len(tokens.prompt_ids) < len(whole.prompt_ids),
                              len(tokens.answer_ids) < len(whole.answer_ids))
    print(f"--- prompt: {len(tokens.prompt_ids)} tokens"
          f"{' (truncated to fit --max-prompt-length)' if cut_prompt else ''}")
    print(tokenizer.decode(tokens.prompt_ids, skip_special_tokens=False))
    mask = tokens.answer_mask or [1] * len(tokens.answer_ids)
    print(f"--- completion: {len(tokens.answer_ids)} tokens, {sum(mask)} trained"
          f"{' (truncated to fit --max-length)' if cut_answer else ''}")
    runs: list[tuple[list[int], int]] = []
    for token, trained in zip(tokens.answer_ids, mask):
        if runs and runs[-1][1] == trained:
            runs[-1][0].append(token)
        else:
            runs.append(([token], trained))
    print("".join(text if trained else f"[masked: {text}]"
                  for text, trained in ((tokenizer.decode(ids, skip_special_tokens=False), m) for ids, m in runs)))


def _show_head(record) -> None:
    """What a record gives the template besides its turns: the system prompt, tool schemas, template arguments."""
    if record.system:
        print(f"--- system\n{record.system}")
    if record.tools:
        print(f"--- tools\n{json.dumps(record.tools)}")
    if record.template_kwargs:
        print(f"--- chat_template_kwargs\n{json.dumps(record.template_kwargs)}")


def _as_text(content) -> str:
    """Content as read: text, or one line a turn, its role in front (and a turn marked not to train said so)."""
    if isinstance(content, str):
        return content
    return "\n".join(f"[{turn['role']}{', not trained' if turn.get(NOT_TRAINED) else ''}] {turn['content']}"
                     for turn in content)


def local_tokenizer(path: str) -> Any:
    """The tokenizer of a local model folder: checking data never reaches the network."""
    if not Path(path).is_dir():
        raise ModelError(f"--model {path}: not a folder; pass a local model or tokenizer folder")
    from ..models.load import load_tokenizer

    return load_tokenizer(path)
