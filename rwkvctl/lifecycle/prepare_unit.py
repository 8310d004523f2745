"""One unit of `rwkvctl prepare`: one input file -> its train/val shards and a completion record.

The unit writer streams documents, encodes them in batches on a background thread (the C++ encoder releases the
GIL, so encoding overlaps reading and parsing), splits/weights them by a seeded hash of the text, and writes
shards through temp names. `run_unit` removes what a killed attempt left behind, then records completion
atomically only after the shards are in place: the basis of prepare's byte-identical resume.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rwkvctl.data.binidx import BinIdxWriter, dtype_for_vocab
from rwkvctl.data.corpus import Doc, DocumentStream, Problem
from rwkvctl.data.manifest import BadInput, Shard, SourceCounts
from rwkvctl.errors import DataError
from rwkvctl.io.atomic import atomic_write_text

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
    batch_bytes: int = 1 << 20


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

    def _submit(self, batch: list) -> None:
        """Start encoding `batch` in the background; finish (write) the previous batch meanwhile."""
        fut = self._pool.submit(self._encode, batch)
        self._drain()
        self._pending = (batch, fut)

    def _drain(self) -> None:
        if self._pending is not None:
            batch, fut = self._pending
            self._pending = None
            self.flush(batch, *fut.result())

    def run(self) -> dict[str, Any]:
        stream = DocumentStream(self.unit.input, self.opts.text_key, self.opts.source_key)
        batch, size, reported = [], 0, 0
        self._pending: tuple[list, Future] | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="rwkvctl-encode")
        try:
            try:
                for item in _read_guarded(stream):
                    if isinstance(item, Problem):
                        self.problem(item)
                        continue
                    batch.append(item)
                    size += len(item.data)
                    if size >= self.opts.batch_bytes:
                        self._submit(batch)
                        batch, size = [], 0
                        self.report({"in_bytes": stream.consumed - reported})
                        reported = stream.consumed
                if batch:
                    self._submit(batch)
                self._drain()
            except _InputReadError as failed:
                self._unreadable(failed.error)
            self.report({"in_bytes": stream.consumed - reported})
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
            self._pool.shutdown(wait=True, cancel_futures=True)
        bad = [asdict(BadInput(self.unit.input, k, v[0], v[1], v[2])) for k, v in sorted(self.bad.items())]
        return {"unit": self.unit.name, "input": self.unit.input, "shards": shards, "bad_inputs": bad}

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


def _read_guarded(stream: DocumentStream) -> Iterator[Doc | Problem]:
    it = iter(stream)
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
    for d in (opts.out_dir / "train", opts.out_dir / "val", done_path(opts.out_dir, unit).parent):
        for stale in d.glob(f".{unit.name}.*.tmp-*"):
            stale.unlink(missing_ok=True)
    record = _UnitWriter(unit, opts, tok, report).run()
    atomic_write_text(done_path(opts.out_dir, unit), json.dumps(record, indent=1, sort_keys=True) + "\n")
    return record
