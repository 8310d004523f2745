"""The HTTP side of `rwkvctl serve`: an OpenAI-compatible ASGI app (FastAPI) over one Scheduler.

Routes: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streaming as server-sent
events in OpenAI's chunk format, or one JSON body), GET /metrics (Prometheus text). Every error is OpenAI's error
object with the right 4xx status; a bad request never disturbs the others, and a client that disconnects cancels its
work at the next decode step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from rwkvctl.errors import ConfigError
from rwkvctl.generate.engine import DecodeSettings, InferenceEngine
from rwkvctl.lifecycle.chat import TURN_END
from rwkvctl.serve import protocol
from rwkvctl.serve.prefix_cache import PrefixStateCache
from rwkvctl.serve.scheduler import Event, QueueFullError, Scheduler
from rwkvctl.serve.scheduler import Request as Job


@dataclass
class ServeSettings:
    model_name: str
    api_key: str | None = None
    max_prompt_tokens: int = 32768
    max_tokens_limit: int = 4096
    default_chat_max_tokens: int = 512


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.body = status, protocol.error_body(message, kind, param, code)


def create_app(engine: InferenceEngine, scheduler: Scheduler, settings: ServeSettings) -> FastAPI:
    app = FastAPI(title="rwkvctl", docs_url=None, redoc_url=None, openapi_url=None)
    http_counts: Counter[tuple[str, int]] = Counter()
    started = time.time()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        kind = first.get("type", "")
        if kind == "json_invalid":
            return _error(ApiError(400, "the request body is not valid JSON"))
        if kind == "extra_forbidden":
            return _error(ApiError(400, f"unknown field {where!r}", param=where or None))
        return _error(ApiError(400, f"{where or 'body'}: {first.get('msg', 'invalid value')}", param=where or None))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return _error(exc)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": settings.model_name, "queue_depth": scheduler.queue_depth}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": settings.model_name, "object": "model", "created": int(started), "owned_by": "rwkvctl"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: protocol.CompletionRequest, request: Request) -> Response:
        _check_model(body.model, settings)
        prompt = engine.tokenizer.encode(body.text())
        decode = _settings(body, body.max_tokens or 16, prompt, engine, settings)
        rid = protocol.new_id("cmpl")

        def chunk(text: str, finish: str | None, use: dict | None) -> dict:
            return protocol.completion_body(rid, settings.model_name, text, finish, use)

        return await _respond(request, scheduler, body, prompt, decode, chunk, None,
                              lambda text, finish, use: protocol.completion_body(rid, settings.model_name, text,
                                                                                 finish, use))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: protocol.ChatRequest, request: Request) -> Response:
        _check_model(body.model, settings)
        prompt = protocol.chat_prompt(body.messages, engine.tokenizer.encode)
        decode = _settings(body, body.limit(settings.default_chat_max_tokens), prompt, engine, settings,
                           extra_stops=(TURN_END,))  # a blank line ends the assistant's turn
        rid = protocol.new_id("chatcmpl")

        def chunk(text: str, finish: str | None, use: dict | None) -> dict:
            delta = {"content": text} if text else {}
            return protocol.chat_chunk(rid, settings.model_name, delta, finish, use, choices=use is None)

        first = protocol.chat_chunk(rid, settings.model_name, {"role": "assistant", "content": ""}, None)
        return await _respond(request, scheduler, body, prompt, decode, chunk, first,
                              lambda text, finish, use: protocol.chat_body(rid, settings.model_name, text, finish,
                                                                           use), strip_lead=True)

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(_metrics_text(scheduler, http_counts), media_type="text/plain; version=0.0.4")

    app.add_middleware(_AuthAndCount, api_key=settings.api_key, counts=http_counts)
    return app


class _AuthAndCount:
    """Plain ASGI middleware (FastAPI's decorator kind would end streams early): the API key on every route but
    /health, and a count of responses by route and status for /metrics."""

    def __init__(self, app: Any, api_key: str | None, counts: Counter[tuple[str, int]]) -> None:
        self.app, self.api_key, self.counts = app, api_key, counts

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        label = path if path in _ROUTES else "other"
        if self.api_key is not None and path != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                self.counts[(label, 401)] += 1
                denied = _error(ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                         "authentication_error", code="invalid_api_key"))
                await denied(scope, receive, send)
                return

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.counts[(label, int(message["status"]))] += 1
            await send(message)

        await self.app(scope, receive, counting_send)


_ROUTES = {"/health", "/v1/models", "/v1/completions", "/v1/chat/completions", "/metrics"}


def _error(exc: ApiError) -> Response:
    return JSONResponse(exc.body, status_code=exc.status)


def _check_model(name: str, settings: ServeSettings) -> None:
    if name != settings.model_name:
        raise ApiError(404, f"the model {name!r} does not exist; this server has {settings.model_name!r}",
                       param="model", code="model_not_found")


def _settings(body: protocol._Sampling, max_tokens: int, prompt: list[int], engine: InferenceEngine,
              settings: ServeSettings, extra_stops: tuple[str, ...] = ()) -> DecodeSettings:
    if not prompt:
        raise ApiError(400, "the prompt is empty", param="prompt")
    if len(prompt) > settings.max_prompt_tokens:
        raise ApiError(400, f"the prompt has {len(prompt)} tokens; this server takes at most "
                       f"{settings.max_prompt_tokens} (--max-prompt-tokens)", code="context_length_exceeded")
    if max_tokens > settings.max_tokens_limit:
        raise ApiError(400, f"max_tokens {max_tokens} is over this server's limit of {settings.max_tokens_limit}",
                       param="max_tokens")
    try:
        return body.decode_settings(max_tokens, engine.eod_id, extra_stops)
    except ConfigError as e:
        raise ApiError(400, str(e)) from None


async def _respond(
    request: Request,
    scheduler: Scheduler,
    body: protocol._Sampling,
    prompt: list[int],
    decode: DecodeSettings,
    chunk: Callable[[str, str | None, dict | None], dict],
    first: dict | None,
    whole: Callable[[str, str | None, dict], dict],
    strip_lead: bool = False,
) -> Response:
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()
    job = Job(prompt, decode, deliver=lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
    try:
        scheduler.submit(job)
    except QueueFullError as e:
        raise ApiError(429, f"the server is busy ({e}); retry later", "rate_limit_error",
                       code="rate_limit_exceeded") from None
    lead = _LeadStrip(strip_lead)

    def use() -> dict:
        return protocol.usage(len(prompt), job.completion_tokens, job.cached_tokens)

    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage

        async def sse() -> AsyncIterator[str]:
            try:
                if first is not None:
                    yield _sse(first)
                while True:
                    event = await events.get()
                    if event.error is not None:
                        yield _sse(protocol.error_body(f"generation failed: {event.error}", "server_error"))
                        break
                    text = lead(event.text)
                    if text or event.finished:
                        yield _sse(chunk(text, event.finish_reason if event.finished else None, None))
                    if event.finished:
                        break
                if include_usage:
                    yield _sse(chunk("", None, use()))
                yield "data: [DONE]\n\n"
            finally:
                job.cancel()  # a client that went away (or a finished job: a no-op) costs nothing more

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    parts: list[str] = []
    try:
        while True:
            try:
                event = await asyncio.wait_for(events.get(), timeout=0.25)
            except TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    return Response(status_code=499)
                continue
            parts.append(lead(event.text))
            if event.finished:
                break
    except asyncio.CancelledError:
        job.cancel()
        raise
    if event.error is not None:
        raise ApiError(500, f"generation failed: {event.error}", "server_error")
    return JSONResponse(whole("".join(parts), event.finish_reason, use()))


class _LeadStrip:
    """A chat reply's first character is the space after "Assistant:"; it is not part of what the bot says."""

    def __init__(self, active: bool) -> None:
        self.pending = active

    def __call__(self, text: str) -> str:
        if self.pending and text:
            self.pending = False
            return text[1:] if text.startswith(" ") else text
        return text


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _metrics_text(scheduler: Scheduler, http_counts: Counter[tuple[str, int]]) -> str:
    c = scheduler.counters
    lines = ["# TYPE rwkvctl_http_requests_total counter"]
    lines += [f'rwkvctl_http_requests_total{{path="{p}",code="{code}"}} {n}' for (p, code), n in
              sorted(http_counts.items())]
    rows: list[tuple[str, str, float]] = [
        ("rwkvctl_requests_total", "counter", c.requests),
        ("rwkvctl_requests_completed_total", "counter", c.completed),
        ("rwkvctl_requests_cancelled_total", "counter", c.cancelled),
        ("rwkvctl_requests_failed_total", "counter", c.failed),
        ("rwkvctl_prompt_tokens_ingested_total", "counter", c.prompt_tokens),
        ("rwkvctl_completion_tokens_total", "counter", c.completion_tokens),
        ("rwkvctl_decode_steps_total", "counter", c.decode_steps),
        ("rwkvctl_decode_batch_size_mean", "gauge", c.batched_rows / c.decode_steps if c.decode_steps else 0.0),
        ("rwkvctl_queue_depth", "gauge", scheduler.queue_depth),
        ("rwkvctl_tokens_per_second", "gauge", round(scheduler.tokens_per_second(), 3)),
    ]
    cache = scheduler.cache
    if cache is not None:
        s = cache.stats
        rows += [
            ("rwkvctl_cache_hits_total", "counter", s.hits),
            ("rwkvctl_cache_misses_total", "counter", s.misses),
            ("rwkvctl_cache_cached_tokens_total", "counter", s.cached_tokens),
            ("rwkvctl_cache_entries", "gauge", s.entries),
            ("rwkvctl_cache_bytes", "gauge", s.bytes),
            ("rwkvctl_cache_spilled_entries", "gauge", s.spilled_entries),
        ]
    for name, kind, value in rows:
        lines += [f"# TYPE {name} {kind}", f"{name} {value}"]
    return "\n".join(lines) + "\n"


# --- running -------------------------------------------------------------------------------------------------------


def build_server(
    engine: InferenceEngine,
    settings: ServeSettings,
    *,
    cache: PrefixStateCache | None,
    max_batch: int = 16,
    max_queue: int = 64,
) -> tuple[FastAPI, Scheduler]:
    scheduler = Scheduler(engine, cache, max_batch=max_batch, max_queue=max_queue)
    return create_app(engine, scheduler, settings), scheduler


def serve_forever(app: FastAPI, scheduler: Scheduler, host: str, port: int) -> None:
    """Run until interrupted (Ctrl-C / SIGTERM end it cleanly)."""
    scheduler.start()
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    finally:
        scheduler.stop()


class BackgroundServer:
    """The server on a thread (tests, benchmarks): `with BackgroundServer(app, scheduler) as url: ...`."""

    def __init__(self, app: FastAPI, scheduler: Scheduler, host: str = "127.0.0.1", port: int = 0) -> None:
        self.scheduler = scheduler
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    access_log=False, lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, name="rwkvctl-http", daemon=True)

    def __enter__(self) -> str:
        self.scheduler.start()
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        sock = self.server.servers[0].sockets[0]
        host, port = sock.getsockname()[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.scheduler.stop()
