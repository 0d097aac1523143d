"""Records as public datasets and tools write them, at their edges: each is read right, or refused in one line
naming the record; none is trained on silently wrong."""

from __future__ import annotations

import csv
import json
import logging

import pytest

from tinylm import make_tokenizer
from preftune.data.check import check_pairs
from preftune.data.formats import read_pair, read_sft
from preftune.data.load import load_pairs, load_unpaired
from preftune.data.tokenize import tokenize_example, tokenize_pair
from preftune.errors import DataError


def _no_template():
    tok = make_tokenizer()
    tok.chat_template = None
    return tok


def test_a_system_turn_inside_a_conversation_needs_a_chat_template():
    """A Human/Assistant transcript has no speaker for a later system turn: one line, not a KeyError."""
    prompt = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
              {"role": "system", "content": "answer in french"}, {"role": "user", "content": "thanks"}]
    record = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "de rien"}],
              "rejected": [{"role": "assistant", "content": "welcome"}]}
    pair, _, _ = read_pair(record, "chat", "f line 3")
    with pytest.raises(DataError, match=r"^f line 3: a 'system' turn inside the conversation has no Human/Assistant "
                                        r"transcript form, and the tokenizer has no chat template"):
        tokenize_pair(_no_template(), pair, max_length=256)
    assert tokenize_pair(make_tokenizer(), pair, max_length=256) is not None  # the template renders it
    sft, _ = read_sft({"messages": prompt + [{"role": "assistant", "content": "de rien"}]}, "s line 1")
    with pytest.raises(DataError, match="^s line 1: a 'system' turn inside"):
        tokenize_example(_no_template(), sft, max_length=256)


@pytest.mark.parametrize("record, key", [
    ({"prompt": "r\u00e9ponds \ud83d\ude42", "chosen": "oui", "rejected": "\ud83d"}, "'rejected'"),
    ({"prompt": [{"role": "user", "content": "hi \ud83d"}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "'prompt' message 1 content"),
])
def test_a_lone_surrogate_is_refused_naming_the_record_and_key(jsonl_file, record, key):
    """Valid JSON ("\\ud83d"), half of an emoji cut in two by a scraper: no tokenizer takes it."""
    path = jsonl_file([record])
    with pytest.raises(DataError) as err:
        load_pairs(path)
    assert str(err.value).startswith(f"{path} line 1: {key} holds a lone UTF-16 surrogate ('\\ud83d' at character")
    assert "repair or drop the record" in str(err.value)


def test_a_whole_emoji_written_as_a_surrogate_pair_is_text(jsonl_file):
    pairs, _ = load_pairs(jsonl_file([{"prompt": "smile \ud83d\ude42", "chosen": "a", "rejected": "b"}]))
    assert pairs[0].prompt == "smile \U0001F642"


@pytest.mark.parametrize("text", ["\n\nHuman:hi\n\nAssistant: hello", "\n\nHuman:hi\n\nHuman: hi\n\nAssistant: hello"])
def test_hh_markers_without_their_space_are_refused_not_read_as_a_system_prompt(text):
    record = {"chosen": text, "rejected": text.replace("hello", "bye")}
    with pytest.raises(DataError, match=r"without a space after it, where HH-RLHF transcripts have"):
        read_pair(record, "hh", "w")


def test_kto_records_whose_prompt_sits_under_another_key_are_read_or_refused(jsonl_file):
    """Axolotl's chatml.intel/argilla KTO layouts name the prompt 'question' or 'instruction' (read as TRL's
    unpaired layout, the prompt was empty and refused); its argilla_chat form keeps it in 'chosen', or gives the
    whole conversation as the completion. Read as SFT reads the same fields, or refused; never an empty prompt."""
    rows = [{"system": "be brief", "question": "capital of france?", "completion": "paris", "label": True},
            {"system": "be brief", "instruction": "capital of italy?", "completion": "milan", "label": False}]
    examples, report = load_unpaired(jsonl_file(rows))
    assert [(ex.system, ex.prompt, ex.completion, ex.text_fields) for ex in examples] == [
        ("be brief", [{"role": "user", "content": q}], [{"role": "assistant", "content": a}], True)
        for q, a in (("capital of france?", "paris"), ("capital of italy?", "milan"))]
    assert not report.unused_keys
    examples, _ = load_unpaired(jsonl_file([{"prompt": "capital of france?", "completion": "paris", "label": True,
                                             "system": "be brief"}]))
    assert (examples[0].prompt, examples[0].system) == ("capital of france?", "be brief")  # as a text pair has it
    user, answer = {"role": "user", "content": "capital of france?"}, {"role": "assistant", "content": "paris"}
    with pytest.raises(DataError, match=r"line 1: the prompt is empty, though the record has 'chosen'"):
        load_unpaired(jsonl_file([{"chosen": [user], "completion": [answer], "label": True}]))
    [whole], _ = load_unpaired(jsonl_file([{"completion": [user, answer], "label": False}]))
    assert (whole.prompt, whole.completion) == ([user], [answer])
    with pytest.raises(DataError, match="a whole conversation, and it must end with the assistant turn"):
        load_unpaired(jsonl_file([{"completion": [user, answer, user], "label": False}]))
    later = {"prompt": [user], "completion": [answer, {"role": "user", "content": "and italy?"}, answer],
             "label": True}
    with pytest.raises(DataError, match="the completion holds a user, system or tool turn after the prompt"):
        load_unpaired(jsonl_file([later]))
    call = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "weather", "arguments": {"city": "paris"}}}]}
    tool = {"prompt": [user], "completion": [call, {"role": "tool", "content": '{"temp": 21}'}, answer], "label": True}
    with pytest.raises(DataError, match="the completion holds a user, system or tool turn"):  # it scored the tool's
        load_unpaired(jsonl_file([tool]))                                                      # output as answer


@pytest.mark.parametrize("label, desirable", [(1.0, True), (0.0, False)])
def test_kto_labels_written_as_floats_are_read(jsonl_file, label, desirable):
    """pandas writes a label column with gaps as floats; 1.0 was refused as 'got float'."""
    [example], _ = load_unpaired(jsonl_file([{"prompt": "q", "completion": "a", "label": label}]))
    assert example.label is desirable


def test_sft_conversation_without_a_turn_before_its_answer_is_refused_under_a_template():
    """The chat template wrote the assistant's header inside the trained answer (the prompt rendered as nothing
    and its first token was made the prompt)."""
    from preftune.data.records import SFTExample

    example = SFTExample([{"role": "assistant", "content": "Hello there."}], [], None, "s line 1")
    with pytest.raises(DataError, match=r"^s line 1: the conversation has no turn before its first assistant turn"):
        tokenize_example(make_tokenizer(), example, max_length=64)


def test_kto_conversations_give_their_system_prompt_once(jsonl_file):
    turns = [{"from": "system", "value": "be a pirate"}, {"from": "human", "value": "hi"},
             {"from": "gpt", "value": "arr"}]
    with pytest.raises(DataError, match="the system prompt is given twice"):
        load_unpaired(jsonl_file([{"conversations": turns, "system": "be polite", "kto_tag": True}]))
    examples, _ = load_unpaired(jsonl_file([{"conversations": turns[1:], "system": "be polite", "kto_tag": True}]))
    assert examples[0].system == "be polite"


