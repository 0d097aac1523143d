"""The Python API: objects and in-memory records in, the same numbers as the command line out."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tinylm import fact_pairs, write_jsonl

import preftune

SRC = Path(__file__).resolve().parents[1] / "src"
TIMING = ("pairs_per_s", "samples_per_s", "tokens_per_s")
# Small, fast and deterministic on the CPU; lr high enough that weights visibly move in a few steps.
SETTINGS = {"max_steps": 4, "batch_size": 4, "lr": 1e-3, "max_length": 64, "device": "cpu", "dtype": "float32",
            "seed": 3, "warmup_steps": 0}


def flags(settings: dict) -> list[str]:
    return [w for k, v in settings.items() for w in (f"--{k.replace('_', '-')}", str(v))]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run([sys.executable, "-m", "preftune", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def file_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def load(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def pairs() -> list[dict]:
    return fact_pairs(16)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory, pairs) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", pairs)


@pytest.fixture(scope="module")
def cli_dpo(tmp_path_factory, tiny_model_dir, pairs_file) -> Path:
    """`preftune dpo` as a user runs it, in its own process."""
    out = tmp_path_factory.mktemp("cli") / "dpo"
    r = cli("dpo", "--model", str(tiny_model_dir), "--data", str(pairs_file), "--output-dir", str(out),
            "--quiet", *flags(SETTINGS), cwd=out.parent)
    assert r.returncode == 0, r.stderr
    return out


# ---------------------------------------------------------------------------------- the CLI and the API agree

def test_api_with_paths_writes_the_cli_run_bit_for_bit(cli_dpo, tiny_model_dir, pairs_file, tmp_path):
    result = preftune.train("dpo", model=tiny_model_dir, data=pairs_file, output_dir=tmp_path / "api", **SETTINGS)
    assert untimed(file_rows(tmp_path / "api")) == untimed(file_rows(cli_dpo))
    assert untimed(result.history) == untimed(file_rows(cli_dpo))
    a, b = load_file(str(tmp_path / "api" / "model.safetensors")), load_file(str(cli_dpo / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert result.output_dir == tmp_path / "api"


def test_api_with_objects_in_memory_trains_what_the_cli_trains(cli_dpo, tiny_model_dir, pairs, tmp_path,
                                                               monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, tokenizer = load(tiny_model_dir)
    result = preftune.train("dpo", model=model, tokenizer=tokenizer, data=pairs, **SETTINGS)
    assert list(tmp_path.iterdir()) == []                        # in memory: no run folder, no file at all
    assert result.output_dir is None
    assert untimed(result.history) == untimed(file_rows(cli_dpo))
    saved = load_file(str(cli_dpo / "model.safetensors"))
    trained = result.model.state_dict()
    assert all(torch.equal(trained[k], saved[k]) for k in saved)
    assert result.model is model and not model.training          # trained in place, handed back in eval mode
    assert result.metrics.items() >= result.history[-1].items()   # the last row, plus means over the last steps
    # The first step: policy equals the frozen copy of the starting model, so every reward is 0 and loss log 2.
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_a_dataset_reads_the_same_records_as_the_file(tiny_model_dir, pairs, pairs_file):
    import datasets

    sft_rows = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs]
    sft_file = write_jsonl(pairs_file.parent / "sft.jsonl", sft_rows)
    from_file = preftune.train("sft", model=tiny_model_dir, data=sft_file, **SETTINGS)
    model, tokenizer = load(tiny_model_dir)
    from_dataset = preftune.train("sft", model=model, tokenizer=tokenizer, data=datasets.Dataset.from_list(sft_rows),
                                  **SETTINGS)
    assert untimed(from_dataset.history) == untimed(from_file.history)
    assert from_dataset.history[-1]["loss"] < from_dataset.history[0]["loss"]
    # A DatasetDict (what load_dataset returns) is read at `split`, and messages name it by its splits.
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(sft_rows[:2]),
                                   "test": datasets.Dataset.from_list(sft_rows)})
    with pytest.raises(preftune.PreftuneError, match=r"^<in-memory data: DatasetDict, splits train, test>: 2 usable"):
        preftune.train("sft", model=tiny_model_dir, data=splits, **SETTINGS)
    from_split = preftune.train("sft", model=tiny_model_dir, data=splits, split="test", **SETTINGS)
    assert untimed(from_split.history) == untimed(from_file.history)


def test_evaluate_gives_the_cli_summary_and_rows(cli_dpo, tiny_model_dir, pairs, pairs_file, tmp_path):
    r = cli("eval", "--model", str(cli_dpo), "--ref-model", str(tiny_model_dir), "--data", str(pairs_file),
            "--output", str(tmp_path / "rows.jsonl"), "--device", "cpu", "--dtype", "float32", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    model, tokenizer = load(cli_dpo)
    report = preftune.evaluate(model=model, tokenizer=tokenizer, ref_model=tiny_model_dir, data=pairs, device="cpu",
                               dtype="float32")
    assert report.summary == json.loads(r.stdout)
    assert report.rows == [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert report.summary["pairs"] == len(report.rows) == len(pairs)


# ---------------------------------------------------------------------------------- LoRA

def test_lora_in_memory_trains_adapters_only_against_the_adapters_off_model(tiny_model_dir, pairs):
    model, tokenizer = load(tiny_model_dir)
    before = weights(model)
    result = preftune.train("dpo", model=model, tokenizer=tokenizer, data=pairs, lora_r=4, **SETTINGS)
    assert preftune.inputs.is_peft_model(result.model)
    base = {k.replace(".base_layer", ""): v for k, v in result.model.get_base_model().state_dict().items()
            if "lora_" not in k}
    assert base.keys() == before.keys() and all(torch.equal(before[k], base[k]) for k in before)  # base untouched
    lora = [p for n, p in result.model.named_parameters() if "lora_B" in n]
    assert lora and any(p.abs().sum() > 0 for p in lora)              # adapters moved off their zero start
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    # peft put the adapters into `model` itself: a second LoRA run on it replaced them with fresh ones under the
    # same name, in the object the first result wraps, and trained those without a word.
    trained = {n: p.detach().clone() for n, p in result.model.named_parameters() if "lora_" in n}
    with pytest.raises(preftune.ConfigError, match=r"^model: holds LoRA adapters that peft added in place"):
        preftune.train("dpo", model=model, tokenizer=tokenizer, data=pairs, lora_r=4, **SETTINGS)
    assert all(torch.equal(p, trained[n]) for n, p in result.model.named_parameters() if "lora_" in n)
    merged = result.model.merge_and_unload()                          # the ways out the message names
    # Full training of the merged model: peft left its weights frozen, and the optimizer's raw ValueError (an
    # empty parameter list) was all a caller saw.
    with pytest.raises(preftune.ConfigError, match=r"^model: none of its weights requires a gradient"):
        preftune.train("dpo", model=merged, tokenizer=tokenizer, data=pairs, **SETTINGS)
    assert preftune.train("dpo", model=merged.requires_grad_(True), tokenizer=tokenizer, data=pairs,
                          **SETTINGS).history
    assert preftune.train("dpo", model=merged, tokenizer=tokenizer, data=pairs, lora_r=4, **SETTINGS).history


def test_lora_on_a_model_built_in_code_refuses_merge_and_its_adapter_names_no_base(tiny_model_dir, pairs, tmp_path):
    """merge=True trained, then failed on the adapter's empty base name with a TypeError, and the failure took
    the whole run folder, trained adapter and all. The adapter folder alone made `eval` fail the same way."""
    from preftune.demo.base import tiny_llama

    _, tokenizer = load(tiny_model_dir)
    model = tiny_llama(len(tokenizer), hidden=32, layers=2, heads=4, pad_id=tokenizer.pad_token_id, seed=0)
    with pytest.raises(preftune.ConfigError, match=r"^merge: rebuilds the merged model from the base model's files"):
        preftune.train("dpo", model=model, tokenizer=tokenizer, data=pairs, lora_r=4, merge=True,
                       output_dir=tmp_path / "merged-run", **SETTINGS)
    assert not (tmp_path / "merged-run").exists()
    preftune.train("dpo", model=model, tokenizer=tokenizer, data=pairs, lora_r=4, output_dir=tmp_path / "run",
                   **SETTINGS)
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    with pytest.raises(preftune.ModelError, match=r"adapter_config.json names no base model"):
        preftune.evaluate(model=tmp_path / "run", data=pairs, device="cpu")


def test_a_peft_model_trains_its_own_adapters_with_a_folder(tiny_model_dir, pairs, tmp_path):
    import peft

    model, tokenizer = load(tiny_model_dir)
    torch.manual_seed(0)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                         task_type="CAUSAL_LM"))
    result = preftune.train("dpo", model=wrapped, tokenizer=tokenizer, data=pairs, output_dir=tmp_path / "run",
                            **SETTINGS)
    assert result.model is wrapped
    assert (tmp_path / "run" / "adapter_config.json").is_file() and (tmp_path / "run" / "results.json").is_file()
    # The reference is the same network with adapters off: identical to the policy before the first update.
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert result.history[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert result.history[-1]["reward_margin"] > 0


@pytest.fixture(scope="module")
def sft_adapter(tiny_model_dir, pairs, tmp_path_factory) -> Path:
    """An SFT LoRA run folder (an adapter over the tiny model), its adapters well away from their zero start."""
    out = tmp_path_factory.mktemp("sft-lora") / "run"
    rows = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs]
    preftune.train("sft", model=tiny_model_dir, data=rows, output_dir=out, lora_r=4,
                   **{**SETTINGS, "lr": 3e-2, "max_steps": 6})
    return out


def test_dpo_from_an_sft_lora_run_trains_its_adapter_against_the_sft_model(sft_adapter, tiny_model_dir, pairs,
                                                                          tmp_path):
    import peft

    # The SFT model's own log-probs, by a plain forward of the adapter folder, differ from the base model's.
    sft = peft.PeftModel.from_pretrained(load(tiny_model_dir)[0], str(sft_adapter)).eval()
    report = preftune.evaluate(model=sft, ref_model=tiny_model_dir, tokenizer=load(tiny_model_dir)[1], data=pairs)
    row = report.rows[0]
    assert abs(row["policy_chosen_logp"] - row["ref_chosen_logp"]) > 1e-2
    # The folder as the model: its adapter trains on, and the reference is the SFT model it starts as (the base
    # model with adapters off would make the first step's rewards non-zero).
    whole = preftune.train("dpo", model=sft_adapter, data=pairs, output_dir=tmp_path / "whole", **SETTINGS)
    first = whole.history[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["reward_margin"] == pytest.approx(0, abs=1e-6) and first["chosen_reward"] == pytest.approx(0, abs=1e-6)
    assert whole.history[-1]["loss"] < first["loss"]
    # A resumed run keeps that reference (taken before the checkpoint loads) and ends where the whole run does.
    out = tmp_path / "stopped"
    preftune.train("dpo", model=sft_adapter, data=pairs, output_dir=out, **SETTINGS,
                   callbacks=[lambda row: "stop" if row["step"] == 2 else None])
    resumed = preftune.train("dpo", model=sft_adapter, data=pairs, output_dir=out, resume=True, **SETTINGS)
    assert untimed(resumed.history) == untimed(whole.history)
    # An object loaded frozen (peft's default) trains the same way, in memory.
    frozen_sft = peft.PeftModel.from_pretrained(load(tiny_model_dir)[0], str(sft_adapter))
    in_memory = preftune.train("dpo", model=frozen_sft, tokenizer=load(tiny_model_dir)[1], data=pairs, **SETTINGS)
    assert untimed(in_memory.history) == untimed(whole.history)
    with pytest.raises(preftune.ConfigError, match="already carries LoRA adapters"):
        preftune.train("dpo", model=sft_adapter, data=pairs, lora_r=8, **SETTINGS)


def test_dpo_on_an_adapter_folder_merges_and_says_so_in_its_card(sft_adapter, tiny_model_dir, pairs, tmp_path):
    import peft
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    result = preftune.train("dpo", model=sft_adapter, data=pairs, output_dir=out, merge=True, **SETTINGS)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    by_peft = peft.PeftModel.from_pretrained(load(tiny_model_dir)[0], str(out)).merge_and_unload()
    for name, tensor in by_peft.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[name], tensor, atol=1e-6, rtol=0, msg=name)
    trained = dict(result.model.named_parameters())
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in trained.items())
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "- lora" in card and "the LoRA adapters it started with (rank 4" in card
    with pytest.raises(preftune.ConfigError, match="merge: only makes sense with LoRA"):
        preftune.train("dpo", model=tiny_model_dir, data=pairs, output_dir=tmp_path / "full", merge=True, **SETTINGS)
    assert not (tmp_path / "full" / "config.yaml").exists()
    # The same folder overwritten by a run of all weights: its card and files say so, no adapter of the last run.
    preftune.train("dpo", model=tiny_model_dir, data=pairs, output_dir=out, overwrite=True, **SETTINGS)
    card = (out / "README.md").read_text()
    assert "library_name: preftune" in card and "- lora" not in card and "all weights" in card
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").is_file()


def test_local_paths_are_saved_absolute_so_runs_chain_from_any_folder(tiny_model_dir, pairs, tmp_path, monkeypatch):
    """A run started with relative paths names its inputs by absolute path (config.yaml, the adapter's base), so
    its config reruns, its adapter loads and the next run's card follows the chain from another folder."""
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "models" / "base")
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    monkeypatch.chdir(tmp_path)
    sft_rows = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs]
    preftune.train("sft", model="models/base", data=sft_rows, output_dir="runs/sft", lora_r=4, **SETTINGS)
    preftune.train("dpo", model="runs/sft", data="pairs.jsonl", output_dir="runs/dpo", **SETTINGS)
    adapter = json.loads((tmp_path / "runs" / "sft" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tmp_path / "models" / "base")
    saved = (tmp_path / "runs" / "dpo" / "config.yaml").read_text()
    assert f"model: {tmp_path / 'runs' / 'sft'}\n" in saved and f"data: {tmp_path / 'pairs.jsonl'}\n" in saved
    assert "base_model" not in (tmp_path / "runs" / "dpo" / "README.md").read_text().split("---")[1]

    monkeypatch.chdir(tmp_path / "runs")
    report = preftune.evaluate(model=tmp_path / "runs" / "sft", data=pairs[:4])
    assert len(report.rows) == 4
    from preftune.cli import main

    assert main(["dpo", "--config", str(tmp_path / "runs" / "dpo" / "config.yaml"), "--output-dir", "dpo-again",
                 "--max-steps", "1"]) == 0
    first, again = (json.loads((tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()[0])
                    for name in ("dpo", "dpo-again"))
    assert again["loss"] == first["loss"] and again["chosen_logp"] == first["chosen_logp"]


def test_a_config_without_a_cache_setting_gets_none_and_paths_keep_their_dots(tmp_path):
    from transformers import OpenAIGPTConfig, OpenAIGPTLMHeadModel

    from preftune.io import absolute_if_local
    from preftune.models.load import cache_off_for_training, restore_cache_setting

    model = OpenAIGPTLMHeadModel(OpenAIGPTConfig(vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2))
    assert not hasattr(model.config, "use_cache")  # GPT-1 has none: training must not add one
    cache_off_for_training(model)
    restore_cache_setting(model)
    assert not hasattr(model.config, "use_cache")
    (tmp_path / "real" / "base").mkdir(parents=True)
    (tmp_path / "top").mkdir()
    (tmp_path / "top" / "link").symlink_to(tmp_path / "real" / "base")
    dotted = str(tmp_path / "top" / "link" / ".." / "base")  # through the link: real/base's parent holds base
    assert Path(dotted).is_dir() and absolute_if_local(dotted) == dotted


def test_the_callers_model_goes_on_as_a_plain_model_after_a_run_or_a_failure(tiny_model_dir, pairs):
    """Trained in place, as in TRL, but nothing of the run's own machinery is left on it: no fused norm forwards
    (they do not pickle), no gradients (a failed step's, row-sparse for the embedding), no autocast dtype. A data
    mistake found after loading leaves it as it came (no LoRA adapters added, the same trainable weights)."""
    import pickle

    model, tokenizer = load(tiny_model_dir)
    trainable = [p.requires_grad for p in model.parameters()]
    with pytest.raises(preftune.DataError, match="fewer than one batch of 4"):
        preftune.train("dpo", model=model, tokenizer=tokenizer, data=pairs[:3], lora_r=4, **SETTINGS)
    assert type(model).__name__ == "LlamaForCausalLM" and not any("lora" in n for n, _ in model.named_parameters())
    assert [p.requires_grad for p in model.parameters()] == trainable and not model.training

    def fail_at_2(row):
        if row["step"] == 2:
            raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        preftune.train("dpo", model=model, tokenizer=tokenizer, data=pairs, fused_norms=True, callbacks=[fail_at_2],
                       **SETTINGS)
    assert all(p.grad is None for p in model.parameters()) and not model.training
    result = preftune.train("dpo", model=model, tokenizer=tokenizer, data=pairs, fused_norms=True, **SETTINGS)
    assert result.model is model and model.preftune_compute_dtype is None
    assert type(pickle.loads(pickle.dumps(model))).__name__ == "LlamaForCausalLM"


def test_saved_models_keep_their_kv_cache_setting(tiny_model_dir, pairs, tmp_path):
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tiny_model_dir).use_cache
    result = preftune.train("dpo", model=tiny_model_dir, data=pairs, output_dir=tmp_path / "run", **SETTINGS)
    assert AutoConfig.from_pretrained(tmp_path / "run").use_cache and result.model.config.use_cache


# ---------------------------------------------------------------------------------- callbacks

def test_a_callback_sees_every_row_train_and_eval(tiny_model_dir, pairs, tmp_path):
    seen = []
    result = preftune.train("dpo", model=tiny_model_dir, data=pairs[:12], eval_data=pairs[12:], eval_every=2,
                            output_dir=tmp_path / "run", callbacks=[seen.append], **SETTINGS)
    assert [(r["step"], "eval_loss" in r) for r in seen] == [(1, False), (2, False), (2, True), (3, False),
                                                             (4, False), (4, True)]
    assert seen == result.history == file_rows(tmp_path / "run")
    assert result.metrics["eval_loss"] == seen[-1]["eval_loss"] and result.metrics["loss"] == seen[-2]["loss"]


def test_a_callback_stops_a_run_in_memory(tiny_model_dir, pairs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = preftune.train("dpo", model=tiny_model_dir, data=pairs,
                            callbacks=[lambda row: "stop" if row["step"] == 2 else None], **SETTINGS)
    assert [r["step"] for r in result.history] == [1, 2]
    assert result.stopped_at_step == 2 and result.metrics["stopped_at_step"] == 2
    assert list(tmp_path.iterdir()) == []


def test_a_callback_stop_with_a_folder_checkpoints_and_resumes_to_the_same_end(tiny_model_dir, pairs, tmp_path):
    whole = preftune.train("dpo", model=tiny_model_dir, data=pairs, output_dir=tmp_path / "whole", **SETTINGS)
    out = tmp_path / "stopped"
    first = preftune.train("dpo", model=tiny_model_dir, data=pairs, output_dir=out, **SETTINGS,
                           callbacks=[lambda row: "stop" if row["step"] == 2 else None])
    assert first.stopped_at_step == 2 and (out / "checkpoints" / "step-00000002" / "manifest.json").is_file()
    resumed = preftune.train("dpo", model=tiny_model_dir, data=pairs, output_dir=out, resume=True, **SETTINGS)
    assert untimed(resumed.history) == untimed(whole.history)
    a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "whole" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Once more on the finished run: nothing trains; the result is the saved model and the whole history.
    again = preftune.train("dpo", model=tiny_model_dir, data=pairs, output_dir=out, resume=True, **SETTINGS)
    assert again.history == resumed.history and again.metrics == json.loads((out / "results.json").read_text())
    assert all(torch.equal(again.model.state_dict()[k], a[k]) for k in a)


def test_every_callback_sees_every_row_when_one_of_them_stops(tiny_model_dir, pairs):
    stopper, watcher = [], []
    result = preftune.train("dpo", model=tiny_model_dir, data=pairs, output_dir=None, **SETTINGS,
                            callbacks=[lambda row: stopper.append(row["step"]) or ("stop" if row["step"] == 2 else
                                                                                  None),
                                       lambda row: watcher.append(row["step"])])
    assert stopper == watcher == [1, 2] and result.stopped_at_step == 2


# ---------------------------------------------------------------------------------- config, errors, quiet

def test_config_then_keywords_and_quiet_by_default(tiny_model_dir, pairs, tmp_path, capsys):
    (tmp_path / "dpo.yaml").write_text("stage: dpo\nbeta: 0.5\nmax_steps: 2\nbatch_size: 4\n")
    result = preftune.train("dpo", model=tiny_model_dir, data=pairs, config=tmp_path / "dpo.yaml", max_steps=1,
                            device="cpu", output_dir=tmp_path / "run")
    saved = preftune.TrainConfig.from_yaml(tmp_path / "run" / "config.yaml")
    assert (saved.beta, saved.max_steps, saved.batch_size) == (0.5, 1, 4)
    assert not saved.quiet  # the saved config, rerun by `preftune dpo --config`, prints as a command does
    assert [r["step"] for r in result.history] == [1]
    assert capsys.readouterr() == ("", "")                          # the library printed nothing


def test_in_memory_runs_say_their_data_counts_and_what_an_epoch_leaves_out(tiny_model_dir, pairs, capsys):
    preftune.train("dpo", model=tiny_model_dir, data=pairs[:10], quiet=False, **{**SETTINGS, "max_steps": 1})
    out = capsys.readouterr().out
    assert "data: 10 records (text) -> 10 used, 0 truncated, 0 dropped" in out
    assert "an epoch takes 8 of the 10 in batches of 4 (the other 2, drawn anew each epoch, are left out of it)" in out
    # An epoch is whole optimizer steps: 12 examples in steps of 2 batches of 4 leave the third batch out.
    preftune.train("dpo", model=tiny_model_dir, data=pairs[:12], quiet=False, grad_accum=2,
                   **{**SETTINGS, "max_steps": 1})
    assert ("an epoch takes 8 of the 12 in steps of 8 (2 batches) (the other 4, drawn anew each epoch, are left out "
            "of it)") in capsys.readouterr().out


def test_a_quiet_run_that_leaves_data_out_says_so_and_returns_the_counts(tiny_model_dir, pairs, caplog, capsys):
    """A quiet run (the library's default) dropped and skipped records without a word, and returned no counts."""
    long_prompt = {"prompt": "word " * 200, "chosen": "yes", "rejected": "no"}
    data = [*pairs, {"prompt": "q", "chosen": None, "rejected": "no"}, long_prompt]
    with caplog.at_level("WARNING", logger="preftune"):
        result = preftune.train("dpo", model=tiny_model_dir, data=data, output_dir=None, skip_bad_records=True,
                                **SETTINGS)
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data: ")]
    assert line.startswith("data: 1 record skipped (the first: data record 17: ")
    assert "17 records (text) -> 16 used, 0 truncated, 1 dropped (prompt alone over --max-length)" in line
    assert result.data_stats == {"train": {"total": 17, "truncated": 0, "dropped": 1}, "skipped_records": 1,
                                 "format": "text", "steps": 4}
    assert capsys.readouterr().out == ""
    caplog.clear()
    with caplog.at_level("WARNING", logger="preftune"):  # all of the data, in whole steps: nothing to say
        whole = preftune.train("dpo", model=tiny_model_dir, data=pairs, output_dir=None, **SETTINGS)
    assert not [r for r in caplog.records if r.getMessage().startswith("data: ")]
    assert whole.data_stats["train"] == {"total": 16, "truncated": 0, "dropped": 0}


def test_eval_data_that_is_dropped_whole_is_an_error_not_a_run_without_eval(tiny_model_dir, pairs):
    long = [{"prompt": "word " * 200, "chosen": "yes", "rejected": "no"}] * 2
    with pytest.raises(preftune.DataError, match=r"\(--eval-data\): all 2 eval examples dropped because the prompt "
                                                 r"alone is longer than --max-length 64 tokens"):
        preftune.train("dpo", model=tiny_model_dir, data=pairs, eval_data=long, output_dir=None, **SETTINGS)


def test_a_reference_cache_folder_that_is_a_file_is_named(tiny_model_dir, pairs, tmp_path):
    (tmp_path / "cache").write_text("")
    with pytest.raises(preftune.ConfigError, match=r"^--ref-cache-dir \S*cache: is a file; give a folder"):
        preftune.train("dpo", model=tiny_model_dir, data=pairs, output_dir=None, precompute_ref=True,
                       ref_cache_dir=str(tmp_path / "cache"), **SETTINGS)


def test_an_unfinished_run_folder_given_as_a_model_says_how_to_finish_it(tiny_model_dir, pairs, tmp_path):
    """It said 'no tokenizer_config.json in this folder; point to a Hugging Face tokenizer folder'."""
    run = tmp_path / "run"
    preftune.train("dpo", model=tiny_model_dir, data=pairs, output_dir=run, **SETTINGS,
                   callbacks=[lambda row: "stop" if row["step"] == 1 else None])
    with pytest.raises(preftune.ModelError, match=r"a run folder without its final model \(the run has not finished\); "
                                                  r"finish it with `preftune dpo --config \S*config\.yaml --resume`"):
        preftune.evaluate(model=str(run), data=pairs)


def test_the_saved_config_names_the_run_folder_absolutely(tiny_model_dir, pairs, tmp_path, monkeypatch):
    """It was written as given (relative): `--config run/config.yaml --resume` from another folder trained a new
    run there."""
    monkeypatch.chdir(tmp_path)
    preftune.train("dpo", model=tiny_model_dir, data=pairs, output_dir="run", **SETTINGS)
    saved = preftune.TrainConfig.from_yaml(tmp_path / "run" / "config.yaml")
    assert saved.output_dir == str(tmp_path / "run")


def test_a_config_object_may_ask_for_eval_that_the_arguments_give(tiny_model_dir, pairs):
    """TrainConfig(eval_every=...) was refused when built, before eval_data=... could count."""
    config = preftune.TrainConfig(eval_every=2, **SETTINGS)
    result = preftune.train("dpo", model=tiny_model_dir, data=pairs[:12], eval_data=pairs[12:], config=config,
                            output_dir=None)
    assert [row["step"] for row in result.history if "eval_loss" in row] == [2, 4]


def test_overlapping_quiet_windows_give_back_the_settings_found_first():
    """Two calls at once (threads): the first to leave put back its settings while the second was still loading,
    and the second then left transformers at ERROR for good."""
    from transformers.utils import logging as hf_logging

    from preftune.models.load import transformers_quiet

    hf_logging.set_verbosity_warning()
    first, second = transformers_quiet(), transformers_quiet()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert hf_logging.get_verbosity() == hf_logging.ERROR  # the second window is still open
    second.__exit__(None, None, None)
    assert hf_logging.get_verbosity() == hf_logging.WARNING and hf_logging.is_progress_bar_enabled()


def test_the_library_leaves_transformers_logging_as_it_found_it(tiny_model_dir, pairs, tmp_path):
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_info()
    try:
        preftune.train("dpo", model=tiny_model_dir, data=pairs, output_dir=tmp_path / "run", **SETTINGS)
        assert hf_logging.get_verbosity() == hf_logging.INFO and hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.set_verbosity_warning()


def test_accumulation_equals_one_big_batch_over_epochs(tiny_model_dir, pairs):
    """A step's micro-batches ran on into the next epoch (the 12 examples' third batch of 4, then the next
    epoch's first), so two epochs made 1.33 passes, and --grad-accum 2 --batch-size 4 differed from
    --batch-size 8 from the second step on."""
    runs = [preftune.train("dpo", model=tiny_model_dir, data=pairs[:12], **{**SETTINGS, "max_steps": -1, **sizes},
                           epochs=2) for sizes in (dict(batch_size=8), dict(batch_size=4, grad_accum=2))]
    assert [[r["step"] for r in run.history] for run in runs] == [[1, 2], [1, 2]]
    for one, accumulated in zip(*(run.history for run in runs)):
        assert accumulated["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-7)
        assert accumulated["epoch"] == one["epoch"]
    big, small = (weights(run.model) for run in runs)
    assert all(torch.allclose(big[k], small[k], rtol=1e-4, atol=1e-6) for k in big)


def test_a_tokenizer_without_eos_trains_with_a_warning(tiny_model_dir, pairs, caplog):
    model, tokenizer = load(tiny_model_dir)
    tokenizer.eos_token = None
    with caplog.at_level("WARNING"):
        preftune.train("dpo", model=model, tokenizer=tokenizer, data=pairs, **{**SETTINGS, "max_steps": 1})
    assert "the tokenizer has no EOS token: text answers are trained without an end" in caplog.text


def test_a_trainconfig_object_takes_the_stage_of_the_call(tiny_model_dir, pairs, capsys):
    config = preftune.TrainConfig(max_steps=1, batch_size=4, device="cpu", max_length=64)  # stage defaults to dpo
    sft_rows = [{"text": p["prompt"] + p["chosen"]} for p in pairs]
    result = preftune.train("sft", model=tiny_model_dir, data=sft_rows, config=config)
    assert result.history[0]["samples_per_s"] > 0 and "reward_accuracy" not in result.history[0]  # an SFT step
    assert capsys.readouterr() == ("", "")  # quiet, although TrainConfig's own default is not


@pytest.mark.parametrize("call, error, message", [
    (dict(tokenizer=None), preftune.ConfigError, "tokenizer: required when model is an object"),
    (dict(data=[{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}]),
     preftune.DataError, "data record 2: missing key 'rejected'"),
    (dict(data=42), preftune.DataError, "data: expected a list of records"),
    (dict(data=[]), preftune.DataError, "data: no records"),
    (dict(save_every=1), preftune.ConfigError, "save_every: needs a run folder"),
    (dict(bta=0.2), preftune.ConfigError, "did you mean 'beta'"),
    (dict(learning_rate=1e-3), preftune.ConfigError, "'learning_rate'; that is TRL's name: here it is 'lr'"),
    (dict(model=3), preftune.ConfigError, "model: expected a transformers model"),
    (dict(config={"stage": "sft"}), preftune.ConfigError, "is a sft config"),
    (dict(config=preftune.TrainConfig(stage="sft")), preftune.ConfigError, "is a sft config"),
    (dict(loss="ipo", label_smoothing=0.2), preftune.ConfigError,
     "label_smoothing: no loss of 'ipo' reads it (it applies to sigmoid, robust,"),
    (dict(simpo_gamma=1.0), preftune.ConfigError, "simpo_gamma: no loss of 'sigmoid' reads it (it applies to simpo)"),
    (dict(loss="orpo", precompute_ref=True), preftune.ConfigError,
     "precompute_ref: loss 'orpo' compares with no reference model"),
    (dict(eval_every=2), preftune.ConfigError, "eval_every: there is no eval data to evaluate on; give --eval-data"),
    (dict(config=preftune.TrainConfig(eval_every=2)), preftune.ConfigError, "eval_every: there is no eval data"),
])
def test_mistakes_raise_preftune_errors_with_one_line_messages(tiny_model_dir, pairs, call, error, message):
    model, tokenizer = load(tiny_model_dir)
    kwargs = {"model": model, "tokenizer": tokenizer, "data": pairs, **SETTINGS, **call}
    with pytest.raises(error) as caught:
        preftune.train("dpo", **kwargs)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_load_pairs_normalises_records_in_memory():
    chat = [{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
             "rejected": [{"role": "assistant", "content": "go away"}]}]
    [pair] = preftune.load_pairs(chat)
    assert pair.prompt == [{"role": "user", "content": "hi"}]
    assert pair.chosen == [{"role": "assistant", "content": "hello"}] and pair.where == "data record 1"
    with pytest.raises(preftune.DataError, match="cannot tell the data format"):
        preftune.load_pairs([{"question": "q"}])


def test_public_names_are_exported_and_documented():
    for name in preftune.__all__:
        obj = getattr(preftune, name)
        if name != "__version__":
            assert obj.__doc__, name
    assert preftune.preference_loss is preftune.losses.preference_loss
    assert callable(preftune.train) and callable(preftune.evaluate)


def test_eval_data_keys_not_used_are_warned_like_training_data(tiny_model_dir, pairs, tmp_path, caplog):
    train = write_jsonl(tmp_path / "train.jsonl", [{**p, "source": "web"} for p in pairs[:8]])
    held = write_jsonl(tmp_path / "held.jsonl", [{**p, "note": "x"} for p in pairs[8:11]])
    with caplog.at_level("WARNING", logger="preftune"):
        preftune.train("dpo", model=tiny_model_dir, data=train, eval_data=held, **{**SETTINGS, "max_steps": 1})
    warned = [r.getMessage() for r in caplog.records if "keys not used" in r.getMessage()]
    assert any(m.startswith(str(train)) and "source (8)" in m for m in warned)
    assert any(m.startswith(str(held)) and "note (3)" in m for m in warned)


def test_a_run_from_the_token_cache_trains_exactly_as_one_that_tokenised(tiny_model_dir, pairs_file, tmp_path,
                                                                       monkeypatch):
    from preftune.data import token_cache

    settings = {**SETTINGS, "max_steps": 2, "eval_split": 0.25, "token_cache_dir": str(tmp_path / "cache")}
    plain = preftune.train("dpo", model=tiny_model_dir, data=pairs_file, **{**settings, "token_cache": False})
    assert not (tmp_path / "cache").exists()
    first = preftune.train("dpo", model=tiny_model_dir, data=pairs_file, **settings)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2  # the training part and the held-out part

    def refuse(*a, **k):
        raise AssertionError("tokenised again although the cache holds the data")
    monkeypatch.setattr(token_cache, "tokenize_packed", refuse)
    again = preftune.train("dpo", model=tiny_model_dir, data=pairs_file, **settings)
    assert untimed(again.history) == untimed(first.history) == untimed(plain.history)


@pytest.mark.parametrize("kwargs, message", [
    (dict(stage="ppo"), r"^stage: 'ppo' is not one of sft, dpo, kto, rm, online$"),
    (dict(callbacks=print), r"^callbacks: expected a list of functions, got builtin_function_or_method"),
    (dict(callbacks=[5]), r"^callbacks: expected functions, got int"),
    (dict(tokenizer=5), r"^tokenizer: expected a transformers tokenizer, a folder or a Hub id; got int"),
    (dict(output_dir=123), r"^output_dir: expected a folder path, or None to train in memory; got int"),
])
def test_arguments_of_the_wrong_kind_are_config_errors(tiny_model_dir, kwargs, message):
    args = {"stage": "dpo", "model": str(tiny_model_dir), "data": fact_pairs(4), "output_dir": None, **kwargs}
    with pytest.raises(preftune.ConfigError, match=message):
        preftune.train(args.pop("stage"), **args)


def test_callbacks_may_be_a_generator(tiny_model_dir):
    rows = []
    preftune.train("dpo", model=str(tiny_model_dir), data=fact_pairs(8), output_dir=None, max_steps=2, batch_size=4,
                   callbacks=(fn for fn in [rows.append]))
    assert [row["step"] for row in rows] == [1, 2]


# ------------------------------------------------------------------- what the caller gave, and what it left out

def test_paths_in_a_config_stand_when_their_arguments_are_left_out(tiny_model_dir, pairs, pairs_file, tmp_path):
    """ref_model, eval_data, output_dir and tokenizer given in config= were replaced by the arguments' None."""
    import yaml
    from tinylm import make_model_dir

    other = make_model_dir(tmp_path / "other", seed=7)
    paths = {"ref_model": str(other), "eval_data": str(pairs_file), "output_dir": str(tmp_path / "run"),
             "tokenizer": str(tiny_model_dir)}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({**paths, **SETTINGS}))
    model, _ = load(tiny_model_dir)
    result = preftune.train("dpo", model=model, data=pairs, config=str(tmp_path / "run.yaml"))
    assert result.output_dir == tmp_path / "run" and (tmp_path / "run" / "model.safetensors").is_file()
    assert any("eval_loss" in row for row in result.history)
    as_flags = preftune.train("dpo", model=tiny_model_dir, data=pairs, **SETTINGS,
                              **{k: v for k, v in paths.items() if k != "output_dir"})
    assert untimed(result.history) == untimed(as_flags.history)
    assert result.history[0]["loss"] != pytest.approx(math.log(2), abs=1e-3)  # the other model is the reference


def test_model_and_data_may_come_from_the_config_and_output_dir_none_stays_in_memory(tiny_model_dir, pairs_file,
                                                                                     tmp_path):
    """model and data were required arguments (a TypeError when the config held them), and an explicit
    output_dir=None still wrote the config's folder."""
    import yaml

    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"model": str(tiny_model_dir), "data": str(pairs_file),
                                                       "output_dir": str(tmp_path / "run"), **SETTINGS}))
    result = preftune.train("dpo", config=str(tmp_path / "run.yaml"), output_dir=None)
    assert result.output_dir is None and not (tmp_path / "run").exists() and result.history
    as_arguments = preftune.train("dpo", model=tiny_model_dir, data=str(pairs_file), **SETTINGS)
    assert untimed(result.history) == untimed(as_arguments.history)
    assert preftune.train("dpo", config=str(tmp_path / "run.yaml")).output_dir == tmp_path / "run"
    for name in ("model", "data"):
        with pytest.raises(preftune.ConfigError, match=rf"^{name}: required; pass {name}=\.\.\., or give it in"):
            preftune.train("dpo", **{"model": tiny_model_dir, "data": str(pairs_file), name: None}, **SETTINGS)


