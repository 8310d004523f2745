"""`rwkvctl prepare`: corpus files -> tokenized binidx shards + manifest.json, parallel and resumable.

Unit of work = one input file -> one train shard and/or one val shard (`OUT/train/<unit>`, `OUT/val/<unit>`).
A unit's shards are written to temp names, fsynced and renamed, and only then is its completion record
`OUT/.prepare/done/<unit>.json` written atomically. A rerun with the same arguments skips units with a
record and redoes the rest from scratch, so after any kill the final output is byte-identical to an
uninterrupted run. The manifest is rebuilt deterministically from the records at the end of every run.

Workers are processes (fork on Linux, else spawn), each taking whole units; results do not depend on the worker count.
`num_nodes/node_rank` split units by index (`index % num_nodes == node_rank`), so nodes sharing an output
directory never touch each other's units.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import multiprocessing as mp
import os
import queue as queue_mod
import re
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rwkvctl.data.binidx import BinIdxWriter, dtype_for_vocab, magic_prime
from rwkvctl.data.corpus import DocumentStream, Problem, expand_inputs, input_size
from rwkvctl.data.manifest import MANIFEST_NAME, BadInput, Manifest, Shard, SourceCounts
from rwkvctl.data.tokenizer import load_tokenizer
from rwkvctl.errors import DataError
from rwkvctl.io.atomic import atomic_write_text

STATE_DIR = ".prepare"
PROGRESS_EVERY_S = 0.25


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


@dataclass
class PrepareProgress:
    files_total: int
    files_done: int = 0
    files_skipped: int = 0
    docs: int = 0
    tokens: int = 0
    text_bytes: int = 0
    in_bytes: int = 0
    in_bytes_total: int = 0
    elapsed: float = 0.0


@dataclass
class PrepareResult:
    manifest: Manifest
    manifest_path: Path
    complete: bool  # False when other nodes' units are still missing
    units_done_now: int
    units_skipped: int
    seconds: float
    stats: PrepareProgress


@dataclass(frozen=True)
class Unit:
    index: int
    input: str
    split: str | None  # "val" for explicit validation inputs, None = decided per document
    name: str


# --- planning ----------------------------------------------------------------------------------------------------


def _unit_name(index: int, spec: str) -> str:
    stem = Path(spec.removeprefix("hf:")).name
    for suffix in (".zst", ".zstd", ".gz", ".jsonl", ".json", ".parquet"):
        stem = stem.removesuffix(suffix)
    return f"{index:06d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', stem)[:60] or 'input'}"


def _split_layout(inputs: list[str], val_inputs: list[str]) -> tuple[list[str], list[str]]:
    """A SlimPajama-style root (train/ + validation/ subdirs) given as input: train/ trains, validation/
    validates (unless --val-input is given), test/ is left alone, never mixed into training."""
    train, val = [], list(val_inputs)
    for spec in inputs:
        p = Path(spec)
        vdir = next((p / v for v in ("validation", "valid", "val") if (p / v).is_dir()), None)
        if p.is_dir() and (p / "train").is_dir() and vdir is not None:
            train.append(str(p / "train"))
            if not val_inputs:
                val.append(str(vdir))
        else:
            train.append(spec)
    return train, val


def plan_units(opts: PrepareOptions) -> list[Unit]:
    train_specs, val_specs = _split_layout(opts.inputs, opts.val_inputs)
    train = expand_inputs(train_specs)
    val = expand_inputs(val_specs) if val_specs else []
    if not train and not val:
        given = " ".join(opts.inputs + opts.val_inputs)
        raise DataError(f"no input files matched {given!r} (need .jsonl[.zst|.gz], .parquet or a dataset dir)")
    overlap = set(train) & set(val)
    if overlap:
        raise DataError(f"{sorted(overlap)[0]}: given both as training and validation input")
    specs = [(s, None) for s in train] + [(s, "val") for s in val]
    return [Unit(i, s, split, _unit_name(i, s)) for i, (s, split) in enumerate(specs)]


def _fingerprint(opts: PrepareOptions, tok_desc: dict, units: list[Unit]) -> dict[str, Any]:
    """Everything that changes the bytes written; worker/node counts and ctx_len deliberately excluded."""
    return {
        "tokenizer": tok_desc,
        "text_key": opts.text_key,
        "source_key": opts.source_key,
        "val_fraction": opts.val_fraction,
        "seed": opts.seed,
        "source_weights": dict(sorted(opts.source_weights.items())),
        "verify_every": opts.verify_every,
        "units": [[u.name, u.input, u.split] for u in units],
    }


def _check_out_dir(out: Path, fp: dict[str, Any]) -> None:
    state = out / STATE_DIR / "options.json"
    if state.is_file():
        try:
            old = json.loads(state.read_text())
        except ValueError:
            raise DataError(f"{state}: damaged; delete {out} and start again") from None
        if old != fp:
            key = next(k for k in sorted(set(fp) | set(old)) if fp.get(k) != old.get(k))
            raise DataError(
                f"{out} was prepared with a different {key!r}; rerun with the original arguments or use a new --out"
            )
        return
    # Empty, or holding only our state dir (a first run killed before options.json was in place): ours.
    if out.exists() and (not out.is_dir() or any(p.name != STATE_DIR for p in out.iterdir())):
        raise DataError(f"{out} exists and is not an rwkvctl prepare output; choose a new or empty --out")
    atomic_write_text(state, json.dumps(fp, indent=1) + "\n")


# --- one unit ----------------------------------------------------------------------------------------------------


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
                for item in stream:
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
            except (DataError, OSError) as e:
                # An input we cannot read at all: recorded like any other bad input, nothing written for it.
                for w in self.writers.values():
                    w.abort()
                self.writers.clear()
                self.counts = {"train": {}, "val": {}}
                self.problem(Problem(0, "unreadable", str(e)[:200]))
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


def _done_path(out: Path, unit: Unit) -> Path:
    return out / STATE_DIR / "done" / f"{unit.name}.json"


def _run_unit(unit: Unit, opts: PrepareOptions, tok: Any, report: Callable[[dict], None]) -> dict[str, Any]:
    # Leftovers of a killed attempt at this unit: shard temps and a half-written completion record.
    for d in (opts.out_dir / "train", opts.out_dir / "val", _done_path(opts.out_dir, unit).parent):
        for stale in d.glob(f".{unit.name}.*.tmp-*"):
            stale.unlink(missing_ok=True)
    record = _UnitWriter(unit, opts, tok, report).run()
    atomic_write_text(_done_path(opts.out_dir, unit), json.dumps(record, indent=1, sort_keys=True) + "\n")
    return record


# --- worker processes --------------------------------------------------------------------------------------------

_W: dict[str, Any] = {}


def _worker_init(opts: PrepareOptions, q: Any) -> None:
    _W["opts"], _W["q"], _W["tok"] = opts, q, load_tokenizer(opts.tokenizer)


def _worker_run(unit: Unit) -> dict[str, Any]:
    q = _W["q"]
    return _run_unit(unit, _W["opts"], _W["tok"], lambda d: q.put(d))


# --- driver ------------------------------------------------------------------------------------------------------


def _load_record(out: Path, unit: Unit) -> dict[str, Any] | None:
    path = _done_path(out, unit)
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except ValueError:
        return None
    for s in rec.get("shards", []):
        for ext in (".bin", ".idx"):
            if not (out / (s["prefix"] + ext)).is_file():
                return None  # shard deleted since: redo the unit
    return rec


def build_manifest(
    out: Path, units: list[Unit], records: dict[str, dict], opts: PrepareOptions, tok_desc: dict
) -> Manifest:
    m = Manifest(tokenizer=tok_desc, dtype=str(dtype_for_vocab(tok_desc["vocab_size"])))
    for u in units:
        rec = records.get(u.name)
        if rec is None:
            continue
        m.inputs_done.append(u.input)
        for s in rec["shards"]:
            m.shards.append(Shard(**{**s, "sources": {k: SourceCounts(**v) for k, v in s["sources"].items()}}))
        m.bad_inputs.extend(BadInput(**b) for b in rec["bad_inputs"])
    m.options = {
        "text_key": opts.text_key,
        "source_key": opts.source_key,
        "val_fraction": opts.val_fraction,
        "seed": opts.seed,
        "source_weights": dict(sorted(opts.source_weights.items())),
        "verify_every": opts.verify_every,
        "inputs": len(units),
    }
    if opts.ctx_len:
        m.rwkv_lm = rwkv_lm_numbers(m.tokens("train"), opts.ctx_len)
    return m


def rwkv_lm_numbers(tokens: int, ctx_len: int) -> dict[str, Any]:
    """What RWKV-LM's train.py needs for this data (on the merged .bin): --my_exit_tokens, --magic_prime."""
    out: dict[str, Any] = {"ctx_len": ctx_len, "my_exit_tokens": tokens}
    try:
        out["magic_prime"] = magic_prime(tokens, ctx_len)
    except DataError as e:
        out["magic_prime"] = None
        out["note"] = str(e)
    return out


