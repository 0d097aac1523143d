"""Hidden states to log p(target) without a `[rows, vocab]` tensor for more than one chunk at a time.

Only the hidden states that predict answer tokens come here. They are projected to the vocabulary `chunk_size`
rows at a time, and with gradients on each chunk's logits are recomputed in backward instead of kept.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .parts import Head


def _token_logps(head: Head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head.logits(hidden)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _logsumexp_(logits: torch.Tensor) -> torch.Tensor:
    """`torch.logsumexp(logits, -1)` with the same operations in the same order (so the same bits), but computed
    in `logits`' own memory, which it overwrites: on a CPU the [chunk, vocab] temporary of `logits - max` was a
    tenth of a DPO step (a fresh allocation of that size is page-faulted in each time)."""
    m = logits.amax(-1, keepdim=True)
    m.masked_fill_(m.abs() == float("inf"), 0)  # as torch does: an all -inf row gives -inf, not nan
    return logits.sub_(m).exp_().sum(-1).log_().add_(m.squeeze(-1))


class _LinearTokenLogps(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[target] per row, `chunk` rows at a time, for a plain bias-free projection.

    Forward keeps only the per-row logsumexp; backward recomputes each chunk's logits and turns them into the
    logit gradient in place (softmax, scaled, minus one-hot), so a chunk needs one [chunk, vocab] buffer and no
    zero-filled scatter tensors. Same numbers as autograd through `_token_logps`.
    """

    @staticmethod
    def project(hidden, weight, targets, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p(target) [N], logsumexp [N]), float32."""
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        for s in range(0, hidden.shape[0], chunk):
            logits = (hidden[s:s + chunk] @ weight.t()).float()
            picked = logits.gather(-1, targets[s:s + chunk, None]).squeeze(-1)
            lse[s:s + chunk] = _logsumexp_(logits)
            out[s:s + chunk] = picked - lse[s:s + chunk]
        return out, lse

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int):
        out, lse = _LinearTokenLogps.project(hidden, weight, targets, chunk)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk = chunk
        # Backward recomputes the logits: it must do so at the precision forward used (mixed precision).
        dev = hidden.device.type
        ctx.amp = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets, lse = ctx.saved_tensors
        amp = ctx.amp
        with torch.autocast(hidden.device.type, dtype=amp, enabled=amp is not None):
            return _LinearTokenLogps._backward(ctx, grad, hidden, weight, targets, lse, amp)

    @staticmethod
    def _backward(ctx, grad, hidden, weight, targets, lse, amp):
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = None  # the first chunk's product, then accumulated into: no zero-filled [vocab, hidden] pass
        for s in range(0, hidden.shape[0], ctx.chunk):
            h, g = hidden[s:s + ctx.chunk], grad[s:s + ctx.chunk].float()
            logits = (h @ weight.t()).float()
            # d logp(t) / d logits = onehot(t) - softmax(logits)
            dlogits = logits.sub_(lse[s:s + ctx.chunk, None]).exp_().mul_(-g[:, None])
            rows = torch.arange(h.shape[0], device=h.device)
            dlogits.index_put_((rows, targets[s:s + ctx.chunk]), g, accumulate=True)
            if amp is not None:  # the two products in the compute dtype, accumulated in the weights' dtype
                if need_h:
                    grad_h[s:s + ctx.chunk] = dlogits @ weight
                if need_w:
                    part = (dlogits.t() @ h).to(weight.dtype)
                    grad_w = part if grad_w is None else grad_w.add_(part)
                continue
            dlogits = dlogits.to(weight.dtype)
            if need_h:
                torch.mm(dlogits, weight, out=grad_h[s:s + ctx.chunk])
            if need_w:
                grad_w = dlogits.t() @ h if grad_w is None else grad_w.addmm_(dlogits.t(), h)
        return grad_h, grad_w, None, None


def _fusable(head: Head) -> bool:
    """The fused projection handles a plain `nn.Linear` without bias or logit transforms, on ordinary tensors."""
    lin = head.linear
    return (type(lin) is torch.nn.Linear and lin.bias is None and not (head.scale or head.divide or head.softcap)
            and type(lin.weight.data) is torch.Tensor)


def token_logps(head: Head, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """log p(target) for each row of `hidden` [N, H] -> [N], projecting `chunk_size` rows at a time.

    With gradients on, each chunk's logits are dropped after forward and recomputed in backward.
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or head.linear.weight.requires_grad)
    if _fusable(head):
        if needs_grad:
            return _LinearTokenLogps.apply(hidden, head.linear.weight, targets, chunk_size)
        with torch.no_grad():
            return _LinearTokenLogps.project(hidden, head.linear.weight, targets, chunk_size)[0]
    parts = []
    for s in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[s:s + chunk_size], targets[s:s + chunk_size]
        if needs_grad:
            parts.append(checkpoint(_token_logps, head, h, t, use_reentrant=False))
        else:
            parts.append(_token_logps(head, h, t))
    return torch.cat(parts)

