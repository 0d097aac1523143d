"""Checkpoints that survive a kill at any moment, and everything a resumed run needs to continue bit for bit.

A checkpoint is a folder `RUN/checkpoints/step-00000042/` holding

    weights.safetensors   the trainable parameters by name: the whole model, or only the adapters under LoRA
    optimizer.pt          the optimizer's state dict (tensors and numbers only, so it loads with weights_only=True)
    trainer_state.json    step, scheduler, data position, objective state (BCO's running mean), the state of every
                          random generator, how many bytes of metrics.jsonl the run had written by then, and
                          digests of the data file and model folders it read (input_digests)
    config.yaml           the resolved config it was written with
    manifest.json         name, size and sha256 of each file above; written last

It is written into a hidden folder beside the others, every file fsynced, then renamed into place in one step.
A folder whose manifest is missing or does not match its files is never loaded: on resume it is set aside when an
older checkpoint can be used, and resume is refused when none can.

Under FSDP the files are the same: the trained tensors and their optimizer state are gathered whole onto rank 0,
which writes them; on resume rank 0 reads them and broadcasts them into every rank's shards (dist/fsdp.py). So a
checkpoint holds the same files whether one process or several wrote it.

`--resume` continues from the newest complete checkpoint and cuts metrics.jsonl back to that step, so the run
ends exactly as if it had never stopped. With no checkpoint yet it starts from step 0 (saying so), and on a
finished run it does nothing: a job script can pass `--resume` every time it is (re)started. A checkpoint
written with settings that change the computation (another --lr, --beta, data, ...) is refused, and so is one
whose data file or model folders have changed since.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from ..config import TrainConfig, load_yaml_mapping
from ..dist import fsdp
from ..dist.env import DistEnv, all_reduce_sum, barrier
from ..errors import PreftuneError
from ..io import absolute_if_local, atomic_write_json, file_sha256, follow_umask, reported_if_disk_full
from . import input_digests
from .run_dir import CHECKPOINTS as FOLDER, INPUT_PATHS, resolved
from .run_state import (RunState, all_rng_states, gather_optimizer_state, gather_trainable_state,
                        require_finite, set_rng_state)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
WEIGHTS, OPTIMIZER, STATE, CONFIG = "weights.safetensors", "optimizer.pt", "trainer_state.json", "config.yaml"
# How steps are planned: 2 since warmup began at lr 0 (transformers') and an epoch became whole optimizer steps. A
# checkpoint of another plan would go on under this one, matching neither run from its start.
SCHEDULE = 2
_NAME = re.compile(r"^step-(\d{8,})$")
# Settings that may change between a run and its resumption without changing what it computes.
MAY_CHANGE_ON_RESUME = {"output_dir", "resume", "overwrite", "save_every", "keep_checkpoints", "quiet", "log_every",
                        "report_to", "skip_nonfinite", "eval_every", "device", "ref_cache_dir",
                        "tokenize_procs", "token_cache", "token_cache_dir"}


class CheckpointError(PreftuneError):
    """A checkpoint cannot be used: written by another program, for another config, or damaged."""


# ---------------------------------------------------------------------------------------------- weights
def check_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """Refuse saved weights whose names or (whole) shapes are not those of the parameters this run trains."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise CheckpointError(f"{where}: holds weights for other parameters than this run trains (missing "
                              f"{missing[:3]}, unexpected {extra[:3]}); was it written with other --lora-* flags?")
    for name, p in params.items():
        if state[name].shape != p.shape:  # a sharded parameter's shape is its whole shape
            raise CheckpointError(f"{where}: {name} has shape {tuple(state[name].shape)}, the model "
                                  f"{tuple(p.shape)}; was it written for another model?")


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    check_trainable_state(model, state, where)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(state[name])


