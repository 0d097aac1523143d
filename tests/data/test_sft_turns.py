"""SFT on a conversation puts every assistant turn in the loss, and nothing else; the flag keeps the last one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tinylm import make_tokenizer
from preftune.data.batching import collate
from preftune.data.formats import to_sft
from preftune.data.records import PreferencePair
from preftune.data.rows import NOT_TRAINED
from preftune.data.tokenize import tokenize_example
from preftune.logps.answer import answer_logps
from preftune.demo.base import tiny_llama
from preftune.errors import DataError

U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731
CONVERSATION = {"messages": [U("the sky is"), A("blue ."), U("and grass is"), A("green .")]}


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_every_assistant_turn_is_trained_token_by_token(tok):
    # The tiny template writes <|role|>content<eos> per turn, then <|assistant|> as the generation prompt.
    out = tokenize_example(tok, to_sft(CONVERSATION, "w"), max_length=512)
    first, between, second = (_ids(tok, "blue .<eos>"), _ids(tok, "<|user|>and grass is<eos><|assistant|>"),
                              _ids(tok, "green .<eos>"))
    assert out.prompt_ids == [tok.bos_token_id] + _ids(tok, "<|user|>the sky is<eos><|assistant|>")
    assert out.answer_ids == first + between + second
    assert out.answer_mask == [1] * len(first) + [0] * len(between) + [1] * len(second)


def test_last_turn_only_keeps_the_old_split(tok):
    out = tokenize_example(tok, to_sft(CONVERSATION, "w"), max_length=512, last_turn_only=True)
    assert out.prompt_ids == [tok.bos_token_id] + _ids(
        tok, "<|user|>the sky is<eos><|assistant|>blue .<eos><|user|>and grass is<eos><|assistant|>")
    assert out.answer_ids == _ids(tok, "green .<eos>") and out.answer_mask is None


def test_one_turn_has_no_mask(tok):
    out = tokenize_example(tok, to_sft({"messages": [U("the sky is"), A("blue .")]}, "w"), max_length=512)
    assert out.answer_ids == _ids(tok, "blue .<eos>") and out.answer_mask is None


def test_truncation_cuts_the_mask_with_the_answer(tok):
    whole = tokenize_example(tok, to_sft(CONVERSATION, "w"), max_length=512)
    out = tokenize_example(tok, to_sft(CONVERSATION, "w"), max_length=len(whole.prompt_ids) + 6)
    assert out.truncated and out.answer_ids == whole.answer_ids[:6] and out.answer_mask == whole.answer_mask[:6]


@pytest.mark.parametrize("prefix_sharing", [True, False])
def test_masked_log_probs_sum_only_the_assistant_turns(tok, prefix_sharing):
    """The loss sees each trained token's log-prob, from a plain forward of the whole sequence."""
    examples = [to_sft(CONVERSATION, "a"), to_sft({"messages": [U("cats chase"), A("mice .")]}, "b")]
    items = [tokenize_example(tok, e, max_length=512, index=i) for i, e in enumerate(examples)]
    model = tiny_llama(len(tok), hidden=32, layers=2, heads=4, pad_id=tok.pad_token_id, seed=0).float().eval()
    batch = collate(items, pad_id=tok.pad_token_id)
    with torch.no_grad():
        got = answer_logps(model, batch, prefix_sharing=prefix_sharing, chunk_size=3).logps
        for row, item in enumerate(items):
            ids = torch.tensor([item.prompt_ids + item.answer_ids])
            logits = model(input_ids=ids).logits[0]
            n = len(item.prompt_ids)
            per_token = F.log_softmax(logits[n - 1:-1], -1).gather(-1, ids[0, n:, None])[:, 0]
            keep = [1] * len(item.answer_ids) if item.answer_mask is None else item.answer_mask
            expected = sum(float(lp) for lp, k in zip(per_token, keep) if k)
            assert abs(float(got[row]) - expected) < 1e-4
    assert batch.answer_tokens() == sum(items[0].answer_mask) + len(items[1].answer_ids)


