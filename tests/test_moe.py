"""Mixture-of-experts policies train with their router load-balancing loss, as TRL's DPOTrainer adds it.

Expected values come from the model's own forward (`output_router_logits=True` gives `aux_loss`) on each answer
row's sequence `prompt + answer`, padded with a mask: the batch TRL's concatenated forward would see.
"""

from __future__ import annotations

import copy

import pytest
import torch
from families import tiny
from test_families import SHAPES, batch_of
from tinylm import fact_pairs, make_tokenizer

import preftune
from preftune.config import TrainConfig
from preftune.dist.env import DistEnv
from preftune.dist.logp_module import AnswerLogpModule
from preftune.errors import ConfigError
from preftune.logps import answer
from preftune.logps.answer import answer_logps
from preftune.training.loop import train_step
from preftune.training.objectives import PreferenceObjective
from preftune.training.reference import FrozenReference

MOE = ("mixtral", "qwen3-moe")


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(answer, "_WARNED", set())


def model_router_loss(m, batch) -> torch.Tensor:
    """The model's own aux_loss over the answer rows' sequences `prompt + answer` (a plain whole-model forward)."""
    rows = [torch.cat([batch.prompt_ids[r // batch.k, : batch.prompt_lens[r // batch.k]],
                       batch.answer_ids[r, : batch.answer_lens[r]]]) for r in range(batch.answer_ids.shape[0])]
    ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True)
    return m(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss


def router_grads(m) -> dict[str, torch.Tensor]:
    """Gradients of the routers' weights (`mlp.gate` in Mixtral and Qwen3-MoE)."""
    grads = {n: p.grad.detach().clone() for n, p in m.named_parameters() if n.endswith("mlp.gate.weight")}
    assert len(grads) == m.config.num_hidden_layers
    return grads


@pytest.mark.usefixtures("sharing_is_cheap")
@pytest.mark.parametrize("family", MOE)
def test_every_layout_gives_the_models_own_router_loss_and_gradient(family):
    m = tiny(family)
    batch = batch_of(SHAPES)
    m.zero_grad(set_to_none=True)
    expected = model_router_loss(m, batch)
    expected.backward()
    expected_grads = router_grads(m)
    assert expected_grads and all(g.abs().max() > 0 for g in expected_grads.values())
    plain_logps = answer_logps(m, batch, prefix_sharing=False).logps.detach()
    for sharing, trim, checkpointed in [(True, True, False), (True, False, False), (False, True, False),
                                        (False, False, False), (True, True, True)]:
        if checkpointed:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.zero_grad(set_to_none=True)
        out = answer_logps(m, batch, prefix_sharing=sharing, trim_padding=trim, router_aux=True)
        torch.testing.assert_close(out.aux_loss, expected, rtol=1e-5, atol=0)
        torch.testing.assert_close(out.logps.detach(), plain_logps, rtol=1e-5, atol=1e-5)  # log-probs unchanged
        out.aux_loss.backward()
        for name, g in router_grads(m).items():
            assert (g - expected_grads[name]).abs().max() <= 1e-4 * expected_grads[name].abs().max(), name
    assert answer_logps(m, batch).aux_loss is None  # not asked for (the reference, evaluation)


def _step(m, ref, micro, coef: float):
    cfg = TrainConfig(stage="dpo", model="m", data="d", output_dir="o", beta=0.1)
    policy = AnswerLogpModule(m, router_aux=coef != 0)
    objective = PreferenceObjective(cfg, router_aux_coef=coef)
    m.zero_grad(set_to_none=True)
    params = [p for p in m.parameters() if p.requires_grad]
    metrics, _, _ = train_step(policy, FrozenReference(ref), objective, micro, DistEnv(), params, cfg)
    return metrics, router_grads(m)


@pytest.mark.parametrize("family", MOE)
def test_a_dpo_step_adds_coef_times_the_units_weighted_router_loss(family):
    m = tiny(family)
    ref = copy.deepcopy(tiny(family, seed=1)).eval()
    micro = [batch_of(SHAPES[:3], seed=1), batch_of(SHAPES[3:], seed=2)]  # 3 pairs, then 2
    coef = 0.5
    # The step divides its summed losses by its 5 pairs: each micro-batch's router loss counts by its pairs.
    expected = (3 * model_router_loss(m, micro[0]) + 2 * model_router_loss(m, micro[1])) / 5
    m.zero_grad(set_to_none=True)
    expected.backward()
    expected_grads = router_grads(m)
    with_aux, grads = _step(m, ref, micro, coef)
    without, grads_off = _step(m, ref, micro, 0.0)
    assert "aux_loss" not in without
    assert with_aux["aux_loss"] == pytest.approx(expected.item(), rel=1e-6)
    assert with_aux["loss"] - without["loss"] == pytest.approx(coef * with_aux["aux_loss"], rel=1e-6)
    assert {k: v for k, v in with_aux.items() if k not in ("loss", "aux_loss")} == pytest.approx(
        {k: v for k, v in without.items() if k != "loss"}, rel=1e-6)
    for name, g in grads.items():
        router_part = g - grads_off[name]
        assert router_part.abs().max() > 0, name
        assert (router_part - coef * expected_grads[name]).abs().max() <= 1e-4 * router_part.abs().max(), name


SETTINGS = {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "max_length": 64, "device": "cpu", "dtype": "float32",
            "seed": 3}


def _moe_run(**fields):
    tok = make_tokenizer()
    m = tiny("mixtral", vocab_size=len(tok))  # router_aux_loss_coef 0.02 in its config
    return preftune.train("dpo", model=m, tokenizer=tok, data=fact_pairs(8), **SETTINGS, **fields).history


def test_an_moe_dpo_run_logs_its_router_loss_every_step_and_coef_zero_turns_it_off():
    default, doubled, off = _moe_run(), _moe_run(router_aux_loss_coef=0.04), _moe_run(router_aux_loss_coef=0)
    assert len(default) == len(doubled) == len(off) == 2
    assert all(row["aux_loss"] > 0 for row in default + doubled)
    assert all("aux_loss" not in row for row in off)
    # Step 1 starts from the same weights and batch: the losses differ by the config's coefficient times it.
    assert default[0]["aux_loss"] == pytest.approx(doubled[0]["aux_loss"], rel=1e-6)
    assert default[0]["loss"] - off[0]["loss"] == pytest.approx(0.02 * default[0]["aux_loss"], rel=1e-5)
    assert doubled[0]["loss"] - off[0]["loss"] == pytest.approx(0.04 * default[0]["aux_loss"], rel=1e-5)
    assert default[0]["grad_norm"] != off[0]["grad_norm"]


def test_a_dense_model_logs_no_router_loss_and_refuses_a_coefficient(tiny_model_dir):
    history = preftune.train("dpo", model=tiny_model_dir, data=fact_pairs(8), **SETTINGS).history
    assert all("aux_loss" not in row for row in history)
    with pytest.raises(ConfigError, match="router_aux_loss_coef"):
        preftune.train("dpo", model=tiny_model_dir, data=fact_pairs(8), router_aux_loss_coef=0.1, **SETTINGS)
    with pytest.raises(ConfigError, match="must not be negative"):
        TrainConfig(stage="dpo", model="m", data="d", output_dir="o", router_aux_loss_coef=-1.0)


def _llama4():
    import transformers as t

    cfg = t.Llama4TextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, intermediate_size_mlp=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                             num_local_experts=2, num_experts_per_tok=1, interleave_moe_layer_step=1,
                             max_position_embeddings=128, pad_token_id=0, router_aux_loss_coef=0.001)
    return t.Llama4ForCausalLM(cfg).float()


