"""binidx writer/reader, checked against an independent parser of the documented MMIDIDX layout."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from rwkvctl.data.binidx import BinIdxReader, BinIdxWriter, dtype_for_vocab, is_prime, magic_prime
from rwkvctl.errors import DataError


def parse_idx_independently(path: Path) -> dict:
    """Parse `.idx` straight from the byte layout in the reference doc (no project code)."""
    raw = path.read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", raw[9:34])
    off = 34
    sizes = list(struct.unpack(f"<{n_seq}i", raw[off : off + 4 * n_seq]))
    off += 4 * n_seq
    pointers = list(struct.unpack(f"<{n_seq}q", raw[off : off + 8 * n_seq]))
    off += 8 * n_seq
    doc_idx = list(struct.unpack(f"<{n_doc}q", raw[off : off + 8 * n_doc]))
    off += 8 * n_doc
    assert off == len(raw)
    return {"version": version, "code": code, "sizes": sizes, "pointers": pointers, "doc_idx": doc_idx}


def test_roundtrip_and_independent_layout(tmp_path: Path) -> None:
    docs = [np.array([5, 6, 7, 0]), np.array([0]), np.array([65529, 1, 0]), np.array([], dtype=np.int64)]
    with BinIdxWriter(tmp_path / "d", np.uint16) as w:
        for d in docs:
            w.add_document(d)
    parsed = parse_idx_independently(tmp_path / "d.idx")
    assert parsed["version"] == 1 and parsed["code"] == 8
    assert parsed["sizes"] == [4, 1, 3, 0]
    assert parsed["pointers"] == [0, 8, 10, 16]  # byte offsets, 2 bytes per uint16 token
    assert parsed["doc_idx"] == [0, 1, 2, 3, 4]
    raw = np.frombuffer((tmp_path / "d.bin").read_bytes(), dtype="<u2")
    assert raw.tolist() == [5, 6, 7, 0, 0, 65529, 1, 0]

    r = BinIdxReader(tmp_path / "d.bin")  # .bin/.idx/bare prefix all accepted
    assert r.dtype == np.uint16 and len(r) == 4 and r.num_tokens == 8 and r.num_docs == 4
    assert [r[i].tolist() for i in range(4)] == [d.tolist() for d in docs]
    assert r[-2].tolist() == [65529, 1, 0]
    assert r.tokens().tolist() == raw.tolist()
    assert r.doc_idx.tolist() == [0, 1, 2, 3, 4]


def test_int32_for_big_vocab(tmp_path: Path) -> None:
    assert dtype_for_vocab(65536) == np.uint16 and dtype_for_vocab(65537) == np.int32
    with BinIdxWriter(tmp_path / "b", dtype_for_vocab(100_000)) as w:
        w.add_document(np.array([99_999, 0]))
    assert parse_idx_independently(tmp_path / "b.idx")["code"] == 4
    assert BinIdxReader(tmp_path / "b")[0].tolist() == [99_999, 0]


def test_exception_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), BinIdxWriter(tmp_path / "x") as w:
        w.add_document(np.array([1, 2]))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DataError, match="out of range"), BinIdxWriter(tmp_path / "y") as w:
        w.add_document(np.array([70_000]))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "damage, msg",
    [
        (lambda p: p.with_suffix(".idx").write_bytes(b"NOTMAGIC!" + bytes(40)), "bad magic"),
        (lambda p: p.with_suffix(".idx").write_bytes(p.with_suffix(".idx").read_bytes()[:-3]), "truncated"),
        (lambda p: p.with_suffix(".bin").write_bytes(p.with_suffix(".bin").read_bytes()[:-4]), "truncated"),
        (lambda p: p.with_suffix(".bin").unlink(), "no such file"),
        (lambda p: p.with_suffix(".idx").write_bytes(b"short"), "shorter"),
    ],
)
def test_reader_rejects_damage_with_one_line(tmp_path: Path, damage, msg: str) -> None:
    with BinIdxWriter(tmp_path / "d") as w:
        w.add_document(np.arange(10))
        w.add_document(np.arange(3))
    damage(tmp_path / "d.bin")
    with pytest.raises(DataError, match=msg) as e:
        BinIdxReader(tmp_path / "d")
    assert "\n" not in str(e.value) and "d." in str(e.value)


def _magic_prime_bruteforce(data_size: int, ctx_len: int) -> int:
    # Literal transcription of make_data.py's search (trial division), to check our fast version.
    n_chunk = data_size // ctx_len - 1
    for i in range(n_chunk, 0, -1):
        if i % 3 == 2 and i > 1 and all(i % d for d in range(2, int(i**0.5) + 1)):
            return i
    raise AssertionError


def test_magic_prime() -> None:
    assert magic_prime(1_498_226_207, 512) == 2926181  # minipile, from the spec
    assert magic_prime(1_498_226_207, 4096) == 365759
    for size, ctx in [(10_000, 7), (123_457, 64), (1_000_000, 512), (5_000_000, 1024)]:
        assert magic_prime(size, ctx) == _magic_prime_bruteforce(size, ctx)
    assert all(is_prime(p) == all(p % d for d in range(2, int(p**0.5) + 1)) for p in range(2, 3000))
    with pytest.raises(DataError, match="too few"):
        magic_prime(100, 50)


def test_write_index_parts_match_one_array(tmp_path: Path) -> None:
    from rwkvctl.data.binidx import write_index

    sizes = np.array([3, 0, 5, 2], dtype=np.int32)
    doc_idx = np.arange(5, dtype=np.int64)
    write_index(tmp_path / "one.idx", np.uint16, sizes, doc_idx)
    write_index(tmp_path / "parts.idx", np.uint16, [sizes[:1], sizes[1:]], iter([doc_idx[:2], doc_idx[2:]]))
    assert (tmp_path / "one.idx").read_bytes() == (tmp_path / "parts.idx").read_bytes()
    with pytest.raises(DataError, match="3 pointers for 4 sequences"):
        write_index(tmp_path / "bad.idx", np.uint16, sizes, doc_idx, pointers=np.zeros(3, np.int64))


def test_merge_keeps_pointers_past_unindexed_tail(tmp_path: Path) -> None:
    """A part whose .bin ends in tokens no sequence covers: the next part's pointers move past them."""
    from rwkvctl.data.merge import merge_binidx

    with BinIdxWriter(tmp_path / "a") as w:
        w.add_document(np.array([1, 2, 3], np.uint16))
    with open(tmp_path / "a.bin", "ab") as f:
        f.write(np.array([9, 9], np.uint16).tobytes())
    with BinIdxWriter(tmp_path / "b") as w:
        w.add_document(np.array([4, 5], np.uint16))
        w.add_document(np.array([6], np.uint16))
    info = merge_binidx([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    r = BinIdxReader(tmp_path / "m")
    assert [r[i].tolist() for i in range(len(r))] == [[1, 2, 3], [4, 5], [6]]
    assert r.doc_idx.tolist() == [0, 1, 2, 3] and info["docs"] == 3 and info["tokens"] == 8


def _patch(path: Path, offset: int, fmt: str, value: int) -> None:
    import struct

    buf = bytearray(path.read_bytes())
    struct.pack_into(fmt, buf, offset, value)
    path.write_bytes(bytes(buf))


@pytest.mark.parametrize("where, fmt, value, msg", [
    (34 + 0, "<i", -5, "sequence 0 .* lies outside"),  # a negative size
    (34 + 4 * 3 + 8, "<q", 10**12, "sequence 1 .* lies outside"),  # a pointer past the .bin
    (34 + 4 * 3 + 8, "<q", 2, "sequence 1 .* overlaps"),  # a pointer back into sequence 0
    (34 + 12 * 3 + 8, "<q", 9, "doc_idx must rise from 0 to at most the 3 sequences"),
])
def test_sizes_pointers_and_doc_idx_are_checked(tmp_path: Path, where: int, fmt: str, value: int, msg: str) -> None:
    with BinIdxWriter(tmp_path / "d") as w:
        for n in (4, 3, 2):
            w.add_document(np.arange(1, n + 1, dtype=np.uint16))
    _patch(tmp_path / "d.idx", where, fmt, value)
    with pytest.raises(DataError, match=msg) as e:
        BinIdxReader(tmp_path / "d")
    assert "d.idx" in str(e.value) and "\n" not in str(e.value)