def test_data_check_reads_kto_token_lengths_with_a_model(jsonl_file):
    long_prompt = "the capital of france is " * 30
    rows = [{"prompt": long_prompt, "completion": " paris", "label": True},
            {"prompt": "the capital of france is", "completion": " paris ." * 40, "label": False},
            {"prompt": "the capital of france is", "completion": " paris", "label": True}]
    path = jsonl_file(rows)
    result = check_pairs(path, tokenizer=make_tokenizer(), max_length=64)
    kinds = {kind: message for kind, message in result.problems}
    assert list(kinds) == ["prompt too long, example dropped", "truncated"]
    assert kinds["prompt too long, example dropped"].startswith(f"{path} line 1: the prompt alone is too long")
    assert kinds["truncated"].startswith(f"{path} line 2: will be truncated: completion")
    assert len(result.lengths["prompt"]) == 3 and result.lengths["completion"][2] < result.lengths["completion"][1]
    assert check_pairs(path).problems == []  # without a tokenizer nothing is measured


def test_ultrafeedback_binarized_without_a_prompt_column_keeps_its_scores(jsonl_file):
    """trl-lib's copy: whole conversations and the two scores, no prompt string."""
    def conversation(answer):
        return [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": answer}]
    rows = [{"chosen": conversation("4"), "rejected": conversation("5"), "score_chosen": 9.0, "score_rejected": 2.0},
            {"chosen": conversation("four"), "rejected": conversation("4"), "score_chosen": 5, "score_rejected": 4.5}]
    pairs, report = load_pairs(jsonl_file(rows), min_score_gap=1.0)
    assert report.format == "ultrafeedback" and not report.unused_keys
    assert [p.chosen[0]["content"] for p in pairs] == ["4"]
    assert pairs[0].prompt == [{"role": "user", "content": "2+2?"}]
    assert len(report.skipped) == 1 and "score gap 0.5 is below --min-score-gap 1" in report.skipped[0]


def test_h4_ultrafeedback_prompt_repeating_the_user_turn_is_read_not_reported(jsonl_file):
    conversation = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    other = [conversation[0], {"role": "assistant", "content": "5"}]
    row = {"prompt": "2+2?", "chosen": conversation, "rejected": other, "score_chosen": 9, "score_rejected": 2}
    assert read_pair(row, "ultrafeedback", "w")[2] == []
    assert read_pair({**row, "prompt": "something else"}, "ultrafeedback", "w")[2] == ["prompt"]


def test_sft_refuses_a_system_prompt_given_twice_and_reports_what_it_did_not_read():
    turns = [{"from": "system", "value": "be a pirate"}, {"from": "human", "value": "hi"},
             {"from": "gpt", "value": "arr"}]
    with pytest.raises(DataError, match="the system prompt is given twice"):
        read_sft({"conversations": turns, "system": "be polite"}, "w")
    example, unused = read_sft({"instruction": "greet", "text": "hello there"}, "w")
    assert example.completion == "hello there" and unused == ["instruction"]


def test_a_null_value_is_called_null_not_missing(jsonl_file):
    with pytest.raises(DataError, match=r"line 1: 'prompt' is null"):
        load_pairs(jsonl_file([{"prompt": None, "chosen": "a", "rejected": "b"}]), data_format="text")


def _csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


@pytest.mark.parametrize("write", [json.dumps, repr], ids=["json", "python-literal"])
def test_csv_cells_holding_message_lists_are_read_as_lists_and_said(tmp_path, caplog, write):
    """pandas' to_csv writes a list column as its repr; json.dumps per cell is the other common way."""
    def conversation(answer):
        return [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": answer}]
    path = _csv(tmp_path / "pairs.csv", [{"chosen": write(conversation("4")), "rejected": write(conversation("5")),
                                          "score_chosen": 9.0, "score_rejected": 2.0}])
    with caplog.at_level(logging.WARNING):
        pairs, report = load_pairs(path)
    assert report.format == "ultrafeedback"
    assert pairs[0].prompt == conversation("")[:1] and pairs[0].chosen == conversation("4")[1:]
    assert "the cells of chosen, rejected hold lists written as text" in caplog.text


def test_a_csv_from_a_datasets_dataframe_reads_its_message_arrays(tmp_path, caplog):
    """`Dataset.to_pandas().to_csv()` writes a message column as numpy prints an object array: no comma between
    the messages, nested lists as `array([...], dtype=object)`. It was read as the repr's text before."""
    datasets = pytest.importorskip("datasets")

    def turn(role, text):
        return {"role": role, "content": text}
    rows = [{"chosen": [turn("user", "say {x} } {y}"), turn("assistant", "ok, 'done'")],
             "rejected": [turn("user", "say {x} } {y}"), turn("assistant", "no\nway")]},
            {"chosen": [turn("user", "2+2?"), turn("assistant", "4")],
             "rejected": [turn("user", "2+2?"), turn("assistant", "5")]}]
    path = tmp_path / "pairs.csv"
    datasets.Dataset.from_list(rows).to_pandas().to_csv(path, index=False)
    assert "}\n {" in path.read_text()  # what numpy writes, not a list literal
    with caplog.at_level(logging.WARNING):
        pairs, report = load_pairs(str(path))
    assert report.format == "chat" and "hold lists written as text" in caplog.text
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ([r["chosen"][0]], [r["chosen"][1]], [r["rejected"][1]]) for r in rows]


def test_numpy_printed_content_parts_and_history_are_read_and_a_broken_message_cell_is_refused(tmp_path):
    parts = ("[{'role': 'user', 'content': array([{'text': 'look ', 'type': 'text'}\n"
             " {'text': 'here', 'type': 'text'}], dtype=object)}\n {'role': 'assistant', 'content': 'a cat'}]")
    path = _csv(tmp_path / "parts.csv", [{"chosen": parts, "rejected": parts.replace("a cat", "a dog")}])
    pair = load_pairs(path)[0][0]
    assert (pair.prompt, pair.chosen) == ([{"role": "user", "content": "look here"}],
                                          [{"role": "assistant", "content": "a cat"}])
    history = "[array(['what is 1+1?', '2'], dtype=object) array(['and 2+2?' '4'], dtype=object)]"
    path = _csv(tmp_path / "alpaca.csv", [{"instruction": "and 3 more?", "input": "", "chosen": "7",
                                           "rejected": "6", "history": history}])
    assert [t["content"] for t in load_pairs(path)[0][0].prompt] == ["what is 1+1?", "2", "and 2+2?", "4",
                                                                     "and 3 more?"]
    cut = "[{'role': 'user', 'content': 'hi'} ...]"  # numpy's summary of a long array, or a cell cut short
    path = _csv(tmp_path / "cut.csv", [{"chosen": "[]", "rejected": "[]"}, {"chosen": cut, "rejected": cut}])
    with pytest.raises(DataError, match=r"cut\.csv record 2: the chosen cell looks like a message list written as "
                                        r"text, but it does not read back as one .*save the data as JSON Lines"):
        load_pairs(path)
    # Cut off before its closing bracket (a spreadsheet's cell limit): it was trained on as the prompt's text.
    for cut in ("[{'role': 'user', 'content': 'q'", '[{"role": "user", "content": "q"}'):
        path = _csv(tmp_path / "short.csv", [{"prompt": cut, "chosen": "a", "rejected": "b"}])
        with pytest.raises(DataError, match=r"short\.csv record 1: the prompt cell looks like a message list"):
            load_pairs(path)
    quoted = '[{"role": "user", "content": "hi"}] is how a message list is written'  # a whole list, then words
    path = _csv(tmp_path / "quoted.csv", [{"prompt": "how?", "chosen": quoted, "rejected": "no idea"}])
    assert load_pairs(path)[0][0].chosen == quoted


def test_csv_answers_that_are_json_arrays_stay_text(tmp_path):
    path = _csv(tmp_path / "pairs.csv", [{"prompt": "list three numbers", "chosen": "[1, 2, 3]",
                                          "rejected": '[{"a": 1}]'}])
    pairs, report = load_pairs(path)
    assert (report.format, pairs[0].chosen, pairs[0].rejected) == ("text", "[1, 2, 3]", '[{"a": 1}]')


def test_a_csv_alpaca_history_column_is_read(tmp_path):
    path = _csv(tmp_path / "alpaca.csv", [
        {"instruction": "and 3 more?", "input": "", "chosen": "5", "rejected": "6",
         "history": json.dumps([["what is 1+1?", "2"]])},
        {"instruction": "add 2 and 3", "input": "", "chosen": "5", "rejected": "6", "history": "[]"}])
    pairs, report = load_pairs(path)
    assert report.format == "alpaca"
    assert [turn["content"] for turn in pairs[0].prompt] == ["what is 1+1?", "2", "and 3 more?"]
    assert [turn["content"] for turn in pairs[1].prompt] == ["add 2 and 3"]


def test_a_prompt_ending_with_an_assistant_turn_is_refused():
    """A `messages` list that is the whole chosen conversation would put the answer in its own prompt."""
    hi, hello = {"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hello!"}
    record = {"messages": [hi, hello], "chosen": hello, "rejected": {"role": "assistant", "content": "go away"}}
    with pytest.raises(DataError, match=r"^w: the prompt ends with the answer itself"):
        read_pair(record, "openai", "w")
    with pytest.raises(DataError, match=r"^w: the prompt ends with an assistant turn, so the answer would be a second"):
        read_pair({**record, "messages": [hi, {"role": "assistant", "content": "hmm"}]}, "openai", "w")
    with pytest.raises(DataError, match=r"ends with an assistant turn"):
        read_sft({"prompt": [hi, hello], "completion": [{"role": "assistant", "content": "again"}]}, "w")
    assert read_pair({**record, "messages": [hi]}, "openai", "w")[0].chosen == [hello]


def test_content_given_as_text_parts_is_joined_and_other_parts_are_refused():
    def parts(*items):
        return {"role": "user", "content": list(items)}
    answer = {"role": "assistant", "content": "ok"}
    record = {"prompt": [parts({"type": "text", "text": "look "}, {"type": "text", "text": "here"})],
              "chosen": [answer], "rejected": [{"role": "assistant", "content": "no"}]}
    assert read_pair(record, "chat", "w")[0].prompt == [{"role": "user", "content": "look here"}]
    image = {**record, "prompt": [parts({"type": "image"}, {"type": "text", "text": "what is it?"})]}
    with pytest.raises(DataError, match=r"'prompt' message 1 content part 1 is 'image', not a text part"):
        read_pair(image, "chat", "w")


@pytest.mark.parametrize("text", ['[\n  {"prompt": "q", "chosen": "a", "rejected": "b"}\n]\n',
                                  '[{"prompt": "q", "chosen": "a", "rejected": "b"}]\n',
                                  '{\n  "prompt": "q", "chosen": "a", "rejected": "b"\n}\n'])
def test_a_json_document_named_jsonl_is_told_to_be_named_json(tmp_path, text):
    path = tmp_path / "pairs.jsonl"
    path.write_text(text)
    with pytest.raises(DataError, match=r"pairs.jsonl line 1: starts with '[\[{]': this looks like one JSON "
                                        r"document, not JSON Lines .*; name the file .json"):
        load_pairs(str(path), skip_bad_records=True)
    renamed = path.rename(tmp_path / "pairs.json")
    if text.startswith("["):
        assert load_pairs(str(renamed))[0][0].chosen == "a"


def test_preference_pairs_given_to_sft_say_so():
    record = {"conversations": [{"from": "human", "value": "hi"}], "chosen": {"from": "gpt", "value": "hello"},
              "rejected": {"from": "gpt", "value": "go away"}}
    with pytest.raises(DataError, match=r"^w: this is preference data .* train it with `preftune dpo`"):
        read_sft(record, "w")


def test_pandas_column_layout_json_says_how_to_save_records(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps({"prompt": {"0": "q", "1": "r"}, "chosen": {"0": "a", "1": "c"},
                                "rejected": {"0": "b", "1": "d"}}))
    with pytest.raises(DataError, match=r"one object per column keyed by row number, as pandas' to_json\(\) writes"):
        load_pairs(str(path))


@pytest.mark.parametrize("orient, says", [("split", "column names apart from rows of values"),
                                          ("values", "the rows are lists without key names"),
                                          ("index", "one object per row keyed by row number")])
def test_other_pandas_json_layouts_say_how_to_save_records(tmp_path, orient, says):
    """Each was read as records that are lists (one error per record), or as one record keyed 0, 1, 2."""
    pd = pytest.importorskip("pandas")
    path = tmp_path / "pairs.json"
    pd.DataFrame([{"prompt": "q", "chosen": "a", "rejected": "b"}] * 2).to_json(path, orient=orient)
    with pytest.raises(DataError, match=rf"pairs\.json: {says} \(as pandas' to_json\(orient='{orient}'\) writes them"
                                        r"\); save the records instead"):
        load_pairs(str(path))
    pd.DataFrame([{"prompt": "q", "chosen": "a", "rejected": "b"}] * 2).to_json(path, orient="table")
    pairs, report = load_pairs(str(path))  # records, with the index beside them: reported unused
    assert [(p.prompt, p.chosen) for p in pairs] == [("q", "a")] * 2 and report.unused_keys == {"index": 2}


def test_an_empty_margin_cell_in_a_csv_is_no_margin(tmp_path):
    path = _csv(tmp_path / "pairs.csv", [{"prompt": "q", "chosen": "a", "rejected": "b", "margin": "1.5"},
                                         {"prompt": "q", "chosen": "c", "rejected": "d", "margin": ""}])
    pairs, _ = load_pairs(path)
    assert [p.margin for p in pairs] == [1.5, None]


def test_answers_that_do_not_repeat_the_prompt_exactly_are_refused_as_such():
    """Whole conversations as answers whose turns differ from the prompt's (an extra system turn, a trailing space)
    would keep those turns inside the answer."""
    prompt = [{"role": "user", "content": "hi"}]
    def whole(extra, answer):
        return extra + [{"role": "user", "content": "hi "}, {"role": "assistant", "content": answer}]
    record = {"prompt": prompt, "chosen": whole([], "hello"), "rejected": whole([], "no")}
    with pytest.raises(DataError, match=r"^w: chosen answer starts with a user turn: it holds turns of its own"):
        read_pair(record, "chat", "w")
    system = [{"role": "system", "content": "be kind"}]
    with pytest.raises(DataError, match=r"^w: chosen answer starts with a system turn"):
        read_pair({**record, "chosen": system + prompt + [{"role": "assistant", "content": "x"}]}, "chat", "w")
    exact = {"prompt": prompt, "chosen": prompt + [{"role": "assistant", "content": "hello"}],
             "rejected": prompt + [{"role": "assistant", "content": "no"}]}
    assert read_pair(exact, "chat", "w")[0].chosen == [{"role": "assistant", "content": "hello"}]


def test_a_chat_template_that_leaves_answers_out_is_refused(monkeypatch):
    """A template for prompts only renders an answer as nothing: the pair would train on no tokens at all."""
    from preftune.data import encode

    monkeypatch.setattr(encode, "_SAID", set())  # its once-only warnings stay this test's
    tok = make_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if m['role'] != 'assistant' %}<|{{ m['role'] }}|>{{ m['content'] }}"
                         "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    pair, _, _ = read_pair({"prompt": [{"role": "user", "content": "hi"}],
                            "chosen": [{"role": "assistant", "content": "hello"}],
                            "rejected": [{"role": "assistant", "content": "go away"}]}, "chat", "w")
    with pytest.raises(DataError, match=r"^w: the chosen answer renders as no tokens at all"):
        tokenize_pair(tok, pair, max_length=256)
    sft, _ = read_sft({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "s")
    with pytest.raises(DataError, match=r"^s: the trained answer renders as no tokens at all"):
        tokenize_example(tok, sft, max_length=256)


def test_what_the_new_checks_must_still_accept(jsonl_file, tmp_path):
    """Found in review: SFT on H4's messages column beside chosen/rejected, a list prompt beside scores, an empty
    system cell beside a system turn, a prompt ending in a tool call answered by its result."""
    user, answer = {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}
    example, unused = read_sft({"messages": [user, answer], "chosen": [user, answer],
                                "rejected": [user, {"role": "assistant", "content": "5"}]}, "w")
    assert example.completion == [answer] and sorted(unused) == ["chosen", "rejected"]
    pairs, report = load_pairs(jsonl_file([{"prompt": [user], "chosen": [answer], "score_chosen": 8,
                                            "rejected": [{"role": "assistant", "content": "5"}], "score_rejected": 3}]))
    assert report.format == "chat" and pairs[0].prompt == [user]
    turns = [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]
    assert read_sft({"conversations": turns, "system": ""}, "w")[0].system == "be brief"
    call = {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
                                                               "function": {"name": "add", "arguments": {}}}]}
    record = {"prompt": [user, call], "chosen": [{"role": "tool", "content": "4"}, answer],
              "rejected": [{"role": "tool", "content": "4"}, {"role": "assistant", "content": "5"}]}
    assert read_pair(record, "chat", "w")[0].prompt[-1] == call
    path = tmp_path / "conversations.jsonl"  # one message list a line is not a JSON document: per-line errors
    path.write_text(json.dumps([user, answer]) + "\n")
    with pytest.raises(DataError, match="expected a JSON object"):
        load_pairs(str(path))


