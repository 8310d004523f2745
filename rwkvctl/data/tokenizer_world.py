"""The RWKV World tokenizer (rwkv_vocab_v20230424, 65536 ids): greedy longest match over UTF-8 bytes.

Ids are identical to the reference `TRIE_TOKENIZER` (rwkv pip package / RWKV-LM). Id 0 is not in the vocab
file: it is the end-of-document separator. The vocab is parsed with `ast.literal_eval`, never `eval`.

Encoding runs in the C++ trie (csrc/tokenizer, ~3x the Rust pyrwkv-tokenizer) when it can be built, else in
a pure-Python dict trie with the same results. Our one extension: `encode(str)` accepts lone surrogates
(the reference raises UnicodeEncodeError) by encoding them with `surrogatepass`, so they survive a round
trip through `decode`; `prepare` rejects such documents before they get here (see corpus.py).
"""

from __future__ import annotations

import ast
import ctypes
import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from rwkvctl.data import tokenizer_native
from rwkvctl.errors import TokenizerError
from rwkvctl.fs import atomic_path

VOCAB_FILE = Path(__file__).resolve().parents[1] / "assets" / "rwkv_vocab_v20230424.txt"
VOCAB_SIZE = 65536  # model rows; ids 65530..65535 are unused
EOD_ID = 0


def _literal(src: str) -> str | bytes:
    """A Python str/bytes literal, without eval. Most vocab lines are plain quoted text: take those directly."""
    if "\\" not in src and len(src) >= 2 and src[0] == src[-1] and src[0] in "'\"" and src[0] not in src[1:-1]:
        return src[1:-1]
    return ast.literal_eval(src)


def parse_vocab(path: Path = VOCAB_FILE) -> dict[int, bytes]:
    """`<id> <python str/bytes literal> <byte length>` per line -> {id: bytes}, validated line by line.

    The parsed result is cached as arrays under the tokenizer cache dir, keyed by the file's SHA-256: parsing 65k
    literals costs ~0.15 s of every command's start-up, loading the cache ~10 ms."""
    cache = _vocab_cache_path(path)
    if cache is not None and cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                ids, ends, flat = z["ids"].tolist(), z["ends"].tolist(), z["flat"].tobytes()
            return {i: flat[(ends[k - 1] if k else 0) : ends[k]] for k, i in enumerate(ids)}
        except Exception:  # noqa: BLE001 - damaged (truncated zip, empty file) or foreign: parse again, rewrite
            pass
    vocab = _parse_vocab_text(path)
    if cache is not None:
        _write_vocab_cache(cache, vocab)
    return vocab


def _vocab_cache_path(path: Path) -> Path | None:
    try:
        return tokenizer_native.cache_dir() / f"vocab-v1-{_sha256(Path(path))[:24]}.npz"  # v1: this layout
    except OSError:
        return None  # unreadable: _parse_vocab_text reports it


def _write_vocab_cache(cache: Path, vocab: dict[int, bytes]) -> None:
    ids = sorted(vocab)
    try:
        with atomic_path(cache) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append .npz
            np.savez(
                f,
                ids=np.array(ids, dtype=np.int32),
                ends=np.cumsum([len(vocab[i]) for i in ids], dtype=np.int64),
                flat=np.frombuffer(b"".join(vocab[i] for i in ids), dtype=np.uint8),
            )
    except OSError:  # a read-only home: just parse every time
        pass


def _parse_vocab_text(path: Path) -> dict[int, bytes]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read the World vocab ({e})") from None
    vocab: dict[int, bytes] = {}
    for n, line in enumerate(lines, 1):
        try:
            idx = int(line[: line.index(" ")])
            literal = _literal(line[line.index(" ") : line.rindex(" ")].strip())
            tok = literal.encode("utf-8") if isinstance(literal, str) else literal
            if not isinstance(tok, bytes) or len(tok) != int(line[line.rindex(" ") :]):
                raise ValueError("length field does not match the token")
        except (ValueError, SyntaxError) as e:
            raise TokenizerError(f"{path}:{n}: malformed vocab line ({e})") from None
        if not 0 < idx < VOCAB_SIZE:
            raise TokenizerError(f"{path}:{n}: token id {idx} outside 1..{VOCAB_SIZE - 1}")
        vocab[idx] = tok
    present = set(vocab.values())
    missing = [b for b in range(256) if bytes([b]) not in present]
    if missing:
        raise TokenizerError(f"{path}: vocab lacks single-byte token {missing[0]}; it could not encode all input")
    return vocab


