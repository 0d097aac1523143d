"""Online settings: one flat mapping split into the rounds' settings and the DPO steps' TrainConfig."""

from __future__ import annotations

import pytest
import yaml

from preftune.cli import build_parser
from preftune.cli.online import config_from_args
from preftune.errors import ConfigError
from preftune.online.config import OnlineConfig


def test_flags_split_into_rounds_and_dpo_settings_and_yaml_takes_them_back(tmp_path):
    args = build_parser().parse_args(["online", "--model", "m", "--prompts", "p.jsonl", "--output-dir", "o",
                                      "--judge", "rule:shorter", "--samples", "6", "--ref-update", "round",
                                      "--beta", "0.25", "--loss", "ipo", "--lr", "1e-6", "--batch-size", "2"])
    cfg = config_from_args(args)
    assert (cfg.samples, cfg.ref_update, cfg.judge) == (6, "round", "rule:shorter")
    round_cfg = cfg.train_config(output_dir="o/rounds/001/train", model="<policy>", ref_model="m")
    assert (round_cfg.stage, round_cfg.beta, round_cfg.loss, round_cfg.lr, round_cfg.batch_size) == (
        "dpo", 0.25, "ipo", 1e-6, 2)
    assert round_cfg.max_steps == cfg.steps_per_round and round_cfg.ref_model == "m"
    cfg.to_yaml(tmp_path / "config.yaml")
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert written["stage"] == "online" and written["beta"] == 0.25 and written["samples"] == 6
    again = config_from_args(build_parser().parse_args(["online", "--config", str(tmp_path / "config.yaml")]))
    assert again == cfg


@pytest.mark.parametrize("values, message", [
    ({"data": "x.jsonl"}, "data: not a setting of online training"),
    ({"max_steps": 5}, "use --steps-per-round"),
    ({"lora_r": 8}, "train all weights for now"),
    ({"samples": 1}, "samples: must be at least 2"),
    ({"temperature": 0.0}, "temperature: must be a positive number"),
    ({"temperature": float("nan")}, "temperature: must be a positive number, got nan"),
    ({"eval_prompts": "e.jsonl", "eval_split": 0.1}, "not both"),
    ({"beta": -1.0}, "beta: must be positive"),
    ({"betta": 0.1}, "did you mean 'beta'"),
    ({"samplez": 4}, "did you mean 'samples'"),
    ({"dpo": {"rounds": 2}}, "dpo.rounds: 'rounds' is a setting of the online run, not of its DPO steps"),
])
def test_wrong_settings_are_one_line_config_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        OnlineConfig.from_dict(values)


def test_rounds_of_a_reference_free_loss_name_no_reference():
    """Every round named the starting model as its reference, which a loss that uses none now refuses: an online
    run with loss simpo failed after its first round's sampling."""
    cfg = OnlineConfig.from_dict({"model": "m", "prompts": "p.jsonl", "output_dir": "o", "judge": "rule:shorter",
                                  "loss": "simpo"})
    assert cfg.train_config(output_dir="o/rounds/001/train", model="<policy>", ref_model="m").ref_model is None
    both = OnlineConfig.from_dict({"loss": "sigmoid:0.5,simpo:0.5"})
    assert both.train_config(output_dir="o", model="<policy>", ref_model="m").ref_model == "m"


def test_a_resume_compares_what_the_rounds_compute_with_as_resolved_values():
    """lr left out (None) and lr given at its default were two settings, while the generation batch size, which
    seeds the samples, was let change."""
    from preftune.online.rounds import _setting_pairs

    base = {"model": "m", "prompts": "p.jsonl", "output_dir": "o", "judge": "rule:longer"}
    saved = OnlineConfig.from_dict(base)
    now = OnlineConfig.from_dict({**base, "lr": 5e-7, "generation_batch_size": 4, "save_every": 7})
    assert [name for name, a, b in _setting_pairs(saved, now) if a != b] == ["generation_batch_size"]
