"""One model, many requests: a scheduler thread that batches RNN decode steps across the active requests and
ingests prompts in chunks between those steps (continuous batching of states).

Each loop: admit waiting requests up to the batch limit, drop the cancelled ones (a client that went away stops
costing anything at the next step), ingest ONE prompt chunk for the oldest request still reading its prompt, then
advance every decoding request by one token in one batched `InferenceEngine.step`. A long prompt therefore delays the
others by one chunk per token, never by the whole prompt. Prompts start from the longest cached prefix
(prefix_cache.py); states at the end of each prompt and each finished reply go into the cache.

The scheduler never touches HTTP: it reports through each request's `deliver` callback (called on its thread), which
the server turns into an asyncio queue.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from rwkvctl.generate.engine import DecodeSettings, Generation, InferenceEngine
from rwkvctl.model.state import RecurrentState
from rwkvctl.serve.prefix_cache import PrefixStateCache


class QueueFullError(Exception):
    """More requests than --max-queue are waiting or running."""


@dataclass
class Event:
    """What a request's client hears: new text, and at the end the reason and the counts."""

    text: str = ""
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "error"
    error: str | None = None


@dataclass
class Request:
    prompt: list[int]
    settings: DecodeSettings
    deliver: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    # filled in by the scheduler
    cached_tokens: int = 0
    completion_tokens: int = 0
    generation: Generation | None = None
    _pos: int = 0  # prompt tokens ingested so far (cached ones included)
    _state: RecurrentState | None = None
    _logits: Tensor | None = None

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class Counters:
    requests: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    decode_steps: int = 0
    batched_rows: int = 0  # sum of batch sizes over decode steps


class Scheduler:
    def __init__(
        self,
        engine: InferenceEngine,
        cache: PrefixStateCache | None = None,
        *,
        max_batch: int = 16,
        max_queue: int = 64,
    ) -> None:
        self.engine, self.cache = engine, cache
        self.max_batch, self.max_queue = max_batch, max_queue
        self.counters = Counters()
        self._waiting: collections.deque[Request] = collections.deque()
        self._active: list[Request] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) for tokens/s

    # --- the request side --------------------------------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        with self._wake:
            if len(self._waiting) + len(self._active) >= self.max_queue:
                raise QueueFullError(f"{self.max_queue} requests are already waiting or running")
            self._waiting.append(request)
            self.counters.requests += 1
            self._wake.notify()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting) + len(self._active)

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self._recent) if now - t <= window]
        return sum(n for _, n in recent) / window if recent else 0.0

    # --- the thread --------------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="rwkvctl-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not self._active:
                    self._wake.wait()
                if self._stopping:
                    return
                while self._waiting and len(self._active) < self.max_batch:
                    self._active.append(self._waiting.popleft())
            try:
                self._once()
            except Exception as e:  # a bug or an exhausted device must not take the server down with it
                for request in self._active:
                    request.deliver(Event(finished=True, finish_reason="error", error=f"{type(e).__name__}: {e}"))
                self.counters.failed += len(self._active)
                with self._wake:
                    self._active.clear()

    def _once(self) -> None:
        for request in [r for r in self._active if r.cancelled.is_set()]:
            self._active.remove(request)
            self.counters.cancelled += 1
        reading = next((r for r in self._active if r.generation is None), None)
        if reading is not None:
            self._ingest_chunk(reading)
        decoding = [r for r in self._active if r.generation is not None]
        if not decoding:
            return
        pieces = self.engine.step([r.generation for r in decoding if r.generation is not None])
        self.counters.decode_steps += 1
        self.counters.batched_rows += len(decoding)
        emitted = 0
        by_generation = {id(r.generation): r for r in decoding}
        for piece in pieces:
            request = by_generation[id(piece.generation)]
            emitted += piece.token is not None
            request.completion_tokens += piece.token is not None
            if not piece.finished:
                if piece.text:
                    request.deliver(Event(piece.text))
                continue
            self._finish(request, piece.text)
        self.counters.completion_tokens += emitted
        self._recent.append((time.monotonic(), emitted))
        while self._recent and time.monotonic() - self._recent[0][0] > 60:
            self._recent.popleft()

    def _ingest_chunk(self, request: Request) -> None:
        if request._pos == 0 and self.cache is not None:
            hit = self.cache.longest_prefix(request.prompt)
            if hit is not None:
                device = self.engine.device
                request._state = RecurrentState(*(t.to(device) for t in (hit.state.att_shift, hit.state.ffn_shift,
                                                                         hit.state.wkv)))
                request._logits = hit.logits.to(device)
                request._pos = request.cached_tokens = hit.length
        end = min(request._pos + self.engine.chunk_len, len(request.prompt))
        if end > request._pos:
            request._logits, request._state = self.engine.ingest(request.prompt[request._pos : end], request._state)
            self.counters.prompt_tokens += end - request._pos
            request._pos = end
        if request._pos < len(request.prompt):
            return
        assert request._state is not None and request._logits is not None
        if self.cache is not None and request.cached_tokens < len(request.prompt):
            self.cache.put(request.prompt, request._state, request._logits)
        request.generation = self.engine.start((), request.settings, state=request._state, logits=request._logits)
        request._state = request._logits = None

    def _finish(self, request: Request, text: str) -> None:
        gen = request.generation
        assert gen is not None
        self._active.remove(request)
        if gen.error is not None:
            self.counters.failed += 1
            request.deliver(Event(text, True, "error", str(gen.error)))
            return
        if self.cache is not None and gen.tokens:
            self.cache.put(request.prompt + gen.tokens, gen.state, gen.logits)  # the turn's end, for the next turn
        self.counters.completed += 1
        request.deliver(Event(text, True, gen.finish_reason))
