"""The whole CLI on a tiny model: SFT, then DPO from the SFT model, then eval; and how it treats bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "preftune", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sft_then_dpo(workdir) -> Path:
    r = cli("sft", "--model", "base", "--data", "sft.jsonl", "--output-dir", "sft", "--max-steps", "4",
            "--batch-size", "4", "--lr", "1e-3", "--quiet", cwd=workdir)
    assert r.returncode == 0, r.stderr
    # --quiet prints only errors and the final line (it printed nothing at all)
    assert r.stdout.startswith("done: sft  ") and r.stdout.count("\n") == 1 and r.stderr == ""
    r = cli("dpo", "--model", "sft", "--data", "pairs.jsonl", "--output-dir", "dpo", "--max-steps", "12",
            "--batch-size", "4", "--lr", "2e-3", "--beta", "0.1", "--warmup-steps", "0", cwd=workdir)
    assert r.returncode == 0, r.stderr
    return workdir


def test_sft_run_folder_is_complete(sft_then_dpo):
    from transformers import AutoModelForCausalLM

    run = sft_then_dpo / "sft"
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all({"loss", "lr", "grad_norm", "samples_per_s"} <= set(r) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    AutoModelForCausalLM.from_pretrained(run)          # loads back into plain transformers
    assert (run / "config.yaml").is_file() and (run / "tokenizer_config.json").is_file()


def test_dpo_loss_falls_and_preferences_move(sft_then_dpo):
    rows = metrics(sft_then_dpo / "dpo")
    keys = {"loss", "lr", "grad_norm", "pairs_per_s", "reward_accuracy", "reward_margin", "chosen_reward",
            "rejected_reward", "chosen_logp", "rejected_logp"}
    assert all(keys <= set(r) for r in rows)
    # Policy starts equal to the reference: every reward is 0, the loss is log 2, no pair is "won" yet.
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert rows[0]["reward_accuracy"] == 0.0
    assert rows[-1]["loss"] < 0.6 * math.log(2)
    assert rows[-1]["reward_accuracy"] == 1.0 and rows[-1]["reward_margin"] > 0


def test_eval_on_training_pairs(sft_then_dpo):
    d = sft_then_dpo
    before = cli("eval", "--model", "sft", "--ref-model", "sft", "--data", "pairs.jsonl", cwd=d)
    after = cli("eval", "--model", "dpo", "--ref-model", "sft", "--data", "pairs.jsonl", "--output", "rows.jsonl",
                cwd=d)
    assert before.returncode == 0 and after.returncode == 0, after.stderr
    b, a = json.loads(before.stdout), json.loads(after.stdout)
    assert b["pairs"] == a["pairs"] == 32
    assert b["reward_accuracy"] == 0.0 and b["reward_margin"] == 0.0
    assert a["reward_accuracy"] > 0.9 and a["reward_margin"] > 0 and a["logratio_chosen"] > 0
    rows = [json.loads(x) for x in (d / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 32
    assert {"policy_chosen_logp", "policy_rejected_logp", "ref_chosen_logp", "ref_rejected_logp"} <= set(rows[0])
    mean_margin = sum(0.1 * ((r["policy_chosen_logp"] - r["ref_chosen_logp"])
                             - (r["policy_rejected_logp"] - r["ref_rejected_logp"])) for r in rows) / 32
    assert mean_margin == pytest.approx(a["reward_margin"], rel=1e-5)


def _one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [x for x in r.stderr.strip().splitlines() if x]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_data_file(workdir):
    r = cli("dpo", "--model", "base", "--data", "nope.jsonl", "--output-dir", "x1", cwd=workdir)
    _one_line_error(r, "nope.jsonl")


def test_malformed_config(workdir):
    (workdir / "bad.yaml").write_text("model: base\nbta: 0.1\n")
    _one_line_error(cli("dpo", "--config", "bad.yaml", cwd=workdir), "bad.yaml", "bta", "beta")
    (workdir / "bad2.yaml").write_text("model: base\nbeta: [1, 2]\n")
    _one_line_error(cli("dpo", "--config", "bad2.yaml", cwd=workdir), "bad2.yaml", "beta")


def test_unknown_loss(workdir):
    r = cli("dpo", "--model", "base", "--data", "pairs.jsonl", "--output-dir", "x2", "--loss", "dpoo", cwd=workdir)
    _one_line_error(r, "dpoo", "sigmoid")


def test_model_folder_that_is_not_a_causal_lm(workdir):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(workdir / "bert")
    (workdir / "bert" / "tokenizer.json").write_bytes((workdir / "base" / "tokenizer.json").read_bytes())
    (workdir / "bert" / "tokenizer_config.json").write_bytes((workdir / "base" / "tokenizer_config.json").read_bytes())
    r = cli("dpo", "--model", "bert", "--data", "pairs.jsonl", "--output-dir", "x3", "--max-steps", "1", cwd=workdir)
    _one_line_error(r, "bert", "causal")
    _one_line_error(cli("dpo", "--model", "no-such-dir/", "--data", "pairs.jsonl", "--output-dir", "x4",
                        cwd=workdir), "no-such-dir")


def test_finished_run_is_not_overwritten(sft_then_dpo):
    d = sft_then_dpo
    before = {p.name: p.read_bytes() for p in (d / "dpo").iterdir() if p.is_file()}
    r = cli("dpo", "--model", "sft", "--data", "pairs.jsonl", "--output-dir", "dpo", "--max-steps", "1", cwd=d)
    _one_line_error(r, "dpo", "already holds a run", "--overwrite")
    after = {p.name: p.read_bytes() for p in (d / "dpo").iterdir() if p.is_file()}
    assert before == after


def test_saved_config_runs_again(sft_then_dpo):
    d = sft_then_dpo
    saved = (d / "dpo" / "config.yaml").read_text()
    assert "lr: 0.002" in saved and "stage: dpo" in saved
    r = cli("dpo", "--config", "dpo/config.yaml", "--output-dir", "dpo-again", "--max-steps", "1", "--quiet", cwd=d)
    assert r.returncode == 0, r.stderr
    first, again = metrics(d / "dpo")[0], metrics(d / "dpo-again")[0]
    assert again["loss"] == first["loss"] and again["chosen_logp"] == first["chosen_logp"]
    r = cli("sft", "--config", "dpo/config.yaml", "--output-dir", "x5", cwd=d)
    _one_line_error(r, "dpo/config.yaml", "preftune dpo")


def test_bad_data_leaves_no_empty_run_folder(workdir):
    (workdir / "broken.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": \n')
    r = cli("dpo", "--model", "base", "--data", "broken.jsonl", "--output-dir", "never", cwd=workdir)
    _one_line_error(r, "broken.jsonl line 2")
    assert not (workdir / "never").exists()
