"""Build (once, cached) and load the C++ World trie encoder in csrc/tokenizer/ through ctypes (it also holds
prepare's JSONL fast path: jsonl_fields.h).

No torch and no pybind11: the system C++ compiler (`$CXX`, default c++) builds a plain shared library on first
use into `$RWKVCTL_CACHE_DIR/tokenizer/` (default `~/.cache/rwkvctl`), named by a hash of the sources and flags,
so an edited source rebuilds; one process builds under the build lock while concurrent workers wait, and none
ever sees a half-written library (temp name + rename). Cache root, settings and lock are those of every compiled
part (rwkvctl/native_build.py): `RWKVCTL_TOKENIZER=python` forces the pure-Python fallback (`native`: no
fallback), `RWKVCTL_TOKENIZER_CXXFLAGS` adds compiler flags. Any build/load failure returns None with a reason,
and the caller falls back: a missing compiler must never make `prepare` unusable.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

from rwkvctl import native_build
from rwkvctl.errors import BuildLockTimeout, TokenizerError
from rwkvctl.fs import atomic_path

_PACKAGE = Path(__file__).resolve().parents[1]
# rwkvctl/_csrc/ in a wheel/sdist install (as the WKV5 kernel sources), csrc/ in a source checkout.
_CANDIDATES = [root / "tokenizer" / "world_trie.cpp" for root in (_PACKAGE / "_csrc", _PACKAGE.parent / "csrc")]
SOURCE = next((c for c in _CANDIDATES if c.is_file()), _CANDIDATES[-1])
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fno-plt"]
BACKENDS = ("auto", "native", "python")

_lib: ctypes.CDLL | None = None
_reason = ""

c_i64p = ctypes.POINTER(ctypes.c_int64)
c_i32p = ctypes.POINTER(ctypes.c_int32)


def cache_dir() -> Path:
    """The tokenizer's cache: built libraries and parsed vocabularies."""
    return native_build.cache_dir("TOKENIZER")


def requested_backend() -> str:
    """RWKVCTL_TOKENIZER: auto (default), native (no fallback) or python (never build)."""
    return native_build.choice("TOKENIZER", BACKENDS, TokenizerError)


def _build(source: Path) -> Path:
    cxx = native_build.compiler()
    if shutil.which(cxx) is None:
        raise OSError(f"no C++ compiler ({cxx}) on PATH")
    flags = FLAGS + native_build.extra_flags("TOKENIZER")  # e.g. -DRWKVCTL_NO_SIMD in tests
    # The key covers the headers next to the source too (jsonl_fields.h), so editing any of them rebuilds.
    key = native_build.cache_key([*source.parent.glob("*.h"), source], source.parent, (cxx, *flags))
    out = cache_dir() / f"world_trie-{key}.so"
    if out.is_file():  # it only ever appears whole (renamed into place)
        return out
    with native_build.build_lock(out):
        if out.is_file():  # built by the process we waited for
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
    if requested_backend() == "python":
        _reason = "disabled by RWKVCTL_TOKENIZER=python"
        return None
    if not SOURCE.is_file():
        _reason = f"{SOURCE} not found (non-editable install?)"
        return None
    try:
        lib = ctypes.CDLL(str(_build(SOURCE)))
    except (OSError, BuildLockTimeout) as e:
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
