"""Hidden states to log p(target) without a `[rows, vocab]` tensor for more than one chunk at a time.

Only the hidden states that predict answer tokens come here. They are projected to the vocabulary `chunk_size`
rows at a time, and with gradients on each chunk's logits are recomputed in backward instead of kept.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
from torch.utils.checkpoint import checkpoint

from .parts import Head


def _token_logps(head: Head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head.logits(hidden)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


_workspace = threading.local()


class _Buffer:
    """One device's reused logits memory. `stamp` counts the writes into it, so a forward that left its
    log-probs there can tell in backward whether they are still the buffer's contents."""

    def __init__(self, numel: int, device):
        with torch.inference_mode(False):  # the reference's forward may come first; the policy's writes it too
            self.tensor: torch.Tensor | None = torch.empty(numel, dtype=torch.float32, device=device)
        self.stamp = 0


@contextmanager
def reused_logits_buffer():
    """Within it, the fused projection on a CPU in fp32 writes every chunk's logits into one buffer, kept from
    call to call (the reference's forward, the policy's, its backward) and freed on exit.

    A fresh [chunk, vocab] tensor is larger than glibc keeps for reuse (32 MB), so each one is mapped anew and
    page-faulted in as it is written: on the benchmark fixture (750 rows x 32,000) that made the product
    ~1.5x slower than the same product into a buffer written before. When the policy's answer rows fit in one
    chunk, its backward also finds its forward's log-probs still there and skips recomputing the logits. A
    training step runs inside one.
    """
    outer = getattr(_workspace, "buffers", None)
    mine = {} if outer is None else outer
    _workspace.buffers = mine
    try:
        yield
    finally:
        _workspace.buffers = outer
        if outer is None:
            for buf in mine.values():  # a graph kept past the step recomputes instead of holding the memory
                buf.tensor = None


def _reusable(h: torch.Tensor, weight: torch.Tensor) -> bool:
    return (getattr(_workspace, "buffers", None) is not None and h.device.type == "cpu"
            and h.dtype == torch.float32 and weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"))


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(h @ weight.T) as float32 [rows, vocab]; in the reused buffer where `reused_logits_buffer` allows it."""
    if not _reusable(h, weight):
        return (h @ weight.t()).float()
    need = h.shape[0] * weight.shape[0]
    buffers = _workspace.buffers
    buf = buffers.get(h.device)
    if buf is None or buf.tensor is None or buf.tensor.numel() < need:
        buffers[h.device] = buf = _Buffer(need, h.device)
    buf.stamp += 1
    return torch.mm(h, weight.t(), out=buf.tensor[:need].view(h.shape[0], weight.shape[0]))


def _kept_logps(hidden: torch.Tensor, weight: torch.Tensor):
    """After a one-chunk `project` into the reused buffer: (buffer, stamp) to find its log-probs by in backward."""
    if not _reusable(hidden, weight):
        return None
    buf = _workspace.buffers.get(hidden.device)
    return None if buf is None else (buf, buf.stamp)


def _still_kept(kept, rows: int, vocab: int) -> torch.Tensor | None:
    """The forward's log-probs [rows, vocab] when nothing has written the buffer since; else None."""
    if kept is None:
        return None
    buf, stamp = kept
    if buf.stamp != stamp or buf.tensor is None:
        return None
    buf.stamp += 1  # backward turns them into the logit gradient
    return buf.tensor[:rows * vocab].view(rows, vocab)


class _LinearTokenLogps(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[target] per row, `chunk` rows at a time, for a plain bias-free projection.

    Forward keeps nothing of a chunk's logits; backward recomputes them and turns them into the logit gradient in
    place (softmax, scaled, minus one-hot), so a chunk needs one [chunk, vocab] buffer and no zero-filled scatter
    tensors. The exception costs no memory: a one-chunk forward into the reused buffer leaves its log-probs there,
    and when nothing has overwritten them backward exponentiates them instead. Softmax and log-softmax run in the
    logits' own memory, row by row: each row's passes stay in the CPU's cache, where a logsumexp over the whole
    chunk went to memory four times. Same numbers as autograd through `_token_logps`, to rounding.
    """

    @staticmethod
    def project(hidden, weight, targets, chunk: int) -> torch.Tensor:
        """log p(target) [N], float32."""
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            logits = _chunk_logits(hidden[s:s + chunk], weight)
            torch.log_softmax(logits, dim=-1, out=logits)
            out[s:s + chunk] = logits.gather(-1, targets[s:s + chunk, None]).squeeze(-1)
        return out

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int):
        out = _LinearTokenLogps.project(hidden, weight, targets, chunk)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk = chunk
        ctx.kept = _kept_logps(hidden, weight) if hidden.shape[0] <= chunk else None
        # Backward recomputes the logits: it must do so at the precision forward used (mixed precision).
        dev = hidden.device.type
        ctx.amp = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets = ctx.saved_tensors
        amp = ctx.amp
        with torch.autocast(hidden.device.type, dtype=amp, enabled=amp is not None):
            return _LinearTokenLogps._backward(ctx, grad, hidden, weight, targets, amp)

    @staticmethod
    def _backward(ctx, grad, hidden, weight, targets, amp):
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = None  # the first chunk's product, then accumulated into: no zero-filled [vocab, hidden] pass
        for s in range(0, hidden.shape[0], ctx.chunk):
            h, g = hidden[s:s + ctx.chunk], grad[s:s + ctx.chunk].float()
            logps = _still_kept(ctx.kept, h.shape[0], weight.shape[0]) if s == 0 else None
            # d logp(t) / d logits = onehot(t) - softmax(logits)
            if logps is not None:
                dlogits = logps.exp_().mul_(-g[:, None])
            else:
                logits = _chunk_logits(h, weight)
                dlogits = torch.softmax(logits, dim=-1, out=logits).mul_(-g[:, None])
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
            return _LinearTokenLogps.project(hidden, head.linear.weight, targets, chunk_size)
    parts = []
    for s in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[s:s + chunk_size], targets[s:s + chunk_size]
        if needs_grad:
            parts.append(checkpoint(_token_logps, head, h, t, use_reentrant=False))
        else:
            parts.append(_token_logps(head, h, t))
    return torch.cat(parts)

