"""Checkpoint files: what is saved, what is refused, what is cleaned up; run-folder guards; safe loading."""

from __future__ import annotations

import json
import os
import random
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tinylm import fact_pairs, make_model_dir, write_jsonl
from preftune.config import TrainConfig
from preftune.dist.env import DistEnv
from preftune.errors import ConfigError, ModelError, NonFiniteError, PreftuneError
from preftune.io import file_sha256
from preftune.models.load import load_model
from preftune.training import checkpoint as ckpt
from preftune.training import input_digests
from preftune.training import loop as train
from preftune.training import run_state
from preftune.training.objectives import PreferenceObjective
from preftune.training.optim import build_optimizer
from test_resume import config, final_weights, metric_rows

ENV = DistEnv()


class RunsCode:
    """Unpickling this runs a shell command: what a hostile pickle can do."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def small_state(cfg: TrainConfig, seed: int = 0) -> run_state.RunState:
    """A two-layer net whose first layer is frozen (as base weights are under LoRA), after one AdamW step."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[0].requires_grad_(False)
    optimizer, scheduler = build_optimizer(list(model.parameters()), cfg, 10)
    model(torch.randn(5, 4)).square().sum().backward()
    optimizer.step()
    scheduler.step()
    cursor = train.DataCursor(n_items=10, global_batch=2, seed=0, group_by_length=False, epoch=1, position=3)
    objective = PreferenceObjective(cfg)
    objective.reward_sum, objective.reward_count = 0.75, 3
    return run_state.RunState(model, optimizer, scheduler, cursor, objective, step=1)


@pytest.fixture
def cfg(tmp_path) -> TrainConfig:
    return TrainConfig(model="m", data="d", output_dir=str(tmp_path / "run"), lr=0.1, keep_checkpoints=2)


def save_at(cfg: TrainConfig, state: run_state.RunState, step: int) -> Path:
    state.step = step
    return ckpt.save(Path(cfg.output_dir), state, cfg, ENV, Path(cfg.output_dir) / "metrics.jsonl")


def test_checkpoint_round_trips_every_part_of_the_state(cfg):
    saved = small_state(cfg)
    saved.skipped_steps = 2
    folder = save_at(cfg, saved, 7)
    assert folder.name == "step-00000007"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["weights.safetensors", "optimizer.pt", "trainer_state.json", "config.yaml", "manifest.json"])
    # Only trainable parameters are written; the frozen layer comes from the base model.
    assert sorted(load_file(str(folder / "weights.safetensors"))) == ["1.bias", "1.weight"]

    fresh = small_state(cfg, seed=1)
    fresh.cursor.load_state_dict({"epoch": 0, "position": 0})
    fresh.objective.reward_sum, fresh.objective.reward_count = 0.0, 0
    assert ckpt.latest(Path(cfg.output_dir)) == folder
    ckpt.restore(folder, fresh, cfg, ENV)
    assert torch.equal(fresh.model[1].weight, saved.model[1].weight)
    assert not torch.equal(fresh.model[0].weight, saved.model[0].weight)  # frozen: untouched
    a, b = fresh.optimizer.state_dict(), saved.optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in b["state"]:
        for key in b["state"][i]:
            assert torch.equal(a["state"][i][key], b["state"][i][key])
    assert fresh.scheduler.state_dict() == saved.scheduler.state_dict()
    assert fresh.cursor.state_dict() == {"epoch": 1, "position": 3}
    assert fresh.objective.state_dict() == {"reward_sum": 0.75, "reward_count": 3}
    assert (fresh.step, fresh.skipped_steps) == (7, 2)


def test_random_states_round_trip():
    state = run_state.rng_state()
    json.dumps(state)  # plain values only
    draws = (random.random(), float(np.random.rand()), torch.rand(3))
    run_state.set_rng_state(json.loads(json.dumps(state)))
    again = (random.random(), float(np.random.rand()), torch.rand(3))
    assert draws[:2] == again[:2] and torch.equal(draws[2], again[2])


def test_only_the_newest_checkpoints_are_kept(cfg):
    state = small_state(cfg)
    for step in (1, 2, 3, 4):
        save_at(cfg, state, step)
    root = Path(cfg.output_dir) / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000003", "step-00000004"]


