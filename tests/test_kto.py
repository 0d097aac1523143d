"""KTO: the loss and its KL estimate by hand, the mismatched answers, the objective's metrics, the reference
strategies, exact resume, and parity with TRL 1.16's KTOTrainer on the first step."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tinylm import make_model_dir, write_jsonl
from test_resume import assert_same_run, interrupted_then_resumed, metric_rows
from preftune.config import TrainConfig
from preftune.data.batching import collate
from preftune.data.load import PairedData, load_unpaired
from preftune.data.tokenize import TokenizedUnpaired, assign_kl_answers
from preftune.errors import ConfigError
from preftune.kto_loss import imbalance_advice, kl_estimate, kto_loss
from preftune.logps.layouts import AnswerLogps
from preftune.training import loop as train
from preftune.training.kto_objective import KTOObjective


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ----------------------------------------------------------------------------------------------- maths by hand
def test_kl_estimate_is_the_clamped_detached_mean_of_mismatched_log_ratios():
    policy = torch.tensor([-3.0, -5.0, -2.0], requires_grad=True)
    ref = torch.tensor([-4.0, -4.5, -2.5])
    kl = kl_estimate(policy, ref)
    assert kl.item() == pytest.approx((1.0 - 0.5 + 0.5) / 3)
    assert not kl.requires_grad
    # A negative mean is clamped at zero; the clamp comes after the mean over ranks (here: a mean of two ranks).
    assert kl_estimate(ref, policy.detach()).item() == 0.0
    two_ranks = kl_estimate(policy, ref, rank_mean=lambda t: (t + (-1.0)) / 2)
    assert two_ranks.item() == 0.0  # (1/3 - 1) / 2 < 0
    assert kl_estimate(policy, ref, rank_mean=lambda t: (t + 2.0) / 2).item() == pytest.approx((1 / 3 + 2) / 2)


def test_kto_loss_by_hand():
    beta, kl, wd, wu = 0.5, 0.3, 1.5, 0.7
    policy = torch.tensor([-10.0, -12.0, -7.0, -9.0], dtype=torch.float64)
    ref = torch.tensor([-11.0, -11.0, -7.5, -8.0], dtype=torch.float64)
    labels = torch.tensor([True, False, True, False])
    losses, rewards = kto_loss(policy, ref, labels, torch.tensor(kl, dtype=torch.float64), beta=beta,
                               desirable_weight=wd, undesirable_weight=wu)
    r = [1.0, -1.0, 0.5, -1.0]  # log-ratios
    expected = [wd * (1 - sig(beta * (r[0] - kl))), wu * (1 - sig(beta * (kl - r[1]))),
                wd * (1 - sig(beta * (r[2] - kl))), wu * (1 - sig(beta * (kl - r[3])))]
    assert losses.tolist() == pytest.approx(expected, abs=1e-12)
    assert rewards.tolist() == pytest.approx([beta * x for x in r])
    assert not rewards.requires_grad


def test_kto_loss_gradient_pushes_desirable_up_and_undesirable_down():
    policy = torch.tensor([-10.0, -10.0], requires_grad=True)
    losses, _ = kto_loss(policy, torch.tensor([-10.0, -10.0]), torch.tensor([True, False]), torch.tensor(0.0))
    losses.sum().backward()
    # d/dr (1 - σ(βr)) = -β σ(1-σ) = -0.1 * 0.25 at r = 0; the undesirable term has the opposite sign.
    assert policy.grad.tolist() == pytest.approx([-0.025, 0.025])


def test_imbalance_advice_follows_the_papers_range():
    assert imbalance_advice(10, 10, 1.0, 1.0) is None
    assert imbalance_advice(12, 10, 1.0, 1.0) is None         # ratio 1.2, inside [1, 4/3]
    assert imbalance_advice(30, 10, 1.0, 1.0) is not None     # ratio 3
    line = imbalance_advice(10, 30, 1.0, 1.0)                  # ratio 1/3: raise desirable_weight to [3, 4]
    assert "--desirable-weight in [3, 4]" in line and "--undesirable-weight in [0.25, 0.333]" in line
    assert imbalance_advice(10, 30, 3.5, 1.0) is None          # 3.5*10 / 30 = 1.17
    assert imbalance_advice(5, 0, 1.0, 1.0).startswith("kto: all 5 examples are desirable and none undesirable")
    assert "pushes those answers down" in imbalance_advice(0, 3, 1.0, 1.0)


# ------------------------------------------------------------------------------------------- data and batches
def test_kl_answers_rotate_by_one_within_each_chunk():
    encoded = [([0], [10 + i]) for i in range(5)]
    assert assign_kl_answers(encoded, 2) == [[11], [10], [13], [12], [14]]
    assert assign_kl_answers(encoded, 3) == [[12], [10], [11], [14], [13]]


def test_paired_file_needs_the_flag_and_then_gives_both_answers(tmp_path):
    rows = [{"prompt": "q", "chosen": " a", "rejected": " b"}, {"prompt": "r", "chosen": " c", "rejected": " d"},
            {"prompt": "s", "chosen": " e", "rejected": " f"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(PairedData, match="--paired-as-unpaired"):
        load_unpaired(str(path))
    examples, _ = load_unpaired(str(path), paired_as_unpaired=True)
    # TRL's unpair_preference_dataset order: every chosen answer, then every rejected one.
    assert [(e.prompt, e.completion, e.label) for e in examples] == [
        ("q", " a", True), ("r", " c", True), ("s", " e", True), ("q", " b", False), ("r", " d", False),
        ("s", " f", False)]
    assert [e.where for e in examples][::3] == [f"{path} line 1 (chosen)", f"{path} line 1 (rejected)"]
    # So no example's KL answer, the previous example's answer in its batch, is its own pair's other answer.
    kl = assign_kl_answers([([0], [i]) for i in range(6)], 6)
    assert all(examples[i].prompt != examples[j[0]].prompt for i, j in enumerate(kl))


def test_kto_batch_layout_and_objective_metrics():
    items = [TokenizedUnpaired([1, 2], [3], [4, 5], True, index=0), TokenizedUnpaired([6], [7, 8], [3], False, index=1),
             TokenizedUnpaired([9], [4, 5], [7, 8], True, index=2)]
    batch = collate(items, pad_id=0)
    assert batch.k == 2 and batch.labels.tolist() == [True, False, True]
    assert batch.answer_ids.tolist() == [[3, 0], [4, 5], [7, 8], [3, 0], [4, 5], [7, 8]]
    cfg = TrainConfig(stage="kto", beta=0.2, desirable_weight=2.0, batch_size=3)
    # rows: own, KL answer for each example
    policy = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0, -6.0])
    ref = torch.tensor([-1.5, -2.5, -2.0, -4.5, -5.0, -5.0])
    c = KTOObjective(cfg)(AnswerLogps(policy, torch.tensor([1, 2, 2, 1, 2, 2])), batch, ref)
    kl = max(0.0, (0.5 + 0.5 - 1.0) / 3)
    r = [0.5, -1.0, 0.0]
    losses = [2 * (1 - sig(0.2 * (r[0] - kl))), 1 - sig(0.2 * (kl - r[1])), 2 * (1 - sig(0.2 * (r[2] - kl)))]
    assert c.loss_sum.item() == pytest.approx(sum(losses))
    m = KTOObjective(cfg).finish({k: float(v) for k, v in c.sums.items()}, 3.0)
    assert m["loss"] == pytest.approx(sum(losses) / 3)
    assert m["kl"] == pytest.approx(kl)
    assert m["desirable_reward"] == pytest.approx(0.2 * (0.5 + 0.0) / 2)
    assert m["undesirable_reward"] == pytest.approx(0.2 * -1.0)
    assert m["desirable_logp"] == pytest.approx((-1.0 - 5.0) / 2)
    assert m["undesirable_logp"] == pytest.approx(-3.0)
    assert m["reward_margin"] == pytest.approx(0.2 * 0.25 + 0.2)


@pytest.mark.parametrize("layout", ["packed", "shared", "plain"])
def test_kl_answers_run_without_autograd_and_change_nothing(layout, tiny_model_dir, monkeypatch):
    """KTO's KL answers (slot 1) feed a detached estimate: the policy computes them without a graph, and the
    log-probs and the gradient of the own answers are those of a pass that tracks every answer."""
    import dataclasses

    from preftune.logps import answer
    from preftune.logps.answer import answer_logps

    sharing = layout != "plain"
    if layout != "packed":
        monkeypatch.setattr(answer, "packs", lambda model: False)
    ran, real = [], answer.packed_logps
    monkeypatch.setattr(answer, "packed_logps", lambda m, b, **kw: ran.append(b.no_grad_slots) or real(m, b, **kw))
    from preftune.models.load import load_model

    model = load_model(str(tiny_model_dir), device=torch.device("cpu"), dtype=torch.float32)
    items = [TokenizedUnpaired([5, 6, 7], [8, 9], [10, 11, 12], True, index=0),
             TokenizedUnpaired([13], [14, 15, 16], [8, 9], False, index=1),
             TokenizedUnpaired([17, 18], [10, 11, 12], [14, 15, 16], True, index=2)]
    batch = collate(items, pad_id=0)
    assert batch.no_grad_slots == (1,)
    runs = []
    for b in (batch, dataclasses.replace(batch, no_grad_slots=())):
        model.zero_grad()
        out = answer_logps(model, b, prefix_sharing=sharing, trim_padding=True)
        out.logps[0::2].sum().backward()
        runs.append((out.logps.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (skipped, grads_skipped), (tracked, grads_tracked) = runs
    torch.testing.assert_close(skipped, tracked, rtol=1e-6, atol=1e-6)
    # Packed: the KL answers in a call of their own, without autograd; the tracked pass in one call (rows in
    # another arrangement: round-off differs, hence the gradients' absolute tolerance of 1e-6).
    assert ran == ([(0,), (), ()] if layout == "packed" else [])
    assert len(grads_skipped) == len(grads_tracked)
    for a, b in zip(grads_skipped, grads_tracked):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # In a training step's reused buffer the KL rows are projected first, so the own answers' backward finds
    # their log-probs still there and runs no second vocabulary product.
    from preftune.logps import projection
    from test_logprobs import counted_products

    products = counted_products(monkeypatch)
    model.zero_grad()
    with projection.reused_logits_buffer():
        out = answer_logps(model, batch, prefix_sharing=sharing, trim_padding=True)
        forward_products = len(products)
        out.logps[0::2].sum().backward()
    assert forward_products == 2 and len(products) == 2
    torch.testing.assert_close(out.logps.detach(), tracked, rtol=1e-6, atol=1e-6)
    for p, b in zip([p for p in model.parameters() if p.grad is not None], grads_tracked):
        torch.testing.assert_close(p.grad, b, rtol=1e-5, atol=1e-6)
    params = [p for p in model.parameters() if p.requires_grad]
    for b, tracked_kl in ((batch, False), (dataclasses.replace(batch, no_grad_slots=()), True)):
        kl_rows = answer_logps(model, b, prefix_sharing=sharing).logps[1::2]
        grads = torch.autograd.grad(kl_rows.sum(), params, allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in grads) == tracked_kl


def test_kto_needs_two_examples_a_batch():
    with pytest.raises(ConfigError, match="at least 2"):
        TrainConfig(stage="kto", batch_size=1)


# ------------------------------------------------------------------------------------------- runs
def unpaired_rows(n: int) -> list[dict]:
    prompts = ["the capital of france is", "Human: what is the capital of france ? Assistant:",
               "the sky is blue and the capital of france is", "cats chase mice . the capital of france is"]
    return [{"prompt": prompts[i % 4], "completion": " paris ." if i % 3 else " rome .", "label": bool(i % 3)}
            for i in range(n)]


@pytest.fixture(scope="module")
def unpaired_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("kto-data") / "unpaired.jsonl", unpaired_rows(24))


def kto_config(model: Path, data: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(stage="kto", model=str(model), data=str(data), output_dir=str(out), max_steps=6, batch_size=4,
                  lr=1e-3, warmup_steps=2, max_length=64, device="cpu", dtype="float32", quiet=True, seed=3)
    values.update(overrides)
    return TrainConfig(**values)


RESUME_CASES = {"plain": {}, "grad-accum": dict(grad_accum=2, batch_size=2), "eval": dict(eval_split=0.25, eval_every=2)}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_kto_resumed_run_equals_uninterrupted(case, tmp_path, monkeypatch, tiny_model_dir, unpaired_file):
    overrides = RESUME_CASES[case]
    train.run(kto_config(tiny_model_dir, unpaired_file, tmp_path / "whole", **overrides), command="preftune kto")
    interrupted_then_resumed(monkeypatch, kto_config(tiny_model_dir, unpaired_file, tmp_path / "parts", **overrides),
                             k=3)
    assert_same_run(tmp_path / "whole", tmp_path / "parts")
    rows = [r for r in metric_rows(tmp_path / "parts") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert rows[-1]["desirable_reward"] > rows[0]["desirable_reward"]  # training moved the rated answers


def test_reference_strategies_agree_on_the_first_step(tmp_path, tiny_model_dir, unpaired_file):
    """A frozen copy, the cached reference (--precompute-ref) and a separate --ref-model of the same weights give
    the same first-step loss and KL; a different reference gives another."""
    def first(name, **kw):
        train.run(kto_config(tiny_model_dir, unpaired_file, tmp_path / name, max_steps=3, **kw), command="preftune")
        # step 3: the policy has moved away from the reference (step 1 of the warmup runs at lr 0)
        return metric_rows(tmp_path / name)[2]

    copy = first("copy")
    cached = first("cached", precompute_ref=True, ref_cache_dir=str(tmp_path / "cache"))
    named = first("named", ref_model=str(tiny_model_dir))
    assert list((tmp_path / "cache").glob("*.safetensors"))
    assert copy["kl"] > 0
    for row in (cached, named):
        assert row["loss"] == pytest.approx(copy["loss"], abs=1e-6)
        assert row["kl"] == pytest.approx(copy["kl"], abs=1e-5)


def test_lora_uses_the_adapters_off_reference(tmp_path, tiny_model_dir, unpaired_file):
    train.run(kto_config(tiny_model_dir, unpaired_file, tmp_path / "lora", lora_r=4, max_steps=2),
              command="preftune")
    rows = metric_rows(tmp_path / "lora")
    # LoRA's B starts at zero: the policy is its reference on step 1, so every log-ratio and the KL are zero.
    assert rows[0]["kl"] == 0.0 and rows[0]["loss"] == pytest.approx(0.5)
    assert (tmp_path / "lora" / "adapter_model.safetensors").exists()


# ------------------------------------------------------------------------------------------- TRL 1.16
PARITY_DATA = {
    "text": [{"prompt": "the capital of france is", "completion": " paris .", "label": True},
             {"prompt": "cats chase mice . the capital of france is", "completion": " rome .", "label": False}],
    "chat": [{"prompt": [{"role": "user", "content": "what is the capital of spain ?"}],
              "completion": [{"role": "assistant", "content": "madrid is the capital of spain ."}], "label": False},
             {"prompt": [{"role": "user", "content": "the sky is blue and grass is"}],
              "completion": [{"role": "assistant", "content": "green ."}], "label": True}],
}


@pytest.fixture(scope="module")
def second_model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny-model-seed1"), seed=1)


def trl_first_step(policy_dir: Path, ref_dir: Path, rows: list[dict], beta: float, wd: float, wu: float) -> dict:
    """TRL's KTOTrainer loss and logged metrics on its first batch (both examples), before any update."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    tok = AutoTokenizer.from_pretrained(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32)
    args = KTOConfig(output_dir=str(policy_dir.parent / "trl-out"), per_device_train_batch_size=2, max_steps=1,
                     report_to=[], use_cpu=True, bf16=False, beta=beta, desirable_weight=wd, undesirable_weight=wu,
                     save_strategy="no", max_length=64)
    trainer = KTOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    model.train()
    loss = float(trainer.compute_loss(model, batch).detach())
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return {"loss": loss, "kl": logged["kl"], "desirable_reward": logged["rewards/chosen"],
            "undesirable_reward": logged["rewards/rejected"], "desirable_logp": logged["logps/chosen"],
            "undesirable_logp": logged["logps/rejected"]}


