import os
import subprocess
import sys

import pytest

from rwkvctl.fs import atomic_path, atomic_write_text


def test_success_replaces_and_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_temps_of_killed_writers_are_cleaned_but_live_ones_kept(tmp_path):
    target = tmp_path / "w.bin"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_tmp = tmp_path / f".w.bin.tmp-{int(dead.stdout)}"
    dead_tmp.write_bytes(b"x" * 100)
    live_tmp = tmp_path / f".w.bin.tmp-{os.getppid()}"
    live_tmp.write_bytes(b"y")
    atomic_write_text(target, "new")
    assert not dead_tmp.exists()
    assert live_tmp.exists()
    assert target.read_text() == "new"
