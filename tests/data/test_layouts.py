"""One conversation written in every layout people use reads back as exactly the same pair; nothing is dropped
without a word; unpaired feedback is told apart from pairs."""

from __future__ import annotations

import json
import os

import pytest
from tinylm import make_tokenizer

from preftune.data.check import check_pairs
from preftune.data.detect import detect
from preftune.data.formats import read_pair
from preftune.data.load import load_pairs, load_sft, read_unpaired_source
from preftune.data.records import PreferencePair, UnpairedExample
from preftune.errors import DataError

U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731
S = lambda text: {"role": "system", "content": text}  # noqa: E731

# The conversation a reader sees: a system prompt, one earlier exchange, then the question and two answers.
SYSTEM, EARLIER, QUESTION = "Be brief.", [U("hi"), A("hello")], "Add the numbers.\n2 + 2"
PAIR = PreferencePair(EARLIER + [U(QUESTION)], [A("4")], [A("5")], SYSTEM)

SAME_CONVERSATION = {
    "alpaca": {"instruction": "Add the numbers.", "input": "2 + 2", "chosen": "4", "rejected": "5",
               "system": SYSTEM, "history": [["hi", "hello"]]},
    "medicalgpt": {"system": SYSTEM, "history": [["hi", "hello"]], "question": QUESTION, "response_chosen": "4",
                   "response_rejected": "5"},
    "sharegpt": {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
                                   {"from": "human", "value": QUESTION}],
                 "system": SYSTEM, "chosen": {"from": "gpt", "value": "4"}, "rejected": {"from": "gpt", "value": "5"}},
    "sharegpt-strings": {"conversations": [{"from": "system", "value": SYSTEM}, {"from": "human", "value": "hi"},
                                           {"from": "gpt", "value": "hello"}, {"from": "human", "value": QUESTION}],
                         "chosen": "4", "rejected": "5"},
    "openai": {"messages": [S(SYSTEM), U("hi"), A("hello"), U(QUESTION)], "chosen": A("4"), "rejected": A("5")},
    "chat": {"prompt": [S(SYSTEM), U("hi"), A("hello"), U(QUESTION)], "chosen": [A("4")], "rejected": [A("5")]},
    "chat-implicit": {"chosen": [S(SYSTEM), U("hi"), A("hello"), U(QUESTION), A("4")],
                      "rejected": [S(SYSTEM), U("hi"), A("hello"), U(QUESTION), A("5")]},
}


@pytest.mark.parametrize("layout", SAME_CONVERSATION)
def test_one_conversation_in_every_layout_reads_the_same(layout):
    record = SAME_CONVERSATION[layout]
    fmt, note = detect(record)
    assert fmt == layout.split("-")[0] and note is None
    pair, _, unused = read_pair(record, fmt, "w")
    assert (pair.prompt, pair.system, pair.chosen, pair.rejected, pair.tools) == (
        PAIR.prompt, PAIR.system, PAIR.chosen, PAIR.rejected, None)
    assert unused == []
    assert pair.text_fields == (fmt in ("alpaca", "medicalgpt"))  # the layouts that write turns as text fields


