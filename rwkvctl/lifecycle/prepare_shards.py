"""Where one prepare unit's encoded documents go: split and weight, round-trip check, shard files, tallies.

`UnitSink` takes encoded batches (Python path: documents + ids) and natively encoded JSONL blocks and hands every
document to the right shard; the small classes below it each own one decision or one piece of state:
`SplitPolicy` (train/val and source weights, by a seeded hash of the text), `RoundTrip` (decode(encode(x)) == x on
every Nth document), `ShardFiles` (the unit's binidx writers) and `Tally` (per-source counts and problems, which
become the unit's completion record). Reading the input and the encoder thread stay in prepare_unit.py.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from rwkvctl.data.binidx import BinIdxWriter
from rwkvctl.data.corpus import UNKNOWN_SOURCE, Block, Doc, Problem, parse_line
from rwkvctl.data.manifest import BadInput, Shard, SourceCounts

SPLITS = ("train", "val")


def _u64_fraction(data: bytes, key: bytes, person: bytes) -> float:
    h = hashlib.blake2b(data, digest_size=8, key=key, person=person).digest()
    return int.from_bytes(h, "little") / 2.0**64


def _int_bincount(which: np.ndarray, weights: np.ndarray, n: int) -> list[int]:
    out = np.zeros(n, dtype=np.int64)
    np.add.at(out, which, weights)
    return out.tolist()


class Tally:
    """Per-split, per-source counts and the problems met (kind -> [count, first line, detail])."""

    def __init__(self) -> None:
        self.counts: dict[str, dict[str, SourceCounts]] = {split: {} for split in SPLITS}
        self.bad: dict[str, list] = {}

    def add(self, split: str, source: str, docs: int, tokens: int, nbytes: int) -> None:
        table = self.counts[split]
        sc = table.get(source) or table.setdefault(source, SourceCounts())
        sc.docs, sc.tokens, sc.bytes = sc.docs + docs, sc.tokens + tokens, sc.bytes + nbytes

    def problem(self, p: Problem) -> None:
        entry = self.bad.setdefault(p.kind, [0, p.line, p.detail])
        entry[0] += 1

    def clear_counts(self) -> None:
        self.counts = {split: {} for split in SPLITS}

    def bad_inputs(self, input: str) -> list[dict[str, Any]]:
        return [asdict(BadInput(input, k, v[0], v[1], v[2])) for k, v in sorted(self.bad.items())]


class SplitPolicy:
    """Which split a document goes to and how many copies: a seeded hash of its text, so reruns agree."""

    def __init__(self, split: str | None, val_fraction: float, source_weights: dict[str, float], seed: int) -> None:
        self.val_fraction, self.source_weights = val_fraction, source_weights
        self.key = seed.to_bytes(8, "little", signed=True)
        # mixed: documents of one batch may go to different splits or be repeated; else all go once to `default`
        self.mixed = (split is None and val_fraction > 0) or bool(source_weights)
        self.default = split or "train"  # split: "val" for explicit validation inputs, None = decided per document

    def route(self, d: Doc) -> tuple[str, int]:
        """-> (split, copies) of one document."""
        split = self.default
        if split == "train" and self.val_fraction > 0 and _u64_fraction(d.data, self.key, b"val") < self.val_fraction:
            split = "val"
        w = self.source_weights.get(d.source, 1.0) if split == "train" else 1.0
        if w == 1.0:
            return split, 1
        return split, int(math.floor(w)) + (_u64_fraction(d.data, self.key, b"weight") < w - math.floor(w))


class RoundTrip:
    """decode(encode(text)) == text on document numbers divisible by `every`, counted across the whole unit."""

    def __init__(self, tok: Any, every: int, problem: Callable[[Problem], None]) -> None:
        self.tok, self.every, self.problem = tok, every, problem
        self.seen = 0

    def docs(self, batch: list[Doc], ids: np.ndarray, starts: list[int], ends: list[int]) -> None:
        for k in range(-(self.seen + 1) % self.every, len(batch), self.every):  # document seen+k+1 divisible by every
            d = batch[k]
            if self.tok.decode(ids[starts[k] : ends[k] - 1]) != d.data.decode("utf-8"):  # minus the end-of-doc id
                self.problem(Problem(d.line, "roundtrip_mismatch", "decode(encode(text)) != text (kept)"))
        self.seen += len(batch)

    def block(self, first: int, res: Any, ends: np.ndarray) -> None:
        """All of a native block's samples in one decode call (a call per document cost more than the rest of the
        block's bookkeeping); per document only when that finds a mismatch."""
        picked = np.arange(-(self.seen + 1) % self.every, len(res.doc_count), self.every)
        self.seen += len(res.doc_count)
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


class ShardFiles:
    """The unit's binidx writers, one per split, opened on the first document of that split."""

    def __init__(self, out_dir: Path, name: str, dtype: np.dtype) -> None:
        self.out_dir, self.name, self.dtype = out_dir, name, dtype
        self.writers: dict[str, BinIdxWriter] = {}

    def add(self, split: str, ids: np.ndarray, counts: np.ndarray) -> None:
        if split not in self.writers:
            self.writers[split] = BinIdxWriter(self.out_dir / split / self.name, self.dtype)
        self.writers[split].add_documents(ids, counts)

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()
        self.writers.clear()

    def close(self, input: str, tally: Tally) -> list[dict[str, Any]]:
        """Finish the non-empty shards (an empty one is removed) -> their manifest entries."""
        shards = []
        for split in SPLITS:
            w = self.writers.get(split)
            if w is None:
                continue
            if w.num_docs == 0:
                w.abort()
                continue
            w.close()
            sources = dict(sorted(tally.counts[split].items()))
            shards.append(asdict(Shard(f"{split}/{self.name}", split, input, w.num_docs, w.num_tokens, sources)))
        return shards