@pytest.mark.parametrize("dtype", ["mixed", "bfloat16"])
def test_a_model_object_in_lower_precision_trains_what_its_path_trains(tiny_model_dir, pairs, dtype):
    """The object's reference was cast whole to bf16 (norms, embeddings, the rotary inv_freq), where a loaded one
    keeps all but its linear layers' weights in the trained dtype; and pure bf16 rounded the policy's inv_freq,
    which from_pretrained(dtype=bfloat16) keeps in fp32. Either moved the first loss off log 2."""
    settings = {**SETTINGS, "dtype": dtype, "lr": 1e-4}
    from_path = preftune.train("dpo", model=tiny_model_dir, data=pairs, **settings)
    model, tokenizer = load(tiny_model_dir)
    reference, _ = load(tiny_model_dir)
    from_object = preftune.train("dpo", model=model, tokenizer=tokenizer, ref_model=reference, data=pairs, **settings)
    assert untimed(from_object.history) == untimed(from_path.history)
    assert from_path.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)  # fp32's log 2; was 0.693174
    trained, loaded = from_object.model.state_dict(), from_path.model.state_dict()
    assert all(torch.equal(trained[k], loaded[k]) for k in loaded)
    rotary = [b for name, b in model.named_buffers() if name.endswith("inv_freq")]
    assert rotary and all(b.dtype == torch.float32 for b in rotary)
    assert {b.dtype for name, b in reference.named_buffers() if name.endswith("inv_freq")} == {torch.float32}


