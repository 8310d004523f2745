"""`describe_dataset`: a plain-dict summary of a prepared dataset (or a bare binidx pair) for `rwkvctl inspect`.

The dict carries the manifest totals (per split, per source), problems found while preparing, RWKV-LM numbers,
and one decoded sample window, so the CLI only has to lay it out.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from rwkvctl.data.binidx import BinIdxReader, split_prefix
from rwkvctl.data.manifest import MANIFEST_NAME, SPLITS, Manifest, find_manifest
from rwkvctl.errors import DataError, RwkvctlError


def is_dataset_path(path: str | Path) -> bool:
    """True for a manifest.json, a directory holding one, or a `.bin`/`.idx`/prefix of a binidx pair."""
    p = Path(path)
    if p.is_dir():
        return (p / MANIFEST_NAME).is_file()
    if p.suffix == ".json":  # a checkpoint's sidecar is JSON too: only manifest*.json counts
        return p.is_file() and p.name.startswith("manifest")
    prefix = split_prefix(p)
    return all(prefix.with_name(prefix.name + ext).is_file() for ext in (".bin", ".idx"))


def _sample(prefix: Path, window: int, tokenizer: dict[str, Any] | None, base: Path | None) -> dict[str, Any]:
    r = BinIdxReader(prefix)
    ids = np.asarray(r.tokens()[:window]).astype(np.int64)
    out: dict[str, Any] = {"shard": str(prefix), "offset": 0, "ids": ids.tolist(), "text": None, "decoded_as": None}
    name = (tokenizer or {}).get("name", "world" if r.dtype == np.uint16 else None)
    try:
        from rwkvctl.data.tokenizer import load_tokenizer

        if name == "world":
            tok = load_tokenizer("world")
        elif name == "sentencepiece" and base is not None and (base / tokenizer["model"]).is_file():
            tok = load_tokenizer(f"spm:{base / tokenizer['model']}")
        else:
            return out
        eod = tok.eod_id
        # Show document boundaries: split on the end-of-doc id and decode each piece.
        pieces, cur = [], []
        for i in ids.tolist():
            if i == eod:
                pieces.append(tok.decode(cur))
                cur = []
            else:
                cur.append(i)
        pieces.append(tok.decode(cur))
        out["text"] = pieces
        out["decoded_as"] = name
    except RwkvctlError:
        pass  # ids are still shown
    return out


def describe_dataset(path: str | Path, window: int = 256) -> dict[str, Any]:
    """Summary of a dataset: manifest totals + a decoded sample window of the first training shard."""
    mpath = find_manifest(path)
    if mpath is not None:
        m = Manifest.load(mpath)
        splits = {}
        for split in SPLITS:
            shards = m.shards_for(split)
            splits[split] = {
                "shards": len(shards),
                "docs": m.docs(split),
                "tokens": m.tokens(split),
                "sources": {k: asdict(v) for k, v in m.source_totals(split).items()},
            }
        first = next(iter(m.shards_for("train") or m.shards), None)
        return {
            "kind": "manifest",
            "path": str(mpath),
            "tokenizer": m.tokenizer,
            "dtype": m.dtype,
            "splits": splits,
            "inputs_done": len(m.inputs_done),
            "bad_inputs": [asdict(b) for b in m.bad_inputs],
            "options": m.options,
            "rwkv_lm": m.rwkv_lm,
            "sample": _sample(mpath.parent / first.prefix, window, m.tokenizer, mpath.parent) if first else None,
        }
    prefix = split_prefix(path)
    if not prefix.with_name(prefix.name + ".idx").is_file():
        raise DataError(f"{path}: not a dataset (expected manifest.json, a prepared directory or a .bin/.idx pair)")
    r = BinIdxReader(prefix)
    return {
        "kind": "binidx",
        "path": str(prefix),
        "tokenizer": None,
        "dtype": str(r.dtype),
        "dtype_code": r.dtype_code,
        "splits": {"train": {"shards": 1, "docs": r.num_docs, "tokens": r.num_tokens, "sources": {}}},
        "sequences": len(r),
        "bad_inputs": [],
        "rwkv_lm": {},
        "sample": _sample(prefix, window, None, None) if r.num_tokens else None,
    }