@pytest.mark.parametrize("damage", ["no manifest", "changed byte", "truncated", "missing file"])
def test_a_damaged_checkpoint_is_never_used_and_is_set_aside(cfg, damage):
    state = small_state(cfg)
    older, newer = save_at(cfg, state, 1), save_at(cfg, state, 2)
    if damage == "no manifest":
        (newer / "manifest.json").unlink()
    elif damage == "changed byte":
        data = bytearray((newer / "optimizer.pt").read_bytes())
        data[len(data) // 2] ^= 1
        (newer / "optimizer.pt").write_bytes(bytes(data))
    elif damage == "truncated":
        with open(newer / "weights.safetensors", "r+b") as handle:
            handle.truncate(10)
    else:
        (newer / "trainer_state.json").unlink()
    leftover = newer.parent / ".tmp-step-00000003-123"  # a write that was killed half way
    leftover.mkdir()
    assert ckpt.latest(Path(cfg.output_dir)) == older
    assert sorted(p.name for p in newer.parent.iterdir()) == ["damaged-step-00000002", "step-00000001"]
    again = save_at(cfg, state, 2)  # the same step written and damaged once more: set aside beside the first
    (again / "manifest.json").unlink()
    assert ckpt.latest(Path(cfg.output_dir)) == older
    assert sorted(p.name for p in newer.parent.iterdir()) == ["damaged-step-00000002", "damaged-step-00000002-2",
                                                              "step-00000001"]


def test_resume_refuses_when_no_checkpoint_can_be_used_and_keeps_them(cfg):
    """A config.yaml edited by hand in the only checkpoints: refused, not a silent start from step 0."""
    state = small_state(cfg)
    for step in (1, 2):
        with open(save_at(cfg, state, step) / "config.yaml", "a") as handle:
            handle.write("# edited\n")
    root = Path(cfg.output_dir) / "checkpoints"
    with pytest.raises(ckpt.CheckpointError, match="step-00000002: config.yaml is missing or has the wrong size, and "
                                                   "no older checkpoint can be used either; restore"):
        ckpt.latest(Path(cfg.output_dir))
    assert sorted(p.name for p in root.iterdir()) == ["step-00000001", "step-00000002"]


def test_a_pickle_with_arbitrary_objects_is_refused_and_not_run(cfg, tmp_path):
    folder = save_at(cfg, small_state(cfg), 1)
    marker = tmp_path / "code-ran"
    torch.save({"state": {}, "param_groups": [], "extra": RunsCode(f"touch {marker}")}, folder / "optimizer.pt")
    manifest = json.loads((folder / "manifest.json").read_text())  # a manifest that matches: made elsewhere
    manifest["files"]["optimizer.pt"] = {"bytes": (folder / "optimizer.pt").stat().st_size,
                                         "sha256": file_sha256(folder / "optimizer.pt")}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert ckpt.latest(Path(cfg.output_dir)) == folder
    with pytest.raises(ckpt.CheckpointError, match="pickled Python objects"):
        ckpt.restore(folder, small_state(cfg), cfg, ENV)
    assert not marker.exists()


def test_resume_with_other_settings_is_refused(cfg):
    folder = save_at(cfg, small_state(cfg), 1)
    other = TrainConfig(**{**cfg.to_dict(), "beta": 0.5, "save_every": 3})
    with pytest.raises(ckpt.CheckpointError, match=r"beta=0.1 then, 0.5 now"):
        ckpt.restore(folder, small_state(other), other, ENV)


def test_resume_after_the_data_file_changed_is_refused(cfg, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", fact_pairs(4))
    cfg = TrainConfig(**{**cfg.to_dict(), "data": str(data)})
    folder = save_at(cfg, small_state(cfg), 1)
    ckpt.restore(folder, small_state(cfg), cfg, ENV)  # the same bytes: fine
    rows = fact_pairs(4)
    rows[0] = {**rows[0], "chosen": rows[0]["rejected"], "rejected": rows[0]["chosen"]}  # one preference flipped
    write_jsonl(data, rows)
    with pytest.raises(ckpt.CheckpointError, match="other contents of --data .*the file has changed since"):
        ckpt.restore(folder, small_state(cfg), cfg, ENV)


def test_a_checkpoint_records_the_data_as_the_run_read_it(cfg, tmp_path):
    """A data file edited while a run trains: its later checkpoints record the bytes it read, so the edited file
    is refused at resume and the original accepted."""
    data = write_jsonl(tmp_path / "pairs.jsonl", fact_pairs(4))
    cfg = TrainConfig(**{**cfg.to_dict(), "data": str(data)})
    input_digests.pin(cfg)  # the run reads its data
    original = data.read_bytes()
    rows = fact_pairs(4)
    rows[0] = {**rows[0], "chosen": rows[0]["rejected"], "rejected": rows[0]["chosen"]}
    write_jsonl(data, rows)  # edited during the run, before its checkpoint
    folder = save_at(cfg, small_state(cfg), 1)
    with pytest.raises(ckpt.CheckpointError, match="other contents of --data"):
        ckpt.restore(folder, small_state(cfg), cfg, ENV)
    data.write_bytes(original)
    ckpt.restore(folder, small_state(cfg), cfg, ENV)


@pytest.mark.parametrize("flag", ["model", "ref_model", "tokenizer"])
def test_resume_after_a_model_folder_was_rewritten_is_refused(cfg, tmp_path, flag):
    """Resuming reloads the reference, the tokenizer and (under LoRA) the frozen base from their folders: one
    rewritten since the checkpoint (an SFT run redone into the same place) would change the numbers silently."""
    folder_of = {name: make_model_dir(tmp_path / name, seed=1) for name in ("model", "ref_model", "tokenizer")}
    cfg = TrainConfig(**{**cfg.to_dict(), **{k: str(v) for k, v in folder_of.items()}})
    input_digests.pin(cfg)
    folder = save_at(cfg, small_state(cfg), 1)
    ckpt.restore(folder, small_state(cfg), cfg, ENV)  # the same files: fine
    changed = folder_of[flag]
    original = {p.name: p.read_bytes() for p in changed.iterdir()}
    for p in changed.iterdir():
        os.utime(p, (0, 0))  # touched, same bytes: still fine
    ckpt.restore(folder, small_state(cfg), cfg, ENV)
    if flag == "tokenizer":  # another vocabulary entry
        vocab = json.loads((changed / "tokenizer.json").read_text())
        vocab["added_tokens"].append({**vocab["added_tokens"][-1], "id": 999, "content": "<extra>"})
        (changed / "tokenizer.json").write_text(json.dumps(vocab))
        expected = "tokenizer.json"
    else:  # retrained weights of the same shapes, written over the old ones
        make_model_dir(changed, seed=2)
        expected = "model.safetensors"
    option = "--" + flag.replace("_", "-")
    with pytest.raises(ckpt.CheckpointError, match=rf"other files in {option} {changed} \({expected} changed since"):
        ckpt.restore(folder, small_state(cfg), cfg, ENV)
    for name, data in original.items():
        (changed / name).write_bytes(data)
    ckpt.restore(folder, small_state(cfg), cfg, ENV)


def test_a_large_file_is_fingerprinted_by_samples_across_it(tmp_path):
    """Above a few MB the fingerprint reads samples spread over the file: instant for a model of many GB, and it
    still sees weights that differ throughout (as retrained ones do)."""
    folder = tmp_path / "m"
    folder.mkdir()
    rng = np.random.default_rng(0)
    weights = folder / "model.safetensors"
    weights.write_bytes(rng.bytes(9 << 20))
    before = input_digests.folder_fingerprint(folder)
    assert list(before) == ["model.safetensors"] and before["model.safetensors"].startswith(f"{9 << 20}:")
    (folder / "notes.txt").write_text("not a model file")
    assert input_digests.folder_fingerprint(folder) == before
    data = bytearray(weights.read_bytes())
    data[(1 << 20):] = rng.bytes(len(data) - (1 << 20))  # the same header, other values after it
    weights.write_bytes(bytes(data))
    assert input_digests.folder_fingerprint(folder) != before
    assert input_digests.folder_fingerprint("org/hub-id") == {}


def test_resume_with_another_number_of_processes_is_refused(cfg):
    """The global batch is the per-process batch times the processes: another count reads other data per step."""
    folder = save_at(cfg, small_state(cfg), 1)
    with pytest.raises(ckpt.CheckpointError, match=r"written by 1 process\(es\), this run has 2 \(a global batch "
                                                  r"of 8 then, 16 now\); resume with as many processes"):
        ckpt.restore(folder, small_state(cfg), cfg, DistEnv(rank=0, world_size=2))


def test_resume_into_a_model_with_other_trainable_parameters_is_refused(cfg):
    folder = save_at(cfg, small_state(cfg), 1)
    state = small_state(cfg)
    state.model[0].requires_grad_(True)
    with pytest.raises(ckpt.CheckpointError, match="other parameters"):
        ckpt.restore(folder, state, cfg, ENV)


def test_non_finite_weights_are_never_checkpointed(cfg):
    state = small_state(cfg)
    with torch.no_grad():
        state.model[1].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="1.weight"):
        save_at(cfg, state, 1)
    assert not (Path(cfg.output_dir) / "checkpoints" / "step-00000001").exists()


@pytest.mark.parametrize("where", [0, 7, 8, 19])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_finiteness_is_checked_block_by_block_over_every_element(where, bad):
    from preftune.training.run_state import _all_finite

    t = torch.randn(4, 5)
    assert _all_finite(t, block=8)
    t.view(-1)[where] = bad
    assert not _all_finite(t, block=8)
    assert not _all_finite(t.t(), block=8)  # not contiguous


# ------------------------------------------------------------------ the run folder
@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", fact_pairs(16))


def small_run(model: Path, data: Path, out: Path, **overrides) -> TrainConfig:
    return config(model, data, out, **{"max_steps": 3, **overrides})


def test_existing_run_is_refused_without_resume_or_overwrite(tmp_path, tiny_model_dir, pairs_file):
    cfg = small_run(tiny_model_dir, pairs_file, tmp_path / "run", save_every=1)
    train.run(cfg, command="preftune")
    with pytest.raises(PreftuneError, match="already holds a run.*--resume.*--overwrite"):
        train.run(cfg, command="preftune")
    before = (tmp_path / "run" / "model.safetensors").stat().st_mtime_ns
    done = train.run(small_run(tiny_model_dir, pairs_file, tmp_path / "run", resume=True), command="preftune")
    assert done["step"] == 3 and (tmp_path / "run" / "model.safetensors").stat().st_mtime_ns == before
    (tmp_path / "run" / "results.json").unlink()
    (tmp_path / "run" / "config.yaml").unlink()
    (tmp_path / "run" / "metrics.jsonl").unlink()
    with pytest.raises(PreftuneError, match="already holds a run"):  # checkpoints alone are a run too
        train.run(cfg, command="preftune")
    train.run(small_run(tiny_model_dir, pairs_file, tmp_path / "run", overwrite=True), command="preftune")
    assert not (tmp_path / "run" / "checkpoints").exists()  # the old run's checkpoints are gone


def test_overwrite_removes_the_old_model_and_does_not_combine_with_resume(tmp_path, tiny_model_dir, pairs_file):
    """A LoRA run's merged/ outlived a full run over it, and a full run's weights a LoRA run's adapter, so the
    folder loaded as the old model; --resume --overwrite resumed, ignoring --overwrite."""
    out = tmp_path / "run"
    train.run(small_run(tiny_model_dir, pairs_file, out, lora_r=4, merge=True), command="preftune")
    assert (out / "merged").is_dir() and (out / "adapter_model.safetensors").is_file()
    (out / "notes.md").write_text("mine\n")
    train.run(small_run(tiny_model_dir, pairs_file, out, overwrite=True), command="preftune")
    assert not (out / "merged").exists() and not (out / "adapter_model.safetensors").exists()
    full = (out / "model.safetensors").read_bytes()
    train.run(small_run(tiny_model_dir, pairs_file, out, overwrite=True, lora_r=4), command="preftune")
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    assert (out / "notes.md").read_text() == "mine\n" and full
    with pytest.raises(ConfigError, match=r"^resume: --resume continues the run in --output-dir and --overwrite "
                                          r"starts it afresh; pass one of them$"):
        small_run(tiny_model_dir, pairs_file, out, overwrite=True, resume=True)


def test_a_failed_run_keeps_the_files_that_were_in_its_folder_before(tmp_path, tiny_model_dir, pairs_file):
    out = tmp_path / "project"
    (out / "plots").mkdir(parents=True)
    (out / "notes.md").write_text("# my project\n")
    (out / "plots" / "arch.png").write_text("x")
    with pytest.raises(ModelError):
        train.run(small_run(tmp_path / "typo", pairs_file, out), command="preftune")
    assert (out / "notes.md").read_text() == "# my project\n" and (out / "plots" / "arch.png").exists()
    assert not (out / "config.yaml").exists()  # what the failed run wrote is gone: the rerun is not refused
    train.run(small_run(tiny_model_dir, pairs_file, out), command="preftune")
    assert (out / "notes.md").read_text() == "# my project\n" and (out / "plots" / "arch.png").exists()


def test_files_of_the_users_that_the_run_does_not_write_stay_beside_it(tmp_path, tiny_model_dir, pairs_file):
    out = tmp_path / "project"
    out.mkdir()
    for name in ("tokenizer_notes.md", "vocab.csv", "adapter_plan.txt"):
        (out / name).write_text("mine\n")
    train.run(small_run(tiny_model_dir, pairs_file, out), command="preftune")
    assert all((out / name).read_text() == "mine\n" for name in ("tokenizer_notes.md", "vocab.csv"))


@pytest.mark.parametrize("name", ["README.md", "results.json", "tokenizer.json"])
def test_a_file_of_the_users_that_the_run_would_write_over_is_refused(tmp_path, tiny_model_dir, pairs_file, name):
    out = tmp_path / "project"
    out.mkdir()
    (out / name).write_text("mine\n")
    for resume in (False, True):
        with pytest.raises(PreftuneError, match=rf"--output-dir {out}: holds {name}, which the run would write over; "
                                                r"choose another folder, or --overwrite to replace them"):
            train.run(small_run(tiny_model_dir, pairs_file, out, resume=resume), command="preftune")
    assert sorted(p.name for p in out.iterdir()) == [name] and (out / name).read_text() == "mine\n"
    train.run(small_run(tiny_model_dir, pairs_file, out, overwrite=True), command="preftune")
    assert (out / "model.safetensors").exists()


def test_overwrite_keeps_the_old_run_until_the_new_one_has_loaded(tmp_path, tiny_model_dir, pairs_file):
    out = tmp_path / "run"
    train.run(small_run(tiny_model_dir, pairs_file, out, save_every=1), command="preftune")
    before = {name: (out / name).read_bytes() for name in ("metrics.jsonl", "results.json", "config.yaml")}
    with pytest.raises(ModelError):
        train.run(small_run(tmp_path / "typo", pairs_file, out, overwrite=True), command="preftune")
    assert {name: (out / name).read_bytes() for name in before} == before
    assert (out / "checkpoints").is_dir()


def test_a_model_folder_is_not_taken_as_the_output_folder(tmp_path, tiny_model_dir, pairs_file):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = file_sha256(model / "model.safetensors")
    with pytest.raises(PreftuneError, match="holds a model \\(config.json\\).*--overwrite"):
        train.run(small_run(model, pairs_file, model), command="preftune")
    assert file_sha256(model / "model.safetensors") == weights


def test_a_second_run_into_a_folder_being_written_is_refused(tmp_path, tiny_model_dir, pairs_file, caplog):
    import socket
    import subprocess
    import sys

    out = tmp_path / "run"
    out.mkdir()
    lock = out / ".preftune.lock"
    lock.write_text(f"{os.getpid()} {socket.gethostname()}")  # a live process holds it
    with pytest.raises(PreftuneError, match="another run .* is writing there"):
        train.run(small_run(tiny_model_dir, pairs_file, out), command="preftune")
    assert lock.exists() and not (out / "config.yaml").exists()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(f"{gone.stdout.strip()} {socket.gethostname()}")  # left by a process that has ended
    with caplog.at_level("WARNING"):
        train.run(small_run(tiny_model_dir, pairs_file, out), command="preftune")
    assert (out / "results.json").exists() and not lock.exists()
    assert f"taking over the lock left by process {gone.stdout.strip()} on" in caplog.text


def test_an_interrupt_after_logged_steps_keeps_the_run(tmp_path, tiny_model_dir, pairs_file):
    """Ctrl-C outside the steps' own signal handling (while the final model is written, say) must not delete a
    run that has trained."""
    out = tmp_path / "run"

    def interrupt(row):
        if row.get("step") == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.execute(small_run(tiny_model_dir, pairs_file, out), command="preftune", callbacks=[interrupt])
    assert len(metric_rows(out)) >= 1 and (out / "config.yaml").exists()


def test_a_full_disk_while_checkpointing_is_one_error_and_keeps_the_last_checkpoint(tmp_path, tiny_model_dir,
                                                                                     pairs_file, monkeypatch):
    out = tmp_path / "run"
    real = torch.save

    def full_at_step_2(obj, path, *args, **kwargs):
        if ckpt.step_dir(out, 2).name in str(path):  # torch.save's own words on a full disk; the disk is full now
            monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("Usage", "total used free")(1, 1, 0))
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 123 vs 456")
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_at_step_2)
    with pytest.raises(PreftuneError, match="checkpoint at step 2: cannot be written to .*no space left"):
        train.run(small_run(tiny_model_dir, pairs_file, out, save_every=1), command="preftune")
    root = out / "checkpoints"
    assert [p.name for p in root.iterdir()] == [ckpt.step_dir(out, 1).name]  # no half-written folder beside it


