"""Judges (specs, built-in rules, Python functions, checks of what they return), best-vs-worst pairs, prompts."""

from __future__ import annotations

import json
import math

import pytest

from preftune.errors import ConfigError, DataError, JudgeError
from preftune.online.judges import judged, make_judge
from preftune.online.pairs import best_vs_worst, training_record
from preftune.online.prompts import read_prompts, split_prompts


def test_rules_score_by_hand():
    answers = ["ab", "paris paris", "", "rome"]
    assert make_judge("rule:longer")("p", answers) == [2.0, 11.0, 0.0, 4.0]
    assert make_judge("rule:shorter")("p", answers) == [-2.0, -11.0, -0.0, -4.0]
    assert make_judge("rule:contains:paris")("p", answers) == [0.0, 1.0, 0.0, 0.0]
    assert make_judge("rule:count:paris")("p", answers) == [0.0, 2.0, 0.0, 0.0]
    # The target may itself hold a colon.
    assert make_judge("rule:contains:a:b")("p", ["xa:by", "a b"]) == [1.0, 0.0]


@pytest.mark.parametrize("spec", ["rule:nope", "rule:contains", "shout:x", "python:", "python:only_module",
                                  "reward-model:", "rule"])
def test_bad_specs_are_config_errors(spec):
    with pytest.raises(ConfigError, match="judge"):
        make_judge(spec)


def test_python_judge_from_module_and_from_file(tmp_path, monkeypatch):
    (tmp_path / "myjudges.py").write_text("def n_words(prompt, answers):\n"
                                          "    return [len(a.split()) + len(prompt) for a in answers]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    by_module = make_judge("python:myjudges:n_words")
    by_file = make_judge(f"python:{tmp_path / 'myjudges.py'}:n_words")
    assert by_module("ab", ["x y z", "w"]) == [5, 3]
    assert by_file("ab", ["x y z", "w"]) == [5, 3]
    with pytest.raises(ConfigError, match="no function 'missing'"):
        make_judge("python:myjudges:missing")
    with pytest.raises(ConfigError, match="no file"):
        make_judge(f"python:{tmp_path / 'nothere.py'}:n_words")


def test_judged_names_the_prompt_when_the_judge_fails():
    def raises(prompt, answers):
        raise RuntimeError("api down")

    with pytest.raises(JudgeError, match=r"^prompts.jsonl:3: the judge raised RuntimeError: api down$"):
        judged(raises, "p", ["a", "b"], "prompts.jsonl:3")
    with pytest.raises(JudgeError, match="prompts.jsonl:4: the judge returned 1 scores for 2 answers"):
        judged(lambda p, a: [1.0], "p", ["a", "b"], "prompts.jsonl:4")
    with pytest.raises(JudgeError, match="not finite"):
        judged(lambda p, a: [1.0, math.nan], "p", ["a", "b"], "x")
    with pytest.raises(JudgeError, match="not a list of one number per answer"):
        judged(lambda p, a: None, "p", ["a", "b"], "x")
    assert judged(lambda p, a: (1, 2), "p", ["a", "b"], "x") == [1.0, 2.0]


@pytest.mark.parametrize("returned", [{0: 5.0, 1: 1.0}, "12", (x for x in (5.0, 1.0))])
def test_a_judge_returning_what_only_iterates_like_scores_is_refused(returned):
    """A dict gave its keys as scores ([0, 1]: the preference reversed) and a string its characters."""
    with pytest.raises(JudgeError, match=r"^x: the judge returned \w+ .*not a list of one number per answer$"):
        judged(lambda p, a: returned, "p", ["a", "b"], "x")


def test_a_two_dimensional_array_of_scores_is_one_line():
    import numpy as np

    with pytest.raises(JudgeError) as err:
        judged(lambda p, a: np.ones((2, 2)), "p", ["a", "b"], "x")
    assert "\n" not in str(err.value)


def test_the_same_answer_scored_twice_is_no_pair():
    """A noisy judge scored two copies of one answer differently: chosen == rejected was trained."""
    prompts = [{"prompt": "p0", "system": None}, {"prompt": "p1", "system": None}]
    made = best_vs_worst(prompts, [["a", "a", "a"], ["a", "a", "b"]], [[3.0, 1.0, 2.0], [3.0, 1.0, 2.0]])
    assert [(p["chosen"], p["rejected"]) for p in made.pairs] == [("a", "b")]
    assert made.tied_groups == 1


def test_best_vs_worst_skips_ties_and_counts_them():
    prompts = [{"prompt": "p0", "system": None}, {"prompt": "p1", "system": "be brief"},
               {"prompt": [{"role": "user", "content": "p2"}], "system": None}, {"prompt": "p3", "system": None}]
    answers = [["a", "b", "c"], ["d", "e", "f"], ["g", "h", "i"], ["j", "k", "l"]]
    scores = [[1.0, 3.0, 3.0],     # best: the first of the two 3s (b); worst: a
              [2.0, 2.0, 2.0],     # all equal: no pair
              [0.5, -1.0, -1.0],   # best g; worst: the first of the two -1s (h)
              [4.0, 0.0, 5.0]]
    made = best_vs_worst(prompts, answers, scores)
    assert [(p["chosen"], p["rejected"]) for p in made.pairs] == [
        ("b", "a"), ([{"role": "assistant", "content": "g"}], [{"role": "assistant", "content": "h"}]), ("l", "k")]
    assert [p["prompt_index"] for p in made.pairs] == [0, 2, 3]
    assert [(p["score_chosen"], p["score_rejected"]) for p in made.pairs] == [(3.0, 1.0), (0.5, -1.0), (5.0, 0.0)]
    assert made.groups == 4 and made.tied_groups == 1 and made.pair_share == 0.75
    flat = [1, 3, 3, 2, 2, 2, 0.5, -1, -1, 4, 0, 5]
    mean = sum(flat) / 12
    assert made.score_mean == pytest.approx(mean)
    assert made.score_std == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in flat) / 12))
    assert training_record(made.pairs[0]) == {"prompt": "p0", "chosen": "b", "rejected": "a"}
    with_system = best_vs_worst([prompts[1]], [["x", "y"]], [[0.0, 1.0]]).pairs[0]
    assert training_record(with_system) == {"prompt": "p1", "chosen": "y", "rejected": "x", "system": "be brief"}


