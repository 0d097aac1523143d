"""Tokenisation follows TRL's convention (README.md, "Data"); truncation cuts prompts left, answers right, drops
what can't fit."""

from __future__ import annotations

import pytest
from tinylm import make_tokenizer

from preftune.data.records import PreferencePair, SFTExample, UnpairedExample
from preftune.data.encode import encode_prompt_answer
from preftune.data.tokenize import tokenize_all, tokenize_example, tokenize_pair
from preftune.errors import DataError


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_text_pair_follows_the_convention(tok):
    pair = PreferencePair("the capital of france is", " paris .", " rome .")
    out = tokenize_pair(tok, pair, max_length=100)
    assert out.prompt_ids == tok("the capital of france is")["input_ids"]
    assert out.chosen_ids == tok(" paris .", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert out.rejected_ids == tok(" rome .", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert not out.truncated


def test_chat_pair_bos_once_eos_once_and_boundary(tok):
    prompt = [{"role": "user", "content": "the capital of france ?"}]
    chosen = [{"role": "assistant", "content": "paris"}]
    p, a = encode_prompt_answer(tok, prompt, chosen)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert p.count(bos) == 1 and p[0] == bos            # the template writes BOS; it is not added again
    assert a.count(eos) == 1 and a[-1] == eos           # the template ends the turn with EOS; not appended again
    full = tok.apply_chat_template(prompt + chosen, tokenize=False)
    assert tok.decode(p + a) == full                     # nothing lost or duplicated at the boundary
    assert tok.decode(a) == "paris<eos>"


def test_chat_with_system_turn(tok):
    p, _ = encode_prompt_answer(tok, [{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "yo"}],
                                system="be brief")
    assert tok.decode(p).startswith("<bos><|system|>be brief<eos><|user|>hi")


def test_boundary_where_merges_cross_it(tok):
    # Split inside a word: tokenised together, "capit" + "al" merge into other tokens. By the convention the two
    # halves are tokenised separately, so the ids are the concatenation of both encodings, and the decoded text
    # is still exactly prompt + answer.
    pair = PreferencePair("the capit", "al of france", "al of italy")
    out = tokenize_pair(tok, pair, max_length=100)
    joined = tok("the capital of france")["input_ids"]
    assert out.prompt_ids + out.chosen_ids[:-1] != joined
    assert out.prompt_ids == tok("the capit")["input_ids"]
    assert out.chosen_ids[:-1] == tok("al of france", add_special_tokens=False)["input_ids"]
    assert tok.decode(out.prompt_ids + out.chosen_ids, skip_special_tokens=True) == "the capital of france"


def test_truncation_left_prompt_right_answer(tok):
    pair = PreferencePair("the sky is blue and grass is green", " cats chase mice and dogs chase cats", " no")
    full = tokenize_pair(tok, pair, max_length=1000)
    out = tokenize_pair(tok, pair, max_length=len(full.prompt_ids) - 2 + 3, max_prompt_length=len(full.prompt_ids) - 2)
    assert out.truncated
    assert out.prompt_ids == full.prompt_ids[2:]         # the start of the prompt went
    assert out.chosen_ids == full.chosen_ids[:3]         # the end of the answer went
    assert out.rejected_ids == full.rejected_ids[:3]


def test_pair_whose_prompt_fills_max_length_is_dropped(tok):
    pair = PreferencePair("the sky is blue and grass is green", " a", " b")
    n = len(tok("the sky is blue and grass is green")["input_ids"])
    assert tokenize_pair(tok, pair, max_length=n) is None
    assert tokenize_pair(tok, pair, max_length=n + 1) is not None
    items, stats = tokenize_all(tok, [pair, pair], max_length=n)
    assert items == [] and stats.dropped == 2


def test_an_empty_prompt_without_bos_takes_the_answers_shared_first_token(tok):
    """TRL scores every token but a sequence's first: with no prompt token, the answers' first one goes unscored
    there, and here it becomes the prompt when both answers share it."""
    assert tok("")["input_ids"] == []  # this tokenizer adds no BOS
    chosen, rejected = tok("the sky is blue", add_special_tokens=False)["input_ids"], \
        tok("the sky is green", add_special_tokens=False)["input_ids"]
    item = tokenize_pair(tok, PreferencePair("", "the sky is blue", "the sky is green", None, "line 3"),
                         max_length=64)
    assert item.prompt_ids == chosen[:1]
    assert item.chosen_ids == chosen[1:] + [tok.eos_token_id] and item.rejected_ids == rejected[1:] + [tok.eos_token_id]
    with pytest.raises(DataError, match="line 4: the prompt is empty and the tokenizer adds no BOS token"):
        tokenize_pair(tok, PreferencePair("", "cats chase mice", "dogs chase cats", None, "line 4"), max_length=64)
    with pytest.raises(DataError, match="line 5: the prompt is empty and the tokenizer adds no BOS token"):
        tokenize_all(tok, [UnpairedExample("", "cats chase mice", True, None, "line 5")], max_length=64)
    sft = tokenize_example(tok, SFTExample("cats chase mice", "", None, "line 6"), max_length=64)
    text = tokenize_example(tok, SFTExample("cats chase mice", None, None, "line 7"), max_length=64)
    assert (sft.prompt_ids, sft.answer_ids) == (text.prompt_ids, text.answer_ids)


def test_sft_text_trains_on_every_token_after_the_first(tok):
    ex = tokenize_example(tok, SFTExample("water boils at one hundred degrees ."), max_length=100)
    ids = tok("water boils at one hundred degrees .")["input_ids"] + [tok.eos_token_id]
    assert ex.prompt_ids == ids[:1] and ex.answer_ids == ids[1:]


def test_chat_data_without_a_template_is_a_human_assistant_transcript():
    from preftune.data.fields import parse_hh

    tok = make_tokenizer()
    tok.chat_template = None  # a base model's tokenizer
    text = "\n\nHuman: what is the capital of france?\n\nAssistant: paris.\n\nHuman: and italy?\n\nAssistant: rome."
    _, turns = parse_hh(text)
    pair = PreferencePair(turns[:-1], turns[-1:], [{"role": "assistant", "content": "milan."}])
    out = tokenize_pair(tok, pair, max_length=1000)
    head = "\n\nHuman: what is the capital of france?\n\nAssistant: paris.\n\nHuman: and italy?\n\nAssistant:"
    assert text.startswith(head)
    assert out.prompt_ids == tok(head)["input_ids"]
    assert out.chosen_ids == tok(" rome.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert out.rejected_ids == tok(" milan.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def _variant(template: str, adds_bos: bool):
    """The tiny tokenizer with another chat template, and (`adds_bos`) a BOS put before every encoded text."""
    from tokenizers import processors

    tok = make_tokenizer()
    if adds_bos:
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)])
        assert tok("a")["input_ids"][0] == tok.bos_token_id
    tok.chat_template = template
    return tok


