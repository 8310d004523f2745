"""Merge binidx shards into one `.bin/.idx` pair that RWKV-LM reads as a single dataset.

Unlike json2binidx's merge, doc_idx is offset correctly (each part's `doc_idx[1:] + sequences so far`, as
Megatron's `add_index`). Memory stays bounded by the largest part's index; the `.bin` is streamed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np

from rwkvctl.data.binidx import _WRITE_CODES, HEADER, MAGIC, VERSION, BinIdxReader, split_prefix
from rwkvctl.errors import DataError
from rwkvctl.io.atomic import fsync_dir


def merge_binidx(prefixes: list[Path], out_prefix: str | Path, overwrite: bool = False) -> dict[str, Any]:
    if not prefixes:
        raise DataError("nothing to merge: the dataset has no shards for that split")
    readers = [BinIdxReader(p) for p in prefixes]
    dtype = readers[0].dtype
    for r in readers:
        if r.dtype != dtype:
            raise DataError(f"{r.idx_path}: dtype {r.dtype} differs from {dtype} in {readers[0].idx_path}")
    if dtype not in _WRITE_CODES:
        raise DataError(f"{readers[0].idx_path}: cannot merge token dtype {dtype}")
    out = split_prefix(out_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    bin_final, idx_final = out.with_name(out.name + ".bin"), out.with_name(out.name + ".idx")
    if any(bin_final.resolve() == r.bin_path.resolve() for r in readers):
        raise DataError(f"{bin_final}: output would overwrite one of its inputs")
    if not overwrite:
        for p in (bin_final, idx_final):
            if p.exists():
                raise DataError(f"{p}: already exists; pass --force to overwrite it")
    bin_tmp = bin_final.with_name(f".{bin_final.name}.tmp-{os.getpid()}")
    idx_tmp = idx_final.with_name(f".{idx_final.name}.tmp-{os.getpid()}")
    n_seq = sum(len(r) for r in readers)
    n_doc = sum(max(len(r.doc_idx) - 1, 0) for r in readers) + 1
    try:
        with open(bin_tmp, "wb") as fb:
            for r in readers:
                with open(r.bin_path, "rb") as src:
                    shutil.copyfileobj(src, fb, 16 << 20)
            fb.flush()
            os.fsync(fb.fileno())
        with open(idx_tmp, "wb") as fi:
            fi.write(HEADER.pack(MAGIC, VERSION, _WRITE_CODES[dtype], n_seq, n_doc))
            for r in readers:
                fi.write(np.asarray(r.sizes, dtype=np.int32).tobytes())
            byte_off = 0
            for r in readers:
                fi.write((np.asarray(r.pointers, dtype=np.int64) + byte_off).tobytes())
                byte_off += r.num_tokens * dtype.itemsize
            fi.write(struct.pack("<q", 0))
            seq_off = 0
            for r in readers:
                fi.write((np.asarray(r.doc_idx[1:], dtype=np.int64) + seq_off).tobytes())
                seq_off += len(r)
            fi.flush()
            os.fsync(fi.fileno())
        os.replace(bin_tmp, bin_final)
        os.replace(idx_tmp, idx_final)
        fsync_dir(out.parent)
    except BaseException:
        for p in (bin_tmp, idx_tmp):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        raise
    tokens = sum(r.num_tokens for r in readers)
    return {"parts": len(readers), "sequences": n_seq, "docs": n_doc - 1, "tokens": tokens, "dtype": str(dtype)}
