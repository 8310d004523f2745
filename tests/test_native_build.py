"""The one cache root, settings scheme, cache key and build lock of both compiled parts (rwkvctl/native_build.py)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rwkvctl import native_build
from rwkvctl.errors import BuildLockTimeout, KernelUnavailable, TokenizerError
from rwkvctl.native_build import build_lock, cache_dir, cache_key, choice, flag, setting

HOLDER = """
import sys, time
from pathlib import Path
from rwkvctl.native_build import build_lock
with build_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def hold(target: Path, seconds: float) -> subprocess.Popen:
    """A process that holds the build lock of `target` for `seconds` (returns once it holds it)."""
    cmd = [sys.executable, "-c", HOLDER, str(target), str(seconds)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


@pytest.fixture
def clean_env(monkeypatch):
    for var in ("RWKVCTL_CACHE_DIR", "RWKVCTL_TOKENIZER", "RWKVCTL_WKV_SKIP_CUDA", "CXX", *native_build.DEPRECATED):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(native_build, "_warned", set())
    return monkeypatch


def test_one_cache_root_for_both_parts(clean_env, tmp_path):
    assert cache_dir("WKV") == Path.home() / ".cache" / "rwkvctl" / "extensions"
    assert cache_dir("TOKENIZER") == Path.home() / ".cache" / "rwkvctl" / "tokenizer"
    clean_env.setenv("RWKVCTL_CACHE_DIR", str(tmp_path))
    assert cache_dir("WKV") == tmp_path / "extensions" and cache_dir("TOKENIZER") == tmp_path / "tokenizer"
    assert native_build.compiler() == "c++"
    clean_env.setenv("CXX", "clang++")
    assert native_build.compiler() == "clang++"


def test_old_names_still_work_with_a_warning(clean_env, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="rwkvctl.build"):
        clean_env.setenv("RWKVCTL_NO_NATIVE", "1")
        assert setting("TOKENIZER", "auto") == "python"
        assert setting("TOKENIZER", "auto") == "python"
        clean_env.setenv("RWKVCTL_SKIP_CUDA_BUILD", "1")
        assert flag("WKV_SKIP_CUDA")
        clean_env.setenv("RWKVCTL_EXTENSIONS_DIR", str(tmp_path / "ext"))
        assert cache_dir("WKV") == tmp_path / "ext"
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 3  # once per old name
    assert "RWKVCTL_NO_NATIVE is deprecated" in said[0] and "use RWKVCTL_TOKENIZER" in said[0]
    clean_env.setenv("RWKVCTL_NO_NATIVE", "0")
    assert setting("TOKENIZER", "auto") == "auto"
    clean_env.setenv("RWKVCTL_SKIP_CUDA_BUILD", "0")
    assert not flag("WKV_SKIP_CUDA")
    clean_env.setenv("RWKVCTL_NO_NATIVE", "1")
    clean_env.setenv("RWKVCTL_TOKENIZER", "native")  # the new name wins
    assert setting("TOKENIZER", "auto") == "native"


def test_a_bad_backend_is_the_parts_own_error(clean_env):
    clean_env.setenv("RWKVCTL_TOKENIZER", "Fast")
    with pytest.raises(TokenizerError, match="RWKVCTL_TOKENIZER must be one of auto, native, python, got 'fast'"):
        choice("TOKENIZER", ("auto", "native", "python"), TokenizerError)
    clean_env.setenv("RWKVCTL_TOKENIZER", " Python ")
    assert choice("TOKENIZER", ("auto", "native", "python"), KernelUnavailable) == "python"


def test_cache_key_covers_every_byte_name_and_toolchain(tmp_path):
    (tmp_path / "a.h").write_text("int a;")
    (tmp_path / "b.cpp").write_text("int b;")
    files = [tmp_path / "b.cpp", tmp_path / "a.h"]
    key = cache_key(files, tmp_path, ("-O3",))
    assert len(key) == 16 and key == cache_key(list(reversed(files)), tmp_path, ("-O3",))
    assert key != cache_key(files, tmp_path, ("-O2",))
    (tmp_path / "a.h").write_text("int a2;")
    assert key != cache_key(files, tmp_path, ("-O3",))


def test_lock_of_a_killed_builder_is_taken_over_at_once(tmp_path):
    target = tmp_path / "lib-0123.so"
    holder = hold(target, 60)
    assert f"{holder.pid} " in native_build.lock_path(target).read_text()
    holder.send_signal(signal.SIGKILL)  # kill -9 mid-build: nothing is cleaned up
    holder.wait()
    assert native_build.lock_path(target).exists()  # the lock file stays, naming a dead pid
    start = time.monotonic()
    with build_lock(target, timeout_s=5):
        assert time.monotonic() - start < 2
        assert native_build.lock_path(target).read_text().startswith(f"{os.getpid()} ")


def test_a_live_builder_is_waited_for(tmp_path, caplog):
    target = tmp_path / "build-dir"
    holder = hold(target, 1.0)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="rwkvctl.build"), build_lock(target, timeout_s=30):
        waited = time.monotonic() - start
    holder.wait()
    assert waited > 0.3
    assert f"waiting for pid {holder.pid} on " in caplog.text


def test_a_live_builder_that_never_finishes_is_refused_by_name(tmp_path):
    target = tmp_path / "lib.so"
    holder = hold(target, 60)
    try:
        refused = pytest.raises(BuildLockTimeout, match=f"pid {holder.pid} on .* has been building lib.so for over 0 s")
        with refused, build_lock(target, timeout_s=0.3):
            pytest.fail("entered a lock that another live process holds")
    finally:
        holder.kill()
        holder.wait()
