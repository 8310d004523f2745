"""The OpenAI wire format: request bodies (validated, unknown fields refused), the World chat format, and the
response and stream-chunk objects.

Chat messages become the RWKV World chat format that `rwkvctl chat` uses — `System: …`, `User: …`, `Assistant: …`,
each turn ended by a blank line, the prompt ending in `Assistant:` — encoded one segment at a time (a role header and
its text, an assistant's text on its own), so a conversation's prompt for turn n+1 starts with exactly the tokens of
its prompt for turn n, and the prefix-state cache finds it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from rwkvctl.generate.engine import DecodeSettings
from rwkvctl.generate.sampling import Penalties, SamplingConfig
from rwkvctl.lifecycle.chat import TURN_END, normalize_message

ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
MAX_STOPS = 4


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Sampling(BaseModel):
    """The settings both endpoints share (OpenAI's names and ranges; top_k is an extension)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0
    stop: str | list[str] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)] = 0.0
    seed: int | None = None
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        return value

    def stop_texts(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stops if s)

    def decode_settings(self, max_tokens: int, eod: int, extra_stops: tuple[str, ...] = ()) -> DecodeSettings:
        return DecodeSettings(
            SamplingConfig(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k),
            # OpenAI's penalties: every occurrence counts, nothing decays
            Penalties(presence=self.presence_penalty, frequency=self.frequency_penalty, decay=1.0),
            max_tokens=max_tokens,
            stop_texts=(*self.stop_texts(), *extra_stops),
            stop_tokens=(eod,),
            seed=self.seed,
            layout_presence_only=False,
        )


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # OpenAI's default for completions

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None

    def limit(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


def chat_prompt(messages: list[ChatMessage], encode: Callable[[str], list[int]]) -> list[int]:
    """The World chat format, encoded segment by segment (see the module doc)."""
    ids: list[int] = []
    for message in messages:
        text = normalize_message(message.text())
        if message.role == "assistant":
            ids += encode(f"{ROLES['assistant']}:") + encode(f" {text}{TURN_END}")
        else:
            role = ROLES["system"] if message.role == "developer" else ROLES[message.role]
            ids += encode(f"{role}: {text}{TURN_END}")
    return ids + encode(f"{ROLES['assistant']}:")


# --- responses -------------------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def completion_body(rid: str, model: str, text: str, finish: str | None, use: dict | None) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
        **({"usage": use} if use is not None else {}),
    }


def chat_body(rid: str, model: str, text: str, finish: str | None, use: dict) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                     "logprobs": None}],
        "usage": use,
    }


def chat_chunk(rid: str, model: str, delta: dict[str, str], finish: str | None,
               use: dict | None = None, choices: bool = True) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}] if choices else [],
        **({"usage": use} if use is not None else {}),
    }


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
