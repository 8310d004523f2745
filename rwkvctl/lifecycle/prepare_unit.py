"""One unit of `rwkvctl prepare`: one input file -> its train/val shards and a completion record.

The unit writer streams documents, encodes them in batches, splits/weights them by a seeded hash of the text, and
writes shards through temp names. JSONL inputs with the native World encoder take the block path: whole blocks of
lines are parsed, unescaped and encoded in one C++ call and counted with numpy, with no Python object per document
(lines the native parser declines are classified by the Python reader, so results are the same either way). The
encoding runs on a background thread (the C++ calls release the GIL) when the machine has a core to spare for it.
`run_unit` removes what a killed attempt left behind, then records completion
atomically only after the shards are in place: the basis of prepare's byte-identical resume.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rwkvctl.data.binidx import BinIdxWriter, dtype_for_vocab
from rwkvctl.data.corpus import UNKNOWN_SOURCE, Block, Doc, DocumentStream, Problem, parse_line
from rwkvctl.data.manifest import BadInput, Shard, SourceCounts
from rwkvctl.errors import DataError
from rwkvctl.fs import atomic_write_text, remove_temps

STATE_DIR = ".prepare"


@dataclass
class PrepareOptions:
    inputs: list[str]
    out_dir: Path
    val_inputs: list[str] = field(default_factory=list)
    tokenizer: str = "world"
    text_key: str = "text"
    source_key: str = "meta.redpajama_set_name"
    val_fraction: float = 0.0
    seed: int = 0
    source_weights: dict[str, float] = field(default_factory=dict)
    verify_every: int = 64  # decode(encode(x)) == x on every Nth document of each input
    workers: int = 1
    num_nodes: int = 1
    node_rank: int = 0
    ctx_len: int | None = None
    batch_bytes: int = 1 << 19  # ~0.5 MB: measured fastest (the block stays in cache between parse and encode)
    # Encode on a second thread, overlapping reading and decompression. None: only when the machine has more cores
    # than workers (otherwise the thread competes with the other workers and the speed-up from workers drops).
    encode_thread: bool | None = None
    native_jsonl: bool = True  # the block path for JSONL inputs (off: every record goes through Python's parser)


@dataclass(frozen=True)
class Unit:
    index: int
    input: str
    split: str | None  # "val" for explicit validation inputs, None = decided per document
    name: str


def _u64_fraction(data: bytes, key: bytes, person: bytes) -> float:
    h = hashlib.blake2b(data, digest_size=8, key=key, person=person).digest()
    return int.from_bytes(h, "little") / 2.0**64


class _UnitWriter:
    """Tokenizes one input into its train/val shards and tallies per-source counts and problems."""

    def __init__(self, unit: Unit, opts: PrepareOptions, tok: Any, report: Callable[[dict], None]) -> None:
        self.unit, self.opts, self.tok, self.report = unit, opts, tok, report
        self.key = opts.seed.to_bytes(8, "little", signed=True)
        self.dtype = dtype_for_vocab(tok.vocab_size)
        self.writers: dict[str, BinIdxWriter] = {}
        self.counts: dict[str, dict[str, SourceCounts]] = {"train": {}, "val": {}}
        self.bad: dict[str, list] = {}  # kind -> [count, first_line, detail]
        self.seen = 0

    def problem(self, p: Problem) -> None:
        entry = self.bad.setdefault(p.kind, [0, p.line, p.detail])
        entry[0] += 1

    def _writer(self, split: str) -> BinIdxWriter:
        if split not in self.writers:
            self.writers[split] = BinIdxWriter(self.opts.out_dir / split / self.unit.name, self.dtype)
        return self.writers[split]

    def _encode(self, batch: list) -> tuple[int, np.ndarray, np.ndarray]:
        """Runs on the encoder thread: the C++ encoder releases the GIL, so it overlaps with parsing."""
        data = b"".join([d.data for d in batch])
        offsets = np.zeros(len(batch) + 1, dtype=np.int64)
        np.cumsum([len(d.data) for d in batch], out=offsets[1:])
        ids, counts = self.tok.encode_batch(data, offsets)
        return len(data), ids, counts

    def _verify(self, batch: list, ids: np.ndarray, starts: list[int], ends: list[int]) -> None:
        every = self.opts.verify_every
        for k in range(-(self.seen + 1) % every, len(batch), every):  # document number seen+k+1 divisible by every
            d = batch[k]
            if self.tok.decode(ids[starts[k] : ends[k] - 1]) != d.data.decode("utf-8"):  # minus the end-of-doc id
                self.problem(Problem(d.line, "roundtrip_mismatch", "decode(encode(text)) != text (kept)"))

    def _split_and_weight(self, d: Any) -> tuple[str, int]:
        opts = self.opts
        split = self.unit.split or "train"
        if split == "train" and opts.val_fraction > 0 and _u64_fraction(d.data, self.key, b"val") < opts.val_fraction:
            split = "val"
        w = opts.source_weights.get(d.source, 1.0) if split == "train" else 1.0
        if w == 1.0:
            return split, 1
        return split, int(math.floor(w)) + (_u64_fraction(d.data, self.key, b"weight") < w - math.floor(w))

    def flush(self, batch: list, n_bytes: int, ids: np.ndarray, counts: np.ndarray) -> None:
        ends = np.cumsum(counts).tolist()
        cl = counts.tolist()
        starts = [e - c for e, c in zip(ends, cl, strict=True)]
        self._verify(batch, ids, starts, ends)
        self.seen += len(batch)
        mixed = (self.unit.split is None and self.opts.val_fraction > 0) or bool(self.opts.source_weights)
        if not mixed:  # the common case: every document goes once to one split, written in one call
            table = self.counts[self.unit.split or "train"]
            for d, c in zip(batch, cl, strict=True):
                sc = table.get(d.source) or table.setdefault(d.source, SourceCounts())
                sc.docs += 1
                sc.tokens += c
                sc.bytes += len(d.data)
            self._writer(self.unit.split or "train").add_documents(ids, counts)
        else:
            dest: dict[str, list[int]] = {"train": [], "val": []}
            for k, d in enumerate(batch):
                split, copies = self._split_and_weight(d)
                if copies == 0:
                    continue
                sc = self.counts[split].setdefault(d.source, SourceCounts())
                sc.docs += copies
                sc.tokens += copies * cl[k]
                sc.bytes += copies * len(d.data)
                dest[split].extend([k] * copies)
            for split, picked in dest.items():
                if picked:
                    flat = np.concatenate([ids[starts[k] : ends[k]] for k in picked])
                    self._writer(split).add_documents(flat, counts[picked])
        self.report({"docs": len(batch), "tokens": int(counts.sum()), "text_bytes": n_bytes})

    def _encode_block(self, block: Block) -> Any:
        # reuse: the result is written (flush_block) before the encoder's next-but-one call, see _submit
        opts = self.opts
        return self.tok.encode_jsonl(block.data, opts.text_key, opts.source_key, block.lines, block.end, reuse=True)

    def flush_block(self, block: Block, res: Any) -> None:
        """Write one natively encoded block (see JsonlBlock)."""
        first = block.first
        extra: list[tuple[int, Doc]] = []  # documents only the Python reader could parse
        if len(res.fallback_lines):
            lines = block.data[: block.end].split(b"\n")
            for i in res.fallback_lines.tolist():
                item = parse_line(lines[i], first + i + 1, self.opts.text_key, self.opts.source_key)
                if isinstance(item, Problem):
                    self.problem(item)
                elif item is not None:
                    extra.append((i, item))
        mixed = (self.unit.split is None and self.opts.val_fraction > 0) or bool(self.opts.source_weights)
        if extra or mixed:  # rare or per-document work anyway: hand documents to the general path
            self._flush_as_docs(first, res, extra)
            return
        n = len(res.doc_count)
        ends = np.cumsum(res.doc_count)
        text_ends = res.doc_text_end
        self._verify_block(first, res, ends)
        self.seen += n
        names = [*res.sources, UNKNOWN_SOURCE]
        which = np.where(res.doc_source < 0, len(res.sources), res.doc_source)
        sizes = np.diff(text_ends, prepend=0)
        table = self.counts[self.unit.split or "train"]
        for s, docs, tokens, nbytes in zip(
            names,
            np.bincount(which, minlength=len(names)).tolist(),
            _int_bincount(which, res.doc_count, len(names)),
            _int_bincount(which, sizes, len(names)),
            strict=True,
        ):
            if docs:
                sc = table.get(s) or table.setdefault(s, SourceCounts())
                sc.docs, sc.tokens, sc.bytes = sc.docs + docs, sc.tokens + tokens, sc.bytes + nbytes
        if n:
            self._writer(self.unit.split or "train").add_documents(res.ids, res.doc_count)
        self.report({"docs": n, "tokens": len(res.ids), "text_bytes": int(text_ends[-1]) if n else 0})

    def _verify_block(self, first: int, res: Any, ends: np.ndarray) -> None:
        """decode(encode(text)) == text for document numbers seen+k+1 divisible by verify_every: all of the block's
        samples in one decode call (a call per document cost more than the rest of the block's bookkeeping)."""
        picked = np.arange(-(self.seen + 1) % self.opts.verify_every, len(res.doc_count), self.opts.verify_every)
        if not len(picked):
            return
        t_ends = res.doc_text_end
        starts, stops = ends[picked] - res.doc_count[picked], ends[picked] - 1  # minus the end-of-doc id
        t_starts = np.where(picked > 0, t_ends[np.maximum(picked - 1, 0)], 0)
        ids = np.concatenate([res.ids[a:b] for a, b in zip(starts.tolist(), stops.tolist(), strict=True)])
        texts = [res.text[a:b] for a, b in zip(t_starts.tolist(), t_ends[picked].tolist(), strict=True)]
        if self.tok.decode_bytes(ids) == np.concatenate(texts).tobytes():
            return
        for k, a, b, text in zip(picked.tolist(), starts.tolist(), stops.tolist(), texts, strict=True):
            if self.tok.decode_bytes(res.ids[a:b]) != text.tobytes():
                line = first + int(res.doc_line[k]) + 1
                self.problem(Problem(line, "roundtrip_mismatch", "decode(encode(text)) != text (kept)"))

    def _flush_as_docs(self, first: int, res: Any, extra: list[tuple[int, Doc]]) -> None:
        text, ends = res.text, np.cumsum(res.doc_count).tolist()
        starts = [e - c for e, c in zip(ends, res.doc_count.tolist(), strict=True)]
        t_ends = res.doc_text_end.tolist()
        items = []  # (line index in block, Doc, ids)
        for k, (line, src) in enumerate(zip(res.doc_line.tolist(), res.doc_source.tolist(), strict=True)):
            data = text[t_ends[k - 1] if k else 0 : t_ends[k]].tobytes()
            doc = Doc(first + line + 1, data, res.sources[src] if src >= 0 else UNKNOWN_SOURCE)
            items.append((line, doc, res.ids[starts[k] : ends[k]]))
        if extra:
            n_bytes, ids, counts = self._encode([d for _, d in extra])
            offs = np.concatenate([[0], np.cumsum(counts)])
            items += [(i, d, ids[offs[j] : offs[j + 1]]) for j, (i, d) in enumerate(extra)]
            items.sort(key=lambda it: it[0])
        batch = [d for _, d, _ in items]
        flat = np.concatenate([ids for _, _, ids in items]) if items else np.empty(0, np.int32)
        counts = np.array([len(ids) for _, _, ids in items], dtype=np.int64)
        self.flush(batch, sum(len(d.data) for d in batch), flat, counts)

    def _submit(self, work: Callable[[], Any], finish: Callable[[Any], None]) -> None:
        """Run `work` (in the background when there is an encoder thread), then `finish(result)` in order; the
        previous item is finished meanwhile."""
        if self._pool is None:
            self._drain()
            finish(work())
            return
        fut = self._pool.submit(work)
        self._drain()
        self._pending = (fut, finish)

    def _drain(self) -> None:
        if self._pending is not None:
            fut, finish = self._pending
            self._pending = None
            finish(fut.result())

    def run(self) -> dict[str, Any]:
        stream = DocumentStream(self.unit.input, self.opts.text_key, self.opts.source_key)
        self._pending: tuple[Future, Callable[[Any], None]] | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="rwkvctl-encode") if _use_thread(self.opts) else None
        # Only the World tokenizer's C++ encoder has the block path (spm and world-python read documents).
        native = hasattr(self.tok, "encode_jsonl") and getattr(self.tok, "backend", "") == "native"
        block_path = self.opts.native_jsonl and stream.is_jsonl and native
        try:
            try:
                if block_path:
                    self._read_blocks(stream)
                else:
                    self._read_docs(stream)
            except _InputReadError as failed:
                self._unreadable(failed.error)
            self.report({"in_bytes": stream.consumed - self._reported})
            shards = []
            for split in ("train", "val"):
                w = self.writers.get(split)
                if w is None:
                    continue
                if w.num_docs == 0:
                    w.abort()
                    continue
                w.close()
                rel = f"{split}/{self.unit.name}"
                sources = dict(sorted(self.counts[split].items()))
                shards.append(asdict(Shard(rel, split, self.unit.input, w.num_docs, w.num_tokens, sources)))
        except BaseException:
            for w in self.writers.values():
                w.abort()
            raise
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
        bad = [asdict(BadInput(self.unit.input, k, v[0], v[1], v[2])) for k, v in sorted(self.bad.items())]
        return {"unit": self.unit.name, "input": self.unit.input, "shards": shards, "bad_inputs": bad}

    def _read_docs(self, stream: DocumentStream) -> None:
        batch: list[Doc] = []
        size, self._reported = 0, 0
        for item in _read_guarded(iter(stream)):
            if isinstance(item, Problem):
                self.problem(item)
                continue
            batch.append(item)
            size += len(item.data)
            if size >= self.opts.batch_bytes:
                self._submit_docs(batch)
                batch, size = [], 0
                self.report({"in_bytes": stream.consumed - self._reported})
                self._reported = stream.consumed
        if batch:
            self._submit_docs(batch)
        self._drain()

    def _submit_docs(self, batch: list[Doc]) -> None:
        self._submit(lambda: self._encode(batch), lambda res: self.flush(batch, *res))

    def _read_blocks(self, stream: DocumentStream) -> None:
        self._reported = 0
        for item in _read_guarded(stream.iter_blocks(self.opts.batch_bytes)):
            if isinstance(item, Problem):
                self.problem(item)
                continue
            self._submit(lambda b=item: self._encode_block(b), lambda res, b=item: self.flush_block(b, res))
            self.report({"in_bytes": stream.consumed - self._reported})
            self._reported = stream.consumed
        self._drain()

    def _unreadable(self, e: DataError | OSError) -> None:
        """Reading the input failed. Only an input that is itself unusable becomes a (permanent) bad input."""
        for w in self.writers.values():
            w.abort()
        self.writers.clear()
        if isinstance(e, OSError):
            # EIO, a dropped network mount, a permission fixed later: recording the input as done would skip it
            # forever, so stop this run instead; a rerun resumes with this input.
            what = e.strerror or str(e)
            msg = f"{self.unit.input}: read error ({what}); nothing recorded for it, rerun to resume"
            raise DataError(msg) from None
        self.counts = {"train": {}, "val": {}}
        self.problem(Problem(0, "unreadable", str(e)[:200]))


