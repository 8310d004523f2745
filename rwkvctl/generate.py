"""Sampling and token-by-token generation in RNN mode (constant memory in the context length)."""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rwkvctl.errors import NumericsError
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


@torch.no_grad()
def ingest(
    model: RWKV5, tokens: Sequence[int], state: RecurrentState | None = None, chunk_len: int = 256
) -> tuple[Tensor, RecurrentState]:
    """Run a prompt through the sequence form, `chunk_len` tokens at a time so that a long prompt needs no more
    memory than a short one; returns the last position's logits (V,) and the state."""
    if not tokens:
        raise ValueError("ingest needs at least one token")
    device = model.emb.weight.device
    logits = None
    for start in range(0, len(tokens), chunk_len):
        idx = torch.tensor([list(tokens[start : start + chunk_len])], dtype=torch.long, device=device)
        logits, state = model(idx, state, last_only=True)
        logits = logits[0, -1]
    assert logits is not None and state is not None
    return logits, state


class TextStream:
    """Turns generated token ids into text pieces as they arrive, never splitting a UTF-8 character: a token
    that ends mid-character is held back until the next one completes it (invalid bytes become U+FFFD)."""

    def __init__(self, decode_bytes: Callable[[list[int]], bytes] | None, decode: Callable[[list[int]], str]) -> None:
        self._decode_bytes, self._decode = decode_bytes, decode
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._ids: list[int] = []
        self._text = ""

    def push(self, token: int) -> str:
        """The new text this token completes (possibly empty)."""
        if self._decode_bytes is not None:
            return self._utf8.decode(self._decode_bytes([token]))
        # Tokenizers without a byte-level decode (SentencePiece): decode the whole reply, emit what is new once it
        # no longer ends in a replacement character.
        self._ids.append(token)
        text = self._decode(self._ids)
        if text.endswith("\ufffd") or not text.startswith(self._text):
            return ""
        new, self._text = text[len(self._text) :], text
        return new

    def flush(self) -> str:
        """Whatever is still held back at the end (incomplete bytes become U+FFFD)."""
        if self._decode_bytes is not None:
            return self._utf8.decode(b"", final=True)
        text = self._decode(self._ids)
        new = text[len(self._text) :] if text.startswith(self._text) else ""
        self._text = text
        return new


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