def test_prompts_file_and_list(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "a"}, {"prompt": "b", "system": "s"}, {"prompt": "c", "chosen": "x", "rejected": "y"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records, notes = read_prompts(path)
    assert [r["prompt"] for r in records] == ["a", "b", "c"]
    assert [r["system"] for r in records] == [None, "s", None]
    assert [r["where"] for r in records] == [f"{path} line {n}" for n in (1, 2, 3)]
    assert notes == ["--prompts: 1 records hold answers (chosen/rejected); only their prompts are used"]
    assert read_prompts(["x", {"prompt": "y"}])[0][0] == {"prompt": "x", "system": None,
                                                          "where": "--prompts record 1", "template_kwargs": None}
    with pytest.raises(DataError, match="record 2: unknown key"):
        read_prompts(["x", {"prompt": "y", "label": 1}])
    chat = [{"role": "user", "content": "hi"}]
    assert read_prompts([chat, {"prompt": chat}])[0][1]["prompt"] == chat
    with pytest.raises(DataError, match="record 2: a message-list prompt among text prompts"):
        read_prompts(["x", chat])
    with pytest.raises(DataError, match="record 1: 'prompt' must be"):
        read_prompts([{"prompt": ""}])
    train, held = split_prompts([{"prompt": str(i)} for i in range(10)], 0.2, seed=3)
    assert len(train) == 8 and len(held) == 2
    assert sorted(r["prompt"] for r in train + held) == [str(i) for i in range(10)]
    assert split_prompts([{"prompt": str(i)} for i in range(10)], 0.2, seed=3) == (train, held)


def test_reward_model_judge_scores_prompt_plus_answer_as_a_plain_forward(tmp_path):
    import torch
    from tinylm import make_tokenizer
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = make_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, num_labels=1, pad_token_id=tok.pad_token_id)
    rm = LlamaForSequenceClassification(config).eval()
    rm.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    judge = make_judge(f"reward-model:{tmp_path}")
    prompt, answers = "the capital of france is", [" paris .", " rome", " the sky is blue and grass is green ."]
    scores = judge(prompt, answers)
    with torch.no_grad():  # one unpadded row at a time, prompt + answer + EOS as reward models train: the last logit
        plain = [float(rm(torch.tensor([tok(prompt + a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]))
                       .logits[0, 0]) for a in answers]
    assert scores == pytest.approx(plain, abs=1e-5)
    assert len(set(scores)) == 3
    chat = [{"role": "user", "content": "capital of france ?"}]
    text = tok.apply_chat_template([*chat, {"role": "assistant", "content": " paris"}], tokenize=False)
    with torch.no_grad():
        expected = float(rm(torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])).logits[0, 0])
    assert judge(chat, [" paris"]) == pytest.approx([expected], abs=1e-5)
    # The system prompt the policy was given is part of what the judge scores (it was left out).
    system = {"role": "system", "content": "answer in one word ."}
    text = tok.apply_chat_template([system, *chat, {"role": "assistant", "content": " paris"}], tokenize=False)
    with torch.no_grad():
        expected = float(rm(torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])).logits[0, 0])
    assert judged(judge, chat, [" paris"], "x", system["content"]) == pytest.approx([expected], abs=1e-5)
    with pytest.raises(ConfigError, match="not a model folder"):
        make_judge(f"reward-model:{tmp_path / 'missing'}")


