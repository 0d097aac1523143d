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


def test_base_model_is_followed_back_through_local_runs(tmp_path):
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "config.yaml").write_text(yaml.safe_dump({"stage": "sft", "model": "Qwen/Qwen2.5-0.5B"}))
    config = TrainConfig(stage="dpo", model=str(tmp_path / "sft"), data=str(tmp_path / "data" / "prefs.jsonl.gz"),
                         output_dir=str(tmp_path / "dpo"))
    meta, _ = front_matter(write_model_card(tmp_path, config, {}, "x").read_text())
    assert meta["base_model"] == "Qwen/Qwen2.5-0.5B"
    assert meta["datasets"] == ["prefs.jsonl.gz"]  # the file's name, not a path on this machine
    hub = TrainConfig(stage="dpo", model="m", data="HuggingFaceH4/ultrafeedback_binarized", output_dir="o")
    meta, _ = front_matter(write_model_card(tmp_path, hub, {}, "x").read_text())
    assert meta["datasets"] == ["HuggingFaceH4/ultrafeedback_binarized"]


def test_results_are_the_eval_metrics_and_data_counts_are_shown(tmp_path):
    config = TrainConfig(stage="dpo", model="m", data="d.jsonl", output_dir="o")
    final = {"loss": 0.1, "reward_accuracy": 1.0, "eval_loss": 0.68, "eval_reward_accuracy": 0.59,
             "mean_loss": 0.3, "mean_reward_accuracy": 0.8, "mean_over_steps": 10}
    stats = {"train": {"total": 100, "truncated": 7, "dropped": 3}, "skipped_records": 2, "format": "hh",
             "eval": {"total": 10, "truncated": 1, "dropped": 0}}
    body = write_model_card(tmp_path, config, final, "x", data_stats=stats).read_text()
    results = body.split("## Results\n\n", 1)[1].split("##", 1)[0]
    assert "- eval_reward_accuracy: 0.59" in results and "- eval_loss: 0.68" in results
    assert "reward_accuracy: 1" not in results
    data = body.split("## Data\n\n", 1)[1].split("##", 1)[0]
    assert "100, of which 7 truncated" in data and "3 dropped" in data and "skipped as malformed: 2" in data


def test_without_eval_data_the_headline_is_a_mean_over_the_last_steps(tmp_path):
    from preftune.report.card import headline, headline_text

    final = {"loss": 0.1, "reward_accuracy": 1.0, "mean_loss": 0.3, "mean_reward_accuracy": 0.8,
             "mean_over_steps": 10}
    assert headline(final) == {"mean_loss": 0.3, "mean_reward_accuracy": 0.8}
    assert headline_text(final) == ("mean_loss=0.3000  mean_reward_accuracy=0.8000  "
                                    "(training, mean of the last 10 steps)")
