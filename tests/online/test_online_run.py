"""Online runs on a tiny random model: what the judge sees, what the rounds write, exact resume inside a round,
one-line failures of a bad judge."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import preftune
from preftune.errors import JudgeError
from preftune.online.rounds import round_dir

PROMPTS = ["the capital of france is", "cats chase", "the sky is", "water boils at", "dogs chase cats and",
           "Human: what is the capital of spain ? Assistant:", "grass is", "the capital of italy is"]
EVAL = ["what is the capital of spain ?", "the sky is blue and"]
# The tiny random model rarely ends an answer within a few tokens: its cut-off answers are paired too.
SETTINGS = dict(samples=3, rounds=2, steps_per_round=3, max_new_tokens=6, batch_size=4, lr=1e-3, beta=0.1,
                generation_batch_size=4, pair_cut_answers=True)


class LengthJudge:
    """Scores answers by length (a deterministic judge) and records every call."""

    def __init__(self):
        self.calls: list[tuple] = []

    def __call__(self, prompt, answers):
        self.calls.append((prompt, list(answers)))
        return [len(a) for a in answers]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    judge = LengthJudge()
    out = tmp_path_factory.mktemp("online") / "run"
    result = preftune.train("online", model=tiny_model_dir, data=PROMPTS, eval_data=EVAL, output_dir=out,
                            judge=judge, save_every=1, **SETTINGS)
    return result, judge, out


def test_the_model_handed_back_is_a_plain_model(uninterrupted):
    """As for the other stages: no patched forwards, no row-sparse lookups (a DPO run from it copies it as its
    reference), and it pickles."""
    import pickle

    from preftune.logps.parts import SPARSE_GRAD

    model = uninterrupted[0].model
    assert not any("forward" in vars(m) or getattr(m, SPARSE_GRAD, False) for m in model.modules())
    pickle.loads(pickle.dumps(model))


def test_judge_sees_each_prompt_with_its_samples_and_pairs_follow_its_scores(uninterrupted, tiny_model_dir):
    result, judge, out = uninterrupted
    # Calls: held-out greedy answers of the start (one each), then per round the samples then the greedy answers.
    per_round = len(PROMPTS) + len(EVAL)
    assert len(judge.calls) == len(EVAL) + SETTINGS["rounds"] * per_round
    for r in (1, 2):
        start = len(EVAL) + (r - 1) * per_round
        sampled = judge.calls[start:start + len(PROMPTS)]
        greedy = judge.calls[start + len(PROMPTS):start + per_round]
        assert [p for p, _ in sampled] == PROMPTS and [p for p, _ in greedy] == EVAL
        assert all(len(a) == SETTINGS["samples"] for _, a in sampled) and all(len(a) == 1 for _, a in greedy)
        samples = _rows(round_dir(out, r) / "samples.jsonl")
        assert [s["answers"] for s in samples] == [a for _, a in sampled]
        scores = [[float(len(x)) for x in a] for _, a in sampled]
        assert [s["scores"] for s in samples] == scores
        pairs = _rows(round_dir(out, r) / "pairs.jsonl")
        expected = []
        for i, (prompt, answers) in enumerate(sampled):
            lengths = [len(a) for a in answers]
            if max(lengths) == min(lengths):
                continue
            best, worst = answers[lengths.index(max(lengths))], answers[lengths.index(min(lengths))]
            as_turn = isinstance(prompt, list)
            expected.append((i, [{"role": "assistant", "content": best}] if as_turn else best,
                             [{"role": "assistant", "content": worst}] if as_turn else worst,
                             max(lengths), min(lengths)))
        assert [(p["prompt_index"], p["chosen"], p["rejected"], p["score_chosen"], p["score_rejected"])
                for p in pairs] == expected
        row = result.history[r]
        flat = [s for group in scores for s in group]
        assert row["round"] == r and row["pairs"] == len(expected)
        assert row["tied_groups"] == len(PROMPTS) - len(expected)
        assert row["pair_share"] == pytest.approx(len(expected) / len(PROMPTS))
        assert row["score_mean"] == pytest.approx(statistics.fmean(flat))
        assert row["score_std"] == pytest.approx(statistics.pstdev(flat))
        assert row["eval_score"] == pytest.approx(statistics.fmean(len(a[0]) for _, a in greedy))
        assert row["train_loss"] > 0
        assert all(len(s["ended"]) == SETTINGS["samples"] for s in samples)
        assert row["cut_answers"] == sum(not e for s in samples for e in s["ended"]) > 0  # paired: pair_cut_answers
    assert result.history[0]["round"] == 0
    assert result.history[0]["eval_score"] == pytest.approx(statistics.fmean(len(a[0]) for _, a in
                                                                            judge.calls[:len(EVAL)]))
    assert _rows(out / "metrics.jsonl") == result.history
    assert (out / "plots" / "online.png").stat().st_size > 0
    assert (out / "model.safetensors").exists() and (out / "results.json").exists()
    # Each round's DPO steps are a DPO run referenced to the starting model (the default --ref-update none).
    for r in (1, 2):
        resolved = yaml.safe_load((round_dir(out, r) / "train" / "config.yaml").read_text())
        assert (resolved["stage"], resolved["ref_model"], resolved["max_steps"]) == ("dpo", str(tiny_model_dir), 3)
    # The final model is round 2's; each round moved the weights it started from.
    final, w2 = load_file(out / "model.safetensors"), load_file(round_dir(out, 2) / "train" / "model.safetensors")
    assert all(torch.equal(final[k], w2[k]) for k in w2)
    w1 = load_file(round_dir(out, 1) / "train" / "model.safetensors")
    w0 = load_file(tiny_model_dir / "model.safetensors")
    assert any(not torch.equal(w0[k], w1[k]) for k in w1) and any(not torch.equal(w1[k], w2[k]) for k in w1)


def test_resume_inside_a_round_equals_the_uninterrupted_run(uninterrupted, tiny_model_dir, tmp_path):
    _, _, whole = uninterrupted
    out = tmp_path / "run"

    def stop_in_round_2(row):
        return "stop" if row.get("round") == 2 and row.get("step") == 1 and "loss" in row else None

    first = preftune.train("online", model=tiny_model_dir, data=PROMPTS, eval_data=EVAL, output_dir=out,
                           judge=LengthJudge(), save_every=1, callbacks=[stop_in_round_2], **SETTINGS)
    assert first.stopped_at_step == 1 and first.metrics["stopped_at_round"] == 2
    assert not (out / "results.json").exists()
    # Generation is seeded: a round whose pairs were lost makes the same pairs again.
    (round_dir(out, 2) / "pairs.jsonl").unlink()
    (round_dir(out, 2) / "samples.jsonl").unlink()
    resumed = preftune.train("online", model=tiny_model_dir, data=PROMPTS, eval_data=EVAL, output_dir=out,
                             judge=LengthJudge(), save_every=1, resume=True, **SETTINGS)
    for r in (1, 2):
        for name in ("samples.jsonl", "pairs.jsonl"):
            assert (round_dir(out, r) / name).read_text() == (round_dir(whole, r) / name).read_text()
    assert _rows(out / "metrics.jsonl") == _rows(whole / "metrics.jsonl") == resumed.history
    a, b = load_file(out / "model.safetensors"), load_file(whole / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # A finished run resumed again has nothing to do.
    again = preftune.train("online", model=tiny_model_dir, data=PROMPTS, eval_data=EVAL, output_dir=out,
                           judge=LengthJudge(), save_every=1, resume=True, **SETTINGS)
    assert again.history == resumed.history


def test_a_failing_judge_is_one_line_naming_the_prompt_and_leaves_nothing(tiny_model_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    judge = tmp_path / "judge.py"
    judge.write_text("def score(prompt, answers):\n"
                     "    return [1.0] if prompt == 'cats chase' else [float(len(a)) for a in answers]\n")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "preftune", "online", "--model", str(tiny_model_dir), "--prompts", str(prompts),
           "--output-dir", str(out), "--judge", f"python:{judge}:score", "--samples", "3", "--rounds", "1",
           "--steps-per-round", "1", "--max-new-tokens", "4", "--batch-size", "2", "--pair-cut-answers"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (f"preftune: error: {prompts} line 2: the judge returned 1 scores "
                                                    f"for 3 answers")
    assert "Traceback" not in done.stderr
    assert not out.exists()  # the corrected rerun is not refused


def test_judge_error_from_the_api_and_a_judge_spec_checked_before_loading(tiny_model_dir, tmp_path):
    with pytest.raises(JudgeError, match="--prompts record 1: the judge raised ValueError: no"):
        preftune.train("online", model=tiny_model_dir, data=PROMPTS[:2], output_dir=tmp_path / "a",
                       judge=lambda p, a: (_ for _ in ()).throw(ValueError("no")), **SETTINGS)
    assert not (tmp_path / "a").exists()
    with pytest.raises(preftune.errors.ConfigError, match="rule:longest is not a built-in rule"):
        preftune.train("online", model=tiny_model_dir, data=PROMPTS, output_dir=tmp_path / "b",
                       judge="rule:longest", **SETTINGS)


def test_sigterm_during_sampling_stops_cleanly_and_resume_finishes(tiny_model_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    judge = tmp_path / "judge.py"
    marker = tmp_path / "signalled"
    # The first call signals the process itself, as a cluster would, while the round is being judged.
    judge.write_text("import os, signal, pathlib\n"
                     f"MARK = pathlib.Path({str(marker)!r})\n"
                     "def score(prompt, answers):\n"
                     "    if not MARK.exists():\n"
                     "        MARK.write_text('x')\n"
                     "        os.kill(os.getpid(), signal.SIGTERM)\n"
                     "    return [float(len(a)) for a in answers]\n")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "preftune", "online", "--model", str(tiny_model_dir), "--prompts", str(prompts),
           "--output-dir", str(out), "--judge", f"python:{judge}:score", "--samples", "3", "--rounds", "1",
           "--steps-per-round", "2", "--max-new-tokens", "6", "--batch-size", "4", "--quiet",
           "--pair-cut-answers"]
    stopped = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert stopped.returncode == 0, stopped.stderr
    assert "SIGTERM received" in stopped.stderr
    assert "stopped in round 1 after step 0 of 2; resume with:" in stopped.stdout and "--resume" in stopped.stdout
    pairs = (round_dir(out, 1) / "pairs.jsonl").read_text()
    assert pairs and not (round_dir(out, 1) / "train").exists() and not (out / "results.json").exists()
    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert (round_dir(out, 1) / "pairs.jsonl").read_text() == pairs  # the written pairs were trained on
    assert _rows(out / "metrics.jsonl")[-1]["round"] == 1 and (out / "results.json").exists()


def test_online_takes_model_and_prompts_from_fields_and_config(tiny_model_dir, tmp_path):
    """model and data became optional (a config may hold them); prompts passed as a field were then refused as
    missing, because the check ran before the fields were read."""
    import preftune

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    for kwargs in (dict(model=str(tiny_model_dir), prompts=str(prompts)),
                   dict(config={"model": str(tiny_model_dir), "prompts": str(prompts)})):
        # samples=1 is refused by the config itself: every argument before it was taken
        with pytest.raises(preftune.ConfigError, match="^samples: must be at least 2"):
            preftune.train("online", output_dir=tmp_path / "run", judge="rule:contains:paris", samples=1, **kwargs)
    with pytest.raises(preftune.ConfigError, match=r"^data: required"):
        preftune.train("online", model=str(tiny_model_dir), output_dir=tmp_path / "run", judge="rule:contains:x")


# --------------------------------------------------------------- the online review's failure cases

def test_overwrite_refused_for_its_prompts_leaves_the_finished_run(uninterrupted, tiny_model_dir, tmp_path):
    """--overwrite removed the previous run before the new one had read its prompts; refused, it left nothing."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(uninterrupted[2], out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(preftune.DataError):
        preftune.train("online", model=tiny_model_dir, data=[{"prompt": ""}], output_dir=out, judge=LengthJudge(),
                       overwrite=True, **SETTINGS)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_overwrite_refused_after_a_run_stopped_before_training_leaves_its_samples(uninterrupted, tiny_model_dir,
                                                                                   tmp_path):
    """The cleanup of a failed command removed config.yaml, metrics and rounds/ of a run that had not trained yet,
    though this command had written none of them."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(uninterrupted[2], out)
    for train in out.glob("rounds/*/train"):
        shutil.rmtree(train)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(preftune.DataError):
        preftune.train("online", model=tiny_model_dir, data=[{"prompt": ""}], output_dir=out, judge=LengthJudge(),
                       overwrite=True, **SETTINGS)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_the_run_folder_may_not_be_or_hold_the_starting_model(tiny_model_dir, tmp_path):
    for model, out in ((tiny_model_dir, tiny_model_dir), (tiny_model_dir, Path(tiny_model_dir).parent)):
        with pytest.raises(preftune.ConfigError, match=r"--output-dir \S+: holds the --model folder, which every "
                                                      r"round reads"):
            preftune.train("online", model=model, data=PROMPTS, output_dir=out, judge=LengthJudge(), overwrite=True,
                           **SETTINGS)


def test_a_callback_stop_in_a_round_is_heard_off_the_main_thread(tiny_model_dir, tmp_path):
    """The stop reached the online run only through the signal handlers, which a thread has none of."""
    import threading

    last, got = SETTINGS["steps_per_round"], {}

    def run():
        got["result"] = preftune.train("online", model=tiny_model_dir, data=PROMPTS, output_dir=tmp_path / "run",
                                       judge=LengthJudge(), callbacks=[lambda row: "stop" if row.get("step") == last
                                                                       and "loss" in row else None],
                                       **{**SETTINGS, "rounds": 3})
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert [row["round"] for row in got["result"].history] == [1]


def test_the_saved_settings_name_local_paths_absolutely(tiny_model_dir, tmp_path, monkeypatch):
    """Written as given: `--config RUN/config.yaml --resume` from another folder trained a new run there."""
    import os

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    monkeypatch.chdir(tmp_path)
    preftune.train("online", model=os.path.relpath(tiny_model_dir), data="p.jsonl", output_dir="run",
                   judge=LengthJudge(), **{**SETTINGS, "rounds": 1})
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert all(Path(saved[k]).is_absolute() for k in ("model", "prompts", "output_dir"))
    assert Path(saved["model"]).resolve() == Path(tiny_model_dir).resolve()
    assert (saved["prompts"], saved["output_dir"]) == (str(prompts), str(tmp_path / "run"))


def test_a_folder_holding_a_model_is_not_written_over(tiny_model_dir, tmp_path):
    import shutil

    out = tmp_path / "mymodel"
    shutil.copytree(tiny_model_dir, out)
    with pytest.raises(preftune.ConfigError, match=r"--output-dir \S*mymodel: holds a model \(config\.json\)"):
        preftune.train("online", model=tiny_model_dir, data=PROMPTS, output_dir=out, judge=LengthJudge(), **SETTINGS)


def test_resume_with_other_settings_is_refused(uninterrupted, tiny_model_dir, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(uninterrupted[2], out)
    (out / "results.json").unlink()  # as if stopped: resume would go on
    with pytest.raises(preftune.ConfigError, match=r"--resume: the run in \S+ was started with samples 3 \(now 5\)"):
        preftune.train("online", model=tiny_model_dir, data=PROMPTS, eval_data=EVAL, output_dir=out,
                       judge=LengthJudge(), save_every=1, resume=True, **{**SETTINGS, "samples": 5})


def test_resume_takes_the_same_settings_written_another_way_and_what_may_change(uninterrupted, tiny_model_dir,
                                                                                tmp_path, monkeypatch):
    """A default given once and left out the next time, a relative path made absolute, and a new checkpoint
    interval were refused as other settings."""
    import os
    import shutil

    out = tmp_path / "run"
    shutil.copytree(uninterrupted[2], out)
    (out / "results.json").unlink()
    monkeypatch.chdir(Path(tiny_model_dir).parent)
    left_out = {k: v for k, v in SETTINGS.items() if k != "beta"}  # 0.1, the default, given when it started
    resumed = preftune.train("online", model=os.path.relpath(tiny_model_dir), data=PROMPTS, eval_data=EVAL,
                             output_dir=out, judge=LengthJudge(), save_every=2, resume=True, **left_out)
    assert (out / "results.json").exists() and resumed.history


def test_a_finished_run_resumed_with_more_rounds_is_refused(uninterrupted, tiny_model_dir, tmp_path):
    """It returned the finished run, and the command line printed 'done: 3 rounds' over a run of 2."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(uninterrupted[2], out)
    with pytest.raises(preftune.ConfigError, match=r"--resume: the run in \S+ was started with rounds 2 \(now 3\)"):
        preftune.train("online", model=tiny_model_dir, data=PROMPTS, eval_data=EVAL, output_dir=out,
                       judge=LengthJudge(), save_every=1, resume=True, **{**SETTINGS, "rounds": 3})


