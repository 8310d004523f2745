"""`prepare` end to end: shard layout (independently parsed), manifest counts, splits, weights, bad input, args."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import zstandard

from rwkvctl.data.binidx import BinIdxReader, magic_prime
from rwkvctl.data.manifest import Manifest, resolve_prefixes
from rwkvctl.data.merge import merge_binidx
from rwkvctl.dir_lock import is_lock_file
from rwkvctl.errors import DataError, TokenizerError
from rwkvctl.lifecycle.prepare import PrepareOptions, prepare


@pytest.fixture(scope="module")
def ref_tok():
    import rwkv  # the pinned reference tokenizer: a broken install must fail, not skip
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    return TRIE_TOKENIZER(str(Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt"))


def parse_pair(prefix: Path) -> dict:
    """Independent MMIDIDX v1 parser (Megatron's layout, as RWKV-LM's RWKV-v5/src/binidx.py reads it), no project
    code: .idx = magic (9 B), <Q version, <B dtype code, <Q n, <Q n_doc_idx, int32 sizes[n], int64 pointers[n],
    int64 doc_idx[n_doc_idx]; .bin = the tokens back to back."""
    raw = prefix.with_name(prefix.name + ".idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, code, n, d = struct.unpack("<QBQQ", raw[9:34])
    sizes = np.frombuffer(raw, "<i4", n, 34)
    pointers = np.frombuffer(raw, "<i8", n, 34 + 4 * n)
    doc_idx = np.frombuffer(raw, "<i8", d, 34 + 12 * n)
    assert 34 + 12 * n + 8 * d == len(raw)
    tokens = np.frombuffer(prefix.with_name(prefix.name + ".bin").read_bytes(), "<u2")
    return {
        "version": version,
        "code": code,
        "sizes": sizes,
        "pointers": pointers,
        "doc_idx": doc_idx,
        "tokens": tokens,
    }


def test_end_to_end_layout_counts_and_ids(tmp_path: Path, ref_tok, make_corpus) -> None:
    rows = make_corpus(tmp_path / "c", n_files=2, docs_per_file=25)
    make_corpus(tmp_path / "v", n_files=1, docs_per_file=5, seed=9)
    res = prepare(
        PrepareOptions(
            inputs=[str(tmp_path / "c")], val_inputs=[str(tmp_path / "v")], out_dir=tmp_path / "out", ctx_len=64
        )
    )
    m = Manifest.load(tmp_path / "out")
    assert res.complete and m == res.manifest and len(m.shards_for("train")) == 2 and len(m.shards_for("val")) == 1
    all_tokens = []
    for shard in m.shards_for("train"):
        p = parse_pair(tmp_path / "out" / shard.prefix)
        assert p["version"] == 1 and p["code"] == 8
        assert p["sizes"].sum() == len(p["tokens"]) == shard.tokens and len(p["sizes"]) == shard.docs
        assert p["pointers"].tolist() == (np.concatenate([[0], np.cumsum(p["sizes"])[:-1]]) * 2).tolist()
        assert p["doc_idx"].tolist() == list(range(shard.docs + 1))
        ends = np.cumsum(p["sizes"]) - 1
        assert (p["tokens"][ends] == 0).all()  # end-of-document id after every document
        all_tokens.append(p["tokens"])
    expected = [t for r in rows for t in ref_tok.encode(r["text"]) + [0]]
    assert np.concatenate(all_tokens).tolist() == expected  # ids identical to the reference, file/line order
    per_source = m.source_totals("train")
    assert sum(c.docs for c in per_source.values()) == 50 == m.docs("train")
    for name, c in per_source.items():
        mine = [r for r in rows if r["meta"]["redpajama_set_name"] == name]
        assert c.docs == len(mine) and c.bytes == sum(len(r["text"].encode()) for r in mine)
    assert m.rwkv_lm == {"ctx_len": 64, "my_exit_tokens": len(expected), "magic_prime": magic_prime(len(expected), 64)}
    assert m.bad_inputs == [] and len(m.inputs_done) == 3
    assert resolve_prefixes(tmp_path / "out", "val") == [tmp_path / "out" / m.shards_for("val")[0].prefix]

    merged = merge_binidx(resolve_prefixes(tmp_path / "out"), tmp_path / "merged")
    p = parse_pair(tmp_path / "merged")
    assert p["tokens"].tolist() == expected and p["doc_idx"].tolist() == list(range(51)) and merged["docs"] == 50
    assert p["pointers"].tolist() == (np.concatenate([[0], np.cumsum(p["sizes"])[:-1]]) * 2).tolist()
    before = (tmp_path / "merged.bin").read_bytes(), (tmp_path / "merged.idx").read_bytes()
    with pytest.raises(DataError, match="merged.bin: already exists; pass --force"):
        merge_binidx(resolve_prefixes(tmp_path / "out", "val"), tmp_path / "merged")
    assert ((tmp_path / "merged.bin").read_bytes(), (tmp_path / "merged.idx").read_bytes()) == before
    merge_binidx(resolve_prefixes(tmp_path / "out", "val"), tmp_path / "merged", overwrite=True)
    assert parse_pair(tmp_path / "merged")["tokens"].size < p["tokens"].size


def test_workers_nodes_and_rerun_are_identical(tmp_path: Path, make_corpus, tree_bytes) -> None:
    make_corpus(tmp_path / "c", n_files=4, docs_per_file=10)
    inputs = [str(tmp_path / "c")]
    one = prepare(PrepareOptions(inputs=inputs, out_dir=tmp_path / "w1", val_fraction=0.2))
    two = prepare(PrepareOptions(inputs=inputs, out_dir=tmp_path / "w2", val_fraction=0.2, workers=2))
    assert tree_bytes(tmp_path / "w1") == tree_bytes(tmp_path / "w2")
    again = prepare(PrepareOptions(inputs=inputs, out_dir=tmp_path / "w1", val_fraction=0.2, workers=2))
    assert (one.units_done_now, two.units_done_now, again.units_done_now, again.units_skipped) == (4, 4, 0, 4)
    assert tree_bytes(tmp_path / "w1") == tree_bytes(tmp_path / "w2")
    # Two nodes on a shared directory: each writes a partial manifest; a final plain run completes it.
    for rank in (0, 1):
        r = prepare(
            PrepareOptions(inputs=inputs, out_dir=tmp_path / "n", val_fraction=0.2, num_nodes=2, node_rank=rank)
        )
        assert r.units_done_now == 2
    assert not r.complete or r.manifest_path.name == "manifest.json"
    final = prepare(PrepareOptions(inputs=inputs, out_dir=tmp_path / "n", val_fraction=0.2))
    assert final.units_done_now == 0 and final.complete
    # the same files, less the nodes' partial manifests and the (empty) writer-lock files, which differ per node
    node_files = {k: v for k, v in tree_bytes(tmp_path / "n").items()
                  if not k.startswith("manifest.node") and not is_lock_file(Path(k))}
    assert node_files == {k: v for k, v in tree_bytes(tmp_path / "w1").items() if not is_lock_file(Path(k))}


def test_val_fraction_and_source_weights(tmp_path: Path, make_corpus) -> None:
    rows = make_corpus(tmp_path / "c", n_files=2, docs_per_file=60)
    base = prepare(PrepareOptions(inputs=[str(tmp_path / "c")], out_dir=tmp_path / "a", val_fraction=0.25, seed=3))
    m = base.manifest
    assert m.docs("train") + m.docs("val") == len(rows) and 0 < m.docs("val") < len(rows) / 2
    other_seed = prepare(
        PrepareOptions(inputs=[str(tmp_path / "c")], out_dir=tmp_path / "b", val_fraction=0.25, seed=4)
    )
    assert other_seed.manifest.docs("val") != m.docs("val") or other_seed.manifest.tokens("val") != m.tokens("val")
    w = {"RedPajamaGithub": 2.0, "RedPajamaBook": 0.0, "RedPajamaC4": 0.5}
    weighted = prepare(PrepareOptions(inputs=[str(tmp_path / "c")], out_dir=tmp_path / "w", source_weights=w))
    counts = {s: sum(r["meta"]["redpajama_set_name"] == s for r in rows) for s in w}
    got = weighted.manifest.source_totals("train")
    assert got["RedPajamaGithub"].docs == 2 * counts["RedPajamaGithub"] and "RedPajamaBook" not in got
    assert 0.2 * counts["RedPajamaC4"] < got["RedPajamaC4"].docs < 0.8 * counts["RedPajamaC4"]
    assert weighted.manifest.options["source_weights"] == dict(sorted(w.items()))


def test_bad_inputs_are_reported_not_fatal(tmp_path: Path) -> None:
    good = json.dumps({"text": "fine text", "meta": {"redpajama_set_name": "RedPajamaC4"}}).encode()
    lines = [good, b"{broken", b'{"x": 1}', b'{"text": 5}', b'{"text": ""}', b'{"text": "\xff"}', good]
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(lines)))
    rng = np.random.default_rng(0)
    many = [json.dumps({"text": " ".join(map(str, rng.integers(0, 10**6, 30)))}).encode() for _ in range(3000)]
    blob = zstandard.ZstdCompressor().compress(b"\n".join(many))
    (d / "b.jsonl.zst").write_bytes(blob[: len(blob) // 2])
    (d / "c.jsonl.gz").write_bytes(b"garbage, not gzip")
    (d / "d.jsonl").write_bytes(b"")
    res = prepare(PrepareOptions(inputs=[str(d)], out_dir=tmp_path / "out"))
    bad = {(Path(b.input).name, b.kind): (b.count, b.first_line) for b in res.manifest.bad_inputs}
    assert bad[("a.jsonl.zst", "malformed_json")] == (1, 2)
    assert bad[("a.jsonl.zst", "missing_text")] == (1, 3)
    assert bad[("a.jsonl.zst", "non_string_text")] == (1, 4)
    assert bad[("a.jsonl.zst", "empty_text")] == (1, 5)
    assert bad[("a.jsonl.zst", "invalid_utf8")] == (1, 6)
    assert ("b.jsonl.zst", "truncated_compression") in bad and ("c.jsonl.gz", "corrupt_compression") in bad
    shards = {Path(s.input).name: s for s in res.manifest.shards}
    assert shards["a.jsonl.zst"].docs == 2 and 0 < shards["b.jsonl.zst"].docs < 3000
    assert "c.jsonl.gz" not in shards and "d.jsonl" not in shards  # nothing readable: no (empty) shard
    assert len(res.manifest.inputs_done) == 4
    leftovers = [p for p in (tmp_path / "out").rglob("*") if ".tmp-" in p.name]
    assert leftovers == []
    for s in res.manifest.shards:
        BinIdxReader(tmp_path / "out" / s.prefix)  # every listed shard is complete and valid


def test_bad_arguments(tmp_path: Path, make_corpus) -> None:
    make_corpus(tmp_path / "c", n_files=1, docs_per_file=3)
    with pytest.raises(DataError, match="no input files matched"):
        prepare(PrepareOptions(inputs=[str(tmp_path / "nothing*.zst")], out_dir=tmp_path / "o"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "precious.txt").write_text("x")
    with pytest.raises(DataError, match="not an rwkvctl prepare output"):
        prepare(PrepareOptions(inputs=[str(tmp_path / "c")], out_dir=tmp_path / "busy"))
    prepare(PrepareOptions(inputs=[str(tmp_path / "c")], out_dir=tmp_path / "o"))
    with pytest.raises(DataError, match=r"--seed 1 differs from 0 used for .*o \(.*options\.json\); use a new --out"):
        prepare(PrepareOptions(inputs=[str(tmp_path / "c")], out_dir=tmp_path / "o", seed=1))
    with pytest.raises(DataError, match="node-rank"):
        prepare(PrepareOptions(inputs=[str(tmp_path / "c")], out_dir=tmp_path / "o", num_nodes=2, node_rank=2))
    with pytest.raises(DataError, match="val-fraction"):
        prepare(PrepareOptions(inputs=[str(tmp_path / "c")], out_dir=tmp_path / "o", val_fraction=1.5))
    for bad_ctx in (0, -3):  # not silently ignored
        with pytest.raises(DataError, match="ctx-len must be at least 1"):
            prepare(PrepareOptions(inputs=[str(tmp_path / "c")], out_dir=tmp_path / "o", ctx_len=bad_ctx))


@pytest.fixture
def no_native(monkeypatch: pytest.MonkeyPatch):
    """The C++ encoder 'failed to build': the World tokenizer falls back to pure Python."""
    from rwkvctl.data import tokenizer, tokenizer_native

    monkeypatch.setattr(tokenizer_native, "_lib", None)
    monkeypatch.setattr(tokenizer_native, "_reason", "no C++ compiler (g++) on PATH")
    tokenizer._world.cache_clear()
    yield
    tokenizer._world.cache_clear()


def test_encoder_backend_is_reported(tmp_path: Path, no_native, make_corpus) -> None:
    make_corpus(tmp_path / "c", n_files=1, docs_per_file=3)
    res = prepare(PrepareOptions(inputs=[str(tmp_path / "c")], out_dir=tmp_path / "o"))
    assert res.manifest.encoder["backend"] == "python"
    assert "no C++ compiler (g++) on PATH" in res.manifest.encoder["note"]
    saved = Manifest.load(tmp_path / "o")
    assert saved.encoder == res.manifest.encoder


def test_native_encoder_is_reported(tmp_path: Path, make_corpus) -> None:
    from rwkvctl.data.tokenizer import load_tokenizer

    make_corpus(tmp_path / "c", n_files=1, docs_per_file=3)
    res = prepare(PrepareOptions(inputs=[str(tmp_path / "c")], out_dir=tmp_path / "o"))
    tok = load_tokenizer("world")
    want = {"backend": tok.backend, "note": tok.backend_note}
    assert Manifest.load(tmp_path / "o").encoder == res.manifest.encoder == want


def test_sentencepiece_tokenizer(tmp_path: Path, make_corpus) -> None:
    from rwkvctl.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

    rows = make_corpus(tmp_path / "c", n_files=1, docs_per_file=40)
    stats = train_sentencepiece((r["text"] for r in rows), tmp_path / "tok.model", vocab_size=600)
    assert stats["docs"] == 40
    with pytest.raises(TokenizerError, match="tok.model: already exists; pass --force"):
        train_sentencepiece((r["text"] for r in rows), tmp_path / "tok.model", vocab_size=300)
    (tmp_path / "other.vocab").write_text("mine")
    with pytest.raises(TokenizerError, match="other.vocab: already exists"):  # the .vocab beside it counts too
        train_sentencepiece((r["text"] for r in rows), tmp_path / "other.model", vocab_size=300)
    assert not (tmp_path / "other.model").exists() and (tmp_path / "other.vocab").read_text() == "mine"
    tok = SentencePieceTokenizer(tmp_path / "tok.model")
    assert tok.eod_id == 0 and tok.vocab_size == 600
    for r in rows[:10]:
        assert tok.decode(tok.encode(r["text"])) == r["text"]  # identity normalisation + byte fallback
    res = prepare(
        PrepareOptions(inputs=[str(tmp_path / "c")], out_dir=tmp_path / "o", tokenizer=f"spm:{tmp_path / 'tok.model'}")
    )
    assert res.manifest.tokenizer["name"] == "sentencepiece" and res.manifest.dtype == "uint16"
    r = BinIdxReader(tmp_path / "o" / res.manifest.shards[0].prefix)
    assert r[0].tolist() == tok.encode(rows[0]["text"]) + [0]


def test_gz_and_plain_jsonl_inputs(tmp_path: Path) -> None:
    rows = [json.dumps({"text": f"doc {i}"}) for i in range(5)]
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress("\n".join(rows).encode(), mtime=0))
    (tmp_path / "b.jsonl").write_text("\n".join(rows) + "\n\n")
    res = prepare(PrepareOptions(inputs=[str(tmp_path / "*.jsonl*")], out_dir=tmp_path / "o"))
    assert res.manifest.docs() == 10 and set(res.manifest.source_totals()) == {"unknown"}


def test_roundtrip_failures_are_counted_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tokenizer whose decode loses text: every checked doc is reported, and every doc is still written."""
    from rwkvctl.data.tokenizer import load_tokenizer
    from rwkvctl.lifecycle import prepare as prepare_mod

    class Lossy:
        def __init__(self) -> None:
            self.inner = load_tokenizer("world")
            self.name, self.vocab_size, self.eod_id = "world", self.inner.vocab_size, 0
            self.backend, self.backend_note = "test-lossy", ""

        def describe(self) -> dict:
            return self.inner.describe()

        def encode_batch(self, data, offsets, append_eod=True):
            return self.inner.encode_batch(data, offsets, append_eod)

        def decode(self, ids) -> str:
            return self.inner.decode(ids)[:-1]  # drops the last character

    monkeypatch.setattr(prepare_mod, "load_tokenizer", lambda spec: Lossy())
    rows = [json.dumps({"text": f"doc {i} text"}) for i in range(10)]
    (tmp_path / "a.jsonl").write_text("\n".join(rows))
    res = prepare(PrepareOptions(inputs=[str(tmp_path / "a.jsonl")], out_dir=tmp_path / "o", verify_every=3))
    bad = [b for b in res.manifest.bad_inputs if b.kind == "roundtrip_mismatch"]
    assert len(bad) == 1 and bad[0].count == 3 and bad[0].first_line == 3  # docs 3, 6, 9 were checked
    assert res.manifest.docs() == 10