class _NativeTrie:
    def __init__(self, vocab: dict[int, bytes]) -> None:
        lib = tokenizer_native.load()
        assert lib is not None
        self._lib = lib
        ids = np.array(sorted(vocab), dtype=np.int32)
        data = b"".join(vocab[int(i)] for i in ids)
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum([len(vocab[int(i)]) for i in ids], out=offsets[1:])
        self._scratch = threading.local()
        self._h = lib.wt_new(data, _ptr(offsets, ctypes.c_int64), _ptr(ids, ctypes.c_int32), len(ids))
        if not self._h:
            raise TokenizerError("native World trie could not be built (out of memory or bad vocab)")

    def __del__(self) -> None:
        if getattr(self, "_h", None):
            self._lib.wt_free(self._h)

    def encode(self, data: bytes) -> np.ndarray:
        out = np.empty(len(data), dtype=np.int32)
        n = self._lib.wt_encode(self._h, data, len(data), _ptr(out, ctypes.c_int32))
        return out[:n]

    def encode_batch(self, data: bytes, offsets: np.ndarray, eod: int) -> tuple[np.ndarray, np.ndarray]:
        ndocs = len(offsets) - 1
        out = np.empty(len(data) + ndocs, dtype=np.int32)
        counts = np.empty(ndocs, dtype=np.int64)
        offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        n = self._lib.wt_encode_batch(
            self._h,
            data,
            _ptr(offsets, ctypes.c_int64),
            ndocs,
            eod,
            _ptr(out, ctypes.c_int32),
            _ptr(counts, ctypes.c_int64),
        )
        return out[:n], counts


    def decode(self, ids: np.ndarray) -> bytes:
        """Bytes of int32 `ids` (range-checked by the caller; ids without a token decode to nothing)."""
        ids = np.ascontiguousarray(ids, dtype=np.int32)
        p = _ptr(ids, ctypes.c_int32)
        out = np.empty(self._lib.wt_decode(self._h, p, len(ids), None), dtype=np.uint8)
        self._lib.wt_decode(self._h, p, len(ids), out.ctypes.data)
        return out.tobytes()

    def encode_jsonl(
        self, block: bytes, end: int, text_key: str, source_key: str, eod: int, lines: int, reuse: bool
    ) -> JsonlBlock:
        scratch = self._scratch_for(end, lines)
        ids, text, doc_line, doc_count, doc_text_end, doc_source, fallback, src_off, src_len, counts = scratch
        i64 = ctypes.c_int64
        rc = self._lib.wt_encode_jsonl(
            self._h,
            block,
            end,
            text_key.encode(),
            source_key.encode(),
            eod,
            _ptr(ids, ctypes.c_int32),
            text.ctypes.data,
            _ptr(doc_line, i64),
            _ptr(doc_count, i64),
            _ptr(doc_text_end, i64),
            _ptr(doc_source, ctypes.c_int32),
            _ptr(fallback, i64),
            _ptr(src_off, i64),
            _ptr(src_len, i64),
            MAX_BLOCK_SOURCES,
            _ptr(counts, i64),
        )
        if rc != 0:
            raise MemoryError("native JSONL encoder ran out of memory")
        ndocs, nids, nfallback, nsources, ntext = counts.tolist()
        spans = zip(src_off[:nsources].tolist(), src_len[:nsources].tolist(), strict=True)
        sources = [block[o : o + n].decode("utf-8") for o, n in spans]
        views = (ids[:nids], text[:ntext], doc_line[:ndocs], doc_count[:ndocs], doc_text_end[:ndocs])
        more = (doc_source[:ndocs], fallback[:nfallback])
        if not reuse:
            views, more = tuple(v.copy() for v in views), tuple(v.copy() for v in more)
        return JsonlBlock(*views, *more, sources=sources)

    def _scratch_for(self, end: int, lines: int) -> tuple[np.ndarray, ...]:
        """Output arrays for one block, from two sets per thread used in turn: results of one call stay intact
        through the next call (a pipeline writes block k while it encodes block k+1), and no fresh multi-MB
        arrays are allocated per block (their page faults and copies cost ~5% of the encoder's time)."""
        local = self._scratch.__dict__
        sets = local.setdefault("sets", [None, None])
        turn = local["turn"] = 1 - local.get("turn", 1)
        cap = sets[turn]
        need_bytes, need_lines = end + lines, max(lines, 1)
        if cap is not None and cap[0] >= need_bytes and cap[1] >= need_lines:
            return cap[2]
        arrays = (
            np.empty(need_bytes, dtype=np.int32),  # ids: at most one per byte, plus an end-of-document id per line
            np.empty(need_bytes + 16, dtype=np.uint8),  # text: the unescaper writes 16-byte chunks
            *(np.empty(need_lines, dtype=np.int64) for _ in range(3)),  # doc_line, doc_count, doc_text_end
            np.empty(need_lines, dtype=np.int32),  # doc_source
            np.empty(need_lines, dtype=np.int64),  # fallback
            np.empty(MAX_BLOCK_SOURCES, np.int64),  # src_off
            np.empty(MAX_BLOCK_SOURCES, np.int64),  # src_len
            np.zeros(5, dtype=np.int64),  # counts
        )
        # A block holding one huge document must not pin 5x its size for the rest of the run.
        sets[turn] = (need_bytes, need_lines, arrays) if need_bytes <= MAX_KEPT_SCRATCH else None
        return arrays


