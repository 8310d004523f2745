"""The generated sample corpus has SlimPajama's layout and fields, several sources, and is deterministic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import zstandard

from rwkvctl.data.sample_corpus import write_sample_corpus


@pytest.mark.slow
def test_layout_fields_and_determinism(tmp_path: Path) -> None:
    a = write_sample_corpus(tmp_path / "a", seed=0)
    rel = [p.relative_to(tmp_path / "a").as_posix() for p in a]
    assert rel == [
        "train/chunk1/example_train_0.jsonl.zst",
        "train/chunk1/example_train_1.jsonl.zst",
        "train/chunk1/example_train_2.jsonl.zst",
        "train/chunk1/example_train_3.jsonl.zst",
        "validation/chunk1/example_holdout_0.jsonl.zst",
    ]
    sources, text_bytes = set(), 0
    for p in a:
        for line in zstandard.ZstdDecompressor().decompress(p.read_bytes()).decode().splitlines():
            row = json.loads(line)
            assert set(row) == {"text", "meta"} and isinstance(row["text"], str) and row["text"]
            assert set(row["meta"]) == {"redpajama_set_name"}
            sources.add(row["meta"]["redpajama_set_name"])
            text_bytes += len(row["text"].encode())
    assert len(sources) >= 4 and all(s.startswith("RedPajama") for s in sources)
    assert 2_000_000 < text_bytes < 8_000_000
    assert sum(p.stat().st_size for p in a) < 4_000_000
    b = write_sample_corpus(tmp_path / "b", seed=0)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
