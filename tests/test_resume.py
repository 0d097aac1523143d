"""A run stopped at step k and resumed ends exactly where an uninterrupted run ends: same per-step metrics, same
final weights, bit for bit on the CPU."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tinylm import fact_pairs, make_model_dir, write_jsonl
from preftune.config import TrainConfig
from preftune.training import loop as train

TIMING = ("pairs_per_s", "samples_per_s", "tokens_per_s")


@pytest.fixture(scope="module")
def dropout_model_dir(tmp_path_factory) -> Path:
    """The tiny model with attention dropout, so a resumed run must also restore the random generators."""
    path = make_model_dir(tmp_path_factory.mktemp("dropout-model"))
    config = json.loads((path / "config.json").read_text())
    config["attention_dropout"] = 0.2
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", fact_pairs(24))


@pytest.fixture(scope="module")
def margin_file(tmp_path_factory) -> Path:
    """Pairs with a per-pair margin, for reward models."""
    rows = [{**row, "margin": (i % 3) * 0.5} for i, row in enumerate(fact_pairs(24))]
    return write_jsonl(tmp_path_factory.mktemp("data") / "margins.jsonl", rows)


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory) -> Path:
    rows = [{"text": f"{p['prompt']}{p['chosen']}"} for p in fact_pairs(24)]
    return write_jsonl(tmp_path_factory.mktemp("data") / "sft.jsonl", rows)


def metric_rows(run: Path) -> list[dict]:
    """metrics.jsonl without the timing columns, which differ between any two runs."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    adapter = run / "adapter_model.safetensors"
    return load_file(str(adapter if adapter.exists() else run / "model.safetensors"))


def assert_same_run(a: Path, b: Path) -> None:
    assert metric_rows(a) == metric_rows(b)
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def stop_at(monkeypatch, step: int, signum: int = signal.SIGTERM, times: int = 1) -> dict:
    """Signal this process during step `step`, as a cluster does before it preempts a job. Returns the call count."""
    real = train.train_step
    calls = {"n": 0}

    def signalled_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            for _ in range(times):
                os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", signalled_step)
    return calls


def config(model: Path, data: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(stage="dpo", model=str(model), data=str(data), output_dir=str(out), max_steps=6, batch_size=4,
                  lr=1e-3, warmup_steps=2, max_length=64, device="cpu", dtype="float32", quiet=True, seed=3)
    values.update(overrides)
    return TrainConfig(**values)


def interrupted_then_resumed(monkeypatch, cfg: TrainConfig, k: int) -> None:
    with monkeypatch.context() as m:
        stop_at(m, k)
        assert train.run(cfg, command="preftune dpo") == {"stopped_at_step": k}
    assert not (Path(cfg.output_dir) / "model.safetensors").exists()
    cfg.resume = True
    train.run(cfg, command="preftune dpo --resume")


CASES = {
    "sft": dict(stage="sft"),
    "dpo": dict(),
    "dpo-grad-accum": dict(grad_accum=2, batch_size=2),
    "bco-running-mean": dict(loss="bco_pair"),
    "dpo-dropout-eval": dict(eval_split=0.25, eval_every=2),
    "rm-margins-centering-eval": dict(stage="rm", center_rewards=0.01, eval_split=0.25, eval_every=2),
    "rm-lora": dict(stage="rm", lora_r=4),
}


@pytest.mark.parametrize("case", CASES)
def test_resumed_run_equals_uninterrupted(case, tmp_path, monkeypatch, tiny_model_dir, dropout_model_dir,
                                          pairs_file, sft_file, margin_file):
    overrides = dict(CASES[case])
    data = {"sft": sft_file, "rm": margin_file}.get(overrides.get("stage"), pairs_file)
    model = dropout_model_dir if "dropout" in case else tiny_model_dir
    train.run(config(model, data, tmp_path / "whole", **overrides), command="preftune")
    interrupted_then_resumed(monkeypatch, config(model, data, tmp_path / "parts", **overrides), k=3)
    assert_same_run(tmp_path / "whole", tmp_path / "parts")
    steps = [r["step"] for r in metric_rows(tmp_path / "parts") if "loss" in r]
    assert steps == list(range(1, 7))


def test_resume_from_a_periodic_checkpoint_after_a_crash(tmp_path, tiny_model_dir, pairs_file):
    """A run that died after step 5 (checkpoints every 2 steps) redoes steps 5 and 6 from the step-4 checkpoint."""
    train.run(config(tiny_model_dir, pairs_file, tmp_path / "whole"), command="preftune")
    crashed = config(tiny_model_dir, pairs_file, tmp_path / "parts", save_every=2, keep_checkpoints=5)
    train.run(crashed, command="preftune")
    parts = tmp_path / "parts"
    for name in ("model.safetensors", "results.json"):  # as if it had died before writing its final model
        (parts / name).unlink()
    with open(parts / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "loss": 0.1')  # and half way through a metrics line
    assert sorted(p.name for p in (parts / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    crashed.resume = True
    train.run(crashed, command="preftune")
    assert_same_run(tmp_path / "whole", parts)


def test_resume_with_the_reference_cache(tmp_path, monkeypatch, tiny_model_dir, pairs_file):
    cache = tmp_path / "ref-cache"
    extra = dict(precompute_ref=True, ref_cache_dir=str(cache))
    train.run(config(tiny_model_dir, pairs_file, tmp_path / "whole", **extra), command="preftune")
    if not cache.exists() or not any(cache.rglob("*")):
        pytest.skip("--precompute-ref does not write a reference cache yet")
    interrupted_then_resumed(monkeypatch, config(tiny_model_dir, pairs_file, tmp_path / "parts", **extra), k=4)
    assert_same_run(tmp_path / "whole", tmp_path / "parts")


def test_resume_after_metrics_lost_its_end_finishes_with_whole_rows(tmp_path, monkeypatch, tiny_model_dir,
                                                                    pairs_file):
    """A metrics.jsonl shorter than at the checkpoint (its last row cut) must not have new rows joined onto the
    cut one: the run would train to the end, then fail reading its metrics and write no model."""
    cfg = config(tiny_model_dir, pairs_file, tmp_path / "run")
    with monkeypatch.context() as m:
        stop_at(m, 3)
        assert train.run(cfg, command="preftune dpo") == {"stopped_at_step": 3}
    metrics = tmp_path / "run" / "metrics.jsonl"
    whole = metrics.read_bytes()
    metrics.write_bytes(whole[:-50])  # the third row cut short
    cfg.resume = True
    train.run(cfg, command="preftune dpo --resume")
    assert (tmp_path / "run" / "model.safetensors").exists()
    steps = [r["step"] for r in metric_rows(tmp_path / "run") if "loss" in r]
    assert steps == [1, 2, 4, 5, 6]  # the cut row is gone, the others whole
