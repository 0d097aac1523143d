"""The plain computation every fast log-prob path is checked against: a whole-model forward, full logits."""

from __future__ import annotations

import torch.nn.functional as F
import torch

from preftune.data.batching import PromptAnswerBatch
from preftune.logps.layouts import AnswerLogps
from preftune.logps.parts import unwrap


def full_logits_logps(model, batch: PromptAnswerBatch) -> AnswerLogps:
    """The reference computation: a whole-model forward of each `prompt + answer`, full logits, no tricks.

    Used by tests to check the fast paths; memory grows as rows x length x vocab.
    """
    k = batch.k
    sums = []
    for j in range(batch.answer_ids.shape[0]):
        i = j // k
        p = batch.prompt_ids[i, : batch.prompt_lens[i]]
        a = batch.answer_ids[j, : batch.answer_lens[j]]
        ids = torch.cat([p, a])[None]
        logits = unwrap(model)(input_ids=ids).logits[0].float()
        per_token = F.log_softmax(logits[len(p) - 1: -1], dim=-1).gather(-1, a[:, None])[:, 0]
        if batch.answer_mask is not None:
            per_token = per_token * batch.answer_mask[j, : batch.answer_lens[j]]
        lp = per_token.sum()
        sums.append(lp)
    return AnswerLogps(torch.stack(sums), batch.answer_lens)