class _InputReadError(Exception):
    """Carries an error raised while reading the input, kept apart from errors while encoding or writing shards,
    which always propagate (a full disk must never mark an input done)."""

    def __init__(self, error: DataError | OSError) -> None:
        super().__init__(str(error))
        self.error = error


def _use_thread(opts: PrepareOptions) -> bool:
    if opts.encode_thread is not None:
        return opts.encode_thread
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores > opts.workers


def _int_bincount(which: np.ndarray, weights: np.ndarray, n: int) -> list[int]:
    out = np.zeros(n, dtype=np.int64)
    np.add.at(out, which, weights)
    return out.tolist()


def _read_guarded(it: Iterator[Any]) -> Iterator[Any]:
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except (DataError, OSError) as e:
            raise _InputReadError(e) from e
        yield item


def done_path(out: Path, unit: Unit) -> Path:
    return out / STATE_DIR / "done" / f"{unit.name}.json"


def run_unit(unit: Unit, opts: PrepareOptions, tok: Any, report: Callable[[dict], None]) -> dict[str, Any]:
    # Leftovers of a killed attempt at this unit: shard temps and a half-written completion record.
    shards = [opts.out_dir / split / (unit.name + suffix) for split in ("train", "val") for suffix in (".bin", ".idx")]
    for final in (*shards, done_path(opts.out_dir, unit)):
        remove_temps(final, any_owner=True)
    record = _UnitWriter(unit, opts, tok, report).run()
    atomic_write_text(done_path(opts.out_dir, unit), json.dumps(record, indent=1, sort_keys=True) + "\n")
    return record
