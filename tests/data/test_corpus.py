"""Streaming readers: every kind of bad record is reported with its line, never raised."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import zstandard

from rwkvctl.data.corpus import Doc, DocumentStream, Problem, expand_inputs
from rwkvctl.errors import DataError


def _rows(n: int = 5) -> list[bytes]:
    return [
        json.dumps({"text": f"document {i} " * 20, "meta": {"redpajama_set_name": "RedPajamaC4"}}).encode()
        for i in range(n)
    ]


def _zst(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(lines) + b"\n"))
    return path


def _read(path: Path, **kw) -> tuple[list[Doc], list[Problem]]:
    items = list(DocumentStream(str(path), **kw))
    return [i for i in items if isinstance(i, Doc)], [i for i in items if isinstance(i, Problem)]


def test_clean_zst_multi_frame_and_sources(tmp_path: Path) -> None:
    c = zstandard.ZstdCompressor()
    # Two concatenated zstd frames (as produced by appending), both must be read.
    (tmp_path / "a.jsonl.zst").write_bytes(c.compress(b"\n".join(_rows(3)) + b"\n") + c.compress(_rows(2)[1]))
    docs, problems = _read(tmp_path / "a.jsonl.zst")
    assert problems == [] and [d.line for d in docs] == [1, 2, 3, 4]
    assert {d.source for d in docs} == {"RedPajamaC4"} and docs[0].data.startswith(b"document 0")


@pytest.mark.parametrize(
    "line, kind",
    [
        (b'{"text": "unterminated', "malformed_json"),
        (b"[1, 2, 3]", "malformed_json"),
        (b'{"content": "no text key"}', "missing_text"),
        (b'{"text": 42}', "non_string_text"),
        (b'{"text": null}', "non_string_text"),
        (b'{"text": ""}', "empty_text"),
        (b'{"text": "bad \xff\xfe bytes"}', "invalid_utf8"),
        (b'{"text": "lone \\ud800 surrogate"}', "invalid_utf8"),
    ],
)
def test_bad_records_counted_with_line(tmp_path: Path, line: bytes, kind: str) -> None:
    rows = _rows(4)
    rows[2] = line
    rows.append(line)
    for name, write in (
        ("x.jsonl.zst", lambda p, b: p.write_bytes(zstandard.ZstdCompressor().compress(b))),
        ("x.jsonl.gz", lambda p, b: p.write_bytes(gzip.compress(b, mtime=0))),
        ("x.jsonl", lambda p, b: p.write_bytes(b)),
    ):
        write(tmp_path / name, b"\n".join(rows) + b"\n")
        docs, problems = _read(tmp_path / name)
        assert [d.line for d in docs] == [1, 2, 4], name
        assert [(p.line, p.kind) for p in problems] == [(3, kind), (5, kind)], name


def test_truncated_and_corrupt_zstd(tmp_path: Path) -> None:
    blob = zstandard.ZstdCompressor().compress(b"\n".join(_rows(2000)) + b"\n")
    (tmp_path / "t.jsonl.zst").write_bytes(blob[: len(blob) // 2])
    docs, problems = _read(tmp_path / "t.jsonl.zst")
    assert 0 < len(docs) < 2000
    assert problems[-1].kind == "truncated_compression"
    assert all(p.kind in ("truncated_compression", "malformed_json") for p in problems)

    damaged = bytearray(blob)
    damaged[len(blob) // 3 : len(blob) // 3 + 64] = b"\x00" * 64
    (tmp_path / "c.jsonl.zst").write_bytes(bytes(damaged))
    docs, problems = _read(tmp_path / "c.jsonl.zst")
    assert len(docs) < 2000 and problems and problems[-1].kind in ("corrupt_compression", "malformed_json")
    kinds = {p.kind for p in problems}
    assert kinds & {"corrupt_compression", "truncated_compression"}

    (tmp_path / "g.jsonl.zst").write_bytes(b"this is not zstd at all")
    docs, problems = _read(tmp_path / "g.jsonl.zst")
    assert docs == [] and [(p.line, p.kind) for p in problems] == [(1, "corrupt_compression")]


def test_truncated_gzip(tmp_path: Path) -> None:
    blob = gzip.compress(b"\n".join(_rows(2000)) + b"\n", mtime=0)
    (tmp_path / "t.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    docs, problems = _read(tmp_path / "t.jsonl.gz")
    assert 0 < len(docs) < 2000 and problems[-1].kind == "truncated_compression"


def test_meta_as_json_string_and_custom_keys(tmp_path: Path) -> None:
    rows = [
        json.dumps({"text": "a", "meta": json.dumps({"redpajama_set_name": "RedPajamaBook"})}).encode(),
        json.dumps({"text": "b", "meta": {}}).encode(),
        json.dumps({"body": "c", "src": "web"}).encode(),
    ]
    docs, _ = _read(_zst(tmp_path / "m.jsonl.zst", rows))
    assert [d.source for d in docs] == ["RedPajamaBook", "unknown"]
    docs, problems = _read(tmp_path / "m.jsonl.zst", text_key="body", source_key="src")
    assert [(d.data, d.source) for d in docs] == [(b"c", "web")] and len(problems) == 2


def test_parquet_and_dataset_dir(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = {
        "text": ["one", "two", ""],
        "meta": [json.dumps({"redpajama_set_name": "RedPajamaArXiv"})] * 3,  # meta as a JSON string column
    }
    ds = datasets.Dataset.from_dict(rows)
    ds.to_parquet(str(tmp_path / "p.parquet"))
    docs, problems = _read(tmp_path / "p.parquet")
    assert [(d.data, d.source) for d in docs] == [(b"one", "RedPajamaArXiv"), (b"two", "RedPajamaArXiv")]
    assert [(p.line, p.kind) for p in problems] == [(3, "empty_text")]
    ds.save_to_disk(str(tmp_path / "saved"))
    assert expand_inputs([str(tmp_path / "saved")]) == [str(tmp_path / "saved")]
    docs, _ = _read(tmp_path / "saved")
    assert [d.data for d in docs] == [b"one", b"two"]


def test_expand_inputs(tmp_path: Path) -> None:
    for rel in ("train/chunk1/a.jsonl.zst", "train/chunk2/b.jsonl.zst", "train/notes.txt", "v/c.jsonl.gz"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    t = str(tmp_path)
    assert expand_inputs([f"{t}/train"]) == [f"{t}/train/chunk1/a.jsonl.zst", f"{t}/train/chunk2/b.jsonl.zst"]
    assert expand_inputs([f"{t}/**/*.jsonl.*", f"{t}/v/c.jsonl.gz"]) == [
        f"{t}/train/chunk1/a.jsonl.zst",
        f"{t}/train/chunk2/b.jsonl.zst",
        f"{t}/v/c.jsonl.gz",
    ]
    assert expand_inputs([f"{t}/nothing*"]) == []


def test_expand_inputs_globbed_dirs_and_duplicates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for rel in ("train/chunk1/a.jsonl.zst", "train/chunk2/b.jsonl.zst", "train/chunk2/notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    t = str(tmp_path)
    want = [f"{t}/train/chunk1/a.jsonl.zst", f"{t}/train/chunk2/b.jsonl.zst"]
    assert expand_inputs([f"{t}/train/chunk*"]) == want  # a glob matching directories searches them
    monkeypatch.chdir(tmp_path)
    # The same files named relatively, absolutely, via a directory and via ./..: each once, absolute.
    assert expand_inputs(["train/chunk1/a.jsonl.zst", f"{t}/train", "./train/../train/chunk2/b.jsonl.zst"]) == want
    blob = tmp_path / "blobs" / "0f3a9c"  # a hub cache: suffix-less blob, linked under its real name
    blob.parent.mkdir()
    blob.write_bytes(b"")
    (tmp_path / "snap").mkdir()
    (tmp_path / "snap" / "c.jsonl.zst").symlink_to(blob)
    assert expand_inputs(["snap"]) == [f"{t}/snap/c.jsonl.zst"]  # the name (and its suffix) is kept


def test_plan_units_one_unit_per_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rwkvctl.errors import DataError
    from rwkvctl.lifecycle.prepare import PrepareOptions, plan_units

    _zst(tmp_path / "a.jsonl.zst", _rows(2))
    monkeypatch.chdir(tmp_path)
    units = plan_units(PrepareOptions(inputs=["a.jsonl.zst", str(tmp_path / "a.jsonl.zst")], out_dir=tmp_path / "o"))
    assert [u.input for u in units] == [str(tmp_path / "a.jsonl.zst")]
    with pytest.raises(DataError, match="both as training and validation"):
        plan_units(PrepareOptions(inputs=["a.jsonl.zst"], val_inputs=[str(tmp_path / "a.jsonl.zst")], out_dir="o"))


def test_recursion_error_is_a_bad_record(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nesting deep enough to exhaust the parser's recursion is reported like any malformed line."""
    from rwkvctl.data import corpus

    def too_deep(_: object) -> None:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(corpus, "_fast_loads", too_deep)
    monkeypatch.setattr(corpus.json, "loads", too_deep)
    assert corpus.parse_line(b'{"text": [[[]]]}', 7, "text", "meta.x") == Problem(
        7, "malformed_json", "maximum recursion depth exceeded"
    )


