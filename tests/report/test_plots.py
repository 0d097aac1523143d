import json
import math

import pytest
from matplotlib.image import imread

from preftune.errors import PreftuneError
from preftune.io import write_jsonl
from preftune.report.plots import _short, _smoothed, plot_demo_probabilities, write_plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_width=600, min_height=400):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    height, width = imread(path).shape[:2]
    assert width >= min_width and height >= min_height, (path, width, height)
    assert width < 4000 and height < 4000, (path, width, height)


def names(paths):
    return [p.name for p in paths]


@pytest.mark.parametrize("stage, eval_every, expected", [
    ("dpo", 10, ["loss.png", "reward_accuracy.png", "rewards.png", "logps.png", "eval.png"]),
    ("dpo", 0, ["loss.png", "reward_accuracy.png", "rewards.png", "logps.png"]),
    ("sft", 10, ["loss.png"]),  # the eval loss is drawn on the loss figure
    ("sft", 0, ["loss.png"]),
])
def test_figures_for_each_kind_of_run(make_run, stage, eval_every, expected):
    run = make_run(stage, eval_every=eval_every)
    paths = write_plots(run)
    assert names(paths) == expected
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(expected)
    for path in paths:
        assert path.parent == run / "plots"
        assert_png(path)


def test_short_and_diverged_runs_still_draw(tmp_path):
    rows = [{"step": 1, "loss": 0.7, "reward_accuracy": 0.5, "chosen_reward": 0.0, "rejected_reward": 0.0,
             "chosen_logp": -50.0, "rejected_logp": -51.0},
            {"step": 2, "loss": math.inf, "reward_accuracy": math.nan, "chosen_reward": math.nan,
             "rejected_reward": 0.1, "chosen_logp": -math.inf, "rejected_logp": -52.0}]
    write_jsonl(tmp_path / "metrics.jsonl", rows)
    paths = write_plots(tmp_path)
    assert names(paths) == ["loss.png", "reward_accuracy.png", "rewards.png", "logps.png"]
    for path in paths:
        assert_png(path)


def test_empty_metrics_is_an_error_and_draws_nothing(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("\n")
    with pytest.raises(PreftuneError, match="empty"):
        write_plots(tmp_path)
    assert not (tmp_path / "plots").exists()


def test_a_value_that_is_not_a_number_is_a_gap_not_a_crash(tmp_path):
    write_jsonl(tmp_path / "metrics.jsonl", [{"step": 1, "loss": 0.7}, {"step": 2, "loss": "abc"},
                                             {"step": 3, "loss": 0.5}])
    paths = write_plots(tmp_path)
    assert paths and all(p.exists() for p in paths)


def demo_rows(n, p=0.3):
    long = "How do I get my neighbour's dog to stop barking all night without hurting it or upsetting anyone? " * 2
    return [{"prompt": long if i % 2 else f"Say something kind #{i}", "sft_p_chosen": p, "sft_p_rejected": p * 0.9,
             "dpo_p_chosen": p * 1.8, "dpo_p_rejected": p * 0.2} for i in range(n)]


@pytest.mark.parametrize("n, p", [(1, 0.3), (6, 0.3), (4, 1e-9)])
def test_demo_probabilities_chart(tmp_path, n, p):
    path = plot_demo_probabilities(demo_rows(n, p), tmp_path / "deep" / "demo.png")
    assert path == tmp_path / "deep" / "demo.png"
    assert_png(path)


def test_prompt_labels_are_short():
    label = _short("word " * 100)
    assert len(label.splitlines()) <= 3 and all(len(line) <= 18 for line in label.splitlines())
    assert label.endswith("…")
    assert _short("  two\n lines ") == "two lines"
    assert _short("") == "(empty)"


def test_smoothing_does_not_lag_and_skips_gaps():
    steps = list(range(100))
    ramp = [float(s) for s in steps]
    _, smooth = _smoothed(steps, ramp)
    assert all(abs(a - b) < 1e-9 for a, b in zip(smooth[5:-5], ramp[5:-5]))  # a trailing average would lag
    _, smooth = _smoothed(steps, [math.nan if s == 50 else 1.0 for s in steps])
    assert all(v == 1.0 for v in smooth)


def test_a_single_eval_point_draws_no_grid_of_lone_dots(make_run):
    run = make_run("dpo", steps=10, eval_every=10)  # one eval row, at the last step
    assert sum("eval_loss" in r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())) == 1
    assert "eval.png" not in names(write_plots(run))


def test_rewards_that_are_not_numbers_are_gaps_and_an_overflowing_step_is_one_line(tmp_path):
    """A null or text reward crashed the margin panel (TypeError); a step of 1e400 an OverflowError."""
    from preftune.report.tracking import read_metrics

    write_jsonl(tmp_path / "metrics.jsonl", [{"step": 1, "loss": 0.7, "chosen_reward": None, "rejected_reward": 1},
                                             {"step": 2, "loss": 0.6, "chosen_reward": "x", "rejected_reward": 1},
                                             {"step": 3, "loss": 0.5, "chosen_reward": 0.1, "rejected_reward": -0.1}])
    written = write_plots(tmp_path)
    assert any(p.name == "rewards.png" for p in written)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1e400, "loss": 1}\n{"step": 2, "loss": 1}\n')
    with pytest.raises(PreftuneError, match=r"metrics\.jsonl line 1: not a metrics row with a 'step'"):
        read_metrics(tmp_path)
