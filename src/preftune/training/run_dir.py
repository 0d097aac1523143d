"""The run folder: refuse to clobber a run, check it is writable up front, write what a finished run holds."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path

from ..config import TrainConfig
from ..dist.env import DistEnv, barrier
from ..errors import ConfigError, PreftuneError
from ..inputs import is_peft_model
from ..io import absolute_if_local, atomic_write_json, reported_if_disk_full
from ..models.load import save_model
from ..report.tracking import METRICS_FILE

log = logging.getLogger(__name__)

CONFIG = "config.yaml"
RESULTS = "results.json"
DATA_STATS = "data_stats.json"
CHECKPOINTS = "checkpoints"


def holds_run(out_dir: Path) -> bool:
    return any((out_dir / name).exists() for name in (CONFIG, METRICS_FILE, CHECKPOINTS))


def finished_results(out_dir: Path) -> dict | None:
    """The final metrics of a run that has finished (results.json is written last), else None."""
    try:
        return json.loads((out_dir / RESULTS).read_text())
    except (OSError, ValueError):
        return None


def prepare(out_dir: Path, cfg: TrainConfig, env: DistEnv) -> None:
    """Fail before any work if the folder holds a run (unless asked to overwrite or resume) or is not writable."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--output-dir {out_dir}: exists and is not a folder")
    if holds_run(out_dir) and not (cfg.overwrite or cfg.resume):
        raise ConfigError(f"--output-dir {out_dir}: already holds a run; choose another folder, pass --resume to "
                            f"continue it, or --overwrite to start afresh")
    if (out_dir / "config.json").is_file() and not holds_run(out_dir) and not cfg.overwrite:
        raise ConfigError(f"--output-dir {out_dir}: holds a model (config.json), which the finished run's model "
                            f"would overwrite; choose another folder, or --overwrite to replace it")
    ours = sorted(p.name for p in out_dir.iterdir() if p.is_file() and (p.name in RUN_FILES
                                                                          or WRITTEN_FILE.match(p.name))) \
        if out_dir.is_dir() and not holds_run(out_dir) and not cfg.overwrite else []
    if ours:  # files of the user's own (a README, notes in results.json) that the run would write over; folders
        # (plots/, tensorboard/) are written into, beside what they hold
        shown = ", ".join(ours[:4]) + (f" and {len(ours) - 4} more" if len(ours) > 4 else "")
        raise ConfigError(f"--output-dir {out_dir}: holds {shown}, which the run would write over; choose "
                            f"another folder, or --overwrite to replace them")
    if env.is_main:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            probe = out_dir / ".write-probe"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"--output-dir {out_dir}: cannot write there ({exc.strerror})") from None
    barrier(env)


def clear_previous(out_dir: Path, cfg: TrainConfig, env: DistEnv, kept: set[str]) -> None:
    """With --overwrite, remove the previous run's results and checkpoints: called once the new run's model and
    data have loaded, so a mistake in the new command leaves the old run whole. From then on the run files in
    the folder are this run's (`kept` empties: a failure removes them)."""
    if cfg.overwrite and not cfg.resume:
        if env.is_main:  # old checkpoints must never be resumed into the new run
            remove_outputs(out_dir, ("plots", CHECKPOINTS, "merged", "tensorboard"))
        kept.clear()
        barrier(env)


def remove_outputs(out_dir: Path, folders: tuple[str, ...]) -> None:
    """A previous run's metrics, results and model files, and `folders`, out of `out_dir` (--overwrite). The old
    model goes too: a full run's weights would outlive a LoRA run's adapter, a sharded model's shards a whole
    one, and merged/ the run that merged."""
    if not out_dir.is_dir():
        return
    for path in out_dir.iterdir():
        if path.is_file() and (path.name in (METRICS_FILE, RESULTS) or WRITTEN_FILE.match(path.name)):
            path.unlink(missing_ok=True)
    for name in folders:
        shutil.rmtree(out_dir / name, ignore_errors=True)


# What a run writes at its top level besides the model files (which only a finished run has).
RUN_FILES = (CONFIG, DATA_STATS, METRICS_FILE, RESULTS, "README.md", "plots", "tensorboard", "wandb")
# The names save_pretrained gives a model, its tokenizer, an adapter and merged/ (the final write).
MODEL_FILE = re.compile(r"^(config\.json|generation_config\.json|chat_template\.(jinja|json)|special_tokens_map\.json|"
                         r"added_tokens\.json|merges\.txt|vocab\..*|tokenizer.*|model.*\.safetensors.*|"
                         r"pytorch_model.*|adapter_.*|merged)$")

# The model files a finished run writes, by their exact names: what it would write over in a folder.
WRITTEN_FILE = re.compile(r"^(config\.json|generation_config\.json|chat_template\.(jinja|json)|"
                          r"special_tokens_map\.json|added_tokens\.json|merges\.txt|vocab\.(json|txt)|tokenizer(_config)?\.json|"
                          r"tokenizer\.model|model(-\d+-of-\d+)?\.safetensors(\.index\.json)?|"
                          r"adapter_(config\.json|model\.safetensors))$")