def _chat_ids(tok, messages, generation_prompt=False):
    """What the template alone gives: `apply_chat_template(tokenize=True)`, which TRL 1.16 tokenises with."""
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=True)
    return list(out["input_ids"])


@pytest.mark.parametrize("template", [
    # no BOS written, while the tokenizer adds one to plain text (Phi-3 style)
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}",
    # turns end with a marker that is not the EOS token (ChatML on a base model, whose EOS is another token)
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<pad>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}",
])
def test_chat_ids_are_the_templates_own_special_tokens_added_to_nothing(template):
    tok = _variant(template, adds_bos=True)
    prompt = [{"role": "user", "content": "the capital of france ?"}]
    chosen = [{"role": "assistant", "content": "paris"}]
    p, a = encode_prompt_answer(tok, prompt, chosen)
    assert p == _chat_ids(tok, prompt, generation_prompt=True)
    assert p + a == _chat_ids(tok, prompt + chosen)
    assert tok.bos_token_id not in p and a.count(tok.eos_token_id) == template.count("eos_token")


def test_a_text_answer_that_ends_with_eos_gets_no_second_one(tok):
    pair = PreferencePair("the capital of france is", " paris .<eos>", " rome .")
    out = tokenize_pair(tok, pair, max_length=100)
    eos = tok.eos_token_id
    assert out.chosen_ids == tok(" paris .<eos>", add_special_tokens=False)["input_ids"] and out.chosen_ids[-2] != eos
    assert out.rejected_ids == tok(" rome .", add_special_tokens=False)["input_ids"] + [eos]


