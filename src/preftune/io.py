"""Files written so that a crash never leaves a half-written one (write beside, fsync, rename into place), and
files read back to check them.

Files get the permissions of any other program's files (0666 less the umask): a temporary file is created 0600,
and renaming it into place would otherwise leave weights and results unreadable to a teammate or a server.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, default_file_mode())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def default_file_mode() -> int:
    """0666 less the process's umask: the mode `open(path, "w")` gives a new file."""
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return 0o666 & ~mask


def follow_umask(folder: Path) -> None:
    """Give the files directly in `folder` the default mode; for libraries (safetensors) that write them 0600."""
    mode = default_file_mode()
    for path in Path(folder).iterdir():
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def append_jsonl(path: Path, row: dict) -> None:
    """Append one line and flush it to disk: a metrics file survives a kill up to its last whole line."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def absolute_if_local(name: str) -> str:
    """`name` as an absolute path when it names something on this machine; a Hub id (or nothing) as it is.

    Inputs are loaded and written so (a model's recorded `name_or_path`, which peft writes into an adapter's config
    as its base; the run's config.yaml) that they are found again from any folder. `..` is kept: through a
    symbolic link it is not textual."""
    if not name or not Path(name).expanduser().exists():
        return name
    return str(Path(name).expanduser().absolute())


def user_cache_dir(name: str) -> Path | None:
    """`$XDG_CACHE_HOME/preftune/NAME`, or `~/.cache/preftune/NAME`; None when neither can be had (no
    XDG_CACHE_HOME, no HOME, and a user id without a passwd entry, as in a container started with --user)."""
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = str(Path.home() / ".cache")
        except (RuntimeError, KeyError):
            return None
    return Path(base) / "preftune" / name


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read a block at a time (model weights can be larger than memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def reported_if_disk_full(folder: Path, what: str):
    """Writes inside: a full disk (or quota) becomes one `PreftuneError` naming `what` and `folder`, whatever
    layer noticed it (an OSError, torch.save's RuntimeError, safetensors' own error). Other failures pass."""
    from .errors import PreftuneError

    try:
        yield
    except Exception as exc:  # noqa: BLE001 - told apart below: only a full disk is reworded
        full = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left" in str(exc)
        if not full:
            try:
                full = shutil.disk_usage(folder).free < 1 << 20
            except OSError:
                full = False
        if not full:
            raise
        raise PreftuneError(f"{what}: cannot be written to {folder}: no space left on the device; free some space "
                            f"(or choose another --output-dir) and run again; --resume continues from the last "
                            f"checkpoint, if one was written") from None