def test_a_full_disk_during_the_final_write_leaves_a_folder_the_rerun_takes(tmp_path, tiny_model_dir, pairs_file,
                                                                             monkeypatch):
    """A folder the user made (a mount point), no checkpoints: the model files half-written when the disk filled
    go with the run's other files, and what the user had there stays."""
    import errno

    from preftune.training import run_dir

    out = tmp_path / "mount"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    real = run_dir.save_model

    def full(model, tokenizer, folder, state_dict=None):
        (folder / "config.json").write_text("{}")  # what got written before the device filled
        (folder / "model.safetensors").write_bytes(b"half")
        (folder / ".ipynb_checkpoints").mkdir()  # the user's, made while the run trained: not the run's to remove
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "model.safetensors"))

    monkeypatch.setattr(run_dir, "save_model", full)
    with pytest.raises(PreftuneError, match="the final model: cannot be written to .*no space left"):
        train.run(small_run(tiny_model_dir, pairs_file, out), command="preftune")
    assert sorted(p.name for p in out.iterdir()) == [".ipynb_checkpoints", "notes.txt"]
    monkeypatch.setattr(run_dir, "save_model", real)
    train.run(small_run(tiny_model_dir, pairs_file, out), command="preftune")  # the corrected rerun is taken
    assert (out / "results.json").is_file() and (out / "notes.txt").read_text() == "mine"


