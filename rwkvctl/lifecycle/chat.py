"""`rwkvctl chat` as a lifecycle stage: a multi-turn conversation in RNN mode with constant memory.

The conversation is one running RNN state. A turn feeds `"{user}: {message}\n\n{bot}:"` (the RWKV World chat
format: no space after the last colon, a blank line ends every turn), then generates token by token until the
reply contains a blank line, which is fed too, so the state always ends on a turn boundary. Nothing grows with the
length of the conversation except the transcript text: the model sees only its fixed-size state.

Snapshots make `retry` (re-sample the last reply) and `reset` (back to the start) free, and the state can be saved
to and loaded from disk (`rwkvctl.io.state_file`), which neither the `rwkv` package nor rwkv.cpp offers.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rwkvctl.errors import ConfigError
from rwkvctl.generate import DecodeSettings, InferenceEngine, Penalties, SamplingConfig
from rwkvctl.io.state_file import SavedState, load_state, save_state
from rwkvctl.model.rwkv5 import RWKV5
from rwkvctl.model.state import RecurrentState

TURN_END = "\n\n"


@dataclass
class ChatSettings:
    user: str = "User"
    bot: str = "Assistant"
    system: str | None = None
    """Fed once before the first turn as "System: ...", e.g. a persona or instructions."""
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=1.0, top_p=0.3))
    penalties: Penalties = field(default_factory=lambda: Penalties(presence=0.0, frequency=1.0, decay=0.996))
    max_reply_tokens: int = 500
    chunk_len: int = 256
    """Prompt tokens per sequence-form call: bounds memory for long messages."""
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_reply_tokens < 1 or self.chunk_len < 1:
            raise ConfigError("max reply tokens and chunk length must be at least 1")
        for name in ("user", "bot"):
            value = getattr(self, name)
            if not value or "\n" in value or ":" in value:
                raise ConfigError(f"chat role name {value!r} must be non-empty, one line and without ':'")


@dataclass
class Reply:
    text: str
    tokens: int
    seconds: float
    stopped: str  # "turn_end" (the model ended its turn) or "max_tokens"


@dataclass
class _Snapshot:
    state: RecurrentState | None
    logits: Tensor | None
    transcript: int  # number of transcript entries
    tokens_seen: int


def normalize_message(text: str) -> str:
    """One user message as the model saw them in training: no blank lines inside (a blank line ends a turn)."""
    return re.sub(r"\n+", "\n", text.replace("\r\n", "\n").replace("\r", "\n")).strip()


class Conversation:
    """A chat with one model. `say(message)` yields the reply as text pieces while it is generated."""

    def __init__(
        self,
        model: RWKV5,
        tokenizer: Any,
        settings: ChatSettings | None = None,
        *,
        sampler: Callable[[Tensor], int] | None = None,
    ) -> None:
        self.model, self.tok = model, tokenizer
        self.settings = settings or ChatSettings()
        self.engine = InferenceEngine(model, tokenizer, chunk_len=self.settings.chunk_len)
        # one random source for the whole conversation, so a seeded chat repeats turn after turn
        seed = self.settings.seed
        self._generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self._sample = sampler  # None: the engine samples with the settings
        self.state: RecurrentState | None = None
        self.logits: Tensor | None = None
        self.transcript: list[tuple[str, str]] = []  # (role, text)
        self.tokens_seen = 0
        self.last_reply: Reply | None = None
        if self.settings.system:
            self._feed(f"System: {normalize_message(self.settings.system)}{TURN_END}")
            self.transcript.append(("System", normalize_message(self.settings.system)))
        self._open_turn: object | None = None  # set while a reply is being generated
        self._start = self._snapshot()
        self._before_last: _Snapshot | None = None
        self._last_message: str | None = None

    # --- state ---------------------------------------------------------------------------------------------------

    def _snapshot(self) -> _Snapshot:
        state = self.state.clone() if self.state is not None else None
        logits = None if self.logits is None else self.logits.clone()
        return _Snapshot(state, logits, len(self.transcript), self.tokens_seen)

    def _restore(self, snap: _Snapshot) -> None:
        self.state = snap.state.clone() if snap.state is not None else None
        self.logits = None if snap.logits is None else snap.logits.clone()
        del self.transcript[snap.transcript :]
        self.tokens_seen = snap.tokens_seen
        self._open_turn = None

    def _feed(self, text: str) -> None:
        ids = self.tok.encode(text)
        if not ids:
            return
        self.logits, self.state = self.engine.ingest(ids, self.state)
        self.tokens_seen += len(ids)

    def state_bytes(self) -> int:
        """Memory of the conversation's state: fixed by the model's shape, whatever the conversation's length."""
        if self.state is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.state.att_shift, self.state.ffn_shift, self.state.wkv))

    # --- turns ---------------------------------------------------------------------------------------------------

    def say(self, message: str) -> Iterator[str]:
        """Send one user message; the returned iterator feeds it and yields the reply's text as it is generated
        (see `last_reply` afterwards). An empty message is refused at once."""
        message = normalize_message(message)
        if not message:
            raise ConfigError("empty message")
        return self._turn(message)

    def retry(self) -> Iterator[str]:
        """Forget the last reply and sample a new one for the same message."""
        if self._before_last is None or self._last_message is None:
            raise ConfigError("nothing to retry yet")
        before, message = self._before_last, self._last_message
        return self._retry(before, message)

    def _retry(self, before: _Snapshot, message: str) -> Iterator[str]:
        self._restore(before)
        yield from self._turn(message)

    def _turn(self, message: str) -> Iterator[str]:
        if self._open_turn is not None:  # an earlier reply was abandoned midway: forget that turn first
            self.cancel()
        before = self._before_last = self._snapshot()
        self._last_message = message
        turn = self._open_turn = object()
        try:
            s = self.settings
            self._feed(f"{s.user}: {message}{TURN_END}{s.bot}:")
            self.transcript.append((s.user, message))
            yield from self._generate_reply()
            self._open_turn = None
        except BaseException:
            # An error, Ctrl-C, or the iterator closed early: never leave the state in the middle of a turn.
            if self._open_turn is turn:
                self._restore(before)
            raise

    def cancel(self) -> None:
        """Forget the message being answered and its partial reply (e.g. after Ctrl-C)."""
        if self._open_turn is not None and self._before_last is not None:
            self._restore(self._before_last)
            self._before_last = self._last_message = None

    def reset(self) -> None:
        """Back to the start (after the system prompt, or the loaded state)."""
        self._restore(self._start)
        self._before_last = self._last_message = None

    def _generate_reply(self) -> Iterator[str]:
        assert self.logits is not None and self.state is not None
        t0 = time.monotonic()
        s = self.settings
        decode = DecodeSettings(
            sampling=s.sampling,
            penalties=s.penalties,
            max_tokens=s.max_reply_tokens,
            stop_texts=(TURN_END,),  # a blank line ends the turn; its tokens are fed, so the state ends on it
            banned_tokens=(self.engine.eod_id,),  # the end-of-document token would end the whole conversation
        )
        gen = self.engine.start((), decode, state=self.state, logits=self.logits, sampler=self._sample,
                                 generator=self._generator)
        shown = 0
        for piece in self.engine.run([gen]):
            self.state, self.logits = gen.state, gen.logits
            self.tokens_seen += piece.token is not None
            # a reply cut at the token limit does not end in the newlines that may have begun its turn's end
            text = piece.text.rstrip("\n") if gen.finish_reason == "length" else piece.text
            if text:
                yield _strip_lead(text, shown)
                shown += len(text)
        if gen.error is not None:
            raise gen.error
        text = gen.text
        if gen.finish_reason == "length":
            # close the turn, so the next message starts on a boundary (a reply cut after "\n" needs one more)
            self._feed(TURN_END[len(text) - len(text.rstrip("\n")) :] if text.endswith("\n") else TURN_END)
            text = text.rstrip("\n")
        reply = text[1:] if text.startswith(" ") else text
        self.transcript.append((s.bot, reply))
        stopped = "turn_end" if gen.finish_reason == "stop" else "max_tokens"
        self.last_reply = Reply(reply, len(gen.tokens), time.monotonic() - t0, stopped)

    # --- files ---------------------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        if self._open_turn is not None:
            raise ConfigError("a reply is still being generated; finish or cancel it before saving")
        if self.state is None or self.logits is None:
            raise ConfigError("nothing to save yet: send a message (or give a system prompt) first")
        info = {
            "tokenizer": getattr(self.tok, "name", type(self.tok).__name__),
            "user": self.settings.user,
            "bot": self.settings.bot,
            "tokens_seen": self.tokens_seen,
            "transcript": [list(entry) for entry in self.transcript],
        }
        st = self.state  # batch 1: (L, 1, ...) -> (L, ...)
        saved = SavedState(st.att_shift[:, 0], st.ffn_shift[:, 0], st.wkv[:, 0], self.logits, info)
        return save_state(path, saved, self.model.cfg)

    def load(self, path: str | Path) -> None:
        """Continue from a saved state; it becomes what `reset` returns to."""
        weight = self.model.emb.weight
        saved = load_state(path, self.model.cfg)
        tokenizer = getattr(self.tok, "name", type(self.tok).__name__)
        saved_with = saved.info.get("tokenizer", tokenizer)
        if saved_with != tokenizer:
            raise ConfigError(f"{path}: saved with the {saved_with!r} tokenizer, this chat uses {tokenizer!r}")
        self.state = RecurrentState(  # (L, ...) -> (L, 1, ...), in the model's dtype; wkv stays fp32
            saved.att_shift.unsqueeze(1).to(weight.device, weight.dtype),
            saved.ffn_shift.unsqueeze(1).to(weight.device, weight.dtype),
            saved.wkv.unsqueeze(1).to(weight.device),
        )
        self.logits = saved.logits.to(weight.device)
        transcript = saved.info.get("transcript")
        entries = transcript if isinstance(transcript, list) else []
        self.transcript = [(str(e[0]), str(e[1])) for e in entries if isinstance(e, list) and len(e) == 2]
        tokens_seen = saved.info.get("tokens_seen", 0)
        self.tokens_seen = tokens_seen if isinstance(tokens_seen, int) else 0
        # The state was built with its own role names: keep using them, or the model sees a format change.
        for role in ("user", "bot"):
            name = saved.info.get(role)
            if isinstance(name, str) and name and "\n" not in name and ":" not in name:
                setattr(self.settings, role, name)
        self._open_turn = None
        self._start = self._snapshot()
        self._before_last = self._last_message = None


def _strip_lead(piece: str, shown: int) -> str:
    """The reply's first character is the space after "Assistant:"; it is not part of what the bot says."""
    return piece[1:] if shown == 0 and piece.startswith(" ") else piece