def test_a_system_column_beside_chat_turns_is_their_system_prompt():
    """The chat, openai and whole-conversation layouts listed a `system` key as unused and trained without it,
    and a system prompt given both there and as a turn was not refused, as it is for sharegpt and SFT."""
    import preftune
    from preftune.data.unpaired import read_unpaired

    user, a, b = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}, \
        {"role": "assistant", "content": "b"}
    records = [{"system": "Be brief.", "prompt": [user], "chosen": [a], "rejected": [b]},
               {"system": "Be brief.", "messages": [user], "chosen": a, "rejected": b},
               {"system": "Be brief.", "chosen": [user, a], "rejected": [user, b]}]
    for record in records:
        [pair] = preftune.load_pairs([record])
        assert (pair.system, pair.prompt) == ("Be brief.", [user])
    twice = {"system": "Be brief.", "prompt": [{"role": "system", "content": "Be long."}, user], "chosen": [a],
             "rejected": [b]}
    with pytest.raises(DataError, match="the system prompt is given twice"):
        preftune.load_pairs([twice])
    same = {**twice, "prompt": [{"role": "system", "content": "Be brief."}, user]}  # an export copying the turn
    assert preftune.load_pairs([same])[0].system == "Be brief."
    example, unused = read_unpaired({"system": "Be brief.", "prompt": [user], "completion": [a], "label": True},
                                    "unpaired", "w")
    assert (example.system, unused) == ("Be brief.", [])