class UnitSink:
    """Writes encoded documents of one unit to its shards, checking, routing and counting them on the way."""

    def __init__(self, tok: Any, policy: SplitPolicy, files: ShardFiles, *, text_key: str, source_key: str,
                 verify_every: int, report: Callable[[dict], None]) -> None:
        self.tok, self.policy, self.files, self.report = tok, policy, files, report
        self.text_key, self.source_key = text_key, source_key
        self.tally = Tally()
        self.roundtrip = RoundTrip(tok, verify_every, self.tally.problem)

    def encode(self, batch: list[Doc]) -> tuple[int, np.ndarray, np.ndarray]:
        """Runs on the encoder thread: the C++ encoder releases the GIL, so it overlaps with parsing."""
        data = b"".join([d.data for d in batch])
        offsets = np.zeros(len(batch) + 1, dtype=np.int64)
        np.cumsum([len(d.data) for d in batch], out=offsets[1:])
        ids, counts = self.tok.encode_batch(data, offsets)
        return len(data), ids, counts

    def write(self, batch: list[Doc], n_bytes: int, ids: np.ndarray, counts: np.ndarray) -> None:
        """Write documents encoded as one flat `ids` array with per-document `counts`."""
        ends = np.cumsum(counts).tolist()
        cl = counts.tolist()
        starts = [e - c for e, c in zip(ends, cl, strict=True)]
        self.roundtrip.docs(batch, ids, starts, ends)
        if not self.policy.mixed:  # the common case: every document goes once to one split, written in one call
            split = self.policy.default
            for d, c in zip(batch, cl, strict=True):
                self.tally.add(split, d.source, 1, c, len(d.data))
            self.files.add(split, ids, counts)
        else:
            dest: dict[str, list[int]] = {split: [] for split in SPLITS}
            for k, d in enumerate(batch):
                split, copies = self.policy.route(d)
                if copies == 0:
                    continue
                self.tally.add(split, d.source, copies, copies * cl[k], copies * len(d.data))
                dest[split].extend([k] * copies)
            for split, picked in dest.items():
                if picked:
                    flat = np.concatenate([ids[starts[k] : ends[k]] for k in picked])
                    self.files.add(split, flat, counts[picked])
        self.report({"docs": len(batch), "tokens": int(counts.sum()), "text_bytes": n_bytes})

    def encode_block(self, block: Block) -> Any:
        # reuse: the result is written (write_block) before the encoder's next-but-one call, see EncodePipeline
        return self.tok.encode_jsonl(block.data, self.text_key, self.source_key, block.lines, block.end, reuse=True)

    def write_block(self, block: Block, res: Any) -> None:
        """Write one natively encoded block (see JsonlBlock)."""
        first = block.first
        extra: list[tuple[int, Doc]] = []  # documents only the Python reader could parse
        if len(res.fallback_lines):
            lines = block.data[: block.end].split(b"\n")
            for i in res.fallback_lines.tolist():
                item = parse_line(lines[i], first + i + 1, self.text_key, self.source_key)
                if isinstance(item, Problem):
                    self.tally.problem(item)
                elif item is not None:
                    extra.append((i, item))
        if extra or self.policy.mixed:  # rare or per-document work anyway: hand documents to the general path
            self._write_block_as_docs(first, res, extra)
            return
        n = len(res.doc_count)
        ends = np.cumsum(res.doc_count)
        text_ends = res.doc_text_end
        self.roundtrip.block(first, res, ends)
        names = [*res.sources, UNKNOWN_SOURCE]
        which = np.where(res.doc_source < 0, len(res.sources), res.doc_source)
        sizes = np.diff(text_ends, prepend=0)
        split = self.policy.default
        for s, docs, tokens, nbytes in zip(
            names,
            np.bincount(which, minlength=len(names)).tolist(),
            _int_bincount(which, res.doc_count, len(names)),
            _int_bincount(which, sizes, len(names)),
            strict=True,
        ):
            if docs:
                self.tally.add(split, s, docs, tokens, nbytes)
        if n:
            self.files.add(split, res.ids, res.doc_count)
        self.report({"docs": n, "tokens": len(res.ids), "text_bytes": int(text_ends[-1]) if n else 0})

    def _write_block_as_docs(self, first: int, res: Any, extra: list[tuple[int, Doc]]) -> None:
        text, ends = res.text, np.cumsum(res.doc_count).tolist()
        starts = [e - c for e, c in zip(ends, res.doc_count.tolist(), strict=True)]
        t_ends = res.doc_text_end.tolist()
        items = []  # (line index in block, Doc, ids)
        for k, (line, src) in enumerate(zip(res.doc_line.tolist(), res.doc_source.tolist(), strict=True)):
            data = text[t_ends[k - 1] if k else 0 : t_ends[k]].tobytes()
            doc = Doc(first + line + 1, data, res.sources[src] if src >= 0 else UNKNOWN_SOURCE)
            items.append((line, doc, res.ids[starts[k] : ends[k]]))
        if extra:
            n_bytes, ids, counts = self.encode([d for _, d in extra])
            offs = np.concatenate([[0], np.cumsum(counts)])
            items += [(i, d, ids[offs[j] : offs[j + 1]]) for j, (i, d) in enumerate(extra)]
            items.sort(key=lambda it: it[0])
        batch = [d for _, d, _ in items]
        flat = np.concatenate([ids for _, _, ids in items]) if items else np.empty(0, np.int32)
        counts = np.array([len(ids) for _, _, ids in items], dtype=np.int64)
        self.write(batch, sum(len(d.data) for d in batch), flat, counts)
