"""One literal record of every format, normalised; detection; SFT records."""

from __future__ import annotations

import pytest

from preftune.data.detect import FORMAT_NAMES, detect_format
from preftune.data.formats import to_pair, to_sft
from preftune.data.records import PreferencePair, SFTExample
from preftune.errors import DataError

U = lambda text: {"role": "user", "content": text}  # noqa: E731 - short builders keep the tables readable
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731
S = lambda text: {"role": "system", "content": text}  # noqa: E731

# (format, record, expected pair) for every format.
EXAMPLES = [
    ("text", {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
     PreferencePair("2+2?", "4", "5")),
    ("text", {"prompt": "2+2?", "chosen": "4", "rejected": "5", "system": "Be terse."},
     PreferencePair("2+2?", "4", "5", "Be terse.")),
    ("implicit", {"chosen": "Q: sky colour?\nA: blue", "rejected": "Q: sky colour?\nA: green"},
     PreferencePair("Q: sky colour?\n", "A: blue", "A: green")),
    ("implicit", {"chosen": "User: hi Assistant: hello there", "rejected": "User: hi Assistant: go away"},
     PreferencePair("User: hi Assistant:", " hello there", " go away")),
    ("implicit", {"chosen": "### Instruction: add\n### Response: 4", "rejected": "### Instruction: add\n### Response: 5"},
     PreferencePair("### Instruction: add\n### Response:", " 4", " 5")),
    ("chat", {"prompt": [U("hi")], "chosen": [A("hello")], "rejected": [A("go away")]},
     PreferencePair([U("hi")], [A("hello")], [A("go away")])),
    ("chat", {"prompt": [S("Be kind."), U("hi")], "chosen": [S("Be kind."), U("hi"), A("hello")],
              "rejected": [A("go away")]},
     PreferencePair([U("hi")], [A("hello")], [A("go away")], "Be kind.")),
    ("chat", {"chosen": [U("hi"), A("hey"), U("joke?"), A("a pun")],
              "rejected": [U("hi"), A("hey"), U("joke?"), A("no")]},
     PreferencePair([U("hi"), A("hey"), U("joke?")], [A("a pun")], [A("no")])),
    ("hh", {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"},
     PreferencePair([U("hi")], [A("hello")], [A("go away")])),
    ("ultrafeedback", {"prompt": "hi", "chosen": [U("hi"), A("hello")], "rejected": [U("hi"), A("no")],
                       "score_chosen": 8.0, "score_rejected": 3.5, "prompt_id": "x"},
     PreferencePair([U("hi")], [A("hello")], [A("no")])),
    ("orca", {"system": "You are helpful.", "question": "2+2?", "chosen": "4", "rejected": "5"},
     PreferencePair([U("2+2?")], [A("4")], [A("5")], "You are helpful.", text_fields=True)),
    ("orca", {"system": "", "input": "2+2?", "chosen": "4", "rejected": "5"},
     PreferencePair([U("2+2?")], [A("4")], [A("5")], text_fields=True)),
    ("alpaca", {"instruction": "Add.", "input": "2+2", "chosen": "4", "rejected": "5", "system": "Be terse.",
                "history": [["hi", "hello"]]},
     PreferencePair([U("hi"), A("hello"), U("Add.\n2+2")], [A("4")], [A("5")], "Be terse.", text_fields=True)),
    ("alpaca", {"instruction": "2+2?", "input": "", "chosen": "4", "rejected": "5"},
     PreferencePair([U("2+2?")], [A("4")], [A("5")], text_fields=True)),
    ("medicalgpt", {"system": "", "history": [], "question": "2+2?", "response_chosen": "4",
                    "response_rejected": "5"},
     PreferencePair([U("2+2?")], [A("4")], [A("5")], text_fields=True)),
    ("openai", {"messages": [S("Be kind."), U("hi")], "chosen": {"role": "assistant", "content": "hello"},
                "rejected": [A("no")]},
     PreferencePair([U("hi")], [A("hello")], [A("no")], "Be kind.")),
    ("sharegpt", {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "hi"}],
                  "chosen": {"from": "gpt", "value": "hello"}, "rejected": {"from": "gpt", "value": "no"}},
     PreferencePair([U("hi")], [A("hello")], [A("no")], "Be kind.")),
    ("sharegpt", {"conversations": [{"from": "human", "value": "hi"}], "system": "Be kind.",
                  "chosen": "hello", "rejected": "no"},
     PreferencePair([U("hi")], [A("hello")], [A("no")], "Be kind.")),
    ("ultrainteract", {"trajectory": [{"from": "user", "value": "hi"}], "chosen": "hello", "rejected": "no"},
     PreferencePair([U("hi")], [A("hello")], [A("no")], None)),
    ("chat_messages", {"chosen_messages": [S("Be kind."), {"role": "user", "content": [{"type": "text", "value": "hi"}],
                                                        "loss_weight": 0.0}, A("hello")],
                       "rejected_messages": [S("Be kind."), U("hi"), {"role": "assistant",
                                                                     "content": [{"type": "text", "text": "no"}]}]},
     PreferencePair([U("hi")], [A("hello")], [A("no")], "Be kind.")),
    ("openai_preference", {"input": {"messages": [S("Be kind."), U("hi")]}, "preferred_output": [A("hello")],
                           "non_preferred_output": [A("no")]},
     PreferencePair([U("hi")], [A("hello")], [A("no")], "Be kind.")),
    ("alpaca_ranking", {"instruction": "2+2?", "input": "", "output": ["4", "5"]},
     PreferencePair([U("2+2?")], [A("4")], [A("5")], text_fields=True)),
    ("swift", {"messages": [S("Be kind."), U("hi"), A("hello")], "rejected_response": "no"},
     PreferencePair([U("hi")], [A("hello")], [A("no")], "Be kind.")),
    ("chosen_response", {"prompt": "User: 2+2?\nAssistant:", "chosen_response": " 4", "rejected_response": " 5"},
     PreferencePair("User: 2+2?\nAssistant:", " 4", " 5")),  # NeMo-Aligner: a rendered prompt, as text
    ("chosen_response", {"system": "Be terse.", "instruction": "Add.", "input": "2+2", "chosen_response": "4",
                         "rejected_response": "5"},  # axolotl's argilla form: turns, as alpaca's
     PreferencePair([U("Add.\n2+2")], [A("4")], [A("5")], "Be terse.", text_fields=True)),
    ("helpsteer3", {"context": [S("Be kind."), U("hi")], "response1": "no", "response2": "hello",
                    "overall_preference": 2},
     PreferencePair([U("hi")], [A("hello")], [A("no")], "Be kind.")),
    ("pku_better", {"prompt": "2+2?", "response_0": "5", "response_1": "4", "better_response_id": 1},
     PreferencePair([U("2+2?")], [A("4")], [A("5")], text_fields=True)),
    ("pku_safer", {"prompt": "2+2?", "response_0": "4", "response_1": "5", "safer_response_id": "0"},
     PreferencePair([U("2+2?")], [A("4")], [A("5")], text_fields=True)),
    ("stack_exchange", {"qid": 1, "question": "How?", "response_j": "Like this.", "response_k": "Dunno."},
     PreferencePair("How?", "Like this.", "Dunno.")),
    ("shp", {"history": "Why?", "human_ref_A": "Because.", "human_ref_B": "No idea.", "labels": 1},
     PreferencePair("Why?", "Because.", "No idea.")),
    ("shp", {"history": "Why?", "human_ref_A": "Because.", "human_ref_B": "No idea.", "labels": 0},
     PreferencePair("Why?", "No idea.", "Because.")),
]