def test_ms_swift_preference_records_are_pairs():
    """ms-swift's DPO/RM layout (its custom-dataset docs): the conversation ends with the chosen answer and
    `rejected_response` holds the other. It was called SFT data, and the rejected answer an unused key."""
    import preftune

    system = {"role": "system", "content": "You are a helpful assistant"}
    user = {"role": "user", "content": "What is the weather like tomorrow?"}
    chosen = {"role": "assistant", "content": "Tomorrow's weather will be sunny"}
    for rejected in ("I don't know", {"role": "assistant", "content": "I don't know"}):
        [pair] = preftune.load_pairs([{"messages": [system, user, chosen], "rejected_response": rejected}])
        assert (pair.system, pair.prompt, pair.chosen) == ("You are a helpful assistant", [user], [chosen])
        assert pair.rejected == [{"role": "assistant", "content": "I don't know"}]
    with pytest.raises(DataError, match="must end with the chosen assistant turn"):
        preftune.load_pairs([{"messages": [user], "rejected_response": "no"}])


def test_a_message_tree_export_is_not_trained_as_sft_text():
    """OpenAssistant's flat export holds one message a row (`text`, `role`, ids of the message and its parent):
    read as SFT text, the user's messages were trained as answers."""
    row = {"message_id": "m2", "parent_id": "m1", "text": "What is a capital?", "role": "prompter", "lang": "en"}
    with pytest.raises(DataError, match="a row of one message .*build each conversation into a 'messages' list"):
        read_sft(row, "w")
    assert read_sft({"text": "a whole document", "source": "web"}, "w")[0].completion == "a whole document"


