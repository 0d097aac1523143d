import io

import pytest

from preftune.report import progress as progress_module
from preftune.report.progress import Progress

DPO_ROW = {"loss": 0.5, "reward_accuracy": 0.625, "reward_margin": 0.12, "pairs_per_s": 14.2}


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(progress_module.time, "monotonic", fake)
    return fake


def test_plain_lines_every_log_every_steps_and_the_last(capsys, clock):
    with Progress(10, quiet=False, stage="dpo", log_every=3) as bar:
        for step in range(1, 11):
            clock.now += 2.0
            bar.update(step, DPO_ROW)
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in out] == ["3/10", "6/10", "9/10", "10/10"]
    assert out[0] == "dpo step 3/10 | loss 0.5000 | acc 62.5% | margin 0.120 | 14.2 pairs/s | 0:14 left"
    assert out[-1].endswith("0:00 left")


def test_sft_shows_samples_per_second(capsys, clock):
    with Progress(2, quiet=False, stage="sft") as bar:
        bar.update(1, {"loss": 2.0, "samples_per_s": 30.0})
    assert capsys.readouterr().out == "sft step 1/2 | loss 2.0000 | 30.0 samples/s | -- left\n"


def test_resumed_run_measures_time_left_from_where_it_started(capsys, clock):
    clock.now = 100.0
    with Progress(100, quiet=False, stage="dpo") as bar:
        clock.now += 5.0
        bar.update(51, {"loss": 0.3})  # resumed at step 50: 1 step in 5 s, 49 to go
        clock.now += 60.0  # an evaluation pass, say
        clock.now += 8.0
        bar.update(53, {"loss": 0.3})  # 2 steps in 68 s since step 51's end: 47 to go
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("loss 0.3000 | 4:05 left") and out[1].endswith("26:38 left")


def test_quiet_prints_nothing(capsys, clock):
    with Progress(3, quiet=True, stage="dpo") as bar:
        for step in (1, 2, 3):
            bar.update(step, DPO_ROW)
        bar.print("eval: loss 0.4")
    assert capsys.readouterr().out == ""


def test_print_goes_between_lines(capsys, clock):
    with Progress(2, quiet=False, stage="dpo", log_every=1) as bar:
        bar.update(1, {"loss": 1.0})
        bar.print("checkpoint saved")
        bar.update(2, {"loss": 0.9})
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "checkpoint saved" and len(out) == 3


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_terminal_gets_a_live_bar(monkeypatch, clock):
    screen = Terminal()
    monkeypatch.setattr("sys.stdout", screen)
    with Progress(4, quiet=False, stage="dpo", log_every=100) as bar:
        for step in range(1, 5):
            clock.now += 1.0
            bar.update(step, DPO_ROW)
        bar.print("eval done")
    text = screen.getvalue()
    assert "4/4" in text and "acc 62.5%" in text and "eval done" in text
    assert "dpo step" not in text  # the plain lines are for logs only