ALPACA = {"system": "Be brief.", "history": [["hi", "hello ."]], "instruction": "Add the numbers.", "input": "2 + 2",
          "output": "4 ."}
SAME_AS_MESSAGES = {"messages": [{"role": "system", "content": "Be brief."}, U("hi"), A("hello ."),
                                 U("Add the numbers.\n2 + 2"), A("4 .")]}


def test_alpaca_sft_records_read_as_the_conversation_they_write():
    from preftune.data.formats import read_sft

    example, unused = read_sft(ALPACA, "f line 1")
    assert (example.prompt, example.completion, example.system) == (
        [U("hi")], [A("hello ."), U("Add the numbers.\n2 + 2"), A("4 .")], "Be brief.")
    assert unused == []
    one, _ = read_sft({"instruction": "Name a colour.", "input": "", "output": "blue"}, "f line 2")
    assert (one.prompt, one.completion, one.system) == ([U("Name a colour.")], [A("blue")], None)
    with_text, unused = read_sft({"instruction": "Name a colour.", "output": "blue", "text": "### Instruction..."},
                                 "f line 3")
    assert with_text.completion == [A("blue")] and unused == ["text"]  # reported, not trained on


@pytest.mark.parametrize("last_turn_only", [False, True])
def test_alpaca_sft_trains_what_the_same_messages_record_trains(tok, last_turn_only):
    alpaca = tokenize_example(tok, to_sft(ALPACA, "w"), max_length=512, last_turn_only=last_turn_only)
    messages = tokenize_example(tok, to_sft(SAME_AS_MESSAGES, "w"), max_length=512, last_turn_only=last_turn_only)
    assert (alpaca.prompt_ids, alpaca.answer_ids, alpaca.answer_mask) == (
        messages.prompt_ids, messages.answer_ids, messages.answer_mask)
    trained = [t for t, m in zip(alpaca.answer_ids, alpaca.answer_mask or [1] * len(alpaca.answer_ids)) if m]
    expected = ("" if last_turn_only else "hello .<eos>") + "4 .<eos>"
    assert trained == _ids(tok, expected)


def test_alpaca_sft_without_a_template_is_the_text_a_pair_would_be(tok):
    """One turn, no chat template (or --raw-text-prompts): system and instruction as prompt text, the output as
    the answer, exactly the chosen side of the alpaca preference record."""
    from preftune.data.formats import read_pair
    from preftune.data.tokenize import tokenize_pair

    record = {"system": "Be brief.", "instruction": "Add the numbers.", "input": "2 + 2", "output": "4 ."}
    pair, _, _ = read_pair({**record, "chosen": "4 .", "rejected": "5 ."}, "alpaca", "w")
    raw = tokenize_example(tok, to_sft(record, "w"), max_length=512, raw_text_prompts=True)
    assert raw.prompt_ids == tok("Be brief.\n\nAdd the numbers.\n2 + 2")["input_ids"]
    assert raw.answer_ids == _ids(tok, "4 .") + [tok.eos_token_id] and raw.answer_mask is None
    assert raw.prompt_ids == tokenize_pair(tok, pair, max_length=512, raw_text_prompts=True).prompt_ids