@pytest.mark.parametrize("record, prompt, answer, system, unused", [
    # Dolly: the context goes after the instruction, as alpaca's input does
    ({"instruction": "Summarize.", "context": "A long text.", "response": "Short.", "category": "summarization"},
     "Summarize.\nA long text.", "Short.", None, ["category"]),
    # OpenOrca: system_prompt, question, response
    ({"id": "flan.1", "system_prompt": "Be brief.", "question": "Why is the sky blue?", "response": "Scattering."},
     "Why is the sky blue?", "Scattering.", "Be brief.", ["id"]),
    # ms-swift's query/response (and MetaMath's, with its extra columns)
    ({"query": "2+2?", "response": "4", "type": "GSM_Rephrased", "original_question": "two and two"},
     "2+2?", "4", None, ["original_question", "type"]),
    ({"question": "Tom has 2 apples and gets 2 more. How many?", "answer": "4\n#### 4"},  # GSM8K
     "Tom has 2 apples and gets 2 more. How many?", "4\n#### 4", None, []),
    ({"input": "Translate: chat", "output": "cat"}, "Translate: chat", "cat", None, []),
    # blank CSV cells beside the filled columns do not win the choice between names
    ({"system": "", "system_prompt": "Be brief.", "instruction": "", "question": "Why?", "output": "",
      "response": "Scattering."}, "Why?", "Scattering.", "Be brief.", []),
    # a pre-rendered prompt beside the alpaca fields stays unused, as before the other names were read
    ({"instruction": "q", "input": "i", "output": "a", "prompt": "### Instruction: q"}, "q\ni", "a", None,
     ["prompt"]),
])
def test_sft_question_and_answer_fields_of_other_projects(record, prompt, answer, system, unused):
    """SFT sets written as a question and its answer under other projects' names were refused: they read as the
    alpaca conversation they write, each column used or reported."""
    example, left = read_sft(record, "w")
    assert (example.prompt, example.completion) == ([{"role": "user", "content": prompt}],
                                                    [{"role": "assistant", "content": answer}])
    assert (example.system, sorted(left), example.text_fields) == (system, unused, True)


def test_sft_fields_with_history_and_a_ranking_output():
    turns = {"query": "and 3+3?", "response": "6", "history": [["2+2?", "4"]], "system": "Count."}
    example, _ = read_sft(turns, "w")
    assert example.prompt == [{"role": "user", "content": "2+2?"}]
    assert [m["content"] for m in example.completion] == ["4", "and 3+3?", "6"] and example.system == "Count."
    with pytest.raises(DataError, match="this is preference data .*preftune dpo"):
        read_sft({"instruction": "Say hi", "input": "", "output": ["Hi!", "Go away."]}, "w")


def test_llama_factory_ranking_records_are_pairs_with_the_first_answer_chosen():
    """LLaMA-Factory's older preference layout: alpaca fields whose `output` is [chosen, rejected]. It was
    called SFT data."""
    import preftune

    [pair] = preftune.load_pairs([{"instruction": "Say hi", "input": "to Ann", "output": ["Hi Ann!", "Go away."],
                                   "history": [["Hello", "Hello to you"]], "system": "Be kind."}])
    assert pair.prompt == [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hello to you"},
                           {"role": "user", "content": "Say hi\nto Ann"}]
    assert (pair.chosen, pair.rejected) == ([{"role": "assistant", "content": "Hi Ann!"}],
                                            [{"role": "assistant", "content": "Go away."}])
    assert (pair.system, pair.text_fields) == ("Be kind.", True)
    with pytest.raises(DataError, match="'output' must be a list of two answers, .*got a list of 3"):
        preftune.load_pairs([{"instruction": "Say hi", "output": ["a", "b", "c"]}])


def test_openai_preference_fine_tuning_records_are_pairs():
    """OpenAI's preference fine-tuning form: the prompt's messages (and tools) inside `input`, the answers in
    `preferred_output` / `non_preferred_output`; a key inside `input` that is not read is reported."""
    import preftune
    from preftune.data.load import read_pairs
    from preftune.data.memory import as_source

    system = {"role": "system", "content": "Be brief."}
    user = {"role": "user", "content": "How cold is San Francisco today?"}
    good, bad = ({"role": "assistant", "content": text} for text in ("Mild, 15 C.", "Cold."))
    tool = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    record = {"input": {"messages": [system, user], "tools": [tool], "parallel_tool_calls": True},
              "preferred_output": [good], "non_preferred_output": [bad]}
    [pair], report = read_pairs(as_source([record]))
    assert (report.format, pair.system, pair.prompt, pair.chosen, pair.rejected, pair.tools) == (
        "openai_preference", "Be brief.", [user], [good], [bad], [tool])
    assert report.unused_keys == {"input.parallel_tool_calls": 1}
    with pytest.raises(DataError, match="'input' must be an object holding 'messages', got a string"):
        preftune.load_pairs([{**record, "input": "How cold?"}])


def test_openai_messages_with_string_answers():
    """`messages` beside chosen/rejected strings (a layout several RL libraries document): each string is one
    assistant turn. It was refused as an answer that is not a message list."""
    import preftune

    user = {"role": "user", "content": "Capital of China?"}
    [pair] = preftune.load_pairs([{"messages": [{"role": "system", "content": "Be nice."}, user],
                                   "chosen": "Beijing.", "rejected": "Washington D.C."}])
    assert (pair.system, pair.prompt) == ("Be nice.", [user])
    assert (pair.chosen, pair.rejected) == ([{"role": "assistant", "content": "Beijing."}],
                                            [{"role": "assistant", "content": "Washington D.C."}])


# Qwen3's switch in short: with enable_thinking false the generation prompt holds the empty think block that every
# finished assistant turn has, so the block is prompt, not answer.
THINK_SWITCH = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}<think>\n\n</think>\n\n{% endif %}"
    "{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def test_a_records_chat_template_kwargs_reach_the_template():
    """TRL passes a record's `chat_template_kwargs` to the chat template (Qwen3's `enable_thinking`); they were
    reported unused, and the think block trained as answer. Expected ids: the template rendered directly."""
    from preftune.data.memory import as_source
    from preftune.data.tokenize import encode_unpaired, prompt_ids_of

    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = THINK_SWITCH
    user, good, bad = ({"role": r, "content": c} for r, c in (("user", "the sky is"), ("assistant", "blue ."),
                                                              ("assistant", "green .")))

    def direct(turns, **kwargs):
        return tok(tok.apply_chat_template(turns, tokenize=False, **kwargs), add_special_tokens=False)["input_ids"]

    for kwargs in ({"enable_thinking": False}, {}, {"enable_thinking": None}):  # null: as if not given
        given = {"chat_template_kwargs": kwargs} if kwargs else {}
        pair, _, unused = read_pair({"prompt": [user], "chosen": [good], "rejected": [bad], **given}, "chat", "w")
        out = tokenize_pair(tok, pair, max_length=256)
        off = kwargs.get("enable_thinking") is False
        prompt = direct([user], add_generation_prompt=True, **({"enable_thinking": False} if off else {}))
        assert (out.prompt_ids, unused) == (prompt, [])
        assert out.chosen_ids == direct([user, good])[len(prompt):]
        assert tok.decode(out.chosen_ids, skip_special_tokens=False).startswith("blue" if off else "<think>")
        sft = tokenize_example(tok, read_sft({"messages": [user, good], **given}, "w")[0], max_length=256)
        assert sft.prompt_ids == prompt
        [kto], _ = load_unpaired(as_source([{"prompt": [user], "completion": [good], "label": True, **given}]))
        assert encode_unpaired(tok, kto) == (prompt, direct([user, good])[len(prompt):])
        assert prompt_ids_of(tok, pair) == prompt  # what generation and online rounds are given
    as_csv_cell, _, _ = read_pair({"prompt": [user], "chosen": [good], "rejected": [bad],
                                   "chat_template_kwargs": '{"enable_thinking": false}'}, "chat", "w")
    assert as_csv_cell.template_kwargs == {"enable_thinking": False}
    for value, words in (([1], "must be an object of chat template arguments, got a list"),
                         ("{enable", "is a string but not valid JSON"),
                         ({"add_generation_prompt": False}, "sets add_generation_prompt, which preftune sets")):
        with pytest.raises(DataError, match=words):
            read_pair({"prompt": [user], "chosen": [good], "rejected": [bad], "chat_template_kwargs": value},
                      "chat", "w")