@pytest.mark.parametrize("fmt, record, expected", EXAMPLES)
def test_every_format_is_detected_and_normalised(fmt, record, expected):
    assert detect_format(record) == fmt
    pair, _ = to_pair(record, fmt, "f.jsonl line 1")
    expected.where = "f.jsonl line 1"
    assert pair == expected


def test_every_format_has_an_example():
    assert {fmt for fmt, _, _ in EXAMPLES} == set(FORMAT_NAMES)


def test_scores_give_the_gap():
    record = {"prompt": "hi", "chosen": [U("hi"), A("a")], "rejected": [U("hi"), A("b")],
              "score_chosen": 8, "score_rejected": 6.5}
    assert to_pair(record, "ultrafeedback", "w")[1] == 1.5
    shp = {"history": "q", "human_ref_A": "a", "human_ref_B": "b", "labels": "0", "score_A": 3, "score_B": 10}
    pair, gap = to_pair(shp, "shp", "w")
    assert (pair.chosen, gap) == ("b", 7)


def test_hh_prompt_ends_on_the_last_shared_user_turn():
    # The answers differ at the second assistant turn: the prompt is everything before it.
    record = {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
              "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: e\n\nAssistant: f"}
    pair, _ = to_pair(record, "hh", "w")
    assert pair.prompt == [U("a"), A("b"), U("c")]
    assert pair.chosen == [A("d")] and pair.rejected == [A("e"), A("f")]