MAX_KEPT_SCRATCH = 16 << 20  # bytes of block kept as reusable output buffers (blocks are ~0.5 MB)
MAX_BLOCK_SOURCES = 256  # distinct source labels per block; a line with a further one takes the Python path


@dataclass
class JsonlBlock:
    """Documents of a block of JSON lines, parsed and encoded in one native call (`WorldTokenizer.encode_jsonl`).

    Document d: ids `ids[sum(doc_count[:d]) : sum(doc_count[:d+1])]` (ending with the end-of-document id), text
    `text[doc_text_end[d-1] : doc_text_end[d]]` (UTF-8), 0-based line `doc_line[d]` within the block, source
    `sources[doc_source[d]]` (-1: no label). `fallback_lines` are the lines (0-based) the native parser left to
    Python: malformed or unusual records, in order.
    """

    ids: np.ndarray
    text: np.ndarray
    doc_line: np.ndarray
    doc_count: np.ndarray
    doc_text_end: np.ndarray
    doc_source: np.ndarray
    fallback_lines: np.ndarray
    sources: list[str]


class _PythonTrie:
    """Dict-of-dicts byte trie; the value of key -1 is the id of the token ending at that node."""

    def __init__(self, vocab: dict[int, bytes]) -> None:
        self.root: dict = {}
        for idx in sorted(vocab):
            node = self.root
            for b in vocab[idx]:
                node = node.setdefault(b, {})
            node[-1] = idx

    def encode(self, data: bytes) -> np.ndarray:
        out, pos, n, root = [], 0, len(data), self.root
        while pos < n:
            node, p, best, best_end = root, pos, -1, pos
            while p < n:
                node = node.get(data[p])
                if node is None:
                    break
                p += 1
                if -1 in node:
                    best, best_end = node[-1], p
            out.append(best)
            pos = best_end
        return np.array(out, dtype=np.int32)

    def encode_batch(self, data: bytes, offsets: np.ndarray, eod: int) -> tuple[np.ndarray, np.ndarray]:
        parts, counts = [], np.empty(len(offsets) - 1, dtype=np.int64)
        for d in range(len(offsets) - 1):
            ids = self.encode(data[offsets[d] : offsets[d + 1]])
            parts.append(np.append(ids, np.int32(eod)) if eod >= 0 else ids)
            counts[d] = len(parts[-1])
        return (np.concatenate(parts) if parts else np.empty(0, np.int32)), counts


def _ptr(a: np.ndarray, ctype: type) -> ctypes._Pointer:
    return a.ctypes.data_as(ctypes.POINTER(ctype))


