"""Next-token loss for training: cross entropy fused with its gradient (and RWKV-LM's L2Wrap), chunk by chunk.

With the 65536-token World vocabulary the logits dominate everything after the blocks: at ctx 512 x micro-batch 2
they are 67M values, and the stock path (upcast to fp32, log_softmax, nll, then in backward a zero-filled gradient,
a scatter, log_softmax's backward and a downcast) streams them through memory about ten times, ~30% of a small
model's bf16 step on CPU. Here each chunk of rows is upcast once, and loss and gradient come out of the same pass
while the chunk is in cache; backward only scales the stored gradient, in place. The stored gradient has the
logits' dtype and shape: the logits themselves are not kept (the engines drop them before backward), so the peak is
what the stock path needs for the logits' gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rwkvctl.train.optim import L2Wrap

# fp32 elements of one chunk. CPU: 16 MiB, small enough to stay in cache between the passes over it. GPU: 256 MiB,
# so that a (32768, 65536) micro-batch takes 32 chunks, not 512 (each chunk is ~10 kernel launches).
CE_CHUNK_ELEMENTS = 1 << 22
CE_CHUNK_ELEMENTS_GPU = 1 << 26


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)  # bf16/fp16 -> fp32; fp64 (tests) stays


def _rows_per_chunk(t: Tensor) -> int:
    elements = CE_CHUNK_ELEMENTS if t.device.type == "cpu" else CE_CHUNK_ELEMENTS_GPU
    return max(1, elements // t.shape[-1])


class _FusedCrossEntropy(torch.autograd.Function):
    """mean_rows(logsumexp(x) - x[target]); gradient (softmax - onehot(target) + l2 * max * onehot(argmax)) / rows."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, targets: Tensor, l2wrap_factor: float) -> Tensor:  # type: ignore[override]
        vocab = logits.shape[-1]
        flat, y = logits.reshape(-1, vocab), targets.reshape(-1, 1)  # (P, V), (P, 1)
        rows = flat.shape[0]
        grad = torch.empty_like(flat)
        sums = []
        step = _rows_per_chunk(flat)
        for i in range(0, rows, step):
            chunk, yc = flat[i : i + step], y[i : i + step]
            p = chunk.to(_compute_dtype(chunk), copy=True)  # (r, V); a copy even for fp32: it becomes the gradient
            top, top_idx = p.max(dim=-1, keepdim=True)  # (r, 1)
            picked = p.gather(1, yc)  # (r, 1)
            p.sub_(top).exp_()
            total = p.sum(dim=-1, keepdim=True)
            sums.append((top + total.log() - picked).sum())
            p.div_(total)
            p.scatter_add_(1, yc, torch.full_like(picked, -1.0))
            if l2wrap_factor:
                p.scatter_add_(1, top_idx, top * l2wrap_factor)
            grad[i : i + step] = p.mul_(1.0 / rows)
        ctx.save_for_backward(grad)
        ctx.shape, ctx.used = logits.shape, False
        return torch.stack(sums).sum() / rows

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        # Scaled in place: a second full-size tensor would be +4 GB at ctx 4096 x 8 x 65536 in bf16. So a second
        # backward through the same graph (retain_graph=True) would see a scaled gradient: refuse it instead.
        if ctx.used:
            raise RuntimeError("the fused LM loss supports one backward pass per forward (no retain_graph)")
        ctx.used = True
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_output.to(grad.dtype)).view(ctx.shape), None, None


def _loss_only(logits: Tensor, targets: Tensor) -> Tensor:
    vocab = logits.shape[-1]
    flat, y = logits.reshape(-1, vocab), targets.reshape(-1, 1)  # (P, V), (P, 1)
    step = _rows_per_chunk(flat)
    sums = []
    for i in range(0, flat.shape[0], step):
        chunk = flat[i : i + step].to(_compute_dtype(flat))
        sums.append((torch.logsumexp(chunk, dim=-1, keepdim=True) - chunk.gather(1, y[i : i + step])).sum())
    return torch.stack(sums).sum() / flat.shape[0]


def lm_loss(logits: Tensor, y: Tensor, *, use_l2wrap: bool) -> Tensor:
    """Mean next-token cross entropy over (B, T, V) logits, in fp32 whatever the logits' dtype; with `use_l2wrap`
    the backward also carries RWKV-LM's L2Wrap gradient (see optim.L2Wrap, whose result this equals)."""
    if y.numel() == 0:
        raise ValueError("lm_loss: the batch has no positions")
    if not (torch.is_grad_enabled() and logits.requires_grad):
        return _loss_only(logits, y)
    return _FusedCrossEntropy.apply(logits, y, L2Wrap.FACTOR if use_l2wrap else 0.0)


@torch.no_grad()
def token_nll(logits: Tensor, targets: Tensor) -> Tensor:
    """Next-token loss of every position, (B, T, V) logits and (B, T) targets -> (B, T) fp32 nats, computed a
    chunk of rows at a time in fp32 (no upcast copy of all the logits; for evaluation)."""
    vocab = logits.shape[-1]
    flat, y = logits.reshape(-1, vocab), targets.reshape(-1, 1)  # (P, V), (P, 1)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    step = _rows_per_chunk(flat)
    for i in range(0, flat.shape[0], step):
        chunk = flat[i : i + step].to(_compute_dtype(flat))
        nll = torch.logsumexp(chunk, dim=-1) - chunk.gather(1, y[i : i + step]).squeeze(1)
        out[i : i + step] = nll
    return out.view(targets.shape)