# ---------------------------------------------------------------------------------------------- writing
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_dir(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / FOLDER / f"step-{step:08d}"


def save(out_dir: Path, state: RunState, cfg: TrainConfig, env: DistEnv, metrics_path: Path) -> Path:
    """Write the checkpoint of `state.step` (rank 0 writes; every rank must call) and keep the newest ones."""
    require_finite(state.model, f"checkpoint at step {state.step}", env)
    weights = gather_trainable_state(state.model, state.sharded)
    optim = gather_optimizer_state(state.optimizer, state.model, state.sharded)
    rngs = all_rng_states(env)
    final = step_dir(out_dir, state.step)
    if env.is_main:
        root = final.parent
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        with reported_if_disk_full(root, f"checkpoint at step {state.step}"):
            try:
                _write(tmp, weights, optim, state, cfg, env, rngs, metrics_path)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)  # the previous checkpoints stay whole
                raise
        if final.exists():  # a damaged folder of the same step from an earlier attempt
            _discard(final)
        os.replace(tmp, final)
        _fsync(root)
        _prune(root, cfg.keep_checkpoints)
    barrier(env)
    return final


def _write(tmp: Path, weights, optim, state: RunState, cfg: TrainConfig, env: DistEnv, rngs, metrics_path: Path):
    """The checkpoint's files, each fsynced, and their manifest, into the hidden folder `tmp`."""
    from safetensors.torch import save_file

    tmp.mkdir()
    save_file(weights, str(tmp / WEIGHTS))
    torch.save(optim, tmp / OPTIMIZER)
    trainer = {"step": state.step, "skipped_steps": state.skipped_steps,
               "scheduler": state.scheduler.state_dict(), "cursor": state.cursor.state_dict(),
               "objective": state.objective.state_dict(), "rng": rngs, "world_size": env.world_size,
               "metrics_bytes": metrics_path.stat().st_size if metrics_path.exists() else 0, "schedule": SCHEDULE,
               **input_digests.recorded(cfg)}
    (tmp / STATE).write_text(json.dumps(trainer))
    (tmp / CONFIG).write_text(yaml.safe_dump(resolved(cfg).to_dict(), sort_keys=False))
    files = [WEIGHTS, OPTIMIZER, STATE, CONFIG]
    follow_umask(tmp)  # safetensors writes weights 0600
    for name in files:
        _fsync(tmp / name)
    manifest = {"step": state.step, "files": {n: {"bytes": (tmp / n).stat().st_size, "sha256": file_sha256(tmp / n)}
                                              for n in files}}
    atomic_write_json(tmp / MANIFEST, manifest)
    _fsync(tmp)


