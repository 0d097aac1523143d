"""Flags that several commands take, declared once: which models to load and how, and where pairs come from."""

from __future__ import annotations

import argparse


def add_model_flags(parser: argparse.ArgumentParser, *, reference: bool = True,
                    model_help: str = "Model folder or Hub id.") -> None:
    """--model (required), --tokenizer and, with `reference`, --ref-model, and how to load them: --device,
    --dtype, --trust-remote-code."""
    parser.add_argument("--model", required=True, help=model_help)
    parser.add_argument("--tokenizer", help="Tokenizer folder or Hub id, when --model has none (default: --model's).")
    if reference:
        parser.add_argument("--ref-model", help="Reference model (folder or Hub id), compared with --model.")
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda or mps "
                                                         "(default: %(default)s).")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (bfloat16 on GPUs that "
                                                        "have it, else float32) (default: %(default)s).")
    parser.add_argument("--trust-remote-code", action="store_true", help="Allow model code from the folder or Hub "
                                                                         "to run.")


def add_data_flags(parser: argparse.ArgumentParser, *, required: bool, help: str) -> None:
    """--data and how to read it: --data-format, --split."""
    parser.add_argument("--data", required=required, help=help)
    parser.add_argument("--data-format", help="Force a data format instead of detecting it.")
    parser.add_argument("--split", default="train", help="Split of a saved dataset or Hub id (default: %(default)s).")


def checked_output(args: argparse.Namespace):
    """`--output` as a Path, checked before any work: not a folder, in a folder that can be made and written, and
    never the `--data` file it is computed from (writing the rows there would replace the data). None when not
    given."""
    import os
    from pathlib import Path

    from ..errors import ConfigError

    if not args.output:
        return None
    out = Path(args.output)
    if out.is_dir():
        raise ConfigError(f"--output {out}: is a folder; give a file name (rows.jsonl)")
    folder = next(p for p in out.absolute().parents if p.exists())  # the root always exists
    if not folder.is_dir():
        raise ConfigError(f"--output {out}: {folder} is a file, not a folder; give a path in a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"--output {out}: cannot write in {folder}; give a path in a folder you can write")
    data = Path(args.data) if getattr(args, "data", None) else None  # generate may take --prompt instead
    if out.exists() and data is not None and data.exists() and out.resolve() == data.resolve():
        raise ConfigError(f"--output {out}: is the --data file; writing the rows there would replace the data, so "
                          f"give another file name")
    return out


def say_cut(what: str, dropped: int, truncated: int, args: argparse.Namespace) -> None:
    """One line on stderr when the command left items out or cut them to fit --max-length (its JSON summary
    counts them too, where a reader may not look)."""
    import sys

    if dropped or truncated:
        print(f"preftune: {dropped} {what} left out (the prompt alone does not fit --max-length {args.max_length}) "
              f"and {truncated} truncated to fit; raise --max-length, or --max-prompt-length to cut prompts",
              file=sys.stderr)
