"""Stop cleanly on SIGTERM or SIGINT: the loop finishes its step, writes a checkpoint and exits 0. Once the last
step is done, a signal lets the final model be written whole instead (a preempted job loses nothing).

Clusters send SIGTERM before they preempt a job, and people press Ctrl-C; either should cost at most one step.
A second signal aborts at once (KeyboardInterrupt), for when the clean stop itself is too slow.
"""

from __future__ import annotations

import os
import shlex
import signal
import threading
from contextlib import contextmanager

import torch

from ..dist.env import DistEnv, all_reduce_sum
from ..errors import Terminated

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnSignal:
    """Context manager; `requested(env)` is true on every rank once any rank has been signalled."""

    def __init__(self, handle_signals: bool = True):
        self.handle_signals = handle_signals  # False: signals do to the process what they would without a run
        self._owner = os.getpid()
        self.signum: int | None = None
        self.asked = False  # a stop asked for by the program itself (a callback), not by a signal
        self.finishing = False  # set once the last step is done: what remains is the final eval and model
        self._previous: dict = {}

    def __enter__(self) -> "StopOnSignal":
        if self.handle_signals and threading.current_thread() is threading.main_thread():  # delivered only there
            self._previous = {s: signal.signal(s, self._handle) for s in _SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
            outer = getattr(handler, "__self__", None)
            if isinstance(outer, StopOnSignal) and outer.signum is None:  # a run inside a run (an online round):
                outer.signum = self.signum  # the signal this one took is the outer run's to stop on too
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if _in_forked_child(self._owner, signum):
            return
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        # os.write, not print: a handler can run while the main code is inside a print to the same stream.
        doing = "finishing the run and writing its final model" if self.finishing else \
            "finishing this step and writing a checkpoint"
        os.write(2, f"preftune: {signal.Signals(signum).name} received; {doing} (send it again to abort now)\n"
                 .encode())

    def request(self) -> None:
        """Stop after this step, as if signalled."""
        self.asked = True

    def requested(self, env: DistEnv) -> bool:
        mine = self.signum is not None or self.asked
        return bool(all_reduce_sum(torch.tensor(float(mine)), env) > 0) if env.enabled else mine


@contextmanager
def terminated_as_interrupt():
    """Within it, SIGTERM raises `Terminated` instead of killing the process where it stands; `StopOnSignal`
    takes over from the first step (it restores this handler when it ends)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    owner = os.getpid()

    def handle(signum, frame):
        if not _in_forked_child(owner, signum):
            raise Terminated()

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _in_forked_child(owner: int, signum: int) -> bool:
    """Whether a handler runs in a process forked from `owner` before that process set handlers of its own (a
    tokenising worker signalled with its parent's process group): there the signal does what it does by default,
    instead of a traceback from a worker or a second "received" line. Returns False in `owner` itself."""
    if os.getpid() == owner:
        return False
    signal.signal(signum, signal.SIG_IGN if signum == signal.SIGINT else signal.SIG_DFL)
    if signum != signal.SIGINT:  # a worker ignores Ctrl-C (the parent stops it); SIGTERM ends it
        os.kill(os.getpid(), signum)
    return True


def resume_command(command: str) -> str:
    """The command that continues a run: the one given, with --resume and without --overwrite."""
    words = [w for w in shlex.split(command) if w not in ("--resume", "--no-resume", "--overwrite")]
    return shlex.join([*words, "--resume"])
