"""The one inference engine: prompt ingestion and ONE decode loop, over a batch of generations that each carry their
own settings. `chat`, `generate` and the server are front ends over it; none has a decode loop of its own.

A generation owns its recurrent state (batch 1) and its next-token logits. `InferenceEngine.step` advances every
unfinished generation it is given by one token: each row's logits are processed and sampled on their own (penalties,
banned tokens, temperature/top-p/top-k, its own random generator), then all the chosen tokens go through the model
in ONE batched RNN step. So a batch of requests costs one pass over the weights per token, and a row's tokens are the
same whether it runs alone or beside others. Rows can join or leave between steps (continuous batching): the batched
state is rebuilt only when the set of rows changes.

Every emitted token is fed, the last one included, so a finished generation's state holds everything it said (chat
relies on that: a reply that ends in its blank line leaves the state on a turn boundary). A stop token ends a
generation without being shown or fed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from rwkvctl.errors import ConfigError, NumericsError
from rwkvctl.generate.sampling import Penalties, PenaltyTracker, SamplingConfig, sample
from rwkvctl.generate.text import StopTexts, TextStream
from rwkvctl.model.rwkv5 import RWKV5
from rwkvctl.model.state import RecurrentState

FinishReason = Literal["stop", "length", "error"]
Sampler = Callable[[Tensor], int]


@dataclass
class DecodeSettings:
    """How one generation is decoded and when it ends."""

    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    penalties: Penalties = field(default_factory=Penalties)
    max_tokens: int = 200
    stop_texts: tuple[str, ...] = ()
    """The generation ends when its text contains one of these; the stop text is not part of the output."""
    stop_tokens: tuple[int, ...] = ()
    """A sampled stop token (e.g. end of document) ends the generation; it is neither shown nor fed."""
    banned_tokens: tuple[int, ...] = ()
    """Never sampled (their logits become -inf)."""
    seed: int | None = None
    layout_presence_only: bool = True
    """ChatRWKV's rule: whitespace and digit tokens count for the presence penalty only. False gives OpenAI's
    penalties (every occurrence counts), with decay 1."""

    def __post_init__(self) -> None:
        s, p = self.sampling, self.penalties
        if not all(math.isfinite(v) for v in (s.temperature, s.top_p, p.presence, p.frequency, p.decay)):
            raise ConfigError("sampling settings and penalties must be finite numbers")
        if s.temperature < 0 or not 0 < s.top_p <= 1 or s.top_k < 0 or not 0 < p.decay <= 1:
            raise ConfigError("need temperature >= 0, 0 < top_p <= 1, top_k >= 0 and 0 < decay <= 1")
        if self.max_tokens < 1:
            raise ConfigError(f"max tokens must be at least 1, got {self.max_tokens}")


@dataclass
class Piece:
    """What one decode step did for one generation."""

    generation: Generation
    token: int | None  # None when nothing was emitted (a stop token, or an error)
    text: str  # text that became visible with this step (possibly empty)
    finished: bool


class Generation:
    """One sequence being decoded: its state and next-token logits, its settings, and what it has produced."""

    def __init__(
        self,
        logits: Tensor,
        state: RecurrentState,
        settings: DecodeSettings,
        stream: TextStream,
        *,
        banned: Tensor,
        exempt: Callable[[int], bool],
        sampler: Sampler | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.logits, self.state, self.settings = logits, state, settings
        if generator is None and settings.seed is not None:
            generator = torch.Generator().manual_seed(settings.seed)
        self._sampler = sampler or (lambda row: sample(row, settings.sampling, generator))
        self._banned = banned  # token ids (CPU, long)
        self._penalties = PenaltyTracker(settings.penalties, exempt=exempt)
        self._stops = StopTexts(settings.stop_texts)
        self._stream = stream
        self.tokens: list[int] = []
        self.text = ""  # everything decoded so far (after the end: the output, stop text removed)
        self.shown = 0  # how much of `text` has been handed out
        self.finish_reason: FinishReason | None = None
        self.error: Exception | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def choose(self) -> int:
        """The next token from the current logits, after this generation's penalties and bans."""
        logits = self._penalties.apply_(self.logits.float().cpu().clone())  # (V,); self.logits stays as predicted
        if self._banned.numel():
            logits[self._banned] = float("-inf")
        return self._sampler(logits)

    def accept(self, token: int) -> str:
        """Record an emitted token; the text that may now be shown. Ends the generation at a stop text or at the
        token limit."""
        self._penalties.update(token)
        self.tokens.append(token)
        checked = len(self.text)
        self.text += self._stream.push(token)
        hit = self._stops.find(self.text, checked) if self._stops else -1
        if hit >= 0:
            self.text, self.finish_reason = self.text[:hit], "stop"
            visible = hit
        elif len(self.tokens) >= self.settings.max_tokens:
            self.text += self._stream.flush()
            self.finish_reason, visible = "length", len(self.text)
        else:
            visible = len(self.text) - self._stops.held(self.text)  # a possible stop text's start waits
        return self._reveal(visible)

    def stop(self, reason: FinishReason, error: Exception | None = None) -> str:
        """End without emitting a token (a stop token, or an error): the held-back text is shown."""
        self.finish_reason, self.error = reason, error
        if error is not None:
            return ""
        self.text += self._stream.flush()
        return self._reveal(len(self.text))

    def _reveal(self, visible: int) -> str:
        piece = self.text[self.shown : visible]
        self.shown = max(self.shown, visible)
        return piece


