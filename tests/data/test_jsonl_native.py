"""The native JSONL fast path (csrc/tokenizer/jsonl_fields.h via WorldTokenizer.encode_jsonl) against the Python
reader: a line the native parser accepts must give exactly the document Python gives (text bytes and source);
every other line is handed back to Python. Ordinary SlimPajama lines must take the fast path."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rwkvctl.data.corpus import Doc, parse_line
from rwkvctl.data.tokenizer_world import MAX_BLOCK_SOURCES, WorldTokenizer

KEY, SOURCE = "text", "meta.redpajama_set_name"


@pytest.fixture(scope="module")
def tok() -> WorldTokenizer:
    t = WorldTokenizer()
    if t.backend != "native":
        pytest.skip("no C++ compiler: the native JSONL path is not used")
    return t


def run_native(tok: WorldTokenizer, lines: list[bytes], text_key: str = KEY, source_key: str = SOURCE) -> dict:
    """line index -> ("doc", data, source) | "fallback" | "blank", checking the ids of every document."""
    block = b"".join(line + b"\n" for line in lines)
    res = tok.encode_jsonl(block, text_key, source_key)
    assert res is not None
    out: dict[int, object] = {i: "blank" for i in range(len(lines))}
    for i in res.fallback_lines.tolist():
        out[i] = "fallback"
    ends, t_end = np.cumsum(res.doc_count), res.doc_text_end
    for k, line in enumerate(res.doc_line.tolist()):
        data = res.text[(t_end[k - 1] if k else 0) : t_end[k]].tobytes()
        src = res.sources[res.doc_source[k]] if res.doc_source[k] >= 0 else "unknown"
        ids = res.ids[ends[k] - res.doc_count[k] : ends[k]]
        assert ids[-1] == 0 and ids[:-1].tolist() == tok.encode(data.decode("utf-8"))
        out[line] = ("doc", data, src)
    return out


def assert_agrees(tok: WorldTokenizer, lines: list[bytes], **keys: str) -> dict:
    got = run_native(tok, lines, **keys)
    text_key, source_key = keys.get("text_key", KEY), keys.get("source_key", SOURCE)
    for i, line in enumerate(lines):
        py = parse_line(line, i + 1, text_key, source_key)
        if got[i] == "blank":
            assert py is None, line
        elif got[i] != "fallback":
            assert isinstance(py, Doc), (line, py)
            assert got[i] == ("doc", py.data, py.source), line
    return got


def row(text: object, source: object = "RedPajamaC4", **extra: object) -> bytes:
    return json.dumps({"text": text, "meta": {"redpajama_set_name": source}, **extra}).encode()


ORDINARY = [
    row("plain words"),
    row('quotes " and \\ backslashes / slash \n\t\r\b\f controls'),
    row("naïve café 中文 日本語 🎉 Ωμέγα"),  # ensure_ascii: \u escapes incl. a surrogate pair
    json.dumps({"text": "naïve 中文 🎉", "meta": {"redpajama_set_name": "RedPajamaBook"}}, ensure_ascii=False).encode(),
    row("\x00 NUL and \x1f unit separator"),
    row("x" * 5000),  # long: many 16-byte chunks
    row("é" * 3 + "a" * 17 + "\\" * 9),  # specials straddling chunk edges
    b'  {"text" : "spaces" , "meta" : { "redpajama_set_name" : "RedPajamaGithub" } }  \r',
    b'{"meta": {"redpajama_set_name": "S", "x": [1, -2.5e+3, true, false, null, {"a": []}]}, "text": "key order"}',
    b'{"text": "no meta"}',
    b'{"text": "meta not object", "meta": 5}',
    b'{"text": "label not string", "meta": {"redpajama_set_name": 7}}',
    b'{"text": "empty label", "meta": {"redpajama_set_name": ""}}',
    b'{"text": "dup meta", "meta": {"redpajama_set_name": "A"}, "meta": {"other": 1}}',
    b'{"text": "dup label", "meta": {"redpajama_set_name": "A", "redpajama_set_name": "B"}}',
    b'{"text": "escaped keys elsewhere", "x": {"k\\u0041y": "v\\ud800"}, "meta": {"redpajama_set_name": "S"}}',
    b'{"text": "\\u00e9\\u4e2d\\ud83c\\udf89"}',
]

ODD = [  # Python decides these: Problems, or documents that only the Python reader can read
    b"{broken",
    b'{"x": 1}',
    b'{"text": 5}',
    b'{"text": ""}',
    b'{"text": "\xff"}',
    b'{"text": "overlong \xc0\xaf"}',
    b'{"text": "surrogate in utf-8 \xed\xa0\x80"}',
    b'{"text": "lone \\ud800 surrogate"}',
    b'{"text": "lone low \\udc00"}',
    b'{"text": "lone low \\udfff at the top of the range"}',
    b'{"text": "high then not low \\udbff\\u0041"}',
    b'{"text": "high at the end \\udbff"}',
    b'{"text": "raw \t tab"}',
    b'{"text": "bad escape \\x"}',
    b'{"text": "short \\u12"}',
    b'{"text": "trailing"} x',
    b'{"text": "trailing comma",}',
    b'["text", "array"]',
    b'"just a string"',
    b'{"text": "nan", "n": NaN}',
    b'{"text": "big", "n": 123456789012345678901234567890}',
    b'{"text": "a", "text": "b"}',
    b'{"te\\u0078t": "escaped key"}',
    b'{"text": "meta is JSON text", "meta": "{\\"redpajama_set_name\\": \\"S\\"}"}',
    b'{"text": "escaped label", "meta": {"redpajama_set_name": "S\\u0031"}}',
    b'{"text": "deep", "x": ' + b"[" * 300 + b"]" * 300 + b"}",
    b'{"text": "unterminated}',
    b'{"text": "leading zero", "n": 01}',
    b'\x0b{"text": "vertical tab before"}',
]


def test_ordinary_lines_take_the_fast_path(tok: WorldTokenizer) -> None:
    got = assert_agrees(tok, ORDINARY)
    assert all(v != "fallback" for v in got.values()), [ORDINARY[i] for i, v in got.items() if v == "fallback"]


def test_odd_lines_agree_with_python(tok: WorldTokenizer) -> None:
    lines = ODD + [b"", b"   ", b"\t\r"] + ORDINARY
    got = assert_agrees(tok, lines)
    assert got[len(ODD)] == got[len(ODD) + 1] == got[len(ODD) + 2] == "blank"
    for i in range(len(ODD)):
        assert got[i] == "fallback" or parse_line(ODD[i], 1, KEY, SOURCE) is not None


def test_huge_integers_are_pythons_to_judge(tok: WorldTokenizer) -> None:
    lines = [b'{"text": "big", "n": ' + b"7" * 5000 + b"}", b'{"text": "fine", "n": ' + b"7" * 200 + b"}"]
    got = assert_agrees(tok, lines)
    assert got[0] == "fallback" and got[1] == ("doc", b"fine", "unknown")


def test_source_keys_split_like_python(tok: WorldTokenizer) -> None:
    lines = [b'{"text": "a", "meta": "X"}', b'{"text": "b", "": "Y"}', b'{"text": "c", "meta": {"": "Z"}}']
    for key in ("meta.", "", ".", "meta..x"):
        assert_agrees(tok, lines, source_key=key)
    assert run_native(tok, lines, source_key="")[1] == ("doc", b"b", "Y")
    assert run_native(tok, lines, source_key="meta.")[2] == ("doc", b"c", "Z")


def test_other_keys(tok: WorldTokenizer) -> None:
    lines = [b'{"content": "c", "src": "a"}', b'{"content": "d", "a": {"b": {"c": "deep"}}}', b'{"text": "x"}']
    assert_agrees(tok, lines, text_key="content", source_key="src")
    got = assert_agrees(tok, lines, text_key="content", source_key="a.b.c")
    assert got[1] == ("doc", b"d", "deep")


def test_more_sources_than_the_block_table(tok: WorldTokenizer) -> None:
    lines = [row(f"doc {i}", f"source-{i}") for i in range(MAX_BLOCK_SOURCES + 20)]
    got = assert_agrees(tok, lines)
    assert sum(v == "fallback" for v in got.values()) == 20


def test_partial_last_line_and_end(tok: WorldTokenizer) -> None:
    block = row("one") + b"\n" + row("two") + b"\n" + row("three")
    res = tok.encode_jsonl(block, KEY, SOURCE)
    assert res is not None and len(res.doc_count) == 2  # no newline: not a line (the reader always adds one)
    res = tok.encode_jsonl(block, KEY, SOURCE, end=len(row("one")) + 1)
    assert res is not None and len(res.doc_count) == 1


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
texts = st.text(st.characters(codec="utf-8", categories=None), max_size=60) | st.text(
    st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=20
)  # the second includes lone surrogates


@st.composite
def lines(draw: st.DrawFn) -> bytes:
    obj = draw(st.dictionaries(st.sampled_from(["a", "meta", "x", "tëxt"]), json_values, max_size=3))
    if draw(st.booleans()):
        obj["text"] = draw(texts | json_values)
    if draw(st.booleans()):
        obj["meta"] = {
            "redpajama_set_name": draw(st.text(max_size=5) | json_values),
            **draw(st.dictionaries(st.text(max_size=3), json_values, max_size=2)),
        }
    items = list(obj.items())
    draw(st.randoms()).shuffle(items)
    body = (
        "{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v, ensure_ascii=draw(st.booleans()))}" for k, v in items) + "}"
    )
    raw = body.encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 3)) == 0 and raw:  # damage it: drop, change or insert a byte
        pos = draw(st.integers(0, len(raw) - 1))
        byte = bytes([draw(st.integers(0, 255))])
        raw = draw(
            st.sampled_from(
                [raw[:pos] + raw[pos + 1 :], raw[:pos] + byte + raw[pos + 1 :], raw[:pos] + byte + raw[pos:]]
            )
        )
    return raw.replace(b"\n", b" ")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(lines(), min_size=1, max_size=6))
def test_hypothesis_lines_agree_with_python(tok: WorldTokenizer, batch: list[bytes]) -> None:
    assert_agrees(tok, batch)


def test_random_real_lines_are_fast(tok: WorldTokenizer) -> None:
    rng = random.Random(0)
    alphabet = 'abc xyz\n\t"\\/é中🎉\x00\x7f'
    batch = [row("".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 200)))) for _ in range(300)]
    got = assert_agrees(tok, batch)
    assert "fallback" not in got.values()


@pytest.mark.slow
def test_scalar_build_agrees(tmp_path) -> None:
    """The same checks against a build without the SSE2 scan (the path ARM and other CPUs take)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "RWKVCTL_TOKENIZER_CXXFLAGS": "-DRWKVCTL_NO_SIMD", "RWKVCTL_CACHE_DIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "not scalar_build"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "passed" in proc.stdout and "skipped" not in proc.stdout


