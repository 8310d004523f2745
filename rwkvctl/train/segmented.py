"""Long windows in segments: exact gradients with activation memory of one segment (long-context finetuning).

A window of T tokens is cut into segments of `segment_len`. A first pass without gradients runs them in order and
keeps only the recurrent state at each boundary (a few MB per boundary, whatever the length). Then the segments are
recomputed one at a time from the last to the first, each with gradients: its loss (weighted by its share of the
window's tokens) and the gradient arriving at its final state from the segment after it are backpropagated
together, which yields the parameters' gradients and the gradient at its initial state for the segment before it.
The result equals backpropagation through the whole window (full BPTT, not truncated), for about one extra forward
pass; peak activation memory is that of one segment. The WKV5 kernels carry state gradients in and out, which is
what makes this exact.

Nothing else grows with the window: the token ids stay where the loader made them (host memory) and go to the
device one segment at a time, boundary states wait in host memory when the model is on a GPU, no (T, V) logits
exist beyond one segment's, the loss is summed segment by segment, and on CPU the heap's free pages are given
back between segments (train/host_memory.py), so peak memory at 128k tokens is that at one segment.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from rwkvctl.model.state import RecurrentState
from rwkvctl.train.host_memory import release_free_host_memory
from rwkvctl.train.loss import lm_loss

Forward = Callable[..., tuple[Tensor, RecurrentState]]
# (the segment's scaled loss, its final state's tensors, the gradient arriving at each of them) -> backward done
SegmentBackward = Callable[[Tensor, list[Tensor], list[Tensor]], None]


def autograd_segment_backward(loss: Tensor, outputs: list[Tensor], grads: list[Tensor]) -> None:
    """One segment's backward: its loss, plus what the later segments send back through its final state."""
    torch.autograd.backward([loss, *outputs], [None, *grads])


def _leaf(state: RecurrentState, device: torch.device) -> RecurrentState:
    """A copy of a boundary state, on the compute device, that collects the gradient arriving at it."""
    return RecurrentState(*(t.detach().to(device).clone().requires_grad_(True) for t in _tensors(state)))


def _tensors(state: RecurrentState) -> tuple[Tensor, Tensor, Tensor]:
    return state.att_shift, state.ffn_shift, state.wkv


def _park(state: RecurrentState, device: torch.device) -> RecurrentState:
    """Where a boundary state waits for the backward pass: host memory when the model is on a GPU (a 7B's state
    is ~33 MB, x32 boundaries at 128k), else where it is."""
    if device.type == "cpu":
        return state
    return RecurrentState(*(t.to("cpu", non_blocking=False) for t in _tensors(state)))


def _segment(t: Tensor, a: int, b: int, device: torch.device) -> Tensor:
    """Tokens [a, b) of a (B, T) window on the compute device: the window itself may stay in host memory."""
    return t[:, a:b].to(device, non_blocking=True)


def segment_bounds(length: int, segment_len: int) -> list[tuple[int, int]]:
    """[(start, end)] of the segments of a `length`-token window; the last may be shorter."""
    if segment_len < 1:
        raise ValueError(f"segment_len must be >= 1, got {segment_len}")
    return [(a, min(a + segment_len, length)) for a in range(0, length, segment_len)]


def segmented_backward(
    forward: Forward,
    x: Tensor,
    y: Tensor,
    segment_len: int,
    *,
    scale: float = 1.0,
    l2wrap: bool = True,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    device: torch.device | str | None = None,
    backward: SegmentBackward = autograd_segment_backward,
) -> float:
    """Accumulate into .grad the gradient of `scale * mean token loss` over the window x -> y (B, T), segment by
    segment; returns the window's mean loss (NaN/Inf: stops early, and the caller must discard the gradients).

    x and y may stay in host memory: each segment's tokens go to `device` (default: x's) when it runs. What is
    held for the whole window is the token ids and one recurrent state per boundary; nothing the size of the
    window's logits or activations exists at any time, and the loss is reduced segment by segment."""
    device = torch.device(device) if device is not None else x.device
    bounds = segment_bounds(x.shape[1], segment_len)
    T = x.shape[1]
    states: list[RecurrentState | None] = [None]
    with torch.no_grad(), autocast():
        state = None
        for a, b in bounds[:-1]:  # the last segment is recomputed first anyway: it needs no pass here
            _, state = forward(_segment(x, a, b, device), state, last_only=True)  # only the boundary states
            states.append(_park(state, device))
    if device.type == "cpu":
        release_free_host_memory()
    total = 0.0
    grad_out: tuple[Tensor, Tensor, Tensor] | None = None
    for a, b in reversed(bounds):
        start = states.pop()  # a boundary state is dropped once its segment has run
        state_in = _leaf(start, device) if start is not None else None
        with autocast():
            logits, state_out = forward(_segment(x, a, b, device), state_in)
            loss = lm_loss(logits, _segment(y, a, b, device), use_l2wrap=l2wrap)
        del logits  # the loss keeps what backward needs
        share = (b - a) / T  # this segment's part of the window's mean
        value = float(loss.detach())
        if not torch.isfinite(loss):
            return value
        total += value * share
        # the first segment to run (the last) has no later segment sending a gradient back
        outputs = list(_tensors(state_out)) if grad_out is not None else []
        backward(loss * (share * scale), outputs, list(grad_out) if grad_out is not None else [])
        del outputs, loss, state_out
        if state_in is not None:
            grad_out = tuple(t.grad if t.grad is not None else torch.zeros_like(t) for t in _tensors(state_in))
        if device.type == "cpu":
            release_free_host_memory()
    return total


@torch.no_grad()
def segmented_loss(forward: Forward, x: Tensor, y: Tensor, segment_len: int,
                   device: torch.device | str | None = None) -> float:
    """The window's mean loss, computed segment by segment (no L2Wrap; for validation)."""
    device = torch.device(device) if device is not None else x.device
    T, state, total = x.shape[1], None, 0.0
    for a, b in segment_bounds(T, segment_len):
        logits, state = forward(_segment(x, a, b, device), state)
        total += float(lm_loss(logits, _segment(y, a, b, device), use_l2wrap=False)) * (b - a) / T
        del logits
    return total
