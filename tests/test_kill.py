"""Stops from outside: SIGTERM finishes the step and checkpoints; SIGKILL at any moment loses nothing that a
resume cannot redo exactly."""

from __future__ import annotations

import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tinylm import fact_pairs, write_jsonl
from preftune.training import loop as train
from test_resume import assert_same_run, config, stop_at

SRC = Path(__file__).resolve().parents[1] / "src"
PAUSED_CLI = Path(__file__).resolve().parent / "paused_cli.py"  # `preftune`, pausing before each manifest


def wait_for(condition, proc: subprocess.Popen, timeout: float = 60.0) -> bool:
    """Poll until `condition()` holds (True) or the process has exited (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    raise AssertionError("the training process made no progress")


def checkpoint_steps(out: Path) -> list[int]:
    root = out / "checkpoints"
    return sorted(int(p.name[5:]) for p in root.glob("step-*")) if root.is_dir() else []


def unfinished_writes(out: Path) -> set[Path]:
    return set((out / "checkpoints").glob(".tmp-*"))


def test_sigterm_then_sigkills_at_random_moments_still_end_like_an_uninterrupted_run(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "pairs.jsonl", fact_pairs(24))
    steps = 8
    train.run(config(tiny_model_dir, data, tmp_path / "whole", max_steps=steps), command="preftune")

    out = tmp_path / "killed"
    args = ["dpo", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(out),
            "--max-steps", str(steps), "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "2",
            "--max-length", "64", "--device", "cpu", "--dtype", "float32", "--seed", "3", "--quiet",
            "--save-every", "1", "--keep-checkpoints", "2", "--resume"]
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    rng = random.Random(1234)
    plan = ["sigterm", "kill-mid-write", "kill-anytime", "kill-mid-write", "kill-anytime"]
    hit_mid_write = 0
    for launch in range(len(plan) + 3):
        proc = subprocess.Popen([sys.executable, str(PAUSED_CLI), "0.15", *args], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        how = plan[launch] if launch < len(plan) else "none"
        done_before = checkpoint_steps(out)[-1:] or [0]
        stale = unfinished_writes(out)  # left by the last kill; the new process removes them
        in_flight = lambda: bool(unfinished_writes(out) - stale)  # noqa: E731
        if how == "sigterm":
            assert wait_for(lambda: checkpoint_steps(out), proc)
            proc.send_signal(signal.SIGTERM)
            stdout, stderr = proc.communicate(timeout=60)
            assert proc.returncode == 0, stderr
            assert stdout.strip().splitlines()[-1].endswith("Resume with: " + shlex.join(["preftune", *args]))
            continue
        if how == "kill-mid-write" and wait_for(in_flight, proc):
            time.sleep(rng.uniform(0, 0.15))
            hit_mid_write += in_flight()
            proc.kill()
        elif how == "kill-anytime" and wait_for(lambda: (checkpoint_steps(out)[-1:] or [0]) > done_before, proc):
            time.sleep(rng.uniform(0, 0.4))
            proc.kill()
        stdout, stderr = proc.communicate(timeout=60)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, stderr
    assert proc.returncode == 0 and (out / "results.json").exists(), stderr
    assert hit_mid_write >= 1
    assert not list((out / "checkpoints").glob(".*")), "leftovers of interrupted writes"
    assert_same_run(tmp_path / "whole", out)


def test_a_second_signal_aborts_at_once(tmp_path, tiny_model_dir, monkeypatch):
    data = write_jsonl(tmp_path / "pairs.jsonl", fact_pairs(16))
    calls = stop_at(monkeypatch, 2, signal.SIGINT, times=2)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train.run(config(tiny_model_dir, data, out, max_steps=4), command="preftune")
    assert calls["n"] == 2 and not (out / "checkpoints").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back


def test_sigint_stops_like_sigterm(tmp_path, tiny_model_dir, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", fact_pairs(16))
    stop_at(monkeypatch, 2, signal.SIGINT)
    out = tmp_path / "run"
    result = train.run(config(tiny_model_dir, data, out, max_steps=4), command="preftune dpo --overwrite")
    assert result == {"stopped_at_step": 2}
    assert (out / "checkpoints" / "step-00000002" / "manifest.json").exists()
    assert "Resume with: preftune dpo --resume" in capsys.readouterr().out


@pytest.mark.parametrize("during", ["last step", "final write"])
def test_a_signal_after_the_last_step_began_lets_the_run_finish(tmp_path, tiny_model_dir, monkeypatch, capfd,
                                                                  during):
    """A preemption notice that comes once no checkpoint follows (the last step, the final model's write) must
    not kill the run there: the run finishes and its model is whole; before, the write died half-done."""
    from preftune.training import run_dir

    data = write_jsonl(tmp_path / "pairs.jsonl", fact_pairs(16))
    if during == "last step":
        stop_at(monkeypatch, 4, signal.SIGINT)
    else:
        real = run_dir.save_model

        def signalled_save(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGINT)  # Python's own SIGINT handler would raise KeyboardInterrupt here
            return real(*args, **kwargs)

        monkeypatch.setattr(run_dir, "save_model", signalled_save)
    out = tmp_path / "run"
    result = train.run(config(tiny_model_dir, data, out, max_steps=4), command="preftune dpo")
    assert "stopped_at_step" not in result and result["step"] == 4
    assert (out / "results.json").is_file() and (out / "model.safetensors").is_file()
    assert "SIGINT received; finishing the run and writing its final model" in capfd.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


TERM_IN_TOKENISATION = """
import os, signal, sys, time
from pathlib import Path
from preftune.data import parallel
from preftune.cli import main

pids = Path(sys.argv[1])
real = parallel._work


def work(job):  # each worker notes its pid; the first slice signals the training process, as a scheduler would
    with open(pids, "a") as f:
        f.write(f"{os.getpid()}\\n")
    if job[0] == 0:
        os.kill(os.getppid(), signal.SIGTERM)
    time.sleep(30)  # the workers would otherwise outlive the process that waits for them
    return real(job)


parallel._work = work
sys.exit(main(sys.argv[2:]))
"""


def test_sigterm_before_the_first_step_stops_the_run_and_its_tokenising_workers(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "pairs.jsonl", fact_pairs(24))
    out, pids = tmp_path / "run", tmp_path / "pids"
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", TERM_IN_TOKENISATION, str(pids), "dpo", "--model",
                           str(tiny_model_dir), "--data", str(data), "--output-dir", str(out), "--max-steps", "2",
                           "--batch-size", "4", "--tokenize-procs", "2", "--no-token-cache", "--device", "cpu"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "SIGTERM received before the first step; stopped" in proc.stderr and "Traceback" not in proc.stderr
    assert time.monotonic() - start < 25  # the sleeping workers were stopped, not waited for
    assert not out.exists()  # nothing left that would block the rerun: no run files, no lock
    workers = {int(p) for p in pids.read_text().split()}
    assert workers
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in workers)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


TERM_IN_MEMORY = """
import os, signal, sys
import preftune
from tinylm import fact_pairs


def term_at_2(row):  # a scheduler's SIGTERM arrives mid-run
    if row.get("step") == 2:
        os.kill(os.getpid(), signal.SIGTERM)


preftune.train("dpo", model=sys.argv[1], data=fact_pairs(8), max_steps=1000, batch_size=4, device="cpu",
               callbacks=[term_at_2])
print("the script went on")
"""


def test_sigterm_during_a_run_in_memory_stops_the_process(tmp_path, tiny_model_dir):
    """In memory there is no checkpoint to write, yet SIGTERM was taken as a request to stop after the step: the
    call returned as if finished and the caller's script went on, its process never terminated."""
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(tests), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", TERM_IN_MEMORY, str(tiny_model_dir)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    assert "the script went on" not in proc.stdout


def test_a_worker_forked_before_it_sets_its_handlers_dies_of_sigterm_quietly():
    """A SIGTERM to the process group could reach a tokenising worker between its fork and its own handlers: it
    ran the parent's handler, raising Terminated there ("Process ForkProcess-2: Traceback ...") or printing a
    second "received" line. In a forked child the handlers now do what the signal does by default (a worker
    ignores Ctrl-C, which its parent handles)."""
    from preftune.training.signals import StopOnSignal, terminated_as_interrupt

    def child_status(signum):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os.kill(os.getpid(), signum)
            os._exit(7)
        return os.waitpid(pid, 0)[1]

    with terminated_as_interrupt():
        status = child_status(signal.SIGTERM)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    stop = StopOnSignal()
    with stop:
        status = child_status(signal.SIGTERM)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
        assert os.waitstatus_to_exitcode(child_status(signal.SIGINT)) == 7  # ignored, so it went on
    assert stop.signum is None  # the parent was not signalled


def test_a_signal_taken_by_a_run_inside_a_run_reaches_the_outer_one():
    """An online round's DPO run took a SIGINT in its last step, finished the round, and the online run went on
    through every remaining round."""
    import os
    import signal
    import time

    from preftune.training.signals import StopOnSignal

    with StopOnSignal() as outer:
        with StopOnSignal() as inner:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs between bytecodes
        assert inner.signum == signal.SIGTERM
    assert outer.signum == signal.SIGTERM
