"""Config: validated on construction, YAML round trip, flags override the file, clear one-line errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from preftune.cli import build_parser
from preftune.cli.train import config_from_args
from preftune.config import TrainConfig
from preftune.errors import ConfigError
from preftune.training.optim import lr_factor


def test_yaml_round_trip(tmp_path):
    cfg = TrainConfig(stage="sft", model="m", data="d.jsonl", output_dir="o", lr=3e-4, max_prompt_length=64)
    cfg.to_yaml(tmp_path / "c.yaml")
    assert TrainConfig.from_yaml(tmp_path / "c.yaml") == cfg


def test_flags_override_file(tmp_path):
    (tmp_path / "c.yaml").write_text("model: from-file\nbeta: 0.5\nlr: 1e-6\nmax_steps: 3\n")
    args = build_parser().parse_args(["dpo", "--config", str(tmp_path / "c.yaml"), "--beta", "0.2",
                                      "--no-prefix-sharing"])
    cfg = config_from_args(args, "dpo")
    assert (cfg.model, cfg.beta, cfg.lr, cfg.max_steps, cfg.prefix_sharing) == ("from-file", 0.2, 1e-6, 3, False)


@pytest.mark.parametrize("values, message", [
    ({"bta": 0.1}, "unknown key 'bta'; did you mean 'beta'?"),
    ({"beta": "high"}, "beta must be float"),
    ({"batch_size": "two"}, "batch_size must be int, got 'two'"),
    ({"batch_size": "2.5"}, "batch_size must be int, got '2.5'"),
    ({"batch_size": 0}, "batch_size: must be at least 1"),
    ({"lr": float("nan")}, "lr: must be a finite number, got nan"),
    ({"beta": float("inf")}, "beta: must be a finite number, got inf"),
    ({"adam_beta1": 1.5}, "adam_beta1: must be in [0, 1), got 1.5"),
    ({"adam_eps": -1.0}, "adam_eps: must not be negative"),
    ({"seed": 10 ** 20}, "seed: must be a 64-bit integer"),
    ({"eval_data": "held.jsonl", "eval_split": 0.1}, "eval_split: with --eval-data"),
    ({"lora_r": 8, "lora_alpha": 0.0}, "lora_alpha: must be positive"),
    ({"loss": "sigmoidd"}, "sigmoidd"),
    ({"scheduler": "step"}, "scheduler: 'step' is not one of cosine, linear, constant"),
    ({"max_prompt_length": 2048, "max_length": 1024}, "max_prompt_length"),
])
def test_bad_values_name_the_key(values, message):
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict(values, where="c.yaml")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_quoted_numbers_read_as_numbers_in_every_field(tmp_path):
    """YAML gives '1e-6' and any quoted number as a string; an int field takes a quoted whole number as a float
    field takes a quoted float."""
    (tmp_path / "c.yaml").write_text('batch_size: "4"\nmax_steps: " 7 "\nlr: 1e-6\neval_split: "0.25"\n')
    cfg = TrainConfig.from_yaml(tmp_path / "c.yaml")
    assert (cfg.batch_size, cfg.max_steps, cfg.lr, cfg.eval_split) == (4, 7, 1e-6, 0.25)
    assert isinstance(cfg.batch_size, int) and isinstance(cfg.max_steps, int)


def test_stage_default_learning_rates():
    assert TrainConfig(stage="sft").learning_rate == 2e-5
    assert TrainConfig(stage="dpo").learning_rate == 5e-7


def test_lr_schedule_by_hand():
    # warmup 2 of 10 steps: 0, 1/2, then cosine from 1 down over the remaining 8 steps
    assert lr_factor(0, warmup=2, total=10, kind="cosine") == 0.0
    assert lr_factor(1, warmup=2, total=10, kind="cosine") == pytest.approx(1 / 2)
    assert lr_factor(2, warmup=2, total=10, kind="cosine") == pytest.approx(1.0)
    assert lr_factor(6, warmup=2, total=10, kind="cosine") == pytest.approx(0.5)
    assert lr_factor(6, warmup=2, total=10, kind="linear") == pytest.approx(0.5)
    assert lr_factor(9, warmup=0, total=10, kind="constant") == 1.0


@pytest.mark.parametrize("kind, theirs", [("cosine", "cosine"), ("linear", "linear"),
                                          ("constant", "constant_with_warmup")])
@pytest.mark.parametrize("warmup", [0, 1, 3])
def test_lr_schedule_is_transformers_schedule(kind, theirs, warmup):
    """The schedule TRL's trainers take (transformers' get_scheduler); warmup started at lr/(W+1) before."""
    from transformers import get_scheduler

    total = 10
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_scheduler(theirs, opt, num_warmup_steps=warmup, num_training_steps=total)
    expected = []
    for _ in range(total):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [lr_factor(s, warmup=warmup, total=total, kind=kind) for s in range(total)] == pytest.approx(expected)


def test_warmup_ratio_is_a_share_of_the_steps_rounded_up():
    from preftune.training.optim import warmup_steps

    assert warmup_steps(TrainConfig(warmup_ratio=0.15), 10) == 2         # ceil(1.5), as transformers rounds
    assert warmup_steps(TrainConfig(warmup_steps=3), 10) == 3
    with pytest.raises(ConfigError, match="^warmup_ratio: the warmup is given twice"):
        TrainConfig(warmup_ratio=0.1, warmup_steps=2)
    with pytest.raises(ConfigError, match=r"^warmup_ratio: must be in \[0, 1\), got 1.5"):
        TrainConfig(warmup_ratio=1.5)


def test_a_stage_that_is_none_and_a_lora_dropout_past_1_are_named():
    with pytest.raises(ConfigError, match=r"^stage: 'ppo' is not one of sft, dpo, kto, rm$"):
        TrainConfig(stage="ppo", model="m", data="d")
    with pytest.raises(ConfigError, match=r"^lora_dropout: a probability, must be below 1, got 2"):
        TrainConfig(model="m", data="d", lora_r=4, lora_dropout=2.0)


def test_a_yaml_key_given_twice_is_refused_not_the_last_kept(tmp_path):
    from preftune.config import load_yaml_mapping

    path = tmp_path / "run.yaml"
    path.write_text("batch_size: 2\nlr: 1e-6\nbatch_size: 4\n")
    with pytest.raises(ConfigError, match=rf"^{path} line 3: not valid YAML \(the key 'batch_size' is given twice"):
        load_yaml_mapping(path)


def test_yaml_merge_keys_still_work_and_odd_keys_are_one_line(tmp_path):
    from preftune.config import load_yaml_mapping

    path = tmp_path / "merge.yaml"
    path.write_text("base: &b {beta: 0.2, seed: 1}\nrun: {<<: *b, beta: 0.3}\n")
    assert load_yaml_mapping(path)["run"] == {"beta": 0.3, "seed": 1}
    path.write_text("? [a, b]\n: 1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml_mapping(path)


def test_a_warmup_as_long_as_the_run_is_said(caplog):
    """A 1-step run with --warmup-ratio 0.1 trains its one step at lr 0, as transformers rounds: said, not silent."""
    from preftune.training.optim import build_optimizer

    params = [torch.nn.Parameter(torch.zeros(2, 2))]
    with caplog.at_level("WARNING", logger="preftune"):
        build_optimizer(params, TrainConfig(warmup_ratio=0.1), total_steps=1)
    assert "warmup: 1 steps cover the whole run of 1" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="preftune"):
        build_optimizer(params, TrainConfig(warmup_steps=2), total_steps=10)
    assert "warmup" not in caplog.text


def test_a_config_built_in_python_reads_its_values_as_yaml_does():
    """Built directly, a TrainConfig took any value: `batch_size="2"` stayed a string (and failed later in a raw
    comparison), `batch_size=True` ran with a batch of 1, `max_steps=2.5` ran as given."""
    cfg = TrainConfig(stage="dpo", model=Path("runs") / "sft", data="d", batch_size="2", lr=1)
    assert (cfg.model, cfg.batch_size, cfg.lr) == (os.path.join("runs", "sft"), 2, 1.0) and isinstance(cfg.lr, float)
    for values, message in [({"batch_size": True}, "batch_size must be int, got True"),
                            ({"max_steps": 2.5}, "max_steps must be int, got 2.5"),
                            ({"beta": None}, "beta must not be empty")]:
        with pytest.raises(ConfigError, match=message):
            TrainConfig(stage="dpo", model="m", data="d", **values)


def test_comma_separated_fields_take_a_list_too(tmp_path):
    """`lora_targets: [q_proj, v_proj]` in YAML was refused as not a string."""
    path = tmp_path / "run.yaml"
    path.write_text("stage: dpo\nmodel: m\ndata: d\nlora_r: 4\nlora_targets: [q_proj, v_proj]\n"
                    "loss: ['sigmoid:0.8', 'bco_pair:0.2']\n")
    cfg = TrainConfig.from_yaml(path)
    assert (cfg.lora_targets, cfg.loss) == ("q_proj,v_proj", "sigmoid:0.8,bco_pair:0.2")
    with pytest.raises(ConfigError, match="lora_targets must be str"):
        TrainConfig(stage="dpo", model="m", data="d", lora_targets=["q_proj", 3])
