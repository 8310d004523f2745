"""Streaming corpus readers: JSONL (.jsonl, .jsonl.zst, .jsonl.gz), parquet, and `datasets` datasets.

`expand_inputs` turns files, directories and globs into a sorted, de-duplicated list. `iter_documents`
streams one input in constant memory and yields either a `Doc` (line number, UTF-8 bytes, source label)
or a `Problem` (line number, kind, detail) for every bad record: corrupt or truncated compression,
malformed JSON, a missing or non-string text field, empty text, invalid UTF-8 (including lone
surrogates from `\\ud800`-style escapes). Nothing here raises on bad data; I/O errors (OSError) propagate.
"""

from __future__ import annotations

import glob
import importlib
import json
import os
import zlib
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np

from rwkvctl.errors import DataError

try:  # 3-5x faster JSON; optional, the stdlib parser gives identical results
    import orjson

    _fast_loads: Any = orjson.loads
except ImportError:  # pragma: no cover - depends on the environment
    _fast_loads = None

JSONL_SUFFIXES = (".jsonl", ".jsonl.zst", ".jsonl.gz", ".json.zst", ".json.gz", ".jsonl.zstd")
TABLE_SUFFIXES = (".parquet",)
UNKNOWN_SOURCE = "unknown"
READ_CHUNK = 1 << 16  # small reads keep decompressed buffers out of fresh mmap pages (~30% faster)
ZSTD_STEP = 1 << 11  # compressed bytes per zstd call: at most ~64 MiB out (gzip's ratio tops out near 1000:1)
MAX_LINE_BYTES = 64 << 20  # a JSONL line longer than this is a bad document (line_too_long), never read whole


class Doc(NamedTuple):  # a NamedTuple, not a dataclass: one is built per document on the hot path
    line: int
    data: bytes  # the text, UTF-8 encoded
    source: str


class Problem(NamedTuple):
    line: int
    kind: str
    detail: str = ""


def _is_dataset_dir(p: Path) -> bool:
    return p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "state.json").is_file())


def _supported(p: Path) -> bool:
    return p.name.endswith(JSONL_SUFFIXES + TABLE_SUFFIXES)


def expand_inputs(specs: list[str]) -> list[str]:
    """Files, directories (searched recursively), globs, dataset dirs and `hf:NAME[:SPLIT]` ids -> sorted list.

    Paths come back absolute and each file once, however it was named (relative and absolute, twice, or via a
    directory and a glob), so no document is prepared twice. Symlinks are kept as named, not resolved: the
    name's suffix says how to decompress (a hub cache links `x.jsonl.zst` to a suffix-less blob).
    """
    found: dict[tuple[int, int] | str, str] = {}  # (device, inode) or hf id -> path

    def add(p: Path, must_be_supported: bool) -> None:
        if _is_dataset_dir(p):
            files = [p]
        elif p.is_dir():
            files = [f for f in p.rglob("*") if f.is_file() and _supported(f)]
        elif p.is_file() and (_supported(p) or not must_be_supported):
            files = [p]
        else:
            return
        for f in files:
            name = os.path.abspath(f)
            st = os.stat(name)
            key = (st.st_dev, st.st_ino)
            if key not in found or name < found[key]:
                found[key] = name

    for spec in specs:
        if spec.startswith("hf:"):
            found[spec] = spec
        elif Path(spec).exists():
            add(Path(spec), must_be_supported=False)  # named explicitly: taken whatever its suffix
        else:
            for m in glob.glob(spec, recursive=True):
                add(Path(m), must_be_supported=True)  # a matched directory is searched like a named one
    return sorted(found.values())


def input_size(spec: str) -> int:
    """On-disk bytes of an input (0 when unknown), for progress and ETA."""
    p = Path(spec)
    if p.is_file():
        return p.stat().st_size
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return 0


# --- byte streams ------------------------------------------------------------------------------------------------


