"""Tokenisation in worker processes: contiguous slices of the records, each tokenised serially, put back in
order, so the result is the serial one item for item (same ids, same dataset positions, same counts).

Workers send their items back packed (packed.py): a few arrays pickle much faster than many small objects.
The first error, in record order, is the one raised, as in the serial path.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from typing import Sequence

from .packed import concat, kind_of, pack, unpack
from .tokenize import TokenizeStats, tokenize_range

_WORKER: dict = {}  # the tokenizer and options of this worker process
PARALLEL_FROM = 10_000  # records: below this, starting worker processes costs more than it saves


def auto_procs(n_items: int) -> int:
    """Worker processes for `n_items` records: one per usable CPU core (at most 8) from PARALLEL_FROM up."""
    if n_items < PARALLEL_FROM:
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def _start(tokenizer, options: dict) -> None:
    # A forked worker inherits the training process's handlers: its stop is the parent's to decide (Ctrl-C
    # reaches the whole process group), and its SIGTERM, sent by the parent, simply ends it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _WORKER.update(tokenizer=tokenizer, options=options)


def _work(job):
    start, items, kind = job
    out, stats = tokenize_range(_WORKER["tokenizer"], items, start, **_WORKER["options"])
    return pack(out, kind), stats


def tokenize_packed(tokenizer, items: Sequence, procs: int, options: dict):
    """(packed arrays, stats) of `items` tokenised by `procs` worker processes (serially when `procs` is 1)."""
    kind = kind_of(items)
    if procs <= 1 or len(items) < 2:
        out, stats = tokenize_range(tokenizer, items, 0, **options)
        return pack(out, kind), stats
    # A few slices per process, so one slow slice (long records) does not leave the others idle.
    n_jobs = min(len(items), procs * 4)
    bounds = [len(items) * k // n_jobs for k in range(n_jobs + 1)]
    jobs = [(bounds[k], list(items[bounds[k]:bounds[k + 1]]), kind) for k in range(n_jobs)]
    # fork shares the loaded tokenizer without pickling it; elsewhere (macOS, Windows) it is pickled once per worker
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context(method), initializer=_start,
                               initargs=(tokenizer, options))
    try:
        results = list(pool.map(_work, jobs))
    except BaseException:  # an error, Ctrl-C or SIGTERM: stop the workers now, not after every queued slice
        workers = list((getattr(pool, "_processes", None) or {}).values())  # shutdown forgets them
        for process in workers:
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    stats = TokenizeStats(total=len(items))
    for _, part in results:
        stats.truncated += part.truncated
        stats.dropped += part.dropped
    return concat([arrays for arrays, _ in results]), stats


def tokenize_parallel(tokenizer, items: Sequence, procs: int, options: dict):
    """(tokenized items, stats), as `tokenize_all` returns them, from `procs` worker processes."""
    arrays, stats = tokenize_packed(tokenizer, items, procs, options)
    return unpack(arrays, kind_of(items)), stats