@contextmanager
def removed_on_failure(out_dir: Path, env: DistEnv, created: bool, resumed: bool):
    """If what runs inside fails before a checkpoint exists, remove what this run wrote, so the corrected rerun
    is not refused as 'already holds a run'. A folder this run made goes whole. In a folder that was there
    before, what this run wrote goes (its run files, a model half-written when the disk filled) and names that
    were there before stay (a README, plots of the user's own, a previous run's files under --overwrite until
    `clear_previous`), as does anything else that appeared meanwhile (the user's own files). Yields the run files
    that were there. A run with a checkpoint is kept (--resume continues it), and so is a resumed run's folder and
    a finished one's (results.json written: what failed after it was merged/); an interrupt (Ctrl-C) after steps
    were logged keeps the folder too."""
    kept = {name for name in RUN_FILES if (out_dir / name).exists()}
    before = {p.name for p in out_dir.iterdir()} if out_dir.is_dir() else set()
    try:
        yield kept
    except BaseException as exc:
        interrupted_late = not isinstance(exc, Exception) and _logged_steps(out_dir)
        if (env.is_main and not resumed and not interrupted_late and out_dir.is_dir()
                and not (out_dir / CHECKPOINTS).exists() and finished_results(out_dir) is None):
            if created:
                shutil.rmtree(out_dir, ignore_errors=True)
            else:
                try:  # a folder gone read-only keeps what it has: the error that stopped the run is the one to tell
                    new = {p.name for p in out_dir.iterdir() if MODEL_FILE.match(p.name)} - before
                    for name in (set(RUN_FILES) - kept) | new:
                        path = out_dir / name
                        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                except OSError:
                    pass
        raise


def _logged_steps(out_dir: Path) -> bool:
    try:
        return (out_dir / METRICS_FILE).stat().st_size > 0
    except OSError:
        return False


LOCK = ".preftune.lock"


@contextmanager
def locked(out_dir: Path, env: DistEnv):
    """One run at a time writes a folder: a second one started into it is refused instead of interleaving its
    metrics and checkpoints with the first's. The lock file names its process; one left by a process that no
    longer runs (killed) is taken over."""
    path = out_dir / LOCK
    if env.is_main and not _take(path):
        holder = " on ".join(path.read_text(errors="replace").split()) if path.exists() else "?"
        raise ConfigError(f"--output-dir {out_dir}: another run (process {holder}) is writing there; wait for it "
                            f"to end, or choose another folder (delete {LOCK} there if no run is)")
    try:
        yield
    finally:
        if env.is_main:
            try:
                path.unlink(missing_ok=True)
            except OSError:  # the folder went read-only or away: what failed the run is the error to report
                pass


def _take(path: Path) -> bool:
    """Create the lock file naming this process; a lock whose process is gone is removed and taken. False when a
    running process holds it."""
    with _one_at_a_time(path.parent):
        return _take_unguarded(path)


@contextmanager
def _one_at_a_time(folder: Path):
    """Held while a process reads, removes and writes the lock file: two runs started together into a folder with a
    stale lock would otherwise each remove the other's new lock and both go on. An advisory lock on the folder
    itself, released when the process closes it or dies."""
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):  # no fcntl (Windows), or a folder that cannot be opened: unguarded, as before
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _take_unguarded(path: Path) -> bool:
    for _ in range(2):  # the second try follows the removal of a lock left behind
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = path.read_text(errors="replace").split() if path.exists() else []
            if holder and _running(holder):
                return False
            log.warning("%s: taking over the lock left by process %s, which no longer runs", path.parent,
                        " on ".join(holder) or "?")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{os.getpid()} {socket.gethostname()}")
        return True
    return False


def _running(holder: list[str]) -> bool:
    """Whether the process a lock file names still runs (on another machine: assumed so)."""
    pid, host = (holder + [""])[:2]
    if host and host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


# The inputs a config names by path. A local one is written as an absolute path, so that the saved config runs
# from any folder and a later run that starts from this one (its card, its adapter's base) finds them again.
INPUT_PATHS = ("model", "ref_model", "tokenizer", "data", "eval_data")


def resolved(cfg: TrainConfig) -> TrainConfig:
    """The config as it ran: defaults that depend on the stage written out, and local inputs and the run folder
    as absolute paths, so `--config` reproduces it (or resumes it) from any folder."""
    values = cfg.to_dict()
    values["lr"] = cfg.learning_rate
    values["overwrite"] = values["resume"] = False
    values["quiet"] = False  # how a run printed is not part of it (the library runs quiet; its config, rerun, talks)
    for name in (*INPUT_PATHS, "output_dir"):  # the run folder too: `--config it --resume` finds it from anywhere
        values[name] = absolute_if_local(values[name])
    return TrainConfig.from_dict(values)