def test_the_folder_failing_under_a_run_is_one_line_and_exit_2(tmp_path, tiny_model_dir, pairs_file, monkeypatch,
                                                                 capsys):
    """The output folder removed or turned read-only while a run trains: one line naming the file, no traceback;
    the run's lock is not what the error is about."""
    from preftune.cli import main
    from preftune.report import tracking

    out = tmp_path / "run"

    def read_only(path, row):
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(tracking, "append_jsonl", read_only)
    code = main(["dpo", "--model", str(tiny_model_dir), "--data", str(pairs_file), "--output-dir", str(out),
                 "--max-steps", "2", "--batch-size", "4", "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"preftune: error: {out / 'metrics.jsonl'}: Read-only file system; fix that and run again")


def test_resume_on_a_finished_run_with_other_settings_is_refused(tmp_path, tiny_model_dir, pairs_file):
    """A sweep that reuses a finished run's folder with another --lr gets an error, not the old run's result."""
    out = tmp_path / "run"
    train.run(small_run(tiny_model_dir, pairs_file, out), command="preftune")
    results = (out / "results.json").read_bytes()
    assert train.run(small_run(tiny_model_dir, pairs_file, out, resume=True), command="preftune") is not None
    with pytest.raises(ckpt.CheckpointError, match=r"other settings \(lr=.* then, 0.0005 now\)"):
        train.run(small_run(tiny_model_dir, pairs_file, out, lr=5e-4, resume=True), command="preftune")
    assert (out / "results.json").read_bytes() == results


def test_a_refused_resume_leaves_the_runs_config_and_counts_as_they_were(tmp_path, tiny_model_dir, pairs_file):
    out = tmp_path / "run"
    train.run(small_run(tiny_model_dir, pairs_file, out, save_every=1, max_steps=4), command="preftune")
    (out / "results.json").unlink()  # as if stopped after its last checkpoint
    before = {name: (out / name).read_bytes() for name in ("config.yaml", "data_stats.json")}
    with pytest.raises(ckpt.CheckpointError, match="other settings"):
        train.run(small_run(tiny_model_dir, pairs_file, out, save_every=1, max_steps=4, lr=5e-4, resume=True),
                  command="preftune")
    assert {name: (out / name).read_bytes() for name in before} == before
    # ... so the run's own saved config still resumes it.
    saved = TrainConfig.from_yaml(out / "config.yaml")
    train.run(TrainConfig(**{**saved.to_dict(), "resume": True}), command="preftune")
    assert (out / "results.json").is_file()


def test_resume_without_a_checkpoint_starts_from_step_0(tmp_path, tiny_model_dir, pairs_file, capsys):
    fresh = tmp_path / "fresh"
    train.run(small_run(tiny_model_dir, pairs_file, fresh), command="preftune")
    out = tmp_path / "resumed"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')  # rows of a run killed before any checkpoint
    cfg = small_run(tiny_model_dir, pairs_file, out, resume=True, quiet=False)
    train.run(cfg, command="preftune")
    assert "no complete checkpoint" in capsys.readouterr().err
    assert metric_rows(out) == metric_rows(fresh)


def test_unwritable_output_folder_is_reported_before_training(tmp_path, tiny_model_dir, pairs_file, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(PreftuneError, match="cannot write there"):
        train.run(small_run(tiny_model_dir, pairs_file, blocker / "run"), command="preftune")

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "write_text", refuse)
    with pytest.raises(PreftuneError, match="cannot write there.*Permission denied"):
        train.run(small_run(tiny_model_dir, pairs_file, tmp_path / "run"), command="preftune")


def test_a_disk_without_room_for_a_checkpoint_is_reported_before_training(tmp_path, tiny_model_dir, pairs_file,
                                                                         monkeypatch):
    model = load_model(str(tiny_model_dir), device=torch.device("cpu"), dtype=torch.float32)
    param_bytes = sum(p.numel() * 4 for p in model.parameters())
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12, 3 * param_bytes))
    out = tmp_path / "run"
    with pytest.raises(PreftuneError, match="one checkpoint and the final weights need"):
        train.run(small_run(tiny_model_dir, pairs_file, out, save_every=1), command="preftune")
    assert not (out / "metrics.jsonl").exists()
    train.run(small_run(tiny_model_dir, pairs_file, out, overwrite=True), command="preftune")  # no checkpoints: fits


