"""Fuzz prepared data through the commands that read it: prepare's manifest.json and binidx `.idx`/`.bin` pairs
(inspect, merge-binidx, train). Harness and the pass rule: conftest.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import strategies as st

from rwkvctl.data.binidx import BinIdxWriter
from rwkvctl.data.manifest import Manifest, Shard, SourceCounts

VOCAB = 256  # a small model vocabulary: token ids at or above it must be refused by name
TRAIN = ["--max-steps", "1", "--ctx-len", "8", "--micro-bsz", "2", "--device", "cpu", "--set", "model.n_layer=1",
         "--set", "model.n_embd=32", "--set", "model.head_size=32", "--set", f"model.vocab_size={VOCAB}",
         "--save-every", "1000"]
DATA_COMMANDS = st.sampled_from(["inspect", "inspect", "merge", "train"])


def _args(command: str, data: Path, work: Path) -> list[str]:
    if command == "inspect":
        return ["inspect", data]
    if command == "merge":
        return ["merge-binidx", data, work / "merged"]
    return ["train", "--data", data, "--run-dir", work / "run", *TRAIN]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared dataset as prepare writes it: two train shards and a val shard under a manifest."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    shards = []
    for name, split in (("train-0", "train"), ("train-1", "train"), ("val-0", "val")):
        sizes = rng.integers(5, 40, size=60)
        with BinIdxWriter(root / name) as w:
            for n in sizes:
                w.add_document(np.append(rng.integers(1, VOCAB, size=n - 1), 0).astype(np.uint16))
        docs, tokens = len(sizes), int(sizes.sum())
        shards.append(Shard(prefix=name, split=split, input=f"in/{name}.jsonl", docs=docs, tokens=tokens,
                            sources={"web": SourceCounts(docs=docs, tokens=tokens, bytes=tokens * 4)}))
    Manifest(tokenizer={"name": "world", "vocab_size": 65536, "eod_id": 0}, dtype="uint16", shards=shards,
             inputs_done=[s.input for s in shards], options={"seed": 0, "val_fraction": 0.0}).save(root)
    return root


def _copy_dataset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst / "data")
    return dst / "data"


def test_fuzz_manifest_json(fuzz, dataset, scratch) -> None:
    """manifest.json retyped, deleted, extended, nested, with huge/negative counts and shard paths anywhere."""
    doc = json.loads((dataset / "manifest.json").read_text())

    @fuzz.given(15, fuzz.json_mutation(doc), DATA_COMMANDS)
    def run(mutation, command: str) -> None:
        work = scratch()
        data = _copy_dataset(dataset, work)
        (data / "manifest.json").write_text(fuzz.dumps_hostile(fuzz.apply_json_mutation(doc, mutation)))
        fuzz.check("manifest.json", fuzz.run(_args(command, data, work)), ["manifest.json", str(data)],
                   f"{mutation} {command}")

    run()


def test_fuzz_manifest_bytes(fuzz, dataset, scratch) -> None:
    """manifest.json damaged byte by byte (truncated, non-UTF-8)."""
    raw = (dataset / "manifest.json").read_bytes()

    @fuzz.given(8, fuzz.byte_mutation(len(raw)), DATA_COMMANDS)
    def run(edits, command: str) -> None:
        work = scratch()
        data = _copy_dataset(dataset, work)
        (data / "manifest.json").write_bytes(fuzz.apply_byte_mutation(raw, edits))
        fuzz.check("manifest.json bytes", fuzz.run(_args(command, data, work)), ["manifest.json"], f"{edits}")

    run()


@pytest.mark.parametrize("ext", [".idx", ".bin"])
def test_fuzz_binidx_bytes(fuzz, dataset, scratch, ext: str) -> None:
    """One shard's `.idx` (header counts, sizes, pointers, doc_idx) or `.bin` (token ids, length) damaged, read
    through the manifest or as a bare prefix."""
    raw = (dataset / f"train-0{ext}").read_bytes()

    @fuzz.given(15, fuzz.byte_mutation(len(raw)), st.booleans(), DATA_COMMANDS)
    def run(edits, bare: bool, command: str) -> None:
        work = scratch()
        data = _copy_dataset(dataset, work)
        (data / f"train-0{ext}").write_bytes(fuzz.apply_byte_mutation(raw, edits))
        target = data / "train-0" if bare else data
        fuzz.check(f"binidx {ext}", fuzz.run(_args(command, target, work)), ["train-0"], f"{edits} {command}")

    run()


HEADER_FIELDS = st.sampled_from([(9, "<Q"), (17, "<B"), (18, "<Q"), (26, "<Q")])  # version, dtype, counts
HUGE = st.sampled_from([0, 1, 2, 7, 2**31 - 1, 2**31, 2**32, 2**40, 2**62, 2**64 - 1])


def test_fuzz_binidx_header_and_pointers(fuzz, dataset, scratch) -> None:
    """Counts, sizes and pointers set to huge, negative or off-by-one values (a byte flip rarely makes these)."""
    import struct

    raw = (dataset / "train-0.idx").read_bytes()
    n_seq = struct.unpack_from("<Q", raw, 18)[0]
    slots = st.one_of(HEADER_FIELDS, st.integers(0, n_seq - 1).map(lambda i: (34 + 4 * i, "<i")),
                      st.integers(0, n_seq - 1).map(lambda i: (34 + 4 * n_seq + 8 * i, "<q")))

    @fuzz.given(10, st.lists(st.tuples(slots, HUGE, st.booleans()), min_size=1, max_size=3), DATA_COMMANDS)
    def run(edits, command: str) -> None:
        work = scratch()
        data = _copy_dataset(dataset, work)
        buf = bytearray(raw)
        for (offset, fmt), value, negative in edits:
            bits = struct.calcsize(fmt) * 8
            value = -value if negative and fmt.islower() else value
            lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if fmt.islower() else (0, 2**bits - 1)
            struct.pack_into(fmt, buf, offset, min(max(value, lo), hi))
        (data / "train-0.idx").write_bytes(bytes(buf))
        fuzz.check("binidx .idx fields", fuzz.run(_args(command, data, work)), ["train-0"], f"{edits} {command}")

    run()
