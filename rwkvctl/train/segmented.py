"""Long windows in segments: exact gradients with activation memory of one segment (long-context finetuning).

A window of T tokens is cut into segments of `segment_len`. A first pass without gradients runs them in order and
keeps only the recurrent state at each boundary (a few MB per boundary, whatever the length). Then the segments are
recomputed one at a time from the last to the first, each with gradients: its loss (weighted by its share of the
window's tokens) and the gradient arriving at its final state from the segment after it are backpropagated
together, which yields the parameters' gradients and the gradient at its initial state for the segment before it.
The result equals backpropagation through the whole window (full BPTT, not truncated), for about one extra forward
pass; peak activation memory is that of one segment. The WKV5 kernels carry state gradients in and out, which is
what makes this exact.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from rwkvctl.model.state import RecurrentState
from rwkvctl.train.loss import lm_loss

Forward = Callable[..., tuple[Tensor, RecurrentState]]


def _leaf(state: RecurrentState) -> RecurrentState:
    """A copy of a boundary state that collects the gradient arriving at it."""
    return RecurrentState(*(t.detach().clone().requires_grad_(True) for t in _tensors(state)))


def _tensors(state: RecurrentState) -> tuple[Tensor, Tensor, Tensor]:
    return state.att_shift, state.ffn_shift, state.wkv


def segmented_backward(
    forward: Forward,
    x: Tensor,
    y: Tensor,
    segment_len: int,
    *,
    scale: float = 1.0,
    l2wrap: bool = True,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> float:
    """Accumulate into .grad the gradient of `scale * mean token loss` over the window x -> y (B, T), segment by
    segment; returns the window's mean loss (NaN/Inf: stops early, and the caller must discard the gradients)."""
    T = x.shape[1]
    bounds = [(a, min(a + segment_len, T)) for a in range(0, T, segment_len)]
    states: list[RecurrentState | None] = [None]
    with torch.no_grad(), autocast():
        state = None
        for a, b in bounds[:-1]:
            _, state = forward(x[:, a:b], state, last_only=True)  # only the boundary states are kept
            states.append(state)
    total = 0.0
    grad_out: tuple[Tensor, Tensor, Tensor] | None = None
    for (a, b), start in zip(reversed(bounds), reversed(states), strict=True):
        state_in = _leaf(start) if start is not None else None
        with autocast():
            logits, state_out = forward(x[:, a:b], state_in)
            loss = lm_loss(logits, y[:, a:b], use_l2wrap=l2wrap)
        del logits  # the loss keeps what backward needs
        share = (b - a) / T  # this segment's part of the window's mean
        value = float(loss.detach())
        if not torch.isfinite(loss):
            return value
        total += value * share
        outputs: list[Tensor] = [loss * (share * scale)]
        grads: list[Tensor | None] = [None]
        if grad_out is not None:  # the gradient the later segments send back through this segment's final state
            outputs += list(_tensors(state_out))
            grads += list(grad_out)
        torch.autograd.backward(outputs, grads)
        if state_in is not None:
            grad_out = tuple(t.grad if t.grad is not None else torch.zeros_like(t) for t in _tensors(state_in))
    return total


@torch.no_grad()
def segmented_loss(forward: Forward, x: Tensor, y: Tensor, segment_len: int) -> float:
    """The window's mean loss, computed segment by segment (no L2Wrap; for validation)."""
    T, state, total = x.shape[1], None, 0.0
    for a in range(0, T, segment_len):
        b = min(a + segment_len, T)
        logits, state = forward(x[:, a:b], state)
        total += float(lm_loss(logits, y[:, a:b], use_l2wrap=False)) * (b - a) / T
    return total
