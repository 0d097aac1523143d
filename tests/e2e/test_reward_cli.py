"""`preftune rm` then `preftune score` on the command line, and the inputs they refuse with one line."""

from __future__ import annotations

import json

import pytest

from tinylm import fact_pairs, write_jsonl
from .test_cli import _one_line_error, cli, metrics


@pytest.fixture(scope="module")
def rm_run(workdir):
    rows = [{**row, "margin": (i % 2) * 0.5} for i, row in enumerate(fact_pairs(32))]
    write_jsonl(workdir / "margins.jsonl", rows)
    r = cli("rm", "--model", "base", "--data", "margins.jsonl", "--output-dir", "rm", "--max-steps", "8",
            "--batch-size", "4", "--lr", "3e-3", "--center-rewards", "0.01", "--eval-split", "0.25",
            "--eval-every", "4", "--save-every", "4", cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert "margin" not in r.stderr  # the column is used, not reported as an unused key
    return workdir


def test_rm_run_folder(rm_run):
    from transformers import AutoModelForSequenceClassification

    run = rm_run / "rm"
    for name in ("config.yaml", "metrics.jsonl", "results.json", "README.md", "model.safetensors", "plots"):
        assert (run / name).exists(), name
    assert "stage: rm" in (run / "config.yaml").read_text()
    rows = metrics(run)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 9)) and [r["step"] for r in evals] == [4, 8]
    assert {"reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward"} <= set(train[0])
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    model = AutoModelForSequenceClassification.from_pretrained(run)
    assert model.config.num_labels == 1


def test_score_pairs_prints_a_summary_and_writes_rows(rm_run):
    r = cli("score", "--model", "rm", "--data", "margins.jsonl", "--output", "scores.jsonl", cwd=rm_run)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    rows = [json.loads(line) for line in (rm_run / "scores.jsonl").read_text().splitlines()]
    assert summary["pairs"] == len(rows) == 32
    agree = sum(row["agrees"] for row in rows) / 32
    assert summary["agreement"] == pytest.approx(agree) and agree == 1.0
    margin = sum(row["chosen_reward"] - row["rejected_reward"] for row in rows) / 32
    assert summary["mean_margin"] == pytest.approx(margin, abs=1e-6) and margin > 0
    assert rows[1]["margin"] == 0.5 and rows[1]["where"] == "margins.jsonl line 2"


def test_score_single_answers(rm_run):
    answers = [{"prompt": "the capital of france is", "completion": c, "label": c == " paris ."}
               for c in (" paris .", " rome .")]
    write_jsonl(rm_run / "answers.jsonl", answers)
    r = cli("score", "--model", "rm", "--data", "answers.jsonl", cwd=rm_run)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["answers"] == 2
    assert summary["desirable_mean_reward"] > summary["undesirable_mean_reward"]


def test_score_and_eval_read_a_tokenizer_kept_apart(rm_run):
    """A model folder without tokenizer files (weights copied on their own) is read with --tokenizer."""
    import shutil

    bare = rm_run / "rm-bare"
    bare.mkdir(exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(rm_run / "rm" / name, bare / name)
    r = cli("score", "--model", "rm-bare", "--data", "margins.jsonl", cwd=rm_run)
    _one_line_error(r, "rm-bare", "tokenizer")
    r = cli("score", "--model", "rm-bare", "--tokenizer", "rm", "--data", "margins.jsonl", cwd=rm_run)
    assert r.returncode == 0, r.stderr
    whole = json.loads(cli("score", "--model", "rm", "--data", "margins.jsonl", cwd=rm_run).stdout)
    assert json.loads(r.stdout) == whole
    lm = rm_run / "base-bare"
    lm.mkdir(exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(rm_run / "base" / name, lm / name)
    r = cli("eval", "--model", "base-bare", "--tokenizer", "base", "--data", "margins.jsonl", cwd=rm_run)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == json.loads(cli("eval", "--model", "base", "--data", "margins.jsonl",
                                                  cwd=rm_run).stdout)
    prompt = ("--prompt", "the capital of france is", "--max-new-tokens", "3")
    r = cli("generate", "--model", "base-bare", "--tokenizer", "base", *prompt, cwd=rm_run)
    assert r.returncode == 0, r.stderr
    assert r.stdout.replace("base-bare", "base") == cli("generate", "--model", "base", *prompt, cwd=rm_run).stdout
    for command, model in (("score", "rm-bare"), ("eval", "base-bare"), ("generate", "base-bare")):
        extra = prompt if command == "generate" else ("--data", "margins.jsonl")
        r = cli(command, "--model", model, "--tokenizer", "nowhere", *extra, cwd=rm_run)
        _one_line_error(r, "--tokenizer nowhere:", "no local folder of that name")


def test_refused_inputs(rm_run):
    d = rm_run
    _one_line_error(cli("score", "--model", "base", "--data", "margins.jsonl", cwd=d), "base", "not a reward model")
    write_jsonl(d / "unpaired.jsonl", [{"prompt": "a", "completion": " b", "label": True}] * 4)
    r = cli("rm", "--model", "base", "--data", "unpaired.jsonl", "--output-dir", "rm-bad", cwd=d)
    _one_line_error(r, "unpaired.jsonl line 1", "pairs")
    assert not (d / "rm-bad").exists()
    _one_line_error(cli("dpo", "--model", "base", "--data", "margins.jsonl", "--output-dir", "x", "--center-rewards",
                        "0.1", cwd=d), "center_rewards", "preftune rm")
    _one_line_error(cli("rm", "--model", "base", "--data", "margins.jsonl", "--output-dir", "x", "--fsdp", cwd=d),
                    "fsdp")
