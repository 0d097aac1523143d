"""Run several `preftune` command lines one after another in each process of a single torchrun launch.

Usage: torchrun --nproc-per-node 2 tests/dist_worker.py '[["dpo", "--model", ...], ["sft", ...]]'
One launch pays the interpreter and import start-up once for all the runs a test module compares. The
process group is joined once here and kept across the runs (joining again in one process can hang).
"""

import json
import sys

import torch.distributed as dist

from preftune.cli import main

if __name__ == "__main__":
    dist.init_process_group(backend="gloo")
    try:
        for cli_args in json.loads(sys.argv[1]):
            code = main(cli_args)
            if code:
                sys.exit(code)
    finally:
        dist.destroy_process_group()