def prepare(opts: PrepareOptions, on_progress: Callable[[PrepareProgress], None] | None = None) -> PrepareResult:
    t0 = time.monotonic()
    if not 0 <= opts.val_fraction < 1:
        raise DataError(f"--val-fraction must be in [0, 1), got {opts.val_fraction}")
    if opts.num_nodes < 1 or not 0 <= opts.node_rank < opts.num_nodes:
        raise DataError(f"--node-rank {opts.node_rank} must be in 0..{opts.num_nodes - 1}")
    if opts.workers < 1 or opts.verify_every < 1:
        raise DataError("--workers and --verify-every must be at least 1")
    if any(w < 0 or not math.isfinite(w) for w in opts.source_weights.values()):
        raise DataError("source weights must be finite and non-negative")
    opts.out_dir = Path(opts.out_dir)
    units = plan_units(opts)
    tok = load_tokenizer(opts.tokenizer)
    tok_desc = tok.describe()
    _check_out_dir(opts.out_dir, _fingerprint(opts, tok_desc, units))

    mine = [u for u in units if u.index % opts.num_nodes == opts.node_rank]
    own_manifest = f"manifest.node-{opts.node_rank}-of-{opts.num_nodes}.json"
    for name in (MANIFEST_NAME, own_manifest, "options.json"):  # temps of a run killed while writing these
        for d in (opts.out_dir, opts.out_dir / STATE_DIR):
            for stale in d.glob(f".{name}.tmp-*"):
                stale.unlink(missing_ok=True)
    records = {u.name: r for u in units if (r := _load_record(opts.out_dir, u)) is not None}
    todo = [u for u in mine if u.name not in records]
    sizes = {u.name: input_size(u.input) for u in todo}
    prog = PrepareProgress(
        files_total=len(mine), files_skipped=len(mine) - len(todo), in_bytes_total=sum(sizes.values())
    )
    prog.files_done = prog.files_skipped
    last = [0.0]

    def report(delta: dict, force: bool = False) -> None:
        for k, v in delta.items():
            setattr(prog, k, getattr(prog, k) + v)
        now = time.monotonic()
        if on_progress and (force or now - last[0] >= PROGRESS_EVERY_S):
            last[0] = now
            prog.elapsed = now - t0
            on_progress(prog)

    report({}, force=True)
    if opts.workers == 1 or len(todo) <= 1:
        for u in todo:
            records[u.name] = _run_unit(u, opts, tok, report)
            report({"files_done": 1}, force=True)
    else:
        _run_parallel(todo, sizes, opts, records, report)

    done_all = all(u.name in records for u in units)
    listed = units if done_all else [u for u in units if u.name in records and u in mine]
    manifest = build_manifest(opts.out_dir, listed, records, opts, tok_desc)
    name = MANIFEST_NAME if done_all else own_manifest
    path = manifest.save(opts.out_dir / name)
    report({}, force=True)
    return PrepareResult(manifest, path, done_all, len(todo), prog.files_skipped, time.monotonic() - t0, prog)


