"""`preftune kto` end to end on a tiny model (the same run folder as DPO), `data show`/`check` on unpaired files,
and bad input: one line, exit 2, no traceback, no run folder left behind."""

from __future__ import annotations

import json

import pytest
import yaml
from tinylm import write_jsonl
from .userland import assert_one_line_error, run_cli

pytestmark = pytest.mark.slow


def unpaired_rows(n: int) -> list[dict]:
    prompts = ["the capital of france is", "the sky is blue and the capital of france is"]
    return [{"prompt": prompts[i % 2], "completion": " paris ." if i % 3 else " rome .", "label": bool(i % 3),
             "rater": "a"} for i in range(n)]


@pytest.fixture(scope="module")
def kto_dir(workdir):
    write_jsonl(workdir / "unpaired.jsonl", unpaired_rows(24))
    write_jsonl(workdir / "tagged.jsonl", [
        {"conversations": [{"from": "human", "value": "what is the capital of spain ?"},
                           {"from": "gpt", "value": "madrid is the capital of spain ." if i % 2 else "rome ."}],
         "kto_tag": bool(i % 2)} for i in range(8)])
    r = run_cli("kto", "--model", "base", "--data", "unpaired.jsonl", "--output-dir", "kto", "--max-steps", "8",
                "--batch-size", "4", "--lr", "2e-3", "--eval-split", "0.2", "--warmup-steps", "0", cwd=workdir)
    assert r.returncode == 0, r.stderr
    return workdir, r


def test_kto_run_folder_is_complete(kto_dir):
    from transformers import AutoModelForCausalLM

    workdir, r = kto_dir
    run = workdir / "kto"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if "loss" in row]
    keys = {"loss", "kl", "lr", "grad_norm", "samples_per_s"}
    assert [row["step"] for row in train] == list(range(1, 9)) and all(keys <= set(row) for row in train)
    # A class's means are logged on the steps whose batches hold that class.
    for name in ("desirable", "undesirable"):
        assert any({f"{name}_reward", f"{name}_logp"} <= set(row) for row in train)
    # The policy starts as its own reference: every log-ratio is 0, each example's loss 1 - σ(0) = 0.5.
    assert train[0]["loss"] == pytest.approx(0.5, abs=1e-6) and train[0]["kl"] == 0.0
    assert train[-1]["loss"] < train[0]["loss"]
    assert rows[-1]["eval_desirable_reward"] > 0 > rows[-1]["eval_undesirable_reward"]
    assert "eval_loss" in rows[-1] and "eval_kl" in rows[-1]
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["stage"] == "kto" and config["lr"] == 2e-3
    assert {"loss.png", "kto.png"} <= {p.name for p in (run / "plots").iterdir()}
    assert "KTO" in (run / "README.md").read_text()
    AutoModelForCausalLM.from_pretrained(run)
    # Two thirds desirable: far outside the paper's balance with equal weights, so its advice is printed.
    assert "outside the [1, 4/3] the KTO paper advises" in r.stderr
    assert "rater" in r.stderr  # the unused key is reported, not silently dropped


def test_kto_on_kto_tag_conversations_and_on_pairs_with_the_flag(kto_dir):
    workdir, _ = kto_dir
    r = run_cli("kto", "--model", "base", "--data", "tagged.jsonl", "--output-dir", "kto-tag", "--max-steps", "2",
                "--batch-size", "4", "--quiet", cwd=workdir)
    assert r.returncode == 0, r.stderr
    r = run_cli("kto", "--model", "base", "--data", "pairs.jsonl", "--output-dir", "kto-pairs", "--max-steps", "2",
                "--batch-size", "4", "--paired-as-unpaired", "--quiet", cwd=workdir)
    assert r.returncode == 0, r.stderr
    stats = json.loads((workdir / "kto-pairs" / "data_stats.json").read_text())
    assert stats["train"]["total"] == 64  # 32 pairs, two examples each


def test_data_show_and_check_know_unpaired_files(kto_dir):
    workdir, _ = kto_dir
    r = run_cli("data", "show", "unpaired.jsonl", "-n", "2", "--model", "base", cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert "unpaired feedback" in r.stdout and "(undesirable)" in r.stdout and "(desirable)" in r.stdout
    assert " rome .<eos>" in r.stdout
    r = run_cli("data", "check", "tagged.jsonl", cwd=workdir)
    assert r.returncode == 0 and "4 desirable, 4 undesirable" in r.stdout


@pytest.mark.parametrize("command, data, needles", [
    ("dpo", "unpaired.jsonl", ("unpaired feedback", "preftune kto")),
    ("kto", "pairs.jsonl", ("preference pair", "--paired-as-unpaired")),
    ("kto", "labels.jsonl", ("labels.jsonl line 2", "'label' must be true")),
])
def test_bad_input_is_one_line_and_leaves_nothing(kto_dir, command, data, needles):
    workdir, _ = kto_dir
    write_jsonl(workdir / "labels.jsonl", [{"prompt": "a", "completion": " b", "label": True},
                                           {"prompt": "a", "completion": " c", "label": 2}])
    out = f"bad-{command}-{data}"
    r = run_cli(command, "--model", "base", "--data", data, "--output-dir", out, "--max-steps", "1", cwd=workdir)
    assert_one_line_error(r, *needles)
    assert not (workdir / out).exists()