def _sentencepiece_style():
    """A Metaspace tokenizer ("▁" before the first word, as Llama 2, Mistral and Phi-3 tokenizers write), with a
    Phi-3-style template whose assistant turn starts after a newline: alone, an answer would start "▁The"; in the
    conversation it follows "\\n" and has no word boundary mark."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    words = "The capital of France is Paris . Rome Thanks hello what is the sky blue green \n"
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>", "<|user|>",
                                                                   "<|assistant|>", "<|end|>"], show_progress=False)
    tok.train_from_iterator([words] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>")
    fast.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    return fast


def test_chat_answers_take_their_ids_in_context():
    tok = _sentencepiece_style()
    prompt = [{"role": "user", "content": "what is the capital of France ?"}]
    chosen, rejected = "The capital of France is Paris .", "Rome"
    pair = tokenize_pair(tok, PreferencePair(prompt, [{"role": "assistant", "content": chosen}],
                                             [{"role": "assistant", "content": rejected}]), max_length=200)
    for answer, ids in ((chosen, pair.chosen_ids), (rejected, pair.rejected_ids)):
        whole = _chat_ids(tok, prompt + [{"role": "assistant", "content": answer}])
        assert pair.prompt_ids + ids == whole  # what the model reads, and what it generates after the prompt
        assert ids[:len(tok(answer, add_special_tokens=False)["input_ids"])] != \
            tok(answer, add_special_tokens=False)["input_ids"]  # alone, the answer would start with "▁"
    assert pair.prompt_ids == _chat_ids(tok, prompt, generation_prompt=True)


def test_sft_turns_in_context_train_exactly_the_assistant_turns():
    tok = _sentencepiece_style()
    turns = [{"role": "user", "content": "what is the sky"}, {"role": "assistant", "content": "The sky is blue ."},
             {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "hello"}]
    out = tokenize_example(tok, SFTExample(turns[1:], turns[:1]), max_length=200)
    assert out.prompt_ids + out.answer_ids == _chat_ids(tok, turns)
    trained = [i for i, m in zip(out.answer_ids, out.answer_mask) if m]
    assert tok.decode(trained) == tok.decode(_chat_ids(tok, turns[:2])[len(out.prompt_ids):]) + tok.decode(
        _chat_ids(tok, turns)[len(_chat_ids(tok, turns[:3], generation_prompt=True)):])


def test_a_generation_prompt_that_finished_turns_drop_is_cut_where_they_part(caplog):
    """DeepSeek-R1's templates end the generation prompt with "<think>\\n" but render a finished assistant turn
    without it: the answer starts where the two part (TRL's cut), said once; a template that renders the prompt
    turns themselves differently is still refused."""
    tok = make_tokenizer()
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>think:{% endif %}")
    prompt = [{"role": "user", "content": "the capital of france ?"}]
    with caplog.at_level("WARNING"):
        pair = tokenize_pair(tok, PreferencePair(prompt, [{"role": "assistant", "content": "paris"}],
                                                 [{"role": "assistant", "content": "rome"}]), max_length=200)
    assert "generation prompt ends with 'think:'" in caplog.text
    for answer, ids in (("paris", pair.chosen_ids), ("rome", pair.rejected_ids)):
        whole = _chat_ids(tok, prompt + [{"role": "assistant", "content": answer}])
        assert pair.prompt_ids + ids == whole and tok.decode(ids).endswith(f"{answer}<eos>")
    tok.chat_template = ("{% for m in messages %}{% if loop.last and m['role'] == 'user' %}[last]{% endif %}"
                         "<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}")
    with pytest.raises(DataError, match="renders the prompt differently inside the whole conversation"):
        encode_prompt_answer(tok, prompt, [{"role": "assistant", "content": "paris"}], where="w")


def test_sft_turns_under_a_template_that_closes_every_conversation_with_eos():
    """Phi-3's template writes EOS after the last turn when no generation prompt follows, so the earlier turns,
    rendered alone, end with an EOS the whole conversation has only at its end: each turn ends where it begins."""
    tok = make_tokenizer()
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% else %}{{ eos_token }}{% endif %}")
    turns = [{"role": "user", "content": "the sky is"}, {"role": "assistant", "content": "blue ."},
             {"role": "user", "content": "and grass is"}, {"role": "assistant", "content": "green ."}]
    out = tokenize_example(tok, SFTExample(turns[1:], turns[:1]), max_length=200)
    assert out.prompt_ids + out.answer_ids == _chat_ids(tok, turns)
    trained = tok.decode([i for i, m in zip(out.answer_ids, out.answer_mask) if m])
    assert trained == "blue .<|end|>green .<|end|><eos>"