def test_sft_refuses_rated_bad_and_empty_answers_but_not_a_class_label():
    """A KTO record's `kto_tag: false` was trained by SFT (only `label: false` was refused), and so was an empty
    answer; a classification set's `label: 0` beside bare text was refused as a rating."""
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    for record in ({"instruction": "q", "output": "rude", "kto_tag": False},
                   {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
                    "kto_tag": "false"}):
        with pytest.raises(DataError, match=r"marked undesirable \(kto_tag: false\)"):
            read_sft(record, "w")
    assert read_sft({"messages": turns, "kto_tag": True}, "w")[1] == []  # a rating, read
    for record, words in (({"instruction": "q", "input": "", "output": ""}, r"the answer \('output'\) is empty"),
                          ({"prompt": "q", "completion": " "}, "the completion is empty"),
                          ({"text": ""}, "'text' is empty")):
        with pytest.raises(DataError, match=words):
            read_sft(record, "w")
    example, unused = read_sft({"text": "a fine film", "label": 0}, "w")
    assert (example.completion, unused) == ("a fine film", ["label"])


def test_pair_fields_read_as_the_same_sft_fields_are():
    """Dolly's context and OpenOrca's system_prompt beside a pair were unused, where SFT reads them; ms-swift's
    older query/response/rejected_response pairs were called SFT data; LLaMA-Factory's ranking form without an
    instruction too; and SFT said an OpenAI preference record could not be read instead of what it is."""
    def answer(text):
        return [{"role": "assistant", "content": text}]

    cases = [({"instruction": "Summarize", "context": "A long text.", "chosen": "good", "rejected": "bad"},
              [{"role": "user", "content": "Summarize\nA long text."}], None, "alpaca"),
             ({"system_prompt": "Be kind.", "question": "Q?", "chosen": "good", "rejected": "bad"},
              [{"role": "user", "content": "Q?"}], "Be kind.", "orca"),
             ({"input": "Q?", "output": ["good", "bad"]}, [{"role": "user", "content": "Q?"}], None,
              "alpaca_ranking"),
             ({"system": "Be kind.", "query": "Q?", "response": "good", "rejected_response": "bad",
               "history": [["hi", "hello"]]},
              [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
               {"role": "user", "content": "Q?"}], "Be kind.", "swift")]
    cases.append(({**cases[-1][0], "messages": []}, *cases[-1][1:]))  # an empty messages column beside them
    for record, prompt, system, fmt in cases:
        pair, _, unused = read_pair(record, fmt, "w")
        assert (pair.prompt, pair.chosen, pair.rejected, pair.system, unused) == (
            prompt, answer("good"), answer("bad"), system, [])
        assert load_pairs_detecting(record) == fmt
    preference = {"input": {"messages": [{"role": "user", "content": "Q?"}]}, "preferred_output": answer("good"),
                  "non_preferred_output": answer("bad")}
    with pytest.raises(DataError, match="this is preference data"):
        read_sft(preference, "w")


def load_pairs_detecting(record) -> str:
    from preftune.data.load import read_pairs
    from preftune.data.memory import as_source

    return read_pairs(as_source([record]))[1].format


def test_a_csv_from_a_dataframe_reads_its_tools_and_template_kwargs(tmp_path):
    """pandas writes a dict column (chat_template_kwargs, a dataset's struct with null-filled keys) and a list of
    tool schemas as Python literals; they were refused as invalid JSON."""
    datasets = pytest.importorskip("datasets")
    tool = {"type": "function", "function": {"name": "weather", "description": "the weather", "parameters": "{}"}}
    turn = [{"role": "user", "content": "hi"}]
    rows = [{"prompt": turn, "chosen": [{"role": "assistant", "content": "hello"}],
             "rejected": [{"role": "assistant", "content": "go"}], "tools": [tool],
             "chat_template_kwargs": {"enable_thinking": False, "mode": None}},
            {"prompt": turn, "chosen": [{"role": "assistant", "content": "hey"}],
             "rejected": [{"role": "assistant", "content": "no"}], "tools": [tool],
             "chat_template_kwargs": {"enable_thinking": None, "mode": "x"}}]
    path = tmp_path / "pairs.csv"
    datasets.Dataset.from_list(rows).to_pandas().to_csv(path, index=False)
    assert "'enable_thinking': False" in path.read_text()
    pairs, _ = load_pairs(str(path))
    assert [p.template_kwargs for p in pairs] == [{"enable_thinking": False}, {"mode": "x"}]
    assert [p.tools for p in pairs] == [[tool], [tool]]


def test_template_kwargs_that_no_template_renders_are_said(monkeypatch, caplog):
    """Records fed as text (--raw-text-prompts, or no chat template) read their chat_template_kwargs as used and
    rendered nothing with them, without a word."""
    from preftune.data import encode

    monkeypatch.setattr(encode, "_SAID", set())
    tok = make_tokenizer()
    fields = {"instruction": "the sky is", "chosen": "blue", "rejected": "red", "chat_template_kwargs": {"x": 1}}
    with caplog.at_level(logging.WARNING):
        tokenize_pair(tok, read_pair(fields, "alpaca", "w")[0], max_length=64, raw_text_prompts=True)
    assert "w: chat_template_kwargs are not used: records written as text fields are fed as text" in caplog.text
    tok.chat_template = None
    turns = {"prompt": [{"role": "user", "content": "the sky is"}], "chosen": [{"role": "assistant", "content": "b"}],
             "rejected": [{"role": "assistant", "content": "r"}], "chat_template_kwargs": {"x": 1}}
    with caplog.at_level(logging.WARNING):
        tokenize_pair(tok, read_pair(turns, "chat", "w")[0], max_length=64)
    assert "w: chat_template_kwargs are not used: the tokenizer has no chat template" in caplog.text


def test_near_miss_layouts_are_named_for_what_they_miss(jsonl_file):
    """A `rejected` answer beside `messages` was called SFT data; an unknown KTO layout listed the preference
    formats only; a system column beside OpenAI preference records' `input` was left unused."""
    user, answer = {"role": "user", "content": "q"}, {"role": "assistant", "content": "paris ."}
    with pytest.raises(DataError, match="a 'rejected' answer without a 'chosen' one .*'rejected_response'"):
        load_pairs(jsonl_file([{"messages": [user, answer], "rejected": "rome ."}]))
    with pytest.raises(DataError, match=r"read some of these keys: unpaired \(prompt, completion, label"):
        load_unpaired(jsonl_file([{"query": "q", "response": "a", "label": True}]))
    with pytest.raises(DataError, match="this is SFT data .* no rating of its answer; KTO needs"):
        load_unpaired(jsonl_file([{"query": "q", "response": "a"}]))
    record = {"system": "Be brief.", "input": {"messages": [user]}, "preferred_output": [answer],
              "non_preferred_output": [{"role": "assistant", "content": "rome ."}]}
    pair, _, unused = read_pair(record, "openai_preference", "w")
    assert (pair.system, unused) == ("Be brief.", [])


