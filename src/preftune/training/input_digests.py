"""What a checkpoint records of the files its run read, so that a resume on other inputs is refused.

- `--data`: the sha256 of the file's bytes as the run read them (`pin`), even if the file is edited while the run
  trains.
- `--model`, `--ref-model`, `--tokenizer` when they are local folders: a fingerprint of their model and tokenizer
  files, each file's size and a hash of bytes sampled across it. Resuming reloads the reference and the tokenizer
  from these folders (and, under LoRA, the frozen base), so a folder rewritten since (an SFT run redone into the
  same place) would change the numbers without a word. Sampling keeps this instant for large models; retrained
  weights differ almost everywhere, so it sees them. A Hub id is not fingerprinted.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..config import TrainConfig
from ..io import file_sha256
from .run_dir import MODEL_FILE

FOLDER_INPUTS = ("model", "ref_model", "tokenizer")
_WHOLE = 4 << 20      # files up to this size are hashed whole
_HEAD = 1 << 20       # of larger ones: the first MiB (a safetensors header and more), the last 64 KiB and
_SAMPLES = 32         # this many 4 KiB blocks spread evenly between
_BLOCK = 4 << 10

_DIGESTS: dict[tuple, str] = {}  # data digests by (path, size, mtime): a file version is hashed once
_PINNED: dict[str, dict] = {}    # what the run read, by the config's input paths


def data_digest(cfg: TrainConfig) -> str:
    """sha256 of the --data file's bytes now (a local file; else ""), computed once per file version."""
    path = Path(str(cfg.data)) if cfg.data else None
    if path is None or not path.is_file():
        return ""
    info = path.stat()
    key = (str(path.resolve()), info.st_size, info.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = file_sha256(path)
    return _DIGESTS[key]


def _sampled_sha256(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        if size <= _WHOLE:
            h.update(handle.read())
            return h.hexdigest()
        h.update(handle.read(_HEAD))
        span = size - _HEAD - (64 << 10)
        for i in range(_SAMPLES):
            handle.seek(_HEAD + span * i // _SAMPLES)
            h.update(handle.read(_BLOCK))
        handle.seek(size - (64 << 10))
        h.update(handle.read())
    return h.hexdigest()


def folder_fingerprint(name_or_path: str | None) -> dict[str, str]:
    """{file name: "size:sampled sha256"} over a local folder's model and tokenizer files (with an adapter's
    base folder under "base/"); {} for a Hub id, a placeholder or nothing."""
    path = Path(str(name_or_path)).expanduser() if name_or_path else None
    if path is None or not path.is_dir():
        return {}
    out = {}
    for p in sorted(path.iterdir()):
        if p.is_file() and MODEL_FILE.match(p.name):
            size = p.stat().st_size
            out[p.name] = f"{size}:{_sampled_sha256(p, size)}"
    adapter = path / "adapter_config.json"
    if adapter.is_file():
        try:
            base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            base = None
        if isinstance(base, str):
            out.update({f"base/{k}": v for k, v in folder_fingerprint(base).items()})
    return out


def _now(cfg: TrainConfig) -> dict:
    return {"data_sha256": data_digest(cfg),
            "folders": {name: folder_fingerprint(getattr(cfg, name)) for name in FOLDER_INPUTS}}


def pin(cfg: TrainConfig) -> None:
    """Take the inputs' digests as the run reads them, so that its checkpoints record what it trained on even if
    a file is edited while it runs (a resume then compares the files with those)."""
    _PINNED[_key(cfg)] = _now(cfg)


def _key(cfg: TrainConfig) -> str:
    return json.dumps([str(getattr(cfg, name)) for name in ("data", *FOLDER_INPUTS)])


def recorded(cfg: TrainConfig) -> dict:
    """What a checkpoint records: the pinned digests, or today's for a run that pinned none."""
    return _PINNED.get(_key(cfg)) or _now(cfg)


def changed(saved: dict, cfg: TrainConfig) -> str | None:
    """None when the inputs match what a checkpoint recorded (`saved`: its trainer state), else what differs.
    Checkpoints written before an input was recorded do not hold it, and it is not compared."""
    flag = {"model": "--model", "ref_model": "--ref-model", "tokenizer": "--tokenizer"}
    if saved.get("data_sha256") and saved["data_sha256"] != data_digest(cfg):
        return f"other contents of --data {cfg.data} (the file has changed since)"
    for name, before in (saved.get("folders") or {}).items():
        if not before:
            continue
        now = folder_fingerprint(getattr(cfg, name, None))
        if not now:
            continue  # the folder is gone or now a Hub id: loading it says what is wrong
        differ = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
        if differ:
            shown = ", ".join(differ[:4]) + (f" and {len(differ) - 4} more" if len(differ) > 4 else "")
            return (f"other files in {flag[name]} {getattr(cfg, name)} ({shown} changed since; was the model "
                    f"rewritten?)")
    return None