class _CorruptInputError(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


class _Counting:
    """Wraps a binary file and counts compressed bytes consumed (progress in on-disk bytes)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.pos = 0

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.pos += len(b)
        return b


def _member_chunks(
    raw: _Counting, new: Callable[[], Any], errors: type[Exception] | tuple, fmt: str, truncated: str,
    step: int = READ_CHUNK,
) -> Iterator[bytes]:
    """Decompress back-to-back frames (zstd) or members (gzip) with `new()` decompressor objects. Data before
    damage is still yielded, and a last frame cut short at end of file is reported (unlike stream readers).
    `step`: compressed bytes per call, which bounds what one call can return (its input x the format's largest
    ratio)."""
    obj = new()
    in_frame = False
    while chunk := raw.read(step):
        while chunk:
            try:
                out = obj.decompress(chunk)
            except errors as e:
                raise _CorruptInputError("corrupt_compression", f"{fmt}: {e}") from None
            in_frame = True
            if out:
                yield out
            if not obj.eof:
                break
            chunk, in_frame = obj.unused_data, False
            obj = new()
    if in_frame:
        raise _CorruptInputError("truncated_compression", truncated)


def _zstd_chunks(raw: _Counting) -> Iterator[bytes]:
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    # zstd's decompressobj has no output limit and 4 bytes can expand to a 128 KiB block (a 49 KB file to 1.5 GiB):
    # small input steps keep one call's output under ~64 MiB, at no measurable cost on ordinary data
    yield from _member_chunks(
        raw, dctx.decompressobj, zstandard.ZstdError, "zstd", "zstd frame cut short at end of file", ZSTD_STEP
    )


def _gzip_chunks(raw: _Counting) -> Iterator[bytes]:
    yield from _member_chunks(
        raw,
        lambda: zlib.decompressobj(wbits=16 + zlib.MAX_WBITS),
        zlib.error,
        "gzip",
        "gzip stream cut short at end of file",
    )


def _plain_chunks(raw: _Counting) -> Iterator[bytes]:
    while chunk := raw.read(READ_CHUNK):
        yield chunk


class Block(NamedTuple):
    """Whole lines of a JSONL input: `data[:end]`, each line ending in b"\\n" (bytes past `end` belong to the next
    block; slicing them off would copy the block). `first` lines precede it in the input; it holds `lines`."""

    first: int
    lines: int
    data: bytes
    end: int


class _LongLine(NamedTuple):
    """One line over the limit, dropped without being kept in memory: its length, newline included."""

    size: int


def _blocks(path: Path, raw: _Counting, target: int,
            max_line: int = MAX_LINE_BYTES) -> Iterator[tuple[bytes, int] | _LongLine]:
    """Decompressed data as (data, end) with `data[:end]` whole lines of about `target` bytes; a last line without
    a newline gets one. A line longer than `max_line` comes as a `_LongLine` in its place (memory stays within
    about max_line + one decompressed chunk). Damaged compression raises after the whole lines read before it."""
    name = path.name
    if name.endswith((".zst", ".zstd")):
        chunks = _zstd_chunks(raw)
    elif name.endswith(".gz"):
        chunks = _gzip_chunks(raw)
    else:
        chunks = _plain_chunks(raw)
    parts: list[bytes] = []
    size = 0
    in_long_line = False
    skipping = 0  # > 0: bytes dropped so far of a line over the limit, until its newline
    it = iter(chunks)
    while True:
        try:
            chunk = next(it)
        except StopIteration:
            break
        except _CorruptInputError:
            if parts:
                buf = b"".join(parts)
                if (cut := buf.rfind(b"\n") + 1) > 0:
                    yield from _limited(buf, cut, max_line)
            raise
        if skipping:
            nl = chunk.find(b"\n")
            if nl < 0:
                skipping += len(chunk)
                continue
            yield _LongLine(skipping + nl + 1)
            skipping, chunk = 0, chunk[nl + 1 :]
            if not chunk:
                continue
        if in_long_line:  # `parts` holds the start of one line: is it over the limit with this chunk?
            nl = chunk.find(b"\n")
            if size + (nl + 1 if nl >= 0 else len(chunk)) > max_line:
                parts, in_long_line = [], False
                if nl < 0:
                    skipping, size = size + len(chunk), 0
                    continue
                yield _LongLine(size + nl + 1)
                chunk, size = chunk[nl + 1 :], 0
                if not chunk:
                    continue
        parts.append(chunk)
        size += len(chunk)
        if size < target or (in_long_line and b"\n" not in chunk):
            continue  # (inside a line longer than the target, only new data is searched: linear, not quadratic)
        buf = parts[0] if len(parts) == 1 else b"".join(parts)
        cut = buf.rfind(b"\n") + 1
        in_long_line = cut == 0
        if in_long_line:  # no line end yet: keep reading, unless this line alone is already over the limit
            if len(buf) > max_line:
                parts, size, skipping, in_long_line = [], 0, len(buf), False
            else:
                parts = [buf]
            continue
        parts = [buf[cut:]] if cut < len(buf) else []
        size = len(buf) - cut
        if cut > max_line:  # only a buffer over the limit can hold a line over it (rare: a huge decompressed chunk)
            yield from _limited(buf, cut, max_line)
            continue
        start = 0
        while cut - start > 2 * target:  # far too big (a small target): cut after a line near the target
            piece = buf.rfind(b"\n", start, start + target) + 1
            if piece <= start:  # one line longer than the target
                piece = buf.index(b"\n", start + target) + 1
            if piece >= cut:
                break
            yield buf[start:piece], piece - start
            start = piece
        if start:
            yield buf[start:cut], cut - start
        else:
            yield buf, cut
    if skipping:
        yield _LongLine(skipping)
    elif parts:
        buf = b"".join(parts)
        if not buf.endswith(b"\n"):
            buf += b"\n"
        yield from _limited(buf, len(buf), max_line)


def _limited(buf: bytes, cut: int, max_line: int) -> Iterator[tuple[bytes, int] | _LongLine]:
    """`buf[:cut]` (whole lines) as one block, or, when it is longer than the limit, as the blocks between its
    over-long lines and a `_LongLine` for each of those."""
    if cut <= max_line:
        yield buf, cut
        return
    seg = start = 0
    while start < cut:
        nl = buf.index(b"\n", start)
        if nl + 1 - start > max_line:
            if seg < start:
                yield buf[seg:start], start - seg
            yield _LongLine(nl + 1 - start)
            seg = nl + 1
        start = nl + 1
    if seg < cut:
        yield buf[seg:cut], cut - seg


def _count_lines(data: bytes, end: int) -> int:
    # numpy's vectorized compare counts newlines ~3x faster than bytes.count (a per-byte loop for one byte)
    return int(np.count_nonzero(np.frombuffer(data, dtype=np.uint8, count=end) == 10))


# --- records -> documents ----------------------------------------------------------------------------------------


def _get_path(obj: Any, dotted: str) -> Any:
    """`meta.redpajama_set_name` on a dict, where `meta` may itself be a JSON string (some parquet exports)."""
    cur = obj
    for key in _split_key(dotted):
        if isinstance(cur, str):
            try:
                cur = json.loads(cur)
            except ValueError:
                return None
        if not isinstance(cur, dict):
            return None
        cur = cur.get(key)
    return cur


@lru_cache(maxsize=16)
def _split_key(dotted: str) -> tuple[str, ...]:
    return tuple(dotted.split("."))


def record_to_doc(obj: Any, line: int, text_key: str, source_key: str) -> Doc | Problem:
    if not isinstance(obj, dict):
        return Problem(line, "malformed_json", f"expected a JSON object, got {type(obj).__name__}")
    if text_key not in obj:
        return Problem(line, "missing_text", f"no {text_key!r} field")
    text = obj[text_key]
    if not isinstance(text, str):
        return Problem(line, "non_string_text", f"{text_key!r} is {type(text).__name__}")
    if not text:
        return Problem(line, "empty_text", f"{text_key!r} is empty")
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        return Problem(line, "invalid_utf8", "lone surrogate in text")
    source = _get_path(obj, source_key)
    return Doc(line, data, source if isinstance(source, str) and source else UNKNOWN_SOURCE)


def parse_line(raw: bytes, line: int, text_key: str, source_key: str) -> Doc | Problem | None:
    if not raw.strip():
        return None  # blank lines (e.g. a trailing newline) are not documents
    if _fast_loads is not None:
        try:
            return record_to_doc(_fast_loads(raw), line, text_key, source_key)
        except (ValueError, RecursionError):
            pass  # classify below with the stdlib, which also accepts escaped lone surrogates
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Problem(line, "invalid_utf8", f"byte {e.start}")
    try:
        obj = json.loads(s)
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly deep nesting
        return Problem(line, "malformed_json", str(e)[:80] or type(e).__name__)
    return record_to_doc(obj, line, text_key, source_key)


def _optional_module(name: str, spec: str) -> Any:
    """Parquet files and `datasets` inputs need the optional `hf` extra; say so instead of an ImportError."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise DataError(f"{spec}: reading this input needs the `datasets` package (with pyarrow); install it with "
                        "pip install 'rwkvctl[hf]'") from None


