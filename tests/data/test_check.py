"""`preftune data check` and `data show`, run through the CLI as a user would."""

from __future__ import annotations


import pytest

from preftune.cli import main
from preftune.data.check import percentiles

GOOD = [{"prompt": "the capital of france is", "chosen": " paris .", "rejected": " rome ."},
        {"prompt": "the sky is", "chosen": " blue .", "rejected": " green ."}]


def _run(capsys, *argv):
    code = main(["data", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_clean_file_exits_0_and_prints_the_format(jsonl_file, capsys):
    code, out, _ = _run(capsys, "check", jsonl_file(GOOD))
    assert code == 0
    assert "format: text (detected)" in out and "2 usable pairs (0 chat, 2 text)" in out and "problems: none" in out


def test_every_problem_is_listed_with_its_line(jsonl_file, capsys):
    rows = GOOD + [
        {"prompt": "q", "chosen": "same", "rejected": "same"},            # 3: identical
        GOOD[0],                                                          # 4: duplicate of line 1
        {"prompt": "q", "chosen": "", "rejected": "b"},                   # 5: empty chosen
        {"prompt": "q", "chosen": 7, "rejected": "b"},                    # 6: wrong type
        {"prompt": "q", "rejected": "b"},                                 # 7: missing key
    ]
    path = jsonl_file(rows)
    code, out, _ = _run(capsys, "check", path)
    assert code == 1
    assert "problems: 5" in out and "3 unreadable" in out
    for line, words in [(3, "chosen is identical to rejected"), (4, f"duplicate of {path} line 1"),
                        (5, "chosen answer is empty"), (6, "'chosen' must be a string, got int"),
                        (7, "missing key 'chosen'")]:
        assert f"{path} line {line}: {words}" in out


def test_implicit_pairs_without_a_prompt_boundary_are_said(jsonl_file, capsys):
    rows = [{"chosen": "Q: sky?\nA: blue", "rejected": "Q: sky?\nA: green"},
            {"chosen": "The capital of France is Paris.", "rejected": "The capital of France is Rome."},
            {"chosen": "Paris is the capital.", "rejected": "Rome is the capital."}]
    path = jsonl_file(rows)
    code, out, _ = _run(capsys, "check", path)
    assert code == 1 and "problems: 1" in out  # line 2 shares its first words: they are its prompt
    assert (f"{path} line 3: no prompt was found before the answers; chosen and rejected are trained as whole "
            f"texts") in out


def test_the_file_may_be_named_with_data_as_in_training(jsonl_file, capsys):
    """`--data FILE` as `preftune dpo` spells it: once read as an abbreviation of --data-format, which named the
    file an invalid format."""
    path = jsonl_file(GOOD)
    code, out, _ = _run(capsys, "check", "--data", path)
    assert code == 0 and "2 usable pairs" in out
    code, out, err = _run(capsys, "check", path, "--data", path + ".other")
    assert code == 2 and out == "" and "two data files" in err and err.count("\n") == 1
    code, out, err = _run(capsys, "show")
    assert code == 2 and "name the data file" in err


def test_flags_are_not_abbreviated(jsonl_file, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["data", "check", jsonl_file(GOOD), "--data-form", "text"])
    assert stop.value.code == 2 and "unrecognized arguments: --data-form" in capsys.readouterr().err


def test_fatal_problems_exit_2_with_one_line(tmp_path, capsys):
    code, out, err = _run(capsys, "check", str(tmp_path / "missing.jsonl"))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "missing.jsonl: file not found" in err


def test_forced_format_is_named(jsonl_file, capsys):
    rows = [{"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"}]
    code, out, _ = _run(capsys, "check", jsonl_file(rows), "--data-format", "implicit")
    assert code == 0 and "format: implicit (forced)" in out


def test_token_lengths_truncation_and_dropped_prompts(jsonl_file, tiny_model_dir, capsys):
    long_prompt = "the capital of france is " * 30
    rows = GOOD + [{"prompt": long_prompt, "chosen": " paris .", "rejected": " rome ."},
                   {"prompt": "the sky is", "chosen": " blue ." * 40, "rejected": " green ."}]
    path = jsonl_file(rows)
    code, out, _ = _run(capsys, "check", path, "--model", str(tiny_model_dir), "--max-length", "48")
    assert code == 1
    assert "token lengths:" in out and "p50" in out and "p99" in out and "max" in out
    assert f"{path} line 3: the prompt alone is too long" in out and "the pair will be dropped" in out
    assert f"{path} line 4: will be truncated" in out and "--max-length 48" in out
    assert "line 1:" not in out and "line 2:" not in out


def test_chat_pairs_with_the_template(jsonl_file, tiny_model_dir, capsys):
    turn = [{"role": "user", "content": "the sky is"}]
    rows = [{"chosen": turn + [{"role": "assistant", "content": "blue"}],
             "rejected": turn + [{"role": "assistant", "content": ""}]}]
    code, out, _ = _run(capsys, "check", jsonl_file(rows), "--model", str(tiny_model_dir))
    assert code == 1 and "format: chat (detected)" in out
    assert "the rejected answer has no text" in out


def test_show_prints_pairs_as_the_model_sees_them(jsonl_file, tiny_model_dir, capsys):
    turn = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the sky is"}]
    rows = [{"prompt": turn, "chosen": [{"role": "assistant", "content": "blue"}],
             "rejected": [{"role": "assistant", "content": "green"}]}] * 4
    code, out, _ = _run(capsys, "show", jsonl_file(rows), "-n", "2", "--model", str(tiny_model_dir))
    assert code == 0
    assert "showing 2 of 4 pairs" in out and out.count("=== ") == 2
    assert "<bos><|system|>be brief<eos><|user|>the sky is<eos><|assistant|>" in out  # special tokens visible
    assert "--- chosen:" in out and "tokens" in out and "blue<eos>" in out


def test_show_needs_a_local_model_folder(jsonl_file, tmp_path, capsys):
    code, _, err = _run(capsys, "show", jsonl_file(GOOD), "--model", str(tmp_path / "nowhere"))
    assert code == 2 and "not a folder" in err


@pytest.mark.parametrize("values, expected", [
    ([5], {"p50": 5, "p90": 5, "p99": 5, "max": 5}),
    (list(range(1, 101)), {"p50": 50, "p90": 90, "p99": 99, "max": 100}),
    ([], {}),
])
def test_percentiles_are_nearest_rank(values, expected):
    assert percentiles(values) == expected


def test_show_without_a_model_prints_the_records_as_read(jsonl_file, capsys):
    chat = {"prompt": [{"role": "user", "content": "capital of france?"}],
            "chosen": [{"role": "assistant", "content": "paris"}],
            "rejected": [{"role": "assistant", "content": "rome"}]}
    code, out, _ = _run(capsys, "show", jsonl_file([chat]))
    assert code == 0
    assert "[user] capital of france?" in out and "[assistant] paris" in out and "[assistant] rome" in out


def test_show_prints_unpaired_feedback_with_its_rating(jsonl_file, capsys):
    rows = [{"prompt": "the sky is", "completion": " blue .", "label": True},
            {"prompt": "the sky is", "completion": " green .", "label": False}]
    code, out, _ = _run(capsys, "show", jsonl_file(rows))
    assert code == 0
    assert "format: unpaired; showing 2 of 2 records" in out and "data for KTO, not for DPO" in out
    assert "--- prompt\nthe sky is\n--- completion (desirable)\n blue ." in out
    assert "--- completion (undesirable)\n green ." in out


def test_show_kto_tag_records_through_the_model(jsonl_file, tiny_model_dir, capsys):
    rows = [{"instruction": "the sky is", "input": "", "output": "blue", "kto_tag": False, "note": "x"}]
    code, out, _ = _run(capsys, "show", jsonl_file(rows), "--model", str(tiny_model_dir), "--max-length", "6")
    assert code == 0
    assert "(note (1))" in out.replace("ignored (records holding each): ", "(")  # the unused key is reported
    assert "<bos><|user|>the sky is<eos><|assistant|>" in out
    from transformers import AutoTokenizer

    blue = len(AutoTokenizer.from_pretrained(tiny_model_dir)("blue", add_special_tokens=False)["input_ids"]) + 1
    assert f"--- completion (undesirable): {blue} tokens (would be cut to fit --max-length)" in out
    assert "blue<eos>" in out



@pytest.mark.parametrize("n", ["0", "-2"])
def test_show_refuses_a_count_below_1(jsonl_file, capsys, n):
    code, out, err = _run(capsys, "show", jsonl_file([{"prompt": "q", "chosen": "a", "rejected": "b"}]), "-n", n)
    assert code == 2 and out == "" and err == f"preftune: error: -n: must be at least 1, got {n}\n"


SFT_ROWS = [
    {"messages": [{"role": "user", "content": "the sky is"}, {"role": "assistant", "content": "blue ."},
                  {"role": "user", "content": "and grass"}, {"role": "assistant", "content": "green ."}]},
    {"query": "the sky is", "response": " blue .", "source": "web"},   # 2
    {"query": "the sky is", "response": " blue .", "source": "book"},  # 3: duplicate of 2
    {"reply": "?"},                                                    # 4: unreadable
    {"prompt": "the capital of france is " * 30, "completion": " paris ."},  # 5: prompt too long at 64
    {"text": "the sky is" + " blue ." * 40},                           # 6: truncated at 64
]


def test_sft_files_are_checked_not_refused(jsonl_file, tiny_model_dir, capsys):
    """An SFT file was refused by `data check` as not being pairs; it is checked for what SFT data can have
    wrong: unreadable records, unused keys, duplicates, and with a model lengths, drops and truncation."""
    path = jsonl_file(SFT_ROWS)
    code, out, _ = _run(capsys, "check", path)
    assert code == 1 and "format: sft (detected)" in out
    assert "6 read, 5 usable examples (3 chat, 2 text), 1 unreadable" in out  # query/response: turns
    assert "unused keys (not read by format 'sft'; records holding each): source (2)" in out
    assert f"{path} line 3: duplicate of {path} line 2" in out and f"{path} line 4: cannot read an SFT" in out
    code, out, _ = _run(capsys, "check", path, "--model", str(tiny_model_dir), "--max-length", "64")
    assert "token lengths:" in out and "completion p50" in out
    assert f"{path} line 5: the prompt alone is too long" in out and "the example will be dropped" in out
    assert f"{path} line 6: will be truncated: completion" in out
    assert "line 1:" not in out and "problems: 4" in out
    code, out, _ = _run(capsys, "check", jsonl_file(SFT_ROWS[:2]), "--data-format", "sft")
    assert code == 0 and "format: sft (forced)" in out and "problems: none" in out


def test_show_sft_examples_with_their_masked_turns(jsonl_file, tiny_model_dir, capsys):
    code, out, _ = _run(capsys, "show", jsonl_file(SFT_ROWS), "-n", "2", "--model", str(tiny_model_dir))
    assert code == 0 and "showing 2 of 5 examples" in out and out.count("=== ") == 2
    assert "<|user|>the sky is<eos><|assistant|>" in out
    assert "blue .<eos>[masked: <|user|>and grass<eos><|assistant|>]green .<eos>" in out
    code, out, _ = _run(capsys, "show", jsonl_file(SFT_ROWS), "-n", "1")
    assert "--- prompt\n[user] the sky is\n--- completion\n[assistant] blue .\n[user] and grass" in out


def test_show_kto_records_as_training_encodes_them(jsonl_file, tiny_model_dir, capsys):
    """`data show` encoded a KTO record itself, through the chat template even with --raw-text-prompts."""
    rows = [{"question": "the sky is", "completion": " blue .", "label": True, "system": "be brief"}]
    path = jsonl_file(rows)
    code, out, _ = _run(capsys, "show", path, "--model", str(tiny_model_dir), "--raw-text-prompts")
    assert code == 0 and "be brief\n\nthe sky is\n" in out and "<|user|>" not in out
    code, out, _ = _run(capsys, "show", path, "--model", str(tiny_model_dir))
    assert "<|system|>be brief<eos><|user|>the sky is<eos><|assistant|>" in out


def test_show_says_what_a_record_gives_besides_its_turns_and_refuses_a_file_of_nothing(jsonl_file, capsys):
    """Without a model, `data show` printed a turn marked weight 0 like any other and left chat_template_kwargs
    out; an SFT or KTO file none of whose records could be read showed "0 of 0" and exited 0."""
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "wrong .", "weight": 0},
             {"role": "user", "content": "again"}, {"role": "assistant", "content": "right ."}]
    code, out, _ = _run(capsys, "show", jsonl_file([{"messages": turns,
                                                     "chat_template_kwargs": {"enable_thinking": False}}]))
    assert code == 0 and "[assistant, not trained] wrong .\n[user] again\n[assistant] right ." in out
    assert "--- chat_template_kwargs\n{\"enable_thinking\": false}" in out
    for rows in ([{"messages": turns[:2]}], [{"prompt": "q", "completion": [turns[3], turns[2]], "label": True}]):
        code, _, err = _run(capsys, "show", jsonl_file(rows))
        assert code == 2 and "none of the 1 records can be used; the first problem" in err