def test_the_model_as_its_own_reference_is_refused_before_anything_changes(tiny_model_dir, pairs):
    model, tokenizer = load(tiny_model_dir)
    with pytest.raises(preftune.ConfigError, match=r"^ref_model: the same object as model, so the reference would "
                                                  r"train with it; pass ref_model=None"):
        preftune.train("dpo", model=model, tokenizer=tokenizer, ref_model=model, data=pairs, **SETTINGS)
    assert all(p.requires_grad for p in model.parameters())


def test_eval_data_that_is_the_training_data_is_refused_or_said(tiny_model_dir, pairs, pairs_file, tmp_path):
    """A DatasetDict given as both was evaluated on its train split: the held-out split was surely meant. The same
    file or list for both may be meant (eval loss on the pairs trained on), so it is said, not refused."""
    import datasets

    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(pairs)})
    with pytest.raises(preftune.ConfigError, match=r"^eval_data: the same DatasetDict as data, read at the same "
                                                  r"split \('train'\), so every eval pair would be a training pair"):
        preftune.train("dpo", model=tiny_model_dir, data=splits, eval_data=splits, **SETTINGS)
    r = cli("dpo", "--model", str(tiny_model_dir), "--data", str(pairs_file), "--eval-data", str(pairs_file),
            "--output-dir", str(tmp_path / "run"), *flags(SETTINGS), cwd=tmp_path)
    assert r.returncode == 0 and "the eval data is the training data, so eval metrics measure the fit" in r.stderr
    r = cli("dpo", "--model", str(tiny_model_dir), "--data", str(pairs_file), "--output-dir", str(tmp_path / "two"),
            "--eval-split", "0.25", *flags(SETTINGS), cwd=tmp_path)
    assert r.returncode == 0 and "the eval data is the training data" not in r.stderr


