"""The `preftune` command, with every checkpoint write held open for a while before its manifest is written,
so a test can kill the process in the middle of a write. The pause is patched in from here: the library
itself has no hook for it.

Usage: python tests/paused_cli.py SECONDS ARGS...   (ARGS as for `preftune`)
"""

import sys
import time

from preftune.cli import main
from preftune.training import checkpoint

if __name__ == "__main__":
    pause = float(sys.argv.pop(1))  # what is left is the command line a resume message repeats
    write = checkpoint.atomic_write_json

    def paused_write(path, value):
        if path.name == checkpoint.MANIFEST:  # every other file of the checkpoint is written and fsynced
            time.sleep(pause)
        write(path, value)

    checkpoint.atomic_write_json = paused_write
    raise SystemExit(main())