# ------------------------------------------------------------------ non-finite values
def nan_at_call(monkeypatch, call: int) -> None:
    """The preference loss returns NaN for every pair of the `call`-th batch."""
    from preftune.training import objectives

    real = objectives.preference_loss
    calls = {"n": 0}

    def loss(*args, **kwargs):
        calls["n"] += 1
        losses, chosen, rejected = real(*args, **kwargs)
        return (losses * float("nan") if calls["n"] == call else losses), chosen, rejected

    monkeypatch.setattr(objectives, "preference_loss", loss)


def test_non_finite_loss_stops_naming_the_step_and_records(tmp_path, tiny_model_dir, pairs_file, monkeypatch):
    nan_at_call(monkeypatch, 2)
    with pytest.raises(NonFiniteError, match=r"step 2: .*records: .*pairs.jsonl line \d+"):
        train.run(small_run(tiny_model_dir, pairs_file, tmp_path / "run"), command="preftune")


def test_skip_nonfinite_drops_the_step(tmp_path, tiny_model_dir, pairs_file, monkeypatch):
    nan_at_call(monkeypatch, 2)
    out = tmp_path / "run"
    train.run(small_run(tiny_model_dir, pairs_file, out, max_steps=4, save_every=3, skip_nonfinite=True),
              command="preftune")
    rows = metric_rows(out)
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 1]
    assert "loss" not in rows[1] and all(np.isfinite(r["loss"]) for r in rows if r["step"] != 2)
    adam = torch.load(out / "checkpoints" / "step-00000003" / "optimizer.pt", weights_only=True)
    assert all(int(s["step"]) == 2 for s in adam["state"].values())  # 3 steps, one skipped
    assert all(torch.isfinite(w).all() for w in final_weights(out).values())