class WorldTokenizer:
    """World tokenizer: `encode(str) -> list[int]`, `decode(ids) -> str`, fast batched byte encoding for prepare."""

    name = "world"
    vocab_size = VOCAB_SIZE
    eod_id = EOD_ID

    def __init__(self, vocab_file: Path = VOCAB_FILE, backend: str = "auto") -> None:
        self.vocab_file = Path(vocab_file)
        self.idx2token = parse_vocab(self.vocab_file)
        if backend not in ("auto", "native", "python"):
            raise TokenizerError(f"unknown tokenizer backend {backend!r} (auto, native or python)")
        self.backend_note = ""  # why the slow pure-Python encoder runs, for prepare's summary and manifest
        if backend == "auto" and tokenizer_native.requested_backend() == "native":
            backend = "native"  # RWKVCTL_TOKENIZER=native: fail rather than fall back
        if backend != "python" and tokenizer_native.load() is not None:
            self._trie: _NativeTrie | _PythonTrie = _NativeTrie(self.idx2token)
            self.backend = "native"
        elif backend == "native":
            raise TokenizerError(f"native World encoder unavailable: {tokenizer_native.unavailable_reason()}")
        else:
            self._trie = _PythonTrie(self.idx2token)
            self.backend = "python"
            if backend == "python":
                self.backend_note = "pure-Python encoder requested (world-python)"
            else:
                self.backend_note = (
                    f"C++ encoder unavailable ({tokenizer_native.unavailable_reason()}); "
                    "the pure-Python fallback is 20-40x slower"
                )
        # id -> bytes as one flat array + offsets, for vectorized decoding; id 0 (end of document) is empty.
        lengths = np.zeros(VOCAB_SIZE, dtype=np.int64)
        for i, tok in self.idx2token.items():
            lengths[i] = len(tok)
        self._offsets = np.concatenate([[0], np.cumsum(lengths)])
        self._flat = np.frombuffer(b"".join(self.idx2token.get(i, b"") for i in range(VOCAB_SIZE)), dtype=np.uint8)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "vocab_size": self.vocab_size,
            "eod_id": self.eod_id,
            "vocab": self.vocab_file.name,
            "sha256": _sha256(self.vocab_file),
        }

    def encode(self, text: str) -> list[int]:
        return self._trie.encode(text.encode("utf-8", "surrogatepass")).tolist()

    def encode_batch(self, data: bytes, offsets: np.ndarray, append_eod: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Encode docs `data[offsets[d]:offsets[d+1]]` -> (flat int32 ids, per-doc counts incl. eod)."""
        return self._trie.encode_batch(data, offsets, self.eod_id if append_eod else -1)

    def encode_jsonl(
        self, block: bytes, text_key: str, source_key: str, lines: int = -1, end: int = -1, reuse: bool = False
    ) -> JsonlBlock | None:
        """Parse and encode the whole JSON lines in `block[:end]` natively (None without the C++ encoder): see
        JsonlBlock. `lines`: their newline count when the caller already knows it. `reuse=True` returns views of
        per-thread buffers instead of copies: valid until the second-next call on the same thread."""
        if not isinstance(self._trie, _NativeTrie):
            return None
        end = len(block) if end < 0 else end
        n = block.count(b"\n", 0, end) if lines < 0 else lines
        return self._trie.encode_jsonl(block, end, text_key, source_key, self.eod_id, n, reuse)

    def decode_bytes(self, ids: Sequence[int] | np.ndarray) -> bytes:
        arr = np.asarray(ids, dtype=np.int64).ravel()
        if arr.size and (arr.min() < 0 or arr.max() >= VOCAB_SIZE):
            bad = int(arr[(arr < 0) | (arr >= VOCAB_SIZE)][0])
            raise TokenizerError(f"token id {bad} outside the World vocab 0..{VOCAB_SIZE - 1}")
        if isinstance(self._trie, _NativeTrie):  # ~10x the numpy gather below
            return self._trie.decode(arr)
        starts = self._offsets[arr]
        lengths = self._offsets[arr + 1] - starts
        total = int(lengths.sum())
        if total == 0:
            return b""
        # Byte j of the output comes from flat[start of its token + its offset inside the token].
        shift = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)  # (total,)
        return self._flat[shift + np.arange(total)].tobytes()

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text for `ids`; id 0 (end of doc) is dropped, lone surrogates round-trip, other bad bytes become U+FFFD."""
        raw = self.decode_bytes(ids)
        try:
            return raw.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            return raw.decode("utf-8", "replace")


@lru_cache(maxsize=8)
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
