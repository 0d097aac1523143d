"""Reference log-probs computed once and kept on disk, so a sweep over beta or losses pays for them once.

A table is stored as `<cache dir>/<key>.safetensors` holding `logps` [rows, k] float32, where row `i` belongs to
the record at dataset position `i` (rows of records dropped by tokenisation are NaN). The key hashes everything
the numbers depend on: the reference weights (file bytes), every token id of the data, and the settings that
shaped them (lengths, dtype). Anything else changed gives another key, never a stale table.
"""

from __future__ import annotations

import gc
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import ModelError
from ..io import atomic_write_bytes, atomic_write_json, file_sha256, user_cache_dir

FORMAT = 1
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
CONFIG_FILES = ("config.json", "adapter_config.json")
_DIGESTS = "file-digests.json"  # memo of (path, size, mtime) -> sha256, so a large model is hashed once


def default_cache_dir() -> Path | None:
    """`$XDG_CACHE_HOME/preftune/ref`, or `~/.cache/preftune/ref`; None without a home directory."""
    return user_cache_dir("ref")


def _file_digest(path: Path, memo: dict) -> str:
    stat = path.stat()
    memo_key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    if memo_key not in memo:
        memo[memo_key] = file_sha256(path)
    return memo[memo_key]


def _model_folder(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    try:  # a Hub id: the files the run is about to load anyway
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, allow_patterns=["*.json", *(f"*{s}" for s in WEIGHT_SUFFIXES)]))
    except Exception as exc:
        raise ModelError(f"--precompute-ref: cannot read the weights of {name_or_path} to key the cache "
                         f"({str(exc).splitlines()[0]})") from None


def weights_digest(name_or_path: str, memo: dict | None = None) -> str:
    """sha256 over the names and bytes of a model folder's weight and config files (an adapter's base too)."""
    memo = {} if memo is None else memo
    folder = _model_folder(name_or_path)
    h = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name in CONFIG_FILES))
    if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
        raise ModelError(f"--precompute-ref: no weight files in {folder}")
    for p in files:
        h.update(p.name.encode())
        h.update(_file_digest(p, memo).encode())
    adapter = folder / "adapter_config.json"
    if adapter.is_file():
        base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        if base:
            h.update(weights_digest(base, memo).encode())
    return h.hexdigest()


def data_digest(items) -> str:
    """sha256 over every dataset position and token id of tokenised items (their prompt and answers), in order."""
    from ..data.batching import answers_of

    h = hashlib.sha256()
    for it in items:
        ids = [it.index, len(it.prompt_ids), *it.prompt_ids, -1]
        for j, answer in enumerate(answers_of(it)):  # pairs: -1 chosen -2 rejected -3, as before
            ids += [*answer, -(j + 2)]
        h.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


def cache_key(weights: str, items, settings: dict) -> str:
    blob = json.dumps({"format": FORMAT, "weights": weights, "data": data_digest(items), "settings": settings},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def save_table(path: Path, table: torch.Tensor, meta: dict[str, str]) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save({"logps": table.contiguous()}, metadata=meta))


def load_table(path: Path, items) -> torch.Tensor | None:
    """The stored table if it is readable and covers every item; None otherwise (it is then recomputed)."""
    from safetensors.torch import load_file

    try:
        table = load_file(str(path))["logps"]
    except Exception:
        return None
    need = max((it.index for it in items), default=-1) + 1
    if table.ndim != 2 or table.shape[0] < need or torch.isnan(table[[it.index for it in items]]).any():
        return None
    return table


def compute_table(model, items, *, pad_id: int, device, batch_size: int, prefix_sharing: bool,
                  chunk_size: int, trim_padding: bool = True, packing: bool = True) -> torch.Tensor:
    """[rows, k] reference log-probs by dataset position; NaN where no item has that position."""
    from ..metrics import logps_table

    # Similar lengths together: little padding on any device. Rows go back to their positions below.
    from ..data.batching import example_length

    order = sorted(items, key=example_length)
    values = logps_table(model, order, pad_id=pad_id, device=device, batch_size=batch_size,
                         prefix_sharing=prefix_sharing, chunk_size=chunk_size, trim_padding=trim_padding,
                         packing=packing)
    table = torch.full((max(it.index for it in items) + 1, values.shape[1]), float("nan"))
    table[[it.index for it in order]] = values
    return table


@dataclass
class CacheRequest:
    """One set of tokenised pairs whose reference log-probs are wanted."""

    name: str      # shown in messages: "train", "eval"
    items: list


def cached_tables(requests: list[CacheRequest], *, reference: str, settings: dict, cache_dir: Path,
                  load_model: Callable[[], torch.nn.Module], compute: Callable[[torch.nn.Module, list], torch.Tensor],
                  is_main: bool = True, barrier: Callable[[], None] = lambda: None) -> tuple[dict, list[str]]:
    """({name: table}, one message per table). The reference model is loaded only if some table is missing, and
    freed before returning. Under torchrun every rank takes part in `compute` (it may split the work); the
    main process writes the files."""
    cache_dir = Path(cache_dir)
    memo_path = cache_dir / _DIGESTS
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    known = len(memo)
    weights = weights_digest(reference, memo)
    paths = {r.name: cache_dir / f"{cache_key(weights, r.items, settings)}.safetensors" for r in requests}
    tables = {r.name: load_table(paths[r.name], r.items) for r in requests if r.items}
    messages = [f"reference log-probs ({name}): reused {paths[name]}" for name, t in tables.items() if t is not None]
    missing = [r for r in requests if r.items and tables[r.name] is None]
    barrier()  # every rank has looked before the main process writes anything
    if missing:
        model = load_model()
        try:
            for r in missing:
                start = time.perf_counter()
                tables[r.name] = compute(model, r.items)
                if is_main:
                    save_table(paths[r.name], tables[r.name], {"reference": reference, "pairs": str(len(r.items)),
                                                              "format": str(FORMAT)})
                messages.append(f"reference log-probs ({r.name}): computed for {len(r.items)} pairs in "
                                f"{time.perf_counter() - start:.1f}s, saved to {paths[r.name]}")
        finally:
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    if is_main and len(memo) != known:
        atomic_write_json(memo_path, memo)
    return tables, messages