def test_a_callback_stop_on_a_rounds_last_step_stops_after_that_round(tiny_model_dir, tmp_path):
    last = SETTINGS["steps_per_round"]
    result = preftune.train("online", model=tiny_model_dir, data=PROMPTS, output_dir=tmp_path / "run",
                            judge=LengthJudge(), callbacks=[lambda row: "stop" if row.get("step") == last and "loss" in
                                                            row else None], **{**SETTINGS, "rounds": 3})
    assert [row["round"] for row in result.history] == [1] and result.metrics["stopped_at_round"] == 2


def test_a_callback_stop_on_a_round_row_stops_after_that_round(tiny_model_dir, tmp_path):
    result = preftune.train("online", model=tiny_model_dir, data=PROMPTS, output_dir=tmp_path / "run",
                            judge=LengthJudge(), callbacks=[lambda row: "stop" if "pairs" in row else None],
                            **{**SETTINGS, "rounds": 3})
    assert [row["round"] for row in result.history] == [1] and result.metrics["stopped_at_round"] == 2


def test_template_arguments_of_a_prompt_reach_the_training_pairs(tiny_model_dir, tmp_path):
    """They reached generation, and the round trained on the prompt rendered without them."""
    prompts = [{"prompt": [{"role": "user", "content": p}], "chat_template_kwargs": {"brief": True}}
               for p in PROMPTS]
    out = tmp_path / "run"
    preftune.train("online", model=tiny_model_dir, data=prompts, output_dir=out, judge=LengthJudge(),
                   **{**SETTINGS, "rounds": 1})
    pairs = _rows(round_dir(out, 1) / "pairs.jsonl")
    assert pairs and all(p["chat_template_kwargs"] == {"brief": True} for p in pairs)


@pytest.mark.parametrize("prompt, message", [
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
     r"--prompts record 1: the prompt ends with a assistant turn; a prompt to answer ends with the user's turn "
     r"\(or a tool's result\)"),
])
def test_prompts_that_cannot_be_answered_are_refused_when_read(tiny_model_dir, tmp_path, prompt, message):
    with pytest.raises(preftune.DataError, match=message):
        preftune.train("online", model=tiny_model_dir, data=[{"prompt": prompt}], output_dir=tmp_path / "run",
                       judge=LengthJudge(), **SETTINGS)