def test_empty_answers_to_text_prompts_are_judged_but_never_paired():
    # The policy may end at once: an empty text answer is no DPO answer (the data reader refuses it), so the pair
    # is built from the non-empty answers; a chat answer of empty content stays a candidate (one end-of-turn).
    prompts = [{"prompt": "p0", "system": None}, {"prompt": "p1", "system": None},
               {"prompt": [{"role": "user", "content": "p2"}], "system": None}]
    answers = [["", "a", " ", "b"], ["", "c", "  "], ["", "d"]]
    scores = [[-5.0, 1.0, 9.0, 2.0],  # the empty answers score lowest and highest; the pair is b over a
              [0.0, 1.0, 2.0],        # one usable answer: no pair
              [0.0, 1.0]]             # chat: the empty turn is the rejected answer
    made = best_vs_worst(prompts, answers, scores)
    assert [(p["prompt_index"], p["chosen"], p["rejected"]) for p in made.pairs] == [
        (0, "b", "a"), (2, [{"role": "assistant", "content": "d"}], [{"role": "assistant", "content": ""}])]
    assert made.empty_answers == 4 and made.short_groups == 1 and made.tied_groups == 0
    assert made.score_mean == pytest.approx(sum(sum(s) for s in scores) / 9)


def test_answers_cut_off_at_max_new_tokens_are_judged_but_never_paired():
    """A cut-off answer was trained as a finished one (EOS appended where the cut fell), so a long cut answer
    judged best taught the policy to stop mid-sentence."""
    prompts = [{"prompt": "p0", "system": None}, {"prompt": "p1", "system": None}]
    answers = [["a long answer cut", "short", "mid"], ["x", "y cut"]]
    scores = [[9.0, 1.0, 2.0], [1.0, 5.0]]
    ended = [[False, True, True], [True, False]]
    made = best_vs_worst(prompts, answers, scores, ended)
    assert [(p["chosen"], p["rejected"]) for p in made.pairs] == [("mid", "short")]
    assert (made.cut_answers, made.short_groups, made.empty_answers) == (2, 1, 0)
    assert made.score_mean == pytest.approx(18 / 5)  # every sample was judged
    assert best_vs_worst(prompts, answers, scores).pairs[0]["chosen"] == "a long answer cut"  # all ended: as before