def test_a_system_column_beside_sft_conversations_is_their_system_prompt(tok):
    """LLaMA-Factory and others keep the system prompt in a column beside the turns, for every SFT layout
    that has a prompt; it was read for ShareGPT `conversations` only and reported unused beside the others."""
    from preftune.data.formats import read_sft

    chat = [U("hi"), A("hello .")]
    in_turns = tokenize_example(tok, to_sft({"messages": [{"role": "system", "content": "Be brief."}, *chat]}, "w"),
                                max_length=512)
    for record in ({"system": "Be brief.", "messages": chat},
                   {"system": "Be brief.", "prompt": chat[:1], "completion": chat[1:]},
                   {"system": "Be brief.", "conversations": [{"from": "human", "value": "hi"},
                                                             {"from": "gpt", "value": "hello ."}]}):
        example, unused = read_sft(record, "w")
        assert (example.system, unused) == ("Be brief.", [])
        assert tokenize_example(tok, example, max_length=512).prompt_ids == in_turns.prompt_ids
    text, unused = read_sft({"system": "Be brief.", "prompt": "Add 2 and 2.", "completion": "4 ."}, "w")
    assert unused == []  # before the prompt, as a text pair has it
    assert tokenize_example(tok, text, max_length=512).prompt_ids == tok("Be brief.\n\nAdd 2 and 2.")["input_ids"]
    alone, unused = read_sft({"system": "Be brief.", "completion": "4 ."}, "w")
    assert (alone.system, unused) == (None, ["system"])  # no prompt to put it before: reported, not used
    with pytest.raises(DataError, match="the system prompt is given twice"):
        read_sft({"system": "Be brief.", "messages": [{"role": "system", "content": "Be long."}, *chat]}, "w")