@pytest.mark.parametrize("layout", PARITY_DATA)
def test_first_step_equals_trl_kto_trainer(layout, tmp_path, tiny_model_dir, second_model_dir):
    pytest.importorskip("trl", reason="TRL is not installed")
    rows = PARITY_DATA[layout]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    klm = []
    # Both directions: one of them has a positive KL estimate (the other's is the same number negated, clamped).
    for policy, ref in ((tiny_model_dir, second_model_dir), (second_model_dir, tiny_model_dir)):
        expected = trl_first_step(policy, ref, rows, beta=0.3, wd=1.2, wu=0.8)
        out = tmp_path / f"run-{policy.name}"
        train.run(kto_config(policy, data, out, ref_model=str(ref), batch_size=2, max_steps=1, beta=0.3,
                             desirable_weight=1.2, undesirable_weight=0.8), command="preftune kto")
        ours = metric_rows(out)[0]
        for key, value in expected.items():
            assert ours[key] == pytest.approx(value, abs=1e-5), key
        klm.append(ours["kl"])
    assert max(klm) > 0.01 and min(klm) == 0.0


def test_python_api_trains_kto_in_memory(tiny_model_dir):
    """`preftune.train("kto", ...)` on objects and a list of dicts trains in memory, the model in place."""
    import preftune
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    result = preftune.train("kto", model=model, tokenizer=tok, data=unpaired_rows(8), max_steps=2, batch_size=4,
                            lr=1e-3, max_length=64, device="cpu", dtype="float32", seed=3)
    assert result.model is model and [row["step"] for row in result.history] == [1, 2]
    assert result.history[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    assert result.history[1]["loss"] < 0.5


def test_pairs_read_as_unpaired_report_their_margins_unused(tmp_path):
    """A margin column was read with each pair and then dropped without a word (DPO says it ignores it)."""
    import json

    from preftune.data.load import load_unpaired

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "a", "rejected": "b", "margin": 1.5}) + "\n"
                            for i in range(2)))
    examples, report = load_unpaired(str(path), paired_as_unpaired=True)
    assert len(examples) == 4 and report.unused_keys == {"margin": 2}