def test_a_model_with_non_finite_weights_is_never_saved_as_final(tmp_path, tiny_model_dir, pairs_file, monkeypatch):
    real = train.build_optimizer

    def overflowing_optimizer(params, cfg, steps):
        """One weight overflows with the update, after the loss and gradients were checked."""
        optimizer, scheduler = real(params, cfg, steps)
        step = scheduler.step

        def step_then_overflow(*args, **kwargs):
            step(*args, **kwargs)
            with torch.no_grad():
                params[-1].view(-1)[0] = float("inf")

        scheduler.step = step_then_overflow
        return optimizer, scheduler

    monkeypatch.setattr(train, "build_optimizer", overflowing_optimizer)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match="final model: 1 weight tensors"):
        train.run(small_run(tiny_model_dir, pairs_file, out, max_steps=1), command="preftune")
    assert not (out / "model.safetensors").exists()


# ------------------------------------------------------------------ safe model loading
def test_pickled_model_weights_load_only_through_the_restricted_unpickler(tmp_path):
    folder = make_model_dir(tmp_path / "model")
    weights = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(weights, folder / "pytorch_model.bin")
    model = load_model(str(folder), device=torch.device("cpu"), dtype=torch.float32)
    assert torch.equal(model.state_dict()["lm_head.weight"], weights["lm_head.weight"])

    marker = tmp_path / "code-ran"
    torch.save({**weights, "lm_head.weight": RunsCode(f"touch {marker}")}, folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match="refused; its pickled weights"):
        load_model(str(folder), device=torch.device("cpu"), dtype=torch.float32)
    assert not marker.exists()


