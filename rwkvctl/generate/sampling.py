"""Logits processing: how the next token is drawn (temperature, top-p, top-k) and the repetition penalties."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from rwkvctl.errors import NumericsError


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
    """Draw one token id from 1-D logits, in ChatRWKV's order (so its settings carry over): top-p and top-k cut
    the model's own distribution, then the temperature reshapes what is left (it never changes which tokens
    pass the cut)."""
    logits = logits.float()
    if bool(torch.isnan(logits).any()) or bool(torch.isposinf(logits).any()) or not bool(torch.isfinite(logits).any()):
        # -inf alone is fine (banned tokens); NaN, +inf or nothing finite means the forward pass overflowed
        raise NumericsError("the model produced non-finite logits (NaN/Inf), e.g. an fp16 overflow; this reply "
                            "is dropped and the conversation state is kept from before it (try --dtype fp32/bf16)")
    if cfg.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits, dim=-1)
    if 0 < cfg.top_p < 1:
        sorted_probs, _ = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # the cutoff is the probability of the token at which the mass first reaches top_p (ties survive)
        position = int(torch.searchsorted(cumulative, (cumulative[-1] * cfg.top_p).reshape(1))[0])
        cutoff = sorted_probs[min(position, sorted_probs.numel() - 1)]
        probs = torch.where(probs >= cutoff, probs, torch.zeros_like(probs))
    if cfg.top_k > 0:
        kth = torch.topk(probs, min(cfg.top_k, probs.numel())).values[-1]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    if cfg.temperature != 1:
        probs = probs ** (1 / cfg.temperature)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


@dataclass
class Penalties:
    """Repetition penalties as ChatRWKV applies them: each generated token's logit is lowered by `presence` once it
    has occurred and by `frequency` per (decayed) occurrence; every step all occurrence weights decay by `decay`."""

    presence: float = 0.0
    frequency: float = 0.0
    decay: float = 0.996

    @property
    def active(self) -> bool:
        return self.presence != 0 or self.frequency != 0


class PenaltyTracker:
    """Occurrence weights of the tokens generated so far, applied to the next logits."""

    def __init__(self, penalties: Penalties, exempt: Callable[[int], bool] = lambda token: False) -> None:
        self.penalties = penalties
        self.exempt = exempt  # tokens counted for presence only (e.g. whitespace and digits)
        self.weights: dict[int, float] = {}

    def apply_(self, logits: Tensor) -> Tensor:
        """Lower the logits (1-D, in place) of the tokens generated so far."""
        if self.penalties.active and self.weights:
            ids = torch.tensor(list(self.weights), dtype=torch.long, device=logits.device)
            weights = torch.tensor(list(self.weights.values()), dtype=logits.dtype, device=logits.device)
            logits[ids] -= self.penalties.presence + weights * self.penalties.frequency
        return logits

    def update(self, token: int) -> None:
        for key in self.weights:
            self.weights[key] *= self.penalties.decay
        self.weights[token] = self.weights.get(token, 0.0) + (0.0 if self.exempt(token) else 1.0)
