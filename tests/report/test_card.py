import shlex

import yaml

from preftune.config import TrainConfig
from preftune.report.card import write_model_card
from preftune.report.plots import write_plots


def front_matter(text):
    assert text.startswith("---\n")
    block, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(block), body


def test_dpo_card_with_plots(make_run):
    run = make_run("dpo", eval_every=10)
    write_plots(run)
    config = TrainConfig(stage="dpo", model="org/base-7b", data="prefs.jsonl", output_dir=str(run), lora_r=16)
    argv = ["preftune", "dpo", "--model", "org/base-7b", "--data", "my prefs.jsonl"]
    path = write_model_card(run, config, {"loss": 0.123456, "eval_reward_accuracy": 0.8, "steps": 60}, argv)
    assert path == run / "README.md"
    meta, body = front_matter(path.read_text())
    assert meta == {"base_model": "org/base-7b", "datasets": ["prefs.jsonl"], "library_name": "preftune",
                    "pipeline_tag": "text-generation", "tags": ["preftune", "dpo", "lora"]}
    assert "| loss | 0.1235 |" in body and "| steps | 60 |" in body
    assert "![loss](plots/loss.png)" in body and "plots/eval.png" in body
    assert body.index("plots/loss.png") < body.index("plots/eval.png")
    assert shlex.join(argv) in body and "'my prefs.jsonl'" in body
    config_block = body.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert TrainConfig.from_dict(yaml.safe_load(config_block)) == config


def test_sft_card_from_a_local_model_without_plots(tmp_path):
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    config = TrainConfig(stage="sft", model=str(model_dir), data="d.jsonl", output_dir=str(tmp_path))
    path = write_model_card(tmp_path, config, {}, "preftune sft --config run.yaml")
    meta, body = front_matter(path.read_text())
    assert "base_model" not in meta  # not a Hub id: the Hub would reject the card
    assert meta["tags"] == ["preftune", "sft"]
    assert str(model_dir) in body and "No metrics were recorded." in body
    assert "preftune plot" in body and "![" not in body
    assert "```bash\npreftune sft --config run.yaml\n```" in body


def test_table_cells_cannot_break_the_table(tmp_path):
    config = TrainConfig(stage="dpo", model="m", data="d.jsonl", output_dir="out")
    body = write_model_card(tmp_path, config, {"note": "a|b\nc"}, "x").read_text()
    assert "| note | a\\|b c |" in body
