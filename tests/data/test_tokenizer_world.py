"""World tokenizer: ids identical to the rwkv package's reference TRIE_TOKENIZER, for both backends."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rwkv  # noqa: E402  (the pinned reference tokenizer: a broken install must fail, not skip)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rwkv.rwkv_tokenizer import TRIE_TOKENIZER  # noqa: E402

from rwkvctl.data import tokenizer_native
from rwkvctl.data.tokenizer import load_tokenizer
from rwkvctl.data.tokenizer_world import VOCAB_FILE, WorldTokenizer, parse_vocab
from rwkvctl.errors import TokenizerError

REF_VOCAB = Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt"

TEXTS = [
    "",
    "Hello world!",
    "The quick brown fox jumps over the lazy dog. " * 20,
    "中文测试：你好，世界。日本語のテキスト、한국어 텍스트. Русский текст. العربية. हिन्दी.",
    "emoji 🎉👍🏽👨‍👩‍👧‍👦 flags 🇺🇸🇯🇵 and ZWJ sequences",
    "def f(x):\n\treturn x ** 2  # comment\n\n\n    indented\r\n" + " " * 300,
    "control \x00\x01\x02\x1b[31m red \x7f \x85 \u2028 \ufeff bom",
    "-" * 200 + "=" * 90 + "\n" * 50,
    "mixed: 0123456789 3.14159 1e-10 0xDEADBEEF <html><body>&amp;</body></html>",
    "\U0010ffff\U0001f600 astral \U00020000 cjk ext-B",
]


@pytest.fixture(scope="module")
def ref() -> TRIE_TOKENIZER:
    return TRIE_TOKENIZER(str(REF_VOCAB))


@pytest.fixture(scope="module", params=["native", "python"])
def tok(request: pytest.FixtureRequest) -> WorldTokenizer:
    if request.param == "native" and tokenizer_native.load() is None:
        pytest.skip(f"native encoder unavailable: {tokenizer_native.unavailable_reason()}")
    return WorldTokenizer(backend=request.param)


def test_shipped_vocab_is_the_reference_vocab() -> None:
    assert VOCAB_FILE.read_bytes() == REF_VOCAB.read_bytes()


@pytest.mark.parametrize("text", TEXTS)
def test_ids_identical_to_reference(tok: WorldTokenizer, ref: TRIE_TOKENIZER, text: str) -> None:
    ids = tok.encode(text)
    assert ids == ref.encode(text)
    assert tok.decode(ids) == text == ref.decode(ids)


# Plain text, plus a mix that includes lone surrogates (category Cs), emoji/symbols and control characters.
TEXT = st.one_of(
    st.text(max_size=300),
    st.text(st.characters(categories=["Cs", "So", "Cc", "Lo", "Zs", "Nd", "Ll"]), max_size=100),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(TEXT)
def test_hypothesis_text(tok: WorldTokenizer, ref: TRIE_TOKENIZER, text: str) -> None:
    try:
        expected = ref.encode(text)
    except UnicodeEncodeError:  # lone surrogates: the reference cannot encode them at all
        expected = ref.encodeBytes(text.encode("utf-8", "surrogatepass"))
    ids = tok.encode(text)
    assert ids == expected
    assert tok.decode(ids) == text


def _encode_bytes(tok: WorldTokenizer, data: bytes) -> list[int]:
    """Raw bytes (not necessarily UTF-8) through the batch path prepare uses, without the end-of-doc id."""
    flat, _ = tok.encode_batch(data, np.array([0, len(data)], dtype=np.int64), append_eod=False)
    return flat.tolist()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_hypothesis_bytes(tok: WorldTokenizer, ref: TRIE_TOKENIZER, data: bytes) -> None:
    ids = _encode_bytes(tok, data)
    assert ids == ref.encodeBytes(data)
    assert tok.decode_bytes(ids) == data


def test_lone_surrogates_roundtrip(tok: WorldTokenizer, ref: TRIE_TOKENIZER) -> None:
    text = "a\ud800b\udfffc"
    with pytest.raises(UnicodeEncodeError):
        ref.encode(text)  # the reference refuses; we encode the surrogatepass bytes instead
    ids = tok.encode(text)
    assert ids == ref.encodeBytes(text.encode("utf-8", "surrogatepass"))
    assert tok.decode(ids) == text


def test_batch_matches_single_and_appends_eod(tok: WorldTokenizer, ref: TRIE_TOKENIZER) -> None:
    docs = [t.encode("utf-8") for t in TEXTS]
    offsets = np.cumsum([0] + [len(d) for d in docs])
    flat, counts = tok.encode_batch(b"".join(docs), offsets)
    pos = 0
    for d, c in zip(docs, counts, strict=True):
        assert flat[pos : pos + c].tolist() == ref.encodeBytes(d) + [0]
        pos += c
    assert pos == len(flat)


def test_decode_rules(tok: WorldTokenizer) -> None:
    assert tok.decode([0, 33155, 0]) == "Hello"  # end-of-doc decodes to nothing
    assert tok.decode([tok.encode("é")[0]]) == "é"
    assert tok.decode(_encode_bytes(tok, b"\xff\xfe")) == "\ufffd\ufffd"  # bad bytes -> U+FFFD each
    with pytest.raises(TokenizerError, match="70000"):
        tok.decode([70000])
    with pytest.raises(TokenizerError, match="-1"):
        tok.decode([-1])


@pytest.mark.parametrize("backend", ["native", "python"])
def test_decode_equals_the_vocab_table(backend: str) -> None:
    """Both decoders (C++, numpy) against the vocab file itself: every id, in random order, with end-of-document
    and unused ids (65530..65535), which decode to nothing."""
    if backend == "native" and tokenizer_native.load() is None:
        pytest.skip(f"native encoder unavailable: {tokenizer_native.unavailable_reason()}")
    tok = WorldTokenizer(backend=backend)
    vocab = parse_vocab(VOCAB_FILE)
    rng = np.random.default_rng(0)
    ids = rng.permutation(np.arange(65536))
    want = b"".join(vocab.get(int(i), b"") for i in ids)
    assert tok.decode_bytes(ids) == want
    assert tok.decode_bytes(ids.astype(np.int32)[:5]) == b"".join(vocab.get(int(i), b"") for i in ids[:5])
    assert tok.decode_bytes([]) == b"" and tok.decode_bytes([0, 65535]) == b""


def test_bad_vocab_is_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "v.txt"
    bad.write_text("1 '\\x00' 1\n2 __import__('os') 3\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"v.txt:2: malformed"):
        parse_vocab(bad)  # never eval()'d
    bad.write_text("1 'ab' 5\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"v.txt:1: malformed"):
        parse_vocab(bad)
    bad.write_text("1 'a' 1\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match="single-byte"):
        parse_vocab(bad)
    with pytest.raises(TokenizerError, match="unknown tokenizer"):
        load_tokenizer("gpt2")


def test_native_build_cache_and_opt_out(tmp_path: Path) -> None:
    """A fresh cache dir triggers a build there; RWKVCTL_TOKENIZER=python (old name: RWKVCTL_NO_NATIVE=1) selects
    the Python fallback."""
    if tokenizer_native.load() is None:
        pytest.skip(tokenizer_native.unavailable_reason())
    code = (
        "from rwkvctl.data.tokenizer_world import WorldTokenizer as W; t = W(); "
        "print(t.backend, t.encode('Hello world'))"
    )
    env = {**os.environ, "RWKVCTL_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == "native" and list((tmp_path / "tokenizer").glob("world_trie-*.so"))
    for var, value in (("RWKVCTL_TOKENIZER", "python"), ("RWKVCTL_NO_NATIVE", "1")):
        run = subprocess.run([sys.executable, "-c", code], env={**env, var: value}, capture_output=True, text=True)
        out2 = run.stdout
        assert out2.split()[0] == "python" and out2.split(None, 1)[1] == out.split(None, 1)[1]
        assert ("deprecated" in run.stderr) == (var == "RWKVCTL_NO_NATIVE")
    strict = subprocess.run(
        [sys.executable, "-c", code], env={**env, "RWKVCTL_TOKENIZER": "native", "CXX": "no-such-compiler-rwkvctl",
                                            "RWKVCTL_CACHE_DIR": str(tmp_path / "empty")},
        capture_output=True, text=True,
    )  # fmt: skip
    assert strict.returncode != 0 and "native World encoder unavailable: no C++ compiler" in strict.stderr


def test_vocab_cache_is_used_and_a_damaged_one_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rwkvctl.data import tokenizer_world

    monkeypatch.setenv("RWKVCTL_CACHE_DIR", str(tmp_path))
    want = parse_vocab()
    (cache,) = (tmp_path / "tokenizer").glob("vocab-*.npz")
    assert parse_vocab() == want  # from the cache now
    for damage in (b"", cache.read_bytes()[:1000], b"PK\x03\x04 not a zip"):
        cache.write_bytes(damage)
        assert parse_vocab() == want
        assert tokenizer_world._vocab_cache_path(tokenizer_world.VOCAB_FILE) == cache and cache.stat().st_size > 1000
