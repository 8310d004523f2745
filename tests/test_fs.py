import os
import subprocess
import sys
from pathlib import Path

import pytest

from rwkvctl import fs
from rwkvctl.fs import (
    AtomicFiles,
    abort_dir,
    atomic_path,
    atomic_paths,
    atomic_write_text,
    begin_dir,
    commit_dir,
    publish,
    remove_leftovers,
    remove_temps,
    remove_tree,
    scratch_dir,
)


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


def test_files_that_belong_together_are_synced_then_renamed_in_order(tmp_path, monkeypatch):
    events = []
    real_fsync_file, real_replace = fs.fsync_file, os.replace
    monkeypatch.setattr(fs, "fsync_file", lambda p: (events.append(("fsync", p.name)), real_fsync_file(p)))
    monkeypatch.setattr(fs.os, "replace", lambda a, b: (events.append(("rename", Path(b).name)), real_replace(a, b)))
    with atomic_paths(tmp_path / "d.bin", tmp_path / "d.idx") as (bin_tmp, idx_tmp):
        assert bin_tmp.name == f".d.bin.tmp-{os.getpid()}" and idx_tmp.parent == tmp_path
        bin_tmp.write_bytes(b"tokens")
        idx_tmp.write_bytes(b"index")
    assert (tmp_path / "d.bin").read_bytes() == b"tokens" and (tmp_path / "d.idx").read_bytes() == b"index"
    # both on disk before either is visible; the .idx, whose presence means "complete", last
    assert [e for e in events if e[0] == "rename"] == [("rename", "d.bin"), ("rename", "d.idx")]
    assert events.index(("fsync", bin_tmp.name)) < events.index(("rename", "d.bin"))
    assert events.index(("fsync", idx_tmp.name)) < events.index(("rename", "d.bin"))


def test_replacing_a_pair_deletes_the_old_companion_before_the_first_rename(tmp_path, monkeypatch):
    """Killed between the renames, the new first file must not sit beside the old file's companion (an .idx or a
    sidecar describing another file): the old companion is deleted, durably, before the first rename."""
    atomic_write_text(tmp_path / "d.bin", "old bin")
    atomic_write_text(tmp_path / "d.idx", "old idx")
    real_replace = os.replace

    def killed_at_second(a, b):
        if Path(b).name == "d.idx":
            raise KeyboardInterrupt  # stands in for kill -9 between the two renames
        real_replace(a, b)

    monkeypatch.setattr(fs.os, "replace", killed_at_second)
    with pytest.raises(KeyboardInterrupt), atomic_paths(tmp_path / "d.bin", tmp_path / "d.idx") as (b, i):
        b.write_text("new bin")
        i.write_text("new idx")
    assert (tmp_path / "d.bin").read_text() == "new bin" and not (tmp_path / "d.idx").exists()


def test_an_exception_mid_write_keeps_the_old_pair_and_no_temp(tmp_path):
    atomic_write_text(tmp_path / "d.bin", "old bin")
    atomic_write_text(tmp_path / "d.idx", "old idx")
    with pytest.raises(OSError, match="No space"), atomic_paths(tmp_path / "d.bin", tmp_path / "d.idx") as temps:
        temps[0].write_text("half")
        raise OSError(28, "No space left on device")
    assert (tmp_path / "d.bin").read_text() == "old bin" and (tmp_path / "d.idx").read_text() == "old idx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.bin", "d.idx"]
    files = AtomicFiles(tmp_path / "e.bin")  # the long-lived form: abort drops the temps
    files.temps[0].write_bytes(b"x")
    files.abort()
    assert not (tmp_path / "e.bin").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["d.bin", "d.idx"]


KILLED_WRITER = """
import os, sys
from rwkvctl.fs import atomic_paths
with atomic_paths(sys.argv[1] + ".bin", sys.argv[1] + ".idx") as (b, i):
    b.write_bytes(b"new")
    os._exit(9)  # kill -9 mid-write: no cleanup of any kind runs
"""


def test_a_killed_writer_leaves_the_old_files_and_its_temps_are_swept(tmp_path):
    atomic_write_text(tmp_path / "d.bin", "old")
    subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tmp_path / "d")], check=False)
    assert (tmp_path / "d.bin").read_text() == "old" and not (tmp_path / "d.idx").exists()
    assert [p.name for p in tmp_path.glob(".d.bin.tmp-*")]  # left behind by the dead writer
    with atomic_paths(tmp_path / "d.bin", tmp_path / "d.idx") as (b, i):
        b.write_text("next")
        i.write_text("next")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.bin", "d.idx"]