def test_hub_ids_stream_through_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`hf:NAME[:SPLIT]` goes to `datasets.load_dataset(NAME, split=..., streaming=True)`. No hub is reachable
    here, so NAME is a local directory of JSONL files (which load_dataset accepts like a hub repo id)."""
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    rows = _rows(5)
    (repo / "data" / "train-00000.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    spec = f"hf:{repo}"
    assert expand_inputs([spec]) == [spec]
    docs = list(DocumentStream(spec))
    assert [d.data for d in docs] == [json.loads(r)["text"].encode() for r in rows]
    assert docs[0].source == json.loads(rows[0])["meta"]["redpajama_set_name"]
    from rwkvctl.errors import DataError

    with pytest.raises(DataError, match="cannot open with `datasets`"):
        list(DocumentStream(f"hf:{tmp_path / 'missing'}:train"))


def test_lines_much_longer_than_the_block_target(tmp_path: Path) -> None:
    """A document of many MB among small ones: blocks still end at line ends and every line arrives once."""
    from rwkvctl.data.corpus import Block

    long = json.dumps({"text": "x" * (3 << 20)}).encode()
    lines = _rows(3) + [long] + _rows(2)
    path = _zst(tmp_path / "long.jsonl.zst", lines)
    blocks = [b for b in DocumentStream(str(path)).iter_blocks(block_bytes=4096) if isinstance(b, Block)]
    text = b"".join(b.data[: b.end] for b in blocks)
    assert text == b"\n".join(lines) + b"\n"
    assert [b.first for b in blocks] == [sum(x.lines for x in blocks[:i]) for i in range(len(blocks))]
    assert all(b.data[: b.end].endswith(b"\n") for b in blocks)


def test_parquet_and_datasets_inputs_without_the_hf_extra_say_what_to_install(tmp_path: Path, monkeypatch) -> None:
    import importlib

    real = importlib.import_module

    def no_hf(name: str, *args, **kwargs):
        if name.split(".")[0] in ("datasets", "pyarrow"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", no_hf)
    (tmp_path / "p.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"p\.parquet: .*pip install 'rwkvctl\[hf\]'"):
        _read(tmp_path / "p.parquet")
