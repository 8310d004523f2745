"""JSON from files we did not write this run, read within limits: the one reader for every JSON format (checkpoint
sidecars, safetensors and state-file metadata, quantization records, prepare's manifest, trainer state).

Before anything is parsed, the size (bytes) and the nesting depth are bounded: a sidecar grown to gigabytes or
`[[[[...` 100000 deep would otherwise exhaust memory or the interpreter's recursion limit, far from the file at
fault. Every problem (too big, too deep, not UTF-8, not JSON, not the expected top-level type) is one line of the
caller's error class naming the file. What the parsed fields must be is checked by each format's own reader
(`field` below helps them say which field and what was expected; `format_version` reads the version every format
records, in one place so that every format words a newer file the same way).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from rwkvctl.errors import RwkvctlError

MAX_BYTES = 64 << 20  # far above any real manifest (a few MB for 100k shards) or sidecar (a few KB)
MAX_DEPTH = 32  # our formats nest 4 deep at most
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")


def _depth(text: str) -> int:
    """Deepest bracket nesting outside strings (string contents may hold any brackets)."""
    depth = deepest = 0
    for b in _BRACKETS.findall(_STRINGS.sub("", text)):
        depth += 1 if b in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def loads(data: str | bytes, source: str, error: type[RwkvctlError], *, what: str = "JSON",
          expect: type = dict, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """Parse `data` (a file's bytes or an embedded string) after checking its size and depth; the top level must
    be an `expect` (dict by default)."""
    if len(data) > max_bytes:
        raise error(f"{source}: {what} of {len(data)} bytes is over the {max_bytes >> 20} MiB limit (damaged, or not "
                    "one of ours)")
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise error(f"{source}: corrupt {what} (not UTF-8 text at byte {e.start})") from None
    depth = _depth(data)
    if depth > max_depth:
        raise error(f"{source}: corrupt {what} (nested {depth} levels deep, at most {max_depth} expected)")
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, RecursionError) as e:
        raise error(f"{source}: corrupt {what} (not valid JSON: {str(e)[:120]})") from None
    if not isinstance(value, expect):
        raise error(f"{source}: {what} must be a JSON {_json_name(expect)}, found a {_json_name(type(value))}")
    return value


def read(path: str | Path, error: type[RwkvctlError], *, what: str = "JSON", expect: type = dict,
         max_bytes: int = MAX_BYTES) -> Any:
    """`loads` of a file, reading no more than the limit (a missing file is the caller's to word: OSError)."""
    path = Path(path)
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    return loads(data, str(path), error, what=what, expect=expect, max_bytes=max_bytes)


def _json_name(kind: type) -> str:
    return {dict: "object", list: "array", str: "string", int: "integer", float: "number", bool: "true/false",
            type(None): "null"}.get(kind, kind.__name__)


def field(data: dict[str, Any], key: str, kind: type | tuple[type, ...], source: str, error: type[RwkvctlError], *,
          default: Any = ..., minimum: int | float | None = None, maximum: int | float | None = None,
          where: str = "field") -> Any:
    """`data[key]` checked to be a `kind` (bool is never an int here, numbers are finite) within [minimum, maximum];
    otherwise one line naming the file, the field and what was expected. `default`: the value when absent (without
    one, absent is an error)."""
    if key not in data:
        if default is ...:
            raise error(f"{source}: {where} {key!r} is missing")
        return default
    value = data[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**53:
        value = float(value)  # JSON writes 3.0 as 3 sometimes
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if ok and isinstance(value, float) and not math.isfinite(value):
        ok = False
    if ok and minimum is not None and value < minimum:
        ok = False
    if ok and maximum is not None and value > maximum:
        ok = False
    if not ok:
        want = " or ".join(_json_name(k) for k in kinds)
        if minimum is not None or maximum is not None:
            want += f" in [{minimum if minimum is not None else '-inf'}, {maximum if maximum is not None else 'inf'}]"
        raise error(f"{source}: {where} {key!r} must be {want}, got {_short(value)}")
    return value


def format_version(data: dict[str, Any], key: str, current: int, source: str, error: type[RwkvctlError], *,
                   what: str, oldest: int = 1) -> int:
    """The format version a file records under `key`. Absent: `current` (files written before the format recorded
    its version keep loading). Not an integer in [oldest, current]: one line naming the file, the version found
    and the one supported; a newer one says to upgrade, since a newer rwkvctl wrote it."""
    if key not in data:
        return current
    value = data[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < oldest:
        supported = f"{oldest}-{current}" if oldest < current else str(current)
        raise error(f"{source}: {what} field {key!r} must be an integer format version ({supported}), got "
                    f"{_short(value)}")
    if value > current:
        raise error(f"{source}: {what} format version {value} was written by a newer rwkvctl (this one reads up to "
                    f"{current}); upgrade rwkvctl")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