def test_model_code_from_the_folder_runs_only_when_trusted(tmp_path):
    folder = make_model_dir(tmp_path / "model")
    (folder / "custom_model.py").write_text(f"open({str(tmp_path / 'code-ran')!r}, 'w')\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="custom-llama", auto_map={"AutoConfig": "custom_model.Config",
                                                       "AutoModelForCausalLM": "custom_model.Model"})
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="--trust-remote-code"):
        load_model(str(folder), device=torch.device("cpu"), dtype=torch.float32)
    assert not (tmp_path / "code-ran").exists()


def _take_lock(path: str, start, results) -> None:
    from preftune.training import run_dir

    import time

    start.wait()
    took = run_dir._take(Path(path))
    results.put(took)
    if took:
        time.sleep(2)  # a run holds its lock while it trains: the others must find it alive


def test_runs_started_together_on_a_stale_lock_let_one_take_it(tmp_path):
    """Each reads the stale lock, removes it and writes its own: one at a time, so exactly one goes on."""
    import multiprocessing
    import socket

    ctx = multiprocessing.get_context("spawn")
    for trial in range(3):
        folder = tmp_path / f"run{trial}"
        folder.mkdir()
        (folder / ".preftune.lock").write_text(f"999999999 {socket.gethostname()}")  # no such process
        start, results = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_take_lock, args=(str(folder / ".preftune.lock"), start, results))
                 for _ in range(4)]
        for p in procs:
            p.start()
        taken = [results.get(timeout=120) for _ in procs]
        for p in procs:
            p.join()
        assert sum(taken) == 1, taken


