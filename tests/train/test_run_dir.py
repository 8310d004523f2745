"""RunDir/CheckpointDir: the names on disk (pinned: old runs must keep resuming) and which checkpoints count."""

from pathlib import Path

import pytest

from rwkvctl import fs
from rwkvctl.errors import CheckpointError
from rwkvctl.train.run_dir import CheckpointDir, RunDir


def _complete(ckpt_dir: Path) -> Path:
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "trainer_state.json").write_text("{}")
    return ckpt_dir


def test_the_run_layout_keeps_its_names(tmp_path):
    run = RunDir(tmp_path)
    assert run.config_file == tmp_path / "run_config.yaml"
    assert run.metrics == tmp_path / "metrics.jsonl"
    assert run.metrics_superseded == tmp_path / "metrics.superseded.jsonl"
    assert run.wandb_id == tmp_path / "wandb_id.txt"
    assert run.branch_note == tmp_path / "branch.json"
    assert run.checkpoints_root == tmp_path / "checkpoints"


def test_a_checkpoint_keeps_its_names(tmp_path):
    ckpt = RunDir(tmp_path).checkpoint(200)
    step_dir = tmp_path / "checkpoints" / "step-00000200"
    assert ckpt == CheckpointDir(step_dir, 200) and str(ckpt) == str(step_dir)
    assert ckpt.trainer_state == step_dir / "trainer_state.json"
    assert ckpt.rng(0) == step_dir / "rng-rank0.pt" and ckpt.rng(13) == step_dir / "rng-rank13.pt"
    assert ckpt.engine_state == step_dir / "engine_state.pt"
    assert ckpt.deepspeed_dir == step_dir / "deepspeed"
    assert ckpt.deepspeed_state == step_dir / "deepspeed" / "state"
    assert ckpt.export == step_dir / "rwkv-200.pth"
    temp = RunDir(tmp_path).temp_checkpoint(200)
    assert temp.path == tmp_path / "checkpoints" / ".tmp-step-00000200"
    assert temp.export == temp.path / "rwkv-200.pth"  # written under its final name, renamed with the directory


def test_only_complete_step_directories_count(tmp_path):
    run = RunDir(tmp_path)
    root = tmp_path / "checkpoints"
    for step in (9, 10, 2):
        _complete(root / f"step-{step:08d}")
    (root / "step-00000011").mkdir()  # no trainer state yet: incomplete
    _complete(run.temp_checkpoint(12).path)
    for step, tag in ((10, "old"), (2, "deleting")):  # complete directories moved aside the way rwkvctl.fs does
        fs.rename_aside(run.checkpoint(step).path, tag)
        _complete(run.checkpoint(step).path)
    _complete(run.superseded_path(run.checkpoint(10)))
    (root / "notes.txt").write_text("a user's file")
    found = run.checkpoints()
    assert list(found) == [2, 9, 10]  # by step, not by name
    assert all(found[s] == run.checkpoint(s) and found[s].is_complete for s in found)
    assert run.latest() == run.checkpoint(10) == run.find("latest")
    assert run.find(9) == run.find("9") == run.checkpoint(9)
    with pytest.raises(CheckpointError, match=r"no checkpoint for step 11 \(available: 2, 9, 10\)"):
        run.find(11)


def test_an_empty_or_missing_run_has_no_checkpoints(tmp_path):
    run = RunDir(tmp_path / "never-created")
    assert run.checkpoints() == {} and run.latest() is None and run.find("latest") is None
    with pytest.raises(CheckpointError, match=r"available: none"):
        run.find(3)


def test_rng_files_by_rank(tmp_path):
    ckpt = RunDir(tmp_path).checkpoint(4)
    assert ckpt.rng_files() == {}  # not written yet
    ckpt.path.mkdir(parents=True)
    for name in ("rng-rank0.pt", "rng-rank10.pt", "rng-rank1.pt", "rng-rank1.pt.bak", "rng-rankx.pt"):
        (ckpt.path / name).write_bytes(b"")
    assert ckpt.rng_files() == {0: ckpt.rng(0), 1: ckpt.rng(1), 10: ckpt.rng(10)}


def test_create_makes_a_writable_directory_and_leaves_nothing_behind(tmp_path):
    run = RunDir(tmp_path / "a" / "run")
    run.create()
    run.create()  # an existing run directory is fine
    assert run.path.is_dir() and list(run.path.iterdir()) == []
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError):
        RunDir(blocker / "run").create()


def test_of_accepts_a_path_a_string_or_a_run(tmp_path):
    run = RunDir(tmp_path)
    assert RunDir.of(run) is run
    assert RunDir.of(str(tmp_path)) == run == RunDir.of(tmp_path)
    assert run != RunDir(tmp_path / "other") and len({run, RunDir(tmp_path)}) == 1
