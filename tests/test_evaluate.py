"""Evaluation log-probs equal a direct forward; reference-free losses never load a reference; generation runs."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from tinylm import fact_pairs, make_tokenizer, write_jsonl

from preftune.cli import main
from preftune.config import TrainConfig
from preftune.data.records import PreferencePair
from preftune.data.tokenize import tokenize_all
from preftune.metrics import logps_table, preference_metrics
from preftune.models.load import load_model
import preftune.training.setup as run_setup


def _direct(model, prompt_ids, answer_ids) -> float:
    ids = torch.tensor([prompt_ids + answer_ids])
    logits = model(input_ids=ids).logits[0]
    logp = F.log_softmax(logits.double(), dim=-1)
    return sum(float(logp[len(prompt_ids) - 1 + t, a]) for t, a in enumerate(answer_ids))


def test_eval_logps_equal_a_direct_forward(tiny_model_dir):
    tok = make_tokenizer()
    model = load_model(str(tiny_model_dir), device=torch.device("cpu"), dtype=torch.float32).eval()
    raw = [PreferencePair(p["prompt"], p["chosen"], p["rejected"]) for p in fact_pairs(7)]
    raw.append(PreferencePair("cats", " chase mice and dogs chase cats .", "!"))
    items, _ = tokenize_all(tok, raw, max_length=64)
    table = logps_table(model, items, pad_id=tok.pad_token_id, device="cpu", batch_size=3, chunk_size=5)
    with torch.no_grad():
        for i, it in enumerate(items):
            assert abs(table[i, 0] - _direct(model, it.prompt_ids, it.chosen_ids)) < 1e-4
            assert abs(table[i, 1] - _direct(model, it.prompt_ids, it.rejected_ids)) < 1e-4


def test_preference_metrics_by_hand():
    policy = torch.tensor([[-1.0, -3.0], [-2.0, -1.0]])
    ref = torch.tensor([[-2.0, -2.0], [-2.0, -2.0]])
    m = preference_metrics(policy, ref, beta=0.5)
    # rewards: pair 0: (0.5, -0.5) margin 1; pair 1: (0, 0.5) margin -0.5
    assert m["reward_accuracy"] == 0.5
    assert abs(m["reward_margin"] - 0.25) < 1e-7
    assert abs(m["logratio_chosen"] - 0.5) < 1e-7
    assert abs(m["chosen_reward"] - 0.25) < 1e-7 and abs(m["rejected_reward"] - 0.0) < 1e-7


def test_reference_free_loss_loads_no_reference(tiny_model_dir, tmp_path, monkeypatch):
    loads = []

    def counting_load(name, **kw):
        loads.append(name)
        return load_model(name, **kw)

    monkeypatch.setattr(run_setup, "load_model", counting_load)
    from preftune.training.loop import run

    # Chosen answers of different lengths, so a token mean and a mean of per-answer means differ.
    rows = [{**r, "chosen": r["chosen"] + " paris ." * (i % 3)} for i, r in enumerate(fact_pairs(8))]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    # The one step sees all 8 pairs under the starting weights: its loss is the paper's formula on plain forwards.
    tok = make_tokenizer()
    items, _ = tokenize_all(tok, [PreferencePair(p["prompt"], p["chosen"], p["rejected"]) for p in rows],
                            max_length=64)
    model = load_model(str(tiny_model_dir), device=torch.device("cpu"), dtype=torch.float32).eval()
    with torch.no_grad():
        means = [(_direct(model, it.prompt_ids, it.chosen_ids) / len(it.chosen_ids),
                  _direct(model, it.prompt_ids, it.rejected_ids) / len(it.rejected_ids)) for it in items]
    beta, gamma = 2.0, 0.5

    def log_sigmoid(x: float) -> float:
        return -math.log1p(math.exp(-x))

    def log_odds(mean_logp: float) -> float:  # log(p / (1 - p)) of the per-token mean probability p
        p = math.exp(mean_logp)
        return math.log(p) - math.log1p(-p)

    # ORPO's NLL term as TRL's ORPOTrainer takes it: per chosen token of the batch (a token mean, not a mean of
    # per-answer means).
    chosen_tokens = [len(it.chosen_ids) for it in items]
    nll = -sum(w * n for (w, _), n in zip(means, chosen_tokens)) / sum(chosen_tokens)
    expected = {  # SimPO (Meng et al. 2024, eq. 6); ORPO (Hong et al. 2024, eqs. 4-7)
        "simpo": sum(-log_sigmoid(beta * (w - l) - gamma) for w, l in means) / len(means),
        "orpo": nll + sum(-beta * log_sigmoid(log_odds(w) - log_odds(l)) for w, l in means) / len(means),
    }
    for loss in ("simpo", "orpo"):
        cfg = TrainConfig(stage="dpo", model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / loss),
                          loss=loss, beta=beta, simpo_gamma=gamma, max_steps=1, batch_size=8, lr=1e-3,
                          max_length=64, dtype="float32", device="cpu", quiet=True)
        loads.clear()
        final = run(cfg, command="test")
        assert loads == [str(tiny_model_dir)]          # the policy only
        assert final["loss"] == pytest.approx(expected[loss], abs=1e-4)
    loads.clear()
    run(TrainConfig(stage="dpo", model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / "dpo"),
                    max_steps=1, batch_size=4, quiet=True), command="test")
    assert len(loads) == 2                                # policy and reference


def test_generate_side_by_side(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "g.jsonl"
    code = main(["generate", "--model", str(tiny_model_dir), "--ref-model", str(tiny_model_dir),
                 "--prompt", "the capital of france is", "--max-new-tokens", "4", "--output", str(out)])
    assert code == 0
    row = json.loads(out.read_text())
    assert row["prompt"] == "the capital of france is"
    assert row["policy"] == row["reference"]             # same weights, greedy: same answer
    assert "policy" in capsys.readouterr().out


def test_generate_refuses_n_with_one_prompt(tiny_model_dir, capsys):
    """-n counts prompts taken from --data; beside --prompt it was ignored without a word."""
    code = main(["generate", "--model", str(tiny_model_dir), "--prompt", "hi", "-n", "5"])
    err = capsys.readouterr().err
    assert code == 2 and "-n: counts prompts taken from --data" in err and len(err.strip().splitlines()) == 1


def test_generate_past_a_learned_position_table_is_one_line(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel
    from tinylm import make_tokenizer

    tok = make_tokenizer()
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=16, n_layer=1, n_head=2,
                               eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    prompt = "the capital of france is"
    n = len(tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True, add_generation_prompt=True,
                                    return_dict=True)["input_ids"])  # the prompt as generate renders it
    capsys.readouterr()
    code = main(["generate", "--model", str(tmp_path), "--prompt", prompt, "--max-new-tokens", "40"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"a prompt of {n} tokens plus 40 new ones passes the 32 positions" in err and f"at most {32 - n}" in err
    assert main(["generate", "--model", str(tmp_path), "--prompt", prompt, "--max-new-tokens", str(32 - n)]) == 0


def test_eval_output_never_replaces_its_data_file(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", fact_pairs(4))
    before = data.read_bytes()
    under_a_file = data / "rows.jsonl"                   # its folder is the data file
    for output, words in ((data, "is the --data file"), (tmp_path, "is a folder"),
                          (under_a_file, f"{data} is a file, not a folder")):
        code = main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(output)])
        err = capsys.readouterr().err
        assert code == 2 and words in err and "Traceback" not in err
    assert data.read_bytes() == before


@pytest.mark.parametrize("command, flags, words", [
    ("eval", ["--batch-size", "0"], "batch_size: must be at least 1"),
    ("eval", ["--limit=-3"], "limit: must be at least 1"),
    ("eval", ["--beta", "0"], "beta: must be a positive number"),
    ("eval", ["--dtype", "float99"], "--dtype float99: not one of auto, mixed"),
    ("eval", ["--device", "tpu"], "--device tpu: not a device name"),
    ("generate", ["--max-new-tokens", "0"], "--max-new-tokens: must be at least 1"),
    ("generate", ["--top-p", "2"], "--top-p: must be in (0, 1]"),
    ("generate", ["--temperature=-1"], "--temperature: must be 0 (greedy) or more"),
])
def test_bad_values_for_eval_and_generate_are_one_line(tiny_model_dir, tmp_path, capsys, command, flags, words):
    data = write_jsonl(tmp_path / "pairs.jsonl", fact_pairs(4))
    code = main([command, "--model", str(tiny_model_dir), "--data", str(data), *flags])
    err = capsys.readouterr().err
    assert code == 2 and words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_sequences_past_a_learned_position_table_and_bad_lengths_are_one_line(tmp_path):
    """eval, score and training indexed past GPT-2's position table (an IndexError deep in the forward) when
    --max-length was above it; a --max-prompt-length below 1 crashed eval and score."""
    import transformers
    import preftune
    from preftune.errors import ConfigError

    tok = make_tokenizer()
    config = transformers.GPT2Config(vocab_size=len(tok), n_positions=12, n_embd=16, n_layer=1, n_head=2,
                                     pad_token_id=tok.pad_token_id)
    model = transformers.GPT2LMHeadModel(config).eval()
    pairs = [{"prompt": "the capital of france is", "chosen": " paris . the sky is blue and grass is green .",
              "rejected": " rome ."}]
    with pytest.raises(ConfigError, match=r"^--max-length: the model given has a position table of 12 positions, "
                                          r"and the data holds sequences of up to \d+ tokens; pass --max-length 12"):
        preftune.evaluate(model=model, tokenizer=tok, data=pairs, device="cpu", dtype="float32")
    assert preftune.evaluate(model=model, tokenizer=tok, data=pairs, device="cpu", dtype="float32",
                             max_length=12).summary["pairs"] == 1
    with pytest.raises(ConfigError, match=r"^--max-length: the model given has a position table of 12 positions"):
        preftune.train("dpo", model=model, tokenizer=tok, data=pairs * 2, batch_size=2, max_steps=1, device="cpu",
                       dtype="float32")
    with pytest.raises(ConfigError, match=r"^max_prompt_length: must be at least 1 \(or left out\), got 0$"):
        preftune.evaluate(model=model, tokenizer=tok, data=pairs, max_prompt_length=0)
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    assert main(["data", "check", str(data), "--max-length", "-5"]) == 2
    assert main(["data", "show", str(data), "--max-prompt-length", "0"]) == 2


def test_a_bad_record_in_eval_is_not_told_of_a_flag_eval_lacks(tmp_path, tiny_model_dir):
    """eval, score and generate said "or pass --skip-bad-records", a flag they do not have."""
    import preftune
    from preftune.data.load import load_pairs
    from preftune.errors import DataError

    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": 3, "rejected": "b"}\n')
    with pytest.raises(DataError, match=r"line 2: .*; fix the record$"):
        preftune.evaluate(model=tiny_model_dir, data=str(data), device="cpu", dtype="float32")
    with pytest.raises(DataError, match=r"; fix the record, or pass --skip-bad-records"):
        load_pairs(str(data))  # training reads have the flag


def test_eval_says_on_stderr_how_many_pairs_it_left_out_or_cut(tmp_path, tiny_model_dir, capsys):
    """The counts were only in the JSON summary, beside a reward accuracy over the pairs that were left."""
    long_prompt = " ".join(["the capital of france is paris ."] * 20)
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": long_prompt, "chosen": " a", "rejected": " b"},
                                                   {"prompt": "q", "chosen": " paris . " * 20, "rejected": " b"},
                                                   {"prompt": "q", "chosen": " a", "rejected": " b"}])
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--max-length", "32",
                 "--device", "cpu", "--dtype", "float32"]) == 0
    out = capsys.readouterr()
    summary = json.loads(out.out)
    assert (summary["pairs"], summary["dropped_pairs"], summary["truncated_pairs"]) == (2, 1, 1)
    assert "preftune: 1 pairs left out (the prompt alone does not fit --max-length 32) and 1 truncated" in out.err
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--max-length", "512",
                 "--device", "cpu", "--dtype", "float32"]) == 0
    assert "left out" not in capsys.readouterr().err


def test_eval_of_a_run_folder_takes_the_run_s_beta(tiny_model_dir, tmp_path):
    """eval rewarded with beta 0.1 whatever the run trained with, so its margins were not the run's."""
    import preftune

    pairs = fact_pairs(8)
    result = preftune.train("dpo", model=tiny_model_dir, data=pairs, eval_data=pairs, output_dir=tmp_path / "run",
                            beta=0.3, max_steps=2, batch_size=4, lr=1e-2, device="cpu", dtype="float32")
    final = [row for row in result.history if "eval_reward_margin" in row][-1]
    report = preftune.evaluate(model=tmp_path / "run", ref_model=tiny_model_dir, data=pairs, device="cpu",
                               dtype="float32")
    assert report.summary["beta"] == 0.3
    assert report.summary["reward_margin"] == pytest.approx(final["eval_reward_margin"], rel=1e-4, abs=1e-6)
    given = preftune.evaluate(model=tmp_path / "run", ref_model=tiny_model_dir, data=pairs, beta=0.1,
                              device="cpu", dtype="float32")
    assert given.summary["beta"] == 0.1
    assert given.summary["reward_margin"] == pytest.approx(report.summary["reward_margin"] / 3, rel=1e-5)
    assert preftune.evaluate(model=tiny_model_dir, data=pairs, device="cpu").summary["beta"] == 0.1


def test_generate_output_keeps_a_chat_prompt_whole_with_its_system_prompt(tiny_model_dir, tmp_path, capsys):
    """Its rows held only the last user message: the system prompt and the earlier turns were missing."""
    turns = [{"role": "user", "content": "the capital of france is"}, {"role": "assistant", "content": "paris"},
             {"role": "user", "content": "and of spain ?"}]
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": turns, "system": "be brief", "chosen": [{"role": "assistant",
                                "content": "madrid"}], "rejected": [{"role": "assistant", "content": "rome"}]}) + "\n")
    out = tmp_path / "g.jsonl"
    assert main(["generate", "--model", str(tiny_model_dir), "--data", str(data), "--max-new-tokens", "3",
                 "--output", str(out)]) == 0
    row = json.loads(out.read_text())
    assert (row["prompt"], row["system"]) == (turns, "be brief") and "and of spain ?" in capsys.readouterr().out
