"""`preftune demo --fast` end to end: summary.json, the run folders, and that DPO moved held-out preferences."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROB_KEYS = ("sft_p_chosen", "sft_p_rejected", "dpo_p_chosen", "dpo_p_rejected")


def demo(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "preftune", "demo", "--out", str(out), "--fast"], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "out"
    r = demo(out)
    assert r.returncode == 0, r.stderr
    assert "reward accuracy" in r.stdout
    return out


@pytest.fixture(scope="module")
def summary(finished) -> dict:
    return json.loads((finished / "summary.json").read_text())


def test_summary_holds_means_and_rows_in_range(summary, finished):
    for stage in ("sft", "dpo"):
        for key in ("p_chosen", "p_rejected"):
            assert 0.0 <= summary[stage][key] <= 1.0
    assert 0.0 <= summary["dpo"]["reward_accuracy"] <= 1.0
    rows = summary["rows"]
    assert len(rows) == summary["held_out_pairs"] > 0
    for row in rows:
        assert {"prompt", "chosen", "rejected", *PROB_KEYS} <= set(row)
        assert all(0.0 <= row[k] <= 1.0 for k in PROB_KEYS)
        assert row["sft_p_chosen"] + row["sft_p_rejected"] <= 1.0 + 1e-6  # two answers of one prompt
    for stage in ("sft", "dpo"):
        for key in ("p_chosen", "p_rejected"):
            assert summary[stage][key] == pytest.approx(sum(r[f"{stage}_{key}"] for r in rows) / len(rows))
    assert (finished / "probabilities.png").is_file()


def test_run_folders_hold_loadable_models(finished):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for stage in ("sft", "dpo"):
        run = finished / stage
        assert (run / "config.yaml").is_file() and (run / "results.json").is_file()
        model = AutoModelForCausalLM.from_pretrained(run)
        assert model.config.model_type == "llama"
        AutoTokenizer.from_pretrained(run)


def test_probabilities_equal_a_direct_forward(summary, finished):
    """exp(sum of log-softmax over the answer tokens, EOS included), computed with a plain forward."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    row = summary["rows"][len(summary["rows"]) // 2]
    for stage in ("sft", "dpo"):
        tok = AutoTokenizer.from_pretrained(finished / stage)
        model = AutoModelForCausalLM.from_pretrained(finished / stage).eval()
        prompt = tok(row["prompt"])["input_ids"]
        for side in ("chosen", "rejected"):
            answer = tok(row[side], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = torch.tensor([prompt + answer])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].double(), -1)
            total = sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(answer))
            assert row[f"{stage}_p_{side}"] == pytest.approx(math.exp(total), rel=1e-4)


def test_dpo_moves_held_out_preferences_toward_the_right_answer(summary):
    rows = summary["rows"]
    # Per pair, how much DPO raised log p(chosen) - log p(rejected) over SFT: exactly 0 if DPO changed nothing.
    gains = [math.log(r["dpo_p_chosen"] / r["dpo_p_rejected"]) - math.log(r["sft_p_chosen"] / r["sft_p_rejected"])
             for r in rows]
    assert sum(gains) / len(gains) > 0.4  # measured 0.84 nats in fast mode, no pair below 0.5
    # Reward accuracy against the SFT reference is the share of pairs whose log-ratio gap grew.
    assert summary["dpo"]["reward_accuracy"] == pytest.approx(sum(g > 0 for g in gains) / len(gains), abs=1e-6)
    assert summary["dpo"]["reward_accuracy"] >= 0.9
    sft, dpo = summary["sft"], summary["dpo"]
    assert dpo["p_chosen"] / dpo["p_rejected"] > 1.5 * sft["p_chosen"] / sft["p_rejected"]  # measured 2.3x


def test_a_finished_demo_is_shown_again_not_overwritten(finished):
    # `make demo` twice: the second run succeeds at once, showing the first one's results.
    before = {p: p.read_bytes() for p in finished.rglob("*") if p.is_file()}
    start = time.perf_counter()
    r = demo(finished)
    assert r.returncode == 0, r.stderr
    assert time.perf_counter() - start < 30  # a rerun would take minutes
    assert "already holds a finished demo" in r.stdout and r.stderr == ""
    summary = json.loads(before[finished / "summary.json"])
    assert f"reward accuracy {summary['dpo']['reward_accuracy']:.2f}" in r.stdout.splitlines()[-1]
    assert {p: p.read_bytes() for p in finished.rglob("*") if p.is_file()} == before
