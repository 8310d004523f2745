"""Merge binidx shards into one `.bin/.idx` pair that RWKV-LM reads as a single dataset.

Unlike json2binidx's merge, doc_idx is offset correctly (each part's `doc_idx[1:] + sequences so far`, as
Megatron's `add_index`). Memory stays bounded by the largest part's index; the `.bin` is streamed.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from rwkvctl.data.binidx import WRITE_CODES, BinIdxReader, split_prefix, write_index
from rwkvctl.dir_lock import writer_lock
from rwkvctl.errors import DataError
from rwkvctl.fs import atomic_paths


def merge_binidx(prefixes: list[Path], out_prefix: str | Path, overwrite: bool = False) -> dict[str, Any]:
    if not prefixes:
        raise DataError("nothing to merge: the dataset has no shards for that split")
    readers = [BinIdxReader(p) for p in prefixes]
    dtype = readers[0].dtype
    for r in readers:
        if r.dtype != dtype:
            raise DataError(f"{r.idx_path}: dtype {r.dtype} differs from {dtype} in {readers[0].idx_path}")
    if dtype not in WRITE_CODES:
        raise DataError(f"{readers[0].idx_path}: cannot merge token dtype {dtype}")
    out = split_prefix(out_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    bin_final, idx_final = out.with_name(out.name + ".bin"), out.with_name(out.name + ".idx")
    if any(bin_final.resolve() == r.bin_path.resolve() for r in readers):
        raise DataError(f"{bin_final}: output would overwrite one of its inputs")
    with writer_lock(out.parent, "rwkvctl merge-binidx", part=out.name):  # one writer of the pair at a time
        if not overwrite:
            for p in (bin_final, idx_final):
                if p.exists():
                    raise DataError(f"{p}: already exists; pass --force to overwrite it")
        n_seq = sum(len(r) for r in readers)
        with atomic_paths(bin_final, idx_final) as (bin_tmp, idx_tmp):  # renamed in this order: the .idx last
            with open(bin_tmp, "wb") as fb:
                for r in readers:
                    with open(r.bin_path, "rb") as src:
                        shutil.copyfileobj(src, fb, 16 << 20)
            write_index(idx_tmp, dtype, [r.sizes for r in readers], _doc_idx(readers), _pointers(readers, dtype))
    tokens = sum(r.num_tokens for r in readers)
    docs = sum(r.num_docs for r in readers)
    return {"parts": len(readers), "sequences": n_seq, "docs": docs, "tokens": tokens, "dtype": str(dtype)}


def _pointers(readers: list[BinIdxReader], dtype: np.dtype) -> Iterator[np.ndarray]:
    """Each part's byte offsets moved past the parts before it (a part's .bin may end in unindexed tokens)."""
    byte_off = 0
    for r in readers:
        yield np.asarray(r.pointers, dtype=np.int64) + byte_off
        byte_off += r.num_tokens * dtype.itemsize


def _doc_idx(readers: list[BinIdxReader]) -> Iterator[np.ndarray]:
    """Megatron's `add_index`: one leading 0, then each part's doc_idx[1:] moved past the sequences before it."""
    yield np.zeros(1, dtype=np.int64)
    seq_off = 0
    for r in readers:
        yield np.asarray(r.doc_idx[1:], dtype=np.int64) + seq_off
        seq_off += len(r)
