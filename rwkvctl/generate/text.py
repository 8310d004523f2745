"""From generated token ids to the text a reader sees: whole UTF-8 characters, and stop texts held back until they
are decided."""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence


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


class StopTexts:
    """Where a growing text first contains one of the stop texts, and how much of its end must wait because it
    could still become one (shown too early, a stop text would reach the reader)."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(dict.fromkeys(s for s in stops if s))  # unique, in order; an empty stop never matches
        self._longest = max(map(len, self.stops), default=0)

    def __bool__(self) -> bool:
        return bool(self.stops)

    def find(self, text: str, checked: int) -> int:
        """The index where the first stop text starts, or -1; `text[:checked]` was searched before (a match can
        only end in the new part, so only the last stop-length characters before it are searched again)."""
        start = max(checked - self._longest + 1, 0)
        hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        return min(hits, default=-1)

    def held(self, text: str) -> int:
        """How many characters at the end of `text` are the beginning of a stop text."""
        return max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