def test_remove_temps_of_any_owner(tmp_path):
    live = tmp_path / f".x.json.tmp-{os.getppid()}"
    live.write_text("{")
    other = tmp_path / f".y.json.tmp-{os.getppid()}"
    other.write_text("{")
    remove_temps(tmp_path / "x.json")
    assert live.exists()  # a live writer's
    remove_temps(tmp_path / "x.json", any_owner=True)
    assert not live.exists() and other.exists()  # only the temps of that one name


def _dir_with(final: Path, text: str) -> None:
    tmp = begin_dir(final)
    assert tmp == final.with_name(f".tmp-{final.name}") and not any(tmp.iterdir())
    (tmp / "state.json").write_text(text)
    commit_dir(final)


def test_directory_commit_replaces_whole_and_a_failed_one_keeps_the_old(tmp_path, monkeypatch):
    final = tmp_path / "step-1"
    _dir_with(final, "first")
    _dir_with(final, "second")  # replaced: the old one was moved aside, then deleted
    assert (final / "state.json").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1"]
    tmp = begin_dir(final)
    (tmp / "state.json").write_text("third")

    def disk_error(path):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(fs, "fsync_file", disk_error)
    with pytest.raises(OSError):
        commit_dir(final)
    abort_dir(final)
    assert (final / "state.json").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1"]


def test_removing_a_tree_renames_it_aside_first(tmp_path, monkeypatch):
    for name in ("step-1", "step-2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "w.pt").write_bytes(b"w")
    monkeypatch.setattr(fs.shutil, "rmtree", lambda path, ignore_errors=False: None)  # killed before deleting
    remove_tree(tmp_path / "step-1")
    assert not (tmp_path / "step-1").exists()
    (aside,) = tmp_path.glob(".deleting-step-1-*")
    assert aside.name.rsplit("-", 1)[1].isdigit()
    monkeypatch.undo()
    remove_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2"]
    moved = fs.rename(tmp_path / "step-2", tmp_path / "superseded-step-2")
    assert moved.is_dir() and (moved / "w.pt").read_bytes() == b"w"


def test_scratch_dir_is_private_and_removed(tmp_path):
    with scratch_dir(tmp_path / "out", ".spm-train-") as d:
        assert d.parent == tmp_path / "out" and d.name.startswith(".spm-train-")
        (d / "model.model").write_bytes(b"m")
        publish([(d / "model.model", tmp_path / "out" / "m.model")])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m.model"]


def test_published_files_get_an_ordinary_mode_or_owner_only(tmp_path):
    import os
    import stat

    import torch
    from safetensors.torch import save_file

    from rwkvctl.fs import atomic_path, default_file_mode

    old = os.umask(0o022)
    try:
        assert default_file_mode() == 0o644
        with atomic_path(tmp_path / "q.safetensors") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp))  # safetensors creates 0o600 files
        assert stat.S_IMODE((tmp_path / "q.safetensors").stat().st_mode) == 0o644  # like every other output
        with atomic_path(tmp_path / "chat.safetensors", private=True) as tmp:
            tmp.write_bytes(b"x")
        assert stat.S_IMODE((tmp_path / "chat.safetensors").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_remove_dir_temps_finishes_a_cut_commit_and_drops_other_temps(tmp_path):
    from rwkvctl.fs import remove_dir_temps

    _dir_with(tmp_path / "a", "old a")
    fs.rename_aside(tmp_path / "a", "old")  # killed between commit_dir's renames: the new copy is in .tmp-a
    (tmp_path / ".tmp-a").mkdir()
    (tmp_path / ".tmp-a" / "state.json").write_text("new a")
    _dir_with(tmp_path / "b", "b")
    (tmp_path / ".old-b-1").mkdir()  # killed after both renames, before deleting the old copy
    (tmp_path / ".tmp-c").mkdir()  # a write killed before its commit
    remove_dir_temps(tmp_path)
    assert (tmp_path / "a" / "state.json").read_text() == "new a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_remove_dir_temps_restores_the_newest_set_aside_copy(tmp_path: Path) -> None:
    from rwkvctl.fs import remove_dir_temps

    for stamp, text in ((1_000, "older"), (3_000, "newest"), (2_000, "middle")):
        d = tmp_path / f".old-step-5-{stamp}"
        d.mkdir()
        (d / "which").write_text(text)
    remove_dir_temps(tmp_path)
    assert (tmp_path / "step-5" / "which").read_text() == "newest"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-5"]
