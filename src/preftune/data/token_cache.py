"""Tokenised data kept on disk, so a second run, or a sweep over beta or losses, starts without tokenising again.

An entry is `<cache dir>/<key>.safetensors` holding the packed items (packed.py) and, in its metadata, the
counts and a sha256 of the arrays. The key hashes everything the ids depend on: the tokenizer's content (its
vocabulary, merges, normaliser, special tokens and chat template; not its path), the bytes of the data file,
every setting that shapes the result (format, split, lengths, template flags, which part of a split), and the
versions of preftune, transformers and tokenizers. Any of them changed gives another key, never a stale entry.

An entry that cannot be read, whose metadata or checksum disagree, or whose counts do not match the records is
ignored and rebuilt. Entries are written atomically (io.py), so a crash leaves none half-written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..io import atomic_write_bytes, file_sha256, user_cache_dir
from .packed import ARRAYS, kind_of, unpack
from .parallel import auto_procs, tokenize_packed
from .tokenize import TokenizeStats

log = logging.getLogger("preftune")

FORMAT = 11  # bump when tokenisation or the layout of an entry changes what a key stands for


def default_cache_dir() -> Path | None:
    """`$XDG_CACHE_HOME/preftune/tokenized`, or `~/.cache/preftune/tokenized`; None without a home directory."""
    return user_cache_dir("tokenized")


def tokenizer_digest(tokenizer) -> str | None:
    """sha256 of what decides a tokenizer's ids: the whole fast tokenizer (vocabulary, merges, normaliser,
    pre- and post-processor, added tokens), its special tokens and its chat template. None for a tokenizer
    without a fast backend (not cached)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    h = hashlib.sha256(backend.to_str().encode())
    extra = {"class": type(tokenizer).__name__, "chat_template": getattr(tokenizer, "chat_template", None),
             "special": {name: str(getattr(tokenizer, name, None))
                         for name in ("bos_token", "eos_token", "pad_token", "unk_token")},
             "ids": [tokenizer.bos_token_id, tokenizer.eos_token_id],
             "add": [getattr(tokenizer, "add_bos_token", None), getattr(tokenizer, "add_eos_token", None)]}
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def source_digest(source) -> str | None:
    """sha256 of a local data file's bytes, or of a local folder's file names and bytes; None for anything
    else (a Hub id, records in memory), which is not cached."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    path = Path(source).expanduser()
    if path.is_file():
        return file_sha256(path)
    if path.is_dir():
        h = hashlib.sha256()
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            h.update(str(p.relative_to(path)).encode())
            h.update(file_sha256(p).encode())
        return h.hexdigest()
    return None


def _versions() -> dict[str, str]:
    import tokenizers
    import transformers

    from ..version import __version__

    return {"preftune": __version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


def cache_key(tokenizer: str, data: str, settings: dict) -> str:
    blob = json.dumps({"format": FORMAT, "tokenizer": tokenizer, "data": data, "settings": settings,
                       "versions": _versions()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _arrays_digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in ARRAYS:
        h.update(name.encode())
        h.update(np.ascontiguousarray(arrays[name]).tobytes())
    return h.hexdigest()


def save_entry(path: Path, arrays: dict[str, np.ndarray], stats: TokenizeStats, kind: str, key: str) -> None:
    from safetensors.numpy import save

    meta = {"format": str(FORMAT), "key": key, "kind": kind, "stats": json.dumps(stats.as_dict()),
            "sha256": _arrays_digest(arrays)}
    atomic_write_bytes(path, save({name: np.ascontiguousarray(arrays[name]) for name in ARRAYS}, metadata=meta))


def load_entry(path: Path, *, kind: str, key: str, total: int):
    """(items, stats) from the entry at `path`, or None if it is missing or not exactly what was stored."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            meta = handle.metadata() or {}
            arrays = {name: handle.get_tensor(name) for name in ARRAYS}
        stats = TokenizeStats(**json.loads(meta["stats"]))
    except Exception:  # missing, truncated, or not an entry at all
        return None
    if (meta.get("format") != str(FORMAT) or meta.get("key") != key or meta.get("kind") != kind
            or meta.get("sha256") != _arrays_digest(arrays) or stats.total != total):
        return None
    lengths, index = arrays["lengths"], arrays["index"]
    n = len(index)
    if (lengths.shape != (n, 3) or arrays["flags"].shape != (n, 3) or n + stats.dropped != total
            or int(np.clip(lengths, 0, None).sum()) != len(arrays["ids"])
            or (n and (index[0] < 0 or index[-1] >= total or (np.diff(index) <= 0).any()))):
        return None
    return unpack(arrays, kind), stats


def tokenize_cached(tokenizer, records: list, *, source, settings: dict, options: dict, procs: int = 0,
                    cache_dir: Path | None = None, is_main: bool = True,
                    barrier: Callable[[], None] = lambda: None):
    """(items, stats, message) for `records`, read from `source` with the loading `settings` and tokenised
    with `options` (as `tokenize_all` takes them) by `procs` processes (0: `auto_procs`).

    With a `cache_dir`, a matching entry is read instead of tokenising, and a new one written. Under torchrun
    the main process tokenises and writes while the others wait at `barrier` and then read; a rank that cannot
    read the entry (a cache folder not shared between machines) tokenises for itself. `message` says what
    happened, or is empty."""
    kind = kind_of(records)
    procs = auto_procs(len(records)) if procs == 0 else procs
    tok_digest = tokenizer_digest(tokenizer) if cache_dir is not None else None
    data_digest = source_digest(source) if tok_digest is not None else None
    if data_digest is None:
        arrays, stats = tokenize_packed(tokenizer, records, procs, options)
        return unpack(arrays, kind), stats, ""
    key = cache_key(tok_digest, data_digest, {**settings, **options})
    path = Path(cache_dir) / f"{key}.safetensors"
    found = load_entry(path, kind=kind, key=key, total=len(records)) if is_main else None
    message = f"tokenized data: reused {path}" if found else ""
    if is_main and found is None:
        start = time.perf_counter()
        arrays, stats = tokenize_packed(tokenizer, records, procs, options)
        try:
            save_entry(path, arrays, stats, kind, key)
            message = (f"tokenized data: {len(records)} records in {time.perf_counter() - start:.1f}s "
                       f"({procs} process{'es' if procs > 1 else ''}), saved to {path}")
        except OSError as exc:
            log.warning(f"tokenized data: cannot write the cache entry {path} ({exc}); the next run tokenises again")
        found = unpack(arrays, kind), stats
    barrier()  # the main process has written the entry before the others look for it
    if not is_main:
        found = load_entry(path, kind=kind, key=key, total=len(records))
        if found is None:
            arrays, stats = tokenize_packed(tokenizer, records, procs, options)
            found = unpack(arrays, kind), stats
    return found[0], found[1], message