def write_start(out_dir: Path, cfg: TrainConfig, setup, steps: int) -> None:
    """Write the resolved config and the data counts."""
    resolved(cfg).to_yaml(out_dir / CONFIG)
    atomic_write_json(out_dir / DATA_STATS, data_counts(setup, steps))


def describe_start(cfg: TrainConfig, setup, steps: int, global_batch: int) -> str:
    """One line for the log: the data counts and the steps (`global_batch`: examples a micro-batch takes over
    all processes)."""
    s, used, skipped = setup.stats, len(setup.train_items), len(setup.report.skipped)
    line = "data: "
    if skipped:  # not among the records counted next
        line += (f"{skipped} record{'s' * (skipped != 1)} skipped (the first: {setup.report.skipped[0]}; `preftune "
                 f"data check` lists them); ")
    line += (f"{s.total} records ({setup.report.format}) -> {used} used, {s.truncated} truncated, {s.dropped} "
             f"dropped (prompt alone over --max-length)")
    if setup.eval_items:
        line += f"; {len(setup.eval_items)} held out for eval"
    line += f"; {steps} steps"
    step = global_batch * cfg.grad_accum  # an epoch is whole steps (DataCursor): a partial last one is dropped
    left = used % step
    if left:
        unit = f"batches of {step}" if cfg.grad_accum == 1 else f"steps of {step} ({cfg.grad_accum} batches)"
        line += (f"; an epoch takes {used - left} of the {used} in {unit} (the other {left}, drawn anew each epoch, "
                 f"are left out of it)")
    return line


def leaves_out(setup, step_examples: int) -> bool:
    """Whether the run trains on less than all of its data: records skipped, examples truncated or dropped, or
    an epoch that leaves out the examples short of a whole step (`step_examples`)."""
    s = setup.stats
    return bool(setup.report.skipped or s.truncated or s.dropped or len(setup.train_items) % step_examples)


def data_counts(setup, steps: int) -> dict:
    """The data counts of a run, as data_stats.json holds them and `TrainResult.data_stats` returns them."""
    stats = {"train": setup.stats.as_dict(), "skipped_records": len(setup.report.skipped),
             "format": setup.report.format, "steps": steps}
    if setup.eval_stats is not None:
        stats["eval"] = setup.eval_stats.as_dict()
    return stats


def finish(out_dir: Path, cfg: TrainConfig, setup, final: dict, command: str, *,
           state_dict: dict | None = None) -> None:
    """Final model (Hugging Face format), plots, model card, and results.json last: its presence means done.

    With LoRA the model is the adapter (plus `merged/` with --merge); `state_dict` holds the gathered
    weights of a sharded model.
    """
    with reported_if_disk_full(out_dir, "the final model"):
        _write_final(out_dir, cfg, setup, final, command, state_dict)


def _write_final(out_dir: Path, cfg: TrainConfig, setup, final: dict, command: str, state_dict) -> None:
    save_model(setup.policy, setup.tokenizer, out_dir, state_dict=state_dict)
    # The model is written: a report that fails now (matplotlib that cannot load, a full disk) is said, and the
    # run finishes with its model instead of being removed for it.
    with _said_if_failed(f"plots: not written; `preftune plot {out_dir}` draws them from metrics.jsonl"):
        from ..report.plots import write_plots

        write_plots(out_dir)
    with _said_if_failed(f"model card: {out_dir / 'README.md'} not written"):
        from ..report.card import write_model_card

        data_stats = json.loads((out_dir / DATA_STATS).read_text())  # written by write_start
        write_model_card(out_dir, resolved(cfg), final, command, data_stats=data_stats,
                         adapters=is_peft_model(setup.policy))
    atomic_write_json(out_dir / RESULTS, {k: v for k, v in final.items() if _jsonable(v)})
    if cfg.merge:  # after results.json: a merge that fails (the base gone, no network) leaves the run finished
        write_merged_model(out_dir, cfg, setup.tokenizer, setup.dtype)


@contextmanager
def _said_if_failed(what: str):
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - any failure of a report, said in one line
        log.warning(f"{what} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")


def write_merged_model(out_dir: Path, cfg: TrainConfig, tokenizer, dtype) -> None:
    """`merged/` of a finished LoRA run, from its saved adapter and the base the adapter names; a failure says
    that the run itself is finished and how to write merged/ later."""
    from ..models.load import load_adapter_model
    from ..models.lora import MERGED, write_merged
    from ..reward import load_reward_model

    def load_rm(path, **kw):
        return load_reward_model(path, **kw)[0]

    try:
        write_merged(out_dir, tokenizer, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                     load=load_rm if cfg.stage == "rm" else load_adapter_model)
    except Exception as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PreftuneError(f"{out_dir}: the run finished and its adapter is saved there, but {MERGED}/ was not "
                            f"written ({detail}); run the same command with --resume to write it") from None


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False