WEATHER = {"name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
TOOL_PAIR = PreferencePair(
    [U("Weather in Paris?"),
     {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": CALL}]},
     {"role": "tool", "content": '{"sky": "sunny"}'}],
    [A("Sunny.")], [A("Rainy.")], None, tools=[{"type": "function", "function": WEATHER}])
TOOL_CONVERSATION = {
    # LLaMA-Factory: tool turns inside conversations, the schemas as a JSON string
    "sharegpt": {"conversations": [{"from": "human", "value": "Weather in Paris?"},
                                   {"from": "function_call", "value": json.dumps(CALL)},
                                   {"from": "observation", "value": '{"sky": "sunny"}'}],
                 "tools": json.dumps([WEATHER]), "chosen": {"from": "gpt", "value": "Sunny."},
                 "rejected": {"from": "gpt", "value": "Rainy."}},
    # OpenAI: arguments as a JSON string, null content beside the call, schemas wrapped in {type, function}
    "openai": {"messages": [U("Weather in Paris?"),
                            {"role": "assistant", "content": None, "tool_calls": [
                                {"type": "function", "function": {"name": "get_weather",
                                                                  "arguments": '{"city": "Paris"}'}}]},
                            {"role": "tool", "content": '{"sky": "sunny"}'}],
               "tools": [{"type": "function", "function": WEATHER}], "chosen": A("Sunny."), "rejected": A("Rainy.")},
    # TRL conversational with a tools column
    "chat": {"prompt": [U("Weather in Paris?"),
                        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": CALL}]},
                        {"role": "tool", "content": '{"sky": "sunny"}'}],
             "tools": [WEATHER], "chosen": [A("Sunny.")], "rejected": [A("Rainy.")]},
}


@pytest.mark.parametrize("layout", TOOL_CONVERSATION)
def test_tool_calling_conversations_read_the_same_in_every_layout(layout):
    pair, _, unused = read_pair(TOOL_CONVERSATION[layout], layout, "w")
    assert (pair.prompt, pair.chosen, pair.rejected, pair.tools) == (
        TOOL_PAIR.prompt, TOOL_PAIR.chosen, TOOL_PAIR.rejected, TOOL_PAIR.tools)
    assert unused == []


def test_a_tool_call_can_be_the_answer():
    record = dict(TOOL_CONVERSATION["sharegpt"], conversations=[{"from": "human", "value": "Weather in Paris?"}],
                  chosen={"from": "function_call", "value": json.dumps(CALL)}, rejected="It is sunny.")
    pair, _, _ = read_pair(record, "sharegpt", "w")
    assert pair.chosen == [{"role": "assistant", "content": "",
                            "tool_calls": [{"type": "function", "function": CALL}]}]
    assert pair.rejected == [A("It is sunny.")]


# --------------------------------------------------------------------------- nothing dropped without a word
def test_unused_keys_are_counted_per_key(jsonl_file):
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b", "id": i, "source": "web"} for i in range(3)]
    rows[0]["source"] = None  # a null holds nothing: not reported
    pairs, report = load_pairs(jsonl_file(rows))
    assert len(pairs) == 3
    assert dict(report.unused_keys) == {"id": 3, "source": 2}
    assert report.unused_line().endswith("keys not used by format 'text', ignored (records holding each): "
                                         "id (3), source (2)")


def test_unused_parts_of_turns_are_reported():
    record = dict(SAME_CONVERSATION["sharegpt"])
    record["conversations"] = [dict(turn, timestamp=1.0) for turn in record["conversations"]]
    assert read_pair(record, "sharegpt", "w")[2] == ["conversations[].timestamp"]


def test_alpaca_read_as_orca_loses_its_prompt_and_says_so():
    # Forced to orca, the empty input would be the prompt: refused, naming the key that held the prompt.
    record = {"instruction": "Add.", "input": "", "chosen": "4", "rejected": "5"}
    with pytest.raises(DataError, match=r"^w: the prompt is empty, though the record has 'instruction', 'input'"):
        read_pair(record, "orca", "w")
    with pytest.raises(DataError, match="the prompt is empty, though the record has 'instruction'"):
        read_pair({"instruction": "Add.", "chosen": "4", "rejected": "5"}, "implicit", "w")


def test_whole_texts_without_prompt_keys_may_share_no_prompt():
    pair, _, unused = read_pair({"chosen": "yes", "rejected": "no"}, "implicit", "w")
    assert (pair.prompt, pair.chosen, unused) == ("", "yes", [])


def test_whole_texts_without_a_turn_marker_share_the_words_they_share():
    """The prompt ends at the last space before the texts part; the ids are then the ones TRL 1.16 gets by
    tokenising each whole text and cutting where its ids leave the tokenised common prefix's."""
    tok = make_tokenizer()
    chosen, rejected = "the sky is blue and grass is green .", "the sky is grey and grass is green ."
    pair, _, _ = read_pair({"chosen": chosen, "rejected": rejected}, "implicit", "w")
    assert (pair.prompt, pair.chosen, pair.rejected) == ("the sky is", " blue and grass is green .",
                                                         " grey and grass is green .")
    prompt_ids = tok(os.path.commonprefix([chosen, rejected]))["input_ids"]
    for text, answer in ((chosen, pair.chosen), (rejected, pair.rejected)):
        whole = tok(text)["input_ids"]
        n = next(i for i, (a, b) in enumerate(zip(prompt_ids, whole)) if a != b)
        assert tok(pair.prompt)["input_ids"] == whole[:n]
        assert tok(answer, add_special_tokens=False)["input_ids"] == whole[n:]


def test_a_choice_between_two_readings_is_explained():
    fmt, note = detect({"instruction": "Add.", "question": "2+2?", "chosen": "4", "rejected": "5"})
    assert fmt == "alpaca"
    assert note == ("read as 'alpaca' because it has 'instruction'; the keys fit orca (it has 'question', or "
                    "'input' without 'prompt') too (pass --data-format to choose)")


def test_check_lists_unused_keys_and_the_detection_note(jsonl_file):
    rows = [{"instruction": "Add.", "question": "2+2?", "chosen": "4", "rejected": "5", "id": 1}]
    result = check_pairs(jsonl_file(rows))
    assert result.report.detection.startswith("read as 'alpaca'")
    assert dict(result.report.unused_keys) == {"question": 1, "id": 1}


def test_sft_reports_unused_keys(jsonl_file):
    _, report = load_sft(jsonl_file([{"messages": [U("q"), A("a")], "lang": "en"}]))
    assert dict(report.unused_keys) == {"lang": 1}


# --------------------------------------------------------------------------- unpaired feedback
UNPAIRED = [
    ({"prompt": "2+2?", "completion": "4", "label": True}, UnpairedExample("2+2?", "4", True)),
    ({"prompt": "2+2?", "completion": "4", "label": 1}, UnpairedExample("2+2?", "4", True)),   # 1/0, as many write it
    ({"prompt": "2+2?", "completion": "5", "label": "0"}, UnpairedExample("2+2?", "5", False)),  # a CSV cell
    ({"prompt": [U("2+2?")], "completion": [A("5")], "label": False}, UnpairedExample([U("2+2?")], [A("5")], False)),
    ({"instruction": "Add.", "input": "2+2", "output": "4", "kto_tag": True},
     UnpairedExample([U("Add.\n2+2")], [A("4")], True)),
    ({"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "5"}], "kto_tag": False},
     UnpairedExample([U("2+2?")], [A("5")], False)),
    # LLaMA-Factory's kto_en_demo.json: `messages` with the tag renamed `label` by its dataset_info
    ({"messages": [U("2+2?"), A("4")], "label": True}, UnpairedExample([U("2+2?")], [A("4")], True)),
]


@pytest.mark.parametrize("record, expected", UNPAIRED)
def test_unpaired_feedback_is_read_for_check(jsonl_file, record, expected):
    examples, report = read_unpaired_source(jsonl_file([record]))
    expected.where = examples[0].where
    assert examples == [expected] and dict(report.unused_keys) == {}


@pytest.mark.parametrize("record", [r for r, _ in UNPAIRED])
def test_unpaired_feedback_is_refused_for_pairs_in_one_line(jsonl_file, record):
    with pytest.raises(DataError) as err:
        load_pairs(jsonl_file([record]), skip_bad_records=True)
    message = str(err.value)
    assert "\n" not in message and "line 1: this is unpaired feedback" in message and "for KTO" in message


# --------------------------------------------------------------------------- tools through the chat template
TOOLS_TEMPLATE = (
    "{% if tools %}<|tools|>{% for t in tools %}{{ t.function.name }};{% endfor %}{{ eos_token }}{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "call {{ c.function.name }} {{ c.function.arguments | tojson }}{% endfor %}{% else %}{{ m.content }}{% endif %}"
    "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_tools_are_rendered_by_a_template_that_knows_them():
    from tinylm import make_tokenizer

    from preftune.data.tokenize import tokenize_pair

    tok = make_tokenizer()
    tok.chat_template = TOOLS_TEMPLATE
    out = tokenize_pair(tok, TOOL_PAIR, max_length=4096)
    prompt = ('<|tools|>get_weather;<eos><|user|>Weather in Paris?<eos><|assistant|>call get_weather {"city": "Paris"}'
              '<eos><|tool|>{"sky": "sunny"}<eos><|assistant|>')
    assert out.prompt_ids == tok(prompt, add_special_tokens=False)["input_ids"]
    assert out.chosen_ids == tok("Sunny.<eos>", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("template", [None, "plain"])
def test_tools_without_template_support_are_one_clear_error(template):
    from tinylm import make_tokenizer

    from preftune.data.tokenize import tokenize_pair

    tok = make_tokenizer()
    if template is None:
        tok.chat_template = None
    pair = PreferencePair(TOOL_PAIR.prompt, TOOL_PAIR.chosen, TOOL_PAIR.rejected, None, "f line 3", TOOL_PAIR.tools)
    with pytest.raises(DataError, match=r"^f line 3: .*(no chat template|no tool support)"):
        tokenize_pair(tok, pair, max_length=4096)


def test_orca_turns_use_the_template_unless_raw_text_is_asked_for():
    from tinylm import make_tokenizer

    from preftune.data.tokenize import tokenize_pair

    tok = make_tokenizer()
    pair, _, _ = read_pair({"system": "be brief", "question": "the sky is", "chosen": "blue", "rejected": "red"},
                           "orca", "w")
    chat = tokenize_pair(tok, pair, max_length=512)
    assert chat.prompt_ids == tok("<bos><|system|>be brief<eos><|user|>the sky is<eos><|assistant|>",
                                  add_special_tokens=False)["input_ids"]
    raw = tokenize_pair(tok, pair, max_length=512, raw_text_prompts=True)
    assert raw.prompt_ids == tok("be brief\n\nthe sky is")["input_ids"]
    assert raw.chosen_ids == tok("blue", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_dpo_on_unpaired_feedback_is_one_line_exit_2_and_no_run_folder(jsonl_file, tiny_model_dir, tmp_path, capsys):
    from preftune.cli import main

    data = jsonl_file([record for record, _ in UNPAIRED[:2]])
    code = main(["dpo", "--model", str(tiny_model_dir), "--data", data, "--output-dir", str(tmp_path / "run"),
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "unpaired feedback" in err and "for KTO" in err
    assert not (tmp_path / "run").exists()


def test_generate_gives_the_model_a_records_tools_and_system(jsonl_file, tiny_model_dir, tmp_path, monkeypatch):
    """`preftune generate --data` prompts the model with exactly the ids training puts before the answer."""
    import shutil

    from tinylm import make_tokenizer

    import preftune.generate
    from preftune.cli import main

    model = tmp_path / "tools-model"
    shutil.copytree(tiny_model_dir, model)
    tok = make_tokenizer()
    tok.chat_template = TOOLS_TEMPLATE
    tok.save_pretrained(model)
    seen = []

    def fake_generate(model, tokenizer, prompts, **kw):
        seen.extend(prompts)
        return ["-"] * len(prompts)
    monkeypatch.setattr(preftune.generate, "generate_answers", fake_generate)
    orca = {"system": "be brief", "question": "the sky is", "chosen": "blue", "rejected": "red"}
    assert main(["generate", "--model", str(model), "--data", jsonl_file([TOOL_CONVERSATION["chat"]]),
                 "--device", "cpu"]) == 0
    assert main(["generate", "--model", str(model), "--data", jsonl_file([orca]), "--device", "cpu"]) == 0
    tools_prompt = ('<|tools|>get_weather;<eos><|user|>Weather in Paris?<eos><|assistant|>call get_weather '
                    '{"city": "Paris"}<eos><|tool|>{"sky": "sunny"}<eos><|assistant|>')
    assert seen[0] == tok(tools_prompt, add_special_tokens=False)["input_ids"]
    assert seen[1] == tok("<|system|>be brief<eos><|user|>the sky is<eos><|assistant|>")["input_ids"]
