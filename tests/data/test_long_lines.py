"""prepare reads JSONL in bounded memory: a line over the limit is one bad document (line_too_long), never read
whole; the lines around it are read as usual, with their own line numbers."""

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from rwkvctl.data.corpus import Doc, DocumentStream, Problem


def _lines(n_long: int) -> bytes:
    docs = [{"text": "first"}, {"text": "x" * n_long}, {"text": "third"}]
    return b"".join(json.dumps(d).encode() + b"\n" for d in docs)


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.zst", ".jsonl.gz"])
def test_a_line_over_the_limit_is_one_bad_document(tmp_path: Path, suffix: str) -> None:
    import gzip

    import zstandard

    raw = _lines(5000)
    data = {".jsonl": raw, ".jsonl.zst": zstandard.ZstdCompressor().compress(raw), ".jsonl.gz": gzip.compress(raw)}
    path = tmp_path / f"in{suffix}"
    path.write_bytes(data[suffix])
    items = list(DocumentStream(str(path), max_line_bytes=1000))
    assert [type(i) for i in items] == [Doc, Problem, Doc]
    assert items[1].line == 2 and items[1].kind == "line_too_long" and "5013 bytes" in items[1].detail
    assert (items[0].line, items[2].line, items[2].data) == (1, 3, b"third")
    # the block path (the C++ scanner's input) drops the line too and keeps the numbering
    blocks = list(DocumentStream(str(path), max_line_bytes=1000).iter_blocks(block_bytes=64))
    assert [b.kind for b in blocks if isinstance(b, Problem)] == ["line_too_long"]
    assert sum(b.lines for b in blocks if not isinstance(b, Problem)) == 2
    # under the limit nothing changes
    assert [type(i) for i in DocumentStream(str(path))] == [Doc, Doc, Doc]


CAP = 3 << 30


def _capped() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (CAP, CAP))


def test_prepare_skips_a_two_gib_line_from_a_small_zst_in_bounded_memory(tmp_path: Path) -> None:
    """A ~200 KB .zst whose second line decompresses to 2 GiB: prepare counts it as a bad document and writes the
    others, under an address-space cap it would blow through if the line were read whole."""
    import zstandard

    src = tmp_path / "in" / "part.jsonl.zst"
    src.parent.mkdir()
    with open(src, "wb") as f, zstandard.ZstdCompressor(level=1).stream_writer(f) as w:
        w.write(b'{"text": "before the long line"}\n{"text": "')
        block = b"a" * (1 << 24)
        for _ in range(128):  # 2 GiB
            w.write(block)
        w.write(b'"}\n{"text": "after the long line"}\n')
    assert src.stat().st_size < 1 << 20
    res = subprocess.run([sys.executable, "-m", "rwkvctl", "prepare", str(src.parent), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=600, preexec_fn=_capped)
    assert res.returncode == 0, res.stdout + res.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["totals"]["train"]["docs"] == 2
    [bad] = manifest["bad_inputs"]
    assert (bad["kind"], bad["count"], bad["first_line"]) == ("line_too_long", 1, 2)