def test_prompts_of_any_preference_layout_and_source(tmp_path):
    """Online prompts were read from JSONL or JSON records holding `prompt` only: a preference file in another
    layout (UltraFeedback's, with its prompt_id and messages columns; implicit-prompt conversations) was refused,
    and so were Parquet and CSV files."""
    datasets = pytest.importorskip("datasets")
    user = {"role": "user", "content": "the sky is"}
    rows = [{"prompt": "the sky is", "prompt_id": "p1", "messages": [user, {"role": "assistant", "content": "blue"}],
             "chosen": [user, {"role": "assistant", "content": "blue"}],
             "rejected": [user, {"role": "assistant", "content": "red"}], "score_chosen": 9.0, "score_rejected": 2.0}]
    path = tmp_path / "uf.parquet"
    datasets.Dataset.from_list(rows).to_parquet(path)
    records, notes = read_prompts(str(path))
    assert [(r["prompt"], r["system"]) for r in records] == [([user], None)]
    assert notes == ["--prompts: 1 records hold answers (chosen/rejected); only their prompts are used",
                     "--prompts: keys not used, ignored (records holding each): prompt_id (1), messages (1)"]
    implicit = [{"chosen": [{"role": "system", "content": "be brief"}, user, {"role": "assistant", "content": "b"}],
                 "rejected": [{"role": "system", "content": "be brief"}, user, {"role": "assistant", "content": "r"}]}]
    assert read_prompts(implicit)[0][0]["system"] == "be brief"
    with pytest.raises(DataError, match="record 1: the record has tool schemas"):
        read_prompts([{**implicit[0], "tools": [{"name": "weather", "parameters": {}}]}])
    kwargs = {"enable_thinking": False}
    for record in ({"prompt": [user], "chat_template_kwargs": kwargs}, {**implicit[0], "chat_template_kwargs": kwargs}):
        assert read_prompts([record])[0][0]["template_kwargs"] == kwargs  # rendered with them, as training does
    with pytest.raises(DataError, match="--eval-prompts: no prompts"):
        read_prompts([], "--eval-prompts")


def test_prompts_from_a_split_of_a_saved_dataset(tmp_path):
    """A saved dataset or Hub id without a 'train' split (UltraFeedback's train_prefs) could not give prompts:
    --split was refused for online runs."""
    datasets = pytest.importorskip("datasets")
    from preftune.online.config import OnlineConfig

    rows = [{"prompt": "the sky is", "chosen": "blue", "rejected": "red"}]
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(rows)}).save_to_disk(tmp_path / "uf")
    records, _ = read_prompts(str(tmp_path / "uf"), split="train_prefs")
    assert [r["prompt"] for r in records] == ["the sky is"]
    pku = {"prompt": "Q", "response_0": "a", "response_1": "b", "better_response_id": 0, "safer_response_id": 1}
    tie = {"context": [{"role": "user", "content": "R"}], "response1": "a", "response2": "b", "overall_preference": 0}
    assert [r["prompt"] for r in read_prompts([pku])[0]] == [[{"role": "user", "content": "Q"}]]  # either rating
    assert [r["prompt"] for r in read_prompts([tie])[0]] == [[{"role": "user", "content": "R"}]]  # a tie's prompt
    (tmp_path / "prompts.csv").write_text("prompt,system\nthe sky is,\nwhat is grass,be brief\n")
    records, _ = read_prompts(str(tmp_path / "prompts.csv"))  # a blank system cell is no system prompt
    assert [(r["prompt"], r["system"]) for r in records] == [("the sky is", None), ("what is grass", "be brief")]
    assert OnlineConfig.from_dict({"model": "m", "split": "train_prefs"}).train_config(
        output_dir="", model="m").split == "train_prefs"