def test_show_sft_says_which_part_was_cut(jsonl_file, tiny_model_dir, capsys):
    """A prompt cut by --max-prompt-length was reported as a completion cut to fit --max-length."""
    path = jsonl_file([{"prompt": "the capital of france is " * 4, "completion": " paris ." * 5}])
    code, out, _ = _run(capsys, "show", path, "--model", str(tiny_model_dir), "--max-prompt-length", "4")
    assert code == 0 and "--- prompt: 4 tokens (truncated to fit --max-prompt-length)" in out
    assert "(truncated to fit --max-length)" not in out
    code, out, _ = _run(capsys, "show", path, "--model", str(tiny_model_dir), "--max-length", "40")
    assert "--- prompt: 37 tokens\n" in out
    assert "--- completion: 3 tokens, 3 trained (truncated to fit --max-length)" in out


def test_sft_answers_without_text_are_listed(jsonl_file, capsys):
    """An SFT conversation whose assistant turns are empty trains the end-of-turn alone; pairs already said so."""
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0},
                          {"role": "user", "content": "q2"}, {"role": "assistant", "content": ""}]}]
    path = jsonl_file(rows)
    code, out, _ = _run(capsys, "check", path)
    assert code == 1 and f"{path} line 1: the assistant turns have no text (only the end-of-turn is trained)" in out
    assert "line 2:" not in out and f"{path} line 3: the assistant turns have no text" in out  # the trained one
