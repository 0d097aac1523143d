"""Run `python -m preftune` the way a user does: a fresh process, umask 022, no network, from a folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def user_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1", **extra}
    env.pop("COLUMNS", None)
    return env


def run_cli(*args: str, cwd: Path, timeout: float = 600, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "preftune", *args], cwd=cwd, env=user_env(**extra_env),
                          capture_output=True, text=True, timeout=timeout, preexec_fn=lambda: os.umask(0o022))


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, exactly one line on stderr holding every needle, no traceback; returns that line."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
