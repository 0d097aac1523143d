"""The README's configuration reference lists every config field, so the docs cannot fall behind the code."""

from dataclasses import fields
from pathlib import Path

from preftune.config import TrainConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_config_field_is_documented():
    text = README.read_text()
    missing = [f.name for f in fields(TrainConfig) if f"| `{f.name}` |" not in text]
    assert not missing, f"README config reference lacks {missing}"


def python_example() -> str:
    """The code block of the README's "From Python" section."""
    section = README.read_text().split("## From Python", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_from_python_example_runs(tmp_path, monkeypatch, capsys):
    """Executed as written, with the Hub model swapped for a tiny random one (tests never download)."""
    from tinylm import make_tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preftune.demo.base import tiny_llama

    tok = make_tokenizer()
    tiny = tiny_llama(len(tok), hidden=32, layers=2, heads=4, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                      bos_id=tok.bos_token_id)
    hub_name = "Qwen/Qwen2.5-0.5B-Instruct"
    real_model, real_tokenizer = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda name, *a, **k: tiny if name == hub_name else real_model(name, *a, **k))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained",
                        lambda name, *a, **k: tok if name == hub_name else real_tokenizer(name, *a, **k))
    monkeypatch.chdir(tmp_path)
    code = python_example()
    assert hub_name in code
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)

    sft, dpo, report = scope["sft"], scope["dpo"], scope["report"]
    assert sft.model is tiny and dpo.model is tiny                   # trained in place, as the README says
    assert [p.name for p in tmp_path.iterdir()] == ["runs"]          # the DPO run in memory wrote nothing
    assert (tmp_path / "runs" / "capitals-sft" / "results.json").is_file()
    assert len(sft.history) == 20 and len(dpo.history) == 30 and dpo.output_dir is None
    assert report.summary["pairs"] == len(report.rows) == 8
    printed = capsys.readouterr().out.splitlines()
    assert printed[:3] == [f"step {r['step']}: loss {r['loss']:.4f}, reward accuracy {r['reward_accuracy']:.2f}"
                           for r in dpo.history if r["step"] % 10 == 0]
