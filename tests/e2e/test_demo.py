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


@pytest.fixture(scope="module")
def held_out(finished) -> list[dict]:
    """The held-out pairs as the demo wrote them to its data folder."""
    lines = (finished / "data" / "held_out_pairs.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def recomputed(finished, held_out) -> dict[str, list[tuple[float, float]]]:
    """Per stage, (p(right), p(wrong)) of every held-out pair from the saved model: exp of the summed log-softmax
    over the answer tokens, EOS included, from one plain forward of prompt + answer, no preftune code involved."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = {}
    for stage in ("sft", "dpo", "online"):
        tok = AutoTokenizer.from_pretrained(finished / stage)
        model = AutoModelForCausalLM.from_pretrained(finished / stage).eval()
        probs = []
        for pair in held_out:
            prompt = tok(pair["prompt"])["input_ids"]
            both = []
            for side in ("chosen", "rejected"):
                answer = tok(pair[side], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                with torch.no_grad():
                    logp = torch.log_softmax(model(torch.tensor([prompt + answer])).logits[0].double(), -1)
                both.append(math.exp(sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(answer))))
            probs.append(tuple(both))
        out[stage] = probs
    return out


def test_summary_reports_every_held_out_pair_as_a_plain_forward_gives_it(summary, finished, held_out, recomputed):
    rows = summary["rows"]
    assert summary["held_out_pairs"] == len(rows) == len(held_out) == 96
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [
        (p["prompt"], p["chosen"], p["rejected"]) for p in held_out]
    for stage in ("sft", "dpo"):
        for i, (row, (right, wrong)) in enumerate(zip(rows, recomputed[stage])):
            assert row[f"{stage}_p_chosen"] == pytest.approx(right, rel=1e-4), (stage, i)
            assert row[f"{stage}_p_rejected"] == pytest.approx(wrong, rel=1e-4), (stage, i)
        assert summary[stage]["p_chosen"] == pytest.approx(sum(r for r, _ in recomputed[stage]) / 96, rel=1e-4)
        assert summary[stage]["p_rejected"] == pytest.approx(sum(w for _, w in recomputed[stage]) / 96, rel=1e-4)
    online = summary["online"]
    assert online["p_chosen"] == pytest.approx(sum(r for r, _ in recomputed["online"]) / 96, rel=1e-4)
    assert online["p_rejected"] == pytest.approx(sum(w for _, w in recomputed["online"]) / 96, rel=1e-4)
    # The online rounds trained on pairs (right city against wrong), as many steps in all as offline DPO.
    rounds = online["rounds"][1:]
    assert len(rounds) == 2 and all(r["pairs"] >= 16 for r in rounds)
    assert rounds[-1]["step"] == summary["dpo_steps"]
    assert (finished / "probabilities.png").is_file()


def test_held_out_accuracy_counts_the_sampled_answers_that_name_the_capital(summary, finished, held_out):
    """The accuracy in summary.json, recounted from the answers in held_out_samples.jsonl with a plain string test
    (the answer, stripped, is the pair's right city), and online DPO ahead of offline with the same steps.
    Fast mode, seed 0, measured: SFT 0.695, offline 0.816, online 0.859 of 1536 answers each."""
    acc = summary["sampled_accuracy"]
    right_city = {p["prompt"]: p["chosen"].strip() for p in held_out}
    rows = [json.loads(line) for line in (finished / "held_out_samples.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["sft"] * 96 + ["dpo"] * 96 + ["online"] * 96
    for stage in ("sft", "dpo", "online"):
        mine = [r for r in rows if r["stage"] == stage]
        assert [r["prompt"] for r in mine] == [p["prompt"] for p in held_out]
        assert all(len(r["answers"]) == len(r["scores"]) == acc["samples"] == 16 for r in mine)
        right = sum(a.strip() == right_city[r["prompt"]] for r in mine for a in r["answers"])
        assert (acc[stage]["right"], acc[stage]["answers"]) == (right, 96 * 16), stage
        assert acc[stage]["accuracy"] == right / (96 * 16)
    assert acc["dpo"]["accuracy"] > acc["sft"]["accuracy"] + 0.06
    assert acc["online"]["accuracy"] > acc["dpo"]["accuracy"] + 0.02


def test_run_folders_hold_loadable_models(finished):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for stage in ("sft", "dpo"):
        run = finished / stage
        assert (run / "config.yaml").is_file() and (run / "results.json").is_file()
        model = AutoModelForCausalLM.from_pretrained(run)
        assert model.config.model_type == "llama"
        AutoTokenizer.from_pretrained(run)


def test_dpo_raises_p_right_and_lowers_p_wrong_on_every_held_out_pair(summary, recomputed):
    """The demo's claim, from the recomputed probabilities: on prompts in phrasings DPO never saw, DPO made the
    right city more likely and the wrong one less likely than SFT left them, pair by pair and on average.
    Fast mode, seed 0, measured: every p(right) up by 0.071 or more, every p(wrong) down by 0.075 or more; means
    0.679 -> 0.799 and 0.268 -> 0.143."""
    sft, dpo = recomputed["sft"], recomputed["dpo"]
    for i, ((s_right, s_wrong), (d_right, d_wrong)) in enumerate(zip(sft, dpo)):
        assert d_right > s_right + 0.03, i
        assert d_wrong < s_wrong - 0.03, i
    mean = {stage: [sum(p[j] for p in recomputed[stage]) / len(sft) for j in (0, 1)] for stage in recomputed}
    assert mean["dpo"][0] > mean["sft"][0] + 0.06
    assert mean["dpo"][1] < mean["sft"][1] - 0.06
    # Reward accuracy against the SFT reference: the share of pairs whose log p(right) - log p(wrong) grew.
    grew = [math.log(dr / dw) > math.log(sr / sw) for (sr, sw), (dr, dw) in zip(sft, dpo)]
    assert summary["dpo"]["reward_accuracy"] == sum(grew) / len(grew) == 1.0


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