def test_a_router_loss_the_modeling_code_does_not_define_is_left_out_or_refused(caplog):
    """Llama 4's config weighs a router loss (0.001) that its modeling code has no function for: DPO and SFT died
    with an AttributeError inside the loss."""
    import logging

    from preftune.errors import ConfigError
    from preftune.logps.router import router_aux_coef

    model = _llama4()
    with caplog.at_level(logging.WARNING, logger="preftune"):
        assert router_aux_coef(model, None) == 0.0
    assert any("weighs a router loss its modeling code does not define" in r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigError, match=r"^router_aux_loss_coef: Llama4ForCausalLM's modeling code has no "
                                          r"load-balancing loss"):
        router_aux_coef(model, 0.01)


def test_router_training_noise_is_off_with_dropout_and_routing_thresholds_are_kept():
    import transformers as t

    from preftune.models.load import disable_dropout

    cfg = t.PhimoeConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=2,
                         input_jitter_noise=0.01, router_jitter_noise=0.01)
    model = t.PhimoeForCausalLM(cfg)
    disable_dropout(model)
    blocks = [m for m in model.modules() if hasattr(m, "input_jitter_noise")]
    assert blocks and all(m.input_jitter_noise == 0.0 for m in blocks)
    assert all(m.router_jitter_noise == 0.01 for m in model.modules() if hasattr(m, "router_jitter_noise"))