def test_a_checkpoint_of_the_earlier_step_plan_is_refused(tmp_path, tiny_model_dir, pairs_file):
    """Warmup and epoch boundaries changed (warmup from lr 0; no step across epochs): a checkpoint written under
    the earlier plan went on under the new one, matching neither run from its start."""
    out = tmp_path / "run"
    outcome = train.execute(small_run(tiny_model_dir, pairs_file, out, save_every=1), command="preftune",
                            callbacks=[lambda row: "stop" if row.get("step") == 1 else None])
    assert outcome.stopped_at == 1
    folder = ckpt.step_dir(out, 1)
    state = json.loads((folder / ckpt.STATE).read_text())
    assert state.pop("schedule") == ckpt.SCHEDULE
    (folder / ckpt.STATE).write_text(json.dumps(state))  # as the earlier version wrote it, manifest and all
    manifest = json.loads((folder / ckpt.MANIFEST).read_text())
    manifest["files"][ckpt.STATE] = {"bytes": (folder / ckpt.STATE).stat().st_size,
                                     "sha256": file_sha256(folder / ckpt.STATE)}
    (folder / ckpt.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(PreftuneError, match=r"was written by an earlier preftune.*--overwrite"):
        train.run(small_run(tiny_model_dir, pairs_file, out, save_every=1, resume=True), command="preftune")