def _run_parallel(
    todo: list[Unit], sizes: dict[str, int], opts: PrepareOptions, records: dict, report: Callable
) -> None:
    # fork (Linux): workers inherit the loaded tokenizer and native library, so they start in milliseconds
    # instead of re-importing and re-parsing the vocab (~1 s each). RWKVCTL_MP_START=spawn opts out.
    method = os.environ.get("RWKVCTL_MP_START") or ("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    ctx = mp.get_context(method)
    q = ctx.Queue()
    # Biggest inputs first, so one large file does not run alone at the end.
    order = sorted(todo, key=lambda u: (-sizes[u.name], u.index))

    def drain() -> None:
        with contextlib.suppress(queue_mod.Empty):
            while True:
                report(q.get_nowait())

    # ProcessPoolExecutor (not Pool): a worker that dies raises BrokenProcessPool instead of hanging.
    with ProcessPoolExecutor(
        min(opts.workers, len(todo)), mp_context=ctx, initializer=_worker_init, initargs=(opts, q)
    ) as pool:
        pending = {pool.submit(_worker_run, u) for u in order}
        try:
            while pending:
                finished, pending = wait(pending, timeout=0.1, return_when=FIRST_COMPLETED)
                drain()
                for fut in finished:
                    rec = fut.result()
                    records[rec["unit"]] = rec
                    report({"files_done": 1}, force=True)
                report({})
        except BrokenProcessPool:
            raise DataError(
                "a prepare worker died (killed or out of memory); rerun the same command to resume"
            ) from None
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
    drain()