def _discard(folder: Path) -> None:
    """Rename first, so a kill half way through deleting never leaves something that looks like a checkpoint."""
    trash = folder.parent / f".trash-{folder.name}-{os.getpid()}"
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _steps(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every folder named like a checkpoint, newest first; validity is not checked here."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found, reverse=True)


def _prune(root: Path, keep: int) -> None:
    for _, folder in _steps(root)[keep:]:
        _discard(folder)


# ---------------------------------------------------------------------------------------------- reading
def verify(folder: Path) -> str | None:
    """None when the manifest exists and every file matches its size and hash, else what is wrong."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "no readable manifest (the write was interrupted)"
    if set(files) != {WEIGHTS, OPTIMIZER, STATE, CONFIG}:
        return "the manifest lists other files than a checkpoint holds"
    for name, meta in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != meta["bytes"]:
            return f"{name} is missing or has the wrong size"
        if file_sha256(path) != meta["sha256"]:
            return f"{name} does not match its sha256 in the manifest"
    return None


DAMAGED = "damaged-"  # the prefix a damaged checkpoint's folder is set aside under


def _unused_name(root: Path, name: str) -> Path:
    """root/name, or root/name-2, -3, ... when a checkpoint of that step was set aside before."""
    path, n = root / name, 1
    while path.exists():
        n += 1
        path = root / f"{name}-{n}"
    return path


def latest(out_dir: Path, *, clean: bool = True) -> Path | None:
    """The newest complete checkpoint; None when there is none.

    With `clean`, unfinished writes are removed, and damaged checkpoints newer than the one returned are set
    aside (renamed `damaged-step-...`, kept for a look, never loaded or pruned). When checkpoints exist and none
    can be used, `CheckpointError`: starting from step 0 would quietly drop them (a file edited by hand is
    enough), so the user decides."""
    root = Path(out_dir) / FOLDER
    if clean and root.is_dir():
        for leftover in root.glob(".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in root.glob(".trash-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    damaged = []
    for _, folder in _steps(root):
        problem = verify(folder)
        if problem is None:
            for bad, why in damaged:
                if not clean:
                    log.warning("%s: not used, %s", bad, why)
                    continue
                aside = _unused_name(bad.parent, f"{DAMAGED}{bad.name}")
                log.warning("%s: not used, %s; set aside as %s", bad, why, aside.name)
                os.replace(bad, aside)
            return folder
        damaged.append((folder, problem))
    if damaged:
        bad, why = damaged[0]
        raise CheckpointError(f"{bad}: {why}, and no older checkpoint can be used either; restore the file from a "
                              f"copy, or pass --overwrite instead of --resume to start afresh")
    return None


def _load_pickled_tensors(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: refused; it holds pickled Python objects, not only tensors and numbers, "
                              f"and loading it could run arbitrary code. Only checkpoints written by preftune "
                              f"resume ({first})") from None


def check_same_config(folder: Path, cfg: TrainConfig) -> None:
    """Refuse to continue what `folder` (a checkpoint, or a finished run) was written with under other settings."""
    saved = load_yaml_mapping(folder / CONFIG)
    now = resolved(cfg).to_dict()
    for name in INPUT_PATHS:  # written as given before they were written absolute
        if isinstance(saved.get(name), str):
            saved[name] = absolute_if_local(saved[name])
    diffs = [f"{k}={saved[k]!r} then, {now[k]!r} now" for k in now
             if k in saved and k not in MAY_CHANGE_ON_RESUME and saved[k] != now[k]]
    if diffs:
        raise CheckpointError(f"{folder}: was written with other settings ({'; '.join(diffs[:4])}); resume with "
                              f"the same settings, or pass --overwrite instead of --resume to start afresh")


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(folder / WEIGHTS))
    except SafetensorError as exc:
        raise CheckpointError(f"{folder / WEIGHTS}: not a readable safetensors file ({exc})") from None


def _restore_sharded(folder: Path, state: RunState, env: DistEnv) -> None:
    """Rank 0 reads and checks the tensors, then broadcasts them into every rank's shards.

    Only rank 0 holds the whole tensors in memory. A problem it finds is raised on every rank, so none is
    left waiting for a broadcast that never comes.
    """
    weights, optim, problem = {}, {}, None
    if env.is_main:
        try:
            weights = _read_weights(folder)
            check_trainable_state(state.model, weights, folder)
            optim = _load_pickled_tensors(folder / OPTIMIZER)
            saved = [len(g["params"]) for g in optim["param_groups"]]
            now = [len(g["params"]) for g in state.optimizer.param_groups]
            if saved != now:  # a single process would refuse it in optimizer.load_state_dict
                raise CheckpointError(f"{folder / OPTIMIZER}: holds parameter groups of sizes {saved}, this run's "
                                      f"optimizer {now}")
        except CheckpointError as exc:
            problem = str(exc)
    shared = [problem]
    dist.broadcast_object_list(shared, src=0)
    if shared[0] is not None:
        raise CheckpointError(shared[0])
    fsdp.load_full_trainable_state(state.model, weights)
    fsdp.load_full_optimizer_state(state.model, state.optimizer, optim)


def restore(folder: Path, state: RunState, cfg: TrainConfig, env: DistEnv) -> dict:
    """Load a verified checkpoint into `state` (every rank); returns its trainer state."""
    check_same_config(folder, cfg)
    trainer = json.loads((folder / STATE).read_text())
    if trainer.get("schedule", 1) != SCHEDULE:
        raise CheckpointError(f"{folder}: was written by an earlier preftune, whose warmup and epochs ran otherwise "
                              f"(warmup from lr/(W+1); steps across epochs); finish the run with that version, or "
                              f"pass --overwrite instead of --resume to start afresh")
    if (differs := input_digests.changed(trainer, cfg)) is not None:
        raise CheckpointError(f"{folder}: was written with {differs}; resume with the inputs it was written with, "
                              f"or pass --overwrite instead of --resume to start afresh")
    written = trainer.get("world_size", len(trainer["rng"]))
    if written != env.world_size:  # the global batch, and so what each step reads, would change
        raise CheckpointError(f"{folder}: was written by {written} process(es), this run has {env.world_size} (a "
                              f"global batch of {written * cfg.batch_size} then, {env.world_size * cfg.batch_size} "
                              f"now); resume with as many processes (torchrun --nproc-per-node {written}), or pass "
                              f"--overwrite instead of --resume to start afresh")
    if state.sharded:
        _restore_sharded(folder, state, env)
    else:
        load_trainable_state(state.model, _read_weights(folder), folder)
        state.optimizer.load_state_dict(_load_pickled_tensors(folder / OPTIMIZER))
    state.scheduler.load_state_dict(trainer["scheduler"])
    state.cursor.load_state_dict(trainer["cursor"])
    state.objective.load_state_dict(trainer["objective"])
    state.step, state.skipped_steps = trainer["step"], trainer["skipped_steps"]
    set_rng_state(trainer["rng"][env.rank])
    return trainer


def resume(out_dir: Path, state: RunState, cfg: TrainConfig, env: DistEnv, metrics_path: Path) -> str:
    """Continue from the newest complete checkpoint, or from step 0 when there is none. Returns a message.

    The metrics file is cut back to what it held when the checkpoint was written, so rows of steps that will
    run again are not repeated and the file reads as if the run had never stopped.
    """
    # Rank 0 picks (and cleans up); the others learn its step, as step + 1 so that 0 can mean "none" (and -1
    # that none can be used: every rank raises).
    problem, folder = None, None
    if env.is_main:
        try:
            folder = latest(out_dir)
        except (CheckpointError, OSError) as exc:  # every rank must learn of it, or the others wait forever
            problem = exc
    found = int(all_reduce_sum(torch.tensor(-1 if problem else _step_of(folder) + 1 if folder else 0), env))
    if found < 0:
        raise problem or CheckpointError(f"{Path(out_dir) / FOLDER}: no checkpoint can be used (rank 0 says why)")
    if not found:
        if env.is_main:
            metrics_path.unlink(missing_ok=True)
        barrier(env)
        return f"resume: no complete checkpoint in {Path(out_dir) / FOLDER}; starting from step 0"
    folder = step_dir(out_dir, found - 1)
    trainer = restore(folder, state, cfg, env)
    if env.is_main and metrics_path.exists():
        _cut_metrics(metrics_path, trainer["metrics_bytes"])
    barrier(env)
    return f"resume: continuing from step {state.step} ({folder})"


def _cut_metrics(path: Path, written: int) -> None:
    """Cut metrics.jsonl back to the `written` bytes it held at the checkpoint. A file shorter than that (cut by
    hand, or by a disk that lost its end) is cut to its last whole line instead, so that new rows never join a
    partial one, and the loss of rows is said."""
    size = path.stat().st_size
    keep = written
    if size < written:
        with open(path, "rb") as handle:
            data = handle.read()
        keep = data.rfind(b"\n") + 1
        log.warning(f"{path}: shorter than when the checkpoint was written ({size} of {written} bytes); the rows "
                    f"of earlier steps that are missing stay missing")
    with open(path, "r+b") as handle:
        handle.truncate(keep)
        os.fsync(handle.fileno())


def _step_of(folder: Path) -> int:
    return int(_NAME.match(folder.name).group(1))


def check_room(out_dir: Path, model: torch.nn.Module, cfg: TrainConfig) -> None:
    """Fail before training when the disk cannot take one checkpoint and the final weights.

    Estimate: trainable parameter bytes x 3 for a checkpoint (weights + AdamW's two moments), plus the trainable
    bytes once more for the final weights.
    """
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    need = trainable * (4 if cfg.save_every else 1)
    free = shutil.disk_usage(out_dir).free
    if free < need:
        what = "one checkpoint and the final weights" if cfg.save_every else "the final weights"
        raise PreftuneError(f"--output-dir {out_dir}: {free / 1e9:.2f} GB free, but {what} need about "
                            f"{need / 1e9:.2f} GB; free some space or choose another folder")
