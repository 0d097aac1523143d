"""Reward models: the Bradley-Terry loss by hand, parity with TRL's RewardTrainer, rewards read as a plain
forward of AutoModelForSequenceClassification reads them, LoRA, and the inputs that are refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tinylm import fact_pairs, write_jsonl
import preftune
from preftune.errors import ConfigError, DataError, ModelError
from preftune.training.reward_objective import RewardObjective, reward_model_losses
from preftune.config import TrainConfig


def margin_pairs(n: int) -> list[dict]:
    rows = fact_pairs(n)
    for i, row in enumerate(rows):
        row["margin"] = [0.0, 0.5, 1.5][i % 3]
    return rows


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A reward model folder: the tiny causal LM with a seeded score head, saved as a sequence classifier."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(7)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model.config.pad_token_id = tok.pad_token_id
    out = tmp_path_factory.mktemp("rm")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# ------------------------------------------------------------------------------------------ the loss by hand

def test_loss_by_hand_with_margin_and_centering():
    chosen, rejected = [1.0, -0.5, 0.25], [0.2, 0.3, 0.25]
    margin, coef = [0.5, 0.0, 1.0], 0.1
    expected = [math.log1p(math.exp(-(c - r - m))) + coef * (c + r) ** 2
                for c, r, m in zip(chosen, rejected, margin)]
    got = reward_model_losses(torch.tensor(chosen), torch.tensor(rejected), torch.tensor(margin), coef)
    assert got.tolist() == pytest.approx(expected, abs=1e-6)
    plain = [math.log1p(math.exp(-(c - r))) for c, r in zip(chosen, rejected)]
    assert reward_model_losses(torch.tensor(chosen), torch.tensor(rejected)).tolist() == pytest.approx(plain, abs=1e-6)


def test_objective_reads_each_pair_margin_by_its_dataset_position():
    from preftune.data.batching import PromptAnswerBatch

    cfg = TrainConfig(stage="rm", center_rewards=0.0)
    margins = torch.tensor([0.0, 2.0, 0.0, 1.0])
    objective = RewardObjective(cfg, margins)
    # Two pairs: records 3 and 1; rewards chosen, rejected, chosen, rejected.
    rewards = torch.tensor([0.5, 0.0, 3.0, 0.5])
    batch = PromptAnswerBatch(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, dtype=torch.long),
                              torch.zeros(4, 1, dtype=torch.long), torch.ones(4, dtype=torch.long), 2,
                              torch.tensor([3, 1]))
    c = objective(rewards, batch)
    expected = math.log1p(math.exp(-(0.5 - 0.0 - 1.0))) + math.log1p(math.exp(-(3.0 - 0.5 - 2.0)))
    assert float(c.loss_sum) == pytest.approx(expected, abs=1e-6)
    assert float(c.sums["reward_accuracy"]) == 2.0
    assert float(c.sums["reward_margin"]) == pytest.approx(0.5 + 2.5)


def test_the_margin_column_is_read_not_reported_unused(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", margin_pairs(3))
    from preftune.data.load import load_pairs

    pairs, report = load_pairs(str(path))
    assert [p.margin for p in pairs] == [0.0, 0.5, 1.5]
    assert not report.unused_keys


def test_sequences_join_each_prompt_to_its_answers():
    from preftune.data.batching import collate
    from preftune.data.tokenize import TokenizedPair
    from preftune.reward import sequences

    ids, mask = sequences(collate([TokenizedPair([5, 6, 7], [1, 2], [3]), TokenizedPair([8], [4], [9, 9, 9])], 0),
                          pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 1, 2], [5, 6, 7, 3, 0], [8, 4, 0, 0, 0], [8, 9, 9, 9, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]]


@pytest.mark.parametrize("rope", ["longrope", "dynamic"])
def test_each_reward_is_its_sequence_alone_when_the_rope_follows_the_batch(rope):
    """Longrope takes its long factors for every row of a call once one row passes the switch length (dynamic NTK
    rescales by the call's longest row): a short answer's reward moved with what it was batched with."""
    import transformers
    from families import ORIGINAL_MAX, _entries
    from preftune.data.batching import collate
    from preftune.data.tokenize import TokenizedPair
    from preftune.reward import batch_rewards, sequences

    family, head = ("phi3-longrope", transformers.Phi3ForSequenceClassification) if rope == "longrope" else \
        ("llama", transformers.LlamaForSequenceClassification)
    config_cls, _, kwargs, _ = _entries()[family]
    if rope == "dynamic":
        kwargs = {**kwargs, "rope_parameters": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0},
                  "max_position_embeddings": ORIGINAL_MAX}
    torch.manual_seed(0)
    model = head(config_cls(**{**kwargs, "num_labels": 1, "pad_token_id": 0})).eval()
    pairs = [TokenizedPair([5, 6, 7], [1, 2], [3] * (ORIGINAL_MAX + 9)), TokenizedPair([8], [4] * 5, [9] * 30),
             TokenizedPair([2, 3], [4], [6, 7])]
    batch = collate(pairs, 0)
    ids, mask = sequences(batch, pad_id=0)
    with torch.no_grad():
        alone = [model(input_ids=row[m.bool()][None]).logits[0, 0] for row, m in zip(ids, mask)]
        together = model(input_ids=ids, attention_mask=mask).logits[:, 0]
        ours = batch_rewards(model, batch)
    assert not torch.allclose(together, torch.stack(alone), atol=1e-6)  # the batch moved the short rows
    assert torch.allclose(ours, torch.stack(alone), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------ parity with TRL

def test_first_step_loss_equals_trl_reward_trainer(tiny_model_dir, tmp_path):
    """From the causal LM folder on both sides (so the new score head comes from the same seed), 4 pairs in one
    batch (the order within a batch cannot change a mean), margins and centering on."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer

    rows = margin_pairs(4)
    seed, coef = 3, 0.01
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    args = trl.RewardConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, max_steps=1,
                            seed=seed, center_rewards_coefficient=coef, report_to="none", use_cpu=True,
                            logging_steps=1, save_strategy="no", bf16=False, dataset_num_proc=None)
    trainer = trl.RewardTrainer(model=str(tiny_model_dir), args=args, train_dataset=Dataset.from_list(rows),
                                processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(trainer.model, dict(batch)))

    result = preftune.train("rm", model=str(tiny_model_dir), data=rows, max_steps=1, batch_size=4, seed=seed,
                            center_rewards=coef, lr=1e-5, device="cpu", dtype="float32")
    assert result.history[0]["loss"] == pytest.approx(trl_loss, abs=1e-5)
    # The same token ids on both sides: prompt + answer + EOS.
    from preftune.data.tokenize import tokenize_all
    from preftune.data.load import load_pairs
    from preftune.data.memory import as_source

    pairs, _ = load_pairs(as_source(rows, "data"))
    items, _ = tokenize_all(tok, pairs, max_length=1024)
    ours = sorted(tuple(it.prompt_ids + it.chosen_ids) for it in items)
    theirs = sorted(tuple(ids) for ids in trainer.train_dataset["chosen_ids"])
    assert ours == theirs