def _reraise_system_error(e: Exception) -> None:
    """pyarrow reports bad data as OSError too, but without an errno; one with an errno came from the system."""
    if isinstance(e, OSError) and e.errno is not None:
        raise e


class DocumentStream:
    """Iterate one input's documents; `consumed` is on-disk bytes read so far (for progress)."""

    def __init__(self, spec: str, text_key: str = "text", source_key: str = "meta.redpajama_set_name",
                 max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self.spec = spec
        self.text_key = text_key
        self.source_key = source_key
        self.max_line_bytes = max_line_bytes  # a longer JSONL line is a `line_too_long` problem, never read whole
        self.consumed = 0

    def __iter__(self) -> Iterator[Doc | Problem]:
        p = Path(self.spec)
        if self.spec.startswith("hf:") or _is_dataset_dir(p):
            yield from self._datasets()
        elif p.name.endswith(TABLE_SUFFIXES):
            yield from self._parquet(p)
        else:
            yield from self._jsonl()

    @property
    def is_jsonl(self) -> bool:
        """A JSON-lines file (plain, zstd or gzip), which `iter_blocks` can read without parsing records."""
        p = Path(self.spec)
        return not (self.spec.startswith("hf:") or _is_dataset_dir(p) or p.name.endswith(TABLE_SUFFIXES))

    def iter_blocks(self, block_bytes: int = 1 << 19) -> Iterator[Block | Problem]:
        """A JSONL input as blocks of whole lines of about `block_bytes`; damaged compression ends the stream with
        a `Problem` after everything readable before it."""
        p = Path(self.spec)
        # An OSError (opening or reading) propagates: it says nothing about the data, and may pass.
        f = open(p, "rb")  # noqa: SIM115  (closed below; generator may be abandoned)
        raw = _Counting(f)
        last = 0
        try:
            for item in _blocks(p, raw, block_bytes, self.max_line_bytes):
                self.consumed = raw.pos
                if isinstance(item, _LongLine):
                    last += 1
                    yield Problem(last, "line_too_long", f"{item.size} bytes, over the {self.max_line_bytes}-byte "
                                  "line limit")
                    continue
                data, end = item
                n = _count_lines(data, end)
                yield Block(last, n, data, end)
                last += n
        except _CorruptInputError as e:
            yield Problem(last + 1, e.kind, str(e))
        finally:
            self.consumed = raw.pos
            f.close()

    def _jsonl(self) -> Iterator[Doc | Problem]:
        for item in self.iter_blocks():
            if isinstance(item, Problem):
                yield item
                continue
            for i, data in enumerate(item.data[: item.end].split(b"\n")[:-1], item.first + 1):
                doc = parse_line(data, i, self.text_key, self.source_key)
                if doc is not None:
                    yield doc

    def _parquet(self, p: Path) -> Iterator[Doc | Problem]:
        pq = _optional_module("pyarrow.parquet", str(p))

        try:
            pf = pq.ParquetFile(p)
        except Exception as e:  # pyarrow raises several unrelated types for a bad file
            _reraise_system_error(e)
            yield Problem(0, "corrupt_compression", f"parquet: {str(e)[:80]}")
            return
        line = 0
        total = p.stat().st_size
        try:
            for batch in pf.iter_batches(batch_size=1024):
                for row in batch.to_pylist():
                    line += 1
                    yield record_to_doc(row, line, self.text_key, self.source_key)
                self.consumed = min(total, int(total * line / max(pf.metadata.num_rows, 1)))
        except Exception as e:  # a damaged row group mid-file
            _reraise_system_error(e)
            yield Problem(line + 1, "corrupt_compression", f"parquet: {str(e)[:80]}")
        self.consumed = total

    def _datasets(self) -> Iterator[Doc | Problem]:
        datasets = _optional_module("datasets", self.spec)

        try:
            if self.spec.startswith("hf:"):
                name, _, split = self.spec[3:].partition(":")
                ds = datasets.load_dataset(name, split=split or "train", streaming=True)
            else:
                ds = datasets.load_from_disk(self.spec)
                if isinstance(ds, datasets.DatasetDict):
                    raise DataError(f"{self.spec}: holds several splits ({', '.join(ds)}); point at one split's dir")
        except DataError:
            raise
        except Exception as e:  # network, missing files, unknown builder: one line naming the input
            raise DataError(f"{self.spec}: cannot open with `datasets` ({str(e).splitlines()[0][:120]})") from None
        for line, row in enumerate(ds, 1):
            yield record_to_doc(row, line, self.text_key, self.source_key)
