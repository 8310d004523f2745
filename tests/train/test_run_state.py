"""Checkpoint directories: pruning never leaves a half-deleted checkpoint that `--resume` would pick."""

import json
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


def test_trainer_state_round_trips_through_its_one_definition(tmp_path):
    from rwkvctl.data.loader import DataPosition
    from rwkvctl.train.run_state import read_state

    state = TrainerState(step=4, position=DataPosition.at(16, 8), elapsed_s=1.5, nan_skips=1, world_size=2,
                         engine="deepspeed-zero2", config={"data": {"ctx_len": 8}})
    writer = CheckpointWriter(RunDir(tmp_path), keep_last=2)
    writer.begin(4)
    written = writer.commit(4, state)
    doc = json.loads(written.trainer_state.read_text())
    # the file layout is the one older versions wrote (flat keys), plus the format version
    assert doc == {"format_version": 1, "step": 4, "samples_seen": 16, "tokens": 128, "elapsed_s": 1.5,
                   "nan_skips": 1, "world_size": 2, "engine": "deepspeed-zero2", "config": {"data": {"ctx_len": 8}}}
    assert read_state(written) == state
    old = {k: v for k, v in doc.items() if k != "format_version"}  # written before the version was recorded
    assert TrainerState.from_dict(old) == state