def _kept_sizes(tok: WorldTokenizer) -> list:
    return [None if entry is None else entry[:2] for entry in tok._trie._scratch.__dict__["sets"]]


def test_a_huge_block_does_not_pin_its_buffers(tok: WorldTokenizer) -> None:
    from rwkvctl.data.tokenizer_world import MAX_KEPT_SCRATCH

    small = row("small") + b"\n"
    tok.encode_jsonl(small, KEY, SOURCE)
    tok.encode_jsonl(small, KEY, SOURCE)
    kept = _kept_sizes(tok)
    assert all(k is not None for k in kept)
    huge = row("y" * (MAX_KEPT_SCRATCH + 10)) + b"\n"
    res = tok.encode_jsonl(huge, KEY, SOURCE)
    assert res is not None and len(res.doc_count) == 1 and int(res.doc_text_end[0]) == MAX_KEPT_SCRATCH + 10
    assert all(k is None or k[0] <= MAX_KEPT_SCRATCH for k in _kept_sizes(tok))


def test_reused_results_survive_the_next_call(tok: WorldTokenizer) -> None:
    """reuse=True hands out views of per-thread buffers: a block's results must stay intact while the next block
    is encoded (prepare writes block k while block k+1 encodes), and copies (the default) never change."""
    blocks = [b"".join(row(f"block {b} doc {d} " * (d + 1)) + b"\n" for d in range(5)) for b in range(4)]
    expected = [tok.encode_jsonl(b, KEY, SOURCE) for b in blocks]  # copies
    prev = None
    for block, want in zip(blocks, expected, strict=True):
        got = tok.encode_jsonl(block, KEY, SOURCE, reuse=True)
        if prev is not None:  # the previous result, after this call overwrote the other buffer set
            np.testing.assert_array_equal(prev[0].ids, prev[1].ids)
            np.testing.assert_array_equal(prev[0].text, prev[1].text)
            np.testing.assert_array_equal(prev[0].doc_count, prev[1].doc_count)
        prev = (got, want)
    for block, want in zip(blocks, expected, strict=True):  # the default copies were never touched
        again = tok.encode_jsonl(block, KEY, SOURCE)
        np.testing.assert_array_equal(again.ids, want.ids)