class InferenceEngine:
    """A model and its tokenizer, ready to ingest prompts and decode batches of generations."""

    def __init__(self, model: RWKV5, tokenizer: Any, *, chunk_len: int = 256) -> None:
        if chunk_len < 1:
            raise ConfigError("the prompt chunk length must be at least 1")
        self.model, self.tokenizer, self.chunk_len = model, tokenizer, chunk_len
        self.eod_id: int = getattr(tokenizer, "eod_id", 0)
        self.vocab_size = min(int(getattr(tokenizer, "vocab_size", model.cfg.vocab_size)), model.cfg.vocab_size)
        self._exempt: dict[int, bool] = {}
        self._batch: tuple[list[Generation], RecurrentState] | None = None  # the last step's rows and their state

    @property
    def device(self) -> torch.device:
        return self.model.emb.weight.device

    # --- prompts -------------------------------------------------------------------------------------------------

    def ingest(self, tokens: Sequence[int], state: RecurrentState | None = None) -> tuple[Tensor, RecurrentState]:
        """Run tokens through the sequence form from `state`; the last position's logits (V,) and the state."""
        return ingest(self.model, tokens, state, self.chunk_len)

    def start(
        self,
        prompt: Sequence[int] = (),
        settings: DecodeSettings | None = None,
        *,
        state: RecurrentState | None = None,
        logits: Tensor | None = None,
        sampler: Sampler | None = None,
        generator: torch.Generator | None = None,
    ) -> Generation:
        """A generation that continues `prompt` after `state` (with the `logits` that state predicts, when the prompt
        is empty). `generator` is the random source when given (e.g. one that lives across a chat's turns)."""
        if prompt:
            logits, state = self.ingest(prompt, state)
        if logits is None or state is None:
            raise ConfigError("nothing to continue: give a prompt, or a state with its logits")
        settings = settings or DecodeSettings()
        stream = TextStream(getattr(self.tokenizer, "decode_bytes", None), self.tokenizer.decode)
        padded = range(self.vocab_size, self.model.cfg.vocab_size)  # model rows the tokenizer cannot decode
        banned = torch.tensor(sorted({*settings.banned_tokens, *padded}), dtype=torch.long)
        exempt = self.presence_only if settings.layout_presence_only else _never
        return Generation(logits, state, settings, stream, banned=banned, exempt=exempt,
                          sampler=sampler, generator=generator)

    # --- decoding ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, generations: Sequence[Generation]) -> list[Piece]:
        """Advance every unfinished generation by one token (one batched model step for all of them)."""
        pieces: list[Piece] = []
        fed: list[Generation] = []
        tokens: list[int] = []
        for gen in generations:
            if gen.done:
                continue
            try:
                token = gen.choose()
            except NumericsError as e:  # this row's reply ends; the others go on
                pieces.append(Piece(gen, None, gen.stop("error", e), True))
                continue
            if token in gen.settings.stop_tokens:
                pieces.append(Piece(gen, None, gen.stop("stop"), True))
                continue
            pieces.append(Piece(gen, token, gen.accept(token), gen.done))
            fed.append(gen)
            tokens.append(token)
        if fed:
            logits, state = self.model.step(torch.tensor(tokens, device=self.device), self._batched_state(fed))
            for i, gen in enumerate(fed):
                gen.logits, gen.state = logits[i], state.rows(i)  # views into the batch: no copy per row
            self._batch = (fed, state)
        return pieces

    def run(self, generations: Sequence[Generation]) -> Iterator[Piece]:
        """Step until every generation has finished, yielding each step's pieces as they come."""
        while any(not g.done for g in generations):
            yield from self.step(generations)

    def generate(self, prompt: Sequence[int], settings: DecodeSettings | None = None, **kwargs: Any) -> Iterator[str]:
        """One generation's text pieces as they become visible; raises the generation's error, if any, at the end
        of its output."""
        gen = self.start(prompt, settings, **kwargs)
        for piece in self.run([gen]):
            if piece.text:
                yield piece.text
        if gen.error is not None:
            raise gen.error

    def _batched_state(self, rows: list[Generation]) -> RecurrentState:
        """The rows' states as one batch: the last step's batched state when the rows are the same and none of
        their states was replaced since (a chat restoring a snapshot, say), else a fresh concatenation."""
        if self._batch is not None:
            last_rows, last_state = self._batch
            if len(last_rows) == len(rows) and all(
                a is b and a.state.wkv.data_ptr() == last_state.wkv[:, i].data_ptr()
                and a.state.wkv.shape[1] == 1
                for i, (a, b) in enumerate(zip(last_rows, rows, strict=True))
            ):
                return last_state
        return RecurrentState.cat([gen.state for gen in rows])

    def presence_only(self, token: int) -> bool:
        """ChatRWKV's rule: a token whose text is a substring of " \t0123456789" counts only for the presence
        penalty, so numbers and layout are not pushed out of long replies."""
        if token not in self._exempt:
            piece = self.tokenizer.decode([token])
            self._exempt[token] = piece != "" and piece in " \t0123456789"
        return self._exempt[token]


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
    """New token ids one at a time, for callers with a model and no tokenizer (ids only; no stop texts)."""
    engine = InferenceEngine(model, _IdsOnly(model.cfg.vocab_size))
    settings = DecodeSettings(sampling or SamplingConfig(), max_tokens=max_new_tokens, stop_tokens=stop_tokens,
                              seed=seed)
    gen = engine.start(prompt, settings, state=state)
    for piece in engine.run([gen]):
        if piece.token is not None:
            yield piece.token
    if gen.error is not None:
        raise gen.error


def _never(token: int) -> bool:
    return False


class _IdsOnly:
    """A stand-in tokenizer for decoding ids without text: every token decodes to nothing."""

    eod_id = 0

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def decode(self, ids: list[int]) -> str:
        return ""
