"""What a user meets at the edges, run as a user runs it (see userland.py): each failure is one line on stderr
naming what and where, exit 2, no traceback, in seconds; files follow the umask; a failed run blocks no rerun."""

from __future__ import annotations

import json
import shutil
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tinylm import fact_pairs, write_jsonl
from .userland import assert_one_line_error, run_cli, user_env


@pytest.fixture(scope="module")
def dpo_run(workdir) -> Path:
    """A finished DPO run with held-out pairs and checkpoints."""
    r = run_cli("dpo", "--model", "base", "--data", "pairs.jsonl", "--output-dir", "dpo", "--max-steps", "3",
                "--batch-size", "4", "--lr", "1e-3", "--eval-split", "0.25", "--save-every", "1", "--quiet",
                cwd=workdir)
    assert r.returncode == 0, r.stderr
    return workdir / "dpo"


def test_run_files_follow_the_umask(dpo_run):
    files = [p for p in dpo_run.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"model.safetensors", "README.md", "results.json", "config.yaml", "tokenizer.json",
            "trainer_state.json", "weights.safetensors"} <= names, names
    modes = {str(p.relative_to(dpo_run)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {"0o644"}, modes


@pytest.mark.parametrize("command", [["data", "check", "many.jsonl"], ["data", "show", "many.jsonl", "-n", "4000"]])
def test_piped_into_head_ends_quietly(workdir, command):
    # Thousands of lines: far more than a pipe buffers, so preftune is still writing when head has left.
    write_jsonl(workdir / "many.jsonl", [{"prompt": f"q{i}", "chosen": "", "rejected": "r"} for i in range(4000)]
                + fact_pairs(4000))
    shell = " ".join([sys.executable, "-m", "preftune", *command]) + " 2>err.txt | head -3"
    r = subprocess.run(["bash", "-c", shell], cwd=workdir, env=user_env(), capture_output=True, text=True,
                       timeout=120, preexec_fn=lambda: os.umask(0o022))
    assert len(r.stdout.splitlines()) == 3
    assert (workdir / "err.txt").read_text() == ""


def _flag_helps(help_text: str) -> dict[str, str]:
    """--flag -> its help, read off argparse's layout (a flag line, then indented continuation lines)."""
    flags: dict[str, str] = {}
    current = None
    for line in help_text.splitlines():
        stripped = line.strip()
        if line.startswith("  -"):
            current = stripped.split()[0].rstrip(",")
            parts = stripped.split("  ", 1)
            flags[current] = parts[1].strip() if len(parts) > 1 else ""
        elif current and line.startswith("    ") and stripped:
            flags[current] += " " + stripped
        else:
            current = None
    return flags


@pytest.mark.parametrize("command", ["sft", "dpo", "eval", "generate"])
def test_every_flag_has_help_and_at_most_one_default(workdir, command):
    r = run_cli(command, "--help", cwd=workdir)
    assert r.returncode == 0, r.stderr
    flags = _flag_helps(r.stdout)
    assert "--model" in flags and len(flags) > 8, flags
    for flag, text in flags.items():
        assert text, f"{flag} has no help"
        assert " ".join(text.split()).count("default") <= 1, (flag, text)
        assert "(default: None)" not in text and "(default: )" not in text, (flag, text)


def test_help_shows_the_stages_learning_rate_and_the_loss_names(workdir):
    sft = _flag_helps(run_cli("sft", "--help", cwd=workdir).stdout)
    dpo = _flag_helps(run_cli("dpo", "--help", cwd=workdir).stdout)
    assert "default: 2e-05" in sft["--lr"] and "5e-07" not in sft["--lr"]
    assert "default: 5e-07" in dpo["--lr"]
    loss = " ".join(dpo["--loss"].split())
    for name in ("sigmoid", "ipo", "hinge", "simpo", "orpo", "dpo (= sigmoid)"):
        assert name in loss, loss


def test_a_bad_flag_value_is_one_line(workdir):
    r = run_cli("sft", "--batch-size", "four", cwd=workdir)
    assert_one_line_error(r, "--batch-size", "'four'", "preftune sft --help")
    assert r.stdout == ""


def test_prompts_over_max_length_point_to_the_length_flags(workdir):
    r = run_cli("dpo", "--model", "base", "--data", "pairs.jsonl", "--output-dir", "too-short", "--max-length", "3",
                "--batch-size", "4", cwd=workdir)
    line = assert_one_line_error(r, "32 of 32", "--max-length 3", "--max-prompt-length")
    assert "--batch-size" not in line.split("(")[0] and "lower --batch-size" not in line
    assert not (workdir / "too-short").exists()


def test_hh_empty_answer_points_to_skip_bad_records(workdir):
    good = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
    empty = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant:"}
    write_jsonl(workdir / "hh.jsonl", [good] * 8 + [empty] + [good] * 8)
    r = run_cli("dpo", "--model", "base", "--data", "hh.jsonl", "--output-dir", "hh-run", "--max-steps", "1",
                "--batch-size", "4", cwd=workdir)
    assert_one_line_error(r, "hh.jsonl line 9", "rejected answer is empty", "--skip-bad-records")
    assert not (workdir / "hh-run").exists()
    r = run_cli("dpo", "--model", "base", "--data", "hh.jsonl", "--output-dir", "hh-run", "--max-steps", "1",
                "--batch-size", "4", "--skip-bad-records", "--quiet", cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert json.loads((workdir / "hh-run" / "data_stats.json").read_text())["skipped_records"] == 1


def test_loss_dpo_is_sigmoid(workdir):
    runs = {}
    for loss in ("dpo", "sigmoid"):
        r = run_cli("dpo", "--model", "base", "--data", "pairs.jsonl", "--output-dir", f"loss-{loss}",
                    "--max-steps", "2", "--batch-size", "4", "--lr", "1e-2", "--loss", loss, "--quiet", cwd=workdir)
        assert r.returncode == 0, r.stderr
        runs[loss] = [json.loads(x) for x in (workdir / f"loss-{loss}" / "metrics.jsonl").read_text().splitlines()]
    assert [row["loss"] for row in runs["dpo"]] == [row["loss"] for row in runs["sigmoid"]]
    assert runs["dpo"][1]["loss"] != runs["dpo"][0]["loss"]


@pytest.mark.parametrize("flags, name", [(["--beta", "0.2"], "beta"), (["--loss", "ipo"], "loss"),
                                         (["--ref-model", "base"], "ref_model"),
                                         (["--precompute-ref"], "precompute_ref")])
def test_sft_refuses_dpo_settings(workdir, flags, name):
    r = run_cli("sft", "--model", "base", "--data", "sft.jsonl", "--output-dir", "sft-x", *flags, cwd=workdir)
    assert_one_line_error(r, f"{name}:", "applies to DPO", "sft")
    assert not (workdir / "sft-x").exists()


def test_sft_refuses_dpo_settings_from_a_config_file(workdir):
    (workdir / "sft-beta.yaml").write_text("model: base\ndata: sft.jsonl\noutput_dir: sft-y\nbeta: 0.3\n")
    assert_one_line_error(run_cli("sft", "--config", "sft-beta.yaml", cwd=workdir), "beta", "applies to DPO")
    assert "--beta" not in run_cli("sft", "--help", cwd=workdir).stdout


def test_a_saved_sft_config_runs_again(workdir):
    r = run_cli("sft", "--model", "base", "--data", "sft.jsonl", "--output-dir", "sft-a", "--max-steps", "1",
                "--batch-size", "4", "--quiet", cwd=workdir)
    assert r.returncode == 0, r.stderr
    r = run_cli("sft", "--config", "sft-a/config.yaml", "--output-dir", "sft-b", "--quiet", cwd=workdir)
    assert r.returncode == 0, r.stderr
    first, again = (json.loads((workdir / d / "metrics.jsonl").read_text().splitlines()[0]) for d in ("sft-a", "sft-b"))
    assert first["loss"] == again["loss"]


def test_sft_refuses_undesirable_completions(workdir):
    rows = [{"prompt": "the capital of france is", "completion": " paris .", "label": True}] * 6
    rows.insert(3, {"prompt": "the capital of france is", "completion": " rome .", "label": False})
    write_jsonl(workdir / "unpaired.jsonl", rows)
    r = run_cli("sft", "--model", "base", "--data", "unpaired.jsonl", "--output-dir", "sft-u", "--max-steps", "1",
                "--batch-size", "2", cwd=workdir)
    assert_one_line_error(r, "unpaired.jsonl line 4", "label: false", "--skip-bad-records")
    r = run_cli("sft", "--model", "base", "--data", "unpaired.jsonl", "--output-dir", "sft-u", "--max-steps", "1",
                "--batch-size", "2", "--skip-bad-records", "--quiet", cwd=workdir)
    assert r.returncode == 0, r.stderr
    stats = json.loads((workdir / "sft-u" / "data_stats.json").read_text())
    assert stats["skipped_records"] == 1 and stats["train"]["total"] == 6


@pytest.mark.parametrize("command", [["eval", "--data", "pairs.jsonl"],
                                     ["dpo", "--data", "pairs.jsonl", "--output-dir", "never-made"]])
def test_a_missing_model_folder_fails_in_seconds_naming_the_flag(workdir, command):
    start = time.perf_counter()
    r = run_cli(*command, "--model", "runs/qwen-sft", cwd=workdir)
    line = assert_one_line_error(r, "--model runs/qwen-sft", "no local folder", "HF_HUB_OFFLINE")
    assert "tokenizer" not in line
    assert time.perf_counter() - start < 30  # the Python start and imports; the retries it replaced took ~49 s
    assert not (workdir / "never-made").exists()


def test_a_missing_reference_is_named_as_such(workdir):
    r = run_cli("eval", "--model", "base", "--ref-model", "runs/sft", "--data", "pairs.jsonl", cwd=workdir)
    assert_one_line_error(r, "--ref-model runs/sft", "no local folder")
    r = run_cli("dpo", "--model", "base", "--ref-model", "./gone", "--data", "pairs.jsonl", "--output-dir", "rr",
                cwd=workdir)
    assert_one_line_error(r, "--ref-model ./gone", "folder not found")
    assert not (workdir / "rr").exists()


def test_an_adapter_naming_its_base_by_a_relative_path_says_where_that_is_read_from(workdir):
    (workdir / "moved-adapter").mkdir()
    (workdir / "moved-adapter" / "adapter_config.json").write_text('{"base_model_name_or_path": "models/base"}')
    for name in ("tokenizer.json", "tokenizer_config.json"):  # an adapter folder holds its tokenizer
        shutil.copy(workdir / "base" / name, workdir / "moved-adapter" / name)
    r = run_cli("eval", "--model", "moved-adapter", "--data", "pairs.jsonl", cwd=workdir)
    assert_one_line_error(r, "adapter_config.json: base_model_name_or_path models/base", "no local folder",
                          "read from the current folder")
    (workdir / "moved-adapter" / "adapter_config.json").write_text('{"base_model_name_or_path": "../models/base"}')
    r = run_cli("eval", "--model", "moved-adapter", "--data", "pairs.jsonl", cwd=workdir)
    assert_one_line_error(r, "base_model_name_or_path ../models/base: folder not found", "read from the current folder")


def test_an_unreachable_hub_is_one_quick_attempt(workdir):
    # No network in tests: a proxy on a closed local port makes the one Hub request fail at once, as offline.
    r = run_cli("eval", "--model", "someone/some-model", "--data", "pairs.jsonl", cwd=workdir, HF_HUB_OFFLINE="0",
                HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9", NO_PROXY="", HF_HOME="hf-home")
    assert_one_line_error(r, "--model someone/some-model", "no local folder", "Hub could not be reached")


def test_an_unreachable_hub_is_one_quick_attempt_for_data_too(workdir):
    """A data name that is no file here and no reachable Hub dataset retried the network for half a minute."""
    start = time.monotonic()
    r = run_cli("data", "check", "someone/some-pairs", cwd=workdir, HF_HUB_OFFLINE="0", HF_HOME="hf-home",
                HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9", NO_PROXY="")
    assert_one_line_error(r, "someone/some-pairs: not a local file or folder", "the Hub could not be reached",
                          "no copy is cached")
    assert time.monotonic() - start < 15


def test_a_missing_metric_sink_fails_before_any_file(workdir):
    (workdir / "made-by-user").mkdir()
    (workdir / "made-by-user" / "notes.txt").write_text("mine")
    for out in ("sink-run", "made-by-user"):
        r = run_cli("dpo", "--model", "base", "--data", "pairs.jsonl", "--output-dir", out, "--report-to", "wandb",
                    cwd=workdir)
        assert_one_line_error(r, "wandb is not installed", "--report-to")
    assert not (workdir / "sink-run").exists()
    assert sorted(p.name for p in (workdir / "made-by-user").iterdir()) == ["notes.txt"]
    r = run_cli("dpo", "--model", "base", "--data", "pairs.jsonl", "--output-dir", "sink-run", "--max-steps", "1",
                "--batch-size", "4", "--quiet", cwd=workdir)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("premade", [False, True])
def test_a_run_failing_in_training_blocks_no_rerun(workdir, premade):
    out = workdir / f"diverged-{premade}"
    if premade:  # the user's own folder stays, with the user's own file; only the run's files go
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    args = ("sft", "--model", "base", "--data", "sft.jsonl", "--output-dir", out.name, "--max-steps", "3",
            "--batch-size", "4", "--warmup-steps", "0", "--quiet")
    r = run_cli(*args, "--lr", "1e30", cwd=workdir)  # step 1 writes config.yaml and metrics; step 2 diverges
    assert_one_line_error(r, "step 2", "not finite")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] if premade else not out.exists()
    r = run_cli(*args, "--lr", "1e-3", cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert (out / "results.json").is_file()


def test_a_failed_run_with_a_checkpoint_is_kept_for_resume(workdir):
    args = ("sft", "--model", "base", "--data", "sft.jsonl", "--output-dir", "kept", "--max-steps", "3",
            "--batch-size", "4", "--warmup-steps", "0", "--save-every", "1", "--quiet")
    r = run_cli(*args, "--lr", "1e30", cwd=workdir)
    assert_one_line_error(r, "step 2", "not finite")
    assert (workdir / "kept" / "checkpoints").is_dir() and (workdir / "kept" / "config.yaml").is_file()


def test_final_line_and_card_lead_with_the_eval_metrics(workdir):
    r = run_cli("dpo", "--model", "base", "--data", "pairs.jsonl", "--output-dir", "headline", "--max-steps", "2",
                "--batch-size", "4", "--lr", "1e-3", "--eval-split", "0.25", cwd=workdir)
    assert r.returncode == 0, r.stderr
    results = json.loads((workdir / "headline" / "results.json").read_text())
    last = r.stdout.strip().splitlines()[-1]
    assert last == (f"done: headline  eval_loss={results['eval_loss']:.4f}  "
                    f"eval_reward_accuracy={results['eval_reward_accuracy']:.4f}  "
                    f"eval_reward_margin={results['eval_reward_margin']:.4f}")
    rows = [json.loads(x) for x in (workdir / "headline" / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if "loss" in row]
    assert results["mean_loss"] == pytest.approx(sum(row["loss"] for row in train) / 2, rel=1e-12)
    assert results["mean_over_steps"] == 2
    card = (workdir / "headline" / "README.md").read_text()
    assert "datasets:\n- pairs.jsonl\n" in card and "of which 0 truncated" in card
