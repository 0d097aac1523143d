import argparse

import pytest

from preftune.cli.plot import register
from preftune.errors import PreftuneError


def parse(*argv):
    parser = argparse.ArgumentParser(prog="preftune")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_plot_rerenders_from_metrics(make_run, capsys):
    run = make_run("sft", eval_every=5)
    args = parse("plot", str(run))
    assert args.func(args) == 0
    assert capsys.readouterr().out.splitlines() == [str(run / "plots" / "loss.png")]
    assert (run / "plots" / "loss.png").stat().st_size > 0


def test_plot_without_metrics_is_one_clear_line(tmp_path):
    args = parse("plot", str(tmp_path / "nowhere"))
    with pytest.raises(PreftuneError) as err:
        args.func(args)
    assert "\n" not in str(err.value) and "metrics" in str(err.value)
