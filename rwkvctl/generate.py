"""Sampling and token-by-token generation in RNN mode (constant memory in the context length)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from rwkvctl.model.rwkv5 import RWKV5
from rwkvctl.model.state import RecurrentState


@dataclass
class SamplingConfig:
    """How the next token is drawn from the logits."""

    temperature: float = 1.0
    """0 means greedy (argmax)."""
    top_p: float = 0.85
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: no limit)."""


def sample(logits: Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> int:
    """Draw one token id from 1-D logits."""
    logits = logits.float()
    if cfg.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / cfg.temperature, dim=-1)
    if cfg.top_k > 0:
        kth = torch.topk(probs, min(cfg.top_k, probs.numel())).values[-1]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    if 0 < cfg.top_p < 1:
        sorted_probs, _ = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # the cutoff is the probability of the token at which the mass first reaches top_p
        position = int(torch.searchsorted(cumulative, (cumulative[-1] * cfg.top_p).reshape(1))[0])
        cutoff = sorted_probs[min(position, sorted_probs.numel() - 1)]
        probs = torch.where(probs >= cutoff, probs, torch.zeros_like(probs))
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


@torch.no_grad()
def ingest(model: RWKV5, tokens: list[int], state: RecurrentState | None = None) -> tuple[Tensor, RecurrentState]:
    """Run a prompt through the sequence form; returns the last position's logits (V,) and the state."""
    idx = torch.tensor([tokens], dtype=torch.long, device=model.emb.weight.device)
    logits, state = model(idx, state)
    return logits[0, -1], state


@torch.no_grad()
def generate(
    model: RWKV5,
    prompt: list[int],
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    *,
    state: RecurrentState | None = None,
    stop_tokens: tuple[int, ...] = (0,),
    seed: int | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time; the prompt goes through the parallel form, then RNN steps."""
    sampling = sampling or SamplingConfig()
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    logits, state = ingest(model, prompt, state)
    device = model.emb.weight.device
    for _ in range(max_new_tokens):
        token = sample(logits.cpu(), sampling, generator)
        if token in stop_tokens:
            return
        yield token
        step_logits, state = model.step(torch.tensor([token], device=device), state)
        logits = step_logits[0]
