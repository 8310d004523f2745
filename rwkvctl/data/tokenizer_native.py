"""Build (once, cached) and load the C++ World trie encoder in csrc/tokenizer/ through ctypes (it also holds
prepare's JSONL fast path: jsonl_fields.h).

No torch and no pybind11: the system C++ compiler builds a plain shared library on first use into
`$RWKVCTL_CACHE_DIR/tokenizer/` (default `~/.cache/rwkvctl`), named by a hash of the source and flags, so
an edited source rebuilds and concurrent workers never see a half-written library (temp name + rename).
`RWKVCTL_NO_NATIVE=1` forces the pure-Python fallback; `RWKVCTL_TOKENIZER_CXXFLAGS` adds compiler flags. Any
build/load failure returns None with a reason, and the caller falls back: a missing compiler must never make
`prepare` unusable.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from rwkvctl.fs import atomic_path

_PACKAGE = Path(__file__).resolve().parents[1]
# rwkvctl/_csrc/ in a wheel/sdist install (as the WKV5 kernel sources), csrc/ in a source checkout.
_CANDIDATES = [root / "tokenizer" / "world_trie.cpp" for root in (_PACKAGE / "_csrc", _PACKAGE.parent / "csrc")]
SOURCE = next((c for c in _CANDIDATES if c.is_file()), _CANDIDATES[-1])
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fno-plt"]

_lib: ctypes.CDLL | None = None
_reason = ""

c_i64p = ctypes.POINTER(ctypes.c_int64)
c_i32p = ctypes.POINTER(ctypes.c_int32)


def cache_dir() -> Path:
    root = os.environ.get("RWKVCTL_CACHE_DIR") or Path.home() / ".cache" / "rwkvctl"
    return Path(root) / "tokenizer"


def _build(source: Path) -> Path:
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise OSError(f"no C++ compiler ({cxx}) on PATH")
    # The key covers the headers next to the source too (jsonl_fields.h), so editing any of them rebuilds.
    parts = [f.read_bytes() for f in sorted(source.parent.glob("*.h")) + [source]]
    flags = FLAGS + os.environ.get("RWKVCTL_TOKENIZER_CXXFLAGS", "").split()  # e.g. -DRWKVCTL_NO_SIMD in tests
    digest = hashlib.sha256(b"".join(parts) + " ".join([cxx, *flags]).encode()).hexdigest()[:16]
    out = cache_dir() / f"world_trie-{digest}.so"
    if out.is_file():
        return out
    with atomic_path(out) as tmp:
        proc = subprocess.run([cxx, *flags, str(source), "-o", str(tmp)], capture_output=True, text=True)
        if proc.returncode != 0:
            first = (proc.stderr.strip().splitlines() or ["unknown error"])[0]
            raise OSError(f"{cxx} failed on {source}: {first}")
    return out


def load() -> ctypes.CDLL | None:
    """The loaded library, or None (see `unavailable_reason()`)."""
    global _lib, _reason
    if _lib is not None or _reason:
        return _lib
    if os.environ.get("RWKVCTL_NO_NATIVE", "") not in ("", "0"):
        _reason = "disabled by RWKVCTL_NO_NATIVE"
        return None
    if not SOURCE.is_file():
        _reason = f"{SOURCE} not found (non-editable install?)"
        return None
    try:
        lib = ctypes.CDLL(str(_build(SOURCE)))
    except OSError as e:
        _reason = str(e)
        return None
    lib.wt_new.restype = ctypes.c_void_p
    lib.wt_new.argtypes = [ctypes.c_char_p, c_i64p, c_i32p, ctypes.c_int32]
    lib.wt_free.restype = None
    lib.wt_free.argtypes = [ctypes.c_void_p]
    lib.wt_encode.restype = ctypes.c_int64
    lib.wt_encode.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int64, c_i32p]
    lib.wt_encode_batch.restype = ctypes.c_int64
    lib.wt_encode_batch.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        c_i64p,
        ctypes.c_int64,
        ctypes.c_int32,
        c_i32p,
        c_i64p,
    ]
    lib.wt_decode.restype = ctypes.c_int64
    lib.wt_decode.argtypes = [ctypes.c_void_p, c_i32p, ctypes.c_int64, ctypes.c_void_p]
    lib.wt_encode_jsonl.restype = ctypes.c_int64
    lib.wt_encode_jsonl.argtypes = [
        ctypes.c_void_p,  # trie
        ctypes.c_char_p,  # buf
        ctypes.c_int64,  # len
        ctypes.c_char_p,  # text key
        ctypes.c_char_p,  # dotted source key
        ctypes.c_int32,  # eod
        c_i32p,  # ids
        ctypes.c_void_p,  # text out
        c_i64p,  # doc_line
        c_i64p,  # doc_count
        c_i64p,  # doc_text_end
        c_i32p,  # doc_source
        c_i64p,  # fallback
        c_i64p,  # src_off
        c_i64p,  # src_len
        ctypes.c_int64,  # max_sources
        c_i64p,  # counts
    ]
    _lib = lib
    return lib


def unavailable_reason() -> str:
    load()
    return _reason
