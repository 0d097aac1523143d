"""LoRA: adapters on every block linear, the reference as adapters-off (one copy of the base weights), the
adapter run folder, the merged model, QLoRA's CUDA-only guard and a clear error without peft."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from tinylm import fact_pairs, make_tokenizer, write_jsonl
from oracle import full_logits_logps

from preftune.cli import main
from preftune.config import TrainConfig
from preftune.data.batching import collate
from preftune.data.load import load_pairs
from preftune.data.tokenize import tokenize_all
from preftune.dist.env import DistEnv
from preftune.errors import ConfigError, PreftuneError
from preftune.models import lora
from preftune.models.load import load_model
from preftune.models.precision import Precision
from preftune.training import setup as setup_mod
from preftune.training.reference import AdaptersOffReference, FrozenReference

CPU = torch.device("cpu")
FP32 = Precision(torch.float32, torch.float32)


def cfg_for(model_dir, data, out, **kw) -> TrainConfig:
    base = dict(stage="dpo", model=str(model_dir), data=str(data), output_dir=str(out), lora_r=4, max_steps=2,
                batch_size=4, dtype="float32", device="cpu")
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("lora-data") / "pairs.jsonl", fact_pairs(16))


def a_batch(model_dir, pairs_file, n=4):
    tok = make_tokenizer()
    records, _ = load_pairs(str(pairs_file))
    items, _ = tokenize_all(tok, records[:n], max_length=64)
    return collate(items, tok.pad_token_id)


def base_model(model_dir):
    return load_model(str(model_dir), device=CPU, dtype=torch.float32)


def with_trained_looking_adapters(model_dir, cfg):
    """A peft model whose adapters change the outputs (fresh LoRA B matrices are zero and change nothing)."""
    model = lora.add_adapters(base_model(model_dir), cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def test_all_linear_targets_every_block_linear_but_not_the_output_head(tiny_model_dir, tmp_path):
    plain = base_model(tiny_model_dir)
    expected = {name for name, m in plain.named_modules()
                if isinstance(m, torch.nn.Linear) and ".layers." in name}
    assert expected and "lm_head" not in expected
    model = lora.add_adapters(base_model(tiny_model_dir), cfg_for(tiny_model_dir, "x", tmp_path))
    adapted = {name.removeprefix("base_model.model.").removesuffix(".lora_A")
               for name, _ in model.named_modules() if name.endswith(".lora_A")}
    assert adapted == expected
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_named_targets_and_an_unknown_name(tiny_model_dir, tmp_path):
    model = lora.add_adapters(base_model(tiny_model_dir),
                              cfg_for(tiny_model_dir, "x", tmp_path, lora_targets="q_proj, v_proj"))
    adapted = {n.split(".")[-2] for n, _ in model.named_modules() if n.endswith(".lora_A")}
    assert adapted == {"q_proj", "v_proj"}
    with pytest.raises(ConfigError, match="lora_targets"):
        lora.add_adapters(base_model(tiny_model_dir), cfg_for(tiny_model_dir, "x", tmp_path, lora_targets="nope"))


@pytest.mark.parametrize("prefix_sharing", [True, False])
def test_adapters_off_reference_is_the_base_model(tiny_model_dir, pairs_file, tmp_path, prefix_sharing):
    batch = a_batch(tiny_model_dir, pairs_file)
    model = with_trained_looking_adapters(tiny_model_dir, cfg_for(tiny_model_dir, pairs_file, tmp_path,
                                                                  lora_dropout=0.5))
    model.train()
    ref = AdaptersOffReference(model, prefix_sharing=prefix_sharing, chunk_size=7)
    got = ref.logps(batch)
    with torch.no_grad():
        expected = full_logits_logps(base_model(tiny_model_dir), batch).logps
        adapted = full_logits_logps(model.eval(), batch).logps
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (adapted - expected).abs().max() > 1e-2  # the adapters were on in between, and matter
    model.train()
    ref.logps(batch)
    assert model.training  # the reference leaves the policy in training mode


def _unique_storage_numel(*models) -> int:
    seen, total = set(), 0
    for m in models:
        for t in list(m.parameters()) + list(m.buffers()):
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes() // t.element_size()
    return total


def test_lora_setup_holds_one_copy_of_the_base_weights(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    loads = []
    real = setup_mod.load_model
    monkeypatch.setattr(setup_mod, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    s = setup_mod.build(cfg_for(tiny_model_dir, pairs_file, tmp_path), device=CPU, precision=FP32,
                        env=DistEnv())
    assert len(loads) == 1
    assert isinstance(s.reference, AdaptersOffReference)
    base_numel = sum(p.numel() for p in base_model(tiny_model_dir).parameters())
    lora_numel = sum(p.numel() for n, p in s.policy.named_parameters() if "lora_" in n)
    held = _unique_storage_numel(s.policy, s.reference.model)
    # Buffers (rotary frequencies) are tiny; a second copy of the weights would add base_numel.
    assert base_numel + lora_numel <= held < base_numel + lora_numel + base_numel // 10


def test_lora_with_an_explicit_ref_model_uses_a_frozen_copy(tiny_model_dir, pairs_file, tmp_path):
    s = setup_mod.build(cfg_for(tiny_model_dir, pairs_file, tmp_path, ref_model=str(tiny_model_dir)), device=CPU,
                        precision=FP32, env=DistEnv())
    assert type(s.reference) is FrozenReference
    assert not any(p.requires_grad for p in s.reference.model.parameters())


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_lora_run_writes_adapter_and_a_merged_model_that_agree(tiny_model_dir, pairs_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    assert main(["dpo", "--model", str(tiny_model_dir), "--data", str(pairs_file), "--output-dir", str(out),
                 "--max-steps", "3", "--batch-size", "4", "--lr", "1e-2", "--lora-r", "4", "--merge",
                 "--dtype", "float32", "--device", "cpu", "--quiet"]) == 0
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert not (out / "model.safetensors").exists()  # the adapter, not a second full model
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4

    batch = a_batch(tiny_model_dir, pairs_file)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    adapter = PeftModel.from_pretrained(base_model(tiny_model_dir), str(out)).eval()
    with torch.no_grad():
        m, a = full_logits_logps(merged, batch).logps, full_logits_logps(adapter, batch).logps
        b = full_logits_logps(base_model(tiny_model_dir), batch).logps
    torch.testing.assert_close(m, a, atol=1e-5, rtol=0)
    assert (a - b).abs().max() > 1e-2  # training moved the adapter

    rows = tmp_path / "rows.jsonl"
    assert main(["eval", "--model", str(out), "--data", str(pairs_file), "--limit", "4", "--output",
                 str(rows), "--device", "cpu", "--dtype", "float32"]) == 0
    chosen = [json.loads(line)["policy_chosen_logp"] for line in rows.read_text().splitlines()]
    torch.testing.assert_close(torch.tensor(chosen), a[0::2], atol=1e-4, rtol=0)


def test_a_failed_merge_keeps_the_finished_run_and_resume_writes_it(tiny_model_dir, pairs_file, tmp_path,
                                                                    monkeypatch, capsys):
    """The merge ran before results.json, so a merge that failed (its base moved, no network) counted as a failed
    run, and the folder of a run without checkpoints went whole: the trained adapter with it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import preftune.models.load as load_mod

    def gone(*args, **kwargs):
        raise PreftuneError("base_model_name_or_path: folder not found")

    out = tmp_path / "run"
    command = ["dpo", "--model", str(tiny_model_dir), "--data", str(pairs_file), "--output-dir", str(out),
               "--max-steps", "2", "--batch-size", "4", "--lr", "1e-2", "--lora-r", "4", "--merge",
               "--dtype", "float32", "--device", "cpu", "--quiet"]
    with monkeypatch.context() as patch:
        patch.setattr(load_mod, "load_adapter_model", gone)
        assert main(command) == 2
    err = capsys.readouterr().err
    assert "the run finished and its adapter is saved there, but merged/ was not written" in err
    assert "--resume" in err and "Traceback" not in err
    assert (out / "adapter_model.safetensors").is_file() and (out / "results.json").is_file()
    assert not (out / "merged").exists() and not (out / ".merged.part").exists()
    assert main([*command, "--resume"]) == 0
    batch = a_batch(tiny_model_dir, pairs_file)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    adapter = PeftModel.from_pretrained(base_model(tiny_model_dir), str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(full_logits_logps(merged, batch).logps, full_logits_logps(adapter, batch).logps,
                                   atol=1e-5, rtol=0)


def test_missing_peft_is_one_clear_error(tiny_model_dir, pairs_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    with pytest.raises(PreftuneError, match=r"pip install preftune\[lora\]"):
        lora.require_peft()
    code = main(["dpo", "--model", str(tiny_model_dir), "--data", str(pairs_file), "--output-dir",
                 str(tmp_path / "r"), "--lora-r", "4", "--device", "cpu"])
    assert code == 2
    assert "pip install preftune[lora]" in capsys.readouterr().err


def test_4bit_off_cuda_fails_before_any_model_loads(pairs_file, tmp_path, capsys):
    code = main(["dpo", "--model", str(tmp_path / "no-such-model"), "--data", str(pairs_file), "--output-dir",
                 str(tmp_path / "r"), "--lora-r", "4", "--load-in-4bit", "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err
    assert "CUDA" in err and "no-such-model" not in err  # refused on the flag, not on the (missing) model