def test_pku_saferlhf_pairs_say_which_rating_chooses():
    """PKU-SafeRLHF rates each pair by helpfulness and by safety, often preferring different answers: such a
    record is refused until --data-format says which rating chooses; each reads its own id."""
    from preftune.data.load import read_pairs
    from preftune.data.memory import as_source

    record = {"prompt": "How do I pick a lock?", "response_0": "Like this.", "response_1": "I can't help.",
              "is_response_0_safe": False, "is_response_1_safe": True, "better_response_id": 0,
              "safer_response_id": 1}
    with pytest.raises(DataError, match="rated twice.* pass --data-format pku_better or pku_safer"):
        read_pairs(as_source([record]))
    for fmt, chosen, other in (("pku_better", "Like this.", "better_response_id"),
                               ("pku_safer", "I can't help.", "safer_response_id")):
        [pair], report = read_pairs(as_source([record]), data_format=fmt)
        assert pair.chosen == [{"role": "assistant", "content": chosen}]
        assert set(report.unused_keys) == {"is_response_0_safe", "is_response_1_safe",
                                           ({"better_response_id", "safer_response_id"} - {other}).pop()}
    with pytest.raises(DataError, match="'better_response_id' must be 0 or 1"):
        read_pairs(as_source([{**record, "better_response_id": 2}]), data_format="pku_better")


def test_helpsteer3_pairs_follow_the_sign_of_overall_preference():
    """HelpSteer3 (NVIDIA): below 0 response1 is preferred, above 0 response2 (as NeMo-RL reads it); at 0 the
    raters prefer neither, so the pair is dropped and counted, never trained in an arbitrary order; the strength is
    the pair's score gap, for --min-score-gap."""
    from preftune.data.load import read_pairs
    from preftune.data.memory import as_source

    record = {"domain": "general", "context": [{"role": "user", "content": "hi"}], "response1": "hello",
              "response2": "go away", "overall_preference": -3}
    rows = [record, {**record, "overall_preference": 1}, {**record, "overall_preference": 0}]
    pairs, report = read_pairs(as_source(rows))
    assert [(p.chosen[0]["content"], p.rejected[0]["content"]) for p in pairs] == [("hello", "go away"),
                                                                                      ("go away", "hello")]
    assert report.skipped == ["data record 3: dropped, the raters prefer neither answer (a tie: the pair has no "
                              "chosen one)"] and report.unused_keys == {"domain": 3}
    pairs, report = read_pairs(as_source(rows), min_score_gap=2)
    assert len(pairs) == 1 and "record 2: dropped, score gap 1 is below --min-score-gap 2" in report.skipped[0]
    with pytest.raises(DataError, match="'overall_preference' must be a finite number, got nan"):
        read_pairs(as_source([{**record, "overall_preference": float("nan")}]))


def test_more_forms_of_the_newest_layouts():
    """A PKU-SafeRLHF id written as a float (pandas' float64 column) crashed indexing the answers; NeMo-Aligner's
    message form (a prompt of messages, answers as message objects) was refused; ms-swift-like `query`/`history`
    beside chosen_response/rejected_response was taken for ms-swift's form and failed."""
    from preftune.data.load import read_pairs
    from preftune.data.memory import as_source

    def read(record):
        [pair], report = read_pairs(as_source([record]))
        return report.format, pair.system, pair.prompt, pair.chosen, pair.rejected

    def turn(role, text):
        return {"role": role, "content": text}

    assert read({"prompt": "Q", "response_0": "a", "response_1": "b", "better_response_id": 1.0}) == (
        "pku_better", None, [turn("user", "Q")], [turn("assistant", "b")], [turn("assistant", "a")])
    assert read({"prompt": [turn("system", "s"), turn("user", "Q")], "chosen_response": turn("assistant", "good"),
                 "rejected_response": turn("assistant", "bad")}) == (
        "chosen_response", "s", [turn("user", "Q")], [turn("assistant", "good")], [turn("assistant", "bad")])
    assert read({"query": "q", "history": [["h1", "h2"]], "chosen_response": "c", "rejected_response": "r"}) == (
        "chosen_response", None, [turn("user", "h1"), turn("assistant", "h2"), turn("user", "q")],
        [turn("assistant", "c")], [turn("assistant", "r")])


# ------------------------------------------------------------- the sixth review's layouts (public datasets' forms)

@pytest.mark.parametrize("column", ["\n\nHuman: Name a fruit.\n\nAssistant:", "Human: Name a fruit.\n\nAssistant:",
                                    "\n\nHuman: Name a fruit."])
def test_hh_transcripts_beside_their_prompt_column_are_read_as_transcripts(jsonl_file, column):
    """HH transcripts kept whole beside a `prompt` column were trained as prompt + prompt + answer."""
    prompt = "\n\nHuman: Name a fruit.\n\nAssistant:"
    rows = [{"prompt": column, "chosen": prompt + " Apple.", "rejected": prompt + " A car."}]
    [pair], report = load_pairs(jsonl_file(rows))
    assert (report.format, report.unused_keys) == ("text", {})
    assert pair.prompt == [{"role": "user", "content": "Name a fruit."}]
    assert (pair.chosen, pair.rejected) == ([{"role": "assistant", "content": "Apple."}],
                                            [{"role": "assistant", "content": "A car."}])


@pytest.mark.parametrize("record, repeated", [
    ({"prompt": "Hi", "chosen": "Hi there", "rejected": "Hi! What's up?"}, True),
    ({"prompt": "1", "chosen": "10", "rejected": "100"}, False),
    ({"prompt": "Say hi", "chosen": "Say hi there", "rejected": "Hello"}, False),
])
def test_other_text_answers_are_kept_as_given_and_a_repeated_prompt_is_a_problem_of_data_check(jsonl_file, record,
                                                                                               repeated):
    """As TRL trains them: prompt + answer. `data check` says when both answers begin with the whole prompt."""
    [pair], _ = load_pairs(jsonl_file([record]))
    assert (pair.prompt, pair.chosen, pair.rejected) == (record["prompt"], record["chosen"], record["rejected"])
    kinds = [kind for kind, _ in check_pairs(jsonl_file([record])).problems]
    assert ("answers repeat the prompt" in kinds) == repeated


def test_ultrainteract_pairs_read_their_prompt_from_the_trajectory(jsonl_file):
    """UltraInteract_pair's prompt turns are in `trajectory`; it was read as an implicit pair whose prompt was the
    answers' shared first words, the question left unused."""
    turns = [{"from": "user", "value": "Solve 2+2"}, {"from": "assistant", "value": "Step 1: 2+2 = 5"},
             {"from": "user", "value": "Your answer is wrong."}]
    rows = [{"task": "Math_CoT", "dataset": "gsm8k", "trajectory": turns, "chosen": "Step 1: 2+2 = 4.",
             "rejected": "Step 1: 2+2 = 22.", "id": "2", "parent_id": "p2"}]
    [pair], report = load_pairs(jsonl_file(rows))
    assert report.format == "ultrainteract"
    assert pair.prompt == [{"role": "user", "content": "Solve 2+2"}, {"role": "assistant", "content": "Step 1: 2+2 = 5"},
                           {"role": "user", "content": "Your answer is wrong."}]
    assert pair.chosen == [{"role": "assistant", "content": "Step 1: 2+2 = 4."}]
    assert pair.rejected == [{"role": "assistant", "content": "Step 1: 2+2 = 22."}]
    assert set(report.unused_keys) == {"task", "dataset", "id", "parent_id"}


