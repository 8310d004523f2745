"""Checkpoint directories: pruning never leaves a half-deleted checkpoint that `--resume` would pick."""

import shutil

from rwkvctl import fs
from rwkvctl.train.run_dir import RunDir
from rwkvctl.train.run_state import CheckpointWriter, TrainerState


def _write(writer: CheckpointWriter, step: int) -> None:
    tmp = writer.begin(step)
    tmp.engine_state.write_bytes(b"weights")
    writer.commit(step, TrainerState(step=step))


def test_prune_crashing_midway_leaves_only_complete_checkpoints(tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    writer = CheckpointWriter(run, keep_last=2)
    for step in (1, 2):
        _write(writer, step)
    real_rmtree = shutil.rmtree

    def killed_midway(path, ignore_errors=False):  # deletes the weights, then the process "dies"
        (path / "engine_state.pt").unlink(missing_ok=True)

    monkeypatch.setattr(fs.shutil, "rmtree", killed_midway)
    _write(writer, 3)
    found = run.checkpoints()
    assert sorted(found) == [2, 3]
    assert all(d.engine_state.is_file() for d in found.values())
    monkeypatch.setattr(fs.shutil, "rmtree", real_rmtree)
    _write(writer, 4)  # the next prune also clears what the crash left behind
    assert sorted(run.checkpoints()) == [3, 4]
    assert not list((tmp_path / "checkpoints").glob(".deleting-*"))
