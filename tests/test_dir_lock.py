"""rwkvctl.dir_lock: one writer per output directory. A second writer is refused by name while the first lives, a
killed holder's lock is free at once, and a filesystem without locks runs unlocked."""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path

import pytest

from rwkvctl import dir_lock
from rwkvctl.dir_lock import holder, is_lock_file, lock_file, writer_lock
from rwkvctl.errors import DirectoryInUse, RwkvctlError


def test_a_second_writer_is_refused_naming_the_holder(tmp_path: Path, lock_holder) -> None:
    proc = lock_holder(tmp_path / "run")
    with pytest.raises(DirectoryInUse) as e, writer_lock(tmp_path / "run", "rwkvctl prepare"):
        pass
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, RwkvctlError) and e.value.exit_code == 2
    assert msg.startswith(f"{tmp_path / 'run'} is being written by rwkvctl train (pid {proc.pid} on host ")
    assert ", since 20" in msg and msg.endswith("; wait for it to finish or choose another directory")
    stamp = json.loads(lock_file(tmp_path / "run").read_text())
    assert stamp["pid"] == proc.pid and stamp["command"] == "rwkvctl train" and "argv" in stamp


def test_kill_9_frees_the_lock_at_once(tmp_path: Path, lock_holder) -> None:
    proc = lock_holder(tmp_path / "run")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads(lock_file(tmp_path / "run").read_text())["pid"] == proc.pid  # its stamp is still there
    with writer_lock(tmp_path / "run", "rwkvctl train"):  # yet the OS dropped its lock: taken over, no cleanup
        assert json.loads(lock_file(tmp_path / "run").read_text())["pid"] == os.getpid()
    assert lock_file(tmp_path / "run").read_text() == ""  # released: stamp cleared, file kept


def test_released_on_exit_and_on_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError), writer_lock(tmp_path, "rwkvctl train"):
        raise ValueError("boom")
    # free again (the first), then held (the second is refused)
    with writer_lock(tmp_path, "rwkvctl train"), pytest.raises(DirectoryInUse), writer_lock(tmp_path, "x"):
        pass
    assert lock_file(tmp_path).is_file() and lock_file(tmp_path).read_text() == ""


def test_parts_and_shared_holders(tmp_path: Path, lock_holder) -> None:
    lock_holder(tmp_path, part="q4.safetensors")
    with writer_lock(tmp_path, "rwkvctl quantize", part="q8.safetensors"):  # another file of the directory
        pass
    refused = pytest.raises(DirectoryInUse, match=r"q4\.safetensors is being written")
    with refused, writer_lock(tmp_path, "rwkvctl quantize", part="q4.safetensors"):
        pass
    nodes = tmp_path / "nodes"
    lock_holder(nodes, shared=True)  # node 0 of a multi-node prepare
    with writer_lock(nodes, "rwkvctl prepare", shared=True):  # node 1 shares the directory
        pass
    with pytest.raises(DirectoryInUse), writer_lock(nodes, "rwkvctl prepare"):  # a whole-directory run is refused
        pass


def test_lock_files_are_told_apart(tmp_path: Path) -> None:
    assert is_lock_file(lock_file(tmp_path)) and is_lock_file(lock_file(tmp_path, "merged"))
    assert not is_lock_file(tmp_path / "manifest.json") and not is_lock_file(tmp_path / ".prepare")
    assert holder(tmp_path / "missing.lock") == "another process"


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP])
def test_a_filesystem_without_locks_runs_unlocked(tmp_path: Path, monkeypatch, caplog, code: int) -> None:
    def no_locks(fd: int, op: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(dir_lock.fcntl, "flock", no_locks)
    with writer_lock(tmp_path, "rwkvctl train"), writer_lock(tmp_path, "rwkvctl train"):  # both proceed
        pass
    assert "no file locks" in caplog.text


def test_other_lock_errors_are_not_swallowed(tmp_path: Path, monkeypatch) -> None:
    def broken(fd: int, op: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(dir_lock.fcntl, "flock", broken)
    with pytest.raises(OSError, match="I/O error"), writer_lock(tmp_path, "rwkvctl train"):
        pass


def test_an_uncreatable_lock_file_runs_unlocked(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")  # a file where the directory should be: the command's own check says so
    with writer_lock(tmp_path / "file", "rwkvctl prepare"):
        pass
