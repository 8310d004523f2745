"""One unit of `rwkvctl prepare`: one input file -> its train/val shards and a completion record.

The unit reader streams documents and encodes them in batches; prepare_shards.py splits/weights them by a seeded
hash of the text and writes shards through temp names. JSONL inputs with the native World encoder take the block
path: whole blocks of lines are parsed, unescaped and encoded in one C++ call and counted with numpy, with no Python
object per document (lines the native parser declines are classified by the Python reader, so results are the same
either way). The encoding runs on a background thread (the C++ calls release the GIL) when the machine has a core
to spare for it. `run_unit` removes what a killed attempt left behind, then records completion atomically only after
the shards are in place: the basis of prepare's byte-identical resume.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rwkvctl.data.binidx import dtype_for_vocab
from rwkvctl.data.corpus import MAX_LINE_BYTES, Doc, DocumentStream, Problem
from rwkvctl.errors import DataError
from rwkvctl.fs import atomic_write_text, remove_temps
from rwkvctl.lifecycle.prepare_shards import ShardFiles, SplitPolicy, UnitSink

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
    # A JSONL line longer than this is counted as a bad document (line_too_long) without being read whole, so memory
    # stays bounded whatever one line holds. In the output fingerprint only when changed from the default.
    max_line_bytes: int = MAX_LINE_BYTES


@dataclass(frozen=True)
class Unit:
    index: int
    input: str
    split: str | None  # "val" for explicit validation inputs, None = decided per document
    name: str


class EncodePipeline:
    """Runs each item's encoding in the background when there is an encoder thread (the C++ calls release the
    GIL, so encoding overlaps with reading), and finishes items in order on the calling thread."""

    def __init__(self, thread: bool) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="rwkvctl-encode") if thread else None
        self._pending: tuple[Future, Callable[[Any], None]] | None = None

    def submit(self, work: Callable[[], Any], finish: Callable[[Any], None]) -> None:
        """Run `work`, then `finish(result)`; the previous item is finished meanwhile."""
        if self._pool is None:
            self.drain()
            finish(work())
            return
        fut = self._pool.submit(work)
        self.drain()
        self._pending = (fut, finish)

    def drain(self) -> None:
        if self._pending is not None:
            fut, finish = self._pending
            self._pending = None
            finish(fut.result())

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


class _UnitReader:
    """Reads one input (documents, or native JSONL blocks), feeds it to the sink and reports input progress."""

    def __init__(self, unit: Unit, opts: PrepareOptions, tok: Any, report: Callable[[dict], None]) -> None:
        self.unit, self.opts, self.tok, self.report = unit, opts, tok, report
        policy = SplitPolicy(unit.split, opts.val_fraction, opts.source_weights, opts.seed)
        files = ShardFiles(opts.out_dir, unit.name, dtype_for_vocab(tok.vocab_size))
        self.sink = UnitSink(tok, policy, files, text_key=opts.text_key, source_key=opts.source_key,
                             verify_every=opts.verify_every, report=report)
        self._reported = 0  # input bytes reported so far

    def run(self) -> dict[str, Any]:
        """-> the unit's completion record (its shards and bad inputs)."""
        stream = DocumentStream(self.unit.input, self.opts.text_key, self.opts.source_key, self.opts.max_line_bytes)
        self.pipeline = EncodePipeline(_use_thread(self.opts))
        # Only the World tokenizer's C++ encoder has the block path (spm and world-python read documents).
        native = hasattr(self.tok, "encode_jsonl") and getattr(self.tok, "backend", "") == "native"
        block_path = self.opts.native_jsonl and stream.is_jsonl and native
        files, tally = self.sink.files, self.sink.tally
        try:
            try:
                if block_path:
                    self._read_blocks(stream)
                else:
                    self._read_docs(stream)
            except _InputReadError as failed:
                self._unreadable(failed.error)
            self.report({"in_bytes": stream.consumed - self._reported})
            shards = files.close(self.unit.input, tally)
        except BaseException:
            files.abort()
            raise
        finally:
            self.pipeline.close()
        return {"unit": self.unit.name, "input": self.unit.input, "shards": shards,
                "bad_inputs": tally.bad_inputs(self.unit.input)}

    def _progress(self, stream: DocumentStream) -> None:
        self.report({"in_bytes": stream.consumed - self._reported})
        self._reported = stream.consumed

    def _read_docs(self, stream: DocumentStream) -> None:
        batch: list[Doc] = []
        size = 0
        for item in _read_guarded(iter(stream)):
            if isinstance(item, Problem):
                self.sink.tally.problem(item)
                continue
            batch.append(item)
            size += len(item.data)
            if size >= self.opts.batch_bytes:
                self._submit_docs(batch)
                batch, size = [], 0
                self._progress(stream)
        if batch:
            self._submit_docs(batch)
        self.pipeline.drain()

    def _submit_docs(self, batch: list[Doc]) -> None:
        self.pipeline.submit(lambda: self.sink.encode(batch), lambda res: self.sink.write(batch, *res))

    def _read_blocks(self, stream: DocumentStream) -> None:
        sink = self.sink
        for item in _read_guarded(stream.iter_blocks(self.opts.batch_bytes)):
            if isinstance(item, Problem):
                sink.tally.problem(item)
                continue
            self.pipeline.submit(lambda b=item: sink.encode_block(b), lambda res, b=item: sink.write_block(b, res))
            self._progress(stream)
        self.pipeline.drain()

    def _unreadable(self, e: DataError | OSError) -> None:
        """Reading the input failed. Only an input that is itself unusable becomes a (permanent) bad input."""
        self.sink.files.abort()
        if isinstance(e, OSError):
            # EIO, a dropped network mount, a permission fixed later: recording the input as done would skip it
            # forever, so stop this run instead; a rerun resumes with this input.
            what = e.strerror or str(e)
            msg = f"{self.unit.input}: read error ({what}); nothing recorded for it, rerun to resume"
            raise DataError(msg) from None
        self.sink.tally.clear_counts()
        self.sink.tally.problem(Problem(0, "unreadable", str(e)[:200]))


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
    record = _UnitReader(unit, opts, tok, report).run()
    atomic_write_text(done_path(opts.out_dir, unit), json.dumps(record, indent=1, sort_keys=True) + "\n")
    return record
