"""prepare's native block path writes exactly what the per-document Python path writes: the same shards, manifest
and bad-input counts, including documents only Python can read (spliced back in order), val splits and weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import zstandard

from rwkvctl.data.tokenizer_world import WorldTokenizer
from rwkvctl.lifecycle.prepare import PrepareOptions, prepare

ODD_BUT_DOCS = [  # documents only the Python reader can read
    b'{"text": "nan inside", "n": NaN, "meta": {"redpajama_set_name": "RedPajamaC4"}}',
    b'{"te\\u0078t": "escaped key", "meta": {"redpajama_set_name": "RedPajamaBook"}}',
    b'{"text": "json in a string", "meta": "{\\"redpajama_set_name\\": \\"RedPajamaArXiv\\"}"}',
]
PROBLEMS = [b"{broken", b'{"text": ""}', b'{"text": "\xff"}', b'{"text": "lone \\ud800"}', b'{"x": 1}']


@pytest.fixture
def corpus(tmp_path: Path, make_corpus) -> Path:
    if WorldTokenizer().backend != "native":
        pytest.skip("no C++ compiler: the native JSONL path is not used")
    root = tmp_path / "c"
    make_corpus(root, n_files=2, docs_per_file=60)
    # A third input mixing ordinary lines with odd ones, spread over several blocks.
    lines = []
    for i in range(90):
        lines.append(json.dumps({"text": f"doc {i} " * (i + 1), "meta": {"redpajama_set_name": f"S{i % 4}"}}).encode())
        if i % 7 == 3:
            lines.append(ODD_BUT_DOCS[i % len(ODD_BUT_DOCS)])
        if i % 11 == 5:
            lines.append(PROBLEMS[i % len(PROBLEMS)])
        if i % 13 == 0:
            lines.append(b"   ")
    path = root / "train" / "chunk2" / "mixed.jsonl.zst"
    path.parent.mkdir(parents=True)
    path.write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(lines)))  # no final newline
    return root


@pytest.mark.parametrize(
    "extra",
    [{}, {"val_fraction": 0.2, "source_weights": {"RedPajamaGithub": 2.0, "S1": 0.5}}, {"workers": 2}],
    ids=["plain", "val+weights", "2-workers"],
)
def test_native_path_writes_what_python_writes(corpus: Path, tmp_path: Path, extra: dict, tree_bytes) -> None:
    outs = {}
    for native in (True, False):
        out = tmp_path / f"out-{native}"
        res = prepare(
            PrepareOptions(inputs=[str(corpus)], out_dir=out, native_jsonl=native, batch_bytes=8 << 10, **extra)
        )
        outs[native] = (tree_bytes(out), res)
    assert outs[True][0] == outs[False][0]
    bad = {b.kind: b.count for b in outs[True][1].manifest.bad_inputs}
    assert bad == {"empty_text": 2, "invalid_utf8": 3, "malformed_json": 2, "missing_text": 1}
    if "source_weights" not in extra:
        assert outs[True][1].manifest.docs() == 2 * 60 + 90 + 13


def test_encoder_thread_on_and_off_agree(corpus: Path, tmp_path: Path, tree_bytes) -> None:
    trees = []
    for thread in (True, False):
        out = tmp_path / f"t-{thread}"
        prepare(PrepareOptions(inputs=[str(corpus)], out_dir=out, encode_thread=thread, batch_bytes=4 << 10))
        trees.append(tree_bytes(out))
    assert trees[0] == trees[1]


def test_roundtrip_check_on_the_block_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """decode(encode(x)) == x is sampled on the native path too (documents 3, 6, 9 here), with the right lines."""
    from rwkvctl.lifecycle import prepare as prepare_mod

    class Lossy(WorldTokenizer):
        def decode_bytes(self, ids) -> bytes:  # drops the last byte of whatever it decodes
            return super().decode_bytes(ids)[:-1]

    tok = Lossy()
    if tok.backend != "native":
        pytest.skip("no C++ compiler: the native JSONL path is not used")
    monkeypatch.setattr(prepare_mod, "load_tokenizer", lambda spec: tok)
    rows = [json.dumps({"text": f"doc {i} text"}) for i in range(10)]
    rows.insert(1, "")  # a blank line: documents and line numbers part ways
    (tmp_path / "a.jsonl").write_text("\n".join(rows))
    res = prepare(PrepareOptions(inputs=[str(tmp_path / "a.jsonl")], out_dir=tmp_path / "o", verify_every=3))
    bad = [b for b in res.manifest.bad_inputs if b.kind == "roundtrip_mismatch"]
    assert len(bad) == 1 and bad[0].count == 3 and bad[0].first_line == 4  # document 3 is on line 4
    assert res.manifest.docs() == 10