def test_hh_keeps_whitespace_and_empty_turns():
    record = {"chosen": "\n\nHuman:  two spaces \n\nAssistant: ", "rejected": "\n\nHuman:  two spaces \n\nAssistant: x\n"}
    pair, _ = to_pair(record, "hh", "w")
    assert pair.prompt == [U(" two spaces ")]
    assert pair.chosen == [A("")] and pair.rejected == [A("x\n")]


def test_a_forced_format_reads_keys_detection_would_not_pick():
    record = {"prompt": "q", "chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}
    assert detect_format(record) == "text"
    assert to_pair(record, "hh", "w")[0].chosen == [A("a")]


def test_hh_and_implicit_are_told_apart_by_the_markers():
    assert detect_format({"chosen": "Human: a Assistant: b", "rejected": "Human: a Assistant: c"}) == "implicit"


def test_hh_copies_without_the_leading_blank_line_are_hh():
    record = {"chosen": "Human: hi\n\nAssistant: hello", "rejected": "Human: hi\n\nAssistant: what?"}
    assert detect_format(record) == "hh"
    pair, _ = to_pair(record, "hh", "w")
    assert (pair.prompt, pair.chosen, pair.rejected) == ([U("hi")], [A("hello")], [A("what?")])


def test_ultrafeedback_binarized_with_its_messages_column_is_ultrafeedback():
    """HuggingFaceH4/ultrafeedback_binarized: `messages` repeats the chosen conversation; it is not a prompt."""
    chosen, rejected = [U("q"), A("good")], [U("q"), A("bad")]
    record = {"prompt": "q", "prompt_id": "x1", "chosen": chosen, "rejected": rejected, "messages": chosen,
              "score_chosen": 9.0, "score_rejected": 3.0}
    assert detect_format(record) == "ultrafeedback"
    pair, gap = to_pair(record, "ultrafeedback", "w")
    assert (pair.prompt, pair.chosen, pair.rejected, gap) == ([U("q")], [A("good")], [A("bad")], 6.0)
    # The OpenAI layout keeps its reading: `messages` is the prompt, the answers are assistant turns.
    assert detect_format({"messages": [U("q")], "chosen": A("good"), "rejected": A("bad")}) == "openai"


def test_a_question_key_beside_message_list_answers_is_not_orca():
    """mlabonne/orpo-dpo-mix-40k: a `question` string beside chosen/rejected conversations."""
    record = {"source": "s", "prompt": "q", "question": "q", "chosen": [U("q"), A("good")],
              "rejected": [U("q"), A("bad")]}
    assert detect_format(record) == "ultrafeedback"
    assert detect_format({"system": "", "question": "q", "chosen": "good", "rejected": "bad"}) == "orca"


def test_numbers_written_as_strings_are_read_as_numbers():
    """CSV cells are strings: scores and margins written there still count."""
    shp = {"history": "q", "human_ref_A": "a", "human_ref_B": "b", "labels": "1", "score_A": "12", "score_B": "3.5"}
    assert to_pair(shp, "shp", "w") == (PreferencePair("q", "a", "b", None, "w"), 8.5)
    with pytest.raises(DataError, match="'score_A' must be a number"):
        to_pair({**shp, "score_A": "many"}, "shp", "w")


@pytest.mark.parametrize("record", [{}, {"foo": 1}, {"chosen": 1, "rejected": 2}, [1, 2], "text"])
def test_unknown_shapes_are_not_detected(record):
    assert detect_format(record) is None


@pytest.mark.parametrize("fmt, record, words", [
    ("text", {"prompt": "q", "chosen": "a"}, ["missing key 'rejected'", "keys seen: prompt, chosen"]),
    ("text", {"prompt": "q", "chosen": 3, "rejected": "b"}, ["'chosen' must be a string, got int"]),
    ("text", {"prompt": "q", "chosen": "  ", "rejected": "b"}, ["chosen answer is empty"]),
    ("chat", {"chosen": [{"role": "robot", "content": "x"}], "rejected": []}, ["role 'robot'"]),
    ("chat", {"chosen": [U("a"), A("b")], "rejected": [U("a")]}, ["rejected answer must end with an assistant"]),
    ("chat", {"prompt": [U("a")], "chosen": [U("a"), A("b")], "rejected": [U("a")]}, ["rejected answer is empty"]),
    ("chat", {"chosen": [U("a"), {"role": "assistant", "content": [1]}], "rejected": [U("a")]},
     ["message 2 content part 1 is 'int', not a text part"]),
    ("chat", {"chosen": [U("a"), {"role": "assistant", "content": 3}], "rejected": [U("a")]},
     ["message 2 content must be a string or a list of text parts, got int"]),
    ("sharegpt", {"conversations": [{"from": "alien", "value": "x"}], "chosen": {}, "rejected": {}}, ["'from'"]),
    ("shp", {"history": "q", "human_ref_A": "a", "human_ref_B": "b", "labels": 2}, ["'labels' must be 1"]),
    ("hh", {"chosen": "intro\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"},
     ["different text before their first turn"]),
])
def test_malformed_records_name_the_record_key_and_format(fmt, record, words):
    with pytest.raises(DataError) as err:
        to_pair(record, fmt, "f.jsonl line 7")
    message = str(err.value)
    assert message.startswith("f.jsonl line 7: ") and f"format {fmt!r}" in message
    for word in words:
        assert word in message


@pytest.mark.parametrize("record, expected", [
    ({"text": "all of it"}, SFTExample("all of it")),
    ({"prompt": "q", "completion": "a"}, SFTExample("a", "q")),
    ({"prompt": "q", "response": "a"}, SFTExample("a", "q")),  # the answer under another name: as a completion
    ({"prompt": [S("sys"), U("q")], "completion": [A("a")]}, SFTExample([A("a")], [U("q")], "sys")),
    ({"messages": [S("sys"), U("q"), A("a"), U("q2"), A("a2")]},
     SFTExample([A("a"), U("q2"), A("a2")], [U("q")], "sys")),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
     SFTExample([A("a")], [U("q")])),
])
def test_sft_records(record, expected):
    expected.where = "w"
    assert to_sft(record, "w") == expected


@pytest.mark.parametrize("record, words", [
    ({"messages": [U("q")]}, "must end with an assistant turn"),
    ({"input": "x"}, "cannot read an SFT example from the keys seen (input)"),
    ({"prompt": "q", "completion": 5}, "'completion' must be a string"),
])
def test_bad_sft_records(record, words):
    with pytest.raises(DataError, match="^w: ") as err:
        to_sft(record, "w")
    assert words in str(err.value)
