import json
import sys
import types

import pytest

from preftune.config import TrainConfig
from preftune.errors import ConfigError, PreftuneError
from preftune.report.tracking import Tracker, parse_sinks, read_metrics


def config(**kw):
    return TrainConfig(stage="dpo", model="m", data="d.jsonl", output_dir="out", **kw)


class Scalar:
    """Stands in for a 0-d tensor: the trainer may hand over `loss.detach()` without `.item()`."""

    def __init__(self, value):
        self.value = value

    def item(self):
        return self.value


def lines(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_one_line_per_log_and_tensors_unwrapped(tmp_path):
    with Tracker(tmp_path, config()) as tracker:
        tracker.log({"step": 1, "loss": Scalar(0.7), "lr": 1e-6})
        tracker.log({"step": 2, "loss": 0.6})
        tracker.log({"step": 2, "eval_loss": 0.65})
    assert lines(tmp_path) == [{"step": 1, "loss": 0.7, "lr": 1e-6}, {"step": 2, "loss": 0.6},
                               {"step": 2, "eval_loss": 0.65}]


def test_reopen_appends_and_readers_keep_the_last_row_of_a_step(tmp_path):
    with Tracker(tmp_path, config()) as tracker:
        for step in (1, 2, 3):
            tracker.log({"step": step, "loss": 1.0})
    # Resumed from a checkpoint at step 2: step 3 is trained and logged again.
    with Tracker(tmp_path, config()) as tracker:
        tracker.log({"step": 3, "loss": 0.5})
        tracker.log({"step": 4, "loss": 0.4})
    assert len(lines(tmp_path)) == 5
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 1.0},
                                      {"step": 3, "loss": 0.5}, {"step": 4, "loss": 0.4}]


def test_non_main_rank_writes_nothing(tmp_path):
    tracker = Tracker(tmp_path / "run", config(report_to="tensorboard"), is_main=False)
    tracker.log({"step": 1, "loss": 1.0})
    tracker.close()
    assert not (tmp_path / "run").exists()


def test_row_needs_a_step(tmp_path):
    with pytest.raises(ValueError, match="step"):
        Tracker(tmp_path, config()).log({"loss": 1.0})


def test_read_metrics_splits_mixed_rows_and_skips_a_cut_last_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0, "eval_loss": 2.0}\n{"step": 2, "lo')
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}, {"step": 1, "eval_loss": 2.0}]


def test_read_metrics_errors_are_one_line(tmp_path):
    with pytest.raises(PreftuneError, match="no metrics file"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(PreftuneError, match="empty"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('not json\n{"step": 1, "loss": 1.0}\n')
    with pytest.raises(PreftuneError, match="line 1"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("[1, 2]\n")  # its one line would pass for a cut last row
    with pytest.raises(PreftuneError, match=r"holds no metrics row \(line 1, its last, is not one\)"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_bytes(b"\x9d\x00\xff\n")
    with pytest.raises(PreftuneError, match="not UTF-8 text"):
        read_metrics(tmp_path)


def test_parse_sinks():
    assert parse_sinks("") == [] and parse_sinks("none") == []
    assert parse_sinks(" TensorBoard, wandb,tensorboard") == ["tensorboard", "wandb"]
    with pytest.raises(ConfigError, match="unknown sink 'mlflow'"):
        parse_sinks("mlflow")


def test_missing_sink_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    with pytest.raises(ConfigError, match=r"pip install preftune\[tensorboard\]"):
        Tracker(tmp_path, config(report_to="tensorboard"))
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"pip install preftune\[wandb\]"):
        Tracker(tmp_path, config(report_to="wandb"))


def test_tensorboard_sink_gets_grouped_scalars(tmp_path, monkeypatch):
    calls = []

    class SummaryWriter:
        def __init__(self, log_dir):
            calls.append(("open", log_dir))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    with Tracker(tmp_path, config(report_to="tensorboard")) as tracker:
        tracker.log({"step": 5, "loss": 0.5, "note": "text is not a scalar"})
        tracker.log({"step": 5, "eval_loss": 0.6})
    assert calls == [("open", str(tmp_path / "tensorboard")), ("train/loss", 0.5, 5), ("eval/loss", 0.6, 5), ("close",)]


@pytest.mark.parametrize("env, mode", [(None, "offline"), ("online", None)])
def test_wandb_is_offline_unless_the_user_says(tmp_path, monkeypatch, env, mode):
    seen = {}

    class Run:
        def log(self, scalars, step):
            seen.setdefault("logged", []).append((scalars, step))

        def finish(self):
            seen["finished"] = True

    def init(**kw):
        seen.update(kw)
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    if env is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", env)
    with Tracker(tmp_path, config(report_to="wandb")) as tracker:
        tracker.log({"step": 3, "loss": 0.25})
    assert seen["mode"] == mode and seen["config"]["stage"] == "dpo"
    assert seen["logged"] == [({"loss": 0.25}, 3)] and seen["finished"]
