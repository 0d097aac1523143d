"""A frozen reference's input embedding narrowed to the run's token ids (models/narrow.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from families import VOCAB, tiny
from preftune.errors import ModelError
from preftune.models.load import freeze
from preftune.models.narrow import narrow_input_embedding, token_ids_of


def _frozen(family="llama"):
    model = tiny(family)
    freeze(model)
    return model


def test_lookups_of_kept_ids_give_the_same_bits_and_others_are_refused():
    model = _frozen()
    whole = copy.deepcopy(model)
    ids = torch.tensor([[5, 9, 9, 17, 3, 40], [40, 17, 5, 3, 3, 9]])
    hidden = model.config.hidden_size
    freed = narrow_input_embedding(model, torch.tensor([3, 5, 9, 17, 40, 5]))
    assert freed == (VOCAB - 5) * hidden * 4 - VOCAB * 8  # rows dropped, less the id -> row table
    assert model.get_input_embeddings().weight.shape == (5, hidden)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, whole(input_ids=ids).logits)
    with pytest.raises(ModelError, match="token id 6 "):
        model(input_ids=torch.tensor([[5, 6]]))
    assert narrow_input_embedding(model, torch.tensor([3])) == 0  # already narrowed


def test_a_copy_of_a_policy_set_for_row_sparse_gradients_reads_through_the_remap():
    """A reference copied from a policy carries the policy's row-sparse lookup flag; narrowed, it must not look
    ids up in the narrowed matrix directly."""
    from preftune.inputs import frozen
    from preftune.logps.parts import embed_tokens, sparse_embedding_grad
    from preftune.models.precision import Precision

    policy = tiny("llama")
    assert sparse_embedding_grad(policy, True)
    ref = frozen(policy, torch.device("cpu"), Precision(torch.float32, torch.float32), copied=True)
    ids = torch.tensor([40, 3, 17, 3])
    want = embed_tokens(ref, ids).detach().clone()
    assert narrow_input_embedding(ref, ids) > 0
    assert torch.equal(embed_tokens(ref, ids), want)


def test_scaled_embeddings_are_narrowed_through_their_own_forward():
    """Gemma-3's embedding module multiplies by sqrt(hidden) in its forward; untied here, so it is narrowed."""
    model = tiny("gemma3", tie_word_embeddings=False)
    freeze(model)
    whole = copy.deepcopy(model)
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    assert narrow_input_embedding(model, ids.flatten()) > 0
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, whole(input_ids=ids).logits)


def test_tied_trainable_and_nearly_whole_embeddings_are_left_alone():
    tied = _frozen("gemma")  # tied input and output embeddings: every row of the head is read
    assert narrow_input_embedding(tied, torch.tensor([3, 4])) == 0
    trainable = tiny("llama")
    assert narrow_input_embedding(trainable, torch.tensor([3, 4])) == 0
    model = _frozen()
    assert narrow_input_embedding(model, torch.arange(VOCAB - 10)) == 0
    for m in (tied, trainable, model):
        assert m.get_input_embeddings().weight.shape[0] == VOCAB


def test_token_ids_of_reads_every_ids_field():
    from preftune.data.tokenize import TokenizedPair, TokenizedUnpaired

    items = [TokenizedPair([1, 2], [3], [4, 5]), TokenizedUnpaired([6], [7], [8, 9], True)]
    assert token_ids_of(items, extra=(0, None, 2)).tolist() == list(range(10))


SETTINGS = {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "max_length": 64, "device": "cpu", "dtype": "float32",
            "seed": 3, "warmup_steps": 0, "eval_every": 2}
# Held-out pairs in words the training pairs never use: their ids must be among the reference's rows too.
EVAL = [{"prompt": "water boils at", "chosen": " one hundred degrees .", "rejected": " madrid ."},
        {"prompt": "grass is", "chosen": " green .", "rejected": " blue ."}] * 2


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_a_run_with_its_own_narrowed_reference_equals_one_with_a_whole_reference(tiny_model_dir, monkeypatch,
                                                                                 stage):
    """The reference preftune loads itself is narrowed; one passed in as an object is not (it is the caller's).
    Both runs, with evaluation and KTO's mismatched answers, give the same numbers."""
    from tinylm import fact_pairs
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import preftune
    import preftune.training.setup as setup

    freed = []

    def record(model, ids):
        freed.append(narrow_input_embedding(model, ids))
        return freed[-1]

    monkeypatch.setattr(setup, "narrow_input_embedding", record)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs, held_out = fact_pairs(16), EVAL
    if stage == "kto":
        pairs, held_out = ([{"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"}
                            for p in rows for k in ("chosen", "rejected")] for rows in (pairs, held_out))
    own = preftune.train(stage, model=str(tiny_model_dir), tokenizer=tokenizer, data=pairs, eval_data=held_out,
                         **SETTINGS)
    assert len(freed) == 1 and freed[0] > 0
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    given = preftune.train(stage, model=str(tiny_model_dir), ref_model=ref, tokenizer=tokenizer, data=pairs,
                           eval_data=held_out, **SETTINGS)
    assert len(freed) == 1  # the caller's reference object is not narrowed
    assert ref.get_input_embeddings().weight.shape[0] == ref.config.vocab_size
    assert _numbers(own.history) == _numbers(given.history)
    assert any("eval_loss" in row for row in own.history)


def _numbers(rows):
    """The metrics rows without what the clock says."""
    return [{k: v for k, v in row.items() if not k.endswith(("per_s", "_s", "seconds", "time"))} for row in rows]
