"""Run several `preftune` command lines one after another in each process of a single torchrun launch.

Usage: torchrun --nproc-per-node 2 tests/dist_worker.py '[["dpo", "--model", ...], ["sft", ...]]'
An entry may also be {"args": [...], "sigterm_at_step": K}: rank 0 then sends itself SIGTERM during step K,
as a cluster does before it preempts a job, and the run must stop cleanly on every rank.
One launch pays the interpreter and import start-up once for all the runs a test module compares. The
process group is joined once here and kept across the runs (joining again in one process can hang).
"""

import json
import os
import signal
import sys

import torch.distributed as dist

from preftune.cli import main
from preftune.training import loop as train


def signalled_at(step: int):
    """train.train_step that, on rank 0, signals this process when step `step` starts."""
    real, calls = train.train_step, {"n": 0}

    def step_fn(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step and dist.get_rank() == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    return step_fn


if __name__ == "__main__":
    dist.init_process_group(backend="gloo")
    real_step = train.train_step
    try:
        for entry in json.loads(sys.argv[1]):
            spec = entry if isinstance(entry, dict) else {"args": entry}
            train.train_step = signalled_at(spec["sigterm_at_step"]) if "sigterm_at_step" in spec else real_step
            code = main(spec["args"])
            if code:
                sys.exit(code)
    finally:
        train.train_step = real_step
        dist.destroy_process_group()
