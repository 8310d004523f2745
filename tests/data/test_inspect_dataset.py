"""describe_dataset / is_dataset_path: the data side of `rwkvctl inspect DATA`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rwkvctl.data.binidx import BinIdxWriter
from rwkvctl.data.inspect import describe_dataset, is_dataset_path
from rwkvctl.data.tokenizer import load_tokenizer
from rwkvctl.errors import DataError
from rwkvctl.lifecycle.prepare import PrepareOptions, prepare


def test_manifest_summary_and_decoded_window(tmp_path: Path) -> None:
    rows = [
        {"text": f"Document number {i}. ünïcödé 🎉", "meta": {"redpajama_set_name": "RedPajamaBook"}} for i in range(5)
    ]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    prepare(PrepareOptions(inputs=[str(tmp_path / "a.jsonl")], out_dir=tmp_path / "d", ctx_len=4))
    for p in (tmp_path / "d", tmp_path / "d" / "manifest.json"):
        assert is_dataset_path(p)
        info = describe_dataset(p, window=1000)
        assert info["kind"] == "manifest" and info["tokenizer"]["name"] == "world" and info["dtype"] == "uint16"
        assert info["splits"]["train"]["docs"] == 5 and info["splits"]["train"]["sources"]["RedPajamaBook"]["docs"] == 5
        assert info["sample"]["text"][:5] == [r["text"] for r in rows]  # split at end-of-doc ids, decoded
        assert info["rwkv_lm"]["ctx_len"] == 4


def test_bare_binidx_and_rejections(tmp_path: Path) -> None:
    tok = load_tokenizer("world")
    with BinIdxWriter(tmp_path / "x") as w:
        w.add_document(np.array(tok.encode("hello there") + [0]))
    for p in ("x", "x.bin", "x.idx"):
        assert is_dataset_path(tmp_path / p)
    info = describe_dataset(tmp_path / "x.idx")
    assert info["kind"] == "binidx" and info["sample"]["text"] == ["hello there", ""]
    (tmp_path / "model.pth.json").write_text("{}")
    assert not is_dataset_path(tmp_path / "model.pth.json") and not is_dataset_path(tmp_path / "nothing")
    with pytest.raises(DataError, match="not a dataset"):
        describe_dataset(tmp_path / "nothing")
