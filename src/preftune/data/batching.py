"""Token ids -> padded tensors, and the order in which examples are visited.

Every batch is "prompts with k answers each": k=2 for preference pairs (chosen, rejected), k=1 for SFT, k=2
for KTO (the rated answer, then the mismatched answer of its KL term; `labels` [B] bool, True = desirable).
SFT conversations of several assistant turns also carry `answer_mask` [B, A] (1 = in the loss), zero on the
user turns between the assistant turns; it is None when every answer token is in the loss.
Example, two pairs with prompts [5 6 7] and [8], answers c0=[1 2], r0=[3], c1=[4], r1=[9 9 9], pad=0:

    prompt_ids  = [[5 6 7], [8 0 0]]          prompt_lens = [3, 1]
    answer_ids  = [[1 2 0], [3 0 0],          answer_lens = [2, 1, 1, 3]
                   [4 0 0], [9 9 9]]          (rows: c0, r0, c1, r1: answer row j belongs to prompt j // k)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .tokenize import TokenizedPair, TokenizedUnpaired


@dataclass
class PromptAnswerBatch:
    prompt_ids: torch.Tensor   # [B, P] long, right-padded
    prompt_lens: torch.Tensor  # [B] long
    answer_ids: torch.Tensor   # [B*k, A] long, right-padded
    answer_lens: torch.Tensor  # [B*k] long
    k: int                     # answers per prompt
    index: torch.Tensor        # [B] long: positions in the dataset
    answer_mask: torch.Tensor | None = None  # [B*k, A] float: 1 where an answer token is in the loss; None = all
    # The two length vectors as Python lists, kept from the CPU tensors they came from: planning a batch on a GPU
    # reads them here instead of copying them back from the device, which would wait for all queued work.
    host_lens: tuple[list[int], list[int]] | None = None
    labels: torch.Tensor | None = None  # [B] bool: KTO's desirable (True) / undesirable; None for other stages
    # Answer slots whose log-probs the loss uses without a gradient (KTO's KL answers): the policy may compute
    # them without autograd.
    no_grad_slots: tuple[int, ...] = ()

    def answer_tokens(self) -> float:
        """Answer tokens in the loss (those the mask keeps)."""
        if self.answer_mask is None:
            return float(sum(self.lengths()[1]))
        return float(self.answer_mask.sum())

    @property
    def size(self) -> int:
        return self.prompt_ids.shape[0]

    def lengths(self) -> tuple[list[int], list[int]]:
        """(prompt lengths [B], answer lengths [B*k]) as Python lists, without a device round trip if possible."""
        if self.host_lens is None:
            self.host_lens = (self.prompt_lens.tolist(), self.answer_lens.tolist())
        return self.host_lens

    def to(self, device) -> "PromptAnswerBatch":
        host = self.lengths() if self.prompt_lens.device.type == "cpu" else self.host_lens
        mask = None if self.answer_mask is None else self.answer_mask.to(device)
        labels = None if self.labels is None else self.labels.to(device)
        return PromptAnswerBatch(self.prompt_ids.to(device), self.prompt_lens.to(device),
                                 self.answer_ids.to(device), self.answer_lens.to(device), self.k, self.index, mask,
                                 host, labels, self.no_grad_slots)

    def in_no_grad_slot(self, answer_rows: torch.Tensor) -> torch.Tensor:
        """[N] bool: which of these answer rows (indices into `answer_ids`) belong to `no_grad_slots`."""
        slots = torch.tensor(self.no_grad_slots, dtype=torch.long, device=answer_rows.device)
        return torch.isin(answer_rows % self.k, slots)

    def tokens(self) -> int:
        """Tokens actually attended to (no padding): prompts once plus every answer."""
        p, a = self.lengths()
        return sum(p) + sum(a)

    def select(self, rows: list[int]) -> "PromptAnswerBatch":
        """The sub-batch of the given prompt rows (with their answers), trimmed of all-padding columns."""
        p_all, a_all = self.lengths()
        answer_rows = [r * self.k + j for r in rows for j in range(self.k)]
        p, a = [p_all[r] for r in rows], [a_all[r] for r in answer_rows]
        dev = self.prompt_ids.device
        rows_t = torch.tensor(rows, dtype=torch.long, device=dev)
        answers_t = torch.tensor(answer_rows, dtype=torch.long, device=dev)
        mask = None if self.answer_mask is None else self.answer_mask[answers_t, : max(a)]
        labels = None if self.labels is None else self.labels[rows_t]
        return PromptAnswerBatch(self.prompt_ids[rows_t, : max(p)], self.prompt_lens[rows_t],
                                 self.answer_ids[answers_t, : max(a)], self.answer_lens[answers_t], self.k,
                                 self.index[torch.tensor(rows, dtype=torch.long)], mask, (p, a), labels,
                                 self.no_grad_slots)


def _pad(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def answers_of(item) -> tuple[list[int], ...]:
    """The answer rows a tokenised item contributes to a batch, in order."""
    if isinstance(item, TokenizedPair):
        return item.chosen_ids, item.rejected_ids
    if isinstance(item, TokenizedUnpaired):
        return item.completion_ids, item.kl_ids
    return (item.answer_ids,)


def collate(items: list, pad_id: int) -> PromptAnswerBatch:
    answers = [a for it in items for a in answers_of(it)]
    k = len(answers_of(items[0]))
    unpaired = isinstance(items[0], TokenizedUnpaired)
    prompts = [it.prompt_ids for it in items]
    masks = [getattr(it, "answer_mask", None) for it in items]
    answer_mask = None
    if any(m is not None for m in masks):
        answer_mask = _pad([[1] * len(a) if m is None else m for a, m in zip(answers, masks)], 0).float()
    return PromptAnswerBatch(
        prompt_ids=_pad(prompts, pad_id),
        prompt_lens=torch.tensor([len(p) for p in prompts], dtype=torch.long),
        answer_ids=_pad(answers, pad_id),
        answer_lens=torch.tensor([len(a) for a in answers], dtype=torch.long),
        k=k,
        index=torch.tensor([it.index for it in items], dtype=torch.long),
        answer_mask=answer_mask,
        labels=torch.tensor([it.label for it in items]) if unpaired else None,
        no_grad_slots=(1,) if unpaired else (),  # the KL estimate is detached
    )


def example_length(item) -> int:
    return len(item.prompt_ids) + max(len(a) for a in answers_of(item))


def epoch_order(items: list, *, batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """Batches of dataset positions for one epoch, deterministic in (seed, epoch).

    With `group_by_length`, the shuffled examples are cut into windows of 50 batches, each window is sorted by
    length and cut into batches, and the batches are shuffled again: similar lengths meet, order stays random.
    The last incomplete batch is dropped so every step sees `batch_size` examples.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(items), generator=gen).tolist()
    if group_by_length:
        window = batch_size * 50
        order = [i for s in range(0, len(order), window)
                 for i in sorted(order[s:s + window], key=lambda j: example_length(items[j]))]
    batches = [order[s:s + batch_size] for s in range(0, len(order) - batch_size + 1, batch_size)]
    if group_by_length:
        perm = torch.randperm(len(batches), generator=gen).tolist()
        batches = [batches[p] for p in perm]
    return batches


def steps_per_epoch(n_items: int, batch_size: int, grad_accum: int) -> int:
    return (n_items // batch_size) // grad_accum


def total_steps(n_items: int, batch_size: int, grad_accum: int, epochs: float, max_steps: int) -> int:
    if max_steps > 0:
        return max_steps
    return max(1, math.ceil(steps_per_epoch(n_items, batch_size, grad_accum) * epochs))