def test_step_dpo_reasoning_steps_go_after_the_prompt(jsonl_file):
    """Math-Step-DPO's answers continue `initial_reason_steps`: the steps were left unused, and step 3 trained
    right after the question."""
    rows = [{"dataset": "MATH", "prompt": "What is 12*13?\n", "initial_reason_steps": "Step 1: 12*10 = 120.\n",
             "chosen": "Step 2: 12*3 = 36, so 156.", "rejected": "Step 2: 12*3 = 32, so 152.",
             "full_chosen": "Step 1: 12*10 = 120.\nStep 2: 12*3 = 36, so 156.", "answer": "156"}]
    [pair], report = load_pairs(jsonl_file(rows))
    assert (report.format, pair.prompt) == ("text", "What is 12*13?\nStep 1: 12*10 = 120.\n")
    assert pair.chosen == "Step 2: 12*3 = 36, so 156."
    assert set(report.unused_keys) == {"dataset", "full_chosen", "answer"}


def test_magpie_pairs_of_whole_conversations_beside_an_instruction_are_chat(jsonl_file):
    """Magpie's DPO sets were taken for alpaca (for `instruction`) and every record refused: 'chosen' must be a
    string."""
    user = {"role": "user", "content": "Name a fruit."}
    rows = [{"instruction": "Name a fruit.", "chosen": [user, {"role": "assistant", "content": "Apple."}],
             "rejected": [user, {"role": "assistant", "content": "A car."}], "difficulty": "easy"}]
    [pair], report = load_pairs(jsonl_file(rows))
    assert (report.format, pair.prompt, pair.chosen) == ("chat", [user], [{"role": "assistant", "content": "Apple."}])


def test_string_answers_beside_a_prompt_of_messages_are_assistant_turns(jsonl_file):
    user = [{"role": "user", "content": "Name a fruit."}]
    [pair], report = load_pairs(jsonl_file([{"prompt": user, "chosen": "Apple.", "rejected": "A car."}]))
    assert (report.format, pair.prompt) == ("chat", user)
    assert (pair.chosen, pair.rejected) == ([{"role": "assistant", "content": "Apple."}],
                                            [{"role": "assistant", "content": "A car."}])


@pytest.mark.parametrize("answer", ["solution", "generated_solution"])
def test_math_problems_and_their_solutions_are_sft_records(answer):
    example, unused = read_sft({"problem": "What is 2+2?", answer: "4", "level": "Level 1"}, "m line 1")
    assert example.prompt == [{"role": "user", "content": "What is 2+2?"}]
    assert example.completion == [{"role": "assistant", "content": "4"}] and unused == ["level"]


def test_an_implicit_pair_beside_a_key_of_turns_is_refused_not_given_a_guessed_prompt(jsonl_file):
    """RLHFlow-style `context_messages` beside string answers: the turns were unused and the prompt guessed from the
    answers' shared start (empty here, or their first words)."""
    rows = [{"context_messages": [{"role": "user", "content": "Q1"}], "chosen": "Step 1: good",
             "rejected": "Step 1: bad"}]
    with pytest.raises(DataError, match=r"line 1: 'context_messages' holds conversation turns, likely the prompt, "
                                        r"which an implicit pair .* name it 'prompt'"):
        load_pairs(jsonl_file(rows))
    renamed = [{"prompt": rows[0]["context_messages"], "chosen": "Step 1: good", "rejected": "Step 1: bad"}]
    [pair], _ = load_pairs(jsonl_file(renamed))
    assert pair.prompt == [{"role": "user", "content": "Q1"}]


@pytest.mark.parametrize("score", [float("nan"), float("inf"), "nan"])
def test_a_score_that_is_no_finite_number_is_refused(jsonl_file, tmp_path, score):
    """NaN passes every comparison: `--min-score-gap 1` kept the pairs scored NaN and dropped the others."""
    answers = {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
               "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}
    path = tmp_path / "uf.jsonl"  # json.dumps writes NaN and Infinity, as pandas' to_json does
    path.write_text(json.dumps({**answers, "score_chosen": score, "score_rejected": 1.0}) + "\n")
    with pytest.raises(DataError, match=r"line 1: its scores are not finite numbers \(their gap is (nan|inf)\), so "
                                        r"--min-score-gap cannot compare them"):
        load_pairs(str(path), min_score_gap=1.0)
    [pair], _ = load_pairs(str(path))  # without --min-score-gap nothing reads them
    assert pair.chosen == [{"role": "assistant", "content": "a"}]


def test_a_trajectory_column_that_holds_no_turns_leaves_a_text_pair_alone(jsonl_file):
    rows = [{"prompt": "Name a fruit.", "chosen": "Apple.", "rejected": "A car.", "trajectory": "run-7"}]
    [pair], report = load_pairs(jsonl_file(rows))
    assert (report.format, pair.prompt, set(report.unused_keys)) == ("text", "Name a fruit.", {"trajectory"})


def test_math_500_records_train_the_solution_not_the_final_answer():
    example, unused = read_sft({"problem": "What is 1+1?", "solution": "1+1 = 2, so \\boxed{2}.", "answer": "2"},
                               "m line 1")
    assert example.completion == [{"role": "assistant", "content": "1+1 = 2, so \\boxed{2}."}] and unused == ["answer"]


@pytest.mark.parametrize("record, hint", [
    ({"conversation_id": "a", "conversation": [{"role": "user", "content": "hi"},
                                               {"role": "assistant", "content": "hello"}], "model": "m"},
     "for SFT, its 'conversation' of role/content turns reads as 'messages': rename the key"),
    ({"source": "x", "conversation": [{"input": "hi", "output": "hello"}]}, "; SFT data (`preftune sft`) holds "
                                                                             "messages, conversations"),
])
def test_a_record_without_answers_in_no_known_layout_says_what_sft_data_holds(jsonl_file, record, hint):
    """lmsys-chat-1m, WildChat and Capybara met a list of preference formats only."""
    with pytest.raises(DataError) as err:
        load_pairs(jsonl_file([record]))
    assert hint in str(err.value) and "\n" not in str(err.value)


def test_sft_reading_names_a_conversation_of_messages_by_its_fix():
    record = {"conversation": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    with pytest.raises(DataError, match=r"'conversation' of role/content turns reads as 'messages': rename the key$"):
        read_sft(record, "w line 1")


def test_a_record_of_a_preference_layout_gets_no_sft_hint(jsonl_file):
    record = {"prompt": "q", "response_0": "a", "response_1": "b", "better_response_id": 0, "safer_response_id": 1}
    with pytest.raises(DataError) as err:
        load_pairs(jsonl_file([record]))
    assert "pass --data-format pku_better or pku_safer" in str(err.value) and "SFT" not in str(err.value)


def test_an_sft_record_with_a_shared_key_name_still_gets_the_sft_hint(jsonl_file):
    with pytest.raises(DataError, match=r"; SFT data \(`preftune sft`\) holds messages, conversations"):
        load_pairs(jsonl_file([{"prompt": "q", "reply": "a"}]))