# Qwen3's template in short: a default system prompt when none is given, and the think block (empty when the
# turn has no reasoning) only on assistant turns after the last user turn; earlier turns lose their reasoning.
THINK_LAST = (
    "{% if messages[0].role != 'system' %}<|im_start|>system\nDefault.<|im_end|>\n{% endif %}"
    "{% set ns = namespace(last=-1) %}"
    "{% for m in messages %}{% if m.role == 'user' %}{% set ns.last = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}"
    "{% if m.role == 'assistant' %}"
    "{% set answer = m.content.split('</think>')[-1].lstrip('\\n') %}"
    "{% set thought = m.content.split('</think>')[0].split('<think>')[-1].strip('\\n') "
    "if '</think>' in m.content else '' %}"
    "{% if loop.index0 > ns.last %}<|im_start|>assistant\n<think>\n{{ thought }}\n</think>\n\n{{ answer }}"
    "<|im_end|>\n"
    "{% else %}<|im_start|>assistant\n{{ answer }}<|im_end|>\n{% endif %}"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def think_tok():
    t = make_tokenizer()
    t.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    t.chat_template = THINK_LAST
    return t


def _spans(tok, ids: list[int], mask: list[int] | None) -> list[tuple[str, int]]:
    """The answer as (text, trained) runs."""
    mask = mask or [1] * len(ids)
    runs: list[tuple[list[int], int]] = []
    for i, m in zip(ids, mask):
        if runs and runs[-1][1] == m:
            runs[-1][0].append(i)
        else:
            runs.append(([i], m))
    return [(tok.decode(r, skip_special_tokens=False), m) for r, m in runs]


@pytest.mark.parametrize("earlier", ["the sky is blue .", "<think>\nlook up\n</think>\n\nthe sky is blue ."])
def test_a_template_that_marks_only_the_last_turn_trains_every_turn_as_the_conversation_writes_it(think_tok, earlier):
    """Every SFT conversation of two or more assistant turns was refused under Qwen3's template: the earlier
    turn rendered alone (as the last turn, with its think block) does not start the whole conversation."""
    chat = [U("the sky is"), A(earlier), U("and grass is"), A("green .")]
    out = tokenize_example(think_tok, to_sft({"messages": chat}, "w"), max_length=512)
    assert think_tok.decode(out.prompt_ids, skip_special_tokens=False) == (
        "<|im_start|>system\nDefault.<|im_end|>\n<|im_start|>user\nthe sky is<|im_end|>\n<|im_start|>assistant\n")
    # By hand from the template: the earlier turn without a think block (its reasoning left out, as the model
    # sees the conversation), the last with its empty one.
    assert _spans(think_tok, out.answer_ids, out.answer_mask) == [
        ("the sky is blue .<|im_end|>\n", 1), ("<|im_start|>user\nand grass is<|im_end|>\n<|im_start|>assistant\n", 0),
        ("<think>\n\n</think>\n\ngreen .<|im_end|>\n", 1)]


def test_an_empty_system_turn_keeps_the_template_default_out(think_tok):
    """An empty system turn was dropped like a missing one, so the template wrote its default system prompt
    into a prompt the record had emptied of it."""
    import preftune
    from preftune.data.tokenize import tokenize_pair

    empty = {"role": "system", "content": ""}
    expected = "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nthe sky is<|im_end|>\n<|im_start|>assistant\n"
    sft = tokenize_example(think_tok, to_sft({"messages": [empty, U("the sky is"), A("blue .")]}, "w"), max_length=64)
    [pair] = preftune.load_pairs([{"prompt": [empty, U("the sky is")], "chosen": [A("blue .")],
                                   "rejected": [A("red .")]}])
    dpo = tokenize_pair(think_tok, pair, max_length=64)
    for prompt_ids in (sft.prompt_ids, dpo.prompt_ids):
        assert think_tok.decode(prompt_ids, skip_special_tokens=False) == expected


def test_turns_their_data_marks_weight_0_are_context_not_trained(tok):
    """OpenAI's and axolotl's `weight: 0`, ms-swift's `loss: false` and LLaMA-Factory's `loss_weight: 0` on an
    assistant turn say: do not train it. Such turns were trained, the key only listed as unused."""
    from preftune.data.formats import read_sft
    from preftune.data.tokenize import tokenize_pair
    import preftune

    plain = tokenize_example(tok, to_sft(CONVERSATION, "w"), max_length=512)
    first = len(_ids(tok, "blue .<eos>"))
    expected = [0] * first + plain.answer_mask[first:]               # the first turn masked like the user turn
    skip = lambda key, no: {"role": "assistant", "content": "blue .", key: no}  # noqa: E731
    records = [{"messages": [U("the sky is"), skip("weight", 0), U("and grass is"), A("green .")]},
               {"messages": [U("the sky is"), skip("loss", False), U("and grass is"), {**A("green ."), "loss": True}]},
               {"messages": [U("the sky is"), skip("loss_weight", 0.0), U("and grass is"), A("green .")]},
               {"conversations": [{"from": "human", "value": "the sky is"}, {"from": "gpt", "value": "blue .",
                                                                             "weight": 0},
                                  {"from": "human", "value": "and grass is"}, {"from": "gpt", "value": "green ."}]}]
    for record in records:
        example, unused = read_sft(record, "w")
        out = tokenize_example(tok, example, max_length=512)
        assert unused == [] and out.answer_ids == plain.answer_ids and out.answer_mask == expected
    with pytest.raises(DataError, match=r"has weight 0\.5; a turn is trained \(1, true\) or not"):
        read_sft({"messages": [U("the sky is"), skip("weight", 0.5)]}, "w")
    with pytest.raises(DataError, match="every assistant turn is marked not to be trained"):  # read: so data check
        read_sft({"messages": [U("the sky is"), skip("weight", 0)]}, "w")  # and --skip-bad-records take it
    two = read_sft({"messages": [U("the sky is"), A("blue ."), U("and grass"), skip("weight", 0)]}, "w")[0]
    with pytest.raises(DataError, match="every assistant turn it would train is marked not to be"):
        tokenize_example(tok, two, max_length=64, last_turn_only=True)  # the last turn alone: when tokenised
    marked = {"prompt": [U("the sky is")], "chosen": [skip("weight", 0)], "rejected": [A("red .")]}
    with pytest.raises(DataError, match="marked not to be trained .* only SFT reads"):  # read, so data check says it
        preftune.load_pairs([marked])
    pair = PreferencePair([U("the sky is")], [{**A("blue ."), NOT_TRAINED: True}], [A("red .")])  # built in code
    with pytest.raises(DataError, match="marked not to be trained .* only SFT reads"):
        tokenize_pair(tok, pair, max_length=64)
