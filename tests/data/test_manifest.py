"""Manifest save/load and resolve_prefixes over manifests, directories and bare binidx prefixes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rwkvctl.data.binidx import BinIdxWriter
from rwkvctl.data.manifest import BadInput, Manifest, Shard, SourceCounts, resolve_prefixes
from rwkvctl.errors import DataError


def _manifest() -> Manifest:
    return Manifest(
        tokenizer={"name": "world", "vocab_size": 65536, "eod_id": 0},
        dtype="uint16",
        shards=[
            Shard("shards/a", "train", "train/a.jsonl.zst", 2, 10, {"RedPajamaC4": SourceCounts(2, 10, 40)}),
            Shard("shards/b", "train", "train/b.jsonl.zst", 1, 5, {"RedPajamaC4": SourceCounts(1, 5, 9)}),
            Shard("shards/v", "val", "validation/v.jsonl.zst", 1, 3, {"RedPajamaBook": SourceCounts(1, 3, 8)}),
        ],
        inputs_done=["train/a.jsonl.zst"],
        bad_inputs=[BadInput("train/a.jsonl.zst", "malformed_json", 2, 7)],
        options={"seed": 0},
    )


def test_save_load_roundtrip(tmp_path: Path) -> None:
    m = _manifest()
    path = m.save(tmp_path)
    assert path == tmp_path / "manifest.json"
    d = json.loads(path.read_text())
    assert d["totals"]["train"] == {
        "docs": 3,
        "tokens": 15,
        "sources": {"RedPajamaC4": {"docs": 3, "tokens": 15, "bytes": 49}},
    }
    back = Manifest.load(tmp_path)
    assert back == m
    assert back.tokens("val") == 3 and back.source_totals("train")["RedPajamaC4"] == SourceCounts(3, 15, 49)


def test_resolve_prefixes(tmp_path: Path) -> None:
    _manifest().save(tmp_path / "ds")
    assert resolve_prefixes(tmp_path / "ds") == [tmp_path / "ds/shards/a", tmp_path / "ds/shards/b"]
    assert resolve_prefixes(tmp_path / "ds/manifest.json", "val") == [tmp_path / "ds/shards/v"]
    with BinIdxWriter(tmp_path / "plain") as w:
        w.add_document(np.array([1, 0]))
    for p in ("plain", "plain.bin", "plain.idx"):
        assert resolve_prefixes(tmp_path / p) == [tmp_path / "plain"]
    with pytest.raises(DataError, match="no manifest.json"):
        resolve_prefixes(tmp_path, check_counts=True)
    with pytest.raises(DataError, match="not a dataset"):
        resolve_prefixes(tmp_path / "nothing")
    with pytest.raises(DataError, match="unknown split"):
        resolve_prefixes(tmp_path / "ds", "test")


def test_bad_manifest_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DataError, match="not an rwkvctl dataset manifest"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "rwkvctl-binidx-manifest", "version": 1}))
    with pytest.raises(DataError, match="malformed manifest"):
        Manifest.load(tmp_path)


@pytest.mark.parametrize("prefix", ["../outside", "/etc/passwd", "a/../../b", "", "a\\..\\b"])
def test_a_shard_path_outside_the_dataset_is_refused(tmp_path: Path, prefix: str) -> None:
    d = _manifest().to_dict()
    d["shards"][0]["prefix"] = prefix
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(DataError, match=r"manifest\.json: shard 0: shard prefix .* inside the dataset directory"):
        Manifest.load(tmp_path)


@pytest.mark.parametrize("key, value, message", [
    ("docs", -3, "field 'docs' must be integer in \\[0, "),
    ("tokens", "10", "field 'tokens' must be integer"),
    ("split", "test", "'split' must be one of train, val"),
    ("sources", [], "field 'sources' must be object"),
])
def test_shard_fields_are_checked_by_name(tmp_path: Path, key: str, value, message: str) -> None:
    d = _manifest().to_dict()
    d["shards"][1][key] = value
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(DataError, match=f"manifest.json: shard 1.*{message}"):
        Manifest.load(tmp_path)


def test_manifest_counts_are_checked_against_the_shards(tmp_path: Path) -> None:
    with BinIdxWriter(tmp_path / "s") as w:
        w.add_document(np.arange(1, 6, dtype=np.uint16))
    m = Manifest(tokenizer={"name": "world"}, dtype="uint16",
                 shards=[Shard("s", "train", "in.jsonl", docs=1, tokens=5)])
    m.save(tmp_path)
    assert resolve_prefixes(tmp_path, check_counts=True) == [tmp_path / "s"]
    m.shards[0].tokens = 500  # the manifest promises more than the shard holds
    m.save(tmp_path)
    with pytest.raises(DataError, match="shard 's' holds 5 tokens in 1 documents but the manifest says 500 in 1"):
        resolve_prefixes(tmp_path, check_counts=True)