def test_gradient_checkpointing_the_run_turned_on_is_off_again(tiny_model_dir, pairs):
    model, tokenizer = load(tiny_model_dir)
    preftune.train("dpo", model=model, tokenizer=tokenizer, data=pairs, gradient_checkpointing=True, **SETTINGS)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert getattr(model, "_require_grads_hook", None) is None
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    preftune.train("dpo", model=model, tokenizer=tokenizer, data=pairs, gradient_checkpointing=True, **SETTINGS)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())  # on before: left on


@pytest.mark.parametrize("container", ["dataframe", "datasetdict", "dict"])
def test_online_prompts_in_a_container_are_refused_not_read_as_its_keys(tiny_model_dir, tmp_path, container):
    import datasets
    import pandas as pd

    rows = [{"prompt": f"the capital of france is {i}"} for i in range(4)]
    data = {"dataframe": pd.DataFrame(rows), "dict": rows[0],
            "datasetdict": datasets.DatasetDict(train=datasets.Dataset.from_list(rows))}[container]
    with pytest.raises(preftune.DataError, match=r"^data: "):
        preftune.train("online", model=tiny_model_dir, data=data, output_dir=tmp_path / "run", judge="rule:longer",
                       batch_size=1, device="cpu")


def test_a_model_on_the_meta_device_and_trl_s_peft_config_are_one_line_each(tiny_model_dir, pairs):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        empty = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir))
    _, tokenizer = load(tiny_model_dir)
    with pytest.raises(preftune.ConfigError, match=r"^model: its weights are on the meta device"):
        preftune.train("dpo", model=empty, tokenizer=tokenizer, data=pairs, **SETTINGS)
    with pytest.raises(preftune.ConfigError, match=r"unknown key 'peft_config'; that is TRL's name: here it is "
                                                  r"'lora_r', 'lora_alpha'"):
        preftune.train("dpo", model=tiny_model_dir, data=pairs, peft_config=object(), **SETTINGS)


@pytest.mark.parametrize("how", ["raises", "cannot be imported"])
def test_a_report_that_fails_after_the_model_is_written_keeps_the_run(tiny_model_dir, pairs_file, tmp_path,
                                                                       monkeypatch, caplog, how):
    """A failure drawing the plots or writing the card (after the final model is saved), or matplotlib that
    cannot be loaded, removed the whole run folder, trained model included, as a failure in step 1 does."""
    import logging
    import sys

    from preftune.report import card, plots

    def broken(*args, **kwargs):
        raise RuntimeError("no backend")

    if how == "raises":
        monkeypatch.setattr(plots, "write_plots", broken)
    else:
        monkeypatch.setitem(sys.modules, "preftune.report.plots", None)  # as a broken matplotlib makes it
    monkeypatch.setattr(card, "write_model_card", broken)
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        preftune.train("dpo", model=tiny_model_dir, data=pairs_file, output_dir=out, **SETTINGS)
    assert (out / "model.safetensors").is_file() and (out / "results.json").is_file()
    assert f"plots: not written; `preftune plot {out}` draws them" in caplog.text
    assert "model card: " in caplog.text and "(RuntimeError: no backend)" in caplog.text