# ------------------------------------------------------------------------------------------ scoring

def plain_reward(model, tok, prompt: str, answer: str) -> float:
    """One unpadded sequence through the model's own forward: the reward at its last token."""
    ids = tok(prompt)["input_ids"] + tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        return float(model(input_ids=torch.tensor([ids])).logits[0, 0])


def test_score_rows_equal_a_plain_forward(reward_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = fact_pairs(6)
    rows[2] = {**rows[2], "chosen": " rome .", "rejected": " paris ."}
    report = preftune.score(reward_dir, rows, batch_size=4, device="cpu", dtype="float32")
    model = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()
    tok = AutoTokenizer.from_pretrained(reward_dir)
    assert len(report.rows) == 6
    diffs = []
    for row, record in zip(report.rows, rows):
        c = plain_reward(model, tok, record["prompt"], record["chosen"])
        r = plain_reward(model, tok, record["prompt"], record["rejected"])
        assert row["chosen_reward"] == pytest.approx(c, abs=1e-5)
        assert row["rejected_reward"] == pytest.approx(r, abs=1e-5)
        assert row["agrees"] == (c > r)
        diffs.append(c - r)
    assert report.summary["pairs"] == 6
    assert report.summary["agreement"] == pytest.approx(sum(d > 0 for d in diffs) / 6)
    assert report.summary["mean_margin"] == pytest.approx(sum(diffs) / 6, abs=1e-5)

    answers = [{"prompt": r["prompt"], "completion": r["chosen"], "label": i % 2 == 0} for i, r in enumerate(rows)]
    single = preftune.score(reward_dir, answers, device="cpu", dtype="float32")
    expected = [plain_reward(model, tok, a["prompt"], a["completion"]) for a in answers]
    assert [row["reward"] for row in single.rows] == pytest.approx(expected, abs=1e-5)
    assert [row["label"] for row in single.rows] == [a["label"] for a in answers]
    assert single.summary["desirable_mean_reward"] == pytest.approx(sum(expected[0::2]) / 3, abs=1e-5)
    # Without labels (prompt/completion only): the same rewards.
    bare = preftune.score(reward_dir, [{k: a[k] for k in ("prompt", "completion")} for a in answers],
                          device="cpu", dtype="float32")
    assert [row["reward"] for row in bare.rows] == pytest.approx(expected, abs=1e-5)


def test_scoring_a_model_object_leaves_its_config_as_it_was(reward_dir):
    """An object without a pad id is read by the tokenizer's for the call, and handed back without one."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()
    tok = AutoTokenizer.from_pretrained(reward_dir)
    rows = fact_pairs(4)
    by_path = preftune.score(reward_dir, rows, device="cpu", dtype="float32").rows
    model.config.pad_token_id = None
    model.config.get_text_config().pad_token_id = None
    by_object = preftune.score(model, rows, tokenizer=tok).rows
    assert model.config.pad_token_id is None and model.config.get_text_config().pad_token_id is None
    assert len(by_path) == len(by_object) == 4
    for a, b in zip(by_path, by_object):
        assert a["chosen_reward"] == pytest.approx(b["chosen_reward"], abs=1e-6)
        assert a["rejected_reward"] == pytest.approx(b["rejected_reward"], abs=1e-6)


def test_score_texts_is_the_judge_call(reward_dir):
    from preftune.reward import load_reward_model, score_texts
    from transformers import AutoModelForSequenceClassification

    model, tok = load_reward_model(reward_dir)
    prompts = ["the capital of france is", "the sky is blue and", "cats chase"]
    answers = [" paris .", " grass is green .", " mice and dogs chase cats ."]
    got = score_texts(model, tok, prompts, answers, batch_size=2)
    plain = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()
    assert got == pytest.approx([plain_reward(plain, tok, p, a) for p, a in zip(prompts, answers)], abs=1e-5)


def test_score_texts_takes_a_text_answer_after_chat_turns_as_the_assistant_turn(reward_dir):
    """A judge gets decoded text answers to message prompts: they score as the rendered conversation, what the
    reward model was trained on (here the turn ends "<|end|>\n", not the prompt's render plus text plus EOS)."""
    from preftune.reward import load_reward_model, score_texts
    from transformers import AutoModelForSequenceClassification

    model, tok = load_reward_model(reward_dir)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    prompt = [{"role": "user", "content": "the capital of france is"}]
    got = score_texts(model, tok, [prompt, prompt], [" paris .", " rome ."])
    plain = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()
    expected = []
    for answer in (" paris .", " rome ."):
        ids = tok.apply_chat_template(prompt + [{"role": "assistant", "content": answer}], tokenize=True,
                                      return_dict=True)["input_ids"]
        with torch.no_grad():
            expected.append(float(plain(input_ids=torch.tensor([list(ids)])).logits[0, 0]))
    assert got == pytest.approx(expected, abs=1e-5)


# ------------------------------------------------------------------------------------------ training

def test_trained_reward_model_loads_and_prefers_the_chosen_answers(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    rows = margin_pairs(16)
    result = preftune.train("rm", model=str(tiny_model_dir), data=rows, output_dir=tmp_path / "rm", max_steps=12,
                            batch_size=4, lr=3e-3, center_rewards=0.01, device="cpu", dtype="float32")
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert losses[-1] < losses[0]
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert loaded.config.num_labels == 1 and loaded.config.pad_token_id == result.tokenizer.pad_token_id
    report = preftune.score(tmp_path / "rm", rows, device="cpu", dtype="float32")
    assert report.summary["agreement"] == 1.0 and report.summary["mean_margin"] > 0.5
    card = (tmp_path / "rm" / "README.md").read_text()
    assert "reward model" in card and "text-classification" in card


def test_training_on_a_reward_model_keeps_the_pad_token_it_reads_by(reward_dir, tmp_path):
    """A reward model whose config names another pad token than its tokenizer's (here EOS, so its reward is read
    before each answer's final EOS) trains on reading where `preftune score` reads: the first loss is the loss of
    the scored rewards, and the saved folder's tokenizer pads with the config's token."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    other = tmp_path / "other-pad"
    model = AutoModelForSequenceClassification.from_pretrained(reward_dir)
    tok = AutoTokenizer.from_pretrained(reward_dir)
    assert tok.pad_token_id != tok.eos_token_id
    model.config.pad_token_id = tok.eos_token_id
    model.save_pretrained(other)
    tok.save_pretrained(other)
    rows = fact_pairs(4)
    scored = preftune.score(other, rows, device="cpu", dtype="float32").rows
    expected = sum(-torch.nn.functional.logsigmoid(torch.tensor(r["chosen_reward"] - r["rejected_reward"])).item()
                   for r in scored) / 4
    result = preftune.train("rm", model=str(other), data=rows, output_dir=tmp_path / "rm", max_steps=1,
                            batch_size=4, lr=1e-6, device="cpu", dtype="float32")
    assert result.history[0]["loss"] == pytest.approx(expected, abs=1e-6)
    assert AutoConfig.from_pretrained(tmp_path / "rm").pad_token_id == tok.eos_token_id
    assert AutoTokenizer.from_pretrained(tmp_path / "rm").pad_token_id == tok.eos_token_id


def test_lora_reward_model_saves_its_head_and_merges(tiny_model_dir, tmp_path):
    pytest.importorskip("peft")
    from safetensors import safe_open

    rows = margin_pairs(8)
    preftune.train("rm", model=str(tiny_model_dir), data=rows, output_dir=tmp_path / "lora", max_steps=3,
                   batch_size=4, lr=1e-2, lora_r=4, merge=True, device="cpu", dtype="float32")
    with safe_open(str(tmp_path / "lora" / "adapter_model.safetensors"), framework="pt") as f:
        assert any("score" in name for name in f.keys())
    adapter = preftune.score(tmp_path / "lora", rows, device="cpu", dtype="float32")
    merged = preftune.score(tmp_path / "lora" / "merged", rows, device="cpu", dtype="float32")
    for a, m in zip(adapter.rows, merged.rows):
        assert a["chosen_reward"] == pytest.approx(m["chosen_reward"], abs=1e-5)
        assert a["rejected_reward"] == pytest.approx(m["rejected_reward"], abs=1e-5)


def test_lora_reward_model_scores_as_trained_when_the_base_config_names_another_pad(tmp_path):
    """The run reads rewards by the tokenizer's pad token; its adapter folder (and merged/) took the base
    config's pad id back when loaded, so `score` read each reward at another token than training did."""
    pytest.importorskip("peft")
    import json

    from tinylm import make_model_dir

    base = make_model_dir(tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    tok = preftune.models.load.load_tokenizer(str(base))
    config["pad_token_id"] = tok.eos_token_id                    # a real token, not the tokenizer's <pad>
    (base / "config.json").write_text(json.dumps(config))
    rows = margin_pairs(8)
    result = preftune.train("rm", model=str(base), data=rows, output_dir=tmp_path / "lora", max_steps=3,
                            batch_size=4, lr=1e-2, lora_r=4, merge=True, device="cpu", dtype="float32")
    trained = preftune.score(result.model, rows, tokenizer=result.tokenizer)
    other = preftune.models.load.load_tokenizer(str(base))
    other.pad_token = other.eos_token                            # a tokenizer given that pads otherwise
    for saved, given in ((tmp_path / "lora", None), (tmp_path / "lora", other), (tmp_path / "lora" / "merged", None)):
        again = preftune.score(saved, rows, tokenizer=given, device="cpu", dtype="float32")
        for a, b in zip(trained.rows, again.rows):
            assert b["chosen_reward"] == pytest.approx(a["chosen_reward"], abs=1e-5)
            assert b["rejected_reward"] == pytest.approx(a["rejected_reward"], abs=1e-5)
    merged = json.loads((tmp_path / "lora" / "merged" / "config.json").read_text())
    assert merged["pad_token_id"] == tok.pad_token_id != tok.eos_token_id
    # The card told a LoRA reward model's reader to load the folder with AutoModelForSequenceClassification,
    # which builds a 2-label head from the base's config and fails on the saved one.
    assert "num_labels=1 and pad_token_id set" in (tmp_path / "lora" / "README.md").read_text()


# ------------------------------------------------------------------------------------------ refused inputs

def test_a_causal_lm_without_a_score_head_is_not_scored(tiny_model_dir, tmp_path):
    with pytest.raises(ModelError, match="not a reward model"):
        preftune.score(tiny_model_dir, fact_pairs(2), device="cpu")
    # A config that claims a head over weights that hold none: refused by the weights.
    fake = tmp_path / "fake"
    fake.mkdir()
    for p in tiny_model_dir.iterdir():
        (fake / p.name).write_bytes(p.read_bytes())
    config = json.loads((fake / "config.json").read_text())
    config.update(architectures=["LlamaForSequenceClassification"], num_labels=1)
    (fake / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="no score"):
        preftune.score(fake, fact_pairs(2), device="cpu")


def test_refused_training_inputs(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    unpaired = [{"prompt": "a", "completion": " b", "label": True}] * 4
    with pytest.raises(DataError, match="reward model trains on chosen/rejected pairs"):
        preftune.train("rm", model=str(tiny_model_dir), data=unpaired, output_dir=tmp_path / "x", max_steps=1)
    assert not (tmp_path / "x").exists()
    causal = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ConfigError, match="not a reward model"):
        preftune.train("rm", model=causal, tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir),
                       data=fact_pairs(4), max_steps=1, batch_size=4)
    with pytest.raises(ConfigError, match="RM only"):
        preftune.train("dpo", model=str(tiny_model_dir), data=fact_pairs(4), center_rewards=0.1)


def test_a_reward_model_with_damaged_weights_is_one_line(reward_dir, tmp_path):
    import shutil

    broken = tmp_path / "rm"
    shutil.copytree(reward_dir, broken)
    (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(ModelError, match=r"its model\.safetensors cannot be read .*; copy the model again"):
        preftune.score(model=broken, data=fact_pairs(2), device="cpu", dtype="float32")


def test_score_texts_takes_no_prompt_beside_a_whole_conversation(reward_dir):
    """A check for SFT training (no turn before the first assistant turn) refused what score_texts documents: a
    prompt of None or "" beside a conversation."""
    from preftune.reward import load_reward_model, score_texts

    model, tok = load_reward_model(reward_dir)
    user, answer = {"role": "user", "content": "capital of france ?"}, {"role": "assistant", "content": "paris"}
    whole = score_texts(model, tok, [None], [[user, answer]])
    assert whole == pytest.approx(score_texts(model, tok, [[user]], ["paris"]), abs=1e-5)
    assert len(score_texts(model, tok, [""], [[answer]])) == 1
