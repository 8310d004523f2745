"""Logits processing: how the next token is drawn (temperature, top-p, top-k) and the repetition penalties."""

from __future__ import annotations

import math
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
    pass the cut). Each row costs a few passes over the vocabulary and no full sort."""
    logits = logits.float()
    # one reduction checks everything: the max is NaN if any logit is, +inf if one is, -inf if none is finite
    # (-inf alone is fine: banned tokens)
    if not math.isfinite(float(logits.max())):
        raise NumericsError("the model produced non-finite logits (NaN/Inf), e.g. an fp16 overflow; this reply "
                            "is dropped and the conversation state is kept from before it (try --dtype fp32/bf16)")
    if cfg.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits, dim=-1)
    keep = probs > 0
    if 0 < cfg.top_p < 1:
        keep = probs >= nucleus_cutoff(probs, cfg.top_p)
    if cfg.top_k > 0:
        keep &= probs >= torch.topk(probs, min(cfg.top_k, probs.numel())).values[-1]
    # the candidates' weights in place, 0 elsewhere (cheaper than gathering them: no nonzero/index over the vocab)
    weights = torch.where(keep, probs, 0).double()  # (V,)
    if cfg.temperature != 1:
        # relative to the largest, so a small temperature cannot underflow every weight to 0 (the largest stays 1);
        # 0 stays 0
        weights = (weights / weights.max()) ** (1 / cfg.temperature)
    # inverse CDF: one uniform draw (torch.multinomial draws an exponential per vocab entry). The first position whose
    # cumulative weight exceeds u has a weight > 0, so it is a candidate
    cdf = torch.cumsum(weights, dim=0)
    u = torch.rand((), generator=generator, dtype=torch.float64) * cdf[-1]
    drawn = int(torch.searchsorted(cdf, u, right=True))
    if drawn >= cdf.numel():  # u rounded up to the total: the last candidate
        drawn = int(torch.nonzero(weights).max())
    return drawn


_ONE_BITS = 0x3F800000  # float32 1.0 as an integer
_BIN_SHIFT = 17  # 23 mantissa bits - 6: 64 bins per octave
_BINS = (_ONE_BITS >> _BIN_SHIFT) + 1  # bin 0 holds probability 1, the last holds 0 and the smallest values


def nucleus_cutoff(probs: Tensor, top_p: float) -> Tensor:
    """The smallest probability top-p keeps: that of the token at which the mass, taken in falling order, first
    reaches top_p of the total (every token at least that likely is kept, so ties survive together).

    Sorting all V probabilities is the slow way (a sort of 65,536 floats is ~5 ms, most of a decode step's
    sampling); instead the mass is binned by probability (1/64-octave bins, largest first) in one pass, and only
    the bin where the running mass reaches the target is sorted. Sums are float64, so the cut is where an exact sum
    would put it to ~1e-12 (a float32 running sum over 65,536 terms drifts by ~1e-4). Checked against the sort in
    tests/generate."""
    probs = probs.float().contiguous()
    mass = probs.double()
    target = mass.sum() * top_p
    # (V,) -> bin ids: a positive float's bit pattern grows with its value, so its top bits (exponent and the first
    # six mantissa bits) are a 1/64-octave bin with no logarithm computed
    bins = ((_ONE_BITS - probs.view(torch.int32)) >> _BIN_SHIFT).long()
    running = torch.cumsum(torch.bincount(bins, weights=mass, minlength=_BINS), dim=0)  # (_BINS,) mass
    b = int(torch.searchsorted(running, target.reshape(1))[0])
    if b >= _BINS:  # rounding put the target past the total: everything is kept
        return probs[probs > 0].min()
    members = torch.sort(mass[bins == b], descending=True).values  # (M,) the bin where the target is reached
    before = running[b - 1] if b > 0 else torch.zeros((), dtype=running.dtype)
    position = int(torch.searchsorted(before + torch.cumsum(members, dim=0), target.reshape(1))[0])
    return members[min(position, members.numel() - 1)].float()


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